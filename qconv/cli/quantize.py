"""qconv quantize: calibrate (or reuse a calibration file), rewrite to QDQ, evaluate, report."""

from __future__ import annotations

import collections
from pathlib import Path

import click
import numpy as np

from qconv import io, pipeline
from qconv.cli.common import data_options, guarded, output_options, range_options
from qconv.cli.console import table
from qconv.config import QuantConfig
from qconv.errors import QconvError, UsageError
from qconv.report.build import build_report


def _labels(path: Path | None) -> np.ndarray | None:
    if path is None:
        return None
    if not path.exists():
        raise QconvError(f"labels file not found: {path}")
    try:
        labels = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001
        raise QconvError(f"cannot read labels {path} (expected a .npy of integer class ids): {exc}") from None
    if labels.dtype.kind not in "iu":
        raise QconvError(f"labels {path} have dtype {labels.dtype}; expected integer class ids")
    return labels.reshape(-1)


@click.command("quantize")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Quantized model to write.")
@click.option("--calib", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Calibration file from qconv calibrate.")
@click.option("--data", type=click.Path(path_type=Path), default=None, help="Calibration data (calibrates in this run).")
@click.option("--force-calib", is_flag=True, help="Use --calib even if it was made for another model.")
@click.option("--format", "fmt", type=click.Choice(["qdq"]), default="qdq", show_default=True, help="Output form.")
@click.option("--per-tensor", is_flag=True, help="One scale per weight tensor instead of per output channel.")
@click.option("--exclude-nodes", multiple=True, metavar="GLOB", help="Keep nodes whose name matches GLOB in float (repeatable).")
@click.option("--exclude-ops", multiple=True, metavar="OP", help="Keep every node of this op type in float (repeatable).")
@click.option("--eval-data", type=click.Path(path_type=Path), default=None, help="Data for the report (default: the calibration data).")
@click.option("--eval-labels", type=click.Path(dir_okay=False, path_type=Path), default=None, help=".npy of class ids, one per eval row: adds top-1 accuracy.")
@click.option("--report", "reports", multiple=True, type=click.Path(dir_okay=False, path_type=Path), help="Write the report as JSON to PATH (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report on stdout.")
@click.option("--no-latency", is_flag=True, help="Skip the latency measurement.")
@data_options
@range_options
@output_options
@guarded
def quantize_cmd(term, model, out, calib, data, force_calib, fmt, per_tensor, exclude_nodes, exclude_ops, eval_data,
                 eval_labels, reports, as_json, no_latency, batch_size, samples, bins, momentum, method, percentile,
                 threads, quiet):
    """Quantize MODEL to static int8 in QDQ form and write it to OUTPUT.

    \b
    Examples:
      qconv quantize model.onnx -o model.int8.onnx --data calib.npy
      qconv quantize model.onnx -o model.int8.onnx --calib model.calib.json \\
          --eval-data val.npy --eval-labels val_labels.npy --report report.json
    """
    if (calib is None) == (data is None):
        raise UsageError("give exactly one of --calib FILE or --data DATA")
    if calib is not None and eval_data is None:
        raise UsageError("with --calib, give --eval-data so the report has data to measure on")
    if eval_labels is not None and eval_data is None:
        raise UsageError("--eval-labels needs --eval-data (labels must match the evaluated rows)")
    for r in reports:
        if r.suffix.lower() != ".json":
            raise UsageError(f"--report {r}: only .json reports are supported")
        io.check_output_path(r, model)
    io.check_output_path(out, model, calib, data, eval_data)
    settings = dict(format=fmt, per_channel=not per_tensor, exclude_nodes=tuple(exclude_nodes), exclude_ops=tuple(exclude_ops))
    QuantConfig(**settings, method=method or "minmax", percentile=99.999 if percentile is None else percentile)  # validate early
    labels = _labels(eval_labels)
    prepared = pipeline.load(model, QuantConfig(**settings))
    eval_source = pipeline.feeds_for(prepared, eval_data or data, batch_size)
    with term.progress() as progress:
        if calib is not None:
            calibration = pipeline.load_calibration(calib, prepared, force_calib)
        else:
            source = pipeline.feeds_for(prepared, data, batch_size, samples)
            calibration = pipeline.calibrate(prepared, source, threads, progress, method or "minmax", bins, momentum,
                                             QuantConfig(**settings))
        recorded = calibration.options
        config = QuantConfig(**settings, method=method or recorded.get("method", "minmax"),
                             percentile=percentile if percentile is not None else float(recorded.get("percentile", 99.999)))
        result = pipeline.quantize(prepared, calibration, config)
        evaluation = pipeline.evaluate(prepared, result, eval_source, labels, threads, progress, not no_latency)
    size_q = pipeline.save_quantized(result, out, prepared)
    report = build_report(prepared, result, calibration, str(out), io.model_size_bytes(model), size_q, evaluation,
                          str(eval_data or data))
    for r in reports:
        io.write_json(report, r)
    if as_json:
        term.print_json(report)
    else:
        render(term, report)


def _fmt(x, spec=".4f"):
    return format(x, spec) if isinstance(x, (int, float)) else str(x)


def render(term, report: dict) -> None:
    s = report["size_bytes"]
    rows = [["size", f"{s['original']:,} B", f"{s['quantized']:,} B", f"{s['ratio']:.2f}x smaller"]]
    if "task" in report:
        t = report["task"]
        rows.append(["top-1", f"{100 * t['original']:.2f}%", f"{100 * t['quantized']:.2f}%", f"{0.0 - t['drop_points']:+.2f} points"])
    if "latency_ms" in report:
        lat = report["latency_ms"]
        rows.append([f"latency (median, {lat['threads']} threads)", f"{lat['original']:.3f} ms", f"{lat['quantized']:.3f} ms",
                     f"{lat['ratio']:.2f}x time" if lat["ratio"] else "-"])
    term.print(table(f"qconv: {report['model']['input']} -> {report['model']['output']}", ["", "original", "quantized", "change"], rows))
    term.print(table("Output fidelity (quantized vs original)", ["output", "SQNR dB", "cosine", "max abs err", "mean abs err"],
                     [[k, _fmt(v["sqnr_db"], ".2f"), _fmt(v["cosine"], ".6f"), _fmt(v["max_abs_err"], ".4g"), _fmt(v["mean_abs_err"], ".4g")]
                      for k, v in report["outputs"].items()]))
    n = report["nodes"]
    term.print(f"nodes: {n['quantized']} quantized ({n['folded_activations']} Relu/Clip folded into their producer), "
               f"{n['float']} kept in float, {n['integer']} integer/shape ops left as they are")
    reasons = collections.Counter((k["op_type"], k["reason"]) for k in n["kept_float"])
    if reasons:
        term.print(table("Kept in float", ["op", "nodes", "why"], [[op, c, r] for (op, r), c in sorted(reasons.items())]))
    if "latency_ms" in report and report["latency_ms"]["ratio"] and report["latency_ms"]["ratio"] > 1.0:
        term.warn(f"the quantized model is slower than the original on this CPU ({report['latency_ms']['ratio']:.2f}x the time)")
