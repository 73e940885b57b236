"""The command line contract: exit codes, one-line errors, nothing written on failure, help everywhere."""

import json
import os

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from qconv.cli.main import cli
from tests.conftest import run_model


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.mark.parametrize("command", [[], ["calibrate"], ["quantize"], ["inspect"]])
def test_every_command_has_help(command):
    r = invoke(*command, "--help")
    assert r.exit_code == 0 and "Usage:" in r.output and len(r.output.splitlines()) > 5


def test_quantize_writes_model_and_report(conv_path, conv_data, tmp_path):
    out, rep = tmp_path / "q.onnx", tmp_path / "r.json"
    r = invoke("quantize", conv_path, "-o", out, "--data", conv_data, "--report", rep, "--no-latency")
    assert r.exit_code == 0, r.output
    report = json.loads(rep.read_text())
    umask = os.umask(0)
    os.umask(umask)
    assert rep.stat().st_mode & 0o777 == 0o666 & ~umask and out.stat().st_mode & 0o777 == 0o666 & ~umask
    assert report["schema"] == "qconv.report" and report["version"] == 3
    s = report["size_bytes"]
    assert s["quantized"] == out.stat().st_size and s["ratio"] == pytest.approx(s["original"] / s["quantized"])
    assert report["outputs"]["y"]["cosine"] > 0.999
    assert report["node_summary"]["quantized"] >= 4
    x = np.load(conv_data)
    assert run_model(out, {"x": x})[0].shape == (16, 5)


def test_quantize_data_evaluates_on_its_first_rows_unless_eval_data_is_given(conv_path, tmp_path):
    """Without --eval-data, quantize --data reports fidelity on the first 64 calibration rows (in-sample, and said so);
    --eval-data with the same file evaluates every row."""
    from qconv.jobs.quantize import IN_SAMPLE_ROWS

    data = tmp_path / "x.npy"
    np.save(data, np.random.default_rng(4).normal(0, 1, (100, 3, 8, 8)).astype(np.float32))
    reports = {}
    for name, extra in (("in", []), ("all", ["--eval-data", data])):
        rep = tmp_path / f"{name}.json"
        r = invoke("quantize", conv_path, "-o", tmp_path / f"{name}.onnx", "--data", data, "--report", rep, "--no-latency", *extra)
        assert r.exit_code == 0, r.output
        reports[name] = json.loads(rep.read_text())
    assert IN_SAMPLE_ROWS == 64 and reports["in"]["fidelity"]["rows"] == 64 and reports["in"]["evaluation"]["in_sample"] is True
    assert "the first calibration rows: give --eval-data" in invoke("quantize", conv_path, "-o", tmp_path / "t.onnx", "--data", data,
                                                                    "--no-latency").output
    assert reports["all"]["fidelity"]["rows"] == 100 and reports["all"]["evaluation"]["in_sample"] is False
    assert (tmp_path / "in.onnx").read_bytes() == (tmp_path / "all.onnx").read_bytes()  # the model does not depend on it


def test_calibrate_then_quantize_from_file_and_up_to_date(conv_path, conv_data, tmp_path):
    calib = tmp_path / "c.json"
    r = invoke("calibrate", conv_path, "--data", conv_data, "-o", calib)
    assert r.exit_code == 0, r.output
    doc = json.loads(calib.read_text())
    assert doc["schema"] == "qconv.calibration" and doc["version"] == 2 and "x" in doc["tensors"]
    mtime = calib.stat().st_mtime_ns
    r = invoke("calibrate", conv_path, "--data", conv_data, "-o", calib)
    assert r.exit_code == 0 and "up to date" in r.output and calib.stat().st_mtime_ns == mtime
    r = invoke("quantize", conv_path, "-o", tmp_path / "q.onnx", "--calib", calib, "--eval-data", conv_data, "--json", "--no-latency")
    assert r.exit_code == 0
    assert json.loads(r.stdout)["calibration"]["model_id"] == doc["model_id"]


def test_calibration_from_another_model_is_refused(conv_path, conv_data, tmp_path):
    from tests.conftest import conv_model

    calib = tmp_path / "c.json"
    invoke("calibrate", conv_path, "--data", conv_data, "-o", calib)
    other = tmp_path / "other.onnx"
    onnx.save(conv_model(seed=5), other)
    r = invoke("quantize", other, "-o", tmp_path / "q.onnx", "--calib", calib, "--eval-data", conv_data)
    assert r.exit_code == 1 and "made for another model" in r.output and "--force-calib" in r.output
    assert not (tmp_path / "q.onnx").exists()
    r = invoke("quantize", other, "-o", tmp_path / "q.onnx", "--calib", calib, "--eval-data", conv_data, "--force-calib", "--no-latency", "-q")
    assert r.exit_code == 0 and (tmp_path / "q.onnx").exists()


def test_quantized_output_is_reproducible(conv_path, conv_data, tmp_path):
    for name in ("a.onnx", "b.onnx"):
        assert invoke("quantize", conv_path, "-o", tmp_path / name, "--data", conv_data, "--no-latency", "-q").exit_code == 0
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_inspect_lists_inputs_and_reasons(conv_path):
    r = invoke("inspect", conv_path, "--json")
    assert r.exit_code == 0
    info = json.loads(r.stdout)
    assert info["inputs"][0]["name"] == "x" and info["opset"] == 17
    assert info["would_quantize"]["Conv"]["quantized"] == 2
    r = invoke("inspect", conv_path)
    assert r.exit_code == 0 and "Inputs" in r.output


def bad_model(kind, tmp_path):
    p = tmp_path / "bad.onnx"
    if kind == "missing":
        return tmp_path / "nope.onnx", "model file not found"
    if kind == "empty":
        p.write_bytes(b"")
        return p, "model file is empty"
    if kind == "text":
        p.write_text("this is not a model\n" * 10)
        return p, "not a readable ONNX model"
    if kind == "truncated":
        from tests.conftest import conv_model

        raw = conv_model().SerializeToString()
        p.write_bytes(raw[: len(raw) // 2])
        return p, "not a readable ONNX model"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing", "empty", "text", "truncated"])
def test_bad_model_files(kind, conv_data, tmp_path):
    model, message = bad_model(kind, tmp_path)
    before = snapshot(tmp_path)
    r = invoke("quantize", model, "-o", tmp_path / "q.onnx", "--data", conv_data)
    assert r.exit_code == 1
    assert message in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1
    assert snapshot(tmp_path) == before  # inputs untouched, nothing written


def data_case(kind, tmp_path):
    p = tmp_path / "d.npy"
    if kind == "shape":
        np.save(p, np.zeros((4, 3, 9, 8), np.float32))
        return p, "needs size 8 on axis 2"
    if kind == "dtype":
        np.save(p, np.zeros((4, 3, 8, 8), np.complex64))
        return p, "expects float32"
    if kind == "nan":
        a = np.zeros((4, 3, 8, 8), np.float32)
        a[1, 0, 0, 0] = np.nan
        np.save(p, a)
        return p, "contains NaN or Inf"
    if kind == "empty":
        np.save(p, np.zeros((0, 3, 8, 8), np.float32))
        return p, "no calibration samples"
    if kind == "names":
        p = tmp_path / "d.npz"
        np.savez(p, image=np.zeros((4, 3, 8, 8), np.float32))
        return p, "missing x; unknown image"
    if kind == "missing":
        return tmp_path / "none.npy", "data not found"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["shape", "dtype", "nan", "empty", "names", "missing"])
def test_bad_data(kind, conv_path, tmp_path):
    data, message = data_case(kind, tmp_path)
    before = snapshot(tmp_path)
    r = invoke("quantize", conv_path, "-o", tmp_path / "q.onnx", "--data", data)
    assert r.exit_code == 1, r.output
    assert message in r.output and "Traceback" not in r.output
    assert snapshot(tmp_path) == before


def test_output_equal_to_input_is_refused(conv_path, conv_data):
    before = conv_path.read_bytes()
    r = invoke("quantize", conv_path, "-o", conv_path, "--data", conv_data)
    assert r.exit_code == 1 and "same as the input" in r.output
    assert conv_path.read_bytes() == before


def test_output_in_missing_folder(conv_path, conv_data, tmp_path):
    r = invoke("quantize", conv_path, "-o", tmp_path / "no" / "q.onnx", "--data", conv_data)
    assert r.exit_code == 1 and "output folder does not exist" in r.output


@pytest.mark.parametrize("args,message", [
    ([], "give exactly one of --calib FILE or --data DATA"),
    (["--data", "d.npy", "--eval-labels", "l.npy"], "--eval-labels needs --eval-data"),
    (["--data", "d.npy", "--report", "r.txt"], "the extension picks the format"),
])
def test_usage_errors_exit_2(args, message, conv_path, tmp_path):
    r = invoke("quantize", conv_path, "-o", tmp_path / "q.onnx", *args)
    assert r.exit_code == 2 and message in r.output


def test_unknown_method_is_a_usage_error(conv_path, conv_data, tmp_path):
    r = invoke("calibrate", conv_path, "--data", conv_data, "-o", tmp_path / "c.json", "--method", "magic")
    assert r.exit_code == 2 and "magic" in r.output


def test_corrupt_calibration_file(conv_path, conv_data, tmp_path):
    calib = tmp_path / "c.json"
    calib.write_text('{"schema": "qconv.calibration", "version": 1, "tens')
    r = invoke("quantize", conv_path, "-o", tmp_path / "q.onnx", "--calib", calib, "--eval-data", conv_data)
    assert r.exit_code == 1 and "not valid JSON" in r.output


def test_debug_shows_traceback(tmp_path, conv_data):
    r = CliRunner().invoke(cli, ["--debug", "quantize", str(tmp_path / "x.onnx"), "-o", str(tmp_path / "q.onnx"), "--data", str(conv_data)])
    assert r.exit_code != 0 and r.exception is not None and "model file not found" in str(r.exception)


def test_integer_data_for_a_float_input_is_refused_unless_cast(conv_path, tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (8, 3, 8, 8)).astype(np.int32)
    np.save(tmp_path / "px.npy", pixels)
    r = invoke("quantize", conv_path, "-o", tmp_path / "q.onnx", "--data", tmp_path / "px.npy")
    assert r.exit_code == 1 and "input 'x' expects float32 but the data is int32" in r.output and "--cast-data" in r.output
    assert not (tmp_path / "q.onnx").exists()
    r = invoke("quantize", conv_path, "-o", tmp_path / "q.onnx", "--data", tmp_path / "px.npy", "--cast-data", "-q", "--no-latency")
    assert r.exit_code == 0 and (tmp_path / "q.onnx").exists()
