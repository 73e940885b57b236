"""Shared CLI plumbing: the error boundary and options several commands take."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from qconv.calib.observers import DEFAULT_BINS, DEFAULT_MOMENTUM
from qconv.calib.ranges import METHODS
from qconv.cli.console import Terminal
from qconv.errors import GateFailed, QconvError
from qconv.report.gates import Gates


def guarded(fn):
    """Turn QconvError into a one-line message and its exit code; anything else is an internal error."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        ctx = click.get_current_context()
        debug = bool(ctx.find_root().params.get("debug"))
        term = Terminal(quiet=bool(kwargs.get("quiet")))
        try:
            return fn(term, *args, **kwargs)
        except QconvError as exc:
            if debug:
                raise
            term.error(str(exc))
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            term.error("interrupted; nothing was written")
            sys.exit(130)
        except Exception as exc:  # noqa: BLE001 - the boundary: no traceback unless --debug
            if debug:
                raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            term.error(f"internal error: {type(exc).__name__}: {first} (re-run with --debug for the traceback, and please report it)")
            sys.exit(1)

    return wrapper


def data_options(fn):
    """Options that select feeds and set what calibration records."""
    fn = click.option("--momentum", type=click.FloatRange(0.0, 1.0, min_open=True), default=DEFAULT_MOMENTUM, show_default=True,
                      help="Weight of each batch in the moving-average method.")(fn)
    fn = click.option("--bins", type=click.IntRange(min=128, max=65536), default=DEFAULT_BINS, show_default=True,
                      help="Histogram bins per tensor (memory per tensor is O(bins), whatever the samples).")(fn)
    fn = click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True,
                      help="Rows per feed when an array is split into batches.")(fn)
    fn = click.option("--samples", type=click.IntRange(min=1), default=None,
                      help="Use at most N rows of calibration data (default: all).")(fn)
    return fn


def range_options(fn):
    """How activation ranges are chosen from the recorded statistics."""
    fn = click.option("--percentile", type=float, default=None,
                      help="Percent of values the percentile method keeps, in (0, 100]  [default: 99.999]")(fn)
    fn = click.option("--method", type=click.Choice(METHODS), default=None,
                      help="Range method: minmax, moving-average, percentile, entropy (KL) or mse  [default: minmax, or the calibration file's]")(fn)
    return fn


def report_options(fn):
    """Where the report goes: files by extension, JSON on stdout; and whether latency is measured."""
    fn = click.option("--no-latency", is_flag=True, help="Skip the latency measurement.")(fn)
    fn = click.option("--json", "as_json", is_flag=True, help="Print the JSON report on stdout.")(fn)
    fn = click.option("--report", "reports", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
                      help="Write the report to PATH; .json, .html or .md picks the format (repeatable).")(fn)
    return fn


def gate_options(fn):
    """Quality gates: any failing one makes the command exit 3 (outputs are still written)."""
    fn = click.option("--max-latency-ratio", type=float, default=None, metavar="R", help="Gate: quantized/original median latency <= R.")(fn)
    fn = click.option("--max-size-mb", type=float, default=None, metavar="MB", help="Gate: quantized model size <= MB (10^6 bytes).")(fn)
    fn = click.option("--max-top1-drop", type=float, default=None, metavar="POINTS", help="Gate: top-1 accuracy drop <= POINTS (needs --eval-labels).")(fn)
    fn = click.option("--min-cosine", type=float, default=None, metavar="X", help="Gate: cosine similarity of every output >= X.")(fn)
    fn = click.option("--min-sqnr", type=float, default=None, metavar="DB", help="Gate: SQNR of every output >= DB.")(fn)
    return fn


def gates_from(kwargs: dict) -> Gates:
    return Gates(**{k: kwargs.pop(k) for k in ("min_sqnr", "min_cosine", "max_top1_drop", "max_size_mb", "max_latency_ratio")})


def finish(term, report: dict, as_json: bool, render) -> None:
    """Print the report (JSON or tables), then fail with exit 3 if a gate failed."""
    if as_json:
        term.print_json(report)
    else:
        render(term, report)
    gate = report.get("gate")
    if gate and not gate["passed"]:
        raise GateFailed("\n".join(f"gate failed: {c['message']}" for c in gate["checks"] if not c["passed"]))
    if gate:
        term.info(f"all {len(gate['checks'])} quality gates passed")


def output_options(fn):
    fn = click.option("--threads", type=click.IntRange(min=1), default=None,
                      help="onnxruntime intra-op threads (default: all cores).")(fn)
    fn = click.option("--quiet", "-q", is_flag=True, help="Print nothing but errors.")(fn)
    return fn
