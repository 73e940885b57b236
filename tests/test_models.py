"""Real models: the bundled samples (true task accuracy) and the classic networks shipped with onnx."""

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from qconv.cli.main import cli
from tests.conftest import LIGHT, SAMPLES, optimized_ops, run_model


def quantize_sample(name, tmp_path, ext):
    d = SAMPLES / name
    out, rep = tmp_path / f"{name}.int8.onnx", tmp_path / f"{name}.json"
    r = CliRunner().invoke(cli, ["quantize", str(d / "model.onnx"), "-o", str(out), "--data", str(d / f"calib.{ext}"),
                                 "--eval-data", str(d / f"eval.{ext}"), "--eval-labels", str(d / "eval_labels.npy"),
                                 "--batch-size", "32", "--report", str(rep), "--no-latency", "-q"])
    assert r.exit_code == 0, r.output
    return out, json.loads(rep.read_text())


def test_digits_cnn_keeps_accuracy_and_runs_int8_kernels(tmp_path):
    out, report = quantize_sample("digits_cnn", tmp_path, "npy")
    task = report["task"]
    assert task["original"] > 0.95
    assert task["drop_points"] <= 0.5
    assert report["size_bytes"]["ratio"] > 2.5
    ops = optimized_ops(out, tmp_path)
    assert ops.get("QLinearConv") == 3 and "Conv" not in ops and "FusedConv" not in ops


def test_tiny_transformer_is_faithful(tmp_path):
    out, report = quantize_sample("tiny_transformer", tmp_path, "npz")
    assert report["outputs"]["logits"]["cosine"] >= 0.99
    assert report["task"]["drop_points"] <= 1.0
    kept = {k["op_type"] for k in report["node_summary"]["kept_float"]}
    assert {"Softmax", "LayerNormalization"} <= kept
    mask_adds = [k for k in report["node_summary"]["kept_float"] if k["code"] == "wide-range" and "span more than 8 bits" in k["reason"]]
    assert mask_adds  # the -1e9 attention-mask arithmetic is named, not quantized
    ops = optimized_ops(out, tmp_path)
    assert ops.get("MatMulIntegerToFloat", 0) + ops.get("QLinearMatMul", 0) >= 8


LIGHT_MODELS = sorted(p.stem for p in LIGHT.glob("light_*.onnx")) if LIGHT.exists() else []
FAST = {"light_squeezenet", "light_shufflenet", "light_resnet50"}


def quantize_light(name, tmp_path):
    model = LIGHT / f"{name}.onnx"
    m = onnx.load(str(model))
    inits = {t.name for t in m.graph.initializer}
    inp = next(i for i in m.graph.input if i.name not in inits)
    shape = [d.dim_value for d in inp.type.tensor_type.shape.dim]
    data = tmp_path / "x.npy"
    np.save(data, np.random.default_rng(0).random([2] + shape, dtype=np.float32))  # a stack of 2 feeds
    out = tmp_path / "q.onnx"
    r = CliRunner().invoke(cli, ["quantize", str(model), "-o", str(out), "--data", str(data), "--no-latency", "--json", "-q"])
    assert r.exit_code == 0, r.output
    kept = {k["op_type"] for k in json.loads(r.stdout)["node_summary"]["kept_float"]}
    assert not kept & {"Conv", "Gemm"}, kept  # every weight layer quantized (exploding activations are no masks)
    q = onnx.load(str(out))
    onnx.checker.check_model(q)
    y = run_model(out, {inp.name: np.load(data)[0]})[0]
    assert np.all(np.isfinite(y))
    return out


@pytest.mark.parametrize("name", [n for n in LIGHT_MODELS if n in FAST])
def test_light_models_quantize_and_run(name, tmp_path):
    out = quantize_light(name, tmp_path)
    assert optimized_ops(out, tmp_path).get("QLinearConv", 0) >= 10


@pytest.mark.large
@pytest.mark.parametrize("name", [n for n in LIGHT_MODELS if n not in FAST])
def test_all_light_models_quantize_and_run(name, tmp_path):
    quantize_light(name, tmp_path)
