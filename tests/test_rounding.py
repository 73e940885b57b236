"""Learned weight rounding (--rounding gptq): the im2col inputs against onnxruntime's Conv, GPTQ with fixed scales,
the plan record, and the command line."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from qconv.adjust import rounding
from qconv.cli.main import cli
from qconv.numeric import qmath
from qconv.numeric import rounding as records
from qconv.numeric.gptq import gptq_fixed, gptq_fixed_stack
from tests.conftest import make_model, run_model


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


# ---- the inputs a Conv's Hessian is taken on

CONVS = [
    dict(c=4, m=6, k=(3, 3), group=1, strides=(1, 1), dil=(1, 1), pads=(1, 1, 1, 1)),
    dict(c=6, m=6, k=(3, 3), group=6, strides=(2, 2), dil=(1, 1), pads=(1, 1, 1, 1)),  # depthwise, strided
    dict(c=4, m=8, k=(3, 2), group=2, strides=(1, 2), dil=(2, 1), pads=(2, 0, 1, 1)),  # grouped, dilated, uneven pads
    dict(c=3, m=4, k=(3, 3), group=1, strides=(2, 2), dil=(1, 1), auto_pad="SAME_UPPER"),
    dict(c=3, m=4, k=(2, 2), group=1, strides=(2, 2), dil=(1, 1), auto_pad="SAME_LOWER"),
    dict(c=3, m=5, k=(3,), group=1, strides=(2,), dil=(1,), pads=(1, 2)),  # 1-D
]


def _conv(spec) -> tuple[onnx.ModelProto, np.ndarray]:
    rng = np.random.default_rng(0)
    w = rng.normal(0, 1, (spec["m"], spec["c"] // spec["group"], *spec["k"])).astype(np.float32)
    kw = {"group": spec["group"], "strides": list(spec["strides"]), "dilations": list(spec["dil"])}
    if "auto_pad" in spec:
        kw["auto_pad"] = spec["auto_pad"]
    else:
        kw["pads"] = list(spec["pads"])
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", **kw)
    spatial = ["H", "W"][:len(spec["k"])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", spec["c"], *spatial])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    return make_model([node], [x], [y], [numpy_helper.from_array(w, "w")]), w


@pytest.mark.parametrize("spec", CONVS)
def test_conv_patches_times_the_weight_are_the_conv(spec):
    """Every im2col patch, times the weight matrix of its group, is onnxruntime's Conv output at that position."""
    model, w = _conv(spec)
    size = (9, 11)[:len(spec["k"])]
    x = np.random.default_rng(1).normal(0, 1, (2, spec["c"], *size)).astype(np.float32)
    y = run_model(model, {"x": x})[0]
    node = model.graph.node[0]
    qp = qmath.weight_qparams(w, qmath.qtype("int8").restricted(), True, 0)
    t = rounding._target(node, w.shape, qp)
    k = t.features
    patches = np.concatenate([p.reshape(p.shape[0], t.groups, k) for p in rounding._conv_patches(x, t, 10 ** 9)])
    positions = y.shape[0] * int(np.prod(y.shape[2:]))
    assert patches.shape[0] == positions
    per = w.shape[0] // t.groups
    got = np.concatenate([patches[:, j] @ w[j * per:(j + 1) * per].reshape(per, -1).T for j in range(t.groups)], axis=1)
    want = np.moveaxis(y, 1, -1).reshape(-1, w.shape[0])  # (n, positions...) order
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_fewer_patches_are_spread_over_the_positions():
    model, w = _conv(CONVS[0])
    x = np.random.default_rng(1).normal(0, 1, (2, 4, 9, 11)).astype(np.float32)
    t = rounding._target(model.graph.node[0], w.shape, qmath.weight_qparams(w, qmath.qtype("int8").restricted(), True, 0))
    got = np.concatenate(list(rounding._conv_patches(x, t, 50)))
    assert got.shape == (50, 4, 3, 3)
    # the first patch is the top-left corner of the first image (padding above and left), the last the bottom-right
    # of the second
    assert np.all(got[0, :, 0, :] == 0) and np.all(got[0, :, :, 0] == 0)
    np.testing.assert_array_equal(got[-1, :, :2, :2], x[1, :, -2:, -2:])


# ---- GPTQ with the plan's scales

def _layer(seed=0, k=48, n=16, samples=400):
    rng = np.random.default_rng(seed)
    mix = rng.normal(0, 1, (k, k))
    x = rng.normal(0, 1, (samples, k)) @ mix  # correlated inputs: where rounding for the output pays
    w = rng.normal(0, 0.2, (k, n)).astype(np.float32)
    scale = (np.abs(w).max(axis=0) / 127).astype(np.float32)
    qp = qmath.QParams(scale, np.zeros(n, np.int8), qmath.qtype("int8").restricted())
    return x, w, qp


def _out_error(x, w, q, qp):
    return float(np.sum((x @ (w - qmath.dequantize(q, qp))) ** 2))


def test_gptq_with_fixed_scales_lowers_the_output_error_on_unseen_inputs_too():
    x, w, qp = _layer()
    fit, held = x[:300], x[300:]
    q = gptq_fixed(w, fit.T @ fit, qp)
    nearest = qmath.quantize(w, qp)
    assert q.dtype == np.int8 and q.min() >= -127 and q.max() <= 127
    assert np.abs(q.astype(int) - nearest).max() <= 2 and np.count_nonzero(q != nearest) > 0
    assert _out_error(fit, w, q, qp) < 0.5 * _out_error(fit, w, nearest, qp)
    assert _out_error(held, w, q, qp) < 0.8 * _out_error(held, w, nearest, qp)


def test_features_the_rows_never_fed_keep_nearest():
    x, w, qp = _layer()
    x[:, :5] = 0.0
    q = gptq_fixed(w, x.T @ x, qp)
    np.testing.assert_array_equal(q[:5], qmath.quantize(w[:5], qp))


@pytest.mark.parametrize("groups, per, kernel", [(48, 1, 3), (16, 2, 3), (8, 4, 5)])
def test_a_grouped_conv_rounds_every_group_at_once_as_one_by_one(groups, per, kernel):
    """The batched GPTQ of a depthwise / grouped layer (one product per step over every group) gives the integers
    and errors the group-by-group loop gives, dead features and a group the rows never fed included."""
    rng = np.random.default_rng(groups)
    w = rng.normal(size=(groups * per, 1 if per == 1 else per, kernel, kernel)).astype(np.float32)
    x = rng.normal(size=(groups, 400, w[0].size)) * rng.random((groups, 1, w[0].size)) * 3
    x[1, :, 2] = 0.0  # a feature group 1 never sees
    x[2] = 0.0  # a group the rows never fed: nearest
    h = np.matmul(x.transpose(0, 2, 1), x)
    qp = qmath.weight_qparams(w, qmath.qtype("int8"), True, 0)
    nearest = qmath.quantize(w, qp)
    stacked, e0, e1 = rounding._round_stack(w, nearest, qp, h, groups)
    loop, f0, f1 = nearest.copy(), 0.0, 0.0
    for j in range(groups):
        cols = slice(j * per, (j + 1) * per)
        q, a, b = rounding._round_matrix(w[cols].reshape(per, -1).T, nearest[cols].reshape(per, -1).T,
                                         rounding._columns(qp, cols, per), h[j])
        loop[cols] = q.T.reshape(loop[cols].shape)
        f0, f1 = f0 + a, f1 + b
    np.testing.assert_array_equal(stacked, loop)
    assert e0 == pytest.approx(f0, rel=1e-12) and e1 == pytest.approx(f1, rel=1e-12) and e1 < e0
    np.testing.assert_array_equal(stacked[2 * per:3 * per], nearest[2 * per:3 * per])
    assert np.count_nonzero(stacked != nearest) > 0


def test_the_stacked_gptq_refuses_more_features_than_one_lazy_batch():
    with pytest.raises(ValueError, match="K <= 128"):
        gptq_fixed_stack(np.zeros((2, 129, 1)), np.zeros((2, 129, 129)),
                         qmath.QParams(np.ones((2, 1), np.float32), np.zeros((2, 1), np.int8), qmath.qtype("int8")))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(-255, 255), min_size=1, max_size=300), st.integers(1, 3))
def test_a_rounding_record_round_trips(values, cols):
    d = np.array(values * cols, dtype=np.int64).reshape(cols, -1)
    text = records.pack(d)
    assert text.startswith(records.PREFIX)
    np.testing.assert_array_equal(records.unpack(text, d.shape), d)
    with pytest.raises(ValueError, match="rounding record of"):
        records.unpack(text, (d.size + 1,))


# ---- the command line and the plan

def _cnn(head: bool = True) -> onnx.ModelProto:
    """x[N,3,12,12] -> Conv 3x3 (8) -> Relu -> depthwise 3x3 -> Relu -> Conv 1x1 (6) [-> GAP -> Flatten -> Gemm(4)]."""
    rng = np.random.default_rng(7)
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in [
        ("w1", rng.normal(0, 0.4, (8, 3, 3, 3))), ("b1", rng.normal(0, 0.1, 8)),
        ("w2", rng.normal(0, 0.5, (8, 1, 3, 3))), ("b2", rng.normal(0, 0.1, 8)),
        ("w3", rng.normal(0, 0.4, (6, 8, 1, 1))), ("b3", rng.normal(0, 0.1, 6)),
        ("wf", rng.normal(0, 0.5, (4, 6))), ("bf", rng.normal(0, 0.1, 4))]]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], group=8, name="dw"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["c3" if head else "y"], name="pw"),
    ]
    if head:
        nodes += [helper.make_node("GlobalAveragePool", ["c3"], ["gap"], name="gap"),
                  helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
                  helper.make_node("Gemm", ["flat", "wf", "bf"], ["y"], transB=1, name="fc")]
    else:
        inits = inits[:-2]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 12, 12])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4] if head else ["N", 6, 12, 12])
    return make_model(nodes, [x], [y], inits, opset=13)


@pytest.fixture
def cnn(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(_cnn(), src)
    rng = np.random.default_rng(2)
    base = rng.uniform(-1, 1, (64, 3, 1, 1))  # correlated channels, smooth images: inputs whose errors do not average out
    data = (base + 0.3 * rng.normal(0, 1, (64, 3, 12, 12))).astype(np.float32)
    np.save(tmp_path / "calib.npy", data[:32])
    np.save(tmp_path / "held.npy", data[32:])
    return src, tmp_path / "calib.npy", data[32:]


def _weights(path) -> dict[str, np.ndarray]:
    m = onnx.load(path)
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer if t.data_type == TensorProto.INT8 and t.name.endswith("_quantized")}


def test_learned_rounding_moves_integers_keeps_scales_and_the_plan_reproduces_it(tmp_path, cnn):
    src, calib, held = cnn
    common = ["--data", calib, "--batch-size", 4, "--bias-correction", "off", "-q"]
    assert invoke("quantize", src, *common, "-o", tmp_path / "near.onnx").exit_code == 0
    r = invoke("quantize", src, *common, "--rounding", "gptq", "-o", tmp_path / "lr.onnx", "--write-plan", tmp_path / "p.json")
    assert r.exit_code == 0, r.output
    near, lr = _weights(tmp_path / "near.onnx"), _weights(tmp_path / "lr.onnx")
    assert near.keys() == lr.keys() and len(near) == 4  # the same graph: 3 Conv and the Gemm weights
    moved = {k: int(np.count_nonzero(near[k] != lr[k])) for k in near}
    assert sum(moved.values()) > 0 and all(np.abs(near[k].astype(int) - lr[k]).max() <= 3 for k in near)
    a, b = onnx.load(tmp_path / "near.onnx"), onnx.load(tmp_path / "lr.onnx")
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    scales = lambda m: {t.name: numpy_helper.to_array(t).tobytes() for t in m.graph.initializer if t.name.endswith("_scale")}  # noqa: E731
    assert scales(a) == scales(b)
    plan = json.loads((tmp_path / "p.json").read_text())
    assert plan["config"]["rounding"] == "gptq" and plan["source"]["rounding"]["layers"] == 4
    assert sum("rounding" in t for t in plan["tensors"].values()) == plan["source"]["rounding"]["layers_changed"] > 0
    # --plan applies the recorded integers without data: the same model, byte for byte
    r = invoke("quantize", src, "--plan", tmp_path / "p.json", "-o", tmp_path / "again.onnx", "-q")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "again.onnx").read_bytes() == (tmp_path / "lr.onnx").read_bytes()
    # and a second run on the same data gives the same bytes
    assert invoke("quantize", src, *common, "--rounding", "gptq", "-o", tmp_path / "lr2.onnx").exit_code == 0
    assert (tmp_path / "lr2.onnx").read_bytes() == (tmp_path / "lr.onnx").read_bytes()


def test_learned_rounding_keeps_the_outputs_closer_on_rows_it_never_saw(tmp_path):
    """One dense 3x3 Conv over 8 correlated channels with 16-bit activations, so that the weights' rounding is the
    error that is left: learned rounding lowers it on rows it never saw."""
    rng = np.random.default_rng(4)
    w = rng.normal(0, 0.3, (8, 8, 3, 3)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], name="conv")
    model = make_model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 12, 12])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 12, 12])], [numpy_helper.from_array(w, "w")], opset=13)
    src = tmp_path / "conv.onnx"
    onnx.save(model, src)
    mix = rng.normal(0, 1, (8, 8))  # channels that move together, smooth in space: errors that do not average out
    base = np.einsum("nchw,cd->ndhw", rng.normal(0, 1, (64, 8, 12, 12)), mix)
    data = (base + np.roll(base, 1, axis=2) + np.roll(base, 1, axis=3)).astype(np.float32)
    np.save(tmp_path / "calib.npy", data[:32])
    held = data[32:]
    common = ["--data", tmp_path / "calib.npy", "--batch-size", 4, "--mode", "a16w8", "--bias-correction", "off", "-q"]
    for name, extra in (("near", []), ("lr", ["--rounding", "gptq"])):
        assert invoke("quantize", src, *common, *extra, "-o", tmp_path / f"{name}.onnx").exit_code == 0
    ref = run_model(src, {"x": held})[0]
    err = {n: float(np.mean((run_model(tmp_path / f"{n}.onnx", {"x": held})[0] - ref) ** 2)) for n in ("near", "lr")}
    assert err["lr"] < 0.6 * err["near"], err


def test_the_report_says_what_learned_rounding_did(tmp_path, cnn):
    src, calib, _ = cnn
    r = invoke("quantize", src, "--data", calib, "--rounding", "gptq", "--no-latency", "-o", tmp_path / "q.onnx", "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output[r.output.index("{"):])
    lr = rep["rounding"]
    assert lr["method"] == "gptq" and lr["rows"] == 32 and lr["layers"] == 4 and 0 < lr["weights_moved"] < lr["weights"]
    assert 0 < lr["median_error_ratio"] < 1
    r = invoke("quantize", src, "--data", calib, "--no-latency", "-o", tmp_path / "n.onnx", "--json")
    assert json.loads(r.output[r.output.index("{"):])["rounding"] is None


def test_learned_rounding_refuses_what_it_cannot_do(tmp_path, cnn):
    src, calib, _ = cnn
    c = tmp_path / "c.json"
    assert invoke("calibrate", src, "--data", calib, "-o", c, "-q").exit_code == 0
    r = invoke("quantize", src, "--calib", c, "--rounding", "gptq", "-o", tmp_path / "q.onnx")
    assert r.exit_code == 2
    assert "error: --rounding gptq rounds each weight for its layer's inputs on the calibration rows: give --data DATA in place of --calib" in r.output
    r = invoke("quantize", src, "--mode", "dynamic", "--rounding", "gptq", "-o", tmp_path / "q.onnx")
    assert r.exit_code == 2 and "--rounding gptq rounds the int8 weights of the static modes (int8, a16w8); --mode dynamic rounds to nearest" in r.output
    r = invoke("quantize", src, "--mode", "int4", "--rounding", "gptq", "-o", tmp_path / "q.onnx")
    assert r.exit_code == 2 and "--mode int4 has its own --int4-method" in r.output
    assert not (tmp_path / "q.onnx").exists()


def test_a_damaged_rounding_record_is_a_plan_error(tmp_path, cnn):
    src, calib, _ = cnn
    assert invoke("plan", src, "--data", calib, "--rounding", "gptq", "-o", tmp_path / "p.json", "-q").exit_code == 0
    plan = json.loads((tmp_path / "p.json").read_text())
    name = next(k for k, t in plan["tensors"].items() if "rounding" in t)
    plan["tensors"][name]["rounding"] = records.pack(np.zeros(3, np.int64))
    (tmp_path / "bad.json").write_text(json.dumps(plan))
    r = invoke("quantize", src, "--plan", tmp_path / "bad.json", "-o", tmp_path / "q.onnx")
    assert r.exit_code != 0 and "Traceback" not in r.output and "rounding record of 3 weights" in r.output
    assert not (tmp_path / "q.onnx").exists()
