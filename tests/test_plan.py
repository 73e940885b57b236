"""The plan as a contract: JSON round trip, `qconv plan` + `quantize --plan` byte-identical to quantizing
directly, validated overrides with their effect checked through onnxruntime, and `quantize --calib` alone."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from qconv import pipeline
from qconv.cli.main import cli
from qconv.plan import QuantPlan
from qconv.plan.config import QuantConfig
from qconv.plan.overrides import Overrides
from tests.conftest import SAMPLES, make_model, run_model

TRANSFORMER = SAMPLES / "tiny_transformer"


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def plan_of(path, data, config=QuantConfig(), overrides=None) -> tuple[QuantPlan, pipeline.Prepared]:
    prep = pipeline.load(path, config)
    calib = pipeline.calibrate(prep, pipeline.feeds_for(prep, data, 4), config=config) if config.needs_calibration else None
    return pipeline.plan(prep, calib, config, overrides), prep


@pytest.mark.parametrize("mode", ["int8", "a16w8", "dynamic", "fp16", "int4"])
def test_plan_round_trips_losslessly(mode, conv_path, conv_data):
    plan, _ = plan_of(conv_path, conv_data, QuantConfig(mode=mode, block_size=16 if mode == "int4" else 32))
    d = plan.to_dict()
    again = QuantPlan.from_dict(json.loads(json.dumps(d)))
    assert again.to_dict() == d and not again.stale
    assert d["schema"] == "qconv.plan" and d["version"] == 1 and d["config"]["mode"] == mode
    for name, t in plan.tensors.items():
        u = again.tensors[name]
        assert u.qparams.scale.dtype == np.float32 and np.array_equal(u.qparams.scale, t.qparams.scale)
        assert u.qparams.zero_point.dtype == t.qparams.zero_point.dtype and np.array_equal(u.qparams.zero_point, t.qparams.zero_point)


@pytest.mark.parametrize("args", [[], ["--format", "qoperator"], ["--per-tensor", "--method", "percentile"],
                                  ["--weight-type", "uint8", "--affine-weights"], ["--activation-type", "int8", "--symmetric-activations"],
                                  ["--reduce-range", "--method", "entropy"], ["--method", "mse", "--exclude-ops", "Gemm"],
                                  ["--quantized-io", "uint8"], ["--mode", "a16w8", "--activation-type", "int16"],
                                  ["--mode", "dynamic", "--per-tensor"], ["--mode", "fp16"], ["--mode", "fp16", "--no-keep-io-types"],
                                  ["--mode", "int4", "--block-size", "16"], ["--mode", "int4", "--block-size", "16", "--affine-weights"]])
def test_plan_then_quantize_is_byte_identical(args, conv_path, conv_data, tmp_path):
    static = "--mode" not in args or "a16w8" in args
    src = ["--data", conv_data] if static else []
    r = invoke("plan", conv_path, *src, *args, "-o", tmp_path / "p.json", "-q")
    assert r.exit_code == 0, r.output
    assert invoke("quantize", conv_path, *src, *args, "-o", tmp_path / "a.onnx", "-q", "--no-latency").exit_code == 0
    r = invoke("quantize", conv_path, "--plan", tmp_path / "p.json", "-o", tmp_path / "b.onnx", "-q")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def edited(tmp_path, plan_path, overrides: dict):
    d = json.loads(plan_path.read_text())
    d["overrides"] = overrides
    out = tmp_path / "edited.json"
    out.write_text(json.dumps(d))
    return out


@pytest.fixture
def conv_plan(conv_path, conv_data, tmp_path):
    calib = tmp_path / "c.json"
    assert invoke("calibrate", conv_path, "--data", conv_data, "-o", calib, "-q").exit_code == 0
    assert invoke("plan", conv_path, "--calib", calib, "-o", tmp_path / "p.json", "-q").exit_code == 0
    return tmp_path / "p.json", calib


def q_types(model) -> dict[str, int]:
    inits = {t.name: t for t in model.graph.initializer}
    return {n.input[0]: inits[n.input[2]].data_type for n in model.graph.node if n.op_type == "QuantizeLinear"}


def test_edited_overrides_are_applied(conv_plan, conv_path, conv_data, tmp_path):
    plan_path, _ = conv_plan
    p = edited(tmp_path, plan_path, {"nodes": {"fc": {"precision": "float"}, "conv2": {"granularity": "per-tensor"}},
                                     "tensors": {"x": {"range": [-4.0, 4.0]}}})
    r = invoke("quantize", conv_path, "--plan", p, "-o", tmp_path / "q.onnx", "--eval-data", conv_data, "--json", "--no-latency")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    nodes = {n["name"]: n for n in report["nodes"]}
    assert nodes["fc"]["status"] == "float" and nodes["fc"]["code"] == "override"
    assert report["overrides"]["nodes"]["fc"] == {"precision": "float"}
    m = onnx.load(tmp_path / "q.onnx")
    inits = {t.name: t for t in m.graph.initializer}
    dq_w2 = next(n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0].startswith("w2"))
    assert numpy_helper.to_array(inits[dq_w2.input[1]]).ndim == 0  # per-tensor weight scale
    q_x = next(n for n in m.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x")
    assert numpy_helper.to_array(inits[q_x.input[1]]) == pytest.approx(8.0 / 255, rel=1e-6)
    assert not any(n.op_type == "DequantizeLinear" and n.input[0].startswith("wf") for n in m.graph.node)
    assert report["outputs"]["y"]["cosine"] > 0.99


def test_int16_override_makes_a_16_bit_island(conv_plan, conv_path, conv_data, tmp_path):
    plan_path, _ = conv_plan
    p = edited(tmp_path, plan_path, {"nodes": {"conv2": {"precision": "int16"}}, "tensors": {}})
    assert invoke("quantize", conv_path, "--plan", p, "-o", tmp_path / "q.onnx", "-q").exit_code == 0
    types = q_types(onnx.load(tmp_path / "q.onnx"))
    assert types["r1"] == TensorProto.UINT16 and types["r2"] == TensorProto.UINT16  # conv2's input and (folded) output
    assert types["x"] == TensorProto.UINT8
    x = np.load(conv_data)
    ref, got = run_model(conv_path, {"x": x})[0], run_model(tmp_path / "q.onnx", {"x": x})[0]
    assert np.corrcoef(ref.ravel(), got.ravel())[0, 1] > 0.999


@pytest.mark.parametrize("overrides,message", [
    ({"nodes": {"nosuch*": {"precision": "float"}}}, "override for node 'nosuch*' matches no node of the model"),
    ({"nodes": {"fc": {"precision": "fp8"}}}, "node 'fc': precision 'fp8' is not one of float, int8, int16"),
    ({"nodes": {"fc": {"bits": 4}}}, "override for node 'fc' has unknown key 'bits'"),
    ({"tensors": {"x": {"range": [2.0, 1.0]}}}, "tensor 'x': range must be [low, high] with finite low <= high"),
    ({"tensors": {"nope": {"range": [0.0, 1.0]}}}, "override for tensor 'nope' names no float activation"),
    ({"tensors": {"x": {"method": "percentile", "percentile": 120}}}, "percentile must be a number in (0, 100]"),
    ({"tensors": {"x": {"method": "entropy"}}}, "pass --calib FILE"),
    ({"extra": {}}, "unknown key 'extra'"),
])
def test_bad_overrides_fail_clearly_and_write_nothing(overrides, message, conv_plan, conv_path, tmp_path):
    plan_path, _ = conv_plan
    p = edited(tmp_path, plan_path, overrides)
    r = invoke("quantize", conv_path, "--plan", p, "-o", tmp_path / "q.onnx")
    assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output
    assert not (tmp_path / "q.onnx").exists()


def test_method_override_uses_the_calibration_file(conv_plan, conv_path, tmp_path):
    plan_path, calib = conv_plan
    p = edited(tmp_path, plan_path, {"tensors": {"r1": {"method": "percentile", "percentile": 90.0}}})
    r = invoke("quantize", conv_path, "--plan", p, "--calib", calib, "-o", tmp_path / "q.onnx", "--json", "-q")
    assert r.exit_code == 0, r.output
    p2 = edited(tmp_path, plan_path, {})
    assert invoke("quantize", conv_path, "--plan", p2, "-o", tmp_path / "plain.onnx", "-q").exit_code == 0
    assert (tmp_path / "q.onnx").read_bytes() != (tmp_path / "plain.onnx").read_bytes()
    plan = pipeline.plan(*_prepared_and_calib(conv_path, calib), QuantConfig(),
                         Overrides.from_dict({"tensors": {"r1": {"method": "percentile", "percentile": 90.0}}}))
    assert plan.tensors["r1"].method == "percentile 90"


def _prepared_and_calib(path, calib_path):
    prep = pipeline.load(path, QuantConfig())
    return prep, pipeline.load_calibration(calib_path, prep)


def test_plan_refuses_scheme_options_and_other_models(conv_plan, conv_path, tmp_path):
    plan_path, _ = conv_plan
    r = invoke("quantize", conv_path, "--plan", plan_path, "--per-tensor", "-o", tmp_path / "q.onnx")
    assert r.exit_code == 2 and "--plan fixes the mode, scheme and range methods: drop --per-tensor" in r.output
    other = tmp_path / "other.onnx"
    from tests.conftest import conv_model

    onnx.save(conv_model(seed=5), other)
    r = invoke("quantize", other, "--plan", plan_path, "-o", tmp_path / "q.onnx")
    assert r.exit_code == 1 and "was made for another model" in r.output and not (tmp_path / "q.onnx").exists()


def test_quantize_from_calibration_alone_writes_model_and_coverage(conv_plan, conv_path, tmp_path):
    _, calib = conv_plan
    r = invoke("quantize", conv_path, "--calib", calib, "-o", tmp_path / "q.onnx", "--report", tmp_path / "r.json",
               "--report", tmp_path / "r.html", "--report", tmp_path / "r.md")
    assert r.exit_code == 0, r.output
    assert "fidelity: not measured: pass --eval-data" in r.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["fidelity"] is None and report["fidelity_reason"] == "not measured: pass --eval-data"
    assert report["outputs"] == {} and report["latency_ms"] is None and report["latency_ms_reason"].startswith("not measured") and report["node_summary"]["quantized"] >= 4
    assert "not measured" in (tmp_path / "r.md").read_text()
    x = np.random.default_rng(3).normal(0, 1, (2, 3, 8, 8)).astype(np.float32)
    assert run_model(tmp_path / "q.onnx", {"x": x})[0].shape == (2, 5)


def test_gates_that_need_evaluation_are_refused_without_it(conv_plan, conv_path, tmp_path):
    _, calib = conv_plan
    r = invoke("quantize", conv_path, "--calib", calib, "-o", tmp_path / "q.onnx", "--min-cosine", "0.99")
    assert r.exit_code == 2 and "--min-sqnr, --min-cosine and --min-agreement need evaluation data" in r.output


def test_kept_float_groups_read_as_a_user_would(tmp_path):
    r = invoke("quantize", TRANSFORMER / "model.onnx", "--data", TRANSFORMER / "calib.npz", "-o", tmp_path / "q.onnx",
               "--batch-size", "32", "--json", "--no-latency", "--layer-samples", "0")
    assert r.exit_code == 0, r.output
    groups = {g["code"]: g for g in json.loads(r.stdout)["node_summary"]["kept_float_groups"]}
    assert groups["fragile"]["ops"].get("Softmax") and groups["fragile"]["ops"].get("LayerNormalization")
    assert groups["wide-range"]["reason"] == "values span more than 8 bits can hold"
    assert all("no calibration statistics" not in e["detail"] for g in groups.values() for e in g["examples"])
    assert "unobserved" not in groups
    assert sum(g["nodes"] for g in groups.values()) == json.loads(r.stdout)["node_summary"]["float"]


def swish_model() -> onnx.ModelProto:
    """Conv -> x * Sigmoid(x) (SiLU) -> Conv: a quantized Mul whose result only a float consumer reads."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.3, (4, 4, 1, 1)).astype(np.float32), "w2")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Sigmoid", ["c"], ["s"], name="sig"),
             helper.make_node("Mul", ["c", "s"], ["m"], name="silu"),
             helper.make_node("Conv", ["m", "w2"], ["y"], name="conv2")]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])], inits, opset=13)


def test_planned_calibration_never_starves_the_plan(tmp_path, conv_data):
    onnx.save(swish_model(), tmp_path / "m.onnx")
    assert invoke("calibrate", tmp_path / "m.onnx", "--data", conv_data, "-o", tmp_path / "c.json", "-q").exit_code == 0
    r = invoke("plan", tmp_path / "m.onnx", "--calib", tmp_path / "c.json", "-o", tmp_path / "p.json", "--json")
    assert r.exit_code == 0
    codes = {n["name"]: n["code"] for n in json.loads(r.stdout)["nodes"]}
    assert "unobserved" not in codes.values()


def test_damaged_model_is_named_loudly_with_a_measured_alternative(conv_plan, conv_path, conv_data, tmp_path):
    _, calib = conv_plan
    r = invoke("quantize", conv_path, "--calib", calib, "--method", "percentile", "--percentile", "40", "-o", tmp_path / "q.onnx",
               "--eval-data", conv_data, "--batch-size", "4", "--json", "--no-latency")
    assert r.exit_code == 0
    report = json.loads(r.stdout)
    damage = [w for w in report["warnings"] if w.startswith("the quantized model is damaged")]
    assert damage and "output 'y' cosine" in damage[0] and "worst layers:" in damage[0]
    assert "measured better on" in damage[0] and "--method percentile" not in damage[0]
    assert "warning: the quantized model is damaged" in r.stderr


def test_every_command_and_subcommand_has_help():
    def walk(cmd, path):
        yield path
        for name, sub in getattr(cmd, "commands", {}).items():
            if not sub.hidden:
                yield from walk(sub, path + [name])

    paths = list(walk(cli, []))
    assert ["plan"] in paths and ["calibrate", "merge"] in paths and ["report"] in paths
    for path in paths:
        r = invoke(*path, "--help")
        assert r.exit_code == 0 and "Usage:" in r.output and len(r.output.splitlines()) > 5, path


def test_progress_lines_off_a_terminal(conv_path, conv_data, tmp_path):
    r = invoke("quantize", conv_path, "--data", conv_data, "-o", tmp_path / "q.onnx", "--batch-size", "4", "--no-latency")
    assert r.exit_code == 0
    assert "calibrating: 4/4 batches" in r.stderr and "evaluating: 4/4 batches" in r.stderr
    r = invoke("quantize", conv_path, "--data", conv_data, "-o", tmp_path / "q2.onnx", "--batch-size", "4", "-q")
    assert r.exit_code == 0 and r.output == ""


@settings(max_examples=30, deadline=None)
@given(st.dictionaries(st.sampled_from(["conv1", "conv2", "fc", "conv*", "relu1"]),
                       st.fixed_dictionaries({}, optional={"precision": st.sampled_from(["float", "int8", "int16"]),
                                                           "granularity": st.sampled_from(["per-tensor", "per-channel"])}),
                       max_size=3))
def test_any_valid_overrides_give_a_model_that_runs(tmp_path_factory, overrides):
    overrides = {k: v for k, v in overrides.items() if v}
    tmp = tmp_path_factory.mktemp("ov")
    from tests.conftest import conv_model

    onnx.save(conv_model(), tmp / "m.onnx")
    x = np.random.default_rng(1).normal(0, 1, (8, 3, 8, 8)).astype(np.float32)
    np.save(tmp / "d.npy", x)
    plan, prep = plan_of(tmp / "m.onnx", tmp / "d.npy", overrides=Overrides.from_dict({"nodes": overrides}))
    result = pipeline.apply(prep, plan)
    for name, o in overrides.items():
        if o.get("precision") == "float" and "*" not in name:
            assert plan.decision(name).kept_float
    ref = run_model(prep.model, {"x": x})[0]
    got = run_model(result.model, {"x": x})[0]
    assert np.corrcoef(ref.ravel(), got.ravel())[0, 1] > 0.99
