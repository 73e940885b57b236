"""--metric MODULE:FUNCTION: a user's task metric, reported, gated, and what tuning guards (qconv.measure.usermetric)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from qconv.errors import QconvError, UsageError
from qconv.measure import usermetric
from qconv.measure.tally import Tally
from tests.conftest import SAMPLES

METRICS_PY = '''
import numpy as np

def agree(ref, got):
    """rows whose class is the float model's: (total, count)"""
    r, q = ref["logits"].argmax(-1), got["logits"].argmax(-1)
    return float((r == q).sum()), float(r.size)

def mean_abs(ref, got):
    return 1.0 - float(np.abs(ref["logits"] - got["logits"]).mean())

def broken(ref, got):
    raise ValueError("no such output 'boxes'")

def wrong_type(ref, got):
    return "good"
'''


@pytest.fixture
def metrics_file(tmp_path):
    f = tmp_path / "mymetrics.py"
    f.write_text(METRICS_PY)
    return f


def test_a_metric_sums_totals_and_counts_over_feeds(metrics_file):
    m = usermetric.load(f"{metrics_file}:agree")
    t = Tally(["logits"], metric=m)
    ref = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]], np.float32)
    t.add([ref], [np.array([[0.2, 0.8], [0.1, 0.9], [0.3, 0.7]], np.float32)], rows=3)  # 2 of 3 agree
    t.add([ref[:1]], [ref[:1]], rows=1)  # 1 of 1
    assert t.metric_value == pytest.approx(3 / 4)
    assert t.metrics().metric == pytest.approx(0.75)
    assert t.summary()["metric"] == {"name": f"{metrics_file}:agree", "value": 0.75, "count": 4.0}
    other = Tally(["logits"], metric=m)
    other.add([ref], [ref], rows=3)
    t.merge(other)
    assert t.metric_value == pytest.approx(6 / 7)
    plain = usermetric.load(f"{metrics_file}:mean_abs")
    t2 = Tally(["logits"], metric=plain)
    t2.add([ref], [ref], rows=3)
    assert t2.metric_value == pytest.approx(1.0)


@pytest.mark.parametrize("spec, message", [
    ("nocolon", "give MODULE:FUNCTION"),
    ("qconv_no_such_module_xyz:f", "cannot import qconv_no_such_module_xyz"),
    ("./missing_metrics.py:f", "no such file"),
])
def test_a_bad_metric_spec_is_a_usage_error(spec, message):
    with pytest.raises(UsageError, match=message):
        usermetric.load(spec)


def test_a_missing_function_and_a_failing_one_say_which(metrics_file):
    with pytest.raises(UsageError, match="has no function nope"):
        usermetric.load(f"{metrics_file}:nope")
    ref = [np.zeros((1, 2), np.float32)]
    with pytest.raises(QconvError, match=r"--metric .*:broken failed: ValueError: no such output 'boxes'"):
        Tally(["logits"], metric=usermetric.load(f"{metrics_file}:broken")).add(ref, ref)
    with pytest.raises(QconvError, match="returned str: return a number or a \\(total, count\\) pair"):
        Tally(["logits"], metric=usermetric.load(f"{metrics_file}:wrong_type")).add(ref, ref)


def qconv(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "qconv", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def test_quantize_reports_and_gates_on_the_users_metric(metrics_file, tmp_path):
    d = SAMPLES / "digits_cnn"
    base = ["quantize", d / "model.onnx", "--data", d / "calib.npy", "--eval-data", d / "eval.npy", "--no-latency",
            "--layer-samples", "0", "-q"]
    r = qconv(*base, "-o", tmp_path / "q.onnx", "--metric", "mymetrics:agree", "--report", tmp_path / "r.json", cwd=metrics_file.parent)
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "r.json").read_text())
    got = rep["fidelity"]["metric"]
    assert got["name"] == "mymetrics:agree" and got["count"] == rep["fidelity"]["rows"] > 0
    assert got["value"] == pytest.approx(rep["fidelity"]["top1_agreement"])  # the same thing, measured by the user's code
    # a gate above it fails with exit 3 and names it
    r = qconv(*base, "-o", tmp_path / "q2.onnx", "--metric", f"{metrics_file}:agree", "--min-metric", "1.01")
    assert r.returncode == 3
    assert "gate failed: min-metric: measured" in r.stderr and "required >= 1.01" in r.stderr
    # without --metric the gate is a usage error, before any work
    r = qconv(*base, "-o", tmp_path / "q3.onnx", "--min-metric", "0.5")
    assert r.returncode == 2 and "--min-metric gates on your task metric: give --metric MODULE:FUNCTION" in r.stderr
    assert not (tmp_path / "q3.onnx").exists()
    r = qconv(*base, "-o", tmp_path / "q4.onnx", "--metric", "nocolon")
    assert r.returncode == 2 and "give MODULE:FUNCTION" in r.stderr and not (tmp_path / "q4.onnx").exists()
