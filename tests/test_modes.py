"""Every mode through the CLI and the library: the form onnxruntime runs, fidelity, and option checks."""

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from qconv import pipeline
from qconv.cli.main import cli
from qconv.plan.config import QuantConfig
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


def test_qdq_model_converts_to_qoperator_without_recalibration(conv_path, conv_data, tmp_path):
    """A QDQ model (as QAT exports write them; here qconv's own) becomes QLinear ops with its own scales."""
    import json

    r = CliRunner().invoke(cli, ["quantize", str(conv_path), "--data", str(conv_data), "-o", str(tmp_path / "qdq.onnx"), "-q", "--no-latency"])
    assert r.exit_code == 0
    r = CliRunner().invoke(cli, ["quantize", str(tmp_path / "qdq.onnx"), "--format", "qoperator", "-o", str(tmp_path / "qop.onnx"),
                                 "--eval-data", str(conv_data), "--json", "--no-latency"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["converted_from"] == "qdq" and report["qoperator"]["QLinearConv"] == 2
    assert report["outputs"]["y"]["cosine"] > 0.9999  # against the QDQ model itself
    ops = {n.op_type for n in onnx.load(tmp_path / "qop.onnx").graph.node}
    assert "QLinearConv" in ops and "Conv" not in ops
    x = np.load(conv_data)
    np.testing.assert_allclose(run_model(tmp_path / "qop.onnx", {"x": x})[0], run_model(tmp_path / "qdq.onnx", {"x": x})[0], atol=0.05)
    # a QOperator model has no QDQ pairs left to convert, and a QDQ model is not quantized again
    r = CliRunner().invoke(cli, ["quantize", str(tmp_path / "qop.onnx"), "--format", "qoperator", "-o", str(tmp_path / "again.onnx")])
    assert r.exit_code == 1 and "has no QuantizeLinear/DequantizeLinear pairs to convert" in r.output
    r = CliRunner().invoke(cli, ["quantize", str(tmp_path / "qdq.onnx"), "--data", str(conv_data), "-o", str(tmp_path / "again.onnx")])
    assert r.exit_code == 1 and "is already quantized" in r.output and "pass --format qoperator alone" in r.output


@pytest.mark.parametrize("fmt", ["qdq", "qoperator"])
def test_quantized_io_makes_integer_inputs_and_outputs(fmt, tmp_path):
    import json

    d = SAMPLES / "digits_cnn"
    out = tmp_path / "q.onnx"
    r = CliRunner().invoke(cli, ["quantize", str(d / "model.onnx"), "--data", str(d / "calib.npy"), "--quantized-io", "uint8",
                                 "--format", fmt, "-o", str(out), "--eval-data", str(d / "eval.npy"), "--eval-labels",
                                 str(d / "eval_labels.npy"), "--batch-size", "100", "--json", "--no-latency"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    io = report["quantized_io"]
    assert io["input"]["role"] == "input" and io["logits"]["role"] == "output" and io["input"]["type"] == "uint8"
    assert report["task"]["drop_points"] <= 1.0 and report["outputs"]["logits"]["cosine"] > 0.99  # measured through the I/O
    m = onnx.load(out)
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert m.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert json.loads({p.key: p.value for p in m.metadata_props}["qconv.quantized_io"]) == io
    x = np.load(d / "eval.npy")[:50]
    q = np.clip(np.rint(x / io["input"]["scale"]) + io["input"]["zero_point"], 0, 255).astype(np.uint8)
    y = (run_model(out, {"input": q})[0].astype(np.float32) - io["logits"]["zero_point"]) * io["logits"]["scale"]
    assert (y.argmax(1) == run_model(d / "model.onnx", {"input": x})[0].argmax(1)).mean() >= 0.98
    r = CliRunner().invoke(cli, ["inspect", str(out)])
    assert r.exit_code == 0 and "Integer inputs/outputs" in r.output and "0.00392157" in r.output


@pytest.mark.parametrize("args,message", [
    (["--mode", "dynamic", "--quantized-io", "uint8"], "--quantized-io needs --mode int8"),
    (["--quantized-io", "uint8", "--activation-type", "int8", "--data", "d.npy"], "--quantized-io uint8 needs uint8 activations"),
])
def test_quantized_io_usage_errors(args, message, conv_path, tmp_path):
    r = CliRunner().invoke(cli, ["quantize", str(conv_path), "-o", str(tmp_path / "q.onnx"), *args])
    assert r.exit_code == 2 and message in r.output


def test_qat_exported_model_converts_bit_exactly(tmp_path):
    """sample_models/digits_cnn_qat: torch.ao QAT, exported as QDQ (Q->Clip->DQ activations, Q/DQ weights, float
    biases, Relu before Q, MaxPool between DQ and Conv): every Conv becomes QLinearConv, outputs unchanged."""
    import json

    d = SAMPLES / "digits_cnn_qat"
    r = CliRunner().invoke(cli, ["quantize", str(d / "model.onnx"), "--format", "qoperator", "-o", str(tmp_path / "q.onnx"),
                                 "--eval-data", str(d / "eval.npy"), "--eval-labels", str(d / "eval_labels.npy"),
                                 "--batch-size", "100", "--json", "--no-latency"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["qoperator"] == {"QLinearConv": 3}
    assert report["task"]["drop_points"] == 0.0 and report["outputs"]["logits"]["cosine"] > 0.99999
    assert any("Relu before a QuantizeLinear" in n for n in report["model"]["intake"])
    ops = {n.op_type for n in onnx.load(tmp_path / "q.onnx").graph.node}
    assert "Conv" not in ops and "QLinearConv" in ops
    r = CliRunner().invoke(cli, ["inspect", str(d / "model.onnx")])
    assert r.exit_code == 0 and "already quantized" in r.output and "--format qoperator" in r.output


def test_report_compares_an_integer_io_model(tmp_path):
    d = SAMPLES / "digits_cnn"
    r = CliRunner().invoke(cli, ["quantize", str(d / "model.onnx"), "--data", str(d / "calib.npy"), "--quantized-io", "uint8",
                                 "-o", str(tmp_path / "q.onnx"), "-q", "--no-latency"])
    assert r.exit_code == 0
    r = CliRunner().invoke(cli, ["report", str(d / "model.onnx"), str(tmp_path / "q.onnx"), "--data", str(d / "eval.npy"),
                                 "--batch-size", "100", "--json", "--no-latency", "--layer-samples", "0"])
    assert r.exit_code == 0, r.output
    import json

    assert json.loads(r.stdout)["outputs"]["logits"]["cosine"] > 0.99
