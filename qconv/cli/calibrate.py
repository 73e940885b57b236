"""qconv calibrate: run the model over data and write reusable statistics; merge shards."""

from __future__ import annotations

from pathlib import Path

import click

from qconv import io, pipeline
from qconv.calib.store import Calibration, merge
from qconv.cli.common import data_options, guarded, output_options, range_options
from qconv.config import QuantConfig
from qconv.errors import QconvError, UsageError


def parse_shard(spec: str | None) -> tuple[int, int]:
    if spec is None:
        return 0, 1
    try:
        k, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise UsageError(f"--shard '{spec}' is not K/N (e.g. 0/4 for the first of four shards)") from None
    if n < 1 or not 0 <= k < n:
        raise UsageError(f"--shard {spec}: K/N needs N >= 1 and 0 <= K < N (shards are numbered from 0)")
    return k, n


class CalibrateGroup(click.Group):
    """``qconv calibrate MODEL ...`` runs calibration; ``qconv calibrate merge ...`` merges shards."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["run", *args]
        return super().parse_args(ctx, args)

    def format_help(self, ctx, formatter):
        run_ctx = click.Context(run_cmd, info_name=ctx.info_name, parent=ctx.parent)
        run_cmd.format_help(run_ctx, formatter)
        formatter.write_paragraph()
        formatter.write_text("Merge shards: qconv calibrate merge A.json B.json ... -o ALL.json")


@click.group("calibrate", cls=CalibrateGroup, invoke_without_command=False)
def calibrate_group():
    """Record statistics of MODEL on DATA; merge shards with `qconv calibrate merge`."""


@calibrate_group.command("run", hidden=True)
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--data", required=True, type=click.Path(path_type=Path), help="A .npy, .npz, or folder of them.")
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Calibration file to write (JSON).")
@click.option("--shard", default=None, metavar="K/N", help="Use every N-th feed starting at K (K from 0); merge the shards later.")
@click.option("--per-tensor", is_flag=True, help="Calibrate for per-tensor weights (only changes the opset needed).")
@click.option("--all-tensors", is_flag=True,
              help="Observe every float activation, not only those the default plan quantizes (for --exclude-* at quantize time).")
@data_options
@range_options
@output_options
@guarded
def run_cmd(term, model, data, out, shard, per_tensor, all_tensors, batch_size, samples, bins, momentum, method, percentile,
            threads, quiet):
    """Record per-tensor statistics (min/max, moving averages, histograms) of MODEL on DATA.

    The file stores statistics, not ranges: `qconv quantize --calib FILE --method M` picks any range
    method later without running the model again. Re-running with the same inputs does no work.

    \b
    Examples:
      qconv calibrate model.onnx --data calib.npz -o model.calib.json --samples 256
      qconv calibrate model.onnx --data calib/ --shard 0/4 -o part0.json   # then: qconv calibrate merge
    """
    shard_kn = parse_shard(shard)
    method = method or "minmax"
    QuantConfig(method=method, percentile=99.999 if percentile is None else percentile)  # validates
    io.check_output_path(out, model, data)
    config = QuantConfig(per_channel=not per_tensor)
    prepared = pipeline.load(model, config)
    source = pipeline.feeds_for(prepared, data, batch_size, samples, shard_kn)
    options = pipeline.calibration_options(source, method, bins, momentum)
    options["tensors"] = "all" if all_tensors else "planned"
    if percentile is not None:
        options["percentile"] = percentile
    data_id = source.identity()
    if out.exists():
        try:
            old = Calibration.from_dict(io.read_json(out, "calibration file"))
        except QconvError:
            old = None
        if old and old.model_id == prepared.model_id and old.data_id == data_id and old.options == options:
            term.info(f"{out} is up to date (same model, data and options): nothing to do")
            return
    with term.progress() as progress:
        calib = pipeline.calibrate(prepared, source, threads, progress, method, bins, momentum, None if all_tensors else config)
    calib.options = options
    io.write_json(calib.to_dict(), out)
    _warn_tensors(term, calib)
    term.info(f"wrote {out}: {len(calib.tensors)} tensors from {calib.samples} feeds")


def _warn_tensors(term, calib: Calibration) -> None:
    bad = sorted(calib.nonfinite())
    if bad:
        term.warn(f"{len(bad)} tensors held inf/NaN (kept in float when quantizing): {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}")
    const = calib.constant()
    if const:
        term.info(f"{len(const)} tensors were constant over the data (zero range): {', '.join(const[:5])}{' ...' if len(const) > 5 else ''}")


@calibrate_group.command("merge")
@click.argument("parts", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Merged calibration file.")
@click.option("--quiet", "-q", is_flag=True, help="Print nothing but errors.")
@guarded
def merge_cmd(term, parts, out, quiet):
    """Merge calibration files of shards of one data set (same model and options) into one.

    Min/max merge exactly; histograms merge exactly onto the coarser grid.

    \b
    Example:
      qconv calibrate merge part0.json part1.json part2.json part3.json -o all.json
    """
    if len(parts) < 2:
        raise UsageError("give at least two calibration files to merge")
    io.check_output_path(out, *parts)
    loaded = [(str(p), Calibration.from_dict(io.read_json(p, "calibration file"), f"calibration file {p}")) for p in parts]
    merged = merge(loaded)
    io.write_json(merged.to_dict(), out)
    _warn_tensors(term, merged)
    term.info(f"wrote {out}: {len(merged.tensors)} tensors from {merged.samples} feeds in {len(parts)} shards")
