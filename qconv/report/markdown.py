"""The report dict (schema ``qconv.report`` v2) as compact GitHub-flavoured Markdown.

Meant for CI step summaries and pull-request comments: a title with the mode and the gate verdict, a
summary table, the failed gate checks, the ten worst layers, warnings and the reasons nodes stayed float,
in well under a hundred lines. ``render_markdown(report)`` is pure and deterministic. Text from the report
is escaped so a ``|`` or ``<`` in a tensor name cannot break a table or inject HTML.
"""

from __future__ import annotations

import re

from qconv import clock
from qconv.report.html import (
    DASH,
    as_number,
    float_groups,
    format_bytes,
    format_number,
    format_percent,
    format_sqnr,
    rows,
    section,
    size_change,
    sorted_layers,
    speed_change,
    strings,
    worst_output,
)

WORST_LAYERS = 10
MAX_WARNINGS = 6
MAX_FLOAT_GROUPS = 8
MAX_FAILED = 8

_SPECIAL = re.compile(r"([\\`*_\[\]<>|#~!])")


def render_markdown(report: dict) -> str:
    """The report as a short Markdown document (deterministic, no I/O)."""
    blocks = [_title(report), _summary(report), _failed(report), _tuning(report), _layers(report), _warnings(report),
              _kept_float(report)]
    return "\n\n".join(b for b in blocks if b) + "\n"


def _text(x) -> str:
    """Plain text for Markdown: one line, with every character Markdown or HTML would act on escaped."""
    return _SPECIAL.sub(r"\\\1", " ".join(str(x).split())) if x is not None else DASH


def _code(x, cell: bool = True) -> str:
    """A name as inline code; backticks get a longer fence and, in a table cell, pipes the table escape."""
    text = " ".join(str(x).split())
    text = text.replace("|", "\\|") if cell else text
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if longest else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _row(*cells: str) -> str:
    return "| " + " | ".join(cells) + " |"


def _title(report: dict) -> str:
    gate = section(report, "gate")
    verdict = ""
    if "passed" in gate and gate.get("checks"):  # no checks asked for: no verdict to show
        verdict = " \u2014 \u2705 PASSED" if gate["passed"] else " \u2014 \u274c FAILED"
    model = section(report, "model")
    name = f" {_code(model['input'], cell=False)}" if model.get("input") else ""
    return f"## qconv {_text(report.get('mode') or '?')}{name}{verdict}"


def _summary(report: dict) -> str:
    lines = [_row("", "original", "quantized", "change"), _row("---", "---:", "---:", "---:")]
    size = section(report, "size_bytes")
    if size:
        lines.append(_row("size", format_bytes(size.get("original")), format_bytes(size.get("quantized")),
                          size_change(size.get("ratio"))))
    task = section(report, "task")
    if task:
        metric = "top-1 accuracy" if task.get("metric", "top1") == "top1" else _text(task.get("metric"))
        label = f"{metric} ({format_number(task.get('samples'), 'g')} samples)"
        lines.append(_row(label, format_percent(task.get("original")), format_percent(task.get("quantized")),
                          _points(task.get("drop_points"))))
    lat = section(report, "latency_ms")
    if lat:
        lines.append(_row(f"latency ({format_number(lat.get('runs'), 'g')} runs)",
                          f"{format_number(lat.get('original'), '.2f')} ms",
                          f"{format_number(lat.get('quantized'), '.2f')} ms", speed_change(lat.get("ratio"), lat.get("verdict"))))
        token = lat.get("token") if isinstance(lat.get("token"), dict) else None
        if token:
            lines.append(_row(f"one more token, cache of {format_number(token.get('past'), 'g')} ({format_number(token.get('runs'), 'g')} runs)",
                              f"{format_number(token.get('original'), '.3f')} ms",
                              f"{format_number(token.get('quantized'), '.3f')} ms", speed_change(token.get("ratio"), token.get("verdict"))))
    worst = worst_output(report)
    if worst:
        name, stats = worst
        lines.append(_row(f"worst output {_code(name)}", DASH, f"{format_sqnr(stats.get('sqnr_db'))} dB SQNR",
                          f"cosine {format_number(stats.get('cosine'), '.5f')}"))
    elif report.get("fidelity_reason"):
        lines.append(_row("output fidelity", DASH, DASH, _text(report["fidelity_reason"])))
    bc = section(report, "bias_correction")
    if bc:
        lines.append(_row("bias correction", DASH, f"{format_number(bc.get('layers'), 'g')} layers",
                          f"{_text(bc.get('method'))}, on {format_number(bc.get('rows'), 'g')} rows"))
    lr = section(report, "rounding")
    if lr:
        lines.append(_row("learned rounding", DASH, f"{format_number(lr.get('layers_changed'), 'g')} layers",
                          f"{format_number(lr.get('weights_moved'), 'g')} weights moved; output error x"
                          f"{format_number(lr.get('median_error_ratio'), '.2f')} (median), on {format_number(lr.get('rows'), 'g')} rows"))
    orr = section(report, "output_ranges")
    if orr:
        kept = "" if orr.get("kept", True) else "; left out by the check"
        lines.append(_row("output-aware ranges", DASH, f"{format_number(orr.get('moved'), 'g')} of {format_number(orr.get('tensors'), 'g')} narrowed",
                          f"readers' output error x{format_number(orr.get('median_error_ratio'), '.2f')} (median), on "
                          f"{format_number(orr.get('rows'), 'g')} rows{kept}"))
    sm = section(report, "smoothing")
    if sm:
        lines.append(_row("SmoothQuant", DASH, f"{format_number(sm.get('nodes'), 'g')} MatMul/Gemm inputs",
                          f"alphas {format_number(sm.get('alpha_min'), 'g')}-{format_number(sm.get('alpha_max'), 'g')}, each chosen for its layer"))
    nodes = section(report, "node_summary")
    if nodes:
        lines.append(_row("nodes", DASH, f"{format_number(nodes.get('quantized'), 'g')} quantized",
                          f"{format_number(nodes.get('float'), 'g')} kept float"))
    cost = section(report, "cost")
    if cost:
        longest = clock.longest(cost)
        peak = as_number(cost.get("peak_rss_mb"))
        lines.append(_row("qconv's own run", DASH, f"{format_number(cost.get('seconds'), '.3g')} s" + (f", peak {peak:.0f} MB" if peak else ""),
                          ", ".join(f"{_text(p.get('phase'))} {format_number(p.get('seconds'), '.2g')} s" for p in longest)
                          + (" (the longest phases)" if len(longest) > 1 else "")))
    return "\n".join(lines) if len(lines) > 2 else ""


def _points(drop) -> str:
    """An accuracy drop in points as the signed change: a drop of 0.3 is "−0.30 pts"."""
    v = as_number(drop)
    if v is None:
        return DASH
    return "0.00 pts" if round(v, 2) == 0 else f"{-v:+.2f} pts".replace("-", "\u2212")


def _failed(report: dict) -> str:
    checks = [c for c in rows(section(report, "gate"), "checks") if not c.get("passed")]
    if not checks:
        return ""
    lines = ["**Failed checks**", ""]
    lines += [f"- \u274c {_check(c)}" for c in checks[:MAX_FAILED]]
    if len(checks) > MAX_FAILED:
        lines.append(f"- and {len(checks) - MAX_FAILED} more")
    return "\n".join(lines)


def _check(check: dict) -> str:
    """A failed check in its own words ("max-size-mb: measured 3.2 MB, required <= 2 MB"), else from its values."""
    if check.get("message"):
        return _text(check["message"])
    return (f"{_code(check.get('name') or '?', cell=False)}: measured {_value(check.get('measured'))}, "
            f"required {_value(check.get('required'))}")


def _value(x) -> str:
    return _text(x) if isinstance(x, str) else format_number(x)


def _layers(report: dict) -> str:
    layers = sorted_layers(report)
    if not layers:
        return ""
    shown = layers[:WORST_LAYERS]
    lines = [f"**Worst layers** ({len(shown)} of {len(layers)})", "",
             _row("tensor", "op", "SQNR dB", "cosine", "max abs err"), _row("---", "---", "---:", "---:", "---:")]
    lines += [_row(_code(r.get("tensor") or r.get("node") or "?"), _text(r.get("op_type")),
                   format_sqnr(r.get("sqnr_db")), format_number(r.get("cosine"), ".5f"),
                   format_number(r.get("max_abs_err"))) for r in shown]
    return "\n".join(lines)


def _tuning(report: dict) -> str:
    t = report.get("tuning") or {}
    if not t:
        return ""
    trials = t.get("trials") or []
    base, best = t.get("baseline") or {}, t.get("best") or {}
    state = "reached" if t.get("reached") else "missed (" + ", ".join(strings(t.get("missed"))) + ")"
    lines = [f"**Tuning**: targets {state}; {len(trials)} candidates in {format_number(t.get('seconds'), '.1f')} s "
             f"(budget {_text(t.get('budget'))}) on {t.get('rows')} rows; worst-output cosine "
             f"{format_number(base.get('cosine'), '.5f')} as planned, {format_number(best.get('cosine'), '.5f')} tuned", ""]
    changes = t.get("changes") or []
    if changes:
        lines += [_row("node / tensor", "change", "why"), _row("---", "---", "---")]
        lines += [_row(_code(c.get("what")), _text(c.get("change")), _text(c.get("why"))) for c in changes]
    else:
        lines.append("No change measured better than the plan.")
    return "\n".join(lines)


def _warnings(report: dict) -> str:
    warnings = strings(report.get("warnings"))
    if not warnings:
        return ""
    lines = ["**Warnings**", ""] + [f"- \u26a0\ufe0f {_text(w)}" for w in warnings[:MAX_WARNINGS]]
    if len(warnings) > MAX_WARNINGS:
        lines.append(f"- and {len(warnings) - MAX_WARNINGS} more in the full report")
    return "\n".join(lines)


def _kept_float(report: dict) -> str:
    groups = float_groups(report)
    if not groups:
        return ""
    total = sum(len(names) for _, _, names in groups)
    lines = [f"**Kept in float** ({total} nodes)", "", _row("ops", "count", "reason"), _row("---", "---:", "---")]
    lines += [_row(_text(op), str(len(names)), _text(reason)) for op, reason, names in groups[:MAX_FLOAT_GROUPS]]
    if len(groups) > MAX_FLOAT_GROUPS:
        rest = groups[MAX_FLOAT_GROUPS:]
        lines.append(_row("other", str(sum(len(n) for _, _, n in rest)), f"{len(rest)} more op/reason groups"))
    return "\n".join(lines)
