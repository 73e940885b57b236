"""What pipelines parse and chain: a report whose top-level keys do not depend on the options, gate messages that
print the threshold as given, a missing optional extra as a usage error, and one calibration file that serves every
`quantize` option."""

from __future__ import annotations

import importlib.util
import json
import re

import numpy as np
import pytest
from click.testing import CliRunner

from qconv.cli.main import cli
from tests.conftest import run_model


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_a_plain_calibration_file_serves_quantized_io(conv_path, conv_data, tmp_path):
    calib, out = tmp_path / "c.json", tmp_path / "q.onnx"
    assert invoke("calibrate", conv_path, "--data", conv_data, "-o", calib, "-q").exit_code == 0
    r = invoke("quantize", conv_path, "--calib", calib, "--quantized-io", "uint8", "-o", out, "-q")
    assert r.exit_code == 0, r.output
    x = np.load(conv_data)[:2]
    got = run_model(out, {"x": np.clip(np.round(x / 0.05) + 128, 0, 255).astype(np.uint8)})[0]
    assert got.dtype == np.uint8 and got.shape == (2, 5)


@pytest.mark.parametrize("command", ["calibrate", "quantize"])
def test_a_missing_dask_is_a_usage_error_naming_the_install(command, conv_path, conv_data, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.split(".")[0] in ("dask", "distributed") else real(name, *a))
    out = tmp_path / ("c.json" if command == "calibrate" else "q.onnx")
    r = invoke(command, conv_path, "--data", conv_data, "--executor", "local:2", "-o", out)
    assert r.exit_code == 2
    assert r.output.strip().splitlines()[-1] == (
        "error: --executor local:2 needs Dask, an optional extra that is not installed: pip install 'qconv[dask]'")
    assert "internal error" not in r.output and not out.exists()


def test_a_gate_message_prints_the_threshold_as_given(conv_path, conv_data, tmp_path):
    r = invoke("quantize", conv_path, "--data", conv_data, "-o", tmp_path / "q.onnx", "--min-cosine", "0.9999999", "-q",
               "--no-latency", "--report", tmp_path / "r.json")
    assert r.exit_code == 3
    check = json.loads((tmp_path / "r.json").read_text())["gate"]["checks"][0]
    assert check["message"].endswith("required >= 0.9999999")
    assert f"measured {check['measured']:.8f}" in check["message"]


def _keys(conv_path, tmp_path, name, *options):
    rep = tmp_path / f"{name}.json"
    r = invoke("quantize", conv_path, "-o", tmp_path / f"{name}.onnx", "-q", "--report", rep, *options)
    assert r.exit_code == 0, r.output  # every gate given is loose enough to pass
    return json.loads(rep.read_text())


def test_report_keys_do_not_depend_on_the_options(conv_path, conv_data, tmp_path):
    labels = tmp_path / "labels.npy"
    np.save(labels, np.zeros(16, np.int64))
    calib = tmp_path / "c.json"
    assert invoke("calibrate", conv_path, "--data", conv_data, "-o", calib, "-q").exit_code == 0
    bare = _keys(conv_path, tmp_path, "bare", "--calib", calib)  # the Makefile step: nothing measured, no gate
    full = _keys(conv_path, tmp_path, "full", "--data", conv_data, "--eval-data", conv_data, "--eval-labels", labels, "--min-cosine", "0.5",
                 "--max-latency-ratio", "10", "--speed-fallback", "--max-size-mb", "100")
    assert sorted(bare) == sorted(full)
    assert bare["gate"] == {"passed": True, "checks": [], "failed": []}
    for key in ("fidelity", "task", "latency_ms", "profile", "speed_fallback", "tuning"):
        assert bare[key] is None and isinstance(bare[f"{key}_reason"], str), key
    assert full["task"] is not None and full["task_reason"] is None
    assert full["gate"]["checks"] and bare["version"] == full["version"] == 3


@pytest.mark.parametrize("kind", ["calibration", "plan"])
def test_a_file_of_another_format_version_is_refused_naming_the_version(kind, conv_path, conv_data, tmp_path):
    path = tmp_path / f"{kind}.json"
    if kind == "calibration":
        assert invoke("calibrate", conv_path, "--data", conv_data, "-o", path, "-q").exit_code == 0
    else:
        assert invoke("plan", conv_path, "--data", conv_data, "-o", path, "-q").exit_code == 0
    doc = json.loads(path.read_text())
    current = doc["version"]
    doc["version"] = current - 1  # what the previous format wrote
    path.write_text(json.dumps(doc))
    flag = "--calib" if kind == "calibration" else "--plan"
    out = tmp_path / "q.onnx"
    r = invoke("quantize", conv_path, flag, path, "-o", out)
    assert r.exit_code == 1 and not out.exists()
    line = r.output.strip().splitlines()[-1]
    assert f"{kind} schema version {current - 1}; this qconv reads version {current}: re-run qconv " in line, line


@pytest.mark.parametrize("name", ["report", "plan", "calibration"])
def test_schema_command_prints_the_shipped_schema(name):
    r = invoke("schema", name)
    assert r.exit_code == 0
    doc = json.loads(r.output)
    assert doc["properties"]["schema"]["const"] == f"qconv.{name}" and doc["$schema"].endswith("2020-12/schema")


def test_an_unknown_schema_is_a_usage_error():
    r = invoke("schema", "tuning")
    assert r.exit_code == 2 and "'tuning' is not one of 'report', 'plan', 'calibration'" in r.output


def test_the_schema_rejects_a_report_missing_a_key(conv_path, conv_data, tmp_path):
    import jsonschema

    from qconv.jobs.calibrate import schema

    rep = tmp_path / "r.json"
    assert invoke("quantize", conv_path, "--data", conv_data, "-o", tmp_path / "q.onnx", "-q", "--report", rep).exit_code == 0
    doc = json.loads(rep.read_text())
    jsonschema.validate(doc, schema("report"))
    del doc["gate"]
    with pytest.raises(jsonschema.ValidationError, match="'gate' is a required property"):
        jsonschema.validate(doc, schema("report"))


def test_report_json_of_compare_and_quantize_share_one_schema(conv_path, conv_data, tmp_path):
    import jsonschema

    from qconv.jobs.calibrate import schema

    q = invoke("quantize", conv_path, "--data", conv_data, "-o", tmp_path / "q.onnx", "--json", "--no-latency")
    c = invoke("report", conv_path, tmp_path / "q.onnx", "--data", conv_data, "--json", "--no-latency")
    assert q.exit_code == 0 and c.exit_code == 0, c.output
    quantized, compared = json.loads(q.stdout), json.loads(c.stdout)
    for doc in (quantized, compared):
        jsonschema.validate(doc, schema("report"))
    assert sorted(quantized) == sorted(compared) and compared["mode"] == "compare"


def test_the_clock_sums_calls_of_a_phase_and_names_a_phase_within_another(monkeypatch):
    """Phases are listed in the order first entered, each with its calls summed; an inner phase is named after its
    outer one; outside a recording nothing is kept."""
    from qconv import clock

    now = iter(float(t) for t in range(100))
    monkeypatch.setattr(clock.time, "perf_counter", lambda: next(now))

    @clock.timed("inner")
    def inner():
        return 7

    assert inner() == 7 and clock.summary() is None  # no recording: a plain call
    with clock.recording():  # t = 0
        with clock.phase("outer"):  # 1
            inner()  # 2 -> 3
            inner()  # 4 -> 5
        # outer ends at 6
        inner()  # 7 -> 8
        got = clock.summary()  # 9
    assert got["seconds"] == 9.0
    assert got["phases"] == [{"phase": "outer", "seconds": 5.0, "calls": 1}, {"phase": "outer > inner", "seconds": 2.0, "calls": 2},
                             {"phase": "inner", "seconds": 1.0, "calls": 1}]
    assert clock.summary() is None  # the recording ended with its block


def test_a_reports_cost_is_what_the_run_took_phase_by_phase(conv_path, conv_data, tmp_path):
    """quantize --data and report record their own cost: the phases the run went through, each with its calls; the
    outer phases add up to at most the whole run; the process's peak memory."""
    rep, cmp, md = tmp_path / "r.json", tmp_path / "c.json", tmp_path / "r.md"
    assert invoke("quantize", conv_path, "--data", conv_data, "-o", tmp_path / "q.onnx", "-q", "--no-latency", "--report", rep,
                  "--report", md).exit_code == 0
    assert re.search(r"\| qconv's own run \| — \| [0-9.]+ s, peak [0-9]+ MB \| \w", md.read_text())
    assert invoke("report", conv_path, tmp_path / "q.onnx", "--data", conv_data, "-q", "--no-latency", "--report", cmp).exit_code == 0
    cost = json.loads(rep.read_text())["cost"]
    phases = {p["phase"]: p for p in cost["phases"]}
    for name in ("load", "statistics", "plan", "rewrite", "evaluation", "write", "report"):
        assert phases[name]["calls"] >= 1 and phases[name]["seconds"] >= 0, name
    outer = sum(p["seconds"] for p in cost["phases"] if " > " not in p["phase"])
    assert outer <= cost["seconds"] + 0.01 and cost["peak_rss_mb"] > 50
    assert all(p["phase"].split(" > ")[0] in phases for p in cost["phases"])  # an inner phase's outer one is listed
    compared = json.loads(cmp.read_text())["cost"]
    assert [p["phase"] for p in compared["phases"]] == ["evaluation"] and compared["seconds"] >= compared["phases"][0]["seconds"]


def test_calibrate_says_what_its_run_took(conv_path, conv_data, tmp_path):
    """calibrate prints its time and longest phases (the file holds no timing: the same bytes every run)."""
    from qconv.cli.calibrate import cost_text

    out = tmp_path / "c.json"
    r = invoke("calibrate", conv_path, "--data", conv_data, "-o", out)
    assert r.exit_code == 0 and re.search(r"wrote .*c\.json: \d+ tensors from \d+ feeds in [0-9.]+ s", r.output), r.output
    first = out.read_bytes()
    out.unlink()
    assert invoke("calibrate", conv_path, "--data", conv_data, "-o", out).exit_code == 0 and out.read_bytes() == first
    cost = {"seconds": 9.104, "peak_rss_mb": 400.0, "phases": [
        {"phase": "load", "seconds": 0.29, "calls": 1}, {"phase": "SmoothQuant", "seconds": 4.31, "calls": 1},
        {"phase": "SmoothQuant > rewrite", "seconds": 5.0, "calls": 2}, {"phase": "statistics", "seconds": 4.07, "calls": 1},
        {"phase": "plan", "seconds": 0.01, "calls": 1}]}
    assert cost_text(cost) == " in 9.1 s (SmoothQuant 4.3 s, statistics 4.1 s, load 0.29 s)"
    assert cost_text(None) == ""
