"""int8 weights clear of the 16-bit saturation of x86 CPUs without VNNI: the scale rule, and every layout held to
onnxruntime on the machine the tests run on (its fused int8 kernels against the same model's exact arithmetic)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from onnx import TensorProto, helper, numpy_helper

from qconv.cli.main import cli
from qconv.numeric import pairs, qmath
from tests.conftest import make_model


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _rule(q: np.ndarray) -> list[bool]:
    """Per row: a pair (2i, 2i+1) of one sign whose magnitudes add past LIMIT (an odd row's last value pairs with 0)."""
    out = []
    for row in q.tolist():
        row = row + [0] * (len(row) % 2)
        out.append(any(a * b > 0 and abs(a) + abs(b) > pairs.LIMIT for a, b in zip(row[0::2], row[1::2])))
    return out


@settings(max_examples=200, deadline=None)
@given(arrays(np.int64, st.tuples(st.integers(1, 5), st.integers(1, 21)), elements=st.integers(-300, 300)), st.booleans())
def test_violations_are_the_same_sign_pairs_past_the_limit(q, as_float):
    """The float32 shortcut (|q0 + q1|, where every |q| <= LIMIT) and the general path, against the rule pair by pair."""
    assert pairs.violations(q.astype(np.float32) if as_float else q).tolist() == _rule(q)
    small = np.clip(q, -pairs.LIMIT, pairs.LIMIT)
    assert pairs.violations(small.astype(np.float32) if as_float else small).tolist() == _rule(small)


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 33)), elements=st.floats(-4, 4, width=32)),
       st.booleans())
def test_safe_scales_keep_every_same_sign_pair_within_the_limit(w, per_channel):
    qt = qmath.qtype("int8").restricted()
    qp = qmath.weight_qparams(w, qt, True, 0 if per_channel else None)
    scale = pairs.safe_scale(w, qp.scale, per_channel)
    assert np.all(scale >= qp.scale)
    rows = scale.reshape(-1, 1) if per_channel else scale
    q = np.clip(np.rint(w / rows), -127, 127)
    assert not pairs.violations(q).any()
    assert np.all(scale <= 2.0 * np.maximum(qp.scale, np.float32(1e-30)) * (1 + 1e-5))  # one bit at most


def test_a_channel_whose_large_weight_pairs_with_a_small_one_keeps_its_scale():
    w = np.array([[1.0, 0.01, 0.5, -0.9], [1.0, 0.9, 0.0, 0.0], [1.0, -0.95, 0.2, 0.1]], np.float32)
    qp = qmath.weight_qparams(w, qmath.qtype("int8").restricted(), True, 0)
    scale = pairs.safe_scale(w, qp.scale, True)
    assert scale[0] == qp.scale[0] and scale[2] == qp.scale[2]  # (1.0, 0.01), (0.5, -0.9): nothing to widen
    assert scale[1] == pytest.approx(1.9 / 128, rel=1e-6)  # the smallest that clears: 67 + 61 = 128
    assert np.rint(w[1, :2] / scale[1]).sum() == 128


def test_layouts_put_pairs_in_the_kernels_k_order():
    w = np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2)  # [M, C, kh, kw]
    rows = pairs.channels(w, "conv")
    np.testing.assert_array_equal(rows[0, :6], [w[0, 0, 0, 0], w[0, 1, 0, 0], w[0, 2, 0, 0], w[0, 0, 0, 1], w[0, 1, 0, 1], w[0, 2, 0, 1]])
    assert pairs.channels(np.zeros((8, 1, 3, 3)), "conv", groups=8) is None  # depthwise: int32 sums
    assert pairs.channels(np.zeros((16, 1, 3, 3)), "conv", groups=8).shape == (16, 9)  # a channel multiplier: a GEMM
    assert pairs.channels(np.zeros((4, 1, 3, 3)), "conv", groups=1).shape == (4, 9)  # a grayscale stem
    m = np.arange(12, dtype=np.float32).reshape(4, 3)  # MatMul [K, N]: per column
    np.testing.assert_array_equal(pairs.channels(m, "kn")[1], m[:, 1])
    np.testing.assert_array_equal(pairs.channels(m.T, "nk")[1], m[:, 1])


# ---- held to onnxruntime

def _layer(kind: str) -> onnx.ModelProto:
    """One layer whose weights are all positive: every adjacent pair in the kernel's K order is large and of one sign."""
    rng = np.random.default_rng(0)
    if kind == "matmul":
        w = rng.uniform(0.5, 1.0, (64, 16))
        node = helper.make_node("MatMul", ["x", "w"], ["y"], name="layer")
        shape, out = [4, 64], [4, 16]
    elif kind == "gemm_transB":
        w = rng.uniform(0.5, 1.0, (16, 64))
        node = helper.make_node("Gemm", ["x", "w"], ["y"], transB=1, name="layer")
        shape, out = [4, 64], [4, 16]
    else:
        c, g, m = {"conv_c3": (3, 1, 8), "conv_c1": (1, 1, 8), "conv_grouped": (8, 2, 8), "conv_c16": (16, 1, 8)}[kind]
        w = rng.uniform(0.5, 1.0, (m, c // g, 3, 3))
        node = helper.make_node("Conv", ["x", "w"], ["y"], group=g, pads=[1, 1, 1, 1], name="layer")
        shape, out = [1, c, 6, 6], [1, m, 6, 6]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, out)
    return make_model([node], [x], [y], [numpy_helper.from_array(w.astype(np.float32), "w")], opset=13)


def _run(path, x, fused: bool) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    if not fused:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("kind", ["matmul", "gemm_transB", "conv_c3", "conv_c1", "conv_grouped", "conv_c16"])
def test_int8_kernels_compute_what_the_model_says(tmp_path, kind):
    """Activations near the top of their uint8 range times all-positive weights: the sums the AVX2 kernel would
    saturate. qconv's model runs in onnxruntime's fused int8 kernels exactly as its QDQ arithmetic says."""
    model = _layer(kind)
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    rng = np.random.default_rng(1)
    data = rng.uniform(0.9, 1.0, [8] + shape[1:]).astype(np.float32)
    data[0] = 0.0  # the range starts at 0: activations near 1 take uint8 values near 255
    np.save(tmp_path / "x.npy", data)
    r = invoke("quantize", src, "--data", tmp_path / "x.npy", "--bias-correction", "off", "-o", tmp_path / "q.onnx",
               "--write-plan", tmp_path / "p.json", "-q")
    assert r.exit_code == 0, r.output
    plan = json.loads((tmp_path / "p.json").read_text())
    assert "widened so no two adjacent int8 weights can saturate" in plan["tensors"]["w"]["origin"]
    x = data[1:2] if shape[0] == 1 else data[1:5].reshape(shape)
    fused, exact = _run(tmp_path / "q.onnx", x, True), _run(tmp_path / "q.onnx", x, False)
    np.testing.assert_allclose(fused, exact, rtol=2e-3, atol=2e-3 * float(np.abs(exact).max()))


def test_allow_saturation_keeps_the_ranges_scales(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(_layer("matmul"), src)
    np.save(tmp_path / "x.npy", np.random.default_rng(1).uniform(0.0, 1.0, (8, 64)).astype(np.float32))
    for flag, name in (([], "safe"), (["--allow-saturation"], "plain")):
        r = invoke("plan", src, "--data", tmp_path / "x.npy", "-o", tmp_path / f"{name}.json", "-q", *flag)
        assert r.exit_code == 0, r.output
    safe, plain = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("safe", "plain"))
    w = numpy_helper.to_array(onnx.load(src).graph.initializer[0])
    np.testing.assert_allclose(plain["tensors"]["w"]["scale"], np.abs(w).max(axis=0) / 127, rtol=1e-6)
    assert all(a >= b for a, b in zip(safe["tensors"]["w"]["scale"], plain["tensors"]["w"]["scale"]))
    assert plain["config"]["saturation_safe"] is False and "saturation_safe" not in safe["config"]


def test_sixteen_bit_activations_keep_the_ranges_scales(tmp_path):
    """a16w8 runs in float in onnxruntime (no 16-bit integer kernels): nothing saturates, nothing is widened."""
    src = tmp_path / "m.onnx"
    onnx.save(_layer("matmul"), src)
    np.save(tmp_path / "x.npy", np.random.default_rng(1).uniform(0.0, 1.0, (8, 64)).astype(np.float32))
    assert invoke("plan", src, "--data", tmp_path / "x.npy", "--mode", "a16w8", "-o", tmp_path / "p.json", "-q").exit_code == 0
    t = json.loads((tmp_path / "p.json").read_text())["tensors"]["w"]
    w = numpy_helper.to_array(onnx.load(src).graph.initializer[0])
    np.testing.assert_allclose(t["scale"], np.abs(w).max(axis=0) / 127, rtol=1e-6)
    assert "widened" not in t["origin"]


def test_learned_rounding_never_steps_a_pair_past_the_limit(tmp_path):
    """GPTQ moves integers by a step or two: a channel where that would make a pair saturate keeps nearest rounding."""
    src = tmp_path / "m.onnx"
    onnx.save(_layer("conv_c16"), src)
    rng = np.random.default_rng(3)
    np.save(tmp_path / "x.npy", (rng.uniform(0.0, 1.0, (16, 1, 1, 1)) * rng.uniform(0.5, 1.0, (16, 16, 6, 6))).astype(np.float32))
    r = invoke("quantize", src, "--data", tmp_path / "x.npy", "--rounding", "gptq", "--bias-correction", "off", "-o", tmp_path / "q.onnx",
               "--write-plan", tmp_path / "p.json", "-q")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "p.json").read_text())["source"]["rounding"]["layers_changed"] == 1
    q = next(numpy_helper.to_array(t) for t in onnx.load(tmp_path / "q.onnx").graph.initializer if t.name.startswith("w_quantized"))
    assert not pairs.violations(pairs.channels(q, "conv")).any()


@pytest.mark.parametrize("per_tensor", [False, True])
def test_an_lstm_with_all_positive_weights_keeps_its_outputs(tmp_path, per_tensor):
    """DynamicQuantizeLSTM runs the same u8 x s8 kernel along K: with the weights' own scales its outputs read 13 dB
    on an AVX2 EPYC; widened, 71 dB (and so on any CPU)."""
    rng = np.random.default_rng(0)
    hidden, width = 16, 32
    w = (rng.uniform(0.5, 1.0, (1, 4 * hidden, width)) * 0.05).astype(np.float32)
    r = (rng.uniform(0.5, 1.0, (1, 4 * hidden, hidden)) * 0.05).astype(np.float32)
    node = helper.make_node("LSTM", ["x", "W", "R"], ["Y", "Yh"], hidden_size=hidden, name="lstm")
    model = make_model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 2, width])],
                       [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None), helper.make_tensor_value_info("Yh", TensorProto.FLOAT, None)],
                       [numpy_helper.from_array(w, "W"), numpy_helper.from_array(r, "R")], opset=13)
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    x = rng.uniform(0.9, 1.0, (5, 2, width)).astype(np.float32)
    x[0, 0, 0] = 0.0
    np.save(tmp_path / "x.npy", x)
    res = invoke("quantize", src, "--mode", "dynamic", "-o", tmp_path / "q.onnx", "--eval-data", tmp_path / "x.npy", "--no-latency",
                 "--json", *(["--per-tensor"] if per_tensor else []))
    assert res.exit_code == 0, res.output
    report = json.loads(res.output[res.output.index("{"):])
    assert report["node_summary"]["by_op"]["LSTM"]["quantized"] == 1
    assert min(o["sqnr_db"] for o in report["outputs"].values()) > 40, report["outputs"]


def test_a_depthwise_conv_keeps_its_ranges_scales(tmp_path):
    """Depthwise kernels sum in 32 bits: nothing saturates, each channel keeps the scale its own range gives."""
    rng = np.random.default_rng(0)
    w = rng.uniform(0.5, 1.0, (8, 1, 3, 3)).astype(np.float32) * rng.uniform(0.1, 2.0, (8, 1, 1, 1)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], group=8, pads=[1, 1, 1, 1], name="dw")
    model = make_model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 6, 6])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 6, 6])], [numpy_helper.from_array(w, "w")], opset=13)
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    np.save(tmp_path / "x.npy", rng.uniform(0.0, 1.0, (4, 8, 6, 6)).astype(np.float32))
    assert invoke("plan", src, "--data", tmp_path / "x.npy", "-o", tmp_path / "p.json", "-q").exit_code == 0
    t = json.loads((tmp_path / "p.json").read_text())["tensors"]["w"]
    np.testing.assert_allclose(t["scale"], np.abs(w).reshape(8, -1).max(axis=1) / 127, rtol=1e-6)
    assert "widened" not in t["origin"]
