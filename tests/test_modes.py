"""Every mode through the CLI and the library: the form onnxruntime runs, fidelity, and option checks."""

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from qconv import pipeline
from qconv.cli.main import cli
from qconv.config import QuantConfig
from qconv.rewrite.qoperator import fold_qoperator
from tests.conftest import SAMPLES, optimized_ops, run_model

T = SAMPLES / "tiny_transformer"
D = SAMPLES / "digits_cnn"


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def quantize(model_dir, ext, tmp_path, *args):
    out = tmp_path / "q.onnx"
    r = invoke("quantize", model_dir / "model.onnx", "-o", out, "--data", model_dir / f"calib.{ext}",
               "--eval-data", model_dir / f"eval.{ext}", "--eval-labels", model_dir / "eval_labels.npy",
               "--batch-size", "64", "--json", "--no-latency", "-q", *args)
    assert r.exit_code == 0, r.output
    return out, json.loads(r.stdout)


def test_dynamic_transformer_runs_fused_integer_matmuls(tmp_path):
    out, report = quantize(T, "npz", tmp_path, "--mode", "dynamic")
    assert report["mode"] == "dynamic" and report["calibration"] is None
    assert report["outputs"]["logits"]["cosine"] >= 0.999 and report["task"]["drop_points"] <= 0.5
    ops = optimized_ops(out, tmp_path)
    assert ops.get("DynamicQuantizeMatMul", 0) + ops.get("MatMulIntegerToFloat", 0) >= 12
    assert ops.get("MatMul", 0) <= 2  # only the two activation x activation attention products stay float


def test_dynamic_keeps_convs_float_and_says_why(tmp_path):
    _, report = quantize(D, "npy", tmp_path, "--mode", "dynamic")
    convs = [k for k in report["node_summary"]["kept_float"] if k["op_type"] == "Conv"]
    assert len(convs) == 3 and all("ConvInteger" in k["reason"] for k in convs)


def test_qoperator_is_the_qdq_plan_folded(tmp_path):
    prep = pipeline.load(D / "model.onnx", QuantConfig())
    calib = pipeline.calibrate(prep, pipeline.feeds_for(prep, D / "calib.npy", 32))
    qdq = pipeline.quantize(prep, calib, QuantConfig()).model
    qop, folded = fold_qoperator(qdq)
    onnx.checker.check_model(qop)
    assert sorted(folded.values()).count("QLinearConv") == 3 and "QGemm" in folded.values()
    assert not any(n.op_type == "DequantizeLinear" for n in qop.graph.node)
    x = np.load(D / "eval.npy")[:64]
    np.testing.assert_array_equal(run_model(qdq, {"input": x})[0], run_model(qop, {"input": x})[0])


def test_qoperator_through_the_cli(tmp_path):
    out, report = quantize(T, "npz", tmp_path, "--format", "qoperator")
    assert report["config"]["format"] == "qoperator" and report["qoperator"]["MatMulIntegerToFloat"] >= 8
    assert report["outputs"]["logits"]["cosine"] >= 0.999
    assert {n.op_type for n in onnx.load(str(out)).graph.node} >= {"MatMulIntegerToFloat", "QLinearMatMul"}


def test_a16w8_uses_16_bit_activations_and_keeps_accuracy(tmp_path):
    out, report = quantize(D, "npy", tmp_path, "--mode", "a16w8")
    m = onnx.load(str(out))
    zps = {t.data_type for t in m.graph.initializer if t.name.endswith("_zero_point")}
    assert onnx.TensorProto.UINT16 in zps and onnx.TensorProto.INT8 in zps
    assert abs(report["task"]["drop_points"]) <= 0.1
    assert report["outputs"]["logits"]["sqnr_db"] > 35


def test_int4_on_a_cnn_warns_that_nothing_changed(tmp_path):
    _, report = quantize(D, "npy", tmp_path, "--mode", "int4")
    assert report["node_summary"]["quantized"] == 0 and any("nothing was quantized" in w for w in report["warnings"])


@pytest.mark.parametrize("args,message", [
    (["--mode", "fp16", "--format", "qoperator"], "--mode fp16 cannot be written as --format qoperator"),
    (["--mode", "int4", "--format", "qdq"], "--mode int4 cannot be written as --format qdq"),
    (["--mode", "dynamic", "--calib", "c.json"], "--mode dynamic takes no calibration file"),
    (["--mode", "int4", "--block-size", "48"], "--block-size must be one of 16, 32, 64, 128, 256"),
    (["--mode", "a16w8", "--activation-type", "uint8", "--data", "d.npy"], "--mode a16w8 takes --activation-type uint16 or int16"),
    (["--mode", "int8"], "needs calibration: give exactly one of --calib FILE or --data DATA"),
])
def test_incompatible_options_exit_2_and_write_nothing(args, message, tmp_path):
    r = invoke("quantize", D / "model.onnx", "-o", tmp_path / "q.onnx", *args)
    assert r.exit_code == 2, r.output
    assert message in r.output and not (tmp_path / "q.onnx").exists()


def test_unknown_mode_is_a_usage_error(tmp_path):
    r = invoke("quantize", D / "model.onnx", "-o", tmp_path / "q.onnx", "--mode", "int3")
    assert r.exit_code == 2 and "int3" in r.output


def test_int4_honours_exclude_ops(tmp_path):
    _, report = quantize(T, "npz", tmp_path, "--mode", "int4", "--exclude-ops", "Gather")
    assert {w["op_type"] for w in report["int4"]["weights"]} == {"MatMul"}
