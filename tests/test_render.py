"""The HTML and Markdown renderers of the report dict: structure, escaping, determinism, missing sections.

The fixtures at the end are real reports: the report builder's output for runs of the bundled digits CNN and tiny
transformer (int8, minmax, labels, latency), made once per session, so the renderers are tested on what the
builder really writes.
"""

from __future__ import annotations

import copy
import html.parser
import re
import shutil
import subprocess

import pytest

from qconv.report.html import MAX_SQNR_BARS, render_html
from qconv.report.markdown import render_markdown

HOSTILE = "<script>alert(1)</script>"
OPTIONAL = ("task", "latency_ms", "gate", "calibration", "histograms", "size_by_op", "warnings", "layers", "nodes",
            "node_summary", "outputs", "config", "model", "size_bytes")


def _node(name, op, status, reason="", sqnr=None, scale=None, zero_point=None, output=None) -> dict:
    return {"name": name, "op_type": op, "output": output or f"{name}_output_0", "quantized": status == "quantized",
            "reason": reason, "scale": scale, "sqnr_db": sqnr, "status": status, "zero_point": zero_point}


def _layer(node, op, sqnr, cosine, max_abs_err) -> dict:
    return {"cosine": cosine, "max_abs_err": max_abs_err, "node": node, "op_type": op, "sqnr_db": sqnr,
            "tensor": f"{node}_output_0"}


def _histogram(start, step, lo, hi, counts) -> dict:
    """A minmax histogram as the pipeline writes it: uniform edges, the clip range equal to min and max."""
    return {"counts": counts, "edges": [start + i * step for i in range(len(counts) + 1)], "max": hi,
            "method": "minmax", "min": lo, "range": [lo, hi]}


def cnn() -> dict:
    return copy.deepcopy(CNN_REPORT)


def transformer(gate_passed: bool | None = None) -> dict:
    """The transformer report, with a quality gate when gate_passed is given (the real runs had none)."""
    report = copy.deepcopy(TRANSFORMER_REPORT)
    if gate_passed is not None:
        ratio = report["latency_ms"]["ratio"]
        required = round(ratio * (1.5 if gate_passed else 0.5), 3)
        sqnr = report["gate"]["checks"][0]["measured"]
        checks = [{"name": "min-sqnr", "measured": sqnr, "required": 30, "passed": True,
                   "message": f"min-sqnr: measured {sqnr:.4g} dB, required >= 30 dB"},
                  {"name": "max-latency-ratio", "measured": ratio, "required": required, "passed": gate_passed,
                   "message": f"max-latency-ratio: measured {ratio:.4g}x, required <= {required:g}x"}]
        report["gate"] = {"passed": gate_passed, "checks": checks,
                          "failed": [c["name"] for c in checks if not c["passed"]]}
    return report


def large(report: dict, copies: int) -> dict:
    """The report with its nodes and layers repeated under new names: hundreds of rows."""
    big = copy.deepcopy(report)
    big["nodes"] = [dict(n, name=f"{n['name']}#{k}") for k in range(copies) for n in report["nodes"]]
    big["layers"] = [dict(r, tensor=f"{r['tensor']}#{k}") for k in range(copies) for r in report["layers"]]
    return big


class _StrictParser(html.parser.HTMLParser):
    """Records nesting errors: every non-void element closed, in order."""

    VOID = {"meta", "br", "hr", "img", "input", "link", "wbr"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.errors, self.tags, self.text = [], [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(f"unexpected </{tag}> at {self.getpos()}")

    def handle_data(self, data):
        self.text.append(data)


def _parse(doc: str) -> _StrictParser:
    parser = _StrictParser()
    parser.feed(doc)
    parser.close()
    assert parser.errors == [] and parser.stack == [], (parser.errors, parser.stack)
    return parser


@pytest.mark.parametrize("gate", [None, False], ids=["cnn", "transformer"])
def test_html_is_well_formed_self_contained_and_deterministic(gate):
    report = cnn() if gate is None else transformer(gate_passed=gate)
    doc = render_html(report)
    parser = _parse(doc)
    tags = [t for t, _ in parser.tags]
    assert doc.startswith("<!DOCTYPE html>") and tags.count("svg") >= 4
    assert "http://" not in doc and "https://" not in doc and "url(" not in doc and "@import" not in doc
    assert "script" not in tags and not any({"src", "href"} & set(a) for _, a in parser.tags)
    assert render_html(copy.deepcopy(report)) == doc


def test_html_shows_the_key_facts():
    report = transformer(gate_passed=False)
    report["warnings"].append("for MatMul-heavy models try --mode dynamic")
    doc = render_html(report)
    text = " ".join(_parse(doc).text)
    layers = report["layers"]
    assert len(layers) >= 5 and text.index(layers[0]["tensor"]) < text.index(layers[4]["tensor"])
    worst = min(report["outputs"].values(), key=lambda v: v["sqnr_db"])
    required = report["gate"]["checks"][1]["required"]
    for fact in ("Gate failed", "int8", "sample_models/tiny_transformer/model.onnx",
                 f"{report['size_bytes']['ratio']:.2f}\u00d7", f"{100 * report['task']['quantized']:.2f}%",
                 "max-latency-ratio", f"\u2264 {required:g}", "for MatMul-heavy models try --mode dynamic",
                 "numerically fragile: 8 bits distort it (Softmax, normalizations)",
                 "values span more than 8 bits can hold", report["model"]["intake"][0], f"{worst['sqnr_db']:.1f} dB"):
        assert fact in text, fact
    assert doc.count("<rect class=\"keep\"") == len(report["histograms"]) > 0  # each histogram's clip range
    assert doc.count("class=\"clip\"") == 2 * len(report["histograms"])
    n_t, n_c = len(report["nodes"]), len(cnn()["nodes"])
    assert n_t > 40 and f"<details>\n<summary>All nodes ({n_t})" in doc  # long tables fold away, short ones stay open
    assert f"<details open>\n<summary>All nodes ({n_c})" in render_html(cnn())


def test_html_caps_large_reports():
    report = large(transformer(), copies=12)
    assert len(report["nodes"]) > 500
    doc = render_html(report)
    _parse(doc)
    assert f"Showing the {MAX_SQNR_BARS} worst of {len(report['layers'])} layers" in doc
    sqnr_chart = doc[doc.index("aria-label=\"per-layer SQNR\""):]
    assert sqnr_chart[:sqnr_chart.index("</svg>")].count("<rect") == MAX_SQNR_BARS
    assert "<details>\n<summary>All nodes" in doc
    assert len(doc.encode()) < 1_000_000


def test_html_escapes_hostile_names():
    report = transformer(gate_passed=False)
    report["layers"][0]["tensor"] = HOSTILE
    report["nodes"][0]["name"] = HOSTILE
    report["outputs"][HOSTILE] = report["outputs"].pop("logits")
    report["histograms"][HOSTILE] = report["histograms"].pop(next(iter(report["histograms"])))
    report["size_by_op"][HOSTILE] = {"original": 1, "quantized": 1}
    report["gate"]["checks"][0]["name"] = HOSTILE
    report["warnings"].append(f"\"quoted\" & {HOSTILE}")
    doc = render_html(report)
    _parse(doc)
    assert "<script" not in doc and "alert(1)</" not in doc
    assert doc.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 7


@pytest.mark.parametrize("missing", OPTIONAL)
def test_html_and_markdown_render_without_any_section(missing):
    report = transformer(gate_passed=True)
    del report[missing]
    _parse(render_html(report))
    assert render_markdown(report).startswith("## qconv int8")


@pytest.mark.parametrize("junk", [None, "x", 3, [], {}, [None], {"a": None}])
def test_renderers_survive_sections_of_the_wrong_type(junk):
    report = transformer(gate_passed=False)
    for key in OPTIONAL:
        report[key] = copy.deepcopy(junk)
    _parse(render_html(report))
    assert render_markdown(report).startswith("## qconv int8")
    bare = render_html({"schema": "qconv.report", "version": 2, "mode": "fp16"})
    assert "fp16" in bare and "Per-layer SQNR" not in bare and "Gate" not in bare


def test_latency_words_follow_the_measured_verdict():
    report = cnn()
    report["latency_ms"].update(ratio=0.97, verdict="same within noise")
    assert "same within noise" in render_html(report) and "faster" not in render_markdown(report).split("latency")[1].split("\n")[0]
    report["latency_ms"].update(ratio=0.5, verdict="faster")
    assert "2.00\u00d7 faster" in render_markdown(report)


def test_html_handles_infinite_and_missing_sqnr():
    report = cnn()
    report["layers"] = [_layer("t_exact", "Relu", "inf", 1.0, 0.0), _layer("t_broken", "Div", "-inf", 0.0, 1.0),
                        _layer("t_unknown", "Add", None, None, None), _layer("t_fine", "Conv", 35.0, 0.999, 0.1)]
    report["outputs"]["logits"]["sqnr_db"] = "inf"
    doc = render_html(report)
    _parse(doc)
    assert "\u221e dB" in doc and "\u2212\u221e" in doc
    assert doc.index("t_broken") < doc.index("t_fine") < doc.index("t_exact") < doc.index("t_unknown")


def _cells(line: str) -> int:
    return len(re.split(r"(?<!\\)\|", line.strip())) - 2


def _tables(md: str) -> list[list[str]]:
    tables, current = [], []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    return tables


def test_markdown_summary_of_a_real_report():
    from qconv.report.html import format_bytes, format_number, format_percent, size_change, speed_change

    report = cnn()
    md = render_markdown(report)
    assert md == render_markdown(cnn())
    lines = md.splitlines()
    assert lines[0] == f"## qconv int8 `{report['model']['input']}`" and lines[0].endswith("sample_models/digits_cnn/model.onnx`")
    size, task, lat = report["size_bytes"], report["task"], report["latency_ms"]
    out = report["outputs"]["logits"]
    drop = "0.00 pts" if round(task["drop_points"], 2) == 0 else f"{-task['drop_points']:+.2f} pts".replace("-", "\u2212")
    for fact in (f"| size | {format_bytes(size['original'])} | {format_bytes(size['quantized'])} | {size_change(size['ratio'])} |",
                 f"| {format_percent(task['original'])} | {format_percent(task['quantized'])} | {drop} |",
                 speed_change(lat["ratio"], lat.get("verdict")),
                 f"| worst output `logits` | \u2014 | {out['sqnr_db']:.1f} dB SQNR | cosine {format_number(out['cosine'], '.5f')} |",
                 f"**Worst layers** ({len(report['layers'])} of {len(report['layers'])})",
                 f"| `{report['layers'][0]['tensor']}` | {report['layers'][0]['op_type']} |",
                 f"| nodes | \u2014 | {report['node_summary']['quantized']} quantized | 0 kept float |"):
        assert fact in md, fact
    assert "Kept in float" not in md and "Failed" not in md


def test_markdown_tables_are_consistent_and_compact():
    report = large(transformer(gate_passed=False), copies=12)
    report["layers"][0]["tensor"] = "a|b`c"
    report["warnings"] += [f"warning {i} with a | pipe" for i in range(20)]
    md = render_markdown(report)
    assert md.splitlines()[0].endswith("\u274c FAILED") and len(md.splitlines()) <= 60
    tables = _tables(md)
    assert len(tables) == 3
    for table in tables:
        assert len({_cells(line) for line in table}) == 1, table
    assert "| `` a\\|b`c `` |" in md and "warning 0 with a \\| pipe" in md
    gate = report["gate"]["checks"][1]
    assert f"- \u274c max-latency-ratio: measured {gate['measured']:.4g}x, required \\<= {gate['required']:g}x" in md
    from qconv.report.html import float_groups

    ops, reason, names = float_groups(report)[0]
    assert f"| {ops} | {len(names)} | {reason} |" in md.replace("\\", "")


def test_markdown_escapes_and_handles_inf_and_missing_sections():
    report = transformer(gate_passed=True)
    report["warnings"] = [HOSTILE]
    report["outputs"] = {"out": {"sqnr_db": "inf", "cosine": 1.0}}
    md = render_markdown(report)
    assert md.splitlines()[0].endswith("\u2705 PASSED")
    assert "<script>" not in md and "\\<script\\>" in md and "| \u2014 | \u221e dB SQNR |" in md
    assert "| \u221e |" in render_markdown(large(report, 1) | {"layers": [_layer("x", "Relu", "inf", 1.0, 0.0)]})
    report["gate"] = {"passed": False,
                      "checks": [{"name": "custom", "measured": "inf", "required": 5, "passed": False}]}
    assert "- \u274c `custom`: measured inf, required 5\n" in render_markdown(report)
    assert render_markdown({}) == "## qconv ?\n"


@pytest.mark.parametrize("make", [cnn, lambda: transformer(gate_passed=False), lambda: large(transformer(gate_passed=True), 40)])
def test_html_passes_a_strict_html5_parser(make):
    """html5lib in strict mode raises on any parse error of the HTML5 spec (unclosed or misnested elements, bad
    attributes, stray end tags): the offline validator the suite can run."""
    import html5lib

    html5lib.HTMLParser(strict=True, namespaceHTMLElements=False).parse(render_html(make()))


@pytest.mark.parametrize("make", [cnn, lambda: transformer(gate_passed=False)])
def test_markdown_renders_as_github_tables_without_raw_html(make):
    """CommonMark with GitHub's tables (markdown-it, rich's own parser): every table line becomes a table, and no
    token is raw HTML (a pull-request comment shows it as written)."""
    from markdown_it import MarkdownIt

    md = render_markdown(make())
    tokens = MarkdownIt("commonmark").enable("table").parse(md)
    assert not [t for t in tokens if t.type in ("html_block", "html_inline")]
    assert not [c for t in tokens if t.children for c in t.children if c.type == "html_inline"]
    table_lines = sum(1 for line in md.splitlines() if line.startswith("|"))
    rows = sum(1 for t in tokens if t.type == "tr_open")
    assert table_lines > 3 and rows == table_lines - sum(1 for t in tokens if t.type == "table_open")  # separators aside


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_html_loads_without_console_errors_in_headless_chromium(tmp_path):
    page = tmp_path / "report.html"
    page.write_text(render_html(transformer(gate_passed=False)), encoding="utf-8")
    cmd = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync", "--enable-logging=stderr",
           "--v=0", f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", page.as_uri()]
    r = subprocess.run(cmd, capture_output=True, timeout=60, text=True)
    assert r.returncode == 0 and "</html>" in r.stdout
    console = [line for line in r.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_html_screenshot_in_headless_chromium(tmp_path):
    page = tmp_path / "report.html"
    page.write_text(render_html(transformer(gate_passed=False)), encoding="utf-8")
    png = tmp_path / "report.png"
    cmd = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={png}", "--window-size=1280,2000",
           page.as_uri()]
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 50_000


# ---------------------------------------------------------------------------------------------- fixtures
# Real reports, made by the report builder from real runs of the bundled sample models (once per session).

@pytest.fixture(scope="session")
def real_reports(tmp_path_factory):
    from qconv.jobs import CalibOptions, EvalOptions, PlanJob, QuantizeJob, run_quantize
    from qconv.measure.thresholds import Thresholds
    from qconv.plan.config import QuantConfig
    from tests.conftest import SAMPLES

    out = tmp_path_factory.mktemp("reports")
    made = {}
    for name, ext in (("digits_cnn", "npy"), ("tiny_transformer", "npz")):
        d = SAMPLES / name
        job = QuantizeJob(out=out / f"{name}.onnx", planning=PlanJob(model=d / "model.onnx", data=d / f"calib.{ext}",
                                                        config=QuantConfig(kernels="none"),  # int8 wherever a kernel is
                                                        calib_options=CalibOptions(batch_size=100)),
                          evaluation=EvalOptions(data=d / f"eval.{ext}", labels=d / "eval_labels.npy", layer_samples=32),
                          gates=Thresholds(min_sqnr=30.0) if name == "tiny_transformer" else Thresholds())
        made[name], _ = run_quantize(job)
    return made


@pytest.fixture(autouse=True)
def _reports(real_reports):
    global CNN_REPORT, TRANSFORMER_REPORT
    CNN_REPORT, TRANSFORMER_REPORT = real_reports["digits_cnn"], real_reports["tiny_transformer"]


CNN_REPORT: dict = {}
TRANSFORMER_REPORT: dict = {}
