"""qconv quantize: calibrate (or reuse a calibration file), rewrite to QDQ, evaluate, report."""

from __future__ import annotations

import collections
from pathlib import Path

import click

from qconv.cli.common import report_options, data_options, finish, gate_options, gates_from, guarded, output_options, range_options
from qconv.cli.console import table
from qconv.config import FORMATS, MODES
from qconv.run import QuantizeJob, run_quantize


@click.command("quantize")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Quantized model to write.")
@click.option("--calib", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Calibration file from qconv calibrate.")
@click.option("--data", type=click.Path(path_type=Path), default=None, help="Calibration data (calibrates in this run).")
@click.option("--force-calib", is_flag=True, help="Use --calib even if it was made for another model.")
@click.option("--mode", type=click.Choice(MODES), default="int8", show_default=True,
              help="int8 (static), dynamic (int8 weights, run-time activations), fp16, a16w8 (int16 activations, int8 weights), int4 (weight-only).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default=None,
              help="qdq (QuantizeLinear/DequantizeLinear pairs) or qoperator (QLinearConv, QLinearMatMul, ...)  [default: qdq]")
@click.option("--per-tensor", is_flag=True, help="One scale per weight tensor instead of per output channel.")
@click.option("--weight-type", type=click.Choice(["int8", "uint8"]), default="int8", show_default=True, help="Integer type of weights.")
@click.option("--affine-weights", is_flag=True, help="Weights with a zero point (default: symmetric, zero point 0).")
@click.option("--activation-type", type=click.Choice(["uint8", "int8", "uint16", "int16"]), default=None,
              help="Integer type of activations  [default: uint8; uint16 for a16w8]")
@click.option("--symmetric-activations", is_flag=True, help="Zero point fixed at the middle of the activation range.")
@click.option("--reduce-range", is_flag=True, help="7-bit weights, for CPUs without VNNI (avoids int16 overflow in their int8 kernels).")
@click.option("--block-size", type=int, default=32, show_default=True, help="int4: weights per block along K (16, 32, 64, 128 or 256).")
@click.option("--int4-method", type=click.Choice(["rtn", "gptq"]), default="gptq", show_default=True,
              help="int4 with --data: GPTQ (data-aware); without data, round-to-nearest is used.")
@click.option("--keep-io-types/--no-keep-io-types", default=True, show_default=True, help="fp16: keep model inputs and outputs float32.")
@click.option("--exclude-nodes", multiple=True, metavar="GLOB", help="Keep nodes whose name matches GLOB in float (repeatable).")
@click.option("--exclude-ops", multiple=True, metavar="OP", help="Keep every node of this op type in float (repeatable).")
@click.option("--eval-data", type=click.Path(path_type=Path), default=None, help="Data for the report (default: the calibration data).")
@click.option("--eval-labels", type=click.Path(dir_okay=False, path_type=Path), default=None, help=".npy of class ids, one per eval row: adds top-1 accuracy.")
@report_options
@gate_options
@data_options
@range_options
@output_options
@guarded
def quantize_cmd(term, model, out, calib, data, force_calib, mode, fmt, per_tensor, weight_type, affine_weights, activation_type,
                 symmetric_activations, reduce_range, block_size, int4_method, keep_io_types, exclude_nodes, exclude_ops,
                 eval_data, eval_labels, reports, as_json, no_latency, batch_size, samples, bins, momentum, method,
                 percentile, threads, quiet, **gate_kwargs):
    """Quantize MODEL and write it to OUTPUT, with a report of what it cost.

    \b
    Examples:
      qconv quantize model.onnx -o model.int8.onnx --data calib.npy
      qconv quantize model.onnx -o model.int8.onnx --calib model.calib.json \\
          --eval-data val.npy --eval-labels val_labels.npy --report report.json
      qconv quantize bert.onnx -o bert.dyn.onnx --mode dynamic --eval-data val.npz
      qconv quantize model.onnx -o model.fp16.onnx --mode fp16 --eval-data val.npy
      qconv quantize llm.onnx -o llm.int4.onnx --mode int4 --block-size 32 --data calib.npz
    """
    settings = dict(mode=mode, format=fmt, per_channel=not per_tensor, weight_type=weight_type,
                    symmetric_weights=not affine_weights, activation_type=activation_type,
                    symmetric_activations=symmetric_activations, reduce_range=reduce_range, block_size=block_size,
                    int4_method=int4_method, keep_io_types=keep_io_types, exclude_nodes=tuple(exclude_nodes),
                    exclude_ops=tuple(exclude_ops))
    job = QuantizeJob(model, out, settings, calib, data, force_calib, eval_data, eval_labels, batch_size, samples, bins,
                      momentum, method, percentile, threads, not no_latency, gates_from(gate_kwargs), tuple(reports))
    job.check()
    with term.progress() as progress:
        report, _ = run_quantize(job, progress)
    finish(term, report, as_json, render)


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
    term.print(table(f"qconv {report['mode']}: {report['model']['input']} -> {report['model']['output']}",
                     ["", "original", "quantized", "change"], rows))
    if report["outputs"]:
        term.print(table("Output fidelity (quantized vs original)", ["output", "SQNR dB", "cosine", "max abs err", "mean abs err"],
                         [[k, _fmt(v["sqnr_db"], ".2f"), _fmt(v["cosine"], ".6f"), _fmt(v["max_abs_err"], ".4g"), _fmt(v["mean_abs_err"], ".4g")]
                          for k, v in report["outputs"].items()]))
    worst = [r for r in report.get("layers", []) if r["sqnr_db"] is not None][:5]
    if worst:
        term.print(table("Worst layers (per-tensor SQNR vs float)", ["tensor", "op", "SQNR dB", "cosine"],
                         [[r["tensor"], r["op_type"], _fmt(r["sqnr_db"], ".2f"), _fmt(r["cosine"], ".6f")] for r in worst]))
    n = report["node_summary"]
    term.print(f"nodes: {n['quantized']} quantized ({n['folded_activations']} Relu/Clip folded into their producer), "
               f"{n['float']} kept in float, {n['integer']} integer/shape ops left as they are")
    reasons = collections.Counter((k["op_type"], k["reason"]) for k in n["kept_float"])
    if reasons:
        term.print(table("Kept in float", ["op", "nodes", "why"], [[op, c, r] for (op, r), c in sorted(reasons.items())]))
    for w in report.get("warnings", []):
        term.warn(w)
