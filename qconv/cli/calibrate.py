"""qconv calibrate: run the model over data and write reusable statistics; merge shards."""

from __future__ import annotations

from pathlib import Path

import click

from qconv import clock
from qconv.cli.common import calib_options_from, data_options, guarded, output_options, range_options
from qconv.errors import UsageError
from qconv.io import check_output_path
from qconv.jobs.calibrate import (
    CalibrateJob,
    export_paths,
    export_tables,
    load_calibration_file,
    parse_export,
    run_calibrate,
    run_export,
    run_merge,
)


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
        formatter.write_text("TensorRT tables from a calibration file: qconv calibrate export C.json --format tensorrt -o TABLE")


@click.group("calibrate", cls=CalibrateGroup, invoke_without_command=False)
def calibrate_group():
    """Record statistics of MODEL on DATA; merge shards with `qconv calibrate merge`."""


@calibrate_group.command("run", hidden=True)
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--data", required=True, type=click.Path(path_type=Path), help="A .npy, .npz, or folder of them.")
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Calibration file to write (JSON).")
@click.option("--shard", default=None, metavar="K/N", help="Use every N-th feed starting at K (K from 0); merge the shards later.")
@click.option("--per-tensor", is_flag=True, help="Calibrate for per-tensor weights (only changes the opset needed).")
@click.option("--equalize/--no-equalize", default=None,
              help="--equalize: calibrate after cross-layer equalization (for quantize --equalize). --no-equalize: none.  "
                   "[default: the identity/Relu pairs, and the hard-swish/SiLU pairs worth it by a quick int8 check on the "
                   "first rows; recorded in the file]")
@click.option("--smooth/--no-smooth", default=None,
              help="--smooth: calibrate after SmoothQuant on every MatMul/Gemm input (for quantize --smooth). --no-smooth: none.  "
                   "[default: on a transformer stack (8 or more such nodes) where a quick int8 check on the first rows says the "
                   "outputs gain; recorded in the file]")
@click.option("--export", "export_spec", default=None, metavar="tensorrt:PATH",
              help="Also write TensorRT calibration tables (PATH, PATH.json, PATH.cache); observes every float tensor.")
@click.option("--ranges", type=click.Choice(["calibrated", "output"]), default="calibrated", show_default=True,
              help="output: also search each activation's range for the least error at the outputs of the layers reading it "
                   "(as quantize --data does by default), for the default scheme; quantize --calib then uses them.")
@click.option("--floor-ranges/--no-floor-ranges", default=None,
              help="Range floors (quantize --floor-ranges) for quantize --calib: on, or off without checking.  [default: checked "
                   "on rows spread over the data, the int8 model's outputs with and without them; the verdict is recorded]")
@click.option("--all-tensors", is_flag=True,
              help="Observe every float activation, not only those the default plan quantizes (for --exclude-* at quantize time).")
@data_options
@range_options
@output_options
@guarded
def run_cmd(term, model, data, out, shard, per_tensor, equalize, smooth, export_spec, ranges, floor_ranges, all_tensors, method, percentile, **kw):
    """Record per-tensor statistics (min/max, moving averages, histograms) of MODEL on DATA.

    The file stores statistics, not ranges: `qconv quantize --calib FILE --method M` picks any range
    method later without running the model again. Re-running with the same inputs does no work.

    \b
    Examples:
      qconv calibrate model.onnx --data calib.npz -o model.calib.json --samples 256
      qconv calibrate model.onnx --data calib/ --shard 0/4 -o part0.json   # then: qconv calibrate merge
    """
    export = parse_export(export_spec)
    if export is not None and smooth:
        raise UsageError("--export writes TensorRT tables of the model's own tensors; --smooth calibrates a rewritten one: give one of them")
    if export is not None:
        smooth = False  # the tables name the model's own tensors
    job = CalibrateJob(model=model, data=data, out=out, shard=parse_shard(shard), per_tensor=per_tensor,
                       all_tensors=all_tensors or export is not None, method=method, percentile=percentile,
                       options=calib_options_from(kw), equalize={None: "auto", True: "on", False: "off"}[equalize], ranges=ranges,
                       smooth={None: "auto", True: "on", False: "off"}[smooth],
                       floors={None: "auto", True: "on", False: "off"}[floor_ranges])
    job.check()
    if export is not None:
        for p in export_paths(export[1]):
            check_output_path(p, model, data, out)
    with term.progress() as progress:
        calib = run_calibrate(job, progress)
    fresh = calib is not None
    for note in job.notes:
        term.info(note)
    if not fresh:
        term.info(f"{out} is up to date (same model, data and options): nothing to do")
    else:
        _warn_tensors(term, calib)
        term.info(f"wrote {out}: {len(calib.tensors)} tensors from {calib.samples} feeds{cost_text(job.cost)}")
        if calib.output_ranges:
            s = calib.output_ranges["search"]
            term.info(f"output-aware ranges on {s['rows']} rows: {s['moved']} of {s['tensors']} activations narrowed, their readers' "
                      f"output error x{s['median_error_ratio']:.2f} (median)")
    if export is not None:
        written = export_tables(calib if fresh else load_calibration_file(out), export[0], export[1])
        term.info(f"wrote TensorRT tables {', '.join(str(p) for p in written)}")


def cost_text(cost: dict | None) -> str:
    """" in 9.1 s (SmoothQuant 4.3 s, statistics 4.1 s, range floors check 0.9 s)": the run's time and its longest phases."""
    if not cost:
        return ""
    longest = ", ".join(f"{p['phase']} {p['seconds']:.2g} s" for p in clock.longest(cost) if p["seconds"] >= 0.05)
    return f" in {cost['seconds']:.3g} s" + (f" ({longest})" if longest else "")


def _warn_tensors(term, calib) -> None:
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
    merged = run_merge(list(parts), out)
    _warn_tensors(term, merged)
    term.info(f"wrote {out}: {len(merged.tensors)} tensors from {merged.samples} feeds in {len(parts)} shards")


@calibrate_group.command("export")
@click.argument("calib", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["tensorrt"]), default="tensorrt", show_default=True,
              help="tensorrt: onnxruntime-TensorRT's flatbuffers table (OUT), its JSON form (OUT.json) and TensorRT's own cache (OUT.cache).")
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Table to write.")
@range_options
@click.option("--quiet", "-q", is_flag=True, help="Print nothing but errors.")
@guarded
def export_cmd(term, calib, fmt, out, method, percentile, quiet):
    """Write the per-tensor dynamic ranges of CALIB as calibration tables another runtime reads.

    Point onnxruntime's TensorRT provider at OUT (trt_int8_calibration_table_name); TensorRT's
    IInt8Calibrator reads OUT.cache. Ranges are symmetric (+-max|x| of the chosen method's range).

    \b
    Example:
      qconv calibrate model.onnx --data calib/ -o model.calib.json --all-tensors
      qconv calibrate export model.calib.json --format tensorrt -o model.trt.flatbuffers --method entropy
    """
    written = run_export(calib, fmt, out, method, percentile)
    term.info(f"wrote {', '.join(str(p) for p in written)}")
