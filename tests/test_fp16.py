"""Float16 conversion: validity, accuracy and size on real models, and each rule that keeps float32."""

from __future__ import annotations

import collections
import hashlib
import os
import subprocess
import sys
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from qconv.graph.intake import prepare
from qconv.rewrite.fp16 import convert_fp16
from tests.conftest import ROOT, SAMPLES, conv_model, make_model, run_model

F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def run_float16(model, feed: dict) -> np.ndarray:
    """Run in onnx's numpy reference runtime, which computes float16 ops in float16. onnxruntime's CPU provider
    runs most of them in float32 and even drops our float32->float16 Casts before such ops, so it cannot
    show a float16 overflow."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the overflows the tests look for
        return ReferenceEvaluator(model).run(None, feed)[0]


def initializer_types(model) -> dict[str, int]:
    return {t.name: t.data_type for t in model.graph.initializer}


def io_types(values) -> list[int]:
    return [v.type.tensor_type.elem_type for v in values]


def check(model) -> None:
    """Valid ONNX, unique node names, and no Cast fed by a Cast or repeated for the same tensor and type."""
    onnx.checker.check_model(model, full_check=True)
    names = [n.name for n in model.graph.node]
    assert len(names) == len(set(names))
    producer = {o: n for n in model.graph.node for o in n.output}
    casts = [n for n in model.graph.node if n.op_type == "Cast"]
    assert not [c.name for c in casts if c.input[0] in producer and producer[c.input[0]].op_type == "Cast"]
    keys = [(c.input[0], c.attribute[0].i) for c in casts]
    assert len(keys) == len(set(keys))


@pytest.fixture(scope="module")
def transformer():
    model = prepare(onnx.load(SAMPLES / "tiny_transformer" / "model.onnx"), 13)[0]
    data = np.load(SAMPLES / "tiny_transformer" / "eval.npz")
    return model, convert_fp16(model), {k: data[k] for k in ("input_ids", "attention_mask")}


def test_conv_model_runs_in_float16_with_casts_only_at_the_io():
    model = conv_model()
    before = model.SerializeToString()
    res = convert_fp16(model)
    check(res.model)
    assert model.SerializeToString() == before  # the input model is not touched
    assert set(initializer_types(res.model).values()) == {F16}
    assert res.converted_nodes == len(model.graph.node) and res.kept_float == []
    assert collections.Counter(n.op_type for n in res.model.graph.node)["Cast"] == 2
    x = np.random.default_rng(0).normal(size=(4, 3, 8, 8)).astype(np.float32)
    assert cosine(run_model(model, {"x": x})[0], run_model(res.model, {"x": x})[0]) >= 0.9999


def test_digits_cnn_is_accurate_and_half_the_size():
    model = prepare(onnx.load(SAMPLES / "digits_cnn" / "model.onnx"), 13)[0]
    res = convert_fp16(model)
    check(res.model)
    x = np.load(SAMPLES / "digits_cnn" / "eval.npy")
    ref, out = run_model(model, {"input": x})[0], run_model(res.model, {"input": x})[0]
    assert cosine(ref, out) >= 0.9999
    assert (ref.argmax(1) == out.argmax(1)).all()
    assert len(model.SerializeToString()) / len(res.model.SerializeToString()) >= 1.9


def test_transformer_is_accurate_and_keeps_the_mask_constant(transformer):
    model, res, feed = transformer
    check(res.model)
    ref, out = run_model(model, feed)[0], run_model(res.model, feed)[0]
    assert np.isfinite(out).all() and cosine(ref, out) >= 0.9999
    assert [o["tensor"] for o in res.overflow] == ["/Constant_6_output_0"]
    assert res.overflow[0]["max_abs"] == pytest.approx(3.4028235e38) and res.overflow[0]["count"] == 1
    mask = next(t for t in res.model.graph.initializer if t.name == "/Constant_6_output_0")
    assert numpy_helper.to_array(mask).dtype == np.float32 and numpy_helper.to_array(mask) == np.finfo(np.float32).min
    reasons = {k["name"]: k["reason"] for k in res.kept_float}
    assert "/Constant_6_output_0" in reasons["/Mul"] and "/Constant_6_output_0" in reasons["/layers.0/attention/Add"]
    assert "/layers.0/attention/Softmax" in reasons and "/layers.0/attention/MatMul_1" not in reasons


def test_masked_positions_stay_exactly_masked(transformer):
    model, res, feed = transformer
    padded = feed["attention_mask"] == 0
    assert padded.any()
    other_ids = np.where(padded, (feed["input_ids"] + 7) % 32, feed["input_ids"])
    out = run_model(res.model, feed)[0]
    np.testing.assert_array_equal(run_model(res.model, {**feed, "input_ids": other_ids})[0], out)
    all_padding = {"input_ids": feed["input_ids"][:2], "attention_mask": np.zeros_like(feed["attention_mask"][:2])}
    ref = run_model(model, all_padding)[0]
    for out in (run_model(res.model, all_padding)[0], run_float16(res.model, all_padding)):
        assert np.isfinite(out).all()  # -3.4e38 cast to float16 is -inf, and Softmax of a row of -inf is NaN
        np.testing.assert_allclose(out, ref, atol=1e-3)


@pytest.mark.parametrize("keep", [True, False])
def test_keep_io_types(keep):
    res = convert_fp16(conv_model(), keep_io_types=keep)
    check(res.model)
    want = F32 if keep else F16
    assert io_types(res.model.graph.input) == [want] and io_types(res.model.graph.output) == [want]
    x = np.random.default_rng(1).normal(size=(2, 3, 8, 8)).astype(np.float32)
    out = run_model(res.model, {"x": x if keep else x.astype(np.float16)})[0]
    assert out.dtype == (np.float32 if keep else np.float16)
    assert cosine(run_model(conv_model(), {"x": x})[0], out) >= 0.9999


def test_integer_inputs_keep_their_type_without_io_types(transformer):
    model, _, feed = transformer
    res = convert_fp16(model, keep_io_types=False)
    check(res.model)
    assert io_types(res.model.graph.input) == [TensorProto.INT64] * 2 and io_types(res.model.graph.output) == [F16]
    assert cosine(run_model(model, feed)[0], run_model(res.model, feed)[0]) >= 0.9999


def test_blocked_ops_and_nodes_stay_float32():
    model = conv_model()
    res = convert_fp16(model, block_ops=["Gemm"], block_nodes=["conv*"])
    check(res.model)
    kept = {k["name"]: k["reason"] for k in res.kept_float}
    assert kept == {"conv1": "blocked by block_nodes pattern 'conv*'", "conv2": "blocked by block_nodes pattern 'conv*'",
                    "fc": "blocked by block_ops"}
    types = initializer_types(res.model)
    assert {types[w] for w in ("w1", "b1", "w2", "b2", "wf", "bf")} == {F32}
    assert types["bn_s"] == F16
    fc = next(n for n in res.model.graph.node if n.name == "fc")
    producer = {o: n for n in res.model.graph.node for o in n.output}
    assert producer[fc.input[0]].op_type == "Cast" and fc.output[0] == "y"  # reads a float32 copy, writes y itself
    x = np.random.default_rng(2).normal(size=(3, 3, 8, 8)).astype(np.float32)
    assert cosine(run_model(model, {"x": x})[0], run_model(res.model, {"x": x})[0]) >= 0.9999


def layernorm_model(square: str) -> onnx.ModelProto:
    """Y = (x - mean) / sqrt(mean((x - mean)**2) + eps) * gamma, written out as exporters before opset 17 do."""
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["mean"], axes=[-1], name="mean"),
        helper.make_node("Sub", ["x", "mean"], ["xc"], name="center"),
        helper.make_node(square, ["xc", "two" if square == "Pow" else "xc"], ["sq"], name="square"),
        helper.make_node("ReduceMean", ["sq"], ["var"], axes=[-1], name="var"),
        helper.make_node("Add", ["var", "eps"], ["var_eps"], name="add_eps"),
        helper.make_node("Sqrt", ["var_eps"], ["std"], name="std"),
        helper.make_node("Div", ["xc", "std"], ["norm"], name="normalize"),
        helper.make_node("Mul", ["norm", "gamma"], ["y"], name="scale"),
    ]
    inits = [numpy_helper.from_array(np.array(v, np.float32), n)
             for n, v in (("two", 2.0), ("eps", 1e-5), ("gamma", np.linspace(0.5, 1.5, 8)))]
    return make_model(nodes, [helper.make_tensor_value_info("x", F32, ["N", 8])],
                      [helper.make_tensor_value_info("y", F32, ["N", 8])], inits, opset=13)


@pytest.mark.parametrize("square", ["Pow", "Mul"])
def test_squares_stay_float32_until_normalized(square):
    model = layernorm_model(square)
    res = convert_fp16(model)
    check(res.model)
    kept = {k["name"]: k["reason"] for k in res.kept_float}
    assert set(kept) == {"square", "var", "add_eps", "std", "normalize"}  # mean, center and scale run in float16
    assert "65504" in kept["square"] and "square" in kept["normalize"]
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.normal(0, 1, (4, 8)), rng.normal(0, 1000, (2, 8))]).astype(np.float32)
    ref = run_model(model, {"x": x})[0]
    for out in (run_model(res.model, {"x": x})[0], run_float16(res.model, {"x": x})):
        assert np.isfinite(out).all()  # (x - mean)**2 > 65504 is inf in float16: the row would normalize to 0
        np.testing.assert_allclose(out, ref, atol=1e-2)


def test_underflowing_constants_are_listed_and_an_all_tiny_epsilon_stays_float32():
    """y = x / (|x| + eps) * gamma: an eps of 1e-12 is 0 in float16, and 0 / (0 + 0) is NaN."""
    nodes = [
        helper.make_node("Abs", ["x"], ["a"], name="abs"),
        helper.make_node("Add", ["a", "eps"], ["d"], name="add_eps"),
        helper.make_node("Div", ["x", "d"], ["s"], name="safe_div"),
        helper.make_node("Mul", ["s", "gamma"], ["y"], name="scale"),
    ]
    gamma = np.linspace(0.5, 1.5, 4).astype(np.float32)
    gamma[:2] = [1e-9, -3e-8]
    inits = [numpy_helper.from_array(np.array(1e-12, np.float32), "eps"), numpy_helper.from_array(gamma, "gamma")]
    model = make_model(nodes, [helper.make_tensor_value_info("x", F32, ["N", 4])],
                       [helper.make_tensor_value_info("y", F32, ["N", 4])], inits, opset=13)
    res = convert_fp16(model)
    check(res.model)
    assert res.underflow == [
        {"tensor": "eps", "min_abs_nonzero": pytest.approx(1e-12), "count": 1},
        {"tensor": "gamma", "min_abs_nonzero": pytest.approx(1e-9), "count": 2},
    ]
    assert initializer_types(res.model) == {"eps": F32, "gamma": F16}
    assert [k["name"] for k in res.kept_float] == ["add_eps", "safe_div"]
    x = np.array([[0.0, 0.5, -2.0, 0.0], [1.0, 0.0, 3.0, -0.25]], np.float32)
    ref = run_model(model, {"x": x})[0]
    for out in (run_model(res.model, {"x": x})[0], run_float16(res.model, {"x": x})):
        assert np.isfinite(out).all()
        np.testing.assert_allclose(out, ref, atol=1e-3)


def test_shape_math_and_resize_scales_stay_float32():
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"], name="shape"),
        helper.make_node("Cast", ["shape"], ["shape_f"], to=F32, name="shape_to_float"),
        helper.make_node("Mul", ["shape_f", "factor"], ["size_f"], name="scale_shape"),
        helper.make_node("Cast", ["size_f"], ["sizes"], to=TensorProto.INT64, name="size_to_int"),
        helper.make_node("Resize", ["x", "", "", "sizes"], ["up"], mode="nearest", name="resize_sizes"),
        helper.make_node("Resize", ["up", "", "scales"], ["y"], mode="nearest", name="resize_scales"),
    ]
    inits = [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "factor"),
             numpy_helper.from_array(np.array([1, 1, 0.5, 0.5], np.float32), "scales")]
    model = make_model(nodes, [helper.make_tensor_value_info("x", F32, [1, 2, 3, 3])],
                       [helper.make_tensor_value_info("y", F32, [1, 2, 3, 3])], inits, opset=13)
    res = convert_fp16(model)
    check(res.model)
    assert initializer_types(res.model) == {"factor": F32, "scales": F32}
    kept = {k["name"]: k["reason"] for k in res.kept_float}
    assert set(kept) == {"shape_to_float", "scale_shape", "size_to_int"} and "integers" in kept["scale_shape"]
    x = np.random.default_rng(4).normal(size=(1, 2, 3, 3)).astype(np.float32)
    np.testing.assert_allclose(run_model(res.model, {"x": x})[0], x, atol=2e-3)


def test_range_stays_float32_as_its_schema_requires():
    nodes = [
        helper.make_node("ReduceMax", ["x"], ["limit"], keepdims=0, name="limit"),
        helper.make_node("Range", ["start", "limit", "delta"], ["r"], name="range"),
        helper.make_node("ReduceMean", ["r"], ["y"], keepdims=0, name="mean"),
    ]
    inits = [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("start", 0.0), ("delta", 0.5))]
    model = make_model(nodes, [helper.make_tensor_value_info("x", F32, [4])],
                       [helper.make_tensor_value_info("y", F32, [])], inits, opset=13)
    res = convert_fp16(model)
    check(res.model)
    assert [(k["name"], k["reason"]) for k in res.kept_float] == [
        ("range", "the ONNX schema of Range-11 allows no float16 where it takes float")]
    x = np.array([1.0, 7.0, 3.0, 2.0], np.float32)
    np.testing.assert_allclose(run_model(res.model, {"x": x})[0], run_model(model, {"x": x})[0], rtol=1e-3)


def test_subgraph_stays_float32_and_reads_outer_tensors_as_float32():
    def branch(name, op):
        body = helper.make_node(op, ["r", "r"], [f"{name}_out"], name=f"{name}_op")
        return helper.make_graph([body], name, [], [helper.make_tensor_value_info(f"{name}_out", F32, [2, 3])])

    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("If", ["cond"], ["branch"], name="if",
                         then_branch=branch("then", "Add"), else_branch=branch("else", "Mul")),
        helper.make_node("Sub", ["branch", "r"], ["y"], name="sub"),
    ]
    inputs = [helper.make_tensor_value_info("x", F32, [2, 3]), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])]
    model = make_model(nodes, inputs, [helper.make_tensor_value_info("y", F32, [2, 3])])
    res = convert_fp16(model)
    check(res.model)
    assert [k["name"] for k in res.kept_float] == ["if"]
    producer = {o: n for n in res.model.graph.node for o in n.output}
    assert producer["r"].op_type == "Cast" and producer[producer["r"].input[0]].name == "relu"  # the body reads r
    x = np.random.default_rng(5).normal(size=(2, 3)).astype(np.float32)
    for cond in (True, False):
        feed = {"x": x, "cond": np.array(cond)}
        ref = run_model(model, feed)[0]
        for out in (run_model(res.model, feed)[0], run_float16(res.model, feed)):
            np.testing.assert_allclose(out, ref, atol=1e-2)


def test_scatter_with_a_reduction_stays_float32_for_onnxruntime_cpu():
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("ScatterElements", ["r", "idx", "upd"], ["y"], axis=0, reduction="add", name="scatter_add"),
    ]
    inits = [numpy_helper.from_array(np.array([[1, 0]]), "idx"), numpy_helper.from_array(np.ones((1, 2), np.float32), "upd")]
    model = make_model(nodes, [helper.make_tensor_value_info("x", F32, [2, 2])],
                       [helper.make_tensor_value_info("y", F32, [2, 2])], inits, opset=16)
    res = convert_fp16(model)
    check(res.model)
    assert res.kept_float == [{"name": "scatter_add", "op_type": "ScatterElements",
                               "reason": "no float16 kernel in onnxruntime's CPU provider (reduction=add)"}]
    x = np.array([[1.0, -2.0], [3.0, 4.0]], np.float32)
    np.testing.assert_allclose(run_model(res.model, {"x": x})[0], run_model(model, {"x": x})[0], atol=1e-3)


def test_constant_nodes_and_an_integer_mask_with_an_overflowing_bias():
    """y = softmax(x @ w * pad + pad * -1e9): weights and bias in Constant nodes, pad an int64 input (1 = padding)."""
    nodes = [
        helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(2 * np.eye(4, dtype=np.float32)), name="w"),
        helper.make_node("Constant", [], ["neg"], value_float=-1e9, name="neg"),
        helper.make_node("Cast", ["pad"], ["m"], to=F32, name="cast_mask"),
        helper.make_node("MatMul", ["x", "w"], ["h"], name="matmul"),
        helper.make_node("Mul", ["h", "m"], ["hm"], name="apply_mask"),
        helper.make_node("Mul", ["m", "neg"], ["bias"], name="mask_bias"),
        helper.make_node("Add", ["hm", "bias"], ["s"], name="add_mask"),
        helper.make_node("Softmax", ["s"], ["y"], axis=-1, name="softmax"),
    ]
    inputs = [helper.make_tensor_value_info("x", F32, [2, 4]),
              helper.make_tensor_value_info("pad", TensorProto.INT64, [2, 4])]
    model = make_model(nodes, inputs, [helper.make_tensor_value_info("y", F32, [2, 4])])
    res = convert_fp16(model)
    check(res.model)  # apply_mask reads pad through a Cast from int64, not a Cast of cast_mask's output
    assert initializer_types(res.model) == {"w": F16, "neg": F32}
    assert res.overflow == [{"tensor": "neg", "max_abs": 1e9, "count": 1}]
    assert [k["name"] for k in res.kept_float] == ["cast_mask", "mask_bias", "add_mask", "softmax"]
    feed = {"x": np.random.default_rng(6).normal(size=(2, 4)).astype(np.float32), "pad": np.array([[0, 0, 1, 1]] * 2)}
    ref = run_model(model, feed)[0]
    for out in (run_model(res.model, feed)[0], run_float16(res.model, feed)):
        assert (out[:, 2:] == 0).all()
        np.testing.assert_allclose(out, ref, atol=2e-3)


def _digest(model) -> str:
    return hashlib.sha256(convert_fp16(model).model.SerializeToString(deterministic=True)).hexdigest()


def test_output_is_deterministic_across_runs_and_processes(transformer):
    model = transformer[0]
    assert _digest(model) == _digest(model)
    script = (
        "import hashlib, onnx; from qconv.graph.intake import prepare; from qconv.rewrite.fp16 import convert_fp16; "
        f"m = prepare(onnx.load({str(SAMPLES / 'tiny_transformer' / 'model.onnx')!r}), 13)[0]; "
        "print(hashlib.sha256(convert_fp16(m).model.SerializeToString(deterministic=True)).hexdigest())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    other = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert other.stdout.strip() == _digest(model)
