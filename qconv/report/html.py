"""The report dict (schema ``qconv.report`` v2) as one self-contained HTML page.

``render_html(report)`` is pure: no file I/O, no clock, no randomness, so the same dict always gives the
same string. The page needs nothing but itself: the stylesheet is inline, the charts are inline SVG, there
is no JavaScript and no reference to the network. Every string taken from the report is escaped.

Optional sections (task, latency, gate, calibration, histograms, ...) may be missing or null; the page
leaves out what it has no data for. The small formatters near the top are shared with the Markdown
renderer.
"""

from __future__ import annotations

import collections
import html
import json
import math
import re

MAX_SQNR_BARS = 40
MAX_SIZE_OPS = 16
MAX_HIST_BINS = 96
OPEN_TABLE_ROWS = 25
SQNR_BAD_DB = 10.0
SQNR_WARN_DB = 20.0
DASH = "\u2014"
_QUOTED = re.compile(r"(?<!\w)'[^']*'(?!\w)")
_RELATION = re.compile(r"required (<=|>=|<|>)")

# ---------------------------------------------------------------------------------------------- formatting


def as_number(x) -> float | None:
    """A report value as a float: numbers as they are, "inf"/"-inf" as infinities, anything else None."""
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    if isinstance(x, str) and x.strip().lower() in ("inf", "+inf", "-inf", "infinity", "-infinity"):
        return -math.inf if x.strip().startswith("-") else math.inf
    return None


def format_sqnr(x) -> str:
    """SQNR in dB without the unit: one decimal, "∞" for an exact match, a dash when unknown."""
    v = as_number(x)
    if v is None or math.isnan(v):
        return DASH
    if math.isinf(v):
        return "\u221e" if v > 0 else "\u2212\u221e"
    return f"{v:.1f}"


def format_number(x, spec: str = ".4g") -> str:
    """A number with a format spec, a dash when missing or not a number."""
    v = as_number(x)
    if v is None:
        return DASH
    if math.isinf(v):
        return "\u221e" if v > 0 else "\u2212\u221e"
    return format(v, spec)


def format_bytes(n) -> str:
    """Bytes in binary units: 812 B, 12.4 KiB, 3.1 MiB."""
    v = as_number(n)
    if v is None or not math.isfinite(v):
        return DASH
    units = ("B", "KiB", "MiB", "GiB")
    step = 0
    while abs(v) >= 1024 and step < len(units) - 1:
        v /= 1024
        step += 1
    return f"{v:.0f} B" if step == 0 else f"{v:.1f} {units[step]}"


def format_percent(fraction) -> str:
    """A fraction in [0, 1] as a percentage with two decimals."""
    v = as_number(fraction)
    return DASH if v is None else f"{100.0 * v:.2f}%"


def speed_change(ratio, verdict=None) -> str:
    """The latency ratio (quantized / original time) in words: "1.64× faster", "1.20× slower"; with the
    measurement's verdict "same within noise", it never claims either."""
    v = as_number(ratio)
    if v is None or v <= 0 or not math.isfinite(v):
        return DASH
    if verdict == "same within noise":
        return f"{v:.2f}\u00d7 time (same within noise)"
    return f"{1.0 / v:.2f}\u00d7 faster" if v < 1.0 else f"{v:.2f}\u00d7 slower"


def size_change(ratio) -> str:
    """The size ratio (original / quantized bytes) in words: "3.97× smaller"."""
    v = as_number(ratio)
    if v is None or v <= 0 or not math.isfinite(v):
        return DASH
    return f"{v:.2f}\u00d7 smaller" if v >= 1.0 else f"{1.0 / v:.2f}\u00d7 larger"


def strings(value) -> list[str]:
    """An optional list of strings (warnings, notes, tensor names), [] when missing or not a list."""
    return [str(x) for x in value] if isinstance(value, list) else []


def section(report: dict, key: str) -> dict:
    """An optional dict-valued section, {} when missing, null or of the wrong type."""
    value = report.get(key)
    return value if isinstance(value, dict) else {}


def rows(report: dict, key: str) -> list[dict]:
    """An optional list-of-dicts section, [] when missing, null or of the wrong type."""
    value = report.get(key)
    return [r for r in value if isinstance(r, dict)] if isinstance(value, list) else []


def worst_output(report: dict) -> tuple[str, dict] | None:
    """(name, stats) of the graph output with the lowest SQNR, or None without outputs."""
    outputs = [(str(k), v) for k, v in section(report, "outputs").items() if isinstance(v, dict)]
    if not outputs:
        return None
    return min(outputs, key=lambda kv: _sort_key(kv[1].get("sqnr_db")))


def float_groups(report: dict) -> list[tuple[str, str, list[str]]]:
    """Nodes kept in float grouped by why: [(ops, reason, node names)], largest group first.

    Reports that carry reason codes group by code ("ops" then lists the op types, "Add 42, Mul 41"); older
    ones group by (op type, reason) with quoted names in a reason become '…', so nodes kept float for the
    same cause fall into one group; the node names keep the specifics.
    """
    floats = [n for n in rows(report, "nodes") if n.get("status") == "float"]
    if floats and all(n.get("code") for n in floats):
        texts = {g.get("code"): g.get("reason") for g in rows(section(report, "node_summary"), "kept_float_groups")}
        by_code: dict[str, list[dict]] = collections.defaultdict(list)
        for n in floats:
            by_code[str(n["code"])].append(n)
        out = []
        for code, nodes in by_code.items():
            ops = collections.Counter(str(n.get("op_type") or "?") for n in nodes)
            label = ", ".join(f"{op} {c}" for op, c in sorted(ops.items(), key=lambda kv: (-kv[1], kv[0])))
            out.append((label, str(texts.get(code) or nodes[0].get("reason") or code), [str(n.get("name") or "?") for n in nodes]))
        return sorted(out, key=lambda g: (-len(g[2]), g[0], g[1]))
    groups: dict[tuple[str, str], list[str]] = collections.defaultdict(list)
    for node in floats:
        reason = _QUOTED.sub("'\u2026'", str(node.get("reason") or "no reason recorded"))
        key = (str(node.get("op_type") or "?"), reason)
        groups[key].append(str(node.get("name") or "?"))
    return sorted(((op, reason, names) for (op, reason), names in groups.items()),
                  key=lambda g: (-len(g[2]), g[0], g[1]))


def sorted_layers(report: dict) -> list[dict]:
    """The per-layer comparisons, worst (lowest SQNR) first; unknown SQNR last."""
    return sorted(rows(report, "layers"), key=lambda r: _sort_key(r.get("sqnr_db")))


def _sort_key(sqnr) -> tuple[bool, float]:
    v = as_number(sqnr)
    return (v is None or math.isnan(v), 0.0 if v is None or math.isnan(v) else v)


def _e(x) -> str:
    """Escape any report value for HTML text and attributes."""
    return html.escape("" if x is None else str(x), quote=True)


def _shorten(text: str, limit: int) -> str:
    """Keep the start and the end of a long name: "/encoder/layer.1/…/MatMul_output_0"."""
    if len(text) <= limit:
        return text
    head = (limit - 1) // 2
    return text[:head] + "\u2026" + text[len(text) - (limit - 1 - head):]


def _sqnr_class(sqnr) -> str:
    v = as_number(sqnr)
    if v is None or math.isnan(v):
        return "na"
    return "bad" if v < SQNR_BAD_DB else "warn" if v < SQNR_WARN_DB else "good"


# ---------------------------------------------------------------------------------------------- page

_CSS = """
:root{--fg:#1f2328;--muted:#59636e;--line:#d1d9e0;--soft:#f6f8fa;--accent:#0969da;--accent-soft:#ddf4ff;
--good:#1a7f37;--good-soft:#dafbe1;--warn:#9a6700;--warn-soft:#fff8c5;--bad:#cf222e;--bad-soft:#ffebe9;
--grey:#8c959f;color-scheme:light}
*{box-sizing:border-box}
body{margin:0;background:#fff;color:var(--fg);font:14px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,
"Helvetica Neue",Arial,sans-serif}
main{max-width:1120px;margin:0 auto;padding:28px 32px 40px}
h1{font-size:24px;margin:0;font-weight:650;letter-spacing:-.01em}
h2{font-size:18px;margin:0 0 4px;font-weight:600}
h3{font-size:13px;margin:0 0 6px;font-weight:600;word-break:break-all}
p.note{color:var(--muted);margin:0 0 12px;font-size:13px}
code,.mono{font:12.5px/1.4 ui-monospace,SFMono-Regular,Menlo,Consolas,"Liberation Mono",monospace}
section{margin-top:28px;padding-top:20px;border-top:1px solid var(--line)}
.top{display:flex;align-items:center;gap:12px;flex-wrap:wrap}
.badge{display:inline-block;padding:2px 10px;border-radius:999px;font-size:12px;font-weight:600;
border:1px solid transparent;text-transform:uppercase;letter-spacing:.04em}
.badge.mode{background:var(--accent-soft);color:var(--accent);border-color:#b6e3ff}
.badge.pass{background:var(--good);color:#fff;font-size:14px;padding:3px 14px}
.badge.fail{background:var(--bad);color:#fff;font-size:14px;padding:3px 14px}
.gate{margin-left:auto}
dl.paths{display:grid;grid-template-columns:max-content 1fr;gap:2px 14px;margin:14px 0 0;font-size:13px}
dl.paths dt{color:var(--muted)}
dl.paths dd{margin:0;word-break:break-all}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(190px,1fr));gap:12px;margin-top:18px}
.card{border:1px solid var(--line);border-radius:8px;padding:12px 14px;background:var(--soft);break-inside:avoid}
.card .label{font-size:12px;color:var(--muted);text-transform:uppercase;letter-spacing:.04em}
.card .value{font-size:22px;font-weight:650;margin:2px 0;font-variant-numeric:tabular-nums}
.card .value .unit{font-size:14px;font-weight:500}
.card .sub{font-size:12.5px;color:var(--muted)}
.card.bad{background:var(--bad-soft);border-color:#ffcecb}.card.bad .value{color:var(--bad)}
.card.warn{background:var(--warn-soft);border-color:#f5e0a0}.card.warn .value{color:var(--warn)}
.card.good .value{color:var(--good)}
.alert{margin-top:20px;border:1px solid #f5e0a0;border-left:4px solid #d4a72c;background:var(--warn-soft);
border-radius:6px;padding:10px 16px}
.alert.bad{border-color:#ffcecb;border-left-color:var(--bad);background:var(--bad-soft)}
.alert h2{font-size:15px;margin:0 0 4px}
.alert ul{margin:0;padding-left:20px}
.alert li{margin:2px 0}
table{border-collapse:collapse;width:100%;font-size:13px;font-variant-numeric:tabular-nums}
th,td{text-align:left;padding:5px 10px;border-bottom:1px solid var(--line);vertical-align:middle}
th{background:var(--soft);font-weight:600;color:var(--muted);font-size:12px;text-transform:uppercase;
letter-spacing:.03em;position:sticky;top:0}
td.num,th.num{text-align:right;white-space:nowrap}
td.name{overflow-wrap:anywhere;min-width:14em;font:12px/1.4 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
tbody tr:nth-child(even){background:#fbfcfd}
.scroll{max-height:560px;overflow:auto;border:1px solid var(--line);border-radius:6px}
.scroll table{border:0}
details{margin-top:10px}
summary{cursor:pointer;color:var(--accent);font-weight:500;margin-bottom:8px}
.pill{display:inline-block;padding:0 8px;border-radius:999px;font-size:11.5px;font-weight:600}
.pill.quantized,.pill.good,.pill.pass{background:var(--good-soft);color:var(--good)}
.pill.float,.pill.warn{background:var(--warn-soft);color:var(--warn)}
.pill.integer,.pill.na{background:var(--soft);color:var(--muted);border:1px solid var(--line)}
.pill.bad,.pill.fail{background:var(--bad-soft);color:var(--bad)}
svg{display:block;width:100%;height:auto;font-family:system-ui,-apple-system,"Segoe UI",Roboto,Arial,sans-serif}
svg text{fill:var(--fg);font-size:11px}
svg .axis{stroke:var(--line);stroke-width:1}
svg .tick{fill:var(--muted);font-size:10px}
svg .op{fill:var(--muted);font-size:10px}
svg .name{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:10.5px}
svg .val{font-size:10.5px;font-variant-numeric:tabular-nums}
svg .good{fill:#2da44e}svg .exact{fill:#8ddb8c}svg .warn{fill:#d4a72c}svg .bad{fill:#cf222e}svg .na{fill:var(--grey)}
svg .orig{fill:#afb8c1}svg .quant{fill:var(--accent)}
svg .bins{fill:#6e7781}svg .bins.out{fill:#fa9c98}svg .keep{fill:var(--accent-soft)}
svg .clip{stroke:var(--accent);stroke-width:1.5;stroke-dasharray:4 3}
svg .ext{stroke:var(--bad);stroke-width:1.5}
svg .clip-label{fill:var(--accent);font-size:10px;font-weight:600}
svg .ext-label{fill:var(--bad);font-size:10px}
.legend{display:flex;gap:16px;font-size:12px;color:var(--muted);margin:0 0 8px;flex-wrap:wrap}
.legend i{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:5px;vertical-align:-1px}
.hists{display:grid;grid-template-columns:repeat(auto-fill,minmax(330px,1fr));gap:14px}
.hist{border:1px solid var(--line);border-radius:8px;padding:10px 12px;break-inside:avoid}
.hist .meta{font-size:12px;color:var(--muted);margin-top:4px}
.two{display:grid;grid-template-columns:1fr 1fr;gap:24px}
@media (max-width:800px){.two{grid-template-columns:1fr}}
ul.plain{margin:4px 0 0;padding-left:18px;font-size:13px}
footer{margin-top:36px;padding-top:12px;border-top:1px solid var(--line);color:var(--muted);font-size:12px}
@media print{main{max-width:none;padding:0}.scroll{max-height:none;overflow:visible;border:0}
th{position:static}section{break-inside:auto}summary{color:var(--fg)}
*{-webkit-print-color-adjust:exact;print-color-adjust:exact}}
@media print{details::details-content{content-visibility:visible;display:block}}
"""


def render_html(report: dict) -> str:
    """The whole report as one self-contained HTML document (deterministic, no I/O)."""
    parts = [
        _header(report),
        _warnings(report),
        _gate(report),
        _fidelity(report),
        _tuning(report),
        _layer_chart(report),
        _size_chart(report),
        _histograms(report),
        _nodes(report),
        _calibration(report),
        _config(report),
    ]
    body = "\n".join(p for p in parts if p)
    title = f"qconv report \u00b7 {report.get('mode') or '?'} \u00b7 {section(report, 'model').get('input') or ''}"
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        "<meta name=\"color-scheme\" content=\"light\">\n"
        f"<title>{_e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n"
        f"{body}\n{_footer(report)}\n</main>\n</body>\n</html>\n"
    )


def _section(title: str, note: str, content: str, anchor: str) -> str:
    note_html = f"<p class=\"note\">{note}</p>" if note else ""
    return f"<section id=\"{anchor}\">\n<h2>{_e(title)}</h2>\n{note_html}\n{content}\n</section>"


def _table(head: list[str], body: list[list[str]], num: frozenset[int] = frozenset(),
           name: frozenset[int] = frozenset()) -> str:
    """A table from escaped cell HTML; columns in ``num`` align right, those in ``name`` are monospace."""
    def cls(i: int, header: bool) -> str:
        return ' class="num"' if i in num else ' class="name"' if i in name and not header else ""

    ths = "".join(f"<th{cls(i, True)}>{_e(h)}</th>" for i, h in enumerate(head))
    trs = "\n".join("<tr>" + "".join(f"<td{cls(i, False)}>{c}</td>" for i, c in enumerate(r)) + "</tr>" for r in body)
    return f"<table>\n<thead><tr>{ths}</tr></thead>\n<tbody>\n{trs}\n</tbody>\n</table>"


def _collapsible(summary: str, table: str, opened: bool) -> str:
    """A table behind <details>, scrolled within a box when long."""
    return (f"<details{' open' if opened else ''}>\n<summary>{_e(summary)}</summary>\n"
            f"<div class=\"scroll\">\n{table}\n</div>\n</details>")


def _pill(text: str, kind: str) -> str:
    return f"<span class=\"pill {_e(kind)}\">{_e(text)}</span>"


# ---------------------------------------------------------------------------------------------- header


def _header(report: dict) -> str:
    model = section(report, "model")
    gate = section(report, "gate")
    badge = ""
    if "passed" in gate and gate.get("checks"):  # no checks asked for: no verdict to show
        ok = bool(gate["passed"])
        badge = f"<span class=\"badge gate {'pass' if ok else 'fail'}\">{'Gate passed' if ok else 'Gate failed'}</span>"
    paths = [("model", model.get("input")), ("quantized", model.get("output"))]
    opsets = (model.get("opset_original"), model.get("opset_quantized"))
    if any(o is not None for o in opsets):
        paths.append(("opset", f"{opsets[0] if opsets[0] is not None else '?'} \u2192 "
                               f"{opsets[1] if opsets[1] is not None else '?'}"))
    dl = "".join(f"<dt>{_e(k)}</dt><dd><code>{_e(v)}</code></dd>" for k, v in paths if v is not None)
    intake = strings(model.get("intake"))
    notes = (f"<dt>intake</dt><dd><ul class=\"plain\">{''.join(f'<li>{_e(n)}</li>' for n in intake)}</ul></dd>"
             if intake else "")
    return (
        f"<header>\n<div class=\"top\"><h1>qconv report</h1>"
        f"<span class=\"badge mode\">{_e(report.get('mode') or 'unknown mode')}</span>{badge}</div>\n"
        f"<dl class=\"paths\">{dl}{notes}</dl>\n<div class=\"cards\">\n{_cards(report)}\n</div>\n</header>"
    )


def _card(label: str, value: str, sub: str, kind: str = "") -> str:
    """A headline figure; a word after the number ("3.86× smaller") is set smaller."""
    number, _, unit = value.partition(" ")
    unit_html = f" <span class=\"unit\">{_e(unit)}</span>" if unit else ""
    return (f"<div class=\"card {kind}\"><div class=\"label\">{_e(label)}</div>"
            f"<div class=\"value\">{_e(number)}{unit_html}</div><div class=\"sub\">{_e(sub)}</div></div>")


def _cards(report: dict) -> str:
    cards = [_size_card(report), _task_card(report), _latency_card(report), _output_card(report), _node_card(report)]
    return "\n".join(c for c in cards if c)


def _size_card(report: dict) -> str:
    size = section(report, "size_bytes")
    if not size:
        return ""
    sub = f"{format_bytes(size.get('original'))} \u2192 {format_bytes(size.get('quantized'))}"
    return _card("Model size", size_change(size.get("ratio")), sub)


def _task_card(report: dict) -> str:
    task = section(report, "task")
    if not task:
        return ""
    drop = as_number(task.get("drop_points"))
    kind = "" if drop is None else "bad" if drop > 1.0 else "warn" if drop > 0.25 else "good"
    sub = (f"was {format_percent(task.get('original'))} \u00b7 drop {format_number(drop, '.2f')} pts"
           f" \u00b7 {format_number(task.get('samples'), 'g')} samples")
    metric = "Top-1 accuracy" if task.get("metric", "top1") == "top1" else str(task.get("metric"))
    return _card(metric, format_percent(task.get("quantized")), sub, kind)


def _latency_card(report: dict) -> str:
    lat = section(report, "latency_ms")
    if not lat:
        return ""
    ratio = as_number(lat.get("ratio"))
    verdict = lat.get("verdict")
    kind = "" if ratio is None or verdict == "same within noise" else "warn" if ratio > 1.0 else "good"
    sub = f"{format_number(lat.get('original'), '.2f')} ms \u2192 {format_number(lat.get('quantized'), '.2f')} ms"
    extra = [_plural(lat.get("runs"), "run"), _plural(lat.get("threads"), "thread")]
    sub += "".join(f" \u00b7 {x}" for x in extra if x)
    token = lat.get("token") if isinstance(lat.get("token"), dict) else None
    if token:
        sub += (f" \u00b7 one more token (cache of {format_number(token.get('past'), 'g')}): "
                f"{format_number(token.get('original'), '.3f')} ms \u2192 {format_number(token.get('quantized'), '.3f')} ms, "
                f"{speed_change(as_number(token.get('ratio')), token.get('verdict'))}")
    return _card("Latency", speed_change(ratio, verdict), sub, kind)


def _plural(count, noun: str) -> str:
    """A count with its noun ("1 thread", "30 runs"), empty when the count is missing."""
    v = as_number(count)
    return "" if v is None else f"{v:g} {noun}{'' if v == 1 else 's'}"


def _output_card(report: dict) -> str:
    worst = worst_output(report)
    if worst is None:
        reason = report.get("fidelity_reason")
        return _card("Output fidelity", "not measured", str(reason), "") if reason else ""
    name, stats = worst
    kind = {"bad": "bad", "warn": "warn", "good": "good"}.get(_sqnr_class(stats.get("sqnr_db")), "")
    sub = f"cosine {format_number(stats.get('cosine'), '.5f')} \u00b7 {_shorten(name, 28)}"
    return _card("Worst output SQNR", f"{format_sqnr(stats.get('sqnr_db'))} dB", sub, kind)


def _node_card(report: dict) -> str:
    summary = section(report, "node_summary")
    if not summary:
        return ""
    counts = {k: format_number(summary.get(k), "g") for k in ("float", "integer", "folded_activations")}
    sub = (f"{counts['float']} float \u00b7 {counts['integer']} integer \u00b7 "
           f"{counts['folded_activations']} activations folded")
    return _card("Nodes quantized", format_number(summary.get("quantized"), "g"), sub)


# ---------------------------------------------------------------------------------------------- alerts


def _warnings(report: dict) -> str:
    warnings = strings(report.get("warnings"))
    if not warnings:
        return ""
    items = "".join(f"<li>{_e(w)}</li>" for w in warnings)
    noun = "warning" if len(warnings) == 1 else "warnings"
    return f"<div class=\"alert\" role=\"alert\">\n<h2>\u26a0 {len(warnings)} {noun}</h2>\n<ul>{items}</ul>\n</div>"


def _gate(report: dict) -> str:
    gate = section(report, "gate")
    checks = rows(gate, "checks")
    if not gate or not checks:
        return ""
    body = [[_e(c.get("name")), _e(_value(c.get("measured"))), _e(_relation(c) + _value(c.get("required"))),
             _pill("pass", "pass") if c.get("passed") else _pill("fail", "fail")] for c in checks]
    failed = strings(gate.get("failed"))
    note = f"Failed: {', '.join(_e(f) for f in failed)}." if failed else "Every check passed."
    table = _table(["check", "measured", "required", "result"], body, num=frozenset({1, 2}))
    return _section("Quality gate", note, table, "gate")


def _relation(check: dict) -> str:
    """"≤ " or "≥ " as the check's message states it ("required <= 0.9x"), else nothing."""
    found = _RELATION.search(str(check.get("message") or ""))
    return {"<=": "\u2264 ", ">=": "\u2265 ", "<": "< ", ">": "> "}[found.group(1)] if found else ""


def _value(x) -> str:
    """A gate value: numbers to four significant digits, anything else as text."""
    return format_number(x) if as_number(x) is not None else DASH if x is None else str(x)


# ---------------------------------------------------------------------------------------------- fidelity


def _fidelity(report: dict) -> str:
    outputs = [(str(k), v) for k, v in section(report, "outputs").items() if isinstance(v, dict)]
    if not outputs:
        return ""
    body = [[_e(name), _pill(f"{format_sqnr(s.get('sqnr_db'))} dB", _sqnr_class(s.get("sqnr_db"))),
             _e(format_number(s.get("cosine"), ".6f")), _e(format_number(s.get("max_abs_err"))),
             _e(format_number(s.get("mean_abs_err")))] for name, s in outputs]
    table = _table(["output", "SQNR", "cosine", "max |err|", "mean |err|"], body,
                   num=frozenset({1, 2, 3, 4}), name=frozenset({0}))
    return _section("Output fidelity", "Quantized against original over the evaluation data.", table, "outputs")


# ---------------------------------------------------------------------------------------------- SQNR chart


def _layer_chart(report: dict) -> str:
    layers = sorted_layers(report)
    if not layers:
        return ""
    shown = layers[:MAX_SQNR_BARS]
    note = (f"Signal-to-quantization-noise ratio of each compared activation, worst first. "
            f"Bars under {SQNR_BAD_DB:g} dB are red, under {SQNR_WARN_DB:g} dB amber; \u221e marks an exact match.")
    if len(layers) > len(shown):
        note += f" Showing the {len(shown)} worst of {len(layers)} layers."
    return _section("Per-layer SQNR", _e(note), _sqnr_svg(shown), "layers")


def _sqnr_svg(layers: list[dict]) -> str:
    width, op_w, label_w, value_w, bar_h, step, top = 960, 116, 390, 48, 14, 20, 22
    plot_w = width - label_w - value_w
    finite = [v for v in (as_number(r.get("sqnr_db")) for r in layers) if v is not None and math.isfinite(v)]
    span = max(40.0, 10.0 * math.ceil(max(finite, default=0.0) / 10.0))
    height = top + step * len(layers) + 4
    out = [f"<svg viewBox=\"0 0 {width} {height}\" role=\"img\" aria-label=\"per-layer SQNR\">"]
    for tick in range(0, int(span) + 1, 10):
        x = label_w + plot_w * tick / span
        out.append(f"<line class=\"axis\" x1=\"{x:.1f}\" y1=\"{top - 4}\" x2=\"{x:.1f}\" y2=\"{height - 2}\"/>"
                   f"<text class=\"tick\" x=\"{x:.1f}\" y=\"{top - 8}\" text-anchor=\"middle\">{tick} dB</text>")
    for i, layer in enumerate(layers):
        out.append(_sqnr_bar(layer, top + i * step, label_w, op_w, plot_w, bar_h, span))
    out.append("</svg>")
    return "\n".join(out)


def _sqnr_bar(layer: dict, y: int, label_w: int, op_w: int, plot_w: int, bar_h: int, span: float) -> str:
    tensor = str(layer.get("tensor") or layer.get("node") or "?")
    op = str(layer.get("op_type") or "")
    v = as_number(layer.get("sqnr_db"))
    w = 0.0 if v is None or math.isnan(v) else plot_w * min(max(v, 0.0), span) / span
    kind = "exact" if v == math.inf else _sqnr_class(v)
    tip = (f"{tensor} ({op}, node {layer.get('node') or '?'}): {format_sqnr(v)} dB, "
           f"cosine {format_number(layer.get('cosine'), '.5f')}")
    cy = y + bar_h - 3
    return (
        f"<g><title>{_e(tip)}</title>"
        f"<text class=\"op\" x=\"0\" y=\"{cy}\">{_e(_shorten(op, 20))}</text>"
        f"<text class=\"name\" x=\"{op_w}\" y=\"{cy}\">{_e(_shorten(tensor, 42))}</text>"
        f"<rect class=\"{kind}\" x=\"{label_w}\" y=\"{y}\" width=\"{w:.1f}\" height=\"{bar_h}\" rx=\"2\"/>"
        f"<text class=\"val\" x=\"{label_w + w + 5:.1f}\" y=\"{cy}\">{_e(format_sqnr(v))}</text></g>"
    )


# ---------------------------------------------------------------------------------------------- tuning


def _tuning(report: dict) -> str:
    t = section(report, "tuning")
    if not t:
        return ""
    trials = rows(t, "trials")
    targets = ", ".join(f"{k.replace('_', ' ')} {v:g}" for k, v in sorted(section(t, "targets").items()) if k != "default")
    cached = f", {t.get('cached_trials')} from the cache" if t.get("cached_trials") else ""
    cached += f", {t.get('cut_trials')} run only after the node they change" if t.get("cut_trials") else ""
    note = (f"Target: {targets}{' (the default)' if section(t, 'targets').get('default') else ''}. "
            f"{len(trials)} candidates measured in {format_number(t.get('seconds'), '.1f')} s{cached} (budget {t.get('budget')}) "
            f"on {t.get('rows')} rows: {t.get('data')}. Each dot is one candidate's worst-output error (1 - cosine, log scale); "
            "green dots were kept.")
    status = _pill("targets reached", "pass") if t.get("reached") else _pill("missed: " + ", ".join(strings(t.get("missed"))), "fail")
    changes = rows(t, "changes")
    body = [[f"<span class=\"name\">{_e(c.get('what'))}</span>", _e(c.get("op") or ""), _e(c.get("change")), _e(c.get("why"))]
            for c in changes]
    table = _table(["node / tensor", "op", "change", "why"], body) if body else "<p class=\"note\">No change measured better than the plan.</p>"
    trial_rows = [[str(x.get("n")), _e(x.get("step")), _e(x.get("change")), _e(format_number(x.get("cosine"), ".6f")),
                   _e(format_number(x.get("agreement"), ".4f")), _e(format_number(x.get("seconds"), ".2f")),
                   _pill("kept", "pass") if x.get("accepted") else ("" if not x.get("error") else _pill("failed", "fail"))]
                  for x in trials]
    trial_table = _collapsible(f"All {len(trials)} candidates", _table(["#", "step", "candidate", "worst cosine", "agreement", "s", ""],
                                                                        trial_rows, num=frozenset({0, 3, 4, 5})), False)
    return _section("Tuning", _e(note), f"<p>{status}</p>\n{_tuning_svg(trials)}\n{table}\n{trial_table}", "tuning")


def _tuning_svg(trials: list[dict]) -> str:
    pts = [(i, as_number(x.get("cosine")), bool(x.get("accepted"))) for i, x in enumerate(trials)]
    errs = [1.0 - c for _, c, _ in pts if c is not None and c < 1.0]
    if not errs:
        return ""
    width, height, left, top, bottom = 960, 220, 60, 12, 26
    lo_e, hi_e = math.floor(math.log10(max(min(errs), 1e-9))), math.ceil(math.log10(max(errs)))
    hi_e = max(hi_e, lo_e + 1)
    plot_w, plot_h = width - left - 10, height - top - bottom
    n = max(1, len(pts) - 1)

    def y(err: float) -> float:
        e = math.log10(min(max(err, 10.0 ** lo_e), 10.0 ** hi_e))
        return top + plot_h * (hi_e - e) / (hi_e - lo_e)

    out = [f"<svg viewBox=\"0 0 {width} {height}\" role=\"img\" aria-label=\"tuning candidates\">"]
    for e in range(lo_e, hi_e + 1):
        yy = y(10.0 ** e)
        out.append(f"<line class=\"axis\" x1=\"{left}\" y1=\"{yy:.1f}\" x2=\"{width - 10}\" y2=\"{yy:.1f}\"/>"
                   f"<text class=\"tick\" x=\"{left - 6}\" y=\"{yy + 3:.1f}\" text-anchor=\"end\">1e{e}</text>")
    best = [(i, c) for i, c, a in pts if a and c is not None]
    if len(best) > 1:
        path = " ".join(f"{left + plot_w * i / n:.1f},{y(1.0 - c):.1f}" for i, c in best)
        out.append(f"<polyline points=\"{path}\" fill=\"none\" stroke=\"#2da44e\" stroke-width=\"1.5\"/>")
    for i, c, a in pts:
        if c is None:
            continue
        out.append(f"<circle class=\"{'good' if a else 'na'}\" cx=\"{left + plot_w * i / n:.1f}\" cy=\"{y(1.0 - c):.1f}\" "
                   f"r=\"{4 if a else 2.5}\"><title>{_e(trials[i].get('change'))}: cosine {format_number(c, '.6f')}</title></circle>")
    out.append(f"<text class=\"tick\" x=\"{left}\" y=\"{height - 8}\">candidate 1</text>"
               f"<text class=\"tick\" x=\"{width - 10}\" y=\"{height - 8}\" text-anchor=\"end\">candidate {len(pts)}</text>")
    out.append("</svg>")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------- size chart


def _size_chart(report: dict) -> str:
    by_op = [(str(op), s) for op, s in section(report, "size_by_op").items() if isinstance(s, dict)]
    entries = [(op, as_number(s.get("original")) or 0.0, as_number(s.get("quantized")) or 0.0) for op, s in by_op]
    if not entries:
        return ""
    entries.sort(key=lambda e: (-e[1], -e[2], e[0]))
    if len(entries) > MAX_SIZE_OPS:
        rest = entries[MAX_SIZE_OPS - 1:]
        other = (f"{len(rest)} other ops", sum(e[1] for e in rest), sum(e[2] for e in rest))
        entries = entries[:MAX_SIZE_OPS - 1] + [other]
    legend = ("<div class=\"legend\"><span><i style=\"background:#afb8c1\"></i>original</span>"
              "<span><i style=\"background:#0969da\"></i>quantized</span></div>")
    note = "Bytes of initializers (weights, biases, scales) attributed to the op type that reads them."
    return _section("Size by op type", note, legend + _size_svg(entries), "size")


def _size_svg(entries: list[tuple[str, float, float]]) -> str:
    width, label_w, value_w, bar_h, step, top = 960, 150, 210, 11, 30, 4
    plot_w = width - label_w - value_w
    peak = max(max(o, q) for _, o, q in entries) or 1.0
    height = top + step * len(entries)
    out = [f"<svg viewBox=\"0 0 {width} {height}\" role=\"img\" aria-label=\"size by op type\">"]
    for i, (op, orig, quant) in enumerate(entries):
        y = top + i * step
        wo, wq = plot_w * orig / peak, plot_w * quant / peak
        ratio = f" \u00b7 {orig / quant:.2f}\u00d7" if quant > 0 and orig > 0 else ""
        label = f"{format_bytes(orig)} \u2192 {format_bytes(quant)}{ratio}"
        out.append(
            f"<g><title>{_e(op)}: {_e(label)}</title>"
            f"<text x=\"0\" y=\"{y + bar_h + 3}\">{_e(_shorten(op, 22))}</text>"
            f"<rect class=\"orig\" x=\"{label_w}\" y=\"{y}\" width=\"{wo:.1f}\" height=\"{bar_h}\" rx=\"2\"/>"
            f"<rect class=\"quant\" x=\"{label_w}\" y=\"{y + bar_h + 1}\" width=\"{wq:.1f}\" "
            f"height=\"{bar_h}\" rx=\"2\"/>"
            f"<text class=\"val\" x=\"{label_w + max(wo, wq) + 6:.1f}\" y=\"{y + bar_h + 3}\">{_e(label)}</text></g>"
        )
    out.append("</svg>")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------- histograms


def _histograms(report: dict) -> str:
    hists = [(str(t), h) for t, h in section(report, "histograms").items() if isinstance(h, dict)]
    if not hists:
        return ""
    sqnr = {str(r.get("tensor")): r.get("sqnr_db") for r in rows(report, "layers")}
    cards = "\n".join(_histogram_card(t, h, sqnr.get(t)) for t, h in hists)
    note = ("Calibration histograms of the worst tensors, counts on a log scale. The shaded band between the "
            "dashed lines is the range chosen for quantization; red bins fall outside it and are clipped. "
            "Red ticks mark the observed min and max.")
    return _section("Activation histograms", note, f"<div class=\"hists\">\n{cards}\n</div>", "histograms")


def _histogram_card(tensor: str, hist: dict, sqnr) -> str:
    svg = _histogram_svg(hist) or '<p class="note">No usable histogram data.</p>'
    lo, hi = _pair(hist.get("range"))
    meta = [f"method {hist['method']}" if hist.get("method") else "",
            f"range [{format_number(lo)}, {format_number(hi)}]" if lo is not None else "",
            f"min {format_number(hist.get('min'))} \u00b7 max {format_number(hist.get('max'))}",
            f"SQNR {format_sqnr(sqnr)} dB" if sqnr is not None else ""]
    clipped = _clipped_fraction(hist)
    if clipped is not None:
        meta.append(f"\u2248{100 * clipped:.3g}% of values clipped (red)" if clipped else "nothing clipped")
    return (f"<div class=\"hist\"><h3 title=\"{_e(tensor)}\">{_e(_shorten(tensor, 64))}</h3>\n"
            f"{svg}\n"
            f"<div class=\"meta\">{_e(' · '.join(m for m in meta if m))}</div></div>")


def _pair(value) -> tuple[float | None, float | None]:
    if isinstance(value, (list, tuple)) and len(value) == 2:
        lo, hi = as_number(value[0]), as_number(value[1])
        if lo is not None and hi is not None and math.isfinite(lo) and math.isfinite(hi):
            return lo, hi
    return None, None


def _bins(hist: dict) -> tuple[list[float], list[float]] | None:
    """(edges, counts) checked and merged down to at most MAX_HIST_BINS bins, or None if unusable."""
    edges, counts = hist.get("edges"), hist.get("counts")
    if not isinstance(edges, list) or not isinstance(counts, list) or not counts or len(edges) != len(counts) + 1:
        return None
    e = [as_number(x) for x in edges]
    c = [as_number(x) for x in counts]
    if any(x is None or not math.isfinite(x) for x in e + c):
        return None
    factor = math.ceil(len(c) / MAX_HIST_BINS)
    merged = [sum(c[i:i + factor]) for i in range(0, len(c), factor)]
    return e[::factor][:len(merged)] + [e[-1]], merged


def _clipped_fraction(hist: dict) -> float | None:
    """Share of the histogram mass in bins wholly outside the chosen range."""
    data, (lo, hi) = _bins(hist), _pair(hist.get("range"))
    if data is None or lo is None:
        return None
    edges, counts = data
    total = sum(counts)
    if total <= 0:
        return None
    outside = sum(c for a, b, c in zip(edges, edges[1:], counts) if not _inside(a, b, lo, hi))
    return outside / total


def _inside(a: float, b: float, lo: float | None, hi: float | None) -> bool:
    """Whether the bin [a, b] reaches into the clip range: only bins wholly outside it are clipped."""
    return lo is None or hi is None or (b > lo and a < hi)


def _histogram_svg(hist: dict) -> str:
    data = _bins(hist)
    if data is None:
        return ""
    edges, counts = data
    lo, hi = _pair(hist.get("range"))
    mn, mx = as_number(hist.get("min")), as_number(hist.get("max"))
    points = [x for x in (edges[0], edges[-1], lo, hi, mn, mx) if x is not None and math.isfinite(x)]
    x0, x1 = min(points), max(points)
    if x1 <= x0:
        x0, x1 = x0 - 0.5, x1 + 0.5
    width, height, left, right, top, base = 360, 150, 8, 8, 20, 120
    scale = (width - left - right) / (x1 - x0)

    def sx(v: float) -> float:
        return left + (v - x0) * scale

    peak = math.log1p(max(counts)) or 1.0
    out = [f"<svg viewBox=\"0 0 {width} {height}\" role=\"img\" aria-label=\"histogram\">"]
    if lo is not None:
        out.append(f"<rect class=\"keep\" x=\"{sx(lo):.1f}\" y=\"{top}\" width=\"{max(sx(hi) - sx(lo), 1):.1f}\" "
                   f"height=\"{base - top}\"/>")
    for kind, inside in (("bins", True), ("bins out", False)):
        path = "".join(f"M{sx(a):.1f} {base}V{base - (base - top) * math.log1p(c) / peak:.1f}H{sx(b):.1f}V{base}Z"
                       for a, b, c in zip(edges, edges[1:], counts) if c > 0 and _inside(a, b, lo, hi) == inside)
        if path:
            out.append(f"<path class=\"{kind}\" d=\"{path}\"/>")
    out.append(f"<line class=\"axis\" x1=\"{left}\" y1=\"{base}\" x2=\"{width - right}\" y2=\"{base}\"/>")
    if lo is not None:
        out += _marker(sx(lo), f"{format_number(lo)}", top, base, width, "clip", "end", top - 6)
        out += _marker(sx(hi), f"{format_number(hi)}", top, base, width, "clip", "start", top - 6)
    for value, side, word in ((mn, "end", "min"), (mx, "start", "max")):
        if value is not None and math.isfinite(value):
            out += _marker(sx(value), f"{word} {format_number(value)}", base, base + 8, width, "ext", side, base + 20)
    out.append("</svg>")
    return "\n".join(out)


def _marker(x: float, label: str, y1: float, y2: float, width: int, kind: str, side: str, text_y: float) -> list[str]:
    """A vertical line at x with a label beside it, flipped to the other side near the chart's edges."""
    room = 6.5 * len(label) + 6
    if side == "end" and x - room < 0:
        side = "start"
    elif side == "start" and x + room > width:
        side = "end"
    tx = x - 3 if side == "end" else x + 3
    return [f"<line class=\"{kind}\" x1=\"{x:.1f}\" y1=\"{y1}\" x2=\"{x:.1f}\" y2=\"{y2}\"/>",
            f"<text class=\"{kind}-label\" x=\"{tx:.1f}\" y=\"{text_y}\" text-anchor=\"{side}\">{_e(label)}</text>"]


# ---------------------------------------------------------------------------------------------- nodes


def _nodes(report: dict) -> str:
    parts = [_float_reasons(report), _by_op(report), _node_table(report)]
    content = "\n".join(p for p in parts if p)
    if not content:
        return ""
    return _section("Nodes", "", content, "nodes")


def _float_reasons(report: dict) -> str:
    groups = float_groups(report)
    if not groups:
        return ""
    body = [[_e(op), _e(len(names)), _e(reason), _e(", ".join(_shorten(n, 48) for n in names[:3]) +
                                                   (f" and {len(names) - 3} more" if len(names) > 3 else ""))]
            for op, reason, names in groups]
    total = sum(len(g[2]) for g in groups)
    table = _table(["op", "count", "reason", "nodes"], body, num=frozenset({1}), name=frozenset({3}))
    return f"<h3>Kept in float ({total})</h3>\n{table}"


def _by_op(report: dict) -> str:
    by_op = [(str(op), c) for op, c in section(section(report, "node_summary"), "by_op").items() if isinstance(c, dict)]
    if not by_op:
        return ""
    body = [[_e(op), *(_e(format_number(c.get(k), "g")) for k in ("quantized", "float", "integer"))] for op, c in by_op]
    table = _table(["op", "quantized", "float", "integer"], body, num=frozenset({1, 2, 3}))
    return _collapsible(f"Node counts by op type ({len(by_op)} op types)", table, len(by_op) <= OPEN_TABLE_ROWS)


def _node_table(report: dict) -> str:
    nodes = rows(report, "nodes")
    if not nodes:
        return ""
    body = [[_e(n.get("name")), _e(n.get("op_type")), _pill(str(n.get("status") or "?"), str(n.get("status") or "na")),
             _e(n.get("reason")), _e(format_sqnr(n.get("sqnr_db"))), _e(format_number(n.get("scale"), ".6g")),
             _e(format_number(n.get("zero_point"), "g"))] for n in nodes]
    table = _table(["name", "op", "status", "reason", "SQNR dB", "scale", "zero point"], body,
                   num=frozenset({4, 5, 6}), name=frozenset({0}))
    return _collapsible(f"All nodes ({len(nodes)})", table, len(nodes) <= OPEN_TABLE_ROWS)


# ---------------------------------------------------------------------------------------------- calibration, config


def _calibration(report: dict) -> str:
    calib = section(report, "calibration")
    if not calib:
        return ""
    facts = [(k, calib.get(k)) for k in ("method", "samples", "tensors") if calib.get(k) is not None]
    items = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in facts)
    for key, label in (("nonfinite_tensors", "held inf/NaN"), ("constant_tensors", "constant")):
        names = strings(calib.get(key))
        if names:
            shown = ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
            items += f"<dt>{_e(label)} ({len(names)})</dt><dd><code>{_e(shown)}</code></dd>"
    return _section("Calibration", "", f"<dl class=\"paths\">{items}</dl>", "calibration")


def _config(report: dict) -> str:
    config = section(report, "config")
    if not config:
        return ""
    body = [[_e(k), _e(v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str))]
            for k, v in config.items()]
    table = _table(["option", "value"], body, name=frozenset({1}))
    return _section("Configuration", "", _collapsible(f"Options ({len(body)})", table, False), "config")


def _footer(report: dict) -> str:
    return (f"<footer>qconv {_e(report.get('qconv_version') or '')} \u00b7 schema {_e(report.get('schema') or '?')} "
            f"v{_e(report.get('version') or '?')}</footer>")
