"""Evaluation pieces: error statistics against a float64 reference, the latency interval and verdict, row limits."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from qconv.data import InputSpec, single_rows
from qconv.measure.compare import limited
from qconv.measure.latency import ratio_interval, verdict
from qconv.measure.stats import ErrorStats


def reference(r: np.ndarray, a: np.ndarray) -> tuple[float, float]:
    r, a = r.astype(np.float64).ravel(), a.astype(np.float64).ravel()
    m = np.isfinite(r) & np.isfinite(a)
    r, a = r[m], a[m]
    d = r - a
    sqnr = math.inf if d @ d == 0 else 10 * math.log10((r @ r) / (d @ d)) if r @ r else -math.inf
    cos = (r @ a) / math.sqrt((r @ r) * (a @ a)) if (r @ r) and (a @ a) else (1.0 if (r @ r) == (a @ a) else 0.0)
    return sqnr, cos


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, st.integers(1, 300_000), elements=st.floats(-1e4, 1e4, width=32)),
       st.floats(1e-6, 1.0), st.integers(0, 2**31))
def test_error_stats_match_float64(x, noise, seed):
    rng = np.random.default_rng(seed)
    y = (x + noise * rng.normal(0, 1, x.shape)).astype(np.float32)
    s = ErrorStats()
    half = x.size // 2
    s.update(x[:half], y[:half])  # two batches: the sums carry over
    s.update(x[half:], y[half:])
    sqnr, cos = reference(x, y)
    if math.isfinite(sqnr):
        assert abs(s.sqnr_db - sqnr) < 1e-3
    r64, y64 = x.astype(np.float64), y.astype(np.float64)
    ss, aa, nn = r64 @ r64, y64 @ y64, (r64 - y64) @ (r64 - y64)
    # near cos = 1 the error stays relative to 1 - cos; elsewhere it is float32 rounding of the sums, and of the
    # cosine itself (half a float32 step below 1: hypothesis found 2.5e-8 on a spike of 1449 among zeros)
    scale = nn / (2 * math.sqrt(ss * aa)) if ss and aa else 1.0
    assert abs(s.cosine - cos) <= 1e-6 * (1 - cos) + 1e-6 * scale + np.finfo(np.float32).eps / 2


def test_error_stats_skip_nonfinite_and_survive_huge_values():
    x = np.array([1.0, np.inf, -3.0e38, 2.0], np.float32)
    y = np.array([1.1, 1.0, -3.0e38, np.nan], np.float32)
    s = ErrorStats()
    s.update(x, y)
    assert s.count == 2 and math.isfinite(s.sqnr_db) and s.max_abs_err == np.float32(1.1) - np.float32(1.0)


@given(st.lists(st.floats(0.2, 5.0), min_size=5, max_size=400))
def test_ratio_interval_brackets_the_median(ratios):
    lo, hi = ratio_interval(np.array(ratios))
    med = float(np.median(ratios))
    assert lo <= med <= hi and min(ratios) <= lo and hi <= max(ratios)


def test_verdict_claims_only_beyond_the_interval():
    assert verdict(0.6, 0.9) == "faster" and verdict(1.1, 1.4) == "slower"
    assert verdict(0.95, 1.05) == "same within noise"
    noisy = np.concatenate([np.full(20, 0.9), np.full(20, 1.1)])
    assert verdict(*ratio_interval(noisy)) == "same within noise"  # a 50/50 split proves nothing


def test_layer_rows_are_single_rows_and_bounded():
    specs = [InputSpec("x", np.dtype(np.float32), ("N", 3))]
    feeds = [{"x": np.arange(12, dtype=np.float32).reshape(4, 3)} for _ in range(5)]
    rows = list(limited(feeds, specs, 6))
    assert len(rows) == 6 and all(r["x"].shape == (1, 3) for r in rows)
    np.testing.assert_array_equal(rows[4]["x"], feeds[1]["x"][:1])
    fixed = [InputSpec("x", np.dtype(np.float32), (4, 3))]
    assert len(list(single_rows(feeds[0], fixed))) == 1  # a fixed batch cannot be split


def test_class_scores_are_recognized_past_data_movement():
    from onnx import TensorProto, helper

    from qconv.measure.evaluate import _scores
    from tests.conftest import make_model

    nodes = [helper.make_node("Softmax", ["x"], ["s"], axis=-1), helper.make_node("Reshape", ["s", "shape"], ["y"])]
    shape = helper.make_tensor("shape", TensorProto.INT64, [3], [0, 0, -1])
    m = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 5])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 5])], [shape])
    assert _scores(m)
    m.graph.node[0].op_type = "Relu"
    assert not _scores(m)


def test_probe_sizes_are_the_elements_onnxruntime_computes():
    from qconv.graph import expose
    from qconv.measure.layers import probe_sizes
    from tests.conftest import conv_model, run_model

    m = conv_model()
    names = ["c1", "r1", "c2", "gap", "flat"]
    feed = {"x": np.zeros((3, 3, 8, 8), np.float32)}
    sizes = probe_sizes(m, feed, names)
    got = run_model(expose(m, {n: 1 for n in names}), feed)[1:]
    assert sizes == {n: int(v.size) for n, v in zip(names, got)} and sizes["c1"] == 3 * 8 * 64
    assert [i.type.tensor_type.shape.dim[0].dim_param for i in m.graph.input] == ["N"]  # the model is left as it was


@given(st.lists(st.integers(1, 80_000_000), min_size=1, max_size=60), st.integers(1, 64))
@settings(max_examples=200, deadline=None)
def test_layer_plan_bounds_values_and_exposure(sizes, rows):
    """The per-layer analysis compares at most LAYER_VALUES values (never fewer than 2 rows, never more than offered)
    and exposes at most CHUNK_BYTES a run (a tensor larger than that alone), every probe once, in graph order."""
    from qconv.measure.compare import CHUNK_BYTES, LAYER_VALUES, layer_plan

    named = {f"t{k}": n for k, n in enumerate(sizes)}
    use, chunks = layer_plan(named, rows)
    assert 1 <= use <= rows and (use <= max(2, LAYER_VALUES // sum(sizes)))
    assert use == rows or use * sum(sizes) <= LAYER_VALUES or use == 2
    assert [t for c in chunks for t in c] == list(named)
    assert all(len(c) == 1 or 4 * sum(named[t] for t in c) <= CHUNK_BYTES for c in chunks)
    assert all(4 * sum(named[t] for t in a + b[:1]) > CHUNK_BYTES for a, b in zip(chunks, chunks[1:]))  # none split early


def test_an_l2_normalized_output_is_not_judged_by_its_argmax():
    """A sentence embedding (x / max(||x||, eps), as torch's F.normalize exports) has no class to agree on: the damage
    warning does not read top-1 agreement there, and still does for logits."""
    from onnx import TensorProto, helper

    from qconv.measure.evaluate import _normalized
    from tests.conftest import make_model

    eps = helper.make_tensor("eps", TensorProto.FLOAT, [], [1e-12])
    nodes = [helper.make_node("ReduceL2", ["x"], ["n"], axes=[-1], keepdims=1), helper.make_node("Clip", ["n", "eps"], ["c"]),
             helper.make_node("Expand", ["c", "shape"], ["e"]), helper.make_node("Div", ["x", "e"], ["y"])]
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [1, 8])
    io = ([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])])
    assert _normalized(make_model(nodes, *io, [eps, shape], opset=13))
    w = helper.make_tensor("w", TensorProto.FLOAT, [8, 8], [0.1] * 64)
    assert not _normalized(make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], *io, [w], opset=13))
    assert not _normalized(make_model([helper.make_node("Div", ["x", "w"], ["y"])], *io, [w], opset=13))  # divided, not by its norm
