"""Write a report in the format its file extension names: .json, .html or .md."""

from __future__ import annotations

import json
from pathlib import Path

from qconv import io
from qconv.errors import UsageError

FORMATS = (".json", ".html", ".md")


def check_report_paths(paths, *inputs) -> None:
    for p in paths:
        if Path(p).suffix.lower() not in FORMATS:
            raise UsageError(f"--report {p}: the extension picks the format; use one of {', '.join(FORMATS)}")
        io.check_output_path(p, *inputs)


def render(report: dict, suffix: str) -> str:
    if suffix == ".json":
        return json.dumps(report, indent=2, sort_keys=True) + "\n"
    if suffix == ".html":
        from qconv.report.html import render_html

        return render_html(report)
    from qconv.report.markdown import render_markdown

    return render_markdown(report)


def write_reports(report: dict, paths) -> None:
    for p in paths:
        io.write_text(render(report, Path(p).suffix.lower()), p)
