"""Shared fixtures: tiny models built in code, written to tmp files, and the bundled sample models."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"
LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"

# Kernel tables cached on this machine must not change what the tests plan (each run starts with an empty cache, as a
# fresh CI machine does), and the tests of the int8 rewrite see int8 wherever a kernel exists: on their tiny models,
# timing would keep most of it float. tests/test_kernels.py tests --kernels auto and shipped.
os.environ["QCONV_CACHE_DIR"] = tempfile.mkdtemp(prefix="qconv-test-cache.")
os.environ["QCONV_KERNELS"] = "none"


def make_model(nodes, inputs, outputs, initializers=(), opset=17, ir_version=8) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model


def conv_model(opset=17, seed=0, bn=True) -> onnx.ModelProto:
    """x[N,3,8,8] -> Conv(8) [-> BatchNorm] -> Relu -> Conv(4) -> GlobalAveragePool -> Flatten -> Gemm(5)."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.normal(0, 0.3, (4, 8, 3, 3)).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.normal(0, 0.1, 4).astype(np.float32), "b2"),
        numpy_helper.from_array(rng.normal(0, 0.5, (5, 4)).astype(np.float32), "wf"),
        numpy_helper.from_array(rng.normal(0, 0.1, 5).astype(np.float32), "bf"),
    ]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1")]
    src = "c1"
    if bn:
        inits += [
            numpy_helper.from_array(rng.uniform(0.5, 1.5, 8).astype(np.float32), "bn_s"),
            numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float32), "bn_b"),
            numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float32), "bn_m"),
            numpy_helper.from_array(rng.uniform(0.5, 1.5, 8).astype(np.float32), "bn_v"),
        ]
        nodes.append(helper.make_node("BatchNormalization", ["c1", "bn_s", "bn_b", "bn_m", "bn_v"], ["bn"], name="bn1"))
        src = "bn"
    nodes += [
        helper.make_node("Relu", [src], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "wf", "bf"], ["y"], transB=1, name="fc"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])
    return make_model(nodes, [x], [y], inits, opset=opset)


@pytest.fixture
def conv_path(tmp_path) -> Path:
    p = tmp_path / "conv.onnx"
    onnx.save(conv_model(), p)
    return p


@pytest.fixture
def conv_data(tmp_path) -> Path:
    p = tmp_path / "calib.npy"
    np.save(p, np.random.default_rng(1).normal(0, 1, (16, 3, 8, 8)).astype(np.float32))
    return p


def run_model(model_or_path, feed: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    src = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"]).run(None, feed)


def optimized_ops(model_or_path, tmp_path: Path) -> dict[str, int]:
    """Op histogram of the graph onnxruntime actually runs (after its QDQ fusions)."""
    import collections

    import onnxruntime as ort

    src = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    return dict(collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node))


QCONV_SCHEMAS = {"qconv.report": "report", "qconv.plan": "plan", "qconv.calibration": "calibration"}


@pytest.fixture(autouse=True)
def _validate_written_json(request):
    """Every qconv report, plan and calibration file a test writes under its tmp_path is validated against the JSON
    Schema shipped in the package (`qconv schema NAME`)."""
    folder = request.getfixturevalue("tmp_path") if "tmp_path" in request.fixturenames else None
    yield
    if folder is None:
        return
    import json

    import jsonschema

    from qconv.jobs.calibrate import schema

    for path in folder.rglob("*.json"):
        try:
            doc = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError):
            continue  # a test's deliberately corrupt file
        name = QCONV_SCHEMAS.get(doc.get("schema")) if isinstance(doc, dict) else None
        if name is None:
            continue
        if doc.get("version") != schema(name)["properties"]["version"]["const"]:
            continue  # a test's file of another version (the refusal tests write those)
        errors = sorted(jsonschema.Draft202012Validator(schema(name)).iter_errors(doc), key=lambda e: list(e.path))
        assert not errors, f"{path.name} does not match the {name} schema: " + "; ".join(
            f"{'/'.join(map(str, e.path))}: {e.message[:200]}" for e in errors[:5])
