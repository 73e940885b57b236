"""qconv report: compare any two models (qconv's or another tool's) on the same data."""

from __future__ import annotations

from pathlib import Path

import click

from qconv.cli.common import eval_options_from, finish, gate_options, gates_from, guarded, output_options, report_options
from qconv.cli.quantize import render
from qconv.jobs import CompareJob, run_compare


@click.command("report")
@click.argument("original", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("quantized", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--data", required=True, type=click.Path(path_type=Path), help="Data to run both models on (.npy, .npz or a folder).")
@click.option("--eval-labels", type=click.Path(dir_okay=False, path_type=Path), default=None, help=".npy of class ids, one per row: adds top-1 accuracy.")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True, help="Rows per feed when an array is split into batches.")
@click.option("--cast-data", is_flag=True, help="Use integer data for float inputs as it is (by default refused).")
@click.option("--shards", type=click.IntRange(min=1), default=None, help="Evaluation shards run as tasks (default 16 with --executor).")
@click.option("--executor", default=None, metavar="local|local:N|dask://HOST:PORT",
              help="Compare the outputs as shard tasks on Dask (pip install 'qconv[dask]').")
@report_options
@gate_options
@output_options
@guarded
def report_cmd(term, original, quantized, data, batch_size, cast_data, reports, as_json, **kw):
    """Compare ORIGINAL and QUANTIZED on DATA: output fidelity, accuracy, latency and per-layer SQNR.

    Works on models from any tool that keeps tensor names (onnxruntime's quantizer does).

    \b
    Examples:
      qconv report model.onnx model.int8.onnx --data val.npy --eval-labels val_labels.npy --report r.html
      qconv report model.onnx ort.int8.onnx --data val.npz --min-cosine 0.99 --report r.md   # exit 3 if it fails
    """
    job = CompareJob(original=original, quantized=quantized, data=data, evaluation=eval_options_from(kw, data), batch_size=batch_size,
                     gates=gates_from(kw), reports=tuple(reports), cast_data=cast_data)
    job.check()
    with term.progress() as progress:
        report = run_compare(job, progress)
    finish(term, report, as_json, render)
