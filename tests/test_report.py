"""Reports CI acts on: per-layer fidelity, gates with exit 3, several formats, any two models compared."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from qconv.cli.main import cli
from tests.conftest import SAMPLES

D = SAMPLES / "digits_cnn"


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def quantize(tmp_path, *extra):
    return invoke("quantize", D / "model.onnx", "-o", tmp_path / "q.onnx", "--data", D / "calib.npy",
                  "--eval-data", D / "eval.npy", "--eval-labels", D / "eval_labels.npy", "--batch-size", "100", *extra)


def test_failed_gate_exits_3_and_still_writes_everything(tmp_path):
    r = quantize(tmp_path, "--min-sqnr", "80", "--max-top1-drop", "1", "--report", tmp_path / "r.json", "--no-latency")
    assert r.exit_code == 3
    assert "gate failed: min-sqnr: measured" in r.output and "required >= 80 dB" in r.output
    assert "max-top1-drop" not in r.output.split("gate failed")[-1]  # only the failing gate is named
    report = json.loads((tmp_path / "r.json").read_text())
    assert (tmp_path / "q.onnx").exists()
    assert report["gate"]["passed"] is False and report["gate"]["failed"] == ["min-sqnr"]
    assert {c["name"]: c["passed"] for c in report["gate"]["checks"]} == {"min-sqnr": False, "max-top1-drop": True}


def test_passing_gates_exit_0(tmp_path):
    r = quantize(tmp_path, "--min-cosine", "0.99", "--max-size-mb", "1", "--max-top1-drop", "0.5", "--no-latency")
    assert r.exit_code == 0 and "all 3 quality gates passed" in r.output


@pytest.mark.parametrize("args,message", [
    (["--max-top1-drop", "1"], "--max-top1-drop needs --eval-labels"),
    (["--max-latency-ratio", "1", "--no-latency", "--eval-data", D / "eval.npy"], "--max-latency-ratio needs the latency measurement"),
])
def test_gates_without_what_they_measure_are_usage_errors(args, message, tmp_path):
    r = invoke("quantize", D / "model.onnx", "-o", tmp_path / "q.onnx", "--data", D / "calib.npy", *args)
    assert r.exit_code == 2 and message in r.output and not (tmp_path / "q.onnx").exists()


def test_per_layer_fidelity_is_ranked_and_joined_to_nodes(tmp_path):
    r = quantize(tmp_path, "--json", "--no-latency", "-q")
    report = json.loads(r.stdout)
    sqnrs = [row["sqnr_db"] for row in report["layers"]]
    assert len(sqnrs) >= 5 and sqnrs == sorted(sqnrs)
    assert report["layers"][0]["sqnr_db"] < report["outputs"]["logits"]["sqnr_db"] + 10
    rows = {row["name"]: row for row in report["nodes"]}
    relu = rows["/features/features.2/Relu"]
    assert relu["quantized"] and relu["scale"] > 0 and relu["zero_point"] == 0 and relu["sqnr_db"] > 20
    hist = next(iter(report["histograms"].values()))
    assert len(hist["edges"]) == len(hist["counts"]) + 1 and hist["range"][0] <= hist["range"][1]
    assert report["size_by_op"]["Conv"]["original"] > 3 * report["size_by_op"]["Conv"]["quantized"]


def test_report_formats_by_extension(tmp_path):
    paths = [tmp_path / "r.json", tmp_path / "r.html", tmp_path / "r.md"]
    r = quantize(tmp_path, "--no-latency", "-q", *[a for p in paths for a in ("--report", p)])
    assert r.exit_code == 0, r.output
    assert json.loads(paths[0].read_text())["schema"] == "qconv.report"
    html = paths[1].read_text()
    assert html.lstrip().lower().startswith("<!doctype html") and "<svg" in html and "http://" not in html
    md = paths[2].read_text().splitlines()
    header = next(i for i, line in enumerate(md) if line.startswith("|") and "original" in line and "quantized" in line)
    assert md[header + 1].replace(" ", "").startswith("|---|---:|---:|---:|")
    assert any(line.startswith("| size |") for line in md[header + 2:])


def test_compare_a_model_made_by_onnxruntime(tmp_path):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    calib = np.load(D / "calib.npy")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.k = 0

        def get_next(self):
            self.k += 1
            return {"input": calib[self.k - 1:self.k]} if self.k <= 32 else None

    ort_model = tmp_path / "ort.onnx"
    quantize_static(str(D / "model.onnx"), str(ort_model), Reader(), quant_format=QuantFormat.QDQ, per_channel=True)
    # onnxruntime's int8 weights saturate the 16-bit sums of x86 CPUs without VNNI: cosine 0.989 on an AVX2 EPYC
    r = invoke("report", D / "model.onnx", ort_model, "--data", D / "eval.npy", "--eval-labels", D / "eval_labels.npy",
               "--batch-size", "100", "--json", "--no-latency", "-q", "--min-cosine", "0.98")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["mode"] == "compare" and report["task"]["original"] > 0.95
    assert report["layers"] and all(row["sqnr_db"] is not None for row in report["layers"])
    assert sum(row["quantized"] for row in report["nodes"]) >= 3
    assert report["gate"]["passed"]


def test_compare_refuses_to_overwrite_inputs(tmp_path):
    r = invoke("report", D / "model.onnx", D / "model.onnx", "--data", D / "eval.npy", "--report", D / "model.onnx")
    assert r.exit_code == 2
