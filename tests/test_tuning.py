"""Tuning (`quantize --tune`): measured candidates, the budget, the cache, determinism, the plan it leaves,
exit codes; and the planner's mixed-scales rule that keeps a YOLO-style output Concat float."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from qconv.cli.main import cli
from qconv.errors import UsageError
from qconv.measure.tally import Metrics
from qconv.measure.thresholds import Thresholds
from qconv.tune.budget import Budget
from tests.conftest import SAMPLES, make_model, run_model

DIGITS = SAMPLES / "digits_cnn"


def invoke(*args, env=None):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False, env=env)


@pytest.fixture
def cache(tmp_path):
    return {"QCONV_CACHE_DIR": str(tmp_path / "cache")}


def tune(tmp_path, name, cache, *extra):
    out, rep, plan = tmp_path / f"{name}.onnx", tmp_path / f"{name}.json", tmp_path / f"{name}.plan.json"
    r = invoke("quantize", DIGITS / "model.onnx", "-o", out, "--data", DIGITS / "calib.npy", "--eval-data", DIGITS / "eval.npy",
               "--batch-size", 32, "--tune", "--layer-samples", 0, "--report", rep, "--write-plan", plan, "-q", *extra, env=cache)
    return r, out, json.loads(rep.read_text()) if rep.exists() else None, plan


def test_unreachable_target_exits_3_with_the_best_model_and_a_tuning_section(tmp_path, cache):
    r, out, report, _ = tune(tmp_path, "a", cache, "--budget", "14trials", "--min-cosine", "0.9999999", "--no-latency")
    assert r.exit_code == 3, r.output
    assert "gate failed: min-cosine" in r.output
    t = report["tuning"]
    searched = [x for x in t["trials"] if x["step"] not in ("bias correction", "speed")]  # after the search, measured too
    assert len(searched) <= 14 and t["budget"] == "14 trials"
    assert [x["step"] for x in t["trials"]][len(searched):] in ([], ["bias correction"])
    assert t["reached"] is False and t["missed"] == ["min-cosine"]
    assert [x["step"] for x in t["trials"][:4]] == ["baseline", "ranges", "ranges", "ranges"]
    # The best candidate is never worse than the plan as given (minmax) on the held rows.
    assert t["best"]["cosine"] >= t["trials"][0]["cosine"]
    onnx.checker.check_model(onnx.load(out))
    x = np.load(DIGITS / "eval.npy")[:8]
    assert run_model(out, {"input": x})[0].shape == run_model(DIGITS / "model.onnx", {"input": x})[0].shape


def test_remedies_are_measured_and_kept_only_when_they_help(tmp_path, cache):
    r, out, report, plan_path = tune(tmp_path, "b", cache, "--budget", "40trials", "--min-cosine", "0.99999", "--no-latency")
    # The targets are checked on every eval row, the search saw only the first 64: exit 3 exactly when that gate fails.
    assert r.exit_code == (0 if report["gate"]["passed"] else 3), r.output
    t = report["tuning"]
    accepted = [x for x in t["trials"] if x["accepted"]]
    cos = [x["cosine"] for x in accepted]
    assert cos == sorted(cos), "every accepted step measures better than the one before"
    assert t["changes"], "digits at 0.99999 needs per-node changes"
    # Every change the report names is in the plan's overrides, as the override that change means.
    plan = json.loads(plan_path.read_text())
    nodes, tensors = plan["overrides"]["nodes"], plan["overrides"]["tensors"]
    for c in t["changes"]:
        if c["what"] == "all activations":
            assert plan["config"]["method"] == t["method"] == c["change"].split()[-1]
        elif c["change"] == "kept float" or c["change"].startswith("float Concat"):
            assert nodes[c["what"]] == {"precision": "float"}
        elif c["change"].startswith("int16"):
            assert nodes[c["what"]] == {"precision": "int16"}
        elif c["change"].startswith("SmoothQuant") and c["what"].endswith("MatMul/Gemm weights"):  # the group move
            assert sum("smooth" in v for v in nodes.values()) >= int(c["what"].split()[1])
        elif c["change"].startswith("SmoothQuant"):
            assert len(nodes[c["what"]]["smooth"]) > 1
        elif c["change"].startswith("range method"):
            assert c["change"].split()[2] in {v.get("method") for v in tensors.values()}, c
        elif c["change"] == "bias correction":
            assert plan["corrections"], c
        else:
            raise AssertionError(f"unexpected change {c}")
    assert len(nodes) == sum(int(c["what"].split()[1]) if c["what"].endswith("MatMul/Gemm weights")
                             else c["what"] not in ("all activations", "all corrected layers") and not c["change"].startswith("range method")
                             for c in t["changes"])
    assert t["sensitivity"] and all("float_gain" in s for s in t["sensitivity"])
    # The written plan reproduces the tuned model byte for byte.
    again = tmp_path / "again.onnx"
    r2 = invoke("quantize", DIGITS / "model.onnx", "--plan", plan_path, "-o", again, "--no-latency", "-q")
    assert r2.exit_code == 0, r2.output
    assert again.read_bytes() == out.read_bytes()


def test_same_inputs_and_trial_budget_give_the_same_bytes_and_a_rerun_is_cached(tmp_path, cache):
    args = ("--budget", "20trials", "--min-cosine", "0.99999", "--no-latency")
    _, out1, rep1, _ = tune(tmp_path, "c1", cache, *args)
    _, out2, rep2, _ = tune(tmp_path, "c2", cache, *args)
    fresh = {"QCONV_CACHE_DIR": str(tmp_path / "other-cache")}
    _, out3, rep3, _ = tune(tmp_path, "c3", fresh, *args)
    assert out1.read_bytes() == out2.read_bytes() == out3.read_bytes()
    # A fresh cache only repeats what one run measured twice (a remedy equal to a sensitivity candidate).
    assert rep1["tuning"]["cached_trials"] == rep3["tuning"]["cached_trials"] < len(rep1["tuning"]["trials"]) // 2
    assert rep2["tuning"]["cached_trials"] == len([x for x in rep2["tuning"]["trials"] if x["step"] != "bias correction"])
    assert [x["change"] for x in rep1["tuning"]["trials"]] == [x["change"] for x in rep2["tuning"]["trials"]]


def test_a_time_budget_reports_what_it_kept_for_the_steps_after_the_search(tmp_path, cache):
    r, _, report, _ = tune(tmp_path, "tb", cache, "--budget", "20s", "--min-cosine", "0.99999", "--no-latency")
    assert r.exit_code in (0, 3), r.output
    after = report["tuning"]["after_search"]
    assert set(after["estimated_s"]) == {"corrections", "unseen rows", "evaluation", "latency", "profile"}
    assert after["estimated_s"]["latency"] == 0.0  # --no-latency: no A/B timing to keep time for
    assert after["reserved_s"] == pytest.approx(min(sum(after["estimated_s"].values()), 0.6 * 20), abs=0.3)
    assert after["search_s"] + after["took_s"] == pytest.approx(report["tuning"]["seconds"], abs=0.3)


def test_without_eval_data_part_of_the_calibration_data_is_held_out(tmp_path, cache):
    out, rep = tmp_path / "h.onnx", tmp_path / "h.json"
    r = invoke("quantize", DIGITS / "model.onnx", "-o", out, "--data", DIGITS / "calib.npy", "--tune", "--budget", "6trials",
               "--no-latency", "--layer-samples", 0, "--report", rep, "-q", env=cache)
    assert r.exit_code == (0 if json.loads(rep.read_text())["gate"]["passed"] else 3), r.output
    t = json.loads(rep.read_text())["tuning"]
    n = np.load(DIGITS / "calib.npy").shape[0]
    held = len(range(4, n, 5))
    assert t["data"].startswith("every fifth row") and f"({held} of {n} rows)" in t["data"]
    assert t["rows"] == held
    assert json.loads(rep.read_text())["calibration"]["samples"] == n - held


@pytest.mark.parametrize("args,message", [
    (["--mode", "dynamic", "--tune"], "--mode dynamic has none"),
    (["--data", "CALIB", "--budget", "5m"], "--budget and --tune-rows set how --tune searches: add --tune"),
    (["--data", "CALIB", "--tune", "--budget", "soon"], "--budget 'soon' is not a time like 10m"),
    (["--calib", "CAL", "--tune"], "--tune measures candidates: give --eval-data"),
    (["--data", "CALIB", "--tune", "--speed-fallback"], "--tune already weighs speed"),
])
def test_tune_usage_errors_are_one_line_exit_2_and_write_nothing(args, message, tmp_path, cache):
    cal = tmp_path / "c.json"
    assert invoke("calibrate", DIGITS / "model.onnx", "--data", DIGITS / "calib.npy", "-o", cal, "-q").exit_code == 0
    args = [{"CALIB": DIGITS / "calib.npy", "CAL": cal}.get(a, a) for a in args]
    out = tmp_path / "x.onnx"
    r = invoke("quantize", DIGITS / "model.onnx", "-o", out, *args, env=cache)
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output
    assert not out.exists()


def test_budget_parsing():
    assert Budget.parse("10m") == Budget(600.0, None)
    assert Budget.parse("90s") == Budget(90.0, None)
    assert Budget.parse("1h") == Budget(3600.0, None)
    assert Budget.parse("40trials") == Budget(None, 40)
    assert Budget.parse("1 trial") == Budget(None, 1)
    for bad in ("0trials", "-3m", "ten", "5x"):
        with pytest.raises(UsageError):
            Budget.parse(bad)


def test_default_targets_and_their_order():
    t, default = Thresholds.tuning(Thresholds(), latency=True)
    assert (t.min_cosine, t.max_latency_ratio, default) == (0.999, 1.0, True)
    assert Thresholds.tuning(Thresholds(), latency=False)[0].max_latency_ratio is None
    given, default = Thresholds.tuning(Thresholds(min_agreement=0.98, max_size_mb=3.0), latency=True)
    assert (given.min_cosine, given.min_agreement, given.max_latency_ratio, given.max_size_mb, default) == (None, 0.98, None, None, False)
    m = lambda c, a=None: Metrics(c, 30.0, a)  # noqa: E731
    assert t.key(m(0.9995)) < t.key(m(0.9990)) < t.key(m(0.99))  # met beats unmet; nearer beats farther
    assert given.misses(m(0.5, 0.99)) == [] and given.misses(m(1.0, 0.97))[0][0] == "min-agreement"


# ---- the mixed-scales rule: a YOLO-style head ------------------------------------------------------------

def yolo_head(seed=0) -> onnx.ModelProto:
    """x[N,3,16,16] -> Conv -> Relu -> {boxes: Conv(4) * 320 (pixels), scores: Sigmoid(Conv(3))} -> Concat(axis 1),
    flattened to [N, 7, 64]: box coordinates in pixels next to class scores in [0, 1], as YOLOv8 exports."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.normal(0, 0.4, (8, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.4, (4, 8, 1, 1)).astype(np.float32), "wb"),
             numpy_helper.from_array(rng.normal(0, 0.4, (3, 8, 1, 1)).astype(np.float32), "ws"),
             numpy_helper.from_array(np.float32(320.0), "px"),
             numpy_helper.from_array(np.array([0, 0, -1], np.int64), "shape")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2], name="stem"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
             helper.make_node("Conv", ["r1", "wb"], ["b0"], name="box_conv"),
             helper.make_node("Sigmoid", ["b0"], ["b1"], name="box_sig"),
             helper.make_node("Mul", ["b1", "px"], ["boxes"], name="to_pixels"),
             helper.make_node("Conv", ["r1", "ws"], ["s0"], name="cls_conv"),
             helper.make_node("Sigmoid", ["s0"], ["scores"], name="cls_sig"),
             helper.make_node("Concat", ["boxes", "scores"], ["cat"], axis=1, name="head_concat"),
             helper.make_node("Reshape", ["cat", "shape"], ["y"], name="flat")]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 7, 64])
    return make_model(nodes, [x], [y], inits)


def test_a_concat_of_pixels_and_scores_stays_float_so_the_scores_survive(tmp_path):
    model, data = tmp_path / "yolo.onnx", tmp_path / "x.npy"
    onnx.save(yolo_head(), model)
    x = np.random.default_rng(3).normal(0, 1, (32, 3, 16, 16)).astype(np.float32)
    np.save(data, x)
    out, rep = tmp_path / "q.onnx", tmp_path / "q.json"
    r = invoke("quantize", model, "-o", out, "--data", data, "--no-latency", "--report", rep, "-q")
    assert r.exit_code == 0, r.output
    nodes = {n["name"]: n for n in json.loads(rep.read_text())["nodes"]}
    assert nodes["head_concat"]["status"] == "float" and nodes["head_concat"]["code"] == "mixed-scales"
    assert "320" in nodes["head_concat"]["reason"] or "3.2e+02" in nodes["head_concat"]["reason"]
    assert nodes["box_conv"]["status"] == "quantized" and nodes["cls_conv"]["status"] == "quantized"
    ref, got = run_model(model, {"x": x})[0], run_model(out, {"x": x})[0]
    scores_err = np.abs(ref[:, 4:] - got[:, 4:]).max()
    assert scores_err < 0.05, scores_err  # at one 8-bit scale for 0..320 a step is 1.25: every score would be 0 or 1.25


# ---- SmoothQuant-style smoothing --------------------------------------------------------------------------

def outlier_mlp() -> onnx.ModelProto:
    """x -> MatMul -> Relu -> Mul(channel gains, three channels x60) -> MatMul: the second MatMul's input has
    outlier channels whose weights are small (as LayerNorm gains make them in BERT-style encoders)."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 0.2, (32, 64)).astype(np.float32)
    gains = np.ones(64, np.float32)
    gains[[3, 17, 40]] = 60.0
    w2 = rng.normal(0, 0.1, (64, 16)).astype(np.float32)
    w2[[3, 17, 40]] /= 60.0
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["r"], name="act"),
             helper.make_node("Mul", ["r", "g"], ["rg"], name="gain"), helper.make_node("MatMul", ["rg", "w2"], ["y"], name="fc2")]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])
    return make_model(nodes, [x], [y], [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(gains, "g"),
                                        numpy_helper.from_array(w2, "w2")])


@given(st.integers(0, 10_000))
@settings(max_examples=10, deadline=None)
def test_smoothing_computes_the_same_function(seed):
    from qconv.rewrite.smooth import apply_smoothing

    rng = np.random.default_rng(seed)
    model = outlier_mlp()
    s = rng.uniform(0.05, 20.0, 64).astype(np.float32)
    smoothed = apply_smoothing(model, {"fc2": tuple(float(v) for v in s)})
    onnx.checker.check_model(smoothed)
    x = rng.normal(0, 1, (8, 32)).astype(np.float32)
    ref, got = run_model(model, {"x": x})[0], run_model(smoothed, {"x": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    assert [n.op_type for n in smoothed.graph.node] == ["MatMul", "Relu", "Mul", "Mul", "MatMul"]


def saved_with_rows(tmp_path, model: onnx.ModelProto, seed: int):
    """``model`` saved, with 128 calibration and 128 eval rows of normal noise over its 32 inputs: (model, calib, eval)."""
    paths = tmp_path / f"{model.graph.node[0].name}.onnx", tmp_path / "c.npy", tmp_path / "e.npy"
    onnx.save(model, paths[0])
    rng = np.random.default_rng(seed)
    for p in paths[1:]:
        np.save(p, rng.normal(0, 1, (128, 32)).astype(np.float32))
    return paths


def test_tuning_smooths_a_matmul_input_with_outlier_channels(tmp_path, cache):
    model, calib, evald = saved_with_rows(tmp_path, outlier_mlp(), 1)
    out, rep, plan = tmp_path / "q.onnx", tmp_path / "q.json", tmp_path / "p.json"
    r = invoke("quantize", model, "-o", out, "--data", calib, "--eval-data", evald, "--tune", "--budget", "30trials",
               "--min-cosine", "0.999", "--no-latency", "--layer-samples", 0, "--report", rep, "--write-plan", plan, "-q", env=cache)
    assert r.exit_code == 0, r.output
    t = json.loads(rep.read_text())["tuning"]
    assert any(c["what"] == "fc2" and c["change"].startswith("SmoothQuant") for c in t["changes"]), t["changes"]
    p = json.loads(plan.read_text())
    assert len(p["overrides"]["nodes"]["fc2"]["smooth"]) == 64
    assert "fc2/smoothed_input" in p["overrides"]["tensors"]
    x = np.load(evald)
    ref, got = run_model(model, {"x": x})[0], run_model(out, {"x": x})[0]
    cos = float((ref * got).sum() / np.sqrt((ref * ref).sum() * (got * got).sum()))
    assert cos >= 0.999  # minmax without smoothing: 0.977
    again = tmp_path / "again.onnx"
    assert invoke("quantize", model, "--plan", plan, "-o", again, "--no-latency", "-q").exit_code == 0
    assert again.read_bytes() == out.read_bytes()


def outlier_stack(layers: int = 8, gemm: bool = False) -> onnx.ModelProto:
    """``layers`` MatMuls, each input but the first scaled by channel gains with three outlier channels (x40) whose
    weight rows are small: the error of every layer adds up, as in a transformer's stack. ``gemm``: as torch exports
    2-D Linear layers, Gemm with transB=1 (weight [out, in]) and a bias."""
    rng = np.random.default_rng(5 if gemm else 3)
    nodes, inits, h = [], [], "x"
    for i in range(layers):
        w = rng.normal(0, 0.18, (32, 32)).astype(np.float32)
        if i:
            w[[2, 11, 29]] /= 40.0
        g = np.ones(32, np.float32)
        g[[2, 11, 29]] = 40.0
        inits += [numpy_helper.from_array(w.T.copy() if gemm else w, f"w{i}"), numpy_helper.from_array(g, f"g{i}")]
        if gemm:
            inits.append(numpy_helper.from_array(rng.normal(0, 0.1, 32).astype(np.float32), f"b{i}"))
            nodes.append(helper.make_node("Gemm", [h, f"w{i}", f"b{i}"], [f"m{i}"], name=f"fc{i}", transB=1))
        else:
            nodes.append(helper.make_node("MatMul", [h, f"w{i}"], [f"m{i}"], name=f"fc{i}"))
        if i < layers - 1:
            nodes.append(helper.make_node("Mul", [f"m{i}", f"g{i}"], [f"s{i}"], name=f"gain{i}"))
            h = f"s{i}"
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])
    y = helper.make_tensor_value_info(f"m{layers - 1}", TensorProto.FLOAT, ["N", 32])
    return make_model(nodes, [x], [y], inits)


def test_tuning_smooths_every_matmul_of_a_deep_stack_as_one_move(tmp_path, cache):
    model, calib, evald = saved_with_rows(tmp_path, outlier_stack(), 4)
    out, plain, rep, plan = tmp_path / "q.onnx", tmp_path / "plain.onnx", tmp_path / "q.json", tmp_path / "p.json"
    # --no-smooth: the default would smooth this stack before tuning (test_the_default_smooths_a_deep_stack_...)
    r = invoke("quantize", model, "-o", out, "--data", calib, "--eval-data", evald, "--tune", "--budget", "12trials", "--no-smooth",
               "--min-cosine", "0.9999", "--no-latency", "--layer-samples", 0, "--report", rep, "--write-plan", plan, "-q", env=cache)
    assert r.exit_code in (0, 3), r.output
    t = json.loads(rep.read_text())["tuning"]
    group = [x for x in t["trials"] if x["change"].startswith("SmoothQuant on all 8 MatMul/Gemm weights")]
    assert len(group) == 4 and sum(x["accepted"] for x in group) == 1, group
    change = next(c for c in t["changes"] if c["what"] == "all 8 MatMul/Gemm weights")
    nodes = json.loads(plan.read_text())["overrides"]["nodes"]
    assert all(len(nodes[f"fc{i}"]["smooth"]) == 32 for i in range(8)) and change["change"].startswith("SmoothQuant scales (alpha ")
    assert invoke("quantize", model, "-o", plain, "--data", calib, "--no-smooth", "--no-latency", "-q", env=cache).exit_code == 0
    x = np.load(evald)
    ref = run_model(model, {"x": x})[0]
    cos = {k: float((ref * g).sum() / np.sqrt((ref * ref).sum() * (g * g).sum())) for k, g in
           (("tuned", run_model(out, {"x": x})[0]), ("untuned", run_model(plain, {"x": x})[0]))}
    assert cos["tuned"] > cos["untuned"], cos


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def test_the_default_smooths_a_deep_stack_and_a_calibration_file_replays_it(tmp_path, cache):
    """The default's SmoothQuant (pipeline.smooth_checked) on an 8-layer stack with outlier channels: every MatMul's
    input smoothed, checked by the int8 outputs, recorded in the calibration file and the plan, replayed by --calib
    and --plan; --no-smooth keeps the model as it was, and a file made with it refuses --no-smooth in one line."""
    model, calib, evald = saved_with_rows(tmp_path, outlier_stack(), 4)
    x = np.load(evald)
    ref = run_model(model, {"x": x})[0]
    plain, data_run, cfile, from_file = (tmp_path / n for n in ("plain.onnx", "data.onnx", "c.json", "file.onnx"))
    rep, plan, again = tmp_path / "r.json", tmp_path / "p.json", tmp_path / "again.onnx"
    assert invoke("quantize", model, "-o", plain, "--data", calib, "--no-smooth", "--no-latency", "-q", env=cache).exit_code == 0
    r = invoke("quantize", model, "-o", data_run, "--data", calib, "--no-latency", "--report", rep, "-q", env=cache)
    assert r.exit_code == 0, r.output
    assert cosine(ref, run_model(data_run, {"x": x})[0]) > cosine(ref, run_model(plain, {"x": x})[0]) + 0.001
    r = invoke("calibrate", model, "--data", calib, "-o", cfile, env=cache)
    assert r.exit_code == 0, r.output
    assert "SmoothQuant: 8 of 8 MatMul/Gemm inputs smoothed (alphas " in r.output and "dB lower)" in r.output, r.output
    c = json.loads(cfile.read_text())
    assert c["options"]["smooth"] is True and sorted(c["smoothing"]) == [f"fc{i}" for i in range(8)]
    assert all(len(v["scales"]) == 32 and min(v["scales"]) > 0 and v["range"][0] <= 0 < v["range"][1] for v in c["smoothing"].values())
    assert "fc3/smoothed_input" in c["tensors"]
    r = invoke("quantize", model, "-o", from_file, "--calib", cfile, "--no-latency", "--write-plan", plan, "-q", env=cache)
    assert r.exit_code == 0, r.output
    got = run_model(from_file, {"x": x})[0]
    assert cosine(ref, got) > cosine(ref, run_model(plain, {"x": x})[0]) + 0.001
    p = json.loads(plan.read_text())
    assert p["config"]["smooth"] is True and sorted(p["source"]["smoothing"]) == [f"fc{i}" for i in range(8)]
    assert invoke("quantize", model, "--plan", plan, "-o", again, "--no-latency", "-q").exit_code == 0
    assert again.read_bytes() == from_file.read_bytes()
    r = invoke("quantize", model, "-o", tmp_path / "no.onnx", "--calib", cfile, "--no-smooth", "--no-latency", "-q", env=cache)
    assert r.exit_code == 1 and r.output.strip().splitlines()[-1] == (
        f"error: calibration file {cfile} was made with SmoothQuant (its ranges belong to the smoothed model) and this run has "
        "--no-smooth: drop --no-smooth, or re-run qconv calibrate --no-smooth"), r.output
    assert not (tmp_path / "no.onnx").exists()
    qop = tmp_path / "qop.onnx"
    assert invoke("quantize", model, "-o", qop, "--calib", cfile, "--format", "qoperator", "--no-latency", "-q", env=cache).exit_code == 0
    assert cosine(ref, run_model(qop, {"x": x})[0]) > cosine(ref, run_model(plain, {"x": x})[0]) + 0.001
    exported = tmp_path / "exported.json"
    r = invoke("calibrate", model, "--data", calib, "-o", exported, "--export", f"tensorrt:{tmp_path / 'trt'}", env=cache)
    assert r.exit_code == 0 and "smoothing" not in json.loads(exported.read_text()), r.output  # the tables name the model's tensors
    r = invoke("calibrate", model, "--data", calib, "-o", tmp_path / "x.json", "--smooth", "--export", f"tensorrt:{tmp_path / 't2'}")
    assert r.exit_code == 2 and "--export writes TensorRT tables of the model's own tensors" in r.output, r.output


@pytest.mark.parametrize("override,message", [
    ({"fc2": {"smooth": [1.0] * 3}}, "smooth override for node 'fc2' has 3 scales, its weight has 64 input channels"),
    ({"act": {"smooth": [1.0] * 64}}, "smooth override for node 'act' (Relu): Relu is not MatMul, Gemm or Conv"),
    ({"fc*": {"smooth": [1.0] * 64}}, "smooth scales belong to one node"),
    ({"fc2": {"smooth": [1.0, -2.0]}}, "smooth must be a list of positive per-channel scales"),
])
def test_bad_smooth_overrides_fail_in_one_line(override, message, tmp_path):
    model, calib = tmp_path / "mlp.onnx", tmp_path / "c.npy"
    onnx.save(outlier_mlp(), model)
    np.save(calib, np.random.default_rng(1).normal(0, 1, (16, 32)).astype(np.float32))
    ov = tmp_path / "ov.json"
    ov.write_text(json.dumps({"overrides": {"nodes": override, "tensors": {}}}))
    out = tmp_path / "q.onnx"
    r = invoke("quantize", model, "-o", out, "--data", calib, "--overrides", ov, "--no-latency")
    assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output, r.output
    assert not out.exists()


def test_min_agreement_gate_on_a_real_run(tmp_path):
    out = tmp_path / "q.onnx"
    args = ["quantize", DIGITS / "model.onnx", "-o", out, "--data", DIGITS / "calib.npy", "--eval-data", DIGITS / "eval.npy",
            "--batch-size", 32, "--no-latency", "--layer-samples", 0, "-q"]
    r = invoke(*args, "--min-agreement", "0.95")
    assert r.exit_code == 0, r.output
    r = invoke(*args, "--min-agreement", "1.01")
    assert r.exit_code == 3
    assert "gate failed: min-agreement: measured 1.000000, required >= 1.01" in r.output
    from qconv.report.gates import evaluate_gates

    g = evaluate_gates(Thresholds(min_agreement=0.9), {"fidelity": {"top1_agreement": None}, "outputs": {}})
    assert not g["passed"] and "not class scores" in g["checks"][0]["message"]


def test_tuning_section_renders_in_html_and_markdown(tmp_path, cache):
    html, md = tmp_path / "r.html", tmp_path / "r.md"
    r, _, report, _ = tune(tmp_path, "r", cache, "--budget", "12trials", "--min-cosine", "0.99999", "--no-latency",
                           "--report", html, "--report", md)
    assert r.exit_code == 3
    page = html.read_text()
    assert '<section id="tuning">' in page and 'aria-label="tuning candidates"' in page
    assert page.count("<circle") == sum(1 for t in report["tuning"]["trials"] if t["cosine"] is not None and t["cosine"] < 1.0)
    text = md.read_text()
    assert "**Tuning**: targets missed (min-cosine)" in text
    for c in report["tuning"]["changes"]:
        assert c["change"] in text


def test_trials_run_from_cuts_measure_what_whole_runs_measure(tmp_path, cache):
    """Candidates that change a node downstream run only the graph after the last cut before it, from the current
    best's values there: every trial's numbers, the choices and the written bytes are those of whole runs."""
    args = ("--budget", "30trials", "--min-cosine", "0.99999", "--no-latency", "--kernels", "none")
    _, out_cut, rep_cut, _ = tune(tmp_path, "cut", cache, *args)
    whole = {"QCONV_CACHE_DIR": str(tmp_path / "whole-cache"), "QCONV_TRIAL_CUTS": "0"}
    _, out_whole, rep_whole, _ = tune(tmp_path, "whole", whole, *args)
    a, b = rep_cut["tuning"], rep_whole["tuning"]
    assert a["cut_trials"] > 0 and not b.get("cut_trials")
    shares = [x["graph_share"] for x in a["trials"] if "graph_share" in x]
    assert len(shares) == a["cut_trials"] and all(0 < s < 1 for s in shares)
    for x, y in zip(a["trials"], b["trials"], strict=True):
        assert (x["change"], x["cosine"], x["sqnr_db"], x["agreement"]) == (y["change"], y["cosine"], y["sqnr_db"], y["agreement"])
    assert out_cut.read_bytes() == out_whole.read_bytes()


def test_learned_rounding_on_the_chosen_plan_is_a_measured_step(tmp_path, cache):
    """--tune --rounding gptq: the plan the search chose gets learned rounding (and bias correction), measured on the
    held rows like any change: kept with its integers in the plan, or refused and the plan left without them."""
    r, out, report, plan_path = tune(tmp_path, "lr", cache, "--budget", "6trials", "--rounding", "gptq", "--no-latency")
    assert r.exit_code in (0, 3), r.output
    steps = [x for x in report["tuning"]["trials"] if x["step"] == "weight steps"]
    assert len(steps) == 1 and steps[0]["change"].startswith("learned rounding (")
    plan = json.loads(plan_path.read_text())
    rounded = [k for k, t in plan["tensors"].items() if "rounding" in t]
    assert bool(rounded) == bool(steps[0]["accepted"])
    assert (report["rounding"] is not None) == bool(steps[0]["accepted"])


def test_sharded_calibration_of_a_smoothed_stack_is_the_single_runs_file(tmp_path, cache):
    """Shard tasks calibrate the smoothed model as the main process does (distributed.calibrate_shard replays the
    scales): the sharded file's statistics and smoothing are the single run's."""
    model, calib, _ = saved_with_rows(tmp_path, outlier_stack(), 4)
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    assert invoke("calibrate", model, "--data", calib, "--batch-size", "8", "-o", one, env=cache).exit_code == 0
    r = invoke("calibrate", model, "--data", calib, "--batch-size", "8", "--shards", "2", "-o", two, env=cache)
    assert r.exit_code == 0, r.output
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert a["smoothing"] == b["smoothing"] and len(a["smoothing"]) == 8
    assert a["tensors"] == b["tensors"]


def test_smooth_on_a_small_model_and_no_smooth_on_a_stack(tmp_path, cache):
    """--smooth applies SmoothQuant below the default's 8 nodes, without the check (the two-layer MLP whose second
    input has outlier channels: closer to fp32 than the default, which leaves a 2-node model alone); --no-smooth
    leaves a stack as it is; a file made without it is refused with --smooth in one line."""
    model, calib, evald = saved_with_rows(tmp_path, outlier_mlp(), 1)
    x = np.load(evald)
    ref = run_model(model, {"x": x})[0]
    plain, smooth, cfile, rep = tmp_path / "plain.onnx", tmp_path / "smooth.onnx", tmp_path / "c.json", tmp_path / "r.json"
    r = invoke("quantize", model, "-o", plain, "--data", calib, "--no-latency", "--report", rep, "-q", env=cache)
    assert r.exit_code == 0 and not [n for n in json.loads(rep.read_text())["model"]["intake"] if "SmoothQuant" in n], r.output
    assert json.loads(rep.read_text())["smoothing"] is None
    r = invoke("quantize", model, "-o", smooth, "--data", calib, "--smooth", "--no-latency", "--report", rep, "-q", env=cache)
    assert r.exit_code == 0, r.output
    notes = [n for n in json.loads(rep.read_text())["model"]["intake"] if n.startswith("SmoothQuant")]
    assert len(notes) == 1 and notes[0].startswith("SmoothQuant: 2 of 2 MatMul/Gemm inputs smoothed (alpha"), notes
    assert "dB smoothed" not in notes[0] and "not worth" not in notes[0]  # --smooth: kept without the checks
    sm = json.loads(rep.read_text())["smoothing"]
    assert sm["method"] == "smoothquant" and sm["nodes"] == 2 and 0.5 <= sm["alpha_min"] <= sm["alpha_max"] <= 0.95, sm
    assert cosine(ref, run_model(smooth, {"x": x})[0]) > cosine(ref, run_model(plain, {"x": x})[0])
    assert [n.op_type for n in onnx.load(str(smooth)).graph.node if n.name.endswith("/smooth")] == ["Mul", "Mul"]
    assert invoke("calibrate", model, "--data", calib, "-o", cfile, env=cache).exit_code == 0
    assert "smoothing" not in json.loads(cfile.read_text())
    r = invoke("quantize", model, "-o", tmp_path / "no.onnx", "--calib", cfile, "--smooth", "--no-latency", "-q", env=cache)
    assert r.exit_code == 1 and r.output.strip().splitlines()[-1] == (
        f"error: calibration file {cfile} was made without SmoothQuant and this run asks for it (--smooth): drop --smooth, or "
        "re-run qconv calibrate --smooth"), r.output
    (tmp_path / "s").mkdir()
    stack, scalib, _ = saved_with_rows(tmp_path / "s", outlier_stack(), 4)
    out = tmp_path / "s" / "q.onnx"
    r = invoke("quantize", stack, "-o", out, "--data", scalib, "--no-smooth", "--no-latency", "--report", rep, "-q", env=cache)
    assert r.exit_code == 0 and not [n for n in json.loads(rep.read_text())["model"]["intake"] if "SmoothQuant" in n], r.output
    assert not [n for n in onnx.load(str(out)).graph.node if n.name.endswith("/smooth")]


@pytest.mark.parametrize("layers_db,sure_db,kept,says", [
    (3.0, 6.0, True, "dB lower)"),  # 29 dB: sure, no check of the whole model
    (3.0, 100.0, True, "dB smoothed)"),  # below "sure": the int8 model's outputs are checked, and gain
    (100.0, 100.0, False, "not worth a Mul each)"),  # the layers' gain below the bar: left, no check
])
def test_the_defaults_smoothquant_decision(tmp_path, monkeypatch, layers_db, sure_db, kept, says):
    """pipeline.smooth_checked on the outlier stack through the real onnxruntime: the layers' summed gain decides,
    the whole int8 model is checked only between SMOOTH_LAYERS_DB and SMOOTH_SURE_DB, and a model left alone is the
    same model."""
    from qconv import pipeline
    from qconv.plan.config import QuantConfig

    model, calib, _ = saved_with_rows(tmp_path, outlier_stack(), 4)
    monkeypatch.setattr(pipeline, "SMOOTH_LAYERS_DB", layers_db)
    monkeypatch.setattr(pipeline, "SMOOTH_SURE_DB", sure_db)
    prepared = pipeline.load(model, QuantConfig())
    before = prepared.model.SerializeToString()
    got = pipeline.smooth_checked(prepared, pipeline.feeds_for(prepared, calib, 8), QuantConfig())
    note = next(n for n in prepared.notes if n.startswith("SmoothQuant"))
    assert note.endswith(says), note
    assert bool(got) == kept and bool(prepared.smoothing) == kept
    assert (prepared.model.SerializeToString() == before) != kept
    if kept:
        assert sorted(got) == [f"fc{i}" for i in range(8)] and prepared.variant.startswith("sq")
        assert sum(n.name.endswith("/smooth") for n in prepared.model.graph.node) == 8


def test_the_default_smooths_the_sample_decoder_with_its_kv_cache(tmp_path, cache):
    """A decoder with a KV cache (15 MatMuls, past/present inputs and outputs): the default smooths it (the layers'
    gain between 2.5 and 6 dB, so the whole int8 model is checked too), the interface stays, and the next token
    agrees with fp32's more often than without it."""
    d = SAMPLES / "tiny_decoder"
    got = {}
    for flag in ("default", "--no-smooth"):
        out, rep = tmp_path / f"{flag}.onnx", tmp_path / f"{flag}.json"
        args = ["--no-smooth"] if flag == "--no-smooth" else []
        r = invoke("quantize", d / "model.onnx", "-o", out, "--data", d / "prompts.npz", "--eval-data", d / "eval.npz",
                   "--no-latency", "--kernels", "none", "--report", rep, "-q", *args, env=cache)  # no timed table: the same plan
        assert r.exit_code == 0, r.output
        got[flag] = json.loads(rep.read_text())
    smoothed = got["default"]
    note = next(n for n in smoothed["model"]["intake"] if n.startswith("SmoothQuant"))
    assert note.startswith("SmoothQuant: 15 of 15 MatMul/Gemm inputs smoothed") and "dB smoothed)" in note, note
    assert smoothed["smoothing"]["nodes"] == 15 and got["--no-smooth"]["smoothing"] is None
    assert smoothed["fidelity"]["top1_agreement"] > got["--no-smooth"]["fidelity"]["top1_agreement"] + 0.01  # 0.968 vs 0.948
    src, q = onnx.load(str(d / "model.onnx")), onnx.load(str(tmp_path / "default.onnx"))
    assert [i.name for i in q.graph.input] == [i.name for i in src.graph.input]
    assert [o.name for o in q.graph.output] == [o.name for o in src.graph.output]


def test_the_default_smooths_a_stack_of_transposed_gemms(tmp_path, cache):
    """Gemm with transB=1 (torch's Linear on 2-D inputs): the scales go along the weight's axis 1 and the model is the
    same function before quantization; the default smooths all eight and lands closer to fp32 than --no-smooth."""
    from qconv.rewrite.smooth import apply_smoothing

    model, calib, evald = saved_with_rows(tmp_path, outlier_stack(gemm=True), 4)
    x = np.load(evald)
    ref = run_model(model, {"x": x})[0]
    cfile = tmp_path / "c.json"
    assert invoke("calibrate", model, "--data", calib, "-o", cfile, env=cache).exit_code == 0
    sm = json.loads(cfile.read_text())["smoothing"]
    assert sorted(sm) == [f"fc{i}" for i in range(8)]
    smoothed = apply_smoothing(onnx.load(str(model)), {k: tuple(v["scales"]) for k, v in sm.items()})
    np.testing.assert_allclose(run_model(smoothed, {"x": x})[0], ref, rtol=1e-4, atol=1e-4)
    out, plain = tmp_path / "q.onnx", tmp_path / "plain.onnx"
    assert invoke("quantize", model, "-o", out, "--calib", cfile, "--no-latency", "-q", env=cache).exit_code == 0
    assert invoke("quantize", model, "-o", plain, "--data", calib, "--no-smooth", "--no-latency", "-q", env=cache).exit_code == 0
    assert cosine(ref, run_model(out, {"x": x})[0]) > cosine(ref, run_model(plain, {"x": x})[0]) + 0.001


def test_the_smoothquant_check_reads_decisions_where_the_outputs_are_probabilities(tmp_path, monkeypatch):
    """Between the bars the whole int8 model is checked; where its output is a softmax, the top class per row decides
    (as changes_pay does): the note gives both counts, and more rows agreeing keep it."""
    import re

    from qconv import pipeline
    from qconv.plan.config import QuantConfig

    m = outlier_stack()
    m.graph.node.append(helper.make_node("Softmax", ["m7"], ["p"], name="softmax", axis=-1))
    del m.graph.output[:]
    m.graph.output.append(helper.make_tensor_value_info("p", TensorProto.FLOAT, ["N", 32]))
    model, calib, _ = saved_with_rows(tmp_path, m, 4)
    monkeypatch.setattr(pipeline, "SMOOTH_SURE_DB", 100.0)
    prepared = pipeline.load(model, QuantConfig())
    got = pipeline.smooth_checked(prepared, pipeline.feeds_for(prepared, calib, 8), QuantConfig())
    note = next(n for n in prepared.notes if n.startswith("SmoothQuant"))
    found = re.search(r"top class agrees with fp32 at (\d+) of (\d+) positions plain, (\d+) smoothed", note)
    assert found, note
    plain, positions, smoothed = (int(v) for v in found.groups())
    assert positions == 8 and smoothed > plain and got and prepared.smoothing, note  # 4 -> 8 of 8 rows


def test_a_kept_smoothings_scales_see_a_channel_that_spikes_only_after_the_first_rows(tmp_path, monkeypatch):
    """The decision reads the first ROWS rows; a smoothing kept then takes its channel extremes from EXTREME_ROWS rows:
    an input channel that spikes (x30) only in later rows gets a scale that holds the spike, which the same rows left
    unseen do not give, and the note says how many rows the scales came from."""
    from qconv import pipeline
    from qconv.adjust import smooth as sq
    from qconv.plan.config import QuantConfig

    model, calib, _ = saved_with_rows(tmp_path, outlier_stack(), 4)
    x = np.random.default_rng(9).normal(0, 1, (200, 32)).astype(np.float32)
    x[150:, 5] *= 30.0  # only rows 150..199 spike on channel 5
    np.save(calib, x)
    got = {}
    for extreme_rows in (sq.ROWS, sq.EXTREME_ROWS):
        monkeypatch.setattr(sq, "EXTREME_ROWS", extreme_rows)
        prepared = pipeline.load(model, QuantConfig())
        got[extreme_rows] = pipeline.smooth_checked(prepared, pipeline.feeds_for(prepared, calib, 8), QuantConfig())
        note = next(n for n in prepared.notes if n.startswith("SmoothQuant"))
        assert f"channel extremes of {min(200, extreme_rows)} rows, each range chosen for its layer on 64;" in note, note
    seen, unseen = got[sq.EXTREME_ROWS]["fc0"], got[sq.ROWS]["fc0"]
    spike = float(np.abs(x[:, 5]).max())
    assert spike > 10 * float(np.abs(x[:64, 5]).max())
    assert seen["scales"][5] > 3 * unseen["scales"][5]  # the spike moved into the weight
    s = np.array(seen["scales"], np.float32)
    held = np.abs(x / s).max(0)  # every channel of the smoothed input, spikes included, within a few times the range
    assert held.max() <= 4 * max(abs(seen["range"][0]), abs(seen["range"][1]))
    assert float(np.abs(x[150:, 5] / unseen["scales"][5]).max()) > 8 * max(abs(unseen["range"][0]), abs(unseen["range"][1]))
