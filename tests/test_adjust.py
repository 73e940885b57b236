"""Bias correction (qconv.adjust.bias): measured through onnxruntime, recorded in the plan, reproduced by --plan."""

import json
import math

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from qconv import pipeline
from qconv.adjust import bias
from qconv.cli.main import cli
from qconv.data import FeedSource, InputSpec
from qconv.plan.overrides import NodeOverride, Overrides
from qconv.plan.config import QuantConfig
from tests.conftest import ROOT, conv_model, make_model, optimized_ops, run_model


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def one_conv(with_bias: bool, depthwise: bool = True) -> onnx.ModelProto:
    """x[N,8,10,10] -> Conv 3x3 (depthwise: 9 weights a channel, whose rounding errors do not average out)."""
    rng = np.random.default_rng(3)
    groups = 8 if depthwise else 1
    w = rng.normal(0, 0.4, (8, 8 // groups, 3, 3)).astype(np.float32)
    w[:, :, 1, 1] *= 6.0  # one large tap per channel: the others round on a coarse grid
    inits = [numpy_helper.from_array(w, "w")]
    ins = ["x", "w"]
    if with_bias:
        inits.append(numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float32), "b"))
        ins.append("b")
    node = helper.make_node("Conv", ins, ["y"], pads=[1, 1, 1, 1], group=groups, name="conv")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 10, 10])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 10, 10])
    return make_model([node], [x], [y], inits, opset=13)


def _rows(tmp_path, n=24):
    # Positive, offset inputs (a post-activation tensor): the weights' rounding error times a large mean input.
    data = (np.random.default_rng(5).gamma(2.0, 1.0, (n, 8, 10, 10)) + 0.5).astype(np.float32)
    p = tmp_path / "calib.npy"
    np.save(p, data)
    return p, data


def _channel_means(model_or_path, data):
    return run_model(model_or_path, {"x": data})[0].astype(np.float64).mean(axis=(0, 2, 3))


@pytest.mark.parametrize("with_bias,method", [(True, "full"), (False, "full"), (True, "fast")])
def test_corrected_layer_has_the_float_mean(tmp_path, with_bias, method):
    """One layer: its int8 twin is exactly the quantized layer, so after correction the quantized model's mean output
    per channel equals the float model's on the calibration rows, up to the rounding of the int8 output itself."""
    src = tmp_path / "m.onnx"
    onnx.save(one_conv(with_bias), src)
    calib, data = _rows(tmp_path, n=bias.FULL_ROWS)  # the rows both methods measure on
    for flag, out in ((["--bias-correction", "off"], "plain.onnx"), (["--bias-correction", method], "bc.onnx")):
        r = invoke("quantize", src, "--data", calib, "--batch-size", 4, "-o", tmp_path / out, "-q", *flag)
        assert r.exit_code == 0, r.output
    ref = _channel_means(src, data)
    before = np.abs(_channel_means(tmp_path / "plain.onnx", data) - ref)
    after = np.abs(_channel_means(tmp_path / "bc.onnx", data) - ref)
    assert before.mean() > 5e-3
    assert after.mean() < before.mean() / 20 and after.max() < 1e-3, (before, after)
    q = onnx.load(tmp_path / "bc.onnx")
    onnx.checker.check_model(q)
    conv = next(n for n in q.graph.node if n.op_type == "Conv")
    assert len(conv.input) == 3 and conv.input[2]  # a bias was added where the layer had none


def test_plan_records_and_reproduces_the_correction(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(conv_model(), src)
    calib, _ = _rows(tmp_path)
    data = tmp_path / "x.npy"
    np.save(data, np.random.default_rng(2).normal(0.5, 1, (16, 3, 8, 8)).astype(np.float32))
    plan = tmp_path / "p.json"
    assert invoke("quantize", src, "--data", data, "-o", tmp_path / "a.onnx", "--bias-correction", "--write-plan", plan, "-q",
                  "--report", tmp_path / "r.json", "--report", tmp_path / "r.md").exit_code == 0
    finding = json.loads((tmp_path / "r.json").read_text())["bias_correction"]
    assert finding["method"] == "full" and finding["rows"] == bias.FULL_ROWS and finding["layers"] == 3 and finding["biases_added"] == 0
    assert "| bias correction | — | 3 layers | full, on 8 rows |" in (tmp_path / "r.md").read_text()
    stored = json.loads(plan.read_text())
    assert stored["config"]["bias_correction"] == "full"
    assert set(stored["corrections"]) == {"conv1", "conv2", "fc"}
    assert all(len(c["shift"]) == n for c, n in zip([stored["corrections"][k] for k in ("conv1", "conv2", "fc")], (8, 4, 5)))
    assert invoke("quantize", src, "--plan", plan, "-o", tmp_path / "b.onnx", "-q").exit_code == 0
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert invoke("quantize", src, "--data", data, "-o", tmp_path / "plain.onnx", "-q", "--bias-correction", "off").exit_code == 0
    assert optimized_ops(tmp_path / "a.onnx", tmp_path) == optimized_ops(tmp_path / "plain.onnx", tmp_path)  # same kernels
    # Editing the plan (conv2 kept float) plans again: the corrections of the layers quantized as before stay.
    stored["overrides"]["nodes"]["conv2"] = {"precision": "float"}
    plan.write_text(json.dumps(stored))
    edited = tmp_path / "edited.json"
    assert invoke("quantize", src, "--plan", plan, "-o", tmp_path / "c.onnx", "--write-plan", edited, "-q").exit_code == 0
    kept = json.loads(edited.read_text())["corrections"]
    assert "conv2" not in kept and kept["conv1"] == stored["corrections"]["conv1"]


def test_matmul_shift_goes_into_the_bias_add(tmp_path):
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.2, (16, 6)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.normal(0, 0.1, 6).astype(np.float32), "B")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"), helper.make_node("Add", ["h", "B"], ["y"], name="add")]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5, 16])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5, 6])], inits, opset=13)
    src = tmp_path / "mm.onnx"
    onnx.save(model, src)
    data = tmp_path / "x.npy"
    np.save(data, (rng.gamma(2.0, 1.0, (12, 5, 16)) + 1).astype(np.float32))
    prepared = pipeline.load(src, QuantConfig())
    calib = pipeline.calibrate(prepared, pipeline.feeds_for(prepared, data, 4))
    p = pipeline.plan(prepared, calib, QuantConfig(bias_correction="fast"))
    pipeline.correct_bias(prepared, p, pipeline.feeds_for(prepared, data, 4))
    assert set(p.corrections) == {"mm"} and p.corrections["mm"]["bias"] == "B" and not p.corrections["mm"]["added"]
    x = np.load(data)
    want = np.asarray(p.corrections["mm"]["shift"])
    w = np.asarray(numpy_helper.to_array(inits[0]))
    t = p.tensors
    from qconv.numeric import qmath

    xq = qmath.dequantize(qmath.quantize(x, t["x"].qparams), t["x"].qparams)
    wq = qmath.dequantize(qmath.quantize(w, t["W"].qparams), t["W"].qparams)
    expected = (x.astype(np.float64) @ w - xq.astype(np.float64) @ wq).reshape(-1, 6).mean(axis=0)
    np.testing.assert_allclose(want, expected, rtol=1e-3, atol=1e-6)
    corrected = bias.apply(prepared.model, p.corrections)
    got = numpy_helper.to_array(next(i for i in corrected.graph.initializer if i.name == "B"))
    np.testing.assert_allclose(got, numpy_helper.to_array(inits[1]) + want.astype(np.float32), rtol=0, atol=1e-7)


def test_bias_correction_refuses_what_it_cannot_do(tmp_path, conv_path, conv_data):
    calib = tmp_path / "c.json"
    assert invoke("calibrate", conv_path, "--data", conv_data, "-o", calib, "-q").exit_code == 0
    r = invoke("quantize", conv_path, "--calib", calib, "--bias-correction", "-o", tmp_path / "q.onnx")
    assert r.exit_code == 2 and "--bias-correction measures each layer's mean error on the calibration rows: give --data DATA" in r.output
    r = invoke("quantize", conv_path, "--mode", "fp16", "--bias-correction", "-o", tmp_path / "q.onnx")
    assert r.exit_code == 2 and "--mode fp16 has no activation quantization to correct" in r.output
    assert not (tmp_path / "q.onnx").exists()


def test_measure_streams_only_channel_sums(tmp_path):
    """The probe exposes two small outputs a layer (channel sums and a count), never an activation."""
    src = tmp_path / "m.onnx"
    onnx.save(conv_model(), src)
    prepared = pipeline.load(src, QuantConfig())
    data = tmp_path / "x.npy"
    np.save(data, np.random.default_rng(2).normal(0.5, 1, (8, 3, 8, 8)).astype(np.float32))
    calib = pipeline.calibrate(prepared, pipeline.feeds_for(prepared, data, 2))
    p = pipeline.plan(prepared, calib, QuantConfig())
    found = bias.targets(prepared.model, p)
    model = bias.probe(prepared.model, p, found)
    shapes = [[d.dim_value for d in o.type.tensor_type.shape.dim] for o in model.graph.output]
    assert len(model.graph.output) == 2 * len(found) == 6 and all(len(s) <= 1 for s in shapes)
    source = FeedSource(data, [InputSpec.from_value_info(i) for i in prepared.model.graph.input], batch_size=2)
    a, rows = bias.measure(prepared.model, p, source)
    b, _ = bias.measure(prepared.model, p, FeedSource(data, source.specs, batch_size=8))
    assert rows == 8
    for k in a:  # batching does not change the mean
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-6)


# ---- cross-layer equalization ------------------------------------------------------------------------------------

def conv_pair(mid: str, depthwise: bool) -> onnx.ModelProto:
    """x -> Conv(8, channel ranges from 0.01 to 30) -> mid -> Conv (dense or depthwise) -> y."""
    rng = np.random.default_rng(7)
    w1 = rng.normal(0, 1, (8, 3, 3, 3)).astype(np.float32) * np.geomspace(0.01, 30, 8).astype(np.float32).reshape(8, 1, 1, 1)
    w2 = rng.normal(0, 0.5, (8, 1, 3, 3) if depthwise else (4, 8, 3, 3)).astype(np.float32)
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float32), "b1"),
             numpy_helper.from_array(w2, "w2")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], pads=[1, 1, 1, 1], name="conv1")]
    src = "h"
    if mid:
        extra = [numpy_helper.from_array(np.array(0.0, np.float32), "lo"), numpy_helper.from_array(np.array(6.0, np.float32), "hi")]
        nodes.append(helper.make_node(mid, ["h", "lo", "hi"] if mid == "Clip" else ["h"], ["a"], name="act"))
        inits += extra if mid == "Clip" else []
        src = "a"
    nodes.append(helper.make_node("Conv", [src, "w2"], ["y"], pads=[1, 1, 1, 1], group=8 if depthwise else 1, name="conv2"))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    return make_model(nodes, [x], [y], inits, opset=13)


@pytest.mark.parametrize("mid,depthwise", [("", False), ("Relu", False), ("Relu", True), ("LeakyRelu", True)])
def test_equalize_keeps_the_function_and_equalizes_ranges(mid, depthwise):
    from qconv.adjust.equalize import equalize

    model = conv_pair(mid, depthwise)
    x = np.random.default_rng(0).normal(0, 1, (4, 3, 6, 6)).astype(np.float32)
    before = run_model(model, {"x": x})[0]
    assert equalize(model) == 1
    after = run_model(model, {"x": x})[0]
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4 * np.abs(before).max())
    w1, w2 = (numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == n)) for n in ("w1", "w2"))
    r1 = np.abs(w1).reshape(8, -1).max(1)
    r2 = np.abs(w2).max(axis=(0, 2, 3)) if not depthwise else np.abs(w2).reshape(8, -1).max(1)
    np.testing.assert_allclose(r1, r2, rtol=1e-3)  # each channel's two ranges met in the middle
    assert r1.max() / r1.min() < 2 * np.sqrt(3000)  # 3000x apart before: the geometric middle


def test_equalize_stops_at_a_clip():
    from qconv.adjust.equalize import equalize

    assert equalize(conv_pair("Clip", False)) == 0  # Relu6 is not homogeneous: rescaling would move its cap


def test_equalize_on_the_command_line(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(conv_pair("Relu", False), src)
    data = tmp_path / "x.npy"
    np.save(data, np.random.default_rng(1).normal(0, 1, (32, 3, 6, 6)).astype(np.float32))
    plain, eq = tmp_path / "c.json", tmp_path / "ce.json"
    assert invoke("calibrate", src, "--data", data, "-o", plain, "-q", "--no-equalize").exit_code == 0
    assert invoke("calibrate", src, "--data", data, "-o", eq, "-q", "--equalize").exit_code == 0
    r = invoke("quantize", src, "--calib", plain, "--equalize", "-o", tmp_path / "q.onnx")
    assert r.exit_code == 1 and "was made without cross-layer equalization and this run asks for it" in r.output
    assert not (tmp_path / "q.onnx").exists()
    r = invoke("quantize", src, "--calib", eq, "--no-equalize", "-o", tmp_path / "q.onnx")
    assert r.exit_code == 1 and "this run has --no-equalize: drop --no-equalize" in r.output
    assert not (tmp_path / "q.onnx").exists()
    # without the flag, quantize follows the file (what the default's calibration does): the same model as with it
    assert invoke("quantize", src, "--calib", eq, "-o", tmp_path / "follow.onnx", "-q").exit_code == 0
    assert invoke("quantize", src, "--calib", eq, "--equalize", "-o", tmp_path / "asked.onnx", "-q").exit_code == 0
    assert (tmp_path / "follow.onnx").read_bytes() == (tmp_path / "asked.onnx").read_bytes()
    errs = {}
    for name, args in (("pt", ["--calib", plain, "--per-tensor"]), ("pt_eq", ["--calib", eq, "--per-tensor", "--equalize"])):
        out = tmp_path / f"{name}.onnx"
        assert invoke("quantize", src, *args, "-o", out, "-q", "--write-plan", tmp_path / f"{name}.plan.json").exit_code == 0
        x = np.load(data)
        errs[name] = np.abs(run_model(out, {"x": x})[0] - run_model(src, {"x": x})[0]).mean()
    assert errs["pt_eq"] < 0.8 * errs["pt"], errs  # per-tensor weights: the small channels are no longer rounded away
    assert invoke("quantize", src, "--plan", tmp_path / "pt_eq.plan.json", "-o", tmp_path / "again.onnx", "-q").exit_code == 0
    assert (tmp_path / "again.onnx").read_bytes() == (tmp_path / "pt_eq.onnx").read_bytes()
    r = invoke("quantize", src, "--mode", "fp16", "--equalize", "-o", tmp_path / "h.onnx")
    assert r.exit_code == 2 and "--equalize prepares the weights for the static int8 modes" in r.output


def test_the_default_bias_correction_is_kept_only_where_further_rows_gain(tmp_path, conv_path):
    """quantize --data measures bias correction on the first 8 rows and checks it on 8 others: kept where those rows
    are like the rest, left out (config, report and a note say so) where the first rows are flat, like white pages,
    and their mean shift is wrong elsewhere. --bias-correction full skips the check."""
    rng = np.random.default_rng(1)
    flat = np.full((8, 3, 8, 8), 2.0) + rng.normal(0, 0.01, (8, 3, 8, 8))
    out = {}
    for name, first in (("alike", rng.normal(0, 1, (8, 3, 8, 8))), ("flat", flat)):
        data = tmp_path / f"{name}.npy"
        np.save(data, np.concatenate([first, rng.normal(0, 1, (24, 3, 8, 8))]).astype(np.float32))
        rep, plan = tmp_path / f"{name}.json", tmp_path / f"{name}.plan.json"
        r = invoke("quantize", conv_path, "--data", data, "-o", tmp_path / f"{name}.onnx", "--report", rep, "--write-plan", plan,
                   "-q", "--no-latency")
        assert r.exit_code == 0, r.output
        out[name] = (json.loads(rep.read_text()), json.loads(plan.read_text()))
    report, plan = out["alike"]
    assert report["bias_correction"]["layers"] == 3 and "kept" not in plan["source"]["bias_correction"]
    report, plan = out["flat"]
    check = plan["source"]["bias_correction"]
    assert check["kept"] is False and check["check"].startswith("int8 output SQNR on 8 other rows")
    assert report["bias_correction"] is None and plan["config"]["bias_correction"] is None and not plan.get("corrections")
    assert any(n.startswith("bias correction measured on 8 rows and left out") for n in report["model"]["intake"])
    forced = tmp_path / "forced.json"
    assert invoke("quantize", conv_path, "--data", tmp_path / "flat.npy", "--bias-correction", "full", "-o", tmp_path / "f.onnx",
                  "--report", forced, "-q", "--no-latency").exit_code == 0
    assert json.loads(forced.read_text())["bias_correction"]["layers"] == 3


def test_bias_correction_is_the_default_only_where_there_are_rows(tmp_path, conv_path, conv_data):
    def report(*args):
        out = tmp_path / "r.json"
        r = invoke("quantize", conv_path, *args, "-o", tmp_path / "q.onnx", "--report", out, "--write-plan", tmp_path / "p.json", "-q")
        assert r.exit_code == 0, r.output
        return json.loads(out.read_text())

    with_rows = report("--data", conv_data)  # measured; kept or left out by its check (this machine's int8 arithmetic)
    made = json.loads((tmp_path / "p.json").read_text())["source"]["bias_correction"]
    assert made["method"] == "full" and made["rows"] == 8
    if made.get("kept") is False:
        assert with_rows["config"]["bias_correction"] is None and with_rows["bias_correction"] is None
    else:
        assert with_rows["config"]["bias_correction"] == "full" and with_rows["bias_correction"]["layers"] == 3
    calib = tmp_path / "c.json"
    assert invoke("calibrate", conv_path, "--data", conv_data, "-o", calib, "-q").exit_code == 0
    makefile_step = report("--calib", calib)
    assert makefile_step["config"]["bias_correction"] is None and makefile_step["bias_correction"] is None
    off = report("--data", conv_data, "--bias-correction", "off")
    assert off["config"]["bias_correction"] is None and off["bias_correction"] is None


def test_a_16_bit_island_in_an_int8_model_is_not_corrected(tmp_path):
    """Corrected with its 16-bit islands, YOLOv8n's class scores collapsed (tuning's int16 group move): the layers of
    an island are left as they are; the int8 layers around it are still corrected."""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.normal(0, 0.2, (16, 6)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.normal(0, 0.1, 6).astype(np.float32), "B"),
             numpy_helper.from_array(rng.normal(0, 0.2, (6, 4)).astype(np.float32), "W2"),
             numpy_helper.from_array(rng.normal(0, 0.1, 4).astype(np.float32), "B2")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"), helper.make_node("Add", ["h", "B"], ["a"], name="add"),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "W2"], ["h2"], name="mm2"), helper.make_node("Add", ["h2", "B2"], ["y"], name="add2")]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5, 16])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5, 4])], inits, opset=13)
    src, data = tmp_path / "m.onnx", tmp_path / "x.npy"
    onnx.save(model, src)
    np.save(data, (rng.gamma(2.0, 1.0, (12, 5, 16)) + 1).astype(np.float32))
    prepared = pipeline.load(src, QuantConfig())
    calib = pipeline.calibrate(prepared, pipeline.feeds_for(prepared, data, 4))
    from qconv.adjust.bias import targets

    plain = pipeline.plan(prepared, calib, QuantConfig(bias_correction="fast"))
    island = pipeline.plan(prepared, calib, QuantConfig(bias_correction="fast"), Overrides({"mm2": NodeOverride(precision="int16")}, {}))
    assert {t.node for t in targets(prepared.model, plain)} == {"mm", "mm2"}
    assert {t.node for t in targets(prepared.model, island)} == {"mm"}


def _whole_runs(model, p, rows):
    """The full correction measured the plain way: every level on whole runs of the int8 model from the graph inputs."""
    from qconv.plan.planner import subplan
    from qconv.rewrite.qdq import apply_qdq
    from qconv.runtime import session

    found = bias.targets(model, p)
    reference = bias._sums(model, found, rows, 1)
    m, deltas = bias._with_deltas(apply_qdq(model, subplan(p))[0], found)
    sess, fed, out = session(m, 1), {name: np.zeros(shape, np.float32) for name, shape in deltas.values()}, {}
    for level in bias.levels(found, bias._out_levels(m, found)):
        fetch = [o for t in level for o in (f"{t.node}.bc_sum", f"{t.node}.bc_size")]
        for t, pair in zip(level, bias._channel_sums(sess, level, rows, fetch, bias._inputs_of(sess, fed))):
            out[t.node] = (bias._mean(reference[t.node], t.channels) - bias._mean(pair, t.channels)).astype(np.float32)
            fed[deltas[t.node][0]] = out[t.node].reshape(deltas[t.node][1])
    return out, m, found


@pytest.mark.parametrize("name,data", [("digits_cnn", "calib.npy"), ("tiny_transformer", "calib.npz")])
def test_full_correction_by_segments_equals_whole_runs(name, data):
    """Each level runs only its segment of the int8 model, from the values the levels before it left: the shifts are
    exactly those of whole runs (the DequantizeLinear -> op -> QuantizeLinear fusions stay inside one segment), and
    every node that computes on the data runs in one segment only."""
    src = ROOT / "sample_models" / name / "model.onnx"
    prepared = pipeline.load(src, QuantConfig())
    source = pipeline.feeds_for(prepared, ROOT / "sample_models" / name / data, 2)
    p = pipeline.plan(prepared, pipeline.calibrate(prepared, source, 1), QuantConfig(kernels="none"))
    rows = list(bias.first_rows(source, bias.FULL_ROWS, []))
    whole, m, found = _whole_runs(prepared.model, p, rows)
    segmented, n = bias.measure_full(prepared.model, p, rows, 1)
    assert n == bias.FULL_ROWS and len(whole) == len(found) >= 4 and len(bias.levels(found, bias._out_levels(m, found))) >= 3
    assert set(segmented) == set(whole)
    for k in whole:
        np.testing.assert_array_equal(segmented[k], whole[k], err_msg=k)
    const = {t.name for t in m.graph.initializer}
    for node in m.graph.node:
        if all(i in const for i in node.input if i):
            const.update(node.output)
    segs = bias.segments(m, bias.levels(found, bias._out_levels(m, found)))
    computing = [k for s in segs for k in s.nodes
                 if m.graph.node[k].op_type != "DequantizeLinear" and not set(m.graph.node[k].output) <= const]
    assert len(computing) == len(set(computing)) > len(found)
    made_by = {o: node.op_type for node in m.graph.node for o in node.output}
    crossing = [made_by.get(i, "input") for s in segs for i in s.inputs]
    assert "DequantizeLinear" not in crossing, crossing  # int8 values cross, never their float copies


def gated_pair(gate: str, depthwise: bool = True, spread: float = 3000.0) -> onnx.ModelProto:
    """x -> Conv(8, bias) -> y * gate(y) -> Conv (depthwise or dense) -> out. The channels of y span 0.01 to 30 (a folded
    BatchNorm's spread), so one 8-bit scale for the activation rounds the small ones away. ``gate``: HardSwish (the
    op, which intake expands into y * Clip(y / 6 + 1 / 2, 0, 1)), Paddle's export of it (y * (Clip(y + 3, 0, 6) * 1/6))
    or SiLU (y * Sigmoid(y))."""
    rng = np.random.default_rng(11)
    ranges = np.geomspace(np.sqrt(0.3 / spread), np.sqrt(0.3 * spread), 8)  # spread 3000: 0.01 to 30
    w1 = rng.normal(0, 1, (8, 3, 3, 3)).astype(np.float32) * ranges.astype(np.float32).reshape(8, 1, 1, 1)
    w2 = (rng.normal(0, 0.5, (8, 1, 3, 3) if depthwise else (4, 8, 3, 3)) / ranges.reshape(
        (8, 1, 1, 1) if depthwise else (1, 8, 1, 1))).astype(np.float32)  # BN-folded: small channels read with large weights
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(rng.normal(0, 0.01, 8).astype(np.float32), "b1"),
             numpy_helper.from_array(w2, "w2")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["y"], pads=[1, 1, 1, 1], name="conv1")]
    if gate == "HardSwish":
        nodes.append(helper.make_node("HardSwish", ["y"], ["h"], name="act"))
    elif gate == "Paddle":
        inits += [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("three", 3.0), ("zero", 0.0), ("six", 6.0), ("sixth", 1 / 6))]
        nodes += [helper.make_node("Add", ["y", "three"], ["a"], name="add3"), helper.make_node("Clip", ["a", "zero", "six"], ["c"], name="clip"),
                  helper.make_node("Mul", ["c", "sixth"], ["s"], name="div6"), helper.make_node("Mul", ["y", "s"], ["h"], name="hswish")]
    else:
        nodes += [helper.make_node("Sigmoid", ["y"], ["s"], name="sig"), helper.make_node("Mul", ["y", "s"], ["h"], name="silu")]
    nodes.append(helper.make_node("Conv", ["h", "w2"], ["out"], pads=[1, 1, 1, 1], group=8 if depthwise else 1, name="conv2"))
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
                      [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits, opset=14)


@pytest.mark.parametrize("gate,depthwise", [("HardSwish", True), ("HardSwish", False), ("Paddle", True), ("SiLU", True)])
def test_gated_equalization_is_exact_and_lowers_the_int8_error(tmp_path, gate, depthwise):
    """--equalize rescales Conv -> hard-swish/SiLU -> Conv on measured channel extremes: the float function is kept
    (the gate reads y / t: folded into a hard-swish's own first op, so the node count stays; through one inserted Mul
    before a Sigmoid), the int8 model's error falls, and the calibration file and the plan record the scales, so
    --calib and --plan reproduce the model without data."""
    from qconv.adjust import equalize as eq

    src = tmp_path / "m.onnx"
    onnx.save(gated_pair(gate, depthwise), src)
    x = np.random.default_rng(2).normal(0, 1, (32, 3, 6, 6)).astype(np.float32)
    data = tmp_path / "x.npy"
    np.save(data, x)
    prepared = pipeline.load(src, QuantConfig(equalize=True))
    before = run_model(prepared.model, {"x": x})[0]
    ops = sorted(n.op_type for n in prepared.model.graph.node)
    assert [p.conv for p in eq.gated_pairs(prepared.model)] == ["conv1"]
    scales = pipeline.equalize_gated(prepared, pipeline.feeds_for(prepared, data, 4))
    assert list(scales) == ["conv1"] and max(scales["conv1"]) > 10 and min(scales["conv1"]) == 1.0
    inserted = sum(n.op_type == "Mul" and n.name.endswith("eq_unscale") for n in prepared.model.graph.node)
    assert inserted == (gate == "SiLU")
    if gate != "SiLU":
        assert sorted(n.op_type for n in prepared.model.graph.node) == ops
        read = {i for n in prepared.model.graph.node for i in n.input}
        assert all(t.name in read for t in prepared.model.graph.initializer)  # the scalars the gate read are gone
    np.testing.assert_allclose(run_model(prepared.model, {"x": x})[0], before, rtol=1e-4, atol=1e-5 * np.abs(before).max())
    plain, equal, auto = tmp_path / "c.json", tmp_path / "ce.json", tmp_path / "ca.json"
    assert invoke("calibrate", src, "--data", data, "-o", plain, "-q", "--no-equalize").exit_code == 0
    assert invoke("calibrate", src, "--data", data, "-o", equal, "-q", "--equalize").exit_code == 0
    assert invoke("calibrate", src, "--data", data, "-o", auto, "-q").exit_code == 0  # the default: checked, and it pays here
    assert json.loads(equal.read_text())["equalization"]["conv1"] == scales["conv1"]
    assert json.loads(auto.read_text())["equalization"]["conv1"] == scales["conv1"]
    assert "equalization" not in json.loads(plain.read_text())
    err = {}
    for name, args in (("plain", ["--calib", plain]), ("eq", ["--calib", equal, "--equalize", "--write-plan", tmp_path / "p.json"]),
                       ("auto", ["--calib", auto]), ("data", ["--data", data, "--bias-correction", "off"])):
        assert invoke("quantize", src, *args, "-o", tmp_path / f"{name}.onnx", "-q").exit_code == 0
        err[name] = float(np.sqrt(((run_model(tmp_path / f"{name}.onnx", {"x": x})[0] - before) ** 2).mean()))
    assert err["eq"] < 0.5 * err["plain"] and err["auto"] < 0.5 * err["plain"] and err["data"] < 0.5 * err["plain"], err
    r = invoke("quantize", src, "--calib", auto, "--no-equalize", "-o", tmp_path / "no.onnx", "-q")
    assert r.exit_code == 1 and "re-run qconv calibrate --no-equalize" in r.output and not (tmp_path / "no.onnx").exists()
    assert invoke("quantize", src, "--plan", tmp_path / "p.json", "-o", tmp_path / "again.onnx", "-q").exit_code == 0
    assert (tmp_path / "again.onnx").read_bytes() == (tmp_path / "eq.onnx").read_bytes()
    onnx.checker.check_model(onnx.load(tmp_path / "eq.onnx"))


def test_the_default_equalizes_only_where_the_int8_outputs_gain(tmp_path):
    """Without a flag, calibrate (and quantize --data) equalize when a quick int8 check on the first rows says the
    outputs gain: on channels spread 3000x, yes; on channels alike, where int8 is already close, no (and the file and
    the model are those of --no-equalize)."""
    x = np.random.default_rng(2).normal(0, 1, (32, 3, 6, 6)).astype(np.float32)
    data = tmp_path / "x.npy"
    np.save(data, x)
    for spread, kept in ((3000.0, True), (1.0, False)):
        src = tmp_path / f"m{spread:g}.onnx"
        onnx.save(gated_pair("HardSwish", spread=spread), src)
        auto, off = tmp_path / f"a{spread:g}.json", tmp_path / f"o{spread:g}.json"
        assert invoke("calibrate", src, "--data", data, "-o", auto, "-q").exit_code == 0
        assert invoke("calibrate", src, "--data", data, "-o", off, "-q", "--no-equalize").exit_code == 0
        a, o = json.loads(auto.read_text()), json.loads(off.read_text())
        assert bool(a["options"].get("equalize")) is kept and ("equalization" in a) is kept
        if not kept:
            assert a == o
        plan = tmp_path / f"p{spread:g}.json"
        assert invoke("quantize", src, "--data", data, "-o", tmp_path / "q.onnx", "-q", "--write-plan", plan).exit_code == 0
        written = json.loads(plan.read_text())
        assert written["config"]["equalize"] is kept and ("equalization" in written["source"]) is kept


def test_gated_pairs_need_a_pure_gate_and_convs_after():
    from qconv.adjust import equalize as eq

    m = gated_pair("SiLU")
    m.graph.output.append(helper.make_tensor_value_info("h", TensorProto.FLOAT, None))  # h leaves the graph: not only Convs read it
    assert eq.gated_pairs(m) == []
    m = gated_pair("SiLU")
    m.graph.node.append(helper.make_node("Relu", ["s"], ["s2"], name="other"))  # the gate's value has a second reader
    m.graph.output.append(helper.make_tensor_value_info("s2", TensorProto.FLOAT, None))
    assert eq.gated_pairs(m) == []
    assert [p.conv for p in eq.gated_pairs(gated_pair("SiLU"))] == ["conv1"]


def test_the_bias_correction_check_counts_top_classes_of_probability_outputs():
    """A softmax output's top class per position is what a classifier or a CTC recognizer reads: the check counts where
    it agrees with fp32's; outputs that are not probabilities (a detector's map, raw scores) count no positions."""
    rng = np.random.default_rng(0)

    def model(w, softmax=True):
        nodes = [helper.make_node("MatMul", ["x", "w"], ["s"], name="mm")]
        nodes.append(helper.make_node("Softmax", ["s"], ["y"], axis=-1, name="sm") if softmax else helper.make_node("Identity", ["s"], ["y"], name="id"))
        return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 7, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 7, 5])],
                          [numpy_helper.from_array(w.astype(np.float32), "w")], opset=13)

    w = rng.normal(0, 1, (6, 5))
    rows = [{"x": rng.normal(0, 1, (2, 7, 6)).astype(np.float32)} for _ in range(3)]
    names, ref = pipeline.float_outputs(model(w), rows)
    assert pipeline.is_probability(ref[0][0]) and not pipeline.is_probability(ref[0][0] - 0.1)
    sqnr, (agree, positions), _ = pipeline.output_check(names, ref, model(w), rows)
    assert positions == 3 * 2 * 7 and agree == positions and sqnr > 100
    _, (agree, positions), _ = pipeline.output_check(names, ref, model(w + rng.normal(0, 1.0, w.shape)), rows)
    assert positions == 42 and agree < positions
    names, ref = pipeline.float_outputs(model(w, softmax=False), rows)
    assert pipeline.output_check(names, ref, model(w, softmax=False), rows)[1] == (0, 0)


def test_checks_of_one_run_measure_each_model_and_row_once_and_agree_with_fresh_sessions(monkeypatch):
    """CheckRows (the default's checks, quantize --data): a model checked again on rows it was checked on runs no
    session; its figures, and those of a mix of seen and new rows, equal output_check's on fresh sessions."""
    rng = np.random.default_rng(1)

    def model(w):
        nodes = [helper.make_node("MatMul", ["x", "w"], ["s"], name="mm"), helper.make_node("Softmax", ["s"], ["y"], axis=-1, name="sm")]
        return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 7, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 7, 5])],
                          [numpy_helper.from_array(w.astype(np.float32), "w")], opset=13)

    w = rng.normal(0, 1, (6, 5))
    fmodel, q1, q2 = model(w), model(w + rng.normal(0, 0.3, w.shape)), model(w + rng.normal(0, 0.3, w.shape))
    rows = [{"x": rng.normal(0, 1, (2, 7, 6)).astype(np.float32)} for _ in range(5)]
    sessions = []
    made = pipeline.runtime.session
    monkeypatch.setattr(pipeline.runtime, "session", lambda m, *a, **k: sessions.append(m) or made(m, *a, **k))
    memo, names = pipeline.CheckRows(), pipeline.float_names(fmodel)
    first = memo.check(fmodel, names, q1, rows[:4], 1)
    assert len(sessions) == 2  # the float model and q1
    assert memo.check(fmodel, names, q1, rows[1:3], 1) == pipeline.output_check(names, [r for r in pipeline.float_outputs(fmodel, rows[1:3], 1)[1]], q1, rows[1:3], 1)
    del sessions[:]
    assert memo.check(fmodel, names, q1, rows[:4], 1) == first and not sessions  # all measured already
    mixed = memo.check(fmodel, names, q2, rows[2:], 1)
    assert len(sessions) == 2  # the float model for the one new row, and q2
    assert mixed == pipeline.output_check(names, pipeline.float_outputs(fmodel, rows[2:], 1)[1], q2, rows[2:], 1)
    assert first[1][1] == 4 * 2 * 7 and first[0] > 0


# ---- the default's SmoothQuant (qconv.adjust.smooth) --------------------------------------------------------------

def _one_matmul(w: np.ndarray) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", w.shape[0]])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", w.shape[1]])
    return make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")], [x], [y], [numpy_helper.from_array(w, "w")])


@pytest.mark.parametrize("opset", [13, 18])
def test_smoothquants_later_rows_widen_the_extremes_inside_onnxruntime_exactly(opset):
    """The extremes of later rows (the default's pass past the first 64) are reduced in the graph: the same numbers as
    exposing the inputs and reducing them in numpy, at ReduceMin's attribute (opset 13) and input (18) forms; the model
    is left as it was."""
    from qconv.adjust import smooth as sq

    rng = np.random.default_rng(11)
    model = _one_matmul(rng.normal(0, 0.2, (48, 24)).astype(np.float32))
    model.opset_import[0].version = opset
    x = rng.normal(0, 1, (400, 48)).astype(np.float32)
    x[300:, 5] *= 60.0  # a channel that spikes only late
    feeds = [{"x": x[k:k + 50]} for k in range(0, 400, 50)]
    inputs = sq.inputs_of(sq.smoothable(model))
    before = model.SerializeToString()
    whole = sq.capture(model, inputs, feeds, sampled=0)
    widened = sq.capture(model, inputs, feeds[4:], more=sq.capture(model, inputs, feeds[:4]))
    assert model.SerializeToString() == before
    np.testing.assert_array_equal(widened["x"].lo, whole["x"].lo)
    np.testing.assert_array_equal(widened["x"].hi, whole["x"].hi)
    assert widened["x"].hi[5] == x[:, 5].max() and widened["x"].lo.dtype == np.float32


def _whole_feed_sample(x: np.ndarray, keep: int, peaks: int) -> np.ndarray:
    """The sample one feed gave before feeds ran in chunks (stop 44's Capture.add), written out again as the reference."""
    top = np.argsort(-np.abs(x).max(1), kind="stable")[:min(peaks, keep // 2)]
    spread = np.linspace(0, len(x) - 1, max(1, min(keep, len(x)) - len(top))).round().astype(np.int64)
    return x[np.unique(np.concatenate([top, spread]))]


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 90), keep=st.integers(1, 300), chunk=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_a_feeds_share_of_the_sample_is_the_same_read_whole_or_in_chunks(rows, keep, chunk, seed):
    """The rows a feed gives the SmoothQuant sample (its largest rows, the first of equals first, and the rest spread
    evenly) are the same whether the feed is read whole or in chunks of any size, and the same as before chunks."""
    from qconv.adjust import smooth as sq

    rng = np.random.default_rng(seed)
    x = rng.integers(-3, 4, (rows, 5)).astype(np.float32)  # few values: many ties among the largest rows
    whole = sq.Share(rows, keep)
    whole.add(x)
    parts = sq.Share(rows, keep)
    for k in range(0, rows, chunk):
        parts.add(x[k:k + chunk])
    np.testing.assert_array_equal(whole.rows(), _whole_feed_sample(x, keep, sq.PEAKS))
    np.testing.assert_array_equal(parts.rows(), whole.rows())


def _rows_mixed(w: np.ndarray) -> onnx.ModelProto:
    """x[N, C] minus its mean over the rows (each row sees the others), then a MatMul."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", w.shape[0]])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", w.shape[1]])
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[0], keepdims=1), helper.make_node("Sub", ["x", "m"], ["c"]),
             helper.make_node("MatMul", ["c", "w"], ["y"], name="fc")]
    return make_model(nodes, [x], [y], [numpy_helper.from_array(w, "w")], opset=13)


def _tokens_matmul(w: np.ndarray) -> onnx.ModelProto:
    """x[N, T, C] -> Relu -> MatMul: rows independent, the MatMul's input [N, T, C]."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T", w.shape[0]])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "T", w.shape[1]])
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("MatMul", ["r", "w"], ["y"], name="fc")]
    return make_model(nodes, [x], [y], [numpy_helper.from_array(w, "w")], opset=13)


@pytest.mark.parametrize("make, chunked", [(_tokens_matmul, True), (_rows_mixed, False)])
def test_smoothquants_capture_runs_big_feeds_in_chunks_only_where_rows_do_not_mix(make, chunked, monkeypatch):
    """A feed of more than CHUNK_ROWS rows is captured CHUNK_ROWS at a time (less held at once) with the same extremes
    and sample as whole; a model whose rows see each other (a mean over axis 0) is run on whole feeds."""
    from qconv.adjust import smooth as sq

    rng = np.random.default_rng(5)
    w = rng.normal(0, 0.2, (12, 6)).astype(np.float32)
    model = make(w)
    shape = (20, 3, 12) if make is _tokens_matmul else (20, 12)
    feeds = [{"x": (rng.normal(0, 1, shape) * rng.uniform(0.5, 4, 12)).astype(np.float32)} for _ in range(5)]
    inputs = {model.graph.node[-1].input[0]: -1}  # the MatMul's input
    runs = []
    real = sq.runtime.run
    monkeypatch.setattr(sq.runtime, "run", lambda sess, feed, *a: runs.append(sq.rows_of(feed)) or real(sess, feed, *a))
    got = sq.capture(model, inputs, feeds)
    sizes = list(runs)
    monkeypatch.setattr(sq, "CHUNK_ROWS", 1000)  # every feed whole: the reference
    whole = sq.capture(model, inputs, feeds)
    name = next(iter(inputs))
    assert len(got[name].rows) == math.ceil(sq.ROWS / 20)  # the feeds of the first ROWS rows gave a share each
    for a, b in [(got[name].lo, whole[name].lo), (got[name].hi, whole[name].hi)] + list(zip(got[name].rows, whole[name].rows)):
        np.testing.assert_array_equal(a, b)
    # chunked: the check (1 row, then the first chunk, which is kept), the rest of each sampled feed, later feeds whole
    want = [1, 8] + [8, 4] + [8, 8, 4] * 3 + [20] if chunked else [1, 8] + [20] * 5
    assert sizes == want


@pytest.mark.parametrize("seed", [0, 5, 11])  # data where a range share pays (the search must find it)
def test_smoothquants_alphas_then_range_shares_are_the_whole_search(seed):
    """The default first chooses the alphas alone (``clip=False``) and searches the range shares only for the choice it
    keeps (``clipped``): that gives what the whole search gives, node for node, and the gain without shares is a lower
    bound of the gain with them (what lets the pipeline skip the shares where the gain is sure either way)."""
    from qconv.adjust import smooth as sq

    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.2, (48, 24)).astype(np.float32)
    x = rng.normal(0, 1, (400, 48)).astype(np.float32)
    x[:, rng.choice(48, 3, replace=False)] *= rng.uniform(5, 40)
    x[rng.choice(400, 4, replace=False)] *= 6  # a few tokens spike: a clipped range can pay
    model = _one_matmul(w)
    nodes = sq.smoothable(model)
    got = sq.capture(model, sq.inputs_of(nodes), [{"x": x[k:k + 50]} for k in range(0, 400, 50)])
    grid = sq.grid_of(QuantConfig())
    whole = sq.choose(model, nodes, got, grid)
    rough = sq.choose(model, nodes, got, grid, clip=False)
    assert whole and set(rough) == set(whole)
    assert sq.clipped(model, nodes, got, grid, rough) == whole
    assert sq.layers_gain_db(rough) <= sq.layers_gain_db(whole)
    assert rough["fc"].alpha == whole["fc"].alpha and rough["fc"].scales == whole["fc"].scales
    assert rough["fc"].range != whole["fc"].range and whole["fc"].error_after < rough["fc"].error_after


@pytest.mark.parametrize("outliers", [0.0, 30.0])
def test_smoothquant_takes_an_alpha_only_where_the_layers_own_int8_output_gains(outliers):
    """Each node's choice (alpha, then the range share) never has more error than leaving it alone, by the same
    measure; an input with outlier channels gets smoothed and its error falls several times."""
    from qconv.adjust import smooth as sq

    rng = np.random.default_rng(7)
    w = rng.normal(0, 0.2, (48, 24)).astype(np.float32)
    x = rng.normal(0, 1, (400, 48)).astype(np.float32)
    if outliers:
        x[:, [3, 17]] *= outliers
    model = _one_matmul(w)
    got = sq.capture(model, sq.inputs_of(sq.smoothable(model)), [{"x": x[k:k + 50]} for k in range(0, 400, 50)])
    assert got["x"].lo.shape == (48,) and sum(len(r) for r in got["x"].rows) <= sq.SAMPLED
    grid = sq.grid_of(QuantConfig())
    chosen = sq.choose(model, sq.smoothable(model), got, grid)
    ref = x @ w
    plain = sq.layer_error(x, (float(x.min()), float(x.max())), w, np.ones(48, np.float32), ref, grid)
    if not chosen:
        assert not outliers
        return
    c = chosen["fc"]
    s = np.asarray(c.scales, np.float32)
    smoothed = sq.layer_error(x, c.range, w, s, ref, grid)
    assert smoothed <= plain * (0.25 if outliers else 1.05), (smoothed, plain, c.alpha)
    assert c.alpha in sq.ALPHAS and c.range[0] <= 0.0 < c.range[1]
    np.testing.assert_allclose((x / s) @ (w * s[:, None]), ref, rtol=1e-4, atol=1e-3)  # the same function
