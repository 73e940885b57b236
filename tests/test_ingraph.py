"""Statistics computed inside onnxruntime (qconv.calib.ingraph) and derived along exact elementwise chains
(qconv.calib.derive): the same extremes, counts and moving averages as reading every value of every tensor."""

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from qconv.calib import derive, ingraph
from qconv.calib.collect import STACK_ROWS, activation_tensors, collect
from qconv.cli.main import cli
from qconv.data import FeedSource, InputSpec
from qconv.graph import expose
from tests.conftest import make_model

F = TensorProto.FLOAT


def _chain_model(opset=17) -> onnx.ModelProto:
    """Conv -> hard-swish (x * clip(x + 3, 0, 6) / 6) -> Relu -> Reshape -> Transpose, with Sub, rsub, Neg, LeakyRelu,
    a negative Mul, Div by a scalar, and a Mul of two tensors (observed) along the way."""
    rng = np.random.default_rng(0)
    c = lambda v, n: numpy_helper.from_array(np.array(v, np.float32), n)  # noqa: E731
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (6, 3, 3, 3)).astype(np.float32), "w"), c(3.0, "three"), c(0.0, "zero"),
             c(6.0, "six"), c(-0.7, "neg"), c([1.5], "c1"), numpy_helper.from_array(np.array([2, -1], np.int64), "shape")]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["conv", "three"], ["a3"]),
        helper.make_node("Clip", ["a3", "zero", "six"], ["clip"]),
        helper.make_node("Mul", ["conv", "clip"], ["prod"]),  # two tensors: observed
        helper.make_node("Div", ["prod", "six"], ["hs"]),
        helper.make_node("Relu", ["hs"], ["relu"]),
        helper.make_node("Reshape", ["relu", "shape"], ["flat"]),
        helper.make_node("Transpose", ["flat"], ["tr"], perm=[1, 0]),
        helper.make_node("Sub", ["hs", "c1"], ["sub"]),
        helper.make_node("Sub", ["c1", "sub"], ["rsub"]),
        helper.make_node("Neg", ["rsub"], ["negd"]),
        helper.make_node("Mul", ["negd", "neg"], ["mneg"]),
        helper.make_node("LeakyRelu", ["mneg"], ["leaky"], alpha=0.1),
        helper.make_node("Mul", ["neg", "leaky"], ["mfirst"]),
        helper.make_node("Add", ["mfirst", "tr_back"], ["sum"]),
        helper.make_node("Transpose", ["tr"], ["tr_back0"], perm=[1, 0]),
        helper.make_node("Reshape", ["tr_back0", "shape4"], ["tr_back"]),
    ]
    inits.append(numpy_helper.from_array(np.array([2, 6, 8, 8], np.int64), "shape4"))
    nodes = nodes[:14] + nodes[15:] + [nodes[14]]
    return onnx.shape_inference.infer_shapes(make_model(  # typed, as qconv's intake leaves a model
        nodes, [helper.make_tensor_value_info("x", F, [2, 3, 8, 8])], [helper.make_tensor_value_info("sum", F, [2, 6, 8, 8])], inits, opset=opset))


def _feeds(model, rows, path, batch=2):
    np.save(path, rows)
    specs = [InputSpec.from_value_info(i) for i in model.graph.input]
    return FeedSource(path, specs, batch_size=batch)


def _same(a, b):
    return (a.min, a.max, a.count, a.nonfinite, a.batches, a.ema_min, a.ema_max, a.extremes) == \
        (b.min, b.max, b.count, b.nonfinite, b.batches, b.ema_min, b.ema_max, b.extremes)


@pytest.mark.parametrize("opset", [13, 18])
def test_derived_and_reduced_statistics_equal_reading_every_value(opset, tmp_path):
    model = _chain_model(opset)
    rows = np.random.default_rng(1).normal(0, 2, (10, 3, 8, 8)).astype(np.float32)
    names = activation_tensors(model)
    chains = derive.chains(model, names)
    # the scalar chains follow from the tensors they start at; the product of two tensors does not
    assert {"a3", "clip", "hs", "relu", "flat", "sub", "rsub", "negd", "mneg", "leaky", "mfirst"} <= set(chains)
    assert "tr" not in chains  # a Transpose permutes the values: observed, so samples never depend on derivation
    assert chains["clip"] == ("conv", (derive.Step("add", 3.0), derive.Step("clip", 0.0, 6.0)))
    assert chains["relu"][0] == "prod" and "prod" not in chains and "conv" not in chains
    fast, seen = collect(model, _feeds(model, rows, tmp_path / 'rows.npy'), names=names)
    slow, seen2 = collect(model, _feeds(model, rows, tmp_path / 'rows.npy'), names=names, samples=0)
    assert seen == seen2 == 5
    for n in names:
        assert _same(fast[n], slow[n]), n
    # every value counted (samples 0): the histogram holds them all; a sample holds at most about `samples` a batch
    assert all(slow[n].hist.counts.sum() == slow[n].count for n in names)
    small, _ = collect(model, _feeds(model, rows, tmp_path / 'rows.npy'), names=names, samples=64)
    for n in names:
        assert _same(small[n], slow[n]), n
        per_batch = max(1, -(-768 // 64))
        assert small[n].hist.counts.sum() <= 5 * (768 // (per_batch + 1 - per_batch % 2) + 1)


def test_sample_step_is_odd_and_shared_by_numpy_and_the_graph():
    assert ingraph.sample_step(100, 0) == 1 and ingraph.sample_step(100, 100) == 1
    assert [ingraph.sample_step(n, 10) for n in (11, 20, 21, 30, 31, 1000)] == [3, 3, 3, 3, 5, 101]
    x = np.arange(1000, dtype=np.float32)
    b = ingraph.batch_of(x, 10)
    assert b.values.tolist() == x[::101].tolist() and (b.lo, b.hi, b.count) == (0.0, 999.0, 1000)


def test_a_run_of_many_batches_takes_fewer_histogram_values_a_batch_and_about_a_million_a_tensor():
    assert ingraph.samples_for(None, None, 1) == ingraph.samples_for(None, "minmax", 64) == 16384  # as before, up to 64 batches
    assert ingraph.samples_for(None, None, 65) == (1 << 20) // 65 == 16131
    assert ingraph.samples_for(None, None, 400) == 2621  # PP-OCRv4 rec, 400 lines at batch 1
    assert ingraph.samples_for(None, None, 10 ** 6) == ingraph.MIN_SAMPLES
    assert ingraph.samples_for(None, "percentile", 400) == 0 and ingraph.samples_for(500, None, 400) == 500  # as asked


def test_each_follower_is_computed_from_the_longest_chain_its_steps_extend():
    a, b, c = derive.Step("add", 3.0), derive.Step("clip", 0.0, 6.0), derive.Step("div", 6.0)
    derived = {"x3": ("x", (a,)), "clip": ("x", (a, b)), "hs": ("x", (a, b, c)), "r": ("x", (derive.Step("relu"),)),
               "copy": ("y", (derive.Step("copy"),)), "x3b": ("x", (a,))}
    got = derive.followers(derived)
    assert got["x"] == [("x3", None, (a,)), ("r", None, (derive.Step("relu"),)), ("x3b", "x3", ()), ("clip", "x3", (b,)),
                        ("hs", "clip", (c,))]
    assert got["y"] == [("copy", None, (derive.Step("copy"),))]


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.floats(-1e4, 1e4, width=32), min_size=1, max_size=30),
       chains=st.lists(st.lists(st.sampled_from(["add", "sub", "mul", "div", "clip", "relu", "neg", "leaky", "copy"]), min_size=1,
                                max_size=4), min_size=1, max_size=6))
def test_values_and_extremes_down_the_followers_tree_equal_those_from_the_root(values, chains):
    make = {"clip": derive.Step("clip", -2.5, 7.0), "leaky": derive.Step("leaky", 0.1)}
    full = [tuple(make.get(op, derive.Step(op, 1.7 if op != "div" else 3.1)) for op in ops) for ops in chains]
    derived = {f"t{k}": ("x", steps) for k, steps in enumerate(full)}
    derived.update({f"p{k}": ("x", steps[:1]) for k, steps in enumerate(full)})  # prefixes, so parents exist
    x = np.array(values, np.float32)
    got = {None: (float(x.min()), float(x.max()), x)}
    for t, parent, steps in derive.followers(derived)["x"]:
        lo, hi, v = got[parent]
        got[t] = (*derive.extremes(steps, lo, hi), derive.values(steps, v))
    for t, (_, steps) in derived.items():
        want = derive.values(steps, x)
        assert got[t][:2] == derive.extremes(steps, float(x.min()), float(x.max())), t
        assert np.array_equal(got[t][2], want, equal_nan=True), t


@settings(max_examples=80, deadline=None)
@given(values=st.lists(st.floats(-1e4, 1e4, width=32), min_size=1, max_size=40),
       c=st.floats(-50, 50, width=32).filter(lambda v: abs(v) > 1e-3),
       ops=st.lists(st.sampled_from(["add", "sub", "rsub", "mul", "div", "clip", "relu", "neg", "leaky", "copy"]), min_size=1, max_size=4))
def test_derived_extremes_are_the_extremes_of_the_derived_values(values, c, ops):
    steps = tuple(derive.Step(op, c if op != "clip" else -abs(c), abs(c)) if op != "leaky" else derive.Step(op, abs(c) / 50) for op in ops)
    x = np.array(values, np.float32)
    y = derive.values(steps, x)
    lo, hi = derive.extremes(steps, float(x.min()), float(x.max()))
    if np.isfinite(y).all():
        assert (lo, hi) == (float(y.min()), float(y.max()))


def _nonfinite_model():
    """y = log(x) (-inf at 0, NaN below 0) -> Add 1 -> Relu; z = x * 2 (finite)."""
    inits = [numpy_helper.from_array(np.array(1.0, np.float32), "one"), numpy_helper.from_array(np.array(2.0, np.float32), "two")]
    nodes = [helper.make_node("Log", ["x"], ["lg"]), helper.make_node("Add", ["lg", "one"], ["a1"]), helper.make_node("Relu", ["a1"], ["y"]),
             helper.make_node("Mul", ["x", "two"], ["z0"]), helper.make_node("Sin", ["z0"], ["z"])]
    return onnx.shape_inference.infer_shapes(make_model(
        nodes, [helper.make_tensor_value_info("x", F, [None, 16])],
        [helper.make_tensor_value_info("y", F, None), helper.make_tensor_value_info("z", F, None)], inits))


@pytest.mark.parametrize("where", [0, 3])
def test_a_tensor_holding_inf_or_nan_is_observed_in_full_from_the_first_batch(where, tmp_path):
    model = _nonfinite_model()
    rows = np.random.default_rng(2).uniform(0.5, 2.0, (8, 16)).astype(np.float32)
    rows[where * 2, 3] = 0.0  # log -> -inf, in batch `where`
    rows[where * 2 + 1, 5] = -1.0  # log -> NaN (onnxruntime's ReduceMin/Max skip it; the sum sees it)
    names = activation_tensors(model)
    fast, _ = collect(model, _feeds(model, rows, tmp_path / "rows.npy"), names=names)
    slow, _ = collect(model, _feeds(model, rows, tmp_path / "rows.npy"), names=names, samples=0)
    for n in names:
        assert _same(fast[n], slow[n]), n
    assert fast["lg"].nonfinite == 2 and fast["a1"].nonfinite == 2 and fast["y"].nonfinite == 1  # relu(NaN) stays NaN


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_calibrate_records_its_histogram_samples_and_counts_every_value_for_tail_methods(tmp_path):
    model = _chain_model()
    onnx.save(model, tmp_path / "m.onnx")
    np.save(tmp_path / "d.npy", np.random.default_rng(3).normal(0, 2, (6, 3, 8, 8)).astype(np.float32))
    r = invoke("calibrate", tmp_path / "m.onnx", "--data", tmp_path / "d.npy", "-o", tmp_path / "a.json")
    assert r.exit_code == 0, r.output
    a = json.loads((tmp_path / "a.json").read_text())
    assert a["options"]["hist_samples"] == ingraph.DEFAULT_SAMPLES
    r = invoke("calibrate", tmp_path / "m.onnx", "--data", tmp_path / "d.npy", "-o", tmp_path / "p.json", "--method", "percentile")
    assert r.exit_code == 0, r.output
    p = json.loads((tmp_path / "p.json").read_text())
    assert p["options"]["hist_samples"] == 0
    for name, t in a["tensors"].items():  # the same extremes either way
        assert (t["min"], t["max"], t["count"]) == (p["tensors"][name]["min"], p["tensors"][name]["max"], p["tensors"][name]["count"])
    r = invoke("calibrate", tmp_path / "m.onnx", "--data", tmp_path / "d.npy", "-o", tmp_path / "x.json", "--hist-samples", "-1")
    assert r.exit_code == 2 and "--hist-samples" in r.output


def test_a_long_run_records_the_samples_its_length_gave_and_every_shard_takes_them_too(tmp_path):
    model = _chain_model()
    onnx.save(model, tmp_path / "m.onnx")
    np.save(tmp_path / "d.npy", np.random.default_rng(4).normal(0, 2, (140, 3, 8, 8)).astype(np.float32))  # 70 feeds of 2
    for out, extra in (("a.json", []), ("s.json", ["--shard", "1/3"])):
        r = invoke("calibrate", tmp_path / "m.onnx", "--data", tmp_path / "d.npy", "--batch-size", 2, "-o", tmp_path / out, *extra)
        assert r.exit_code == 0, r.output
        assert json.loads((tmp_path / out).read_text())["options"]["hist_samples"] == (1 << 20) // 70


def test_the_calibration_graph_is_a_valid_model_with_the_original_outputs():
    model = _chain_model()
    from qconv.runtime import session

    before = model.SerializeToString()
    g = ingraph.StatsGraph(model, ["conv", "prod"], ["hs"], 64)
    with g.applied() as applied:
        sess = session(applied, by_priority=True)
    assert model.SerializeToString() == before  # the model is left as it was
    assert [o.name for o in sess.get_outputs()][:1] == ["sum"]  # the model's outputs first, unchanged
    x = np.random.default_rng(4).normal(0, 1, (2, 3, 8, 8)).astype(np.float32)
    fetched = sess.run(g.outputs(), {"x": x})
    got = g.read(fetched)
    ref = dict(zip(["conv", "prod", "hs"], session(expose(model, {"conv": F, "prod": F, "hs": F})).run(["conv", "prod", "hs"], {"x": x})))
    for name in ("conv", "prod", "hs"):
        assert (got[name].lo, got[name].hi, got[name].count) == (float(ref[name].min()), float(ref[name].max()), ref[name].size)
    step = ingraph.sample_step(ref["conv"].size, 64)
    assert got["conv"].values.tolist() == ref["conv"].reshape(-1)[::step].tolist()


def test_a_tail_method_on_sampled_histograms_is_warned_about(tmp_path):
    model = _chain_model()
    onnx.save(model, tmp_path / "m.onnx")
    np.save(tmp_path / "d.npy", np.random.default_rng(5).normal(0, 2, (6, 3, 8, 8)).astype(np.float32))
    for tag, extra in (("sampled", []), ("every", ["--method", "percentile"])):
        r = invoke("calibrate", tmp_path / "m.onnx", "--data", tmp_path / "d.npy", "-o", tmp_path / f"{tag}.json", *extra)
        assert r.exit_code == 0, r.output
        r = invoke("quantize", tmp_path / "m.onnx", "--calib", tmp_path / f"{tag}.json", "--method", "percentile", "-o",
                   tmp_path / f"{tag}.onnx", "--report", tmp_path / f"{tag}.report.json", "--no-latency", "--kernels", "none")
        assert r.exit_code == 0, r.output
        warned = [w for w in json.loads((tmp_path / f"{tag}.report.json").read_text())["warnings"] if "histograms of a sample" in w]
        assert len(warned) == (1 if tag == "sampled" else 0), warned
        assert "--hist-samples 0" in (warned[0] if warned else "--hist-samples 0")


def test_merging_many_shards_folds_the_moving_average_once_and_equals_one_observer():
    from qconv.calib.observers import TensorObserver
    from qconv.calib.store import merge_tensors

    rng = np.random.default_rng(6)
    batches = [rng.normal(k % 3, 1 + k % 4, 200).astype(np.float32) for k in range(24)]
    whole = TensorObserver(bins=256)
    for k, x in enumerate(batches):
        whole.update(x, k)
    parts = []
    for s in range(5):  # interleaved shards, as --shards makes them
        o = TensorObserver(bins=256)
        for k in range(s, len(batches), 5):
            o.update(batches[k], k)
        parts.append({"t": o})
    merged = merge_tensors(parts)["t"]
    assert merged.to_dict() == whole.to_dict()
    assert parts[0]["t"].batches == 5  # the parts are not changed by merging



def test_shards_merged_by_hand_equal_a_single_run_tensor_for_tensor(tmp_path):
    model = _chain_model()
    onnx.save(model, tmp_path / "m.onnx")
    rows = np.random.default_rng(7).normal(0, 2, (12, 3, 8, 8)).astype(np.float32)
    rows[7] *= 9  # a late, wide batch: single runs and shards place their histogram windows differently
    np.save(tmp_path / "d.npy", rows)
    base = ["calibrate", tmp_path / "m.onnx", "--data", tmp_path / "d.npy", "--batch-size", "2", "--bins", "128", "--hist-samples", "64"]
    assert invoke(*base, "-o", tmp_path / "one.json").exit_code == 0
    for k in range(3):
        assert invoke(*base, "--shard", f"{k}/3", "-o", tmp_path / f"s{k}.json").exit_code == 0
    r = invoke("calibrate", "merge", *[tmp_path / f"s{k}.json" for k in range(3)], "-o", tmp_path / "merged.json")
    assert r.exit_code == 0, r.output
    one = json.loads((tmp_path / "one.json").read_text())["tensors"]
    merged = json.loads((tmp_path / "merged.json").read_text())["tensors"]
    assert merged == one


@settings(max_examples=80, deadline=None)
@given(spec=st.lists(st.tuples(st.floats(-100, 100), st.floats(1e-3, 100), st.integers(1, 300)), min_size=2, max_size=10),
       shards=st.integers(2, 4), step=st.sampled_from([1, 3, 7]), bins=st.sampled_from([16, 128, 2048]))
def test_any_split_into_shards_merges_into_the_single_runs_observer(spec, shards, step, bins):
    from qconv.calib.observers import TensorObserver
    from qconv.calib.store import merge_tensors

    rng = np.random.default_rng(8)
    batches = [rng.normal(mu, sd, n).astype(np.float32) for mu, sd, n in spec]
    whole = TensorObserver(bins=bins)
    for k, x in enumerate(batches):
        whole.update(x, k, step)  # a strided sample: the histogram misses some extremes, as in-graph samples do
    whole.canonicalize()
    parts = []
    for s in range(shards):
        o = TensorObserver(bins=bins)
        for k in range(s, len(batches), shards):
            o.update(batches[k], k, step)
        parts.append({"t": o})
    assert merge_tensors(parts)["t"].to_dict() == whole.to_dict()


def test_below_opset_13_the_tensors_are_exposed_and_sampled_the_same_way(tmp_path):
    model = _chain_model(opset=11)  # ReduceSum's axes input and Slice's steps need 13: the exposure path
    assert not ingraph.supported(model)
    rows = np.random.default_rng(9).normal(0, 2, (6, 3, 8, 8)).astype(np.float32)
    names = activation_tensors(model)
    sampled, _ = collect(model, _feeds(model, rows, tmp_path / "rows.npy"), names=names, samples=64)
    every, _ = collect(model, _feeds(model, rows, tmp_path / "rows.npy"), names=names, samples=0)
    for n in names:
        assert _same(sampled[n], every[n]), n
    step = ingraph.sample_step(2 * 6 * 8 * 8, 64)
    assert sampled["conv"].hist.counts.sum() == 3 * len(range(0, 2 * 6 * 8 * 8, step))
    assert every["conv"].hist.counts.sum() == every["conv"].count


def test_tiny_and_constant_values_get_a_grid_float32_can_scale_by():
    from qconv.calib.observers import MIN_WIDTH, TensorObserver, fitting_width

    assert fitting_width(1e-40, 1e-40, 2048) == MIN_WIDTH and fitting_width(0.0, 1e-44, 2048) == MIN_WIDTH
    assert fitting_width(-1.0, 1.0, 2048) == 2.0 ** -9 and fitting_width(3.0, 3.0, 2048) == 2.0 ** -22
    o = TensorObserver(bins=128)
    for x in (np.full(10, 1e-40, np.float32), np.array([1e-40, 2e-38, 5.0], np.float32), np.zeros(4, np.float32)):
        o.update(x)
    assert o.hist.counts.sum() == 17 and (o.min, o.max) == (0.0, 5.0)
    o.canonicalize()
    assert o.hist.counts.sum() == 17


# ---- one-row feeds run stacked (collect.STACK_ROWS): each feed's own statistics, bit for bit ----------------------------

def _row_model(mix: bool = False, opset: int = 17) -> onnx.ModelProto:
    """x[N,3,H,W] -> Conv -> hard-swish (observed product, derived followers) -> Relu -> Reshape [0, -1]; ``mix``: also a
    Transpose that puts the rows on axis 1 and a product of it (observed): a tensor whose rows are not each together."""
    rng = np.random.default_rng(0)
    c = lambda v, n: numpy_helper.from_array(np.array(v, np.float32), n)  # noqa: E731
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (6, 3, 3, 3)).astype(np.float32), "w"), c(3.0, "three"), c(0.0, "zero"),
             c(6.0, "six"), numpy_helper.from_array(np.array([0, -1], np.int64), "keep")]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["conv", "three"], ["a3"]),
        helper.make_node("Clip", ["a3", "zero", "six"], ["clip"]),
        helper.make_node("Mul", ["conv", "clip"], ["prod"]),
        helper.make_node("Div", ["prod", "six"], ["hs"]),
        helper.make_node("Relu", ["hs"], ["relu"]),
        helper.make_node("Reshape", ["relu", "keep"], ["y"]),
    ]
    outputs = [helper.make_tensor_value_info("y", F, None)]
    if mix:
        nodes += [helper.make_node("Transpose", ["hs"], ["tr"], perm=[1, 0, 2, 3]), helper.make_node("Mul", ["tr", "tr"], ["sq"])]
        outputs.append(helper.make_tensor_value_info("sq", F, None))
    return onnx.shape_inference.infer_shapes(make_model(
        nodes, [helper.make_tensor_value_info("x", F, ["N", 3, "H", "W"])], outputs, inits, opset=opset))


def _one_by_one(monkeypatch, model, feeds, **kw):
    """``collect`` with every feed run alone (the statistics a stack must reproduce)."""
    from qconv.calib import collect as c

    with monkeypatch.context() as m:
        m.setattr(c, "STACK_ROWS", 1)
        return collect(model, feeds, **kw)


def _spy_stacks(monkeypatch):
    """The stack sizes each stacked pass ran with, and how many passes gave up stacking."""
    from qconv.calib import collect as c

    seen = {"stacked": [], "unstacked": 0}
    real, real_same = c._stream_stacked, c._same_rows

    def stream(sess, feeds, fetch, stack, *a, **k):
        seen["stacked"].append(stack)
        return real(sess, feeds, fetch, stack, *a, **k)

    def same(*a, **k):
        ok = real_same(*a, **k)
        seen["unstacked"] += not ok
        return ok

    monkeypatch.setattr(c, "_stream_stacked", stream)
    monkeypatch.setattr(c, "_same_rows", same)
    return seen


def _files_equal(a: dict, b: dict, names):
    for n in names:
        a[n].canonicalize()
        b[n].canonicalize()
        assert json.dumps(a[n].to_dict()) == json.dumps(b[n].to_dict()), n


@pytest.mark.parametrize("opset", [13, 18])
@pytest.mark.parametrize("samples", [64, 4096])
def test_one_row_feeds_run_stacked_give_each_feeds_own_statistics_bit_for_bit(opset, samples, tmp_path, monkeypatch):
    model = _row_model(opset=opset)
    rows = np.random.default_rng(11).normal(0, 2, (21, 3, 8, 8)).astype(np.float32)  # full stacks and a shorter tail
    rows[13] *= 40  # a wide row mid-stack: histograms widen within a stack
    names = activation_tensors(model)
    single, n1 = _one_by_one(monkeypatch, model, _feeds(model, rows, tmp_path / "r.npy", 1), names=names, samples=samples)
    seen = _spy_stacks(monkeypatch)
    stacked, n2 = collect(model, _feeds(model, rows, tmp_path / "r.npy", 1), names=names, samples=samples)
    assert seen == {"stacked": [STACK_ROWS], "unstacked": 0} and n1 == n2 == 21 and 21 % STACK_ROWS
    assert stacked["prod"].batches == 21 and [e[0] for e in stacked["prod"].extremes] == list(range(21))
    _files_equal(stacked, single, names)


def test_a_tensor_that_mixes_the_rows_makes_the_feeds_run_one_at_a_time(tmp_path, monkeypatch):
    model = _row_model(mix=True)
    rows = np.random.default_rng(12).normal(0, 2, (10, 3, 8, 8)).astype(np.float32)
    names = activation_tensors(model)
    single, _ = _one_by_one(monkeypatch, model, _feeds(model, rows, tmp_path / "r.npy", 1), names=names, samples=64)
    seen = _spy_stacks(monkeypatch)
    got, n = collect(model, _feeds(model, rows, tmp_path / "r.npy", 1), names=names, samples=64)
    assert seen == {"stacked": [STACK_ROWS], "unstacked": 1} and n == 10  # tried, checked on the first stack, given up
    _files_equal(got, single, names)


def test_rows_all_alike_run_alone_and_the_check_waits_for_rows_that_differ(tmp_path, monkeypatch):
    model = _row_model(mix=True)
    rows = np.random.default_rng(15).normal(0, 2, (12, 3, 8, 8)).astype(np.float32)
    rows[:STACK_ROWS] = 0.0  # blank first rows: every tensor is zero, mixed or not, so they cannot tell
    names = activation_tensors(model)
    single, _ = _one_by_one(monkeypatch, model, _feeds(model, rows, tmp_path / "r.npy", 1), names=names, samples=64)
    seen = _spy_stacks(monkeypatch)
    got, n = collect(model, _feeds(model, rows, tmp_path / "r.npy", 1), names=names, samples=64)
    assert seen == {"stacked": [STACK_ROWS], "unstacked": 1} and n == 12
    _files_equal(got, single, names)


def test_stacks_break_where_the_feeds_shapes_change(tmp_path, monkeypatch):
    model = _row_model()
    rng = np.random.default_rng(13)
    data = tmp_path / "d"
    data.mkdir()
    np.save(data / "a.npy", rng.normal(0, 1, (5, 3, 8, 8)).astype(np.float32))
    np.save(data / "b.npy", rng.normal(0, 3, (6, 3, 8, 12)).astype(np.float32))  # wider rows
    specs = [InputSpec.from_value_info(i) for i in model.graph.input]
    names = activation_tensors(model)
    single, _ = _one_by_one(monkeypatch, model, FeedSource(data, specs, batch_size=1), names=names, samples=64)
    seen = _spy_stacks(monkeypatch)
    got, n = collect(model, FeedSource(data, specs, batch_size=1), names=names, samples=64)
    assert seen == {"stacked": [STACK_ROWS], "unstacked": 0} and n == 11
    _files_equal(got, single, names)


def test_a_stacked_row_holding_inf_or_nan_observes_that_tensor_in_full_as_one_row_feeds_do(tmp_path, monkeypatch):
    model = _nonfinite_model()
    rows = np.random.default_rng(2).uniform(0.5, 2.0, (12, 16)).astype(np.float32)
    rows[9, 3] = 0.0  # -inf in a later stack
    names = activation_tensors(model)
    slow, _ = collect(model, _feeds(model, rows, tmp_path / "r.npy", 1), names=names, samples=0)
    seen = _spy_stacks(monkeypatch)
    fast, _ = collect(model, _feeds(model, rows, tmp_path / "r.npy", 1), names=names)
    assert seen["stacked"] == [STACK_ROWS]  # then the pass starts again, one feed a run, with the log observed in full
    for n in names:
        assert _same(fast[n], slow[n]), n
    assert fast["lg"].nonfinite == 1


def test_which_feeds_stack():
    from qconv.calib.collect import STACK_VALUES, stack_rows

    model = _row_model()
    one = {"x": np.zeros((1, 3, 8, 8), np.float32)}
    assert stack_rows(model, one) == ("x", STACK_ROWS)
    assert stack_rows(model, {"x": np.zeros((2, 3, 8, 8), np.float32)}) == (None, 1)  # feeds of several rows
    assert stack_rows(model, {"x": np.zeros((1, 3, 256, 256), np.float32)}) == ("x", min(STACK_ROWS, STACK_VALUES // (3 * 256 * 256)))
    assert stack_rows(model, {"x": np.zeros((1, 3, 480, 480), np.float32)}) == (None, 1)  # a page runs alone
    fixed = _row_model()
    fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    assert stack_rows(fixed, one) == (None, 1)  # a fixed batch of one
    paddle = _row_model()
    paddle.graph.input[0].type.tensor_type.shape.dim[0].dim_value = -1  # Paddle's free axis
    assert stack_rows(paddle, one) == ("x", STACK_ROWS)
    assert stack_rows(model, None) == (None, 1)


def test_shards_of_one_row_feeds_stack_their_own_rows_and_merge_into_the_single_run(tmp_path):
    model = _row_model()
    onnx.save(model, tmp_path / "m.onnx")
    rows = np.random.default_rng(14).normal(0, 2, (30, 3, 8, 8)).astype(np.float32)
    rows[17] *= 9
    np.save(tmp_path / "d.npy", rows)
    base = ["calibrate", tmp_path / "m.onnx", "--data", tmp_path / "d.npy", "--bins", "128", "--hist-samples", "64", "--no-floor-ranges"]
    assert invoke(*base, "-o", tmp_path / "one.json").exit_code == 0
    for k in range(3):
        assert invoke(*base, "--shard", f"{k}/3", "-o", tmp_path / f"s{k}.json").exit_code == 0
    r = invoke("calibrate", "merge", *[tmp_path / f"s{k}.json" for k in range(3)], "-o", tmp_path / "merged.json")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "merged.json").read_text())["tensors"] == json.loads((tmp_path / "one.json").read_text())["tensors"]
