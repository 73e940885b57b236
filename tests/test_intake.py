"""Models as exporters really write them: each intake pass keeps the numbers and makes the graph quantizable."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qconv import io
from qconv.errors import QconvError
from qconv.graph.intake import prepare
from tests.conftest import LIGHT, conv_model, make_model, run_model

X = np.random.default_rng(0).normal(0, 1, (2, 3, 8, 8)).astype(np.float32)


def assert_same_outputs(a, b, feed, atol=1e-4):
    for ra, rb in zip(run_model(a, feed), run_model(b, feed)):
        np.testing.assert_allclose(ra, rb, atol=atol, rtol=1e-4)


def test_batchnorm_is_folded_into_conv_with_identical_outputs():
    m = conv_model()
    out, notes = prepare(m, 13)
    ops = [n.op_type for n in out.graph.node]
    assert "BatchNormalization" not in ops
    assert any("folded into the Conv" in n for n in notes)
    assert_same_outputs(m, out, {"x": X})


def test_per_channel_mul_add_fold_into_a_standalone_batchnorm():
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.uniform(0.5, 1.5, 4).astype(np.float32), n) for n in ("s", "v")]
    inits += [numpy_helper.from_array(rng.normal(0, 1, 4).astype(np.float32), n) for n in ("b", "m")]
    inits += [numpy_helper.from_array(rng.normal(0, 1, (4, 1, 1)).astype(np.float32), n) for n in ("c1", "c2")]
    nodes = [helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"]), helper.make_node("Mul", ["y", "c1"], ["z"]),
             helper.make_node("Add", ["z", "c2"], ["w"]), helper.make_node("Relu", ["w"], ["o"])]
    m = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 3, 3])],
                   [helper.make_tensor_value_info("o", TensorProto.FLOAT, ["N", 4, 3, 3])], inits)
    out, notes = prepare(m, 13)
    assert [n.op_type for n in out.graph.node] == ["BatchNormalization", "Relu"]
    assert_same_outputs(m, out, {"x": rng.normal(0, 1, (2, 4, 3, 3)).astype(np.float32)}, atol=1e-5)


def test_old_ir_initializers_listed_as_inputs_become_weights():
    m = conv_model(opset=9, bn=False)
    m.ir_version = 3
    m.graph.input.extend([helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in m.graph.initializer])
    out, notes = prepare(m, 13)
    assert [i.name for i in out.graph.input] == ["x"]
    assert any("old IR" in n for n in notes) and any("opset upgraded from 9 to 13" in n for n in notes)
    assert_same_outputs(conv_model(opset=9, bn=False), out, {"x": X})


def test_weights_in_constant_nodes_and_computed_from_constants():
    w = np.random.default_rng(1).normal(0, 1, (4, 6)).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["w_t"], value=numpy_helper.from_array(w.T.copy())),
        helper.make_node("Transpose", ["w_t"], ["w"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "w"], ["y"]),
    ]
    m = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])])
    out, _ = prepare(m, 13)
    assert [n.op_type for n in out.graph.node] == ["MatMul"]
    assert out.graph.node[0].input[1] in {t.name for t in out.graph.initializer}
    x = np.ones((3, 4), np.float32)
    assert_same_outputs(m, out, {"x": x})


def test_identity_and_dropout_are_removed_but_graph_outputs_kept():
    nodes = [helper.make_node("Identity", ["x"], ["a"]), helper.make_node("Dropout", ["a"], ["b"]),
             helper.make_node("Relu", ["b"], ["y"]), helper.make_node("Identity", ["y"], ["z"])]
    m = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                   [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2])], opset=13)
    out, _ = prepare(m, 13)
    assert [n.op_type for n in out.graph.node] == ["Relu", "Identity"]
    assert out.graph.node[0].input[0] == "x"


def test_model_without_default_opset_is_refused():
    m = helper.make_model(helper.make_graph([], "g", [], []), opset_imports=[helper.make_opsetid("custom", 1)])
    with pytest.raises(QconvError, match="no ai.onnx opset"):
        prepare(m, 13)


def test_external_data_round_trip(tmp_path):
    src = tmp_path / "ext.onnx"
    onnx.save_model(conv_model(), src, save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    loaded = io.load_model(src)
    assert io.has_external_data(onnx.load(str(src), load_external_data=False))
    out = tmp_path / "copy.onnx"
    io.save_model(loaded, out, external_data=True)
    assert (tmp_path / "copy.onnx.data").exists()
    assert_same_outputs(conv_model(), out, {"x": X})


def test_missing_external_data_is_a_clear_error(tmp_path):
    src = tmp_path / "ext.onnx"
    onnx.save_model(conv_model(), src, save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    (tmp_path / "ext.onnx.data").unlink()
    with pytest.raises(QconvError, match="external data"):
        io.load_model(src)


@pytest.mark.skipif(not LIGHT.exists(), reason="onnx package without light models")
def test_light_resnet50_intake_keeps_numbers():
    m = onnx.load(str(LIGHT / "light_resnet50.onnx"))
    out, notes = prepare(m, 13)
    assert "BatchNormalization" not in {n.op_type for n in out.graph.node}
    x = np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32)
    a, b = run_model(m, {"gpu_0/data_0": x})[0], run_model(out, {"gpu_0/data_0": x})[0]
    np.testing.assert_allclose(a, b, rtol=1e-3)


def test_hard_swish_divided_by_a_constant_scales_its_gate_first():
    """x * clip(x + 3, 0, 6) / 6 becomes x * (clip(x + 3, 0, 6) * (1/6)): the wide product is never formed."""
    consts = [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("three", 3.0), ("zero", 0.0), ("six", 6.0))]
    nodes = [helper.make_node("Add", ["x", "three"], ["shifted"]), helper.make_node("Clip", ["shifted", "zero", "six"], ["gate"]),
             helper.make_node("Mul", ["x", "gate"], ["product"]), helper.make_node("Div", ["product", "six"], ["y"])]
    m = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 8, 8])], consts)
    out, notes = prepare(m, 13)
    producer = {o: n for n in out.graph.node for o in n.output}
    last = producer["y"]
    assert last.op_type == "Mul" and last.input[0] == "x"
    scaled = producer[last.input[1]]
    assert scaled.op_type == "Mul" and scaled.input[0] == "gate"
    assert any("gate products scaled" in n for n in notes)
    x = np.random.default_rng(1).normal(0, 4, (2, 3, 8, 8)).astype(np.float32)
    assert_same_outputs(m, out, {"x": x}, atol=1e-5)


def test_a_product_read_twice_keeps_its_form():
    consts = [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("zero", 0.0), ("six", 6.0), ("c", 0.5))]
    nodes = [helper.make_node("Clip", ["x", "zero", "six"], ["gate"]), helper.make_node("Mul", ["x", "gate"], ["product"]),
             helper.make_node("Mul", ["product", "c"], ["y"]), helper.make_node("Relu", ["product"], ["z"])]
    m = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4]),
                    helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 4])], consts)
    out, notes = prepare(m, 13)
    assert not any("gate products" in n for n in notes)
    assert "product" in {o for n in out.graph.node for o in n.output}


def test_shape_inference_reads_a_copy_without_the_weights_and_leaves_the_model_as_it_was():
    """graph.without_weights: big initializers keep name, type and dims but no data (what inference reads), small ones
    keep their values (shape tensors); the model itself is not touched, so its weights are never copied back in."""
    from qconv.graph import without_weights

    big = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    shape = numpy_helper.from_array(np.array([1, -1], np.int64), "shape")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Reshape", ["y", "shape"], ["z"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
                                                [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], [big, shape]))
    before = model.SerializeToString()
    light = without_weights(model)
    assert model.SerializeToString() == before
    w, s = (next(t for t in light.graph.initializer if t.name == n) for n in ("w", "shape"))
    assert not w.raw_data and list(w.dims) == [64, 64] and w.data_type == TensorProto.FLOAT
    np.testing.assert_array_equal(numpy_helper.to_array(s), [1, -1])
    inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
    assert [d.dim_value for d in inferred.graph.output[0].type.tensor_type.shape.dim] == [1, 128]


def test_the_opset_upgrade_converts_a_weightless_copy_and_gives_the_same_model_as_converting_it_whole():
    """Opset 11 -> 13: Squeeze's and ReduceSum's axes become inputs (small constants the adapters write), the Conv
    and MatMul weights (big) go through as placeholders and come back with their data."""
    from qconv.graph import intake, tensor_size

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(32, 4, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(size=(16, 64)).astype(np.float32), "m"),
             numpy_helper.from_array(np.array([1.5], np.float32), "small")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("ReduceSum", ["c"], ["r"], axes=[2], keepdims=1),
             helper.make_node("Squeeze", ["r"], ["s"], axes=[2]),
             helper.make_node("MatMul", ["s", "m"], ["y0"]),
             helper.make_node("Mul", ["y0", "small"], ["y"])]
    m = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 16])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits, opset=11)
    assert sum(tensor_size(t) >= intake.CONVERT_STRIP_BYTES for t in m.graph.initializer) == 2
    whole = onnx.version_converter.convert_version(m, 13)
    got = intake._converted(m, 13)
    assert got.SerializeToString() == whole.SerializeToString()
    assert {t.name for t in got.graph.initializer} >= {"w", "m", "small"}
    x = rng.normal(size=(1, 4, 5, 16)).astype(np.float32)
    np.testing.assert_array_equal(run_model(got, {"x": x})[0], run_model(m, {"x": x})[0])


def _constant_chain_model() -> onnx.ModelProto:
    """Constant chains of the ops folded without onnx.reference (Cast between numeric types, Reshape with 0 / -1 and
    allowzero, Identity), and one it cannot fold so (Sqrt), feeding x's Add and Mul."""
    rng = np.random.default_rng(3)
    w = rng.normal(0, 3, (2, 3, 4)).astype(np.float32)
    w[0, 0, :2] = [np.inf, -1e20]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([0, -1], np.int64), "s1"),
             numpy_helper.from_array(np.array([2, 12], np.int64), "s2"), numpy_helper.from_array(np.array([0, 12], np.int64), "s0")]
    nodes = [helper.make_node("Cast", ["w"], ["wi"], to=TensorProto.INT32),
             helper.make_node("Cast", ["wi"], ["wf"], to=TensorProto.FLOAT),
             helper.make_node("Reshape", ["wf", "s1"], ["r1"]),
             helper.make_node("Identity", ["r1"], ["id"]),
             helper.make_node("Cast", ["w"], ["wh"], to=TensorProto.FLOAT16),
             helper.make_node("Cast", ["wh"], ["wd"], to=TensorProto.DOUBLE),
             helper.make_node("Cast", ["wd"], ["wb"], to=TensorProto.FLOAT),
             helper.make_node("Reshape", ["wb", "s2"], ["r2"], allowzero=1),
             helper.make_node("Add", ["x", "id"], ["a"]),
             helper.make_node("Mul", ["a", "r2"], ["y"])]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 12])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 12])], inits, opset=14)


@pytest.mark.parametrize("other", [False, True])
def test_constants_folded_without_onnx_reference_are_the_ones_it_folds(other, monkeypatch):
    from qconv.graph import intake

    model = _constant_chain_model()
    if other:  # an op outside the few: the whole set goes to onnx.reference
        model.graph.node.insert(0, helper.make_node("Sqrt", ["s2f"], ["sq"]))
        model.graph.initializer.append(numpy_helper.from_array(np.array([4.0], np.float32), "s2f"))
        model.graph.node[-1].input[1] = "r2"
        model.graph.node.insert(1, helper.make_node("Add", ["x", "sq"], ["unused_sum"]))
        model.graph.output.append(helper.make_tensor_value_info("unused_sum", TensorProto.FLOAT, [2, 12]))
    fast, slow = onnx.ModelProto(), onnx.ModelProto()
    fast.CopyFrom(model)
    slow.CopyFrom(model)
    calls = []
    real = intake._folded_exactly
    monkeypatch.setattr(intake, "_folded_exactly", lambda *a: calls.append(real(*a)) or calls[-1])
    with np.errstate(all="ignore"):  # onnx.reference (the set with a Sqrt) warns of the casts out of range
        assert intake.fold_constants(fast)
    assert (calls[0] is None) == other
    monkeypatch.setattr(intake, "_folded_exactly", lambda *a: None)
    with np.errstate(all="ignore"):  # onnx.reference warns of the casts out of range
        assert intake.fold_constants(slow)
    assert fast.SerializeToString() == slow.SerializeToString()
    assert [n.op_type for n in fast.graph.node] == (["Add", "Add", "Mul"] if other else ["Add", "Mul"])
