"""Quality gates: the thresholds a CI pipeline sets, checked on the report. Failing any gives exit code 3."""

from __future__ import annotations

import math

from qconv.measure.thresholds import Thresholds


def _worst(report: dict, key: str) -> float | None:
    vals = []
    for v in report.get("outputs", {}).values():
        x = v.get(key)
        vals.append(math.inf if x == "inf" else -math.inf if x == "-inf" else float(x))
    return min(vals) if vals else None


def evaluate_gates(gates: Thresholds, report: dict) -> dict:
    """{"passed", "checks": [{name, measured, required, passed, message}], "failed": [names]}."""
    checks = []

    def add(name, measured, required, ok, unit, relation):
        given = repr(float(required)).removesuffix(".0")  # the threshold as the user wrote it, never rounded
        decimals = len(given.partition(".")[2])
        fine = name in ("min-cosine", "min-agreement")
        shown = "inf" if measured == math.inf else f"{measured:.{max(6 if fine else 0, decimals + 1)}f}" if fine or decimals > 2 \
            else f"{measured:.4g}"
        checks.append({"name": name, "measured": "inf" if measured == math.inf else measured, "required": required,
                       "passed": bool(ok), "message": f"{name}: measured {shown}{unit}, required {relation} {given}{unit}"})

    if gates.min_sqnr is not None:
        m = _worst(report, "sqnr_db")
        add("min-sqnr", m, gates.min_sqnr, m >= gates.min_sqnr, " dB", ">=")
    if gates.min_cosine is not None:
        m = _worst(report, "cosine")
        add("min-cosine", m, gates.min_cosine, m >= gates.min_cosine, "", ">=")
    if gates.min_agreement is not None:
        m = (report.get("fidelity") or {}).get("top1_agreement")
        if m is None:
            checks.append({"name": "min-agreement", "measured": None, "required": gates.min_agreement, "passed": False,
                           "message": "min-agreement: the first output is not class scores (no top-1 agreement to measure)"})
        else:
            add("min-agreement", m, gates.min_agreement, m >= gates.min_agreement, "", ">=")
    if gates.min_metric is not None:
        got = (report.get("fidelity") or {}).get("metric") or {}
        m = got.get("value")
        if m is None:
            checks.append({"name": "min-metric", "measured": None, "required": gates.min_metric, "passed": False,
                           "message": f"min-metric: {got.get('name', '--metric')} scored no rows"})
        else:
            add("min-metric", m, gates.min_metric, m >= gates.min_metric, "", ">=")
    if gates.max_top1_drop is not None:
        m = report["task"]["drop_points"]
        add("max-top1-drop", m, gates.max_top1_drop, m <= gates.max_top1_drop, " points", "<=")
    if gates.max_size_mb is not None:
        m = report["size_bytes"]["quantized"] / 1e6
        add("max-size-mb", m, gates.max_size_mb, m <= gates.max_size_mb, " MB", "<=")
    if gates.max_latency_ratio is not None:
        m = report["latency_ms"]["ratio"]
        add("max-latency-ratio", m, gates.max_latency_ratio, m <= gates.max_latency_ratio, "x", "<=")
    failed = [c["name"] for c in checks if not c["passed"]]
    return {"passed": not failed, "checks": checks, "failed": failed}
