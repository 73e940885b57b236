"""Output-aware activation ranges (--ranges output): the error the search measures against onnxruntime's, the ranges
it chooses where clipping pays and where it does not, the plan record, and the command line."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from qconv import pipeline
from qconv.adjust import clip
from qconv.cli.main import cli
from qconv.numeric import qmath
from qconv.plan.config import QuantConfig
from tests.conftest import make_model, run_model


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@settings(max_examples=60, deadline=None)
@given(st.floats(-40, 5), st.floats(0.01, 60), st.sampled_from(["uint8", "int8"]), st.booleans(), st.integers(0, 2 ** 31 - 1))
def test_the_search_quantizes_as_quantize_and_dequantize_linear_do(lo, hi, qt, symmetric, seed):
    """Values past the range saturate, every other value lands on QuantizeLinear's step: the candidates are what the
    int8 model computes, except that a value on a rounding midpoint (to float32's last bit) may take the step on its
    other side (the search multiplies by ``1 / s``, a third of a division's time)."""
    qp = qmath.choose_qparams(lo, hi, qmath.qtype(qt), symmetric)
    rng = np.random.default_rng(seed)
    s = float(np.asarray(qp.scale).reshape(-1)[0])
    zp = float(np.asarray(qp.zero_point).reshape(-1)[0])
    ties = ((np.arange(-300, 300) + 0.5 - zp) * s).astype(np.float32)  # exact halves between steps
    x = np.concatenate([ties, rng.normal(0, max(abs(lo), hi), 500).astype(np.float32)])
    got, want = clip._fake_quant(x, qp), qmath.dequantize(qmath.quantize(x, qp), qp)
    q = x.astype(np.float64) / np.float64(np.float32(s))
    inside = (q + zp >= qp.qtype.qmin - 1) & (q + zp <= qp.qtype.qmax + 1)  # past the range both saturate
    midpoint = inside & (np.abs(np.abs(q - np.floor(q)) - 0.5) <= 1e-6 * np.maximum(1.0, np.abs(q)))  # a few float32 ulps
    differs = got != want
    assert not np.any(differs & ~midpoint), x[differs & ~midpoint]
    assert np.all(np.abs(got - want)[differs] <= 1.0001 * s)
    assert np.count_nonzero(~midpoint) >= 450  # the random half, but for a value that falls near a midpoint


def _exact(model: onnx.ModelProto, feed: dict) -> np.ndarray:
    """onnxruntime without graph optimizations: Q/DQ pairs computed as written, the Conv in float."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feed)[0]


def _conv_model(w: np.ndarray, group: int = 1) -> onnx.ModelProto:
    pad = w.shape[-1] // 2
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[pad] * 4, group=group, name="conv")
    return make_model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", w.shape[1] * group, 10, 10])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(w, "w")], opset=13)


def _qdq(model: onnx.ModelProto, xq: qmath.QParams, wq: qmath.QParams) -> onnx.ModelProto:
    """``model`` (one Conv of x and w) with x and w through QuantizeLinear/DequantizeLinear as the plan says."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    w = numpy_helper.to_array(g.initializer[0])
    g.initializer.extend([numpy_helper.from_array(np.asarray(xq.scale, np.float32), "xs"),
                          numpy_helper.from_array(np.asarray(xq.zero_point), "xz"),
                          numpy_helper.from_array(qmath.quantize(w, wq), "wi"),
                          numpy_helper.from_array(np.asarray(wq.scale, np.float32), "ws"),
                          numpy_helper.from_array(np.asarray(wq.zero_point), "wz")])
    conv = g.node[0]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xi"]),
             helper.make_node("DequantizeLinear", ["xi", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wi", "ws", "wz"], ["wd"], axis=0)]
    conv.input[0], conv.input[1] = "xd", "wd"
    del g.node[:]
    g.node.extend(nodes + [conv])
    return m


@pytest.mark.parametrize("group,out,k", [(1, 8, 3), (4, 8, 3), (1, 24, 1)])
def test_the_error_the_search_measures_is_onnxruntimes(tmp_path, group, out, k, monkeypatch):
    """With every position sampled, each candidate's error at the Conv's output (int8 input and weights against
    float) equals what onnxruntime computes for the same Q/DQ model: dense, grouped, and a 1x1 Conv widening its
    input (K < N: the search's Gram form)."""
    monkeypatch.setattr(clip, "SAMPLES", 10 ** 9)
    rng = np.random.default_rng(3)
    w = rng.normal(0, 0.5, (out, 8 // group, k, k)).astype(np.float32)
    model = _conv_model(w, group)
    x = rng.normal(0, 1, (6, 8, 10, 10)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    prepared = pipeline.load(_save(tmp_path, model), QuantConfig(kernels="none"))
    source = pipeline.feeds_for(prepared, tmp_path / "x.npy", batch_size=2)
    calib = pipeline.calibrate(prepared, source)
    p = pipeline.plan(prepared, calib, QuantConfig(kernels="none"))
    found = clip.targets(prepared.model, p)
    assert [(a.name, [t.node for t in a.readers]) for a in found] == [("x", ["conv"])]
    errors, rows = clip.measure(prepared.model, p, source, found)
    assert rows == 6 and errors["x"].samples == 6 * 100  # every output position
    y = run_model(model, {"x": x})[0].astype(np.float64)
    cands = found[0].candidates()
    assert len(cands) == 1 + 3 * (clip.STEPS - 1)  # both ends far from zero: each alone and both
    for j in (0, 5, len(cands) - 1):
        xq = qmath.choose_qparams(*cands[j], p.tensors["x"].qparams.qtype, False)
        yq = _exact(_qdq(model, xq, p.tensors["w"].qparams), {"x": x}).astype(np.float64)
        want = float(np.sum((yq - y) ** 2) / np.sum(y ** 2))
        assert errors["x"].relative()[j] == pytest.approx(want, rel=1e-4)


def _save(tmp_path, model) -> str:
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    return str(path)


def _spiky(tmp_path, big_weight: float) -> tuple:
    """x[N,8] -> MatMul [8,4]: channel 0 is 0 but for rare spikes of 40 (one row in 64), the others N(0, 1). The
    spikes' weight row is ``big_weight``, the others' ~N(0, 0.5)."""
    rng = np.random.default_rng(5)
    w = rng.normal(0, 0.5, (8, 4)).astype(np.float32)
    w[0] = big_weight
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    model = make_model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], [numpy_helper.from_array(w, "w")], opset=13)
    x = rng.normal(0, 1, (1024, 8)).astype(np.float32)
    x[:, 0] = 0.0
    x[::64, 0] = 40.0
    np.save(tmp_path / "calib.npy", x[:512])
    return _save(tmp_path, model), tmp_path / "calib.npy", x[512:]


def test_a_range_narrows_where_its_tail_meets_small_weights_and_the_outputs_gain(tmp_path):
    src, calib, held = _spiky(tmp_path, 0.001)
    common = ["--data", calib, "--batch-size", 16, "--bias-correction", "off", "-q"]
    assert invoke("quantize", src, *common, "--ranges", "calibrated", "-o", tmp_path / "cal.onnx").exit_code == 0
    r = invoke("quantize", src, *common, "--ranges", "output", "-o", tmp_path / "out.onnx", "--write-plan", tmp_path / "p.json")
    assert r.exit_code == 0, r.output
    plan = json.loads((tmp_path / "p.json").read_text())
    x = plan["tensors"]["x"]
    assert x["method"] == "output" and "readers' outputs" in x["origin"]
    assert plan["source"]["output_ranges"] == {"x": x["range"]} and x["range"][1] < 0.5 * 40.0
    s = plan["source"]["output_ranges_search"]
    assert s["moved"] == 1 and s["tensors"] == 1 and s["rows"] == clip.MAX_ROWS and 0 < s["median_error_ratio"] < 0.5
    ref = run_model(src, {"x": held})[0]
    err = {n: float(np.mean((run_model(tmp_path / f"{n}.onnx", {"x": held})[0] - ref) ** 2)) for n in ("cal", "out")}
    assert err["out"] < 0.5 * err["cal"], err
    # the same graph: only the input's scale and zero point differ
    a, b = onnx.load(tmp_path / "cal.onnx"), onnx.load(tmp_path / "out.onnx")
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    # --plan reproduces it without data, byte for byte, and so does a second run
    assert invoke("quantize", src, "--plan", tmp_path / "p.json", "-o", tmp_path / "again.onnx", "-q").exit_code == 0
    assert (tmp_path / "again.onnx").read_bytes() == (tmp_path / "out.onnx").read_bytes()
    assert invoke("quantize", src, *common, "--ranges", "output", "-o", tmp_path / "out2.onnx").exit_code == 0
    assert (tmp_path / "out2.onnx").read_bytes() == (tmp_path / "out.onnx").read_bytes()
    # the default with --data: the same ranges, kept because the int8 outputs on 64 other rows say they pay
    r = invoke("quantize", src, *common, "-o", tmp_path / "default.onnx", "--write-plan", tmp_path / "d.json")
    assert r.exit_code == 0, r.output
    assert _initializers(tmp_path / "default.onnx") == _initializers(tmp_path / "out.onnx")
    s = json.loads((tmp_path / "d.json").read_text())["source"]["output_ranges_search"]
    assert s["kept"] is True and s["check"].startswith("int8 output SQNR on 64 other rows:")


def test_candidates_far_behind_stop_being_measured_and_the_choice_stands(tmp_path, monkeypatch):
    """Pruning (a candidate at twice the best one's error after a quarter of the samples is dropped) leaves the
    choice and its error as measuring every candidate on every sample does; the calibrated range stays measured."""
    src, calib, _ = _spiky(tmp_path, 0.001)
    prepared = pipeline.load(src, QuantConfig(kernels="none"))
    source = pipeline.feeds_for(prepared, calib, batch_size=4)
    p = pipeline.plan(prepared, pipeline.calibrate(prepared, source), QuantConfig(kernels="none"))
    monkeypatch.setattr(clip, "BATCH_VALUES", 1)  # every feed's samples measured at once: pruning can start early
    monkeypatch.setattr(clip, "PRUNE_ABOVE", float("inf"))
    everything, _ = clip.search(prepared.model, p, source)
    errors_all, _ = clip.measure(prepared.model, p, source, clip.targets(prepared.model, p))
    monkeypatch.setattr(clip, "PRUNE_ABOVE", 2.0)
    monkeypatch.setattr(clip, "PRUNE_AFTER", 0.0)
    pruned, _ = clip.search(prepared.model, p, source)
    errors, _ = clip.measure(prepared.model, p, source, clip.targets(prepared.model, p))
    assert pruned == everything and list(pruned) == ["x"]
    alive = errors["x"].alive
    assert alive[0] and 1 <= alive.sum() < alive.size and errors_all["x"].alive.all()
    best = int(np.argmin(errors["x"].relative()))
    assert alive[best] and best == int(np.argmin(errors_all["x"].relative()))
    assert errors["x"].relative()[best] == errors_all["x"].relative()[best]
    assert np.all(np.isinf(errors["x"].relative()[~alive]))


def test_a_range_whose_tail_meets_large_weights_is_kept(tmp_path):
    """The same spikes times weights of 1: clipping them costs the outputs more than finer steps give back."""
    src, calib, _ = _spiky(tmp_path, 1.0)
    r = invoke("plan", src, "--data", calib, "--batch-size", 16, "--ranges", "output", "-o", tmp_path / "p.json", "-q")
    assert r.exit_code == 0, r.output
    plan = json.loads((tmp_path / "p.json").read_text())
    assert plan["tensors"]["x"]["range"][1] == pytest.approx(40.0)  # the spikes stay in range (the low end may move)


def test_output_ranges_refuse_what_they_cannot_do(tmp_path):
    src, calib, _ = _spiky(tmp_path, 0.001)
    r = invoke("quantize", src, "--mode", "dynamic", "--ranges", "output", "-o", tmp_path / "q.onnx")
    assert r.exit_code == 2 and "--ranges output chooses the activation ranges of the static modes (int8, a16w8); --mode dynamic" in r.output
    assert not (tmp_path / "q.onnx").exists()


def test_the_report_says_what_the_search_did_and_an_edited_plan_keeps_its_ranges(tmp_path):
    src, calib, _ = _spiky(tmp_path, 0.001)
    r = invoke("quantize", src, "--data", calib, "--batch-size", 16, "--ranges", "output", "--no-latency", "-o", tmp_path / "q.onnx",
               "--json", "--report", tmp_path / "r.md", "--write-plan", tmp_path / "p.json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output[r.output.index("{"):])
    import jsonschema

    from qconv.jobs.calibrate import schema

    jsonschema.validate(rep, schema("report"))
    assert rep["output_ranges"]["moved"] == 1 and rep["output_ranges"]["tensors"] == 1 and rep["output_ranges"]["method"] == "output"
    assert "| output-aware ranges |" in (tmp_path / "r.md").read_text()
    r = invoke("quantize", src, "--data", calib, "--ranges", "calibrated", "--no-latency", "-o", tmp_path / "n.onnx", "--json")
    assert json.loads(r.output[r.output.index("{"):])["output_ranges"] is None
    # an edited plan is planned again from what it recorded: the narrowed range stays, without data
    plan = json.loads((tmp_path / "p.json").read_text())
    plan["overrides"]["nodes"] = {"mm": {"granularity": "per-tensor"}}
    (tmp_path / "edited.json").write_text(json.dumps(plan))
    r = invoke("quantize", src, "--plan", tmp_path / "edited.json", "-o", tmp_path / "e.onnx", "--write-plan", tmp_path / "again.json", "-q")
    assert r.exit_code == 0, r.output
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["tensors"]["x"]["range"] == plan["tensors"]["x"]["range"] and again["tensors"]["x"]["method"] == "output"
    assert again["source"]["output_ranges"] == plan["source"]["output_ranges"] and np.size(again["tensors"]["w"]["scale"]) == 1


def _initializers(path) -> dict[str, bytes]:
    return {t.name: t.SerializeToString() for t in onnx.load(path).graph.initializer}


def test_a_calibration_file_carries_the_ranges_to_the_makefile_step(tmp_path):
    """calibrate --ranges output, then quantize --calib (the Makefile step, no flag): the same model as quantize --data
    --ranges output; a file without them, or for another scheme, is refused when they are asked for."""
    src, calib, _ = _spiky(tmp_path, 0.001)
    c = tmp_path / "c.json"
    r = invoke("calibrate", src, "--data", calib, "--batch-size", 16, "--ranges", "output", "-o", c)
    assert r.exit_code == 0, r.output
    assert "output-aware ranges on 32 rows: 1 of 1 activations narrowed" in r.output
    made = json.loads(c.read_text())
    assert made["options"]["ranges"] == "output" and list(made["output_ranges"]["ranges"]) == ["x"]
    import jsonschema

    from qconv.jobs.calibrate import schema

    jsonschema.validate(made, schema("calibration"))
    assert invoke("quantize", src, "--calib", c, "-o", tmp_path / "file.onnx", "--write-plan", tmp_path / "p.json", "-q").exit_code == 0
    common = ["--data", calib, "--batch-size", 16, "--bias-correction", "off", "-q"]
    assert invoke("quantize", src, *common, "--ranges", "output", "-o", tmp_path / "data.onnx").exit_code == 0
    assert _initializers(tmp_path / "file.onnx") == _initializers(tmp_path / "data.onnx")
    plan = json.loads((tmp_path / "p.json").read_text())
    assert plan["tensors"]["x"]["method"] == "output" and plan["source"]["output_ranges_search"]["from"] == "calibration file"
    # --ranges calibrated ignores them; another scheme's file is refused when they are asked for, passed over by default
    assert invoke("quantize", src, "--calib", c, "--ranges", "calibrated", "-o", tmp_path / "cal.onnx", "-q").exit_code == 0
    assert _initializers(tmp_path / "cal.onnx") != _initializers(tmp_path / "file.onnx")
    r = invoke("quantize", src, "--calib", c, "--per-tensor", "--ranges", "output", "-o", tmp_path / "pt.onnx")
    assert r.exit_code == 2 and "error: the calibration file's output-aware ranges were searched for another scheme (per_channel differ)" in r.output
    assert not (tmp_path / "pt.onnx").exists()
    r = invoke("quantize", src, "--calib", c, "--per-tensor", "-o", tmp_path / "pt.onnx", "--json", "--no-latency")
    assert r.exit_code == 0 and json.loads(r.output[r.output.index("{"):])["output_ranges"] is None
    plain = tmp_path / "plain.json"
    assert invoke("calibrate", src, "--data", calib, "-o", plain, "-q").exit_code == 0
    r = invoke("quantize", src, "--calib", plain, "--ranges", "output", "-o", tmp_path / "q.onnx")
    assert r.exit_code == 2 and "error: --ranges output with --calib needs a calibration file made with qconv calibrate --ranges output" in r.output
    r = invoke("calibrate", src, "--data", calib, "--shard", "0/2", "--ranges", "output", "-o", tmp_path / "s.json")
    assert r.exit_code == 2 and "--ranges output searches the ranges on the whole data" in r.output


def test_the_checks_verdict():
    """Bias correction's check needs SQNR to rise and decisions not to get worse; the ranges' check lets decisions
    decide where outputs have them (SQNR breaks a tie), and SQNR where they have none."""
    probs = lambda sqnr, agree: (sqnr, (agree, 2560), (0, 0))  # noqa: E731  a recognizer's softmax
    scores = lambda sqnr, both, either: (sqnr, (0, 0), (both, either))  # noqa: E731  a detector's
    plain = lambda sqnr: (sqnr, (0, 0), (0, 0))  # noqa: E731  an embedding
    assert not pipeline.pays(probs(18.5, 2306), probs(16.7, 2358))
    assert pipeline.pays(probs(18.5, 2306), probs(16.7, 2358), decisions_first=True)
    assert not pipeline.pays(probs(9.0, 2358), probs(10.4, 2306), decisions_first=True)
    assert pipeline.pays(probs(9.0, 2306), probs(10.4, 2306), decisions_first=True)  # a tie: SQNR
    assert not pipeline.pays(probs(10.4, 2306), probs(9.0, 2306), decisions_first=True)
    assert not pipeline.pays(scores(30.0, 80, 100), scores(31.0, 79, 100), decisions_first=True)
    assert pipeline.pays(scores(31.0, 79, 100), scores(30.0, 80, 100), decisions_first=True)
    assert not pipeline.pays(scores(31.0, 79, 100), scores(30.0, 80, 100))
    assert pipeline.pays(plain(20.0), plain(20.5), decisions_first=True) and not pipeline.pays(plain(20.5), plain(20.0), decisions_first=True)


def test_the_search_keeps_within_max_memory_in_passes_and_finds_the_same(tmp_path):
    """With a budget too small for two targets' exposed values, every target is searched in a float pass of its own:
    each one's errors (and pruning) are the ones the single pass measures, and so is the calibration file."""
    d = "sample_models/digits_cnn"
    prepared = pipeline.load(f"{d}/model.onnx", QuantConfig(kernels="none"))
    source = pipeline.feeds_for(prepared, f"{d}/calib.npy", batch_size=8)
    p = pipeline.plan(prepared, pipeline.calibrate(prepared, source), QuantConfig(kernels="none"))
    found = clip.targets(prepared.model, p)
    assert len(found) >= 2
    assert clip.groups(prepared.model, source, found, 1 << 30) == [found]
    parts = clip.groups(prepared.model, source, found, 1)
    assert [a.name for part in parts for a in part] == [a.name for a in found] and len(parts) == len(found)
    one, rows_one = clip.measure(prepared.model, p, source, found)
    split, rows_split = clip.measure(prepared.model, p, source, found, parts=parts)
    assert rows_one == rows_split and set(one) == set(split)
    for name in one:
        np.testing.assert_array_equal(one[name].error, split[name].error)
        np.testing.assert_array_equal(one[name].alive, split[name].alive)
    common = ["calibrate", f"{d}/model.onnx", "--data", f"{d}/calib.npy", "--ranges", "output", "-q"]
    assert invoke(*common, "-o", tmp_path / "a.json").exit_code == 0
    r = invoke(*common, "--max-memory", "1MB", "-o", tmp_path / "b.json")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
