"""qconv calibrate: run the model over data and write reusable statistics."""

from __future__ import annotations

from pathlib import Path

import click

from qconv import io, pipeline
from qconv.calib.store import Calibration
from qconv.cli.common import data_options, guarded, output_options
from qconv.config import QuantConfig
from qconv.errors import QconvError


@click.command("calibrate")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--data", required=True, type=click.Path(path_type=Path), help="A .npy, .npz, or folder of them.")
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Calibration file to write (JSON).")
@click.option("--per-tensor", is_flag=True, help="Calibrate for per-tensor weights (only changes the opset needed).")
@data_options
@output_options
@guarded
def calibrate_cmd(term, model, data, out, per_tensor, batch_size, samples, method, threads, quiet):
    """Record per-tensor statistics of MODEL on DATA into a calibration file.

    \b
    Example:
      qconv calibrate model.onnx --data calib.npz -o model.calib.json --samples 256
    """
    io.check_output_path(out, model, data)
    config = QuantConfig(per_channel=not per_tensor, method=method)
    prepared = pipeline.load(model, config)
    source = pipeline.feeds_for(prepared, data, batch_size, samples)
    data_id = source.identity()
    if out.exists():
        try:
            old = Calibration.from_dict(io.read_json(out, "calibration file"))
        except QconvError:
            old = None
        if old and old.model_id == prepared.model_id and old.data_id == data_id and old.options.get("method") == method:
            term.info(f"{out} is up to date (same model, data and options): nothing to do")
            return
    with term.progress() as progress:
        calib = pipeline.calibrate(prepared, source, threads, progress, method)
    io.write_json(calib.to_dict(), out)
    bad = [k for k, o in calib.tensors.items() if o.nonfinite]
    if bad:
        term.warn(f"{len(bad)} tensors produced inf/NaN and will stay in float: {', '.join(sorted(bad)[:5])}{' ...' if len(bad) > 5 else ''}")
    term.info(f"wrote {out}: {len(calib.tensors)} tensors from {calib.samples} feeds")
