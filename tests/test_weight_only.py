"""Int4 weight-only quantization: nibble packing and block math, the MatMulNBits / GatherBlockQuantized layouts
as onnxruntime executes them, GPTQ, and the bundled tiny transformer end to end (real onnxruntime, no mocks)."""

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from onnx import TensorProto, helper, numpy_helper

from qconv.errors import QconvError, UsageError
from qconv.graph.intake import prepare
from qconv.numeric import qmath
from qconv.rewrite import weight_only as wo
from tests.conftest import SAMPLES, make_model, run_model

TRANSFORMER = SAMPLES / "tiny_transformer"
MS_OPSET = helper.make_opsetid("com.microsoft", 1)


# ---------------------------------------------------------------- pure math

@settings(max_examples=100, deadline=None)
@given(q=arrays(np.uint8, st.tuples(st.integers(1, 4), st.integers(1, 9)), elements=st.integers(0, 15)))
def test_nibbles_round_trip(q):
    packed = wo.pack_nibbles(q)
    assert packed.shape == (q.shape[0], (q.shape[1] + 1) // 2)
    np.testing.assert_array_equal(wo.unpack_nibbles(packed, q.shape[1]), q)


def test_first_value_goes_in_the_low_nibble():
    np.testing.assert_array_equal(wo.pack_nibbles(np.array([1, 2, 15], np.uint8)), [0x21, 0x0F])


weights = st.tuples(st.integers(1, 70), st.integers(1, 5)).flatmap(
    lambda shape: arrays(np.float32, shape, elements=st.floats(-100, 100, width=32)))


@settings(max_examples=150, deadline=None)
@given(w=weights, block_size=st.sampled_from([16, 32]))
def test_affine_block_error_is_at_most_half_a_step(w, block_size):
    qw = wo.rtn(w, block_size, symmetric=False)
    assert qw.q.shape == w.shape and qw.q.max(initial=0) <= 15
    assert qw.scale.shape == (-(-w.shape[0] // block_size), w.shape[1])
    step = np.abs(np.repeat(qw.scale, block_size, axis=0)[: w.shape[0]])
    assert np.all(np.abs(qw.dequantize() - w) <= step / 2 * (1 + 1e-5) + 1e-30)


def _block_sq_error(blocks, scale):
    qp = qmath.QParams(np.asarray(scale, np.float32), np.full(len(blocks), 8, np.uint8), wo.UINT4, axis=0)
    return np.sum((blocks - qmath.dequantize(qmath.quantize(blocks, qp), qp)) ** 2, axis=1)


@settings(max_examples=150, deadline=None)
@given(blocks=arrays(np.float32, st.tuples(st.integers(1, 6), st.sampled_from([16, 32])),
                     elements=st.floats(-100, 100, width=32)))
def test_symmetric_step_is_the_least_error_of_the_three_rules(blocks):
    qp = wo.fit_blocks(blocks, symmetric=True)
    assert np.all(qp.zero_point == 8) and np.all(qp.scale != 0)
    chosen = _block_sq_error(blocks, qp.scale)
    b = blocks.astype(np.float64)
    lo, hi = np.minimum(b.min(1), 0), np.maximum(b.max(1), 0)
    unclipped = np.where(np.maximum(hi / 8, -lo / 7) < np.maximum(-lo / 8, hi / 7), -np.maximum(hi / 8, -lo / 7),
                         np.maximum(-lo / 8, hi / 7))
    onnxruntime = np.where(-lo >= hi, lo, hi) / -8
    absmax = np.maximum(-lo, hi) / 7
    for rule in (unclipped, onnxruntime, absmax):
        rule = rule.astype(np.float32)
        rule = np.where(rule != 0, rule, np.float32(1.0))  # as the module does: zero checked after the cast
        assert np.all(chosen <= _block_sq_error(blocks, rule) * (1 + 1e-6) + 1e-12)


@settings(max_examples=100, deadline=None)
@given(w=weights)
def test_symmetric_zero_point_is_8_and_zero_is_exact(w):
    w = w.copy()
    w[0] = 0.0
    qw = wo.rtn(w, 16, symmetric=True)
    assert np.all(qw.zero_point == 8)
    assert np.all(qw.q[0] == 8) and np.all(qw.dequantize()[0] == 0.0)


def test_symmetric_step_uses_minus_8_for_the_larger_side_without_clipping():
    qw = wo.rtn(np.array([[-8.0], [7.0], [1.0]] + [[0.0]] * 13, np.float32), 16, symmetric=True)
    assert qw.scale[0, 0] == pytest.approx(1.0)  # absmax / 7 would give 8 / 7
    flipped = wo.rtn(np.array([[8.0], [-7.0]] + [[0.0]] * 14, np.float32), 16, symmetric=True)
    assert flipped.scale[0, 0] == pytest.approx(-1.0)  # the positive side lands on -8
    np.testing.assert_allclose(flipped.dequantize()[:2, 0], [8.0, -7.0])


def _layer_error(w, x, qw):
    return float(np.sum((x @ w - x @ qw.dequantize()) ** 2))


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_lowers_layer_output_error(act_order, symmetric):
    rng = np.random.default_rng(0)
    k_dim = 80  # not a multiple of the block size
    x = rng.normal(size=(512, k_dim)) @ rng.normal(size=(k_dim, k_dim))  # correlated inputs
    x[:, 5] = 0.0  # a dead input
    w = rng.normal(size=(k_dim, 24)).astype(np.float32)
    qw = wo.gptq_weight(w, x.T @ x / len(x), 32, symmetric, act_order=act_order)
    assert qw.q.shape == w.shape and qw.scale.shape == (3, 24)
    assert _layer_error(w, x, qw) < 0.7 * _layer_error(w, x, wo.rtn(w, 32, symmetric))


# ---------------------------------------------------------------- layouts as onnxruntime runs them

def _matmul_model(w: np.ndarray, readers: int = 1) -> onnx.ModelProto:
    k_dim, n_dim = w.shape
    nodes = [helper.make_node("MatMul", ["x", "w"], [f"y{i}"], name=f"mm{i}") for i in range(readers)]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, k_dim])
    ys = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [2, 3, n_dim]) for i in range(readers)]
    return make_model(nodes, [x], ys, [numpy_helper.from_array(w, "w")])


def _inits(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _decode_matmul_nbits(node, inits) -> np.ndarray:
    """W [K, N] from MatMulNBits inputs, decoded independently of the module's own helpers."""
    a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
    k_dim, n_dim, bs = a["K"], a["N"], a["block_size"]
    b, scales = inits[node.input[1]], inits[node.input[2]]
    nb = -(-k_dim // bs)
    assert a["bits"] == 4 and b.dtype == np.uint8 and b.shape == (n_dim, nb, bs // 2)
    assert scales.dtype == np.float32 and scales.size == n_dim * nb
    q = np.stack([b & 15, b >> 4], axis=-1).reshape(n_dim, nb, bs).astype(np.float32)
    if len(node.input) > 3:
        zp = inits[node.input[3]]
        assert zp.shape == (n_dim, (nb + 1) // 2)
        zp = np.stack([zp & 15, zp >> 4], axis=-1).reshape(n_dim, -1)[:, :nb]
    else:
        zp = np.full((n_dim, nb), 8)
    w = (q - zp[..., None]) * scales.reshape(n_dim, nb)[..., None]
    return w.reshape(n_dim, nb * bs).T[:k_dim]


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("k_dim,block_size", [(64, 32), (80, 32), (200, 128), (40, 16)])
def test_matmul_nbits_matches_numpy(symmetric, k_dim, block_size):
    rng = np.random.default_rng(k_dim)
    w = rng.normal(size=(k_dim, 24)).astype(np.float32)
    res = wo.quantize_int4(_matmul_model(w), block_size=block_size, symmetric=symmetric)
    onnx.checker.check_model(res.model, full_check=True)
    (node,) = res.model.graph.node
    assert (node.op_type, node.domain) == ("MatMulNBits", "com.microsoft")
    assert len(node.input) == (3 if symmetric else 4)
    assert "w" not in _inits(res.model)  # the float weight is gone
    assert MS_OPSET in res.model.opset_import
    deq = _decode_matmul_nbits(node, _inits(res.model))
    assert np.linalg.norm(deq - w) / np.linalg.norm(w) == pytest.approx(res.quantized[0]["rel_error"], rel=1e-4)
    assert res.quantized[0]["rel_error"] < 0.15
    x = rng.normal(size=(2, 3, k_dim)).astype(np.float32)
    (y,) = run_model(res.model, {"x": x})
    ref = x @ deq
    assert np.max(np.abs(y - ref)) <= 1e-4 * np.max(np.abs(ref))


def test_shared_weight_is_stored_once_and_accuracy_level_is_passed():
    w = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
    res = wo.quantize_int4(_matmul_model(w, readers=2), accuracy_level=4)
    nodes = res.model.graph.node
    assert [n.op_type for n in nodes] == ["MatMulNBits"] * 2
    assert nodes[0].input[1:] == nodes[1].input[1:] and len(res.model.graph.initializer) == 2
    assert all(helper.get_attribute_value(a) == 4 for n in nodes for a in n.attribute if a.name == "accuracy_level")
    assert [q["node"] for q in res.quantized] == ["mm0", "mm1"]
    x = np.random.default_rng(1).normal(size=(2, 3, 64)).astype(np.float32)
    y0, y1 = run_model(res.model, {"x": x})
    np.testing.assert_array_equal(y0, y1)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("d_dim,block_size", [(64, 32), (40, 16)])
def test_gather_block_quantized_matches_numpy(symmetric, d_dim, block_size):
    rng = np.random.default_rng(d_dim)
    table = rng.normal(size=(10, d_dim)).astype(np.float32)
    node = helper.make_node("Gather", ["table", "ids"], ["y"], name="emb")
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, d_dim])
    res = wo.quantize_int4(make_model([node], [ids], [y], [numpy_helper.from_array(table, "table")]),
                           block_size=block_size, symmetric=symmetric)
    onnx.checker.check_model(res.model, full_check=True)
    (q_node,) = res.model.graph.node
    assert (q_node.op_type, q_node.domain) == ("GatherBlockQuantized", "com.microsoft")
    inits = _inits(res.model)
    data, scales = inits[q_node.input[0]], inits[q_node.input[2]]
    nb = -(-d_dim // block_size)
    assert data.shape == (10, d_dim // 2) and scales.shape == (10, nb)
    q = np.stack([data & 15, data >> 4], axis=-1).reshape(10, d_dim).astype(np.float32)
    zp = np.full((10, nb), 8)
    if not symmetric:
        packed = inits[q_node.input[3]]
        zp = np.stack([packed & 15, packed >> 4], axis=-1).reshape(10, -1)[:, :nb]
    blocks = np.arange(d_dim) // block_size
    deq = (q - zp[:, blocks]) * scales[:, blocks]
    assert np.linalg.norm(deq - table) / np.linalg.norm(table) < 0.15
    idx = np.array([[0, 3, 9], [-1, 2, 2]], np.int64)
    (out,) = run_model(res.model, {"ids": idx})
    np.testing.assert_allclose(out, deq[idx], rtol=0, atol=1e-6)


def test_nodes_that_stay_float_say_why():
    rng = np.random.default_rng(0)
    f = lambda *s: rng.normal(size=s).astype(np.float32)  # noqa: E731
    inits = [numpy_helper.from_array(a, n) for a, n in
             [(f(64, 8), "w_ok"), (f(1, 8, 8), "w_3d"), (f(8, 8), "w_small"), (f(10, 41), "t_odd"),
              (f(64, 8), "w_skip"), (np.array(0, np.int64), "i0")]]
    nodes = [
        helper.make_node("MatMul", ["x", "w_ok"], ["a"], name="ok"),
        helper.make_node("MatMul", ["a", "w_3d"], ["b"], name="three_d"),
        helper.make_node("MatMul", ["b", "w_small"], ["c"], name="small_k"),
        helper.make_node("MatMul", ["c", "c2"], ["d"], name="act_act"),
        helper.make_node("Gather", ["t_odd", "ids"], ["e"], name="odd_table"),
        helper.make_node("MatMul", ["x", "w_skip"], ["g"], name="skipped"),
        helper.make_node("Shape", ["x"], ["s"], name="shape"),
        helper.make_node("Gather", ["s", "i0"], ["h"], name="shape_gather"),
    ]
    ins = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 64]),
           helper.make_tensor_value_info("c2", TensorProto.FLOAT, [1, 8, 8]),
           helper.make_tensor_value_info("ids", TensorProto.INT64, [3])]
    shapes = {"d": [1, 2, 8], "e": [3, 41], "g": [1, 2, 8]}
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in shapes.items()]
    outs.append(helper.make_tensor_value_info("h", TensorProto.INT64, []))
    model = make_model(nodes, ins, outs, inits)
    res = wo.quantize_int4(model, exclude_nodes=["skip*"])
    reasons = {k["name"]: k["reason"] for k in res.kept_float}
    assert set(reasons) == {"three_d", "small_k", "act_act", "odd_table", "skipped"}
    assert "2-D" in reasons["three_d"]
    assert "K=8 is smaller than block_size 32" in reasons["small_k"]
    assert "computed at run time" in reasons["act_act"]
    assert "odd" in reasons["odd_table"]
    assert "exclude" in reasons["skipped"]
    assert [q["node"] for q in res.quantized] == ["ok"]
    onnx.checker.check_model(res.model)
    feed = {"x": f(1, 2, 64), "c2": f(1, 8, 8), "ids": np.array([0, 9, 4], np.int64)}
    run_model(res.model, feed)


def test_gptq_on_a_graph_input_and_bad_calibration_data():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(64, 8)).astype(np.float32)
    feeds = [{"x": rng.normal(size=(2, 3, 64)).astype(np.float32)} for _ in range(3)]
    res = wo.quantize_int4(_matmul_model(w), method="gptq", calib_feeds=iter(feeds))
    assert res.quantized[0]["method"] == "gptq" and res.model.graph.node[0].op_type == "MatMulNBits"
    with pytest.raises(UsageError, match="no rows"):
        wo.quantize_int4(_matmul_model(w), method="gptq", calib_feeds=[])
    feeds[1]["x"][0, 0, 0] = np.nan
    with pytest.raises(QconvError, match="inf/NaN"):
        wo.quantize_int4(_matmul_model(w), method="gptq", calib_feeds=feeds)


@pytest.mark.parametrize("block_size", [8, 24, 48, 0, 512, 32.0, True])
def test_bad_block_size_is_a_usage_error(block_size):
    with pytest.raises(UsageError, match="block_size must be a power of two from 16 to 256"):
        wo.quantize_int4(_matmul_model(np.ones((64, 8), np.float32)), block_size=block_size)


@pytest.mark.parametrize("kwargs,match", [({"method": "gptq"}, "calib_feeds"), ({"method": "awq"}, "method"),
                                          ({"accuracy_level": 5}, "accuracy_level")])
def test_bad_options_are_usage_errors(kwargs, match):
    with pytest.raises(UsageError, match=match):
        wo.quantize_int4(_matmul_model(np.ones((64, 8), np.float32)), **kwargs)


# ---------------------------------------------------------------- the tiny transformer sample

EMBEDDINGS = ("/token_emb/*", "/pos_emb/*")


def _batches(data: dict, size: int = 32):
    n = len(next(iter(data.values())))
    for start in range(0, n, size):
        yield {k: v[start:start + size] for k, v in data.items()}


@pytest.fixture(scope="module")
def transformer():
    model = prepare(onnx.load(TRANSFORMER / "model.onnx"), 13)[0]
    feed = dict(np.load(TRANSFORMER / "eval.npz"))
    calib = dict(np.load(TRANSFORMER / "calib.npz"))
    return model, feed, calib, run_model(model, feed)[0]


def _logits_mse(res, transformer) -> float:
    _, feed, _, ref = transformer
    return float(np.mean((run_model(res.model, feed)[0] - ref) ** 2))


def _weight_bytes(model) -> tuple[int, int]:
    """(bytes of the MatMulNBits weight inputs, bytes of the same weights in float32)."""
    inits = _inits(model)
    packed = fp32 = 0
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
            packed += sum(inits[i].nbytes for i in node.input[1:])
            fp32 += a["K"] * a["N"] * 4
    return packed, fp32


def test_transformer_rtn_block32(transformer):
    model, feed, _, ref = transformer
    res = wo.quantize_int4(model, block_size=32)
    onnx.checker.check_model(res.model)
    ops = [n.op_type for n in res.model.graph.node]
    assert ops.count("MatMulNBits") == 12 and ops.count("GatherBlockQuantized") == 2
    assert ops.count("MatMul") == 4  # attention scores and context: activation x activation
    assert {k["op_type"] for k in res.kept_float} == {"MatMul"}
    (y,) = run_model(res.model, feed)
    cosine = float(np.sum(y * ref) / (np.linalg.norm(y) * np.linalg.norm(ref)))
    assert cosine >= 0.98
    packed, fp32 = _weight_bytes(res.model)
    assert fp32 / packed >= 6.0
    names = {t.name for t in res.model.graph.initializer}
    assert not names & {q["weight"] for q in res.quantized}  # float weights removed
    assert wo.quantize_int4(model, block_size=32).model.SerializeToString() == res.model.SerializeToString()


def test_transformer_gptq_beats_rtn_and_is_deterministic(transformer):
    model, _, calib, _ = transformer
    # Embeddings are round-to-nearest either way; leaving them float isolates the MatMul method.
    rtn = wo.quantize_int4(model, block_size=32, exclude_nodes=EMBEDDINGS)
    gptq = wo.quantize_int4(model, block_size=32, method="gptq", calib_feeds=_batches(calib), exclude_nodes=EMBEDDINGS)
    assert [q["method"] for q in gptq.quantized] == ["gptq"] * 12
    assert _logits_mse(gptq, transformer) < 0.6 * _logits_mse(rtn, transformer)
    again = wo.quantize_int4(model, block_size=32, method="gptq", calib_feeds=_batches(calib),
                             exclude_nodes=EMBEDDINGS)
    assert again.model.SerializeToString() == gptq.model.SerializeToString()
