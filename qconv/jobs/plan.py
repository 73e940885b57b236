"""``qconv plan``, and what every job that plans shares: the options of calibration, where statistics come from
(a calibration file, calibration in this run, or shard tasks), overrides and stored plans."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from qconv import distributed, io, pipeline
from qconv.calib.collect import activation_tensors
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

    def check(self) -> None:
        ex = distributed.parse_executor(self.executor)
        if self.shards is not None and self.shards < 1:
            raise UsageError("--shards must be at least 1")
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
        elif self.calib is not None:
            raise UsageError(f"--mode {config.mode} takes no calibration file: drop --calib (--data, if given, is used for evaluation"
                             f"{' and GPTQ' if config.mode == 'int4' else ''})")

    def effective(self, recorded: dict | None) -> QuantConfig:
        """The config with the range method and percentile: from the options, else as calibration recorded them."""
        recorded = recorded or {}
        method = self.method or recorded.get("method") or DEFAULT_METHOD
        pct = self.percentile if self.percentile is not None else float(recorded.get("percentile", 99.999))
        return dataclasses.replace(self.config, method=method, percentile=pct, bias_correction=self.bias_correction())

    def bias_correction(self) -> str | None:
        """The bias correction this plan gets: as asked, or by default full when the run has calibration rows (not with
        --calib, which has none). Tuning measures its candidates without it and corrects the plan it chose."""
        asked = self.config.bias_correction
        if asked != "auto":
            return asked
        return "full" if self.data is not None and self.config.needs_calibration else None


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
        made = bool(calib.options.get("equalize"))
        if made != job.config.equalize:
            raise QconvError(f"calibration file {job.calib} was made {'with' if made else 'without'} --equalize and this run "
                             f"{'asks for' if job.config.equalize else 'does not ask for'} it (the ranges belong to other weights): "
                             f"{'add' if made else 'drop'} --equalize, or re-run qconv calibrate {'without' if made else 'with'} it")
        return calib
    o = job.calib_options
    source = pipeline.feeds_for(prepared, job.data, o.batch_size, o.samples, cast=o.cast_data, skip=job.holdout)
    if distributed.parse_executor(o.executor).distributed or o.shards:
        names = calibration_targets(prepared.model, job.effective(None), activation_tensors(prepared.model), overrides)
        return sharded_calibration(prepared, job.data, source, names, job.config.per_channel, job.method, o, progress,
                                   job.config.equalize)
    return pipeline.calibrate(prepared, source, o.threads, progress, job.method, o.bins, o.momentum,
                              job.effective(None), overrides, o.max_memory, job.config.equalize)


def sharded_calibration(prepared: pipeline.Prepared, data: Path, source: FeedSource, names: list[str], per_channel: bool,
                        method: str, o: CalibOptions, progress, equalize: bool = False):
    """Calibration of ``names`` as shard tasks on the executor, merged in shard order (see qconv.distributed)."""
    from qconv.calib.store import Calibration, merge_tensors

    executor = distributed.parse_executor(o.executor)
    shards = o.shards or distributed.DEFAULT_SHARDS
    data_id = source.identity()  # once, here: workers never hash the data
    tasks = [(str(prepared.path), str(data), per_channel, o.batch_size, (k, shards), o.bins, o.momentum, names, o.max_memory,
              o.cast_data, equalize) for k in range(shards)]
    parts = distributed.run_tasks(executor, distributed.calibrate_shard, tasks, "calibrating shards", progress)
    seen = sum(p["seen"] for p in parts)
    if seen == 0:
        raise QconvError("no calibration samples: the data set is empty")
    observers = merge_tensors([p["tensors"] for p in parts])
    record = pipeline.calibration_record(source, method, o.bins, o.momentum, shards=shards, equalize=equalize)
    return Calibration(prepared.model_id, data_id, seen, record.to_dict(), {n: observers[n] for n in names if n in observers})


def run_plan(job: PlanJob, progress=pipeline.no_progress) -> tuple[QuantPlan, pipeline.Prepared]:
    """The plan of ``job`` (``qconv plan``): nothing is rewritten."""
    job.check()
    overrides = load_overrides(job.overrides)
    prepared = pipeline.load(job.model, job.config)
    pipeline.check_float(prepared)
    calib = statistics(job, prepared, overrides, progress)
    config = job.effective(calib.options if calib is not None else None)
    return bias_corrected(job, prepared, pipeline.plan(prepared, calib, config, overrides), progress), prepared


def bias_corrected(job: PlanJob, prepared: pipeline.Prepared, plan: QuantPlan, progress) -> QuantPlan:
    """The plan with bias correction measured on the calibration rows (when --bias-correction asks for it)."""
    if not plan.config.bias_correction:
        return plan
    o = job.calib_options
    source = pipeline.feeds_for(prepared, job.data, o.batch_size, o.samples, cast=o.cast_data, skip=job.holdout)
    return pipeline.correct_bias(prepared, plan, source, o.threads, progress)


def read_plan(path: Path) -> QuantPlan:
    return QuantPlan.from_dict(io.read_json(path, "plan file"), f"plan file {path}")


def check_plan_model(stored: QuantPlan, path: Path, prepared: pipeline.Prepared, force: bool = False) -> None:
    made_for = str(stored.source.get("model_id", ""))
    if made_for != prepared.model_id and not force:
        raise QconvError(f"plan file {path} was made for another model (id {made_for[:12]}, this model {prepared.model_id[:12]}): "
                         "re-run qconv plan, or pass --force-calib")
