"""The jobs around calibration files and models that need no plan: calibrate, merge, export, inspect."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from qconv import clock, distributed, io, pipeline, runtime
from qconv.adjust import clip
from qconv.calib.collect import activation_tensors
from qconv.calib.ranges import DEFAULT_METHOD
from qconv.errors import QconvError, UsageError
from qconv.graph import ai_onnx_opset
from qconv.jobs.plan import CalibOptions, floors_scheme, rewritten, sharded_calibration
from qconv.plan.config import QuantConfig
from qconv.plan.planner import calibration_targets
from qconv.rewrite.quantized_io import io_params_of


@dataclass(kw_only=True)
class CalibrateJob:
    """``qconv calibrate``: statistics of the tensors the default plan needs (or all, ``all_tensors``)."""

    model: Path
    data: Path
    out: Path
    shard: tuple[int, int] = (0, 1)
    per_tensor: bool = False
    all_tensors: bool = False
    method: str | None = None  # None: recorded as null, so quantize uses the default (calib.ranges.DEFAULT_METHOD)
    percentile: float | None = None
    options: CalibOptions = field(default_factory=CalibOptions)
    equalize: str = "auto"  # on: calibrate after cross-layer equalization (for quantize --equalize); auto: checked; off
    smooth: str = "auto"  # SmoothQuant before calibration (pipeline.smooth_checked): auto (checked, on transformer stacks), on, off
    notes: list[str] = field(default_factory=list)  # what run_calibrate decided on the way (equalization), for the user
    ranges: str = "calibrated"  # output: also search output-aware ranges for the default plan (qconv.adjust.clip)
    floors: str = "auto"  # range floors: auto (checked on the calibration rows, recorded for quantize --calib), on, off
    cost: dict | None = None  # what the run took (qconv.clock), set by run_calibrate: the file itself holds no timing

    def check(self) -> None:
        QuantConfig(method=self.method or DEFAULT_METHOD, percentile=99.999 if self.percentile is None else self.percentile)  # validates
        self.options.check()
        if self.shard != (0, 1) and (distributed.parse_executor(self.options.executor).distributed or self.options.shards):
            raise UsageError("--shard K/N runs one shard by hand; --executor/--shards runs them all: give one of them")
        io.check_output_path(self.out, self.model, self.data)
        if self.ranges == "output" and self.shard != (0, 1):
            raise UsageError("--ranges output searches the ranges on the whole data, which a --shard K/N run does not see: calibrate "
                             "without --shard (--executor/--shards spread the statistics and search once on the driver)")
        if self.ranges == "output" and self.all_tensors:
            raise UsageError("--ranges output searches the default plan's ranges: drop --all-tensors (or --export)")


def run_calibrate(job: CalibrateJob, progress=pipeline.no_progress):
    """The calibration written to ``job.out``, or None when the file there is already up to date; ``job.cost`` says
    what the run took, phase by phase (qconv.clock)."""
    with clock.recording():
        try:
            return _run_calibrate(job, progress)
        finally:
            job.cost = clock.summary()


def _run_calibrate(job: CalibrateJob, progress):
    from qconv.calib.store import Calibration

    job.check()
    distributed.start_early(job.options.executor)
    config = QuantConfig(per_channel=not job.per_tensor, equalize=job.equalize, smooth=job.smooth)
    prepared = pipeline.load(job.model, config)
    o = job.options
    sharded = distributed.parse_executor(o.executor).distributed or o.shards
    source = pipeline.feeds_for(prepared, job.data, o.batch_size, o.samples, job.shard, o.cast_data)
    first = pipeline.feeds_for(prepared, job.data, o.batch_size, o.samples, cast=o.cast_data)  # every shard decides alike
    samples = o.samples_for(job.method, first.count())
    made, scales, smoothing = rewritten(prepared, first, job.equalize, dataclasses.replace(config, method=job.method or DEFAULT_METHOD),
                                        o.threads)
    job.notes[:] = [n for n in prepared.notes if n.startswith(("cross-layer equalization", "SmoothQuant"))]
    options = pipeline.calibration_record(source, job.method, o.bins, o.momentum, tensors="all" if job.all_tensors else "planned",
                                          shards=(o.shards or distributed.DEFAULT_SHARDS) if sharded else None,
                                          equalize=made, percentile=job.percentile, hist_samples=samples, ranges=job.ranges,
                                          smooth=bool(smoothing)).to_dict()
    if job.floors != "auto":
        options["floor_ranges"] = job.floors
    data_id = source.identity()
    if job.out.exists():
        try:
            old = Calibration.from_dict(io.read_json(job.out, "calibration file"))
        except QconvError:
            old = None
        if old and old.model_id == prepared.model_id and old.data_id == data_id and old.options == options \
                and old.equalization == scales and old.smoothing == smoothing:
            return None
    if sharded:
        names = activation_tensors(prepared.model)
        if not job.all_tensors:
            names = calibration_targets(prepared.model, config, names)
        calib = sharded_calibration(prepared, job.data, source, names, config.per_channel, job.method, o, progress,
                                    made, samples, scales, smoothing)
    else:
        calib = pipeline.calibrate(prepared, source, o.threads, progress, job.method, o.bins, o.momentum,
                                   None if job.all_tensors else config, None, o.max_memory, hist_samples=samples)
    calib.options = options
    calib.equalization = scales
    calib.smoothing = smoothing
    config = dataclasses.replace(config, method=job.method or DEFAULT_METHOD, percentile=99.999 if job.percentile is None else job.percentile,
                                 floor_ranges=job.floors == "on")
    if job.floors == "auto" and job.shard == (0, 1):
        calib.floors = file_floors(prepared, calib, job.data, first, config, o, progress)
        config = dataclasses.replace(config, floor_ranges=bool(calib.floors.get("kept")))
        if calib.floors:
            job.notes.append(pipeline.floors_note(calib.floors))
    if job.ranges == "output":
        calib.output_ranges = file_ranges(prepared, calib, first, config, o, progress)
    io.write_json(calib.to_dict(), job.out)
    return calib


def file_floors(prepared: pipeline.Prepared, calib, data: Path, source, config: QuantConfig, o: CalibOptions, progress) -> dict:
    """The default's check of range floors (pipeline.floors_checked) for the calibration file: the all-int8 plan of
    ``config`` (which regions the kernel table keeps float is decided at quantize time) with and without floors, run on
    rows spread over ``data``, one row a run where the model takes that (``source``'s feeds where it does not): three
    sessions in turn at the calibration's batch size held 75 MB more than calibration itself (rec, batches of 8: 351
    against 277 MB peak); {} when no activation has a floor."""
    plain = pipeline.plan(prepared, calib, dataclasses.replace(config, kernels="none", floor_ranges=False))
    try:
        rows = pipeline.rows_spread(pipeline.feeds_for(prepared, data, 1, o.samples, cast=o.cast_data), 0, pipeline.FLOORS_CHECK_ROWS)
    except QconvError:  # a fixed batch dimension: the feeds as calibration read them
        rows = pipeline.rows_spread(source, 0, pipeline.FLOORS_CHECK_ROWS)
    advance = progress("checking range floors", None)
    _, found = pipeline.floors_checked(prepared, plain, calib, rows, o.threads)
    advance(1)
    return {**found, "scheme": floors_scheme(config)} if found else {}


def file_ranges(prepared: pipeline.Prepared, calib, source, config: QuantConfig, o: CalibOptions, progress) -> dict:
    """``calibrate --ranges output``: the output-aware ranges of the default plan (every region int8: which ones the
    kernel table keeps float is decided at quantize time, and a tensor whose readers stay float is not quantized),
    searched on the first rows of ``source``, for the calibration file."""
    config = dataclasses.replace(config, kernels="none")
    chosen, summary = pipeline.search_ranges(prepared.model, pipeline.plan(prepared, calib, config), source, o.threads, progress,
                                             o.max_memory)
    return {"ranges": {k: [float(v[0]), float(v[1])] for k, v in sorted(chosen.items())}, "search": summary, "scheme": clip.scheme(config)}


EXPORT_FORMATS = ("tensorrt",)


def parse_export(spec: str | None) -> tuple[str, Path] | None:
    """``tensorrt:PATH`` -> ("tensorrt", PATH)."""
    if spec is None:
        return None
    fmt, _, path = spec.partition(":")
    if fmt not in EXPORT_FORMATS or not path:
        raise UsageError(f"--export '{spec}' is not FORMAT:PATH with FORMAT one of {', '.join(EXPORT_FORMATS)} (e.g. tensorrt:model.calib.flatbuffers)")
    return fmt, Path(path)


def export_paths(path: Path) -> list[Path]:
    """The files a TensorRT export writes: the flatbuffers table, its JSON form, TensorRT's own cache."""
    return [path, path.with_name(path.name + ".json"), path.with_name(path.name + ".cache")]


def export_tables(calib, fmt: str, path: Path, method: str | None = None, percentile: float | None = None) -> list[Path]:
    """Write the calibration's ranges (by ``method``, default the recorded one) as tables another runtime reads."""
    from qconv.calib import export

    method = method or calib.options.get("method") or DEFAULT_METHOD
    pct = percentile if percentile is not None else float(calib.options.get("percentile", 99.999))
    ranges = calib.ranges(method, True, pct)  # symmetric: TensorRT's int8 ranges are +-amax
    table, as_json, cache = export_paths(path)
    io.write_bytes(export.trt_table_flatbuffers(ranges), table)
    io.write_text(export.trt_table_json(ranges), as_json)
    io.write_text(export.trt_native_cache(ranges), cache)
    return [table, as_json, cache]


def load_calibration_file(path: Path):
    from qconv.calib.store import Calibration

    return Calibration.from_dict(io.read_json(path, "calibration file"), f"calibration file {path}")


def run_export(calib_path: Path, fmt: str, out: Path, method: str | None, percentile: float | None) -> list[Path]:
    """``qconv calibrate export``: tables from an existing calibration file."""

    if fmt not in EXPORT_FORMATS:
        raise UsageError(f"--format {fmt}: choose one of {', '.join(EXPORT_FORMATS)}")
    for p in export_paths(out):
        io.check_output_path(p, calib_path)
    calib = load_calibration_file(calib_path)
    return export_tables(calib, fmt, out, method, percentile)


def run_merge(parts: list[Path], out: Path):
    """``qconv calibrate merge``: one calibration file from shards."""
    from qconv.calib.store import Calibration, merge

    if len(parts) < 2:
        raise UsageError("give at least two calibration files to merge")
    io.check_output_path(out, *parts)
    loaded = [(str(p), Calibration.from_dict(io.read_json(p, "calibration file"), f"calibration file {p}")) for p in parts]
    merged = merge(loaded)
    io.write_json(merged.to_dict(), out)
    return merged


def run_inspect(model_path: Path, calib_path: Path | None, per_tensor: bool) -> dict:
    """``qconv inspect``: what a model holds and what the default plan would do with it."""
    import collections

    from qconv.calib.collect import activation_tensors
    from qconv.plan.planner import build_plan, weight_only_tables

    config = QuantConfig(per_channel=not per_tensor)
    prepared = pipeline.load(model_path, config)
    sess = runtime.session(prepared.model, threads=1, optimize=False)
    if calib_path:
        calib = pipeline.load_calibration(calib_path, prepared)
        ranges, nonfinite, masks = calib.ranges(), calib.nonfinite(), calib.mask_like()
    else:  # structure only: every activation assumed to have a usable range
        ranges, nonfinite, masks = {n: (0.0, 1.0) for n in activation_tensors(prepared.model)}, {}, {}
    plan = build_plan(prepared.model, ranges, config, nonfinite, masks)
    weight_only_tables(prepared.model, plan)
    return {
        "model": str(model_path),
        "ir_version": prepared.original.ir_version,
        "opset": ai_onnx_opset(prepared.original),
        "producer": f"{prepared.original.producer_name} {prepared.original.producer_version}".strip(),
        "inputs": [{"name": i.name, "type": i.type, "shape": list(i.shape)} for i in sess.get_inputs()],
        "outputs": [{"name": o.name, "type": o.type, "shape": list(o.shape)} for o in sess.get_outputs()],
        "ops": dict(sorted(collections.Counter(n.op_type for n in prepared.original.graph.node).items())),
        "intake": prepared.notes,
        "would_quantize": plan.by_op(),
        "kept_float": [{"name": n.name, "op_type": n.op_type, "reason": n.reason, "code": n.code} for n in plan.nodes if n.kept_float],
        "kept_float_groups": plan.kept_float_groups(),
        "quantized_already": prepared.quantized_already,
        "quantized_io": io_params_of(prepared.original),
        "ranges_checked": bool(calib_path),
        "size_bytes": io.model_size_bytes(model_path),
    }


SCHEMAS = ("report", "plan", "calibration")


def schema(name: str) -> dict:
    """The JSON Schema (draft 2020-12) shipped in the package for one of qconv's files: report, plan, calibration."""
    import json
    from importlib import resources

    if name not in SCHEMAS:
        raise UsageError(f"no schema named '{name}': one of {', '.join(SCHEMAS)}")
    return json.loads(resources.files("qconv").joinpath("schemas", f"{name}.schema.json").read_text(encoding="utf-8"))
