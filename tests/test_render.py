"""The HTML and Markdown renderers of the report dict: structure, escaping, determinism, missing sections.

The fixtures at the end are trimmed copies of real reports the pipeline wrote for the bundled digits CNN and
tiny transformer (int8, minmax): every node kind and kept-in-float reason is kept, the rest thinned out.
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
        required = 1.1 if gate_passed else 0.9
        checks = [{"name": "min-sqnr", "measured": 42.2989, "required": 30, "passed": True,
                   "message": "min-sqnr: measured 42.3 dB, required >= 30 dB"},
                  {"name": "max-latency-ratio", "measured": 1.0331, "required": required, "passed": gate_passed,
                   "message": f"max-latency-ratio: measured 1.033x, required <= {required:g}x"}]
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
    doc = render_html(report)
    text = " ".join(_parse(doc).text)
    worst = report["layers"][0]["tensor"]
    assert worst == "/layers.1/attention/Div_output_0" and text.index(worst) < text.index(report["layers"][4]["tensor"])
    for fact in ("Gate failed", "int8", "sample_models/tiny_transformer/model.onnx", "2.44\u00d7", "100.00%",
                 "1.03\u00d7", "slower", "max-latency-ratio", "\u2264 0.9",
                 "for MatMul-heavy models try --mode dynamic",
                 "numerically fragile: normalization divides by a variance that 8 bits distort",
                 "no calibration statistics for tensor '\u2026'", "66 Constant nodes turned into initializers",
                 "42.3 dB", "\u221e"):
        assert fact in text, fact
    assert doc.count("<rect class=\"keep\"") == len(report["histograms"])  # each histogram's clip range
    assert doc.count("class=\"clip\"") == 2 * len(report["histograms"])
    assert "<details>\n<summary>All nodes (43)" in doc  # long tables fold away, short ones stay open
    assert "<details open>\n<summary>All nodes (10)" in render_html(cnn())


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
    md = render_markdown(cnn())
    assert md == render_markdown(cnn())
    lines = md.splitlines()
    assert lines[0] == "## qconv int8 `sample_models/digits_cnn/model.onnx`"
    for fact in ("| size | 95.5 KiB | 35.1 KiB | 2.72\u00d7 smaller |", "| 99.20% | 99.20% | 0.00 pts |",
                 "1.42\u00d7 faster", "| worst output `logits` | \u2014 | 36.3 dB SQNR | cosine 0.99989 |",
                 "**Worst layers** (6 of 6)", "| `/features/features.5/Relu_output_0` | Relu | 36.3 |"):
        assert fact in md, fact
    assert "Warnings" not in md and "Kept in float" not in md and "Failed" not in md


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
    assert "- \u274c max-latency-ratio: measured 1.033x, required \\<= 0.9x" in md
    assert "| Add | 24 | no calibration statistics for tensor '\u2026' |" in md


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

CNN_REPORT = {
    'calibration': {
        'constant_tensors': [],
        'data_id': 'd8279cc379a6b18e',
        'method': 'minmax',
        'model_id': 'a2d63d79e9a512d5',
        'nonfinite_tensors': [],
        'recorded_with': {
            'batch_size': 50,
            'bins': 2048,
            'method': 'minmax',
            'momentum': 0.01,
            'samples': None,
            'shard': '0/1',
            'tensors': 'planned',
        },
        'samples': 3,
        'tensors': 7,
    },
    'config': {
        'activation_type': 'uint8',
        'block_size': 32,
        'exclude_nodes': [],
        'exclude_ops': [],
        'format': 'qdq',
        'int4_method': 'gptq',
        'keep_io_types': True,
        'method': 'minmax',
        'mode': 'int8',
        'per_channel': True,
        'percentile': 99.999,
        'reduce_range': False,
        'symmetric_activations': False,
        'symmetric_weights': True,
        'weight_type': 'int8',
    },
    'evaluation': {'batches': 10, 'data': 'sample_models/digits_cnn/eval.npy'},
    'histograms': {
        '/features/features.10/Flatten_output_0': _histogram(0.0, 0.125, 0.0, 11.8245, [
                1335, 64, 81, 94, 115, 117, 114, 117, 134, 138, 145, 165, 149, 132, 142, 154, 144, 135, 115, 119,
                121, 112, 118, 147, 115, 148, 120, 126, 107, 126, 103, 139, 131, 102, 108, 128, 120, 123, 101, 132,
                97, 102, 93, 91, 93, 80, 90, 89, 72, 73, 73, 58, 64, 54, 79, 57, 54, 50, 60, 51, 50, 47, 39, 36,
                37, 41, 36, 27, 36, 23, 19, 22, 20, 21, 9, 13, 7, 12, 15, 11, 7, 8, 6, 5, 10, 1, 3, 2, 1, 3, 3, 1,
                2, 1, 2,
            ]),
        '/features/features.2/Relu_output_0': _histogram(0.0, 0.046875, 0.0, 4.28516, [
                71959, 1997, 4143, 2111, 2154, 2081, 2180, 3067, 1862, 1871, 1950, 2901, 2592, 2854, 1495, 1553,
                2489, 1336, 1256, 1252, 1197, 1134, 1127, 1115, 1120, 2008, 798, 783, 698, 713, 638, 589, 550, 543,
                517, 471, 450, 422, 351, 345, 309, 258, 241, 212, 192, 161, 145, 128, 97, 79, 83, 61, 66, 53, 40,
                44, 39, 33, 24, 18, 16, 23, 13, 10, 11, 2, 2, 3, 5, 4, 3, 3, 4, 4, 0, 1, 1, 5, 0, 2, 1, 0, 2, 1, 0,
                0, 0, 0, 0, 0, 0, 1,
            ]),
    },
    'latency_ms': {
        'original': 0.648629,
        'provider': 'CPUExecutionProvider',
        'quantized': 0.455912,
        'ratio': 0.702885,
        'runs': 30,
        'threads': 2,
    },
    'layers': [
        _layer('/features/features.5/Relu', 'Relu', 36.2641, 0.999884, 0.10793),
        _layer('/features/features.6/MaxPool', 'MaxPool', 38.0637, 0.999923, 0.100682),
        _layer('/features/features.8/Relu', 'Relu', 39.6785, 0.999948, 4.3551),
        _layer('/features/features.10/Flatten', 'Flatten', 40.6286, 0.999959, 2.18092),
        _layer('/features/features.9/GlobalAveragePool', 'GlobalAveragePool', 40.6286, 0.999959, 2.18092),
        _layer('/features/features.2/Relu', 'Relu', 42.4803, 0.999973, 0.0635757),
    ],
    'mode': 'int8',
    'model': {
        'input': 'sample_models/digits_cnn/model.onnx',
        'intake': [],
        'opset_original': 17,
        'opset_quantized': 17,
        'output': '/tmp/o/d.onnx',
    },
    'node_summary': {
        'by_op': {
            'Conv': {'float': 0, 'integer': 0, 'quantized': 3},
            'Flatten': {'float': 0, 'integer': 0, 'quantized': 1},
            'Gemm': {'float': 0, 'integer': 0, 'quantized': 1},
            'GlobalAveragePool': {'float': 0, 'integer': 0, 'quantized': 1},
            'MaxPool': {'float': 0, 'integer': 0, 'quantized': 1},
            'Relu': {'float': 0, 'integer': 0, 'quantized': 3},
        },
        'float': 0,
        'folded_activations': 3,
        'integer': 0,
        'quantized': 10,
    },
    'nodes': [
        _node('/features/features.0/Conv', 'Conv', 'quantized'),
        _node('/features/features.2/Relu', 'Relu', 'quantized',
              'folded into /features/features.0/Conv: its QuantizeLinear clamps the same way', 42.4803,
              0.0168045, 0),
        _node('/features/features.3/Conv', 'Conv', 'quantized'),
        _node('/features/features.5/Relu', 'Relu', 'quantized',
              'folded into /features/features.3/Conv: its QuantizeLinear clamps the same way', 36.2641,
              0.0420043, 0),
        _node('/features/features.6/MaxPool', 'MaxPool', 'quantized', '', 38.0637, 0.0420043, 0),
        _node('/features/features.7/Conv', 'Conv', 'quantized'),
        _node('/features/features.8/Relu', 'Relu', 'quantized',
              'folded into /features/features.7/Conv: its QuantizeLinear clamps the same way', 39.6785, 0.122059,
              0),
        _node('/features/features.9/GlobalAveragePool', 'GlobalAveragePool', 'quantized', '', 40.6286, 0.0463707,
              0),
        _node('/features/features.10/Flatten', 'Flatten', 'quantized', '', 40.6286, 0.0463707, 0),
        _node('/head/Gemm', 'Gemm', 'quantized', output='logits'),
    ],
    'outputs': {
        'logits': {'cosine': 0.999885, 'max_abs_err': 0.653046, 'mean_abs_err': 0.0995497, 'sqnr_db': 36.3363},
    },
    'qconv_version': '0.1.0',
    'schema': 'qconv.report',
    'size_by_op': {
        'Conv': {'original': 93341, 'quantized': 26194},
        'Gemm': {'original': 2639, 'quantized': 1140},
        'QuantizeLinear': {'original': 0, 'quantized': 696},
    },
    'size_bytes': {'original': 97757, 'quantized': 35951, 'ratio': 2.71917},
    'task': {'drop_points': 0.0, 'metric': 'top1', 'original': 0.992, 'quantized': 0.992, 'samples': 500},
    'version': 2,
    'warnings': [],
}

TRANSFORMER_REPORT = {
    'calibration': {
        'constant_tensors': [],
        'data_id': 'edbf88c4fd797b57',
        'method': 'minmax',
        'model_id': '719d7be15d638538',
        'nonfinite_tensors': [],
        'recorded_with': {
            'batch_size': 50,
            'bins': 2048,
            'method': 'minmax',
            'momentum': 0.01,
            'samples': None,
            'shard': '0/1',
            'tensors': 'planned',
        },
        'samples': 3,
        'tensors': 23,
    },
    'config': {
        'activation_type': 'uint8',
        'block_size': 32,
        'exclude_nodes': [],
        'exclude_ops': [],
        'format': 'qdq',
        'int4_method': 'gptq',
        'keep_io_types': True,
        'method': 'minmax',
        'mode': 'int8',
        'per_channel': True,
        'percentile': 99.999,
        'reduce_range': False,
        'symmetric_activations': False,
        'symmetric_weights': True,
        'weight_type': 'int8',
    },
    'evaluation': {'batches': 10, 'data': 'sample_models/tiny_transformer/eval.npz'},
    'histograms': {
        '/layers.0/attention/MatMul_1_output_0': _histogram(-1.37109375, 0.02734375, -1.37012, 1.17309, [
                1, 1, 0, 0, 1, 0, 2, 0, 4, 2, 9, 9, 22, 24, 26, 28, 56, 49, 66, 72, 115, 136, 182, 216, 262, 310,
                374, 534, 645, 787, 928, 1171, 1443, 1747, 2149, 2689, 3125, 3741, 4217, 4705, 5375, 5904, 6588,
                6837, 7438, 7727, 8118, 8261, 8627, 8517, 8555, 8280, 8072, 7792, 7329, 6912, 6267, 5610, 5282,
                4695, 4173, 3612, 3101, 2690, 2210, 1820, 1479, 1186, 987, 801, 640, 515, 396, 289, 197, 143, 87,
                68, 52, 40, 32, 13, 14, 5, 5, 2, 3, 5, 3, 0, 3, 1, 1, 1,
            ]),
        '/layers.0/ffn/ffn.1/Mul_1_output_0': _histogram(-0.171875, 0.0390625, -0.169971, 3.49516, [
                107647, 40825, 28291, 21619, 18177, 16008, 14135, 12517, 11165, 10331, 9174, 8348, 7839, 7032,
                6541, 5978, 5541, 5144, 4731, 4409, 3984, 3676, 3371, 3182, 2913, 2594, 2341, 2239, 2063, 1940,
                1836, 1645, 1521, 1340, 1229, 1119, 992, 917, 919, 796, 714, 665, 661, 563, 546, 444, 354, 389,
                362, 290, 259, 227, 199, 179, 176, 158, 127, 112, 111, 86, 64, 68, 55, 55, 33, 37, 31, 32, 24, 18,
                25, 16, 7, 12, 10, 10, 5, 1, 5, 4, 2, 2, 4, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 2,
            ]),
    },
    'latency_ms': {
        'original': 6.91648,
        'provider': 'CPUExecutionProvider',
        'quantized': 7.14539,
        'ratio': 1.0331,
        'runs': 30,
        'threads': 2,
    },
    'layers': [
        _layer('/layers.1/attention/Div', 'Div', 32.7824, 0.999737, 0.19341),
        _layer('/layers.1/attention/MatMul', 'MatMul', 32.7824, 0.999737, 0.773642),
        _layer('/layers.0/attention/Div', 'Div', 33.4659, 0.999776, 0.0494456),
        _layer('/layers.0/attention/MatMul', 'MatMul', 33.4659, 0.999776, 0.197783),
        _layer('/layers.1/attention/Reshape', 'Reshape', 33.5034, 0.999777, 0.0922031),
        _layer('/layers.1/attention/Transpose', 'Transpose', 33.5034, 0.999777, 0.0922031),
        _layer('/layers.0/attention/MatMul_1', 'MatMul', 33.7766, 0.99979, 0.162097),
        _layer('/layers.0/attention/Reshape_3', 'Reshape', 33.7766, 0.99979, 0.162097),
        _layer('/layers.0/attention/Transpose_3', 'Transpose', 33.7766, 0.99979, 0.162097),
        _layer('/layers.1/attention/Reshape_1', 'Reshape', 33.9151, 0.999797, 0.499232),
        _layer('/layers.1/attention/Transpose_2', 'Transpose', 33.9151, 0.999797, 0.499232),
        _layer('/layers.0/ffn/ffn.1/Mul_1', 'Mul', 34.4168, 0.999819, 0.073645),
        _layer('/Unsqueeze_1', 'Unsqueeze', 'inf', 1.0, 0.0),
        _layer('/Unsqueeze_2', 'Unsqueeze', 'inf', 1.0, 0.0),
        _layer('/Unsqueeze', 'Unsqueeze', 'inf', 1.0, 0.0),
    ],
    'mode': 'int8',
    'model': {
        'input': 'sample_models/tiny_transformer/model.onnx',
        'intake': ['66 Constant nodes turned into initializers'],
        'opset_original': 17,
        'opset_quantized': 17,
        'output': '/tmp/o/t.onnx',
    },
    'node_summary': {
        'by_op': {
            'Add': {'float': 21, 'integer': 0, 'quantized': 0},
            'Cast': {'float': 1, 'integer': 1, 'quantized': 0},
            'Clip': {'float': 1, 'integer': 0, 'quantized': 0},
            'Concat': {'float': 0, 'integer': 8, 'quantized': 0},
            'Div': {'float': 5, 'integer': 0, 'quantized': 0},
            'Erf': {'float': 2, 'integer': 0, 'quantized': 0},
            'Gather': {'float': 0, 'integer': 19, 'quantized': 2},
            'Gemm': {'float': 0, 'integer': 0, 'quantized': 1},
            'LayerNormalization': {'float': 5, 'integer': 0, 'quantized': 0},
            'MatMul': {'float': 0, 'integer': 0, 'quantized': 16},
            'Mul': {'float': 6, 'integer': 0, 'quantized': 0},
            'Range': {'float': 0, 'integer': 1, 'quantized': 0},
            'ReduceSum': {'float': 2, 'integer': 0, 'quantized': 0},
            'Reshape': {'float': 6, 'integer': 0, 'quantized': 2},
            'Shape': {'float': 0, 'integer': 19, 'quantized': 0},
            'Softmax': {'float': 2, 'integer': 0, 'quantized': 0},
            'Sub': {'float': 1, 'integer': 0, 'quantized': 0},
            'Transpose': {'float': 6, 'integer': 0, 'quantized': 2},
            'Unsqueeze': {'float': 3, 'integer': 18, 'quantized': 0},
        },
        'float': 61,
        'folded_activations': 0,
        'integer': 66,
        'quantized': 23,
    },
    'nodes': [
        _node('/Shape', 'Shape', 'integer', 'integer output (shape or index math): nothing to quantize'),
        _node('/Gather', 'Gather', 'integer', 'integer output (shape or index math): nothing to quantize'),
        _node('/Cast', 'Cast', 'integer', 'integer output (shape or index math): nothing to quantize'),
        _node('/Range', 'Range', 'integer', 'integer output (shape or index math): nothing to quantize'),
        _node('/token_emb/Gather', 'Gather', 'quantized', '', 42.2646),
        _node('/pos_emb/Gather', 'Gather', 'quantized', '', 41.5615),
        _node('/Add', 'Add', 'float', "no calibration statistics for tensor '/Add_output_0'", 41.7425),
        _node('/emb_norm/LayerNormalization', 'LayerNormalization', 'float',
              'numerically fragile: normalization divides by a variance that 8 bits distort', 37.8222, 0.0334095,
              122),
        _node('/Cast_1', 'Cast', 'float', "no int8 kernel for Cast in onnxruntime's CPU provider", 'inf'),
        _node('/Unsqueeze', 'Unsqueeze', 'float', "no calibration statistics for tensor '/Cast_1_output_0'",
              'inf'),
        _node('/Unsqueeze_1', 'Unsqueeze', 'float', "no calibration statistics for tensor '/Unsqueeze_output_0'",
              'inf'),
        _node('/Sub', 'Sub', 'float', "no int8 kernel for Sub in onnxruntime's CPU provider", 'inf'),
        _node('/Mul', 'Mul', 'float',
              "operand '/Constant_6_output_0' holds mask-like constants that int8 would erase", 'inf'),
        _node('/layers.0/attention/q/MatMul', 'MatMul', 'quantized', '', 37.5206),
        _node('/layers.0/attention/q/Add', 'Add', 'float',
              "no calibration statistics for tensor '/layers.0/attention/q/MatMul_output_0'", 37.6073),
        _node('/layers.0/attention/Shape', 'Shape', 'integer',
              'integer output (shape or index math): nothing to quantize'),
        _node('/layers.0/attention/Gather', 'Gather', 'integer',
              'integer output (shape or index math): nothing to quantize'),
        _node('/layers.0/attention/Unsqueeze', 'Unsqueeze', 'integer',
              'integer output (shape or index math): nothing to quantize'),
        _node('/layers.0/attention/Unsqueeze_1', 'Unsqueeze', 'integer',
              'integer output (shape or index math): nothing to quantize'),
        _node('/layers.0/attention/Concat', 'Concat', 'integer',
              'integer output (shape or index math): nothing to quantize'),
        _node('/layers.0/attention/Reshape', 'Reshape', 'float',
              "no calibration statistics for tensor '/layers.0/attention/q/Add_output_0'", 35.7311),
        _node('/layers.0/attention/Transpose', 'Transpose', 'float',
              "no calibration statistics for tensor '/layers.0/attention/Reshape_output_0'", 35.7311, 0.0205819,
              130),
        _node('/layers.0/attention/k/MatMul', 'MatMul', 'quantized', '', 37.6839),
        _node('/layers.0/attention/Concat_1', 'Concat', 'integer',
              'integer output (shape or index math): nothing to quantize'),
        _node('/layers.0/attention/Reshape_1', 'Reshape', 'float',
              "no calibration statistics for tensor '/layers.0/attention/k/Add_output_0'", 35.9302),
        _node('/layers.0/attention/Transpose_1', 'Transpose', 'float',
              "no calibration statistics for tensor '/layers.0/attention/Reshape_2_output_0'", 35.5928,
              0.0198306, 133),
        _node('/layers.0/attention/Div', 'Div', 'float', "no int8 kernel for Div in onnxruntime's CPU provider",
              33.4659),
        _node('/layers.0/attention/Softmax', 'Softmax', 'float',
              'numerically fragile: its outputs span orders of magnitude that 8 bits cannot hold', 38.095,
              0.00244017, 0),
        _node('/layers.0/attention/Transpose_3', 'Transpose', 'quantized', '', 33.7766, 0.00997335, 137),
        _node('/layers.0/attention/Reshape_3', 'Reshape', 'quantized', '', 33.7766, 0.00997335, 137),
        _node('/layers.0/norm1/LayerNormalization', 'LayerNormalization', 'float',
              'numerically fragile: normalization divides by a variance that 8 bits distort', 35.7274, 0.0349237,
              128),
        _node('/layers.0/ffn/ffn.1/Div', 'Div', 'float', "no int8 kernel for Div in onnxruntime's CPU provider",
              35.73),
        _node('/layers.0/ffn/ffn.1/Erf', 'Erf', 'float', "no int8 kernel for Erf in onnxruntime's CPU provider",
              35.5587),
        _node('/layers.0/ffn/ffn.1/Mul', 'Mul', 'float',
              "no calibration statistics for tensor '/layers.0/ffn/ffn.0/Add_output_0'", 35.7907),
        _node('/layers.0/ffn/ffn.1/Mul_1', 'Mul', 'float',
              "no calibration statistics for tensor '/layers.0/ffn/ffn.1/Mul_output_0'", 34.4168, 0.0143731, 12),
        _node('/layers.1/attention/Softmax', 'Softmax', 'float',
              'numerically fragile: its outputs span orders of magnitude that 8 bits cannot hold', 36.4117,
              0.00258767, 0),
        _node('/layers.1/attention/Transpose_3', 'Transpose', 'quantized', '', 38.256, 0.0261497, 139),
        _node('/layers.1/attention/Reshape_3', 'Reshape', 'quantized', '', 38.256, 0.0261497, 139),
        _node('/layers.1/ffn/ffn.1/Erf', 'Erf', 'float', "no int8 kernel for Erf in onnxruntime's CPU provider",
              38.9469),
        _node('/ReduceSum', 'ReduceSum', 'float', "no int8 kernel for ReduceSum in onnxruntime's CPU provider",
              42.6417),
        _node('/ReduceSum_1', 'ReduceSum', 'float', "no int8 kernel for ReduceSum in onnxruntime's CPU provider",
              'inf'),
        _node('/Clip', 'Clip', 'float', "no calibration statistics for tensor '/ReduceSum_1_output_0'", 'inf'),
        _node('/head/Gemm', 'Gemm', 'quantized', output='logits'),
    ],
    'outputs': {
        'logits': {'cosine': 0.999971, 'max_abs_err': 0.336035, 'mean_abs_err': 0.0240783, 'sqnr_db': 42.2989},
    },
    'qconv_version': '0.1.0',
    'schema': 'qconv.report',
    'size_by_op': {
        'Add': {'original': 4072, 'quantized': 4072},
        'Clip': {'original': 30, 'quantized': 30},
        'Concat': {'original': 664, 'quantized': 664},
        'Div': {'original': 194, 'quantized': 194},
        'Gather': {'original': 15376, 'quantized': 4927},
        'Gemm': {'original': 1079, 'quantized': 654},
        'LayerNormalization': {'original': 2838, 'quantized': 2838},
        'MatMul': {'original': 262484, 'quantized': 72359},
        'Mul': {'original': 128, 'quantized': 128},
        'QuantizeLinear': {'original': 0, 'quantized': 2284},
        'Range': {'original': 68, 'quantized': 68},
        'ReduceSum': {'original': 35, 'quantized': 35},
        'Sub': {'original': 30, 'quantized': 30},
        'Unsqueeze': {'original': 734, 'quantized': 734},
    },
    'size_bytes': {'original': 312821, 'quantized': 128397, 'ratio': 2.43636},
    'task': {'drop_points': 0.0, 'metric': 'top1', 'original': 1.0, 'quantized': 1.0, 'samples': 500},
    'version': 2,
    'warnings': [
        'the int8 model is slower than the original on this CPU (1.03x the time); for MatMul-heavy models try '
        '--mode dynamic, or keep small layers float with --exclude-nodes',
    ],
}
