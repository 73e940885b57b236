"""Sizes and identities of models without serializing them: protobuf's ByteSize (upb) serializes the message to count
it, so a session's start (goes_by_file) and a model's identity each held a copy of every weight. These check the cheap
versions against the real ones: the identity hashes exactly the bytes it hashed before (calibration files and plans
record it), and the size estimate stays close where thresholds read it."""

from __future__ import annotations

import glob
import hashlib
import os

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from qconv import io, runtime
from qconv.graph import graph_size, model_size, tensor_size
from tests.conftest import SAMPLES

LIGHT = sorted(glob.glob(os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light", "*.onnx")))
DTYPES = [np.float32, np.float16, np.float64, np.int8, np.uint8, np.int32, np.int64, np.bool_]


def _whole_digest(model: onnx.ModelProto) -> str:
    h = hashlib.sha256()
    h.update(model.graph.SerializeToString(deterministic=True))
    return h.hexdigest()


def _streamed_digest(model: onnx.ModelProto) -> str:
    h = hashlib.sha256()
    io._hash_graph_bytes(model.graph, h, whole_below=0)
    return h.hexdigest()


def _mixed_model(seed: int, sizes: list[int], typed: bool) -> onnx.ModelProto:
    """Initializers of several types and sizes (raw or in typed fields, one with a doc_string, one external), a
    Constant node with a tensor, an If with bodies holding weights, value_info and a graph doc_string: every field of
    a GraphProto before and after the initializers'."""
    rng = np.random.default_rng(seed)
    inits = []
    for k, n in enumerate(sizes):
        dtype = DTYPES[k % len(DTYPES)]
        a = (rng.standard_normal(n) * 10).astype(dtype)
        t = numpy_helper.from_array(a, f"w{k}")
        if typed and dtype == np.float32:
            t = helper.make_tensor(f"w{k}", TensorProto.FLOAT, [n], a.tolist())
        if k == 1:
            t.doc_string = "after raw_data"
        inits.append(t)
    ext = onnx.TensorProto(name="ext", data_type=TensorProto.FLOAT, dims=[4], data_location=TensorProto.EXTERNAL)
    ext.external_data.add(key="location", value="w.data")
    inits.append(ext)
    body = lambda name, v: helper.make_graph(  # noqa: E731
        [helper.make_node("Add", ["x", f"{name}_c"], [f"{name}_y"])], name, [],
        [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, [3])],
        [numpy_helper.from_array(np.full(3, v, np.float32), f"{name}_c")])
    nodes = [helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(rng.standard_normal((5, 3)).astype(np.float32))),
             helper.make_node("ReduceSum", ["k"], ["s"], keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["cond"]),
             helper.make_node("If", ["cond"], ["y"], then_branch=body("then", 1.0), else_branch=body("else", -1.0), name="branch")]
    inits.append(numpy_helper.from_array(np.zeros(3, np.float32), "zero"))
    graph = helper.make_graph(nodes, "mixed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])], inits, doc_string="a graph")
    graph.value_info.append(helper.make_tensor_value_info("s", TensorProto.FLOAT, [3]))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), sizes=st.lists(st.integers(0, 5000), min_size=0, max_size=12), typed=st.booleans())
def test_the_streamed_identity_hashes_exactly_the_serialized_graph(seed, sizes, typed):
    model = _mixed_model(seed, sizes, typed)
    assert _streamed_digest(model) == _whole_digest(model)


@pytest.mark.parametrize("path", [str(SAMPLES / d / "model.onnx") for d in ("digits_cnn", "digits_cnn_qat", "tiny_transformer",
                                                                            "tiny_decoder")] + LIGHT[:6])
def test_the_streamed_identity_of_real_models_is_the_one_files_recorded(path):
    model = onnx.load(path)
    assert _streamed_digest(model) == _whole_digest(model)
    h = hashlib.sha256()
    for op in model.opset_import:
        h.update(f"{op.domain}:{op.version};".encode())
    h.update(model.graph.SerializeToString(deterministic=True))
    assert io.model_identity(model) == h.hexdigest()  # the id calibration files made before still match


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), sizes=st.lists(st.integers(64, 40000), min_size=1, max_size=10), typed=st.booleans())
def test_the_size_estimate_is_close_to_bytesize(seed, sizes, typed):
    model = _mixed_model(seed, sizes, typed)
    for t in model.graph.initializer:
        assert abs(tensor_size(t) - t.ByteSize()) <= 64 + 0.05 * t.ByteSize(), t.name
    real = model.ByteSize()
    assert abs(model_size(model) - real) <= 4096 + 0.05 * real
    assert abs(graph_size(model.graph) - model.graph.ByteSize()) <= 4096 + 0.05 * real


def test_a_model_past_the_file_threshold_goes_by_file_and_one_below_does_not(monkeypatch):
    model = _mixed_model(0, [30000] * 8, typed=False)
    monkeypatch.setattr(runtime, "FILE_SESSION_BYTES", model.ByteSize() * 2)
    assert not runtime.goes_by_file(model)
    monkeypatch.setattr(runtime, "FILE_SESSION_BYTES", model.ByteSize() // 2)
    assert runtime.goes_by_file(model)


def test_an_exposed_session_adds_outputs_only_while_it_is_made():
    """runtime.exposed_session: the tensors come out of the session, the model is as it was (no output added, the same
    bytes), and asking for a tensor that is already an output adds nothing."""
    model = onnx.load(str(SAMPLES / "digits_cnn" / "model.onnx"))
    before = model.SerializeToString()
    inner = [n.output[0] for n in model.graph.node[:2]]
    sess = runtime.exposed_session(model, {inner[0]: TensorProto.FLOAT, inner[1]: TensorProto.FLOAT,
                                           model.graph.output[0].name: TensorProto.FLOAT})
    assert [o.name for o in sess.get_outputs()] == [model.graph.output[0].name] + inner
    assert model.SerializeToString() == before
    feed = {model.graph.input[0].name: np.load(SAMPLES / "digits_cnn" / "calib.npy")[:2]}
    plain = runtime.session(model).run(None, feed)[0]
    got = runtime.run(sess, feed)
    np.testing.assert_array_equal(got[0], plain)
    assert got[1].shape[0] == 2
