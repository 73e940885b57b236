"""``qconv plan``, and what every job that plans shares: the options of calibration, where statistics come from
(a calibration file, calibration in this run, or shard tasks), overrides and stored plans."""

from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from qconv import clock, distributed, io, pipeline, runtime
from qconv.adjust import clip
from qconv.calib import ingraph
from qconv.calib.collect import activation_tensors
from qconv.calib.ingraph import DEFAULT_SAMPLES
from qconv.calib.observers import DEFAULT_BINS, DEFAULT_MOMENTUM
from qconv.calib.ranges import DEFAULT_METHOD
from qconv.data import FeedSource
from qconv.errors import QconvError, UsageError
from qconv.plan import QuantPlan
from qconv.plan.config import QuantConfig
from qconv.plan.overrides import Overrides
from qconv.plan.planner import calibration_targets


@dataclass(frozen=True, kw_only=True)
class CalibOptions:
    """How feeds are read and what calibration records."""

    batch_size: int = 1
    samples: int | None = None
    bins: int = DEFAULT_BINS
    momentum: float = DEFAULT_MOMENTUM
    threads: int | None = None
    cast_data: bool = False  # integer data for float inputs is used as it is (else refused)
    max_memory: int = 1 << 30  # bytes of exposed activations one calibration pass may hold
    executor: str | None = None  # local | local:N | dask://HOST:PORT (shards as tasks on Dask)
    shards: int | None = None  # with a distributed executor: how many shards (default 16, whatever the workers)
    hist_samples: int | None = None  # histogram values per tensor and batch (None: by the range method and the run's length; 0: every value)

    def samples_for(self, method: str | None, batches: int = 1) -> int:
        """Histogram values per tensor and batch for a run of ``batches`` feeds (the whole data set's: qconv.calib.ingraph)."""
        return ingraph.samples_for(self.hist_samples, method, batches)

    def check(self) -> None:
        ex = distributed.parse_executor(self.executor)
        if self.shards is not None and self.shards < 1:
            raise UsageError("--shards must be at least 1")
        if self.hist_samples is not None and self.hist_samples < 0:
            raise UsageError("--hist-samples must be 0 (every value) or more")
        if (ex.distributed or self.shards) and self.samples is not None:
            raise UsageError("--samples cannot be combined with --executor/--shards (each shard reads its own feeds): "
                             "give the rows to calibrate on as the data")


@dataclass(kw_only=True)
class PlanJob:
    """Inputs of a plan: the model, where statistics come from, the scheme, and overrides."""

    model: Path
    config: QuantConfig = field(default_factory=QuantConfig)
    method: str | None = None  # None: the calibration file's method
    percentile: float | None = None
    calib: Path | None = None
    data: Path | None = None
    force_calib: bool = False
    overrides: Path | None = None  # a JSON file with an "overrides" object (or a plan whose overrides to reuse)
    calib_options: CalibOptions = field(default_factory=CalibOptions)
    holdout: tuple[int, int] | None = None  # (K, N): calibrate on --data without its feeds K mod N (tuning measures on them)

    def check(self, plan_file: bool = False) -> None:
        """With a plan file the mode is the plan's: --calib then only serves method overrides, --data evaluation."""
        self.calib_options.check()
        config = self.config
        if plan_file:
            return
        if config.needs_calibration:
            if (self.calib is None) == (self.data is None):
                raise UsageError(f"--mode {config.mode} needs calibration: give exactly one of --calib FILE or --data DATA")
            if config.bias_correction in ("full", "fast") and self.data is None:
                raise UsageError("--bias-correction measures each layer's mean error on the calibration rows: give --data DATA "
                                 "in place of --calib (a calibration file holds ranges, not rows)")
            if config.rounding != "nearest" and self.data is None:
                raise UsageError(f"--rounding {config.rounding} rounds each weight for its layer's inputs on the calibration rows: give "
                                 "--data DATA in place of --calib (a calibration file holds ranges, not rows)")
        elif self.calib is not None:
            raise UsageError(f"--mode {config.mode} takes no calibration file: drop --calib (--data, if given, is used for evaluation"
                             f"{' and GPTQ' if config.mode == 'int4' else ''})")

    def effective(self, recorded: dict | None, floors: dict | None = None) -> QuantConfig:
        """The config with the range method and percentile: from the options, else as calibration recorded them.
        ``floors``: the range-floor check a calibration file recorded (``Calibration.floors``)."""
        recorded = recorded or {}
        method = self.method or recorded.get("method") or DEFAULT_METHOD
        pct = self.percentile if self.percentile is not None else float(recorded.get("percentile", 99.999))
        equalize = self.config.equalize
        if equalize == "auto" and recorded:  # as the calibration decided: the plan replays it
            equalize = "on" if recorded.get("equalize") else "off"
        smooth = self.config.smooth
        if smooth == "auto" and recorded:
            smooth = "on" if recorded.get("smooth") else "off"
        config = dataclasses.replace(self.config, method=method, percentile=pct, bias_correction=self.bias_correction(), equalize=equalize,
                                     smooth=smooth, ranges=self.ranges(recorded))
        return dataclasses.replace(config, floor_ranges=self.floor_ranges(config, floors))

    def floor_ranges(self, config: QuantConfig, floors: dict | None) -> bool:
        """Range floors as asked, or by default (auto) as the calibration file's check found for this scheme; a run with
        --data checks them itself (``adjusted``), so they start off."""
        asked = self.config.floor_ranges
        if asked != "auto":
            return asked
        if self.data is None and floors and floors["scheme"] == floors_scheme(config):
            return bool(floors["kept"])
        return False

    def bias_correction(self) -> str | None:
        """The bias correction this plan gets: as asked, or by default full when the run has calibration rows (not with
        --calib, which has none). Tuning measures its candidates without it and corrects the plan it chose."""
        asked = self.config.bias_correction
        if asked != "auto":
            return asked
        return "full" if self.data is not None and self.config.needs_calibration else None


    def ranges(self, recorded: dict | None = None) -> str:
        """The activation ranges this plan gets: as asked, or by default output-aware when the run has calibration
        rows (searched, and checked) or its calibration file has them (``calibrate --ranges output``)."""
        asked = self.config.ranges
        if asked != "auto":
            return asked
        if not self.config.needs_calibration:
            return "calibrated"
        return "output" if self.data is not None or (recorded or {}).get("ranges") == "output" else "calibrated"


def floors_scheme(config: QuantConfig) -> dict:
    """What a range-floor check's verdict depends on besides the model, the statistics and the rows."""
    return {k: v for k, v in clip.scheme(config).items() if k != "floor_ranges"}


def with_file_ranges(job: PlanJob, prepared: pipeline.Prepared, calib, config: QuantConfig) -> QuantConfig:
    """``config`` as a run with --calib can have it: output-aware ranges where the calibration file holds them for this
    scheme; else refused when asked for (--ranges output), calibrated ranges with a note by default."""
    if config.ranges != "output" or job.data is not None or calib is None:
        return config
    problem = pipeline.file_ranges_problem(calib, config)
    if problem is None:
        return config
    if job.config.ranges == "output":
        raise UsageError(problem)
    prepared.notes.append(f"output-aware ranges left out: {problem}")
    return dataclasses.replace(config, ranges="calibrated")


def recorded(calib) -> tuple[dict | None, dict | None]:
    """What ``PlanJob.effective`` reads of a calibration: its options and its range-floor check."""
    return (calib.options, calib.floors) if calib is not None else (None, None)


def load_overrides(path: Path | None) -> Overrides:
    if path is None:
        return Overrides()
    d = io.read_json(path, "overrides file")
    return Overrides.from_dict(d.get("overrides", d) if isinstance(d, dict) else d, f"overrides file {path}")


def statistics(job: PlanJob, prepared: pipeline.Prepared, overrides: Overrides, progress):
    """The calibration (read from --calib, or made from --data), or None for modes without it."""
    if not job.config.needs_calibration:
        return None
    if job.calib is not None:
        calib = pipeline.load_calibration(job.calib, prepared, job.force_calib)
        made, asked = bool(calib.options.get("equalize")), job.config.equalize
        if asked == "on" and not made:
            raise QconvError(f"calibration file {job.calib} was made without cross-layer equalization and this run asks for it "
                             "(the ranges belong to other weights): drop --equalize, or re-run qconv calibrate with it")
        if asked == "off" and made:
            raise QconvError(f"calibration file {job.calib} was made with cross-layer equalization (its ranges belong to the "
                             "rescaled weights) and this run has --no-equalize: drop --no-equalize, or re-run qconv calibrate --no-equalize")
        if made:  # --equalize rescaled the identity/Relu pairs at load; the default's file says to, here
            pipeline.equalize_recorded(prepared, calib.equalization, plain_pairs=asked != "on")
        replay_smoothing(prepared, calib.smoothing, job.config.smooth, f"calibration file {job.calib}", "qconv calibrate")
        return calib
    o = job.calib_options
    source = pipeline.feeds_for(prepared, job.data, o.batch_size, o.samples, cast=o.cast_data, skip=job.holdout)
    config = job.effective(None)
    made, scales, smoothing = rewritten(prepared, source, job.config.equalize, config, o.threads)
    if distributed.parse_executor(o.executor).distributed or o.shards:
        names = calibration_targets(prepared.model, config, activation_tensors(prepared.model), overrides)
        calib = sharded_calibration(prepared, job.data, source, names, job.config.per_channel, job.method, o, progress,
                                    made, o.samples_for(config.method, source.count()), scales, smoothing)
    else:
        calib = pipeline.calibrate(prepared, source, o.threads, progress, job.method, o.bins, o.momentum, config, overrides,
                                   o.max_memory, made, o.samples_for(config.method, source.count()), smooth=bool(smoothing))
    calib.equalization = scales
    calib.smoothing = smoothing
    return calib


def replay_smoothing(prepared: pipeline.Prepared, scales: dict, asked: str, where: str, remedy: str) -> None:
    """The SmoothQuant scales a calibration file or plan recorded, applied before planning (its ranges belong to the
    smoothed model); refused where this run asks otherwise."""
    if asked == "off" and scales:
        raise QconvError(f"{where} was made with SmoothQuant (its ranges belong to the smoothed model) and this run has --no-smooth: "
                         f"drop --no-smooth, or re-run {remedy} --no-smooth")
    if asked == "on" and not scales:
        raise QconvError(f"{where} was made without SmoothQuant and this run asks for it (--smooth): drop --smooth, or re-run "
                         f"{remedy} --smooth")
    pipeline.smooth_recorded(prepared, scales)


def rewritten(prepared: pipeline.Prepared, source, asked: str, config: QuantConfig, threads: int | None
              ) -> tuple[bool, dict[str, list[float]], dict[str, dict]]:
    """What changes the weights before calibration, in order: cross-layer equalization as ``asked`` (``equalization``),
    then SmoothQuant as ``config.smooth`` asks (``pipeline.smooth_checked``). Returns (equalized, the gated pairs'
    scales, the smoothing), all recorded in the calibration."""
    made, scales = equalization(prepared, source, asked, config, threads)
    smoothing = pipeline.smooth_checked(prepared, source, config, threads)
    runtime.give_back(collect=False)  # the checks' sessions and candidate models, before the statistics session
    return made, scales, smoothing


def equalization(prepared: pipeline.Prepared, source, asked: str, config: QuantConfig, threads: int | None
                 ) -> tuple[bool, dict[str, list[float]]]:
    """Cross-layer equalization before calibration, as ``asked`` (auto, on, off): (the model was equalized, the gated
    pairs' scales), both recorded in the calibration so --calib and --plan reproduce the model without data."""
    if asked == "auto":
        return pipeline.equalize_checked(prepared, source, config, threads)
    if asked == "on":  # the identity/Relu pairs were rescaled at load
        return True, pipeline.equalize_gated(prepared, source, threads)
    return False, {}


@clock.timed("statistics (shards)")
def sharded_calibration(prepared: pipeline.Prepared, data: Path, source: FeedSource, names: list[str], per_channel: bool,
                        method: str, o: CalibOptions, progress, equalize: bool = False, hist_samples: int = DEFAULT_SAMPLES,
                        scales: dict | None = None, smoothing: dict | None = None):
    """Calibration of ``names`` as shard tasks on the executor, merged in shard order (see qconv.distributed)."""
    from qconv.calib.store import Calibration, merge_tensors

    executor = distributed.parse_executor(o.executor)
    shards = o.shards or distributed.DEFAULT_SHARDS
    data_id = source.identity()  # once, here: workers never hash the data
    tasks = [(str(prepared.path), str(data), per_channel, o.batch_size, (k, shards), o.bins, o.momentum, names, o.max_memory,
              o.cast_data, equalize, hist_samples, scales or {}, smoothing or {}) for k in range(shards)]
    parts = distributed.run_tasks(executor, distributed.calibrate_shard, tasks, "calibrating shards", progress)
    seen = sum(p["seen"] for p in parts)
    if seen == 0:
        raise QconvError("no calibration samples: the data set is empty")
    observers = merge_tensors([p["tensors"] for p in parts])
    record = pipeline.calibration_record(source, method, o.bins, o.momentum, shards=shards, equalize=equalize, hist_samples=hist_samples,
                                         smooth=bool(smoothing))
    return Calibration(prepared.model_id, data_id, seen, record.to_dict(), {n: observers[n] for n in names if n in observers})


def run_plan(job: PlanJob, progress=pipeline.no_progress) -> tuple[QuantPlan, pipeline.Prepared]:
    """The plan of ``job`` (``qconv plan``): nothing is rewritten."""
    job.check()
    overrides = load_overrides(job.overrides)
    prepared = pipeline.load(job.model, job.config)
    pipeline.check_float(prepared)
    calib = statistics(job, prepared, overrides, progress)
    config = with_file_ranges(job, prepared, calib, job.effective(*recorded(calib)))
    time_kernels(job, prepared, calib, config)
    return adjusted(job, prepared, pipeline.plan(prepared, calib, config, overrides), progress, calib), prepared


def _checks_floors(job: PlanJob, config: QuantConfig) -> bool:
    return job.data is not None and job.config.floor_ranges == "auto" and config.needs_calibration


def adjusts(job: PlanJob, config: QuantConfig) -> bool:
    """Whether ``adjusted`` measures anything for a plan of ``config`` (else it returns the plan as it is)."""
    return bool(_checks_floors(job, config) or config.bias_correction or config.rounding != "nearest" or (config.ranges == "output" and job.data is not None))


def adjusted(job: PlanJob, prepared: pipeline.Prepared, plan: QuantPlan, progress, calib) -> QuantPlan:
    """The plan with the steps measured on the calibration rows, as its config asks: output-aware ranges (--ranges
    output, planned again from ``calib``), learned rounding (--rounding), then bias correction (--bias-correction),
    which measures the int8 model with the learned integers."""
    if not adjusts(job, plan.config):
        return plan  # (with --calib, the file's output-aware ranges and floors are in the plan already)
    o = job.calib_options
    source = pipeline.feeds_for(prepared, job.data, o.batch_size, o.samples, cast=o.cast_data, skip=job.holdout)
    measured = pipeline.CheckRows()  # the checks share rows and models: each is run once
    if _checks_floors(job, plan.config):
        plan, found = pipeline.floors_checked(prepared, plan, calib, pipeline.rows_spread(source, 0, pipeline.FLOORS_CHECK_ROWS),
                                              o.threads, measured)
        if found:
            prepared.notes.append(pipeline.floors_note(found))
    if job.data is not None:
        plan = pipeline.refine_ranges(prepared, plan, calib, source, o.threads, progress, check=job.config.ranges == "auto",
                                      max_memory=o.max_memory, measured=measured)
    plan = pipeline.round_weights(prepared, plan, source, o.threads, progress, o.max_memory)
    return pipeline.correct_bias(prepared, plan, source, o.threads, progress, check=job.config.bias_correction == "auto",
                                 measured=measured)


def read_plan(path: Path) -> QuantPlan:
    return QuantPlan.from_dict(io.read_json(path, "plan file"), f"plan file {path}")


def check_plan_model(stored: QuantPlan, path: Path, prepared: pipeline.Prepared, force: bool = False) -> None:
    made_for = str(stored.source.get("model_id", ""))
    if made_for != prepared.model_id and not force:
        raise QconvError(f"plan file {path} was made for another model (id {made_for[:12]}, this model {prepared.model_id[:12]}): "
                         "re-run qconv plan, or pass --force-calib")


@clock.timed("kernel table")
def time_kernels(job: PlanJob, prepared: pipeline.Prepared, calib, config: QuantConfig, again: bool = False) -> Path | None:
    """For ``--kernels auto``: time the model's nodes on this machine (float and all int8, one row, onnxruntime's own
    profiler) unless a table of this model is cached, and cache it; the plan then keeps float the regions that run
    slower in int8. Once per model and machine: later runs read the cache and plan the same bytes. Returns the cache
    path, or None when nothing was timed (other modes or tables, no calibration, a row whose shape is unknown)."""
    from qconv.measure.kernels import model_table
    from qconv.plan import kernels

    if config.mode != "int8" or config.kernels != "auto" or calib is None:
        return None
    path = kernels.model_cache_path(prepared.kernel_id)
    if path.is_file() and not again:
        return path
    feed = _timing_feed(prepared, calib, job)
    if feed is None:
        return None
    base = pipeline.plan(prepared, calib, dataclasses.replace(config, kernels="none", bias_correction=None), Overrides())
    try:
        int8 = pipeline.apply(prepared, base, check=False).model
        table = model_table(prepared.model, int8, feed, dict(base.folded), prepared.kernel_id)
    except QconvError:  # a row the model cannot run (made from sizes alone): no table, the plan is int8 wherever it can be
        return None
    with tempfile.TemporaryDirectory(prefix="qconv-kernels.") as tmp:  # the cache gets the table once it is checked
        models = {(): int8}
        for _ in range(VERIFY_CHOICES):  # the fastest choice against all int8, then the accurate one against the winner
            draft = io.write_json(table, Path(tmp) / "table.json")
            chosen = pipeline.plan(prepared, calib, dataclasses.replace(config, kernels=str(draft), bias_correction=None), Overrides())
            asked = (chosen.source.get("speed") or {}).get("pending")
            verified = asked and _verify(prepared, calib, config, models, asked, feed)
            if not verified:
                break
            table["verdicts"] = kernels.verdicts(table) + [verified]
    path.parent.mkdir(parents=True, exist_ok=True)
    io.write_json(table, path)
    return path


def _verify(prepared: pipeline.Prepared, calib, config: QuantConfig, models: dict, asked: dict, feed: dict) -> dict | None:
    """The A/B timing of the region choice a new table asks about (regions.choose's ``pending``: keeping
    ``float_nodes`` float, against keeping ``against`` float, or all int8) on the same row (interleaved rounds, one
    thread): the table keeps the verdict, which decides the choice from then on. None when it cannot be timed.
    The estimate adds node times measured one model at a time; fusions and layouts at a region's border are where it
    can be wrong."""
    from qconv import runtime
    from qconv.measure.latency import latency
    from qconv.plan.overrides import NodeOverride

    def model_of(floats: list[str]):  # the model keeping ``floats`` float, made once per run
        key = tuple(sorted(floats))
        if key not in models:
            forced = Overrides({n: NodeOverride(precision="float") for n in floats}, {})
            plan = pipeline.plan(prepared, calib, dataclasses.replace(config, kernels="none", bias_correction=None), forced)
            models[key] = pipeline.apply(prepared, plan, check=False).model
        return models[key]

    try:
        a = runtime.session(model_of(asked["against"]), 1, spinning=False, prepack=True)
        b = runtime.session(model_of(asked["float_nodes"]), 1, spinning=False, prepack=True)
        t0 = time.perf_counter()
        runtime.run(a, feed)
        runtime.run(a, feed)
        big = time.perf_counter() - t0 > 2 * BIG_RUN_SECONDS  # one run a block: its cache is not what its time is
        lat = latency(a, b, feed, 1, min_rounds=20, budget_s=AB_SECONDS, block=1 if big else 3)
    except QconvError:
        return None
    return {"float_nodes": asked["float_nodes"], "against": asked["against"], "ratio": round(lat["ratio"], 4),
            "ratio_low": round(lat["ratio_low"], 4), "ratio_high": round(lat["ratio_high"], 4), "runs": lat["runs"]}


def run_kernels(job: PlanJob, progress=pipeline.no_progress) -> Path:
    """``qconv kernels MODEL``: time the model's nodes (again) and cache the table ``--kernels auto`` plans with."""
    job.check()
    prepared = pipeline.load(job.model, job.config)
    pipeline.check_float(prepared)
    calib = statistics(job, prepared, Overrides(), progress)
    path = time_kernels(job, prepared, calib, dataclasses.replace(job.effective(*recorded(calib)), kernels="auto"), again=True)
    if path is None:
        raise QconvError(f"cannot time {job.model}: give --data with rows of its inputs (the calibration file alone does not "
                         "say the size of every input dimension, or an input is not float)")
    return path


VERIFY_CHOICES = 2  # A/B timings when a table is made: regions.choose asks about two choices at most
AB_SECONDS = 15.0  # the A/B check of a new table's region choice (once per model and machine)
BIG_RUN_SECONDS = 0.02  # a model whose run takes longer is timed one run a block
INTEGER_INPUTS = {7: "int64", 6: "int32", 9: "bool"}  # onnx.TensorProto INT64, INT32, BOOL -> numpy


def _timing_feed(prepared: pipeline.Prepared, calib, job: PlanJob) -> dict | None:
    """One row to time the model on: the first of --data; else N(0, 1) values (ones for integer inputs) of the first row's
    shapes the calibration recorded, else of the graph inputs' shapes with one unknown size solved from the calibration's
    element counts."""
    import numpy as np
    import onnx

    from qconv.plan import regions

    if job.data is not None:
        rows = pipeline.feeds_for(prepared, job.data, 1, cast=job.calib_options.cast_data)
        return next(iter(rows), None)
    recorded = calib.options.get("row_shapes") or {}
    counts = regions.counts_per_row(calib.tensors, calib.identity())
    inits = {t.name for t in prepared.model.graph.initializer}
    feed = {}
    for vi in prepared.model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        if vi.name in recorded and tt.elem_type in INTEGER_INPUTS:  # token ids, masks: ones (a valid id, an open mask)
            feed[vi.name] = np.ones(recorded[vi.name], INTEGER_INPUTS[tt.elem_type])
            continue
        if tt.elem_type != onnx.TensorProto.FLOAT:
            return None
        if vi.name in recorded:
            feed[vi.name] = np.random.default_rng(0).standard_normal(recorded[vi.name]).astype(np.float32)
            continue
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim]
        if dims and dims[0] is None:
            dims[0] = 1
        unknown = [k for k, d in enumerate(dims) if d is None]
        if unknown:
            n = counts.get(vi.name)
            known = int(np.prod([d for d in dims if d is not None])) if dims else 1
            if not n or len(unknown) > 1:
                return None
            dims[unknown[0]] = max(1, int(round(n / known)))
        feed[vi.name] = np.random.default_rng(0).standard_normal(dims).astype(np.float32)
    return feed or None

