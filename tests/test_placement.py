"""Placement for speed: each int8 region pattern is asserted in the graph onnxruntime actually runs (its QDQ
fusions), numerics are compared through onnxruntime, and the per-node profile names real nodes."""

from __future__ import annotations

import json
import zlib

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from qconv.cli.main import cli
from tests.conftest import make_model, optimized_ops, run_model

RNG = np.random.default_rng(0)


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def w(name, *shape, scale=0.3):
    """A weight seeded by its name: every call builds the same model."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    return numpy_helper.from_array(rng.normal(0, scale, shape).astype(np.float32), name)


def c(name, value):
    return numpy_helper.from_array(np.asarray(value, np.float32), name)


def conv(x, wname, y, name, **kw):
    return helper.make_node("Conv", [x, wname], [y], name=name, pads=[1, 1, 1, 1], **kw)


def model_of(nodes, inits, out_shape=("N", 8, 8, 8), in_ch=3):
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", in_ch, 8, 8])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out_shape))], inits, opset=13)


def hard_swish():
    """conv -> x * clip(x + 3, 0, 6) / 6 (how PaddlePaddle exports hard-swish) -> conv."""
    nodes = [conv("x", "w1", "a", "conv1"), helper.make_node("Add", ["a", "three"], ["b"], name="add3"),
             helper.make_node("Clip", ["b", "zero", "six"], ["cl"], name="clip"),
             helper.make_node("Div", ["cl", "six"], ["d"], name="div6"), helper.make_node("Mul", ["a", "d"], ["h"], name="hswish"),
             conv("h", "w2", "y", "conv2")]
    return model_of(nodes, [w("w1", 8, 3, 3, 3), w("w2", 8, 8, 3, 3), c("three", 3.0), c("zero", 0.0), c("six", 6.0)])


def hard_swish_op():
    """conv -> HardSwish (the opset-14 op, as PyTorch exports MobileNetV3 / PP-LCNet) -> conv."""
    nodes = [conv("x", "w1", "a", "conv1"), helper.make_node("HardSwish", ["a"], ["h"], name="hswish"), conv("h", "w2", "y", "conv2")]
    m = model_of(nodes, [w("w1", 8, 3, 3, 3), w("w2", 8, 8, 3, 3)])
    m.opset_import[0].version = 14
    return m


def hard_sigmoid_excite():
    """MobileNetV3's squeeze-excite: conv -> GlobalAveragePool -> conv(1x1) -> HardSigmoid -> Mul -> conv."""
    nodes = [conv("x", "w1", "a", "conv1"), helper.make_node("GlobalAveragePool", ["a"], ["g"], name="gap"),
             helper.make_node("Conv", ["g", "w2"], ["e"], name="se_conv"),
             helper.make_node("HardSigmoid", ["e"], ["s"], alpha=1.0 / 6.0, beta=0.5, name="hsig"),
             helper.make_node("Mul", ["a", "s"], ["m"], name="se_mul"), conv("m", "w3", "y", "conv3")]
    return model_of(nodes, [w("w1", 8, 3, 3, 3), w("w2", 8, 8, 1, 1), w("w3", 8, 8, 3, 3)])


def residual():
    nodes = [conv("x", "w1", "a", "conv1"), helper.make_node("Relu", ["a"], ["r"], name="relu1"),
             conv("r", "w2", "b", "conv2"), helper.make_node("Add", ["r", "b"], ["s"], name="res_add"),
             conv("s", "w3", "y", "conv3")]
    return model_of(nodes, [w("w1", 8, 3, 3, 3), w("w2", 8, 8, 3, 3), w("w3", 8, 8, 3, 3)])


def squeeze_excite():
    """conv -> GlobalAveragePool -> conv(1x1) -> Sigmoid -> Mul with the feature map -> conv."""
    nodes = [conv("x", "w1", "a", "conv1"), helper.make_node("GlobalAveragePool", ["a"], ["g"], name="gap"),
             helper.make_node("Conv", ["g", "w2"], ["e"], name="se_conv"), helper.make_node("Sigmoid", ["e"], ["s"], name="sig"),
             helper.make_node("Mul", ["a", "s"], ["m"], name="se_mul"), conv("m", "w3", "y", "conv3")]
    return model_of(nodes, [w("w1", 8, 3, 3, 3), w("w2", 8, 8, 1, 1), w("w3", 8, 8, 3, 3)])


def concat_branches():
    nodes = [conv("x", "w1", "a", "conv1"), conv("x", "w2", "b", "conv2"),
             helper.make_node("Concat", ["a", "b"], ["cat"], axis=1, name="cat"), conv("cat", "w3", "y", "conv3")]
    return model_of(nodes, [w("w1", 4, 3, 3, 3), w("w2", 4, 3, 3, 3), w("w3", 8, 8, 3, 3)])


def leaky_and_pool():
    nodes = [conv("x", "w1", "a", "conv1"), helper.make_node("LeakyRelu", ["a"], ["l"], alpha=0.1, name="leaky"),
             helper.make_node("AveragePool", ["l"], ["p"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1], name="avg"),
             conv("p", "w2", "y", "conv2")]
    return model_of(nodes, [w("w1", 8, 3, 3, 3), w("w2", 8, 8, 3, 3)])


def movement():
    """conv -> Transpose -> Transpose back -> Reshape (identity shape) -> conv: no conversion between the convs."""
    nodes = [conv("x", "w1", "a", "conv1"), helper.make_node("Transpose", ["a"], ["t"], perm=[0, 2, 3, 1], name="t1"),
             helper.make_node("Transpose", ["t"], ["u"], perm=[0, 3, 1, 2], name="t2"),
             helper.make_node("Reshape", ["u", "shape"], ["v"], name="reshape"), conv("v", "w2", "y", "conv2")]
    return model_of(nodes, [w("w1", 8, 3, 3, 3), w("w2", 8, 8, 3, 3),
                            numpy_helper.from_array(np.array([0, 8, 8, 8], np.int64), "shape")])


# (model, fused ops that must run, float compute ops that must not be left, max Q+DQ left in the optimized graph).
# The last Conv writes a graph output, which stays float: it runs as a float Conv on dequantized inputs, so the
# Q+DQ left are the input's QuantizeLinear and that Conv's two DequantizeLinear (activation and weight).
PATTERNS = {
    # The multiplication by the constant 1/6 (or HardSigmoid's alpha) runs no kernel: its input's int8 values are
    # read with the scale times the constant, so one QLinearMul is left (x * gate).
    "hard-swish": (hard_swish, {"QLinearConv": 1, "QLinearAdd": 1, "QLinearMul": 1}, {"Div", "Mul", "Add", "Clip"}, 3),
    "HardSwish op": (hard_swish_op, {"QLinearConv": 1, "QLinearAdd": 1, "QLinearMul": 1}, {"HardSwish", "Mul", "Add", "Clip"}, 3),
    "HardSigmoid squeeze-excite": (hard_sigmoid_excite, {"QLinearConv": 2, "QLinearGlobalAveragePool": 1, "QLinearAdd": 1,
                                                         "QLinearMul": 1}, {"HardSigmoid", "Mul", "Add", "Clip"}, 3),
    "residual Add": (residual, {"QLinearConv": 2, "QLinearAdd": 1}, {"Add", "Relu"}, 3),
    "squeeze-excite": (squeeze_excite, {"QLinearConv": 2, "QLinearGlobalAveragePool": 1, "QLinearSigmoid": 1, "QLinearMul": 1},
                       {"Sigmoid", "Mul", "GlobalAveragePool"}, 3),
    "Concat": (concat_branches, {"QLinearConv": 2, "QLinearConcat": 1}, {"Concat"}, 3),
    "LeakyRelu + AveragePool": (leaky_and_pool, {"QLinearConv": 1, "QLinearLeakyRelu": 1, "QLinearAveragePool": 1},
                                {"LeakyRelu", "AveragePool"}, 3),
    "data movement": (movement, {"QLinearConv": 1}, {"Transpose"}, 3),
}


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_region_fuses_in_onnxruntime(name, tmp_path):
    make, fused, no_float, max_qdq = PATTERNS[name]
    m = make()
    onnx.save(m, tmp_path / "m.onnx")
    x = RNG.normal(0, 1, (16, 3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "d.npy", x)
    r = invoke("quantize", tmp_path / "m.onnx", "--data", tmp_path / "d.npy", "-o", tmp_path / "q.onnx", "-q", "--batch-size", "8")
    assert r.exit_code == 0, r.output
    ops = optimized_ops(tmp_path / "q.onnx", tmp_path)
    for op, count in fused.items():
        assert ops.get(op, 0) == count, (op, ops)
    assert not (no_float & set(ops)), ops
    assert ops.get("QuantizeLinear", 0) + ops.get("DequantizeLinear", 0) <= max_qdq, ops
    ref, got = run_model(m, {"x": x})[0], run_model(tmp_path / "q.onnx", {"x": x})[0]
    assert np.corrcoef(ref.ravel(), got.ravel())[0, 1] > 0.995


def test_division_by_a_constant_becomes_a_multiplication():
    from qconv.graph.intake import prepare

    m, notes = prepare(hard_swish(), 13)
    assert not any(n.op_type == "Div" for n in m.graph.node)
    assert "1 divisions by a constant rewritten as multiplications by its reciprocal" in notes
    x = RNG.normal(0, 1, (2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run_model(m, {"x": x})[0], run_model(hard_swish(), {"x": x})[0], rtol=1e-5, atol=1e-5)


def pooled_model():
    """A large uint8 MaxPool between two convs: onnxruntime's int8 MaxPool is far slower than its float one."""
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("MaxPool", ["a"], ["p"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1], name="pool"),
             helper.make_node("Conv", ["p", "w2"], ["y"], pads=[1, 1, 1, 1], name="conv2")]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 64, 64])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16, 64, 64])],
                      [w("w1", 32, 3, 3, 3), w("w2", 16, 32, 3, 3)], opset=13)


def test_profile_names_nodes_and_speed_fallback_records_its_choice(tmp_path):
    onnx.save(pooled_model(), tmp_path / "m.onnx")
    np.save(tmp_path / "d.npy", RNG.normal(0, 1, (8, 3, 64, 64)).astype(np.float32))
    r = invoke("quantize", tmp_path / "m.onnx", "--data", tmp_path / "d.npy", "-o", tmp_path / "q.onnx", "--batch-size", "4",
               "--threads", "1", "--speed-fallback", "--json", "--layer-samples", "0")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    prof = report["profile"]
    names = {row["node"] for row in prof["float_top"]} | {row["node"] for row in prof["quantized_top"]}
    assert {"conv1", "conv2"} <= names and prof["float_us"] > 0 and prof["quantized_us"] > 0
    fb = report["speed_fallback"]
    assert set(fb) >= {"tried", "taken", "ratio", "ratio_low", "ratio_high", "reason"}
    # Which nodes the profile finds slower is this CPU's timing (uint8 MaxPool usually is); the record must name
    # quantized nodes, and a taken fallback must be the plan's float overrides for exactly those.
    assert fb["tried"] and set(fb["tried"]) <= {"conv1", "pool", "conv2"}, fb
    # Taken or not (this CPU's A/B timing decides), the plan says so: float overrides for exactly the tried nodes
    # when taken, none when not.
    codes = {n["name"]: n["code"] for n in report["nodes"]}
    expected = {node: {"precision": "float"} for node in fb["tried"]} if fb["taken"] else {}
    assert (report["overrides"] or {}).get("nodes", {}) == expected  # no overrides at all when not taken
    assert all((codes[node] == "override") == fb["taken"] for node in fb["tried"])
    assert fb["reason"] == "measured faster with these nodes float" if fb["taken"] else fb["reason"].startswith("not measurably faster")
    x = RNG.normal(0, 1, (2, 3, 64, 64)).astype(np.float32)
    ref, got = run_model(tmp_path / "m.onnx", {"x": x})[0], run_model(tmp_path / "q.onnx", {"x": x})[0]
    assert np.corrcoef(ref.ravel(), got.ravel())[0, 1] > 0.995


def test_speed_fallback_needs_measurements(conv_path, conv_data, tmp_path):
    r = invoke("quantize", conv_path, "--data", conv_data, "-o", tmp_path / "q.onnx", "--speed-fallback", "--no-latency")
    assert r.exit_code == 2 and "--speed-fallback measures the model" in r.output


def scaled(value, then_relu=False):
    """conv -> LeakyRelu -> Mul(value) [-> Relu] -> conv (the activation keeps intake from folding the Mul into conv1)."""
    nodes = [conv("x", "w1", "c1", "conv1"), helper.make_node("LeakyRelu", ["c1"], ["a"], alpha=0.1, name="leaky"),
             helper.make_node("Mul", ["a", "k"], ["m"], name="scale")]
    src = "m"
    if then_relu:
        nodes.append(helper.make_node("Relu", ["m"], ["r"], name="relu"))
        src = "r"
    nodes.append(conv(src, "w2", "y", "conv2"))
    return model_of(nodes, [w("w1", 8, 3, 3, 3), w("w2", 8, 8, 3, 3), c("k", value)])


@pytest.mark.parametrize("then_relu", [False, True])
def test_a_mul_by_a_positive_constant_reads_its_input_with_a_scaled_scale(then_relu, tmp_path):
    m = scaled(0.37, then_relu)
    onnx.save(m, tmp_path / "m.onnx")
    x = RNG.normal(0, 1, (16, 3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "d.npy", x)
    for fmt in ("qdq", "qoperator"):
        out = tmp_path / f"{fmt}.onnx"
        r = invoke("quantize", tmp_path / "m.onnx", "--data", tmp_path / "d.npy", "-o", out, "-q", "--format", fmt,
                   "--write-plan", tmp_path / f"{fmt}.plan.json")
        assert r.exit_code == 0, r.output
    q = onnx.load(str(tmp_path / "qdq.onnx"))
    assert "Mul" not in {n.op_type for n in q.graph.node}  # no kernel runs for it
    plan = json.loads((tmp_path / "qdq.plan.json").read_text())
    a, mm = plan["tensors"]["a"], plan["tensors"]["m"]
    assert np.float32(mm["scale"]) == np.float32(np.float32(a["scale"]) * np.float32(0.37)) and mm["zero_point"] == a["zero_point"]
    assert "constant 0.37" in next(n["reason"] for n in plan["nodes"] if n["name"] == "scale")
    by_out = {o: n for n in q.graph.node for o in n.output}
    dq = next(n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.input[1].startswith("m_scale"))
    assert by_out[dq.input[0]].input[0] == "a"  # conv1's quantized output, read again with the scale of m
    ref = run_model(m, {"x": x})[0]
    got_qdq, got_qop = run_model(tmp_path / "qdq.onnx", {"x": x})[0], run_model(tmp_path / "qoperator.onnx", {"x": x})[0]
    np.testing.assert_array_equal(got_qdq, got_qop)
    assert np.corrcoef(ref.ravel(), got_qdq.ravel())[0, 1] > 0.995
    if then_relu:
        assert "relu" not in plan["folded"]  # no QuantizeLinear after the Mul to clamp for it
        assert "relu" in {n.name for n in q.graph.node}  # it still runs (on the dequantized values), so it still clamps


def test_a_mul_by_a_negative_constant_keeps_its_kernel(tmp_path):
    m = scaled(-0.5)
    onnx.save(m, tmp_path / "m.onnx")
    np.save(tmp_path / "d.npy", RNG.normal(0, 1, (16, 3, 8, 8)).astype(np.float32))
    r = invoke("quantize", tmp_path / "m.onnx", "--data", tmp_path / "d.npy", "-o", tmp_path / "q.onnx", "-q")
    assert r.exit_code == 0, r.output
    assert optimized_ops(tmp_path / "q.onnx", tmp_path).get("QLinearMul") == 1
