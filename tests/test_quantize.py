"""The QDQ rewrite end to end on models built in code: numerics through onnxruntime, fusion, reasons."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qconv import pipeline
from qconv.measure.stats import ErrorStats
from qconv.plan.config import QuantConfig
from tests.conftest import conv_model, make_model, optimized_ops, run_model


def quantize_file(path, data, config=QuantConfig()):
    prep = pipeline.load(path, config)
    calib = pipeline.calibrate(prep, pipeline.feeds_for(prep, data, batch_size=4))
    return prep, calib, pipeline.quantize(prep, calib, config)


def fidelity(a, b, feed):
    s = ErrorStats()
    s.update(run_model(a, feed)[0], run_model(b, feed)[0])
    return s


def test_conv_model_quantizes_fuses_and_stays_close(conv_path, conv_data, tmp_path):
    _, _, res = quantize_file(conv_path, conv_data)
    x = np.load(conv_data)
    s = fidelity(conv_model(), res.model, {"x": x})
    assert s.cosine > 0.999 and s.sqnr_db > 25
    ops = optimized_ops(res.model, tmp_path)
    assert ops.get("QLinearConv") == 2 and "Conv" not in ops  # both convs run as int8 kernels
    assert res.plan.folded == {"relu1": "conv1", "relu2": "conv2"}
    dq = [n for n in res.model.graph.node if n.op_type == "DequantizeLinear" and any(a.name == "axis" for a in n.attribute)]
    assert len(dq) >= 3  # per-channel weights (and biases) carry an axis


def test_weights_are_int8_and_float_copies_removed(conv_path, conv_data):
    _, _, res = quantize_file(conv_path, conv_data)
    inits = {t.name: t for t in res.model.graph.initializer}
    float_big = [t.name for t in inits.values() if t.data_type == TensorProto.FLOAT and np.prod(t.dims) > 8]
    assert float_big == []  # only scales remain float (<= 8 channels here)
    assert any(t.data_type == TensorProto.INT8 and list(t.dims) == [8, 3, 3, 3] for t in inits.values())
    assert any(t.data_type == TensorProto.INT32 for t in inits.values())  # int32 biases


def test_per_tensor_has_no_axis(conv_path, conv_data):
    _, _, res = quantize_file(conv_path, conv_data, QuantConfig(per_channel=False))
    for n in res.model.graph.node:
        if n.op_type == "DequantizeLinear":
            assert not any(a.name == "axis" for a in n.attribute)


def test_same_inputs_give_byte_identical_models(conv_path, conv_data):
    a = quantize_file(conv_path, conv_data)[2].model.SerializeToString(deterministic=True)
    b = quantize_file(conv_path, conv_data)[2].model.SerializeToString(deterministic=True)
    assert a == b


def test_metadata_and_doc_strings_record_the_run(conv_path, conv_data):
    _, calib, res = quantize_file(conv_path, conv_data)
    meta = {p.key: p.value for p in res.model.metadata_props}
    assert meta["qconv.mode"] == "int8"
    assert calib.model_id in meta["qconv.calibration"]
    assert '"per_channel": true' in meta["qconv.config"]
    q = [n for n in res.model.graph.node if n.op_type == "QuantizeLinear"]
    assert q and all(n.doc_string.startswith("qconv:") for n in q)
    w = [t for t in res.model.graph.initializer if t.data_type in (TensorProto.INT8, TensorProto.INT32) and t.name.endswith("_quantized")]
    assert len(w) == 6 and all(t.doc_string.startswith("qconv: from '") for t in w)


def test_exclusions_keep_nodes_float(conv_path, conv_data):
    cfg = QuantConfig(exclude_nodes=("conv2",), exclude_ops=("Gemm",))
    _, _, res = quantize_file(conv_path, conv_data, cfg)
    reasons = {n.name: n.reason for n in res.plan.nodes if not n.quantized}
    assert reasons["conv2"] == "excluded by --exclude-nodes conv2"
    assert reasons["fc"] == "excluded by --exclude-ops Gemm"


def attention_model() -> onnx.ModelProto:
    """x[N,T,8], mask[N,T] -> LayerNorm -> Q,K,V MatMuls -> scores + (1-mask)*-1e9 -> Softmax -> MatMul."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.4, (8, 8)).astype(np.float32), n) for n in ("wq", "wk", "wv")]
    inits += [numpy_helper.from_array(np.ones(8, np.float32), "g"), numpy_helper.from_array(np.zeros(8, np.float32), "b"),
              numpy_helper.from_array(np.array(1.0, np.float32), "one"), numpy_helper.from_array(np.array(-1e9, np.float32), "neg"),
              numpy_helper.from_array(np.array([1], np.int64), "ax1")]
    nodes = [
        helper.make_node("LayerNormalization", ["x", "g", "b"], ["ln"], axis=-1, name="ln"),
        helper.make_node("MatMul", ["ln", "wq"], ["q"], name="mm_q"),
        helper.make_node("MatMul", ["ln", "wk"], ["k"], name="mm_k"),
        helper.make_node("MatMul", ["ln", "wv"], ["v"], name="mm_v"),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1], name="kt"),
        helper.make_node("MatMul", ["q", "kt"], ["s"], name="scores"),
        helper.make_node("Sub", ["one", "mask"], ["inv"], name="inv"),
        helper.make_node("Mul", ["inv", "neg"], ["bias"], name="mask_mul"),
        helper.make_node("Unsqueeze", ["bias", "ax1"], ["bias3"], name="unsq"),
        helper.make_node("Add", ["s", "bias3"], ["masked"], name="mask_add"),
        helper.make_node("Softmax", ["masked"], ["p"], axis=-1, name="softmax"),
        helper.make_node("MatMul", ["p", "v"], ["y"], name="ctx"),
    ]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T", 8]),
                              helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["N", "T"])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "T", 8])], inits, opset=17)


def test_attention_masks_and_fragile_ops_stay_float(tmp_path):
    m = attention_model()
    onnx.save(m, tmp_path / "att.onnx")
    rng = np.random.default_rng(1)
    mask = np.ones((16, 6), np.float32)
    mask[:, 4:] = 0
    np.savez(tmp_path / "d.npz", x=rng.normal(0, 1, (16, 6, 8)).astype(np.float32), mask=mask)
    _, _, res = quantize_file(tmp_path / "att.onnx", tmp_path / "d.npz")
    d = {n.name: n for n in res.plan.nodes}
    assert d["mask_add"].code == "inputs-float" and "input 'bias3' (from Unsqueeze 'unsq') stays float" in d["mask_add"].reason
    assert d["mask_mul"].code == "wide-range" and "constant operand 'neg' values span more than 8 bits" in d["mask_mul"].reason
    assert not d["softmax"].quantized and "fragile" in d["softmax"].reason
    assert not d["ln"].quantized and "fragile" in d["ln"].reason
    assert d["mm_q"].quantized and d["scores"].quantized
    feed = {"x": rng.normal(0, 1, (4, 6, 8)).astype(np.float32), "mask": mask[:4]}
    s = fidelity(m, res.model, feed)
    assert s.cosine > 0.99


def test_nonfinite_and_constant_tensors_do_not_crash(tmp_path):
    """log(0) = -inf inside the model; a constant tensor has zero range; both quantize to a valid model."""
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Log", ["r"], ["l"], name="log"),
             helper.make_node("Mul", ["x", "zero"], ["z"], name="zero_mul"),
             helper.make_node("Add", ["l", "z"], ["y"], name="add")]
    m = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                   [numpy_helper.from_array(np.zeros(4, np.float32), "zero")], opset=13)
    onnx.save(m, tmp_path / "m.onnx")
    np.save(tmp_path / "d.npy", np.random.default_rng(0).normal(0, 1, (8, 4)).astype(np.float32))
    _, calib, res = quantize_file(tmp_path / "m.onnx", tmp_path / "d.npy")
    assert calib.tensors["l"].nonfinite > 0
    assert calib.tensors["z"].min == calib.tensors["z"].max == 0.0
    d = {n.name: n for n in res.plan.nodes}
    # the real reason comes first: Log has no int8 kernel, so Add's input stays float (its inf is not the reason)
    assert d["add"].code == "inputs-float" and "input 'l' (from Log 'log') stays float" in d["add"].reason
    assert d["log"].code == "no-kernel"
    out = run_model(res.model, {"x": np.ones((2, 4), np.float32)})[0]
    np.testing.assert_allclose(out, 0.0, atol=0.01)  # log(1) after an 8-bit round trip of relu(1)


def decoder_model() -> onnx.ModelProto:
    """Conv -> LeakyRelu -> ConvTranspose -> Resize, Concat with a pooled branch, Sigmoid, and an If whose
    branches read an outer tensor (a subgraph consumer must keep working)."""
    rng = np.random.default_rng(2)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (6, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(0, 0.3, (6, 4, 2, 2)).astype(np.float32), "wt"),  # ConvTranspose: [C_in, C_out, k, k]
        numpy_helper.from_array(rng.normal(0, 0.1, 4).astype(np.float32), "bt"),
        numpy_helper.from_array(np.array([1, 1, 0.5, 0.5], np.float32), "scales"),
    ]
    then_g = helper.make_graph([helper.make_node("Sigmoid", ["cat"], ["t_out"])], "then", [],
                               [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, None)])
    else_g = helper.make_graph([helper.make_node("Neg", ["cat"], ["e_out"])], "else", [],
                               [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, None)])
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("LeakyRelu", ["c1"], ["l1"], alpha=0.1, name="leaky"),
        helper.make_node("ConvTranspose", ["l1", "wt", "bt"], ["up"], strides=[2, 2], name="deconv"),
        helper.make_node("Resize", ["up", "", "scales"], ["down"], mode="nearest", name="resize"),
        helper.make_node("AveragePool", ["l1"], ["pool"], kernel_shape=[1, 1], name="pool"),
        helper.make_node("Concat", ["down", "pool"], ["cat"], axis=1, name="concat"),
        helper.make_node("Sigmoid", ["cat"], ["y"], name="sigmoid"),
        helper.make_node("If", ["cond"], ["z"], then_branch=then_g, else_branch=else_g, name="branch"),
    ]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8]),
                              helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10, 8, 8]),
                       helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], inits, opset=17)


def test_decoder_ops_and_subgraph_consumers(tmp_path):
    m = decoder_model()
    onnx.save(m, tmp_path / "dec.onnx")
    rng = np.random.default_rng(3)
    np.savez(tmp_path / "d.npz", x=rng.normal(0, 1, (8, 3, 8, 8)).astype(np.float32), cond=np.array(True))
    _, _, res = quantize_file(tmp_path / "dec.onnx", tmp_path / "d.npz")
    d = {n.name: n for n in res.plan.nodes}
    for name in ("conv", "leaky", "deconv", "resize", "pool", "concat", "sigmoid"):
        assert d[name].quantized, (name, d[name].reason)
    assert not d["branch"].quantized
    for cond in (True, False):
        feed = {"x": rng.normal(0, 1, (2, 3, 8, 8)).astype(np.float32), "cond": np.array(cond)}
        ref, got = run_model(m, feed), run_model(res.model, feed)
        for r, q in zip(ref, got):
            s = ErrorStats()
            s.update(r, q)
            assert s.cosine > 0.999, (cond, s.cosine)
