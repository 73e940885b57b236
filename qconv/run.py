"""The jobs the CLI runs, and the place that wires the stages together (with ``qconv.evaluation`` for measuring a
written model and ``qconv.tools`` for the jobs around calibration files).

``run_plan``     load -> calibrate (or read statistics) -> plan                      (``qconv plan``)
``run_quantize`` load -> calibrate / read statistics / read a plan -> plan -> apply -> evaluate -> report
``run_compare``  evaluate any two models on the same data -> report                   (``qconv report``)

The CLI only parses options into these dataclasses and renders what comes back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qconv import distributed, io, pipeline, runtime
from qconv.calib.collect import activation_tensors
from qconv.calib.ranges import DEFAULT_METHOD
from qconv.calib.observers import DEFAULT_BINS, DEFAULT_MOMENTUM
from qconv.config import QuantConfig
from qconv.data import FeedSource, InputSpec
from qconv.errors import QconvError, UsageError
from qconv.evaluation import (  # EvalOptions: for the CLI
    EvalOptions,
    damage_warnings,
    evaluate,
    evaluate_models,
)
from qconv.graph import ai_onnx_opset
from qconv.measure.stats import ErrorStats
from qconv.measure.thresholds import Thresholds
from qconv.overrides import Overrides
from qconv.plan import QuantPlan
from qconv.planner import calibration_targets
from qconv.report.build import build_comparison_report, build_report, complete
from qconv.report.gates import evaluate_gates
from qconv.report.layers import dequantized_of
from qconv.report.write import check_report_paths, write_reports
from qconv.rewrite.quantized_io import io_params_of
from qconv.tune.budget import TuneOptions
from qconv.tune.speed import speed_fallback
from qconv.tune.tuner import TuneJob, tune


@dataclass(frozen=True)
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


@dataclass
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
    tuning: bool = False  # the plan is tuning's: bias correction only when asked for

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
        --calib, which has none, nor with tuning, which measures its candidates without it)."""
        asked = self.config.bias_correction
        if asked != "auto":
            return asked
        return "full" if self.data is not None and self.config.needs_calibration and not self.tuning else None


def load_overrides(path: Path | None) -> Overrides:
    if path is None:
        return Overrides()
    d = io.read_json(path, "overrides file")
    return Overrides.from_dict(d.get("overrides", d) if isinstance(d, dict) else d, f"overrides file {path}")


def _statistics(job: PlanJob, prepared: pipeline.Prepared, overrides: Overrides, progress):
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
    calib = _statistics(job, prepared, overrides, progress)
    config = job.effective(calib.options if calib is not None else None)
    return _corrected(job, prepared, pipeline.plan(prepared, calib, config, overrides), progress), prepared


def _corrected(job: PlanJob, prepared: pipeline.Prepared, plan: QuantPlan, progress) -> QuantPlan:
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


@dataclass
class QuantizeJob:
    out: Path
    plan: PlanJob
    plan_file: Path | None = None
    evaluation: EvalOptions = field(default_factory=EvalOptions)
    gates: Thresholds = field(default_factory=Thresholds)
    reports: tuple = ()
    speed_fallback: bool = False  # keep float the nodes the profile shows slower in int8, if the model then measures faster
    tune: TuneOptions | None = None  # search the overrides for a model that meets the targets (see qconv.tune)
    write_plan: Path | None = None  # also write the plan the model was made from (with tuning's overrides)
    converting: bool = field(default=False, init=False)  # set by check(): a QDQ input to fold into QOperator form

    @property
    def model(self) -> Path:
        return self.plan.model

    def check(self) -> None:
        """Validate the options together, before any work."""
        e = self.evaluation
        wants_fold = (self.plan_file is None and self.plan.calib is None and self.plan.data is None
                      and self.plan.config.mode == "int8" and self.plan.config.format == "qoperator")
        ops = io.op_counts(self.model) if wants_fold else {}
        self.converting = wants_fold and pipeline.is_qdq(ops)
        if wants_fold and not self.converting and pipeline.quantized_ops_of(ops):
            found = ", ".join(f"{c} {op}" for op, c in pipeline.quantized_ops_of(ops).items())
            raise QconvError(f"{self.model} has no QuantizeLinear/DequantizeLinear pairs to convert ({found}): "
                             "it is in QOperator (or integer) form already")
        self.plan.check(self.plan_file is not None or self.converting)
        if self.plan_file is not None and (self.plan.overrides is not None):
            raise UsageError("--plan already holds its overrides: edit them in the plan file and drop --overrides")
        if e.labels is not None and e.data is None:
            raise UsageError("--eval-labels needs --eval-data (labels must match the evaluated rows)")
        has_eval = self.eval_path is not None
        if self.speed_fallback and not (has_eval and e.latency):
            raise UsageError("--speed-fallback measures the model: it needs evaluation data (--eval-data or --data) and latency (drop --no-latency)")
        if self.tune is not None:
            self._check_tune()
        self.gates.check_options(e.labels is not None, e.latency and has_eval, has_eval)
        check_report_paths(self.reports, self.model)
        io.check_output_path(self.out, self.model, self.plan.calib, self.plan.data, e.data, self.plan_file)
        if self.write_plan is not None:
            io.check_output_path(self.write_plan, self.model, self.plan.calib, self.plan.data, e.data, self.plan_file, self.out)

    def _check_tune(self) -> None:
        mode = self.plan.config.mode
        if self.plan_file is not None:
            raise UsageError("--tune searches the plan: drop --plan (or apply the tuned plan later with --plan)")
        if not self.plan.config.needs_calibration:
            raise UsageError(f"--tune searches ranges, int16 islands and float fallbacks of the static modes: --mode {mode} has none "
                             "(use --mode int8 or a16w8, or --exclude-nodes for this mode)")
        if self.speed_fallback:
            raise UsageError("--tune already weighs speed (it keeps float the nodes slower in int8 when that measures faster): drop --speed-fallback")
        if self.evaluation.data is None:
            if self.plan.data is None:
                raise UsageError("--tune measures candidates: give --eval-data (with --calib), or --data to hold part of it out")
            if distributed.parse_executor(self.plan.calib_options.executor).distributed or self.plan.calib_options.shards:
                raise UsageError("--tune without --eval-data holds out part of --data, which --executor/--shards cannot: give --eval-data")

    @property
    def eval_path(self) -> Path | None:
        return self.evaluation.data or self.plan.data


def load_labels(path: Path | None) -> np.ndarray | None:
    if path is None:
        return None
    if not path.exists():
        raise QconvError(f"labels file not found: {path}")
    try:
        labels = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - numpy raises many types for broken files
        raise QconvError(f"cannot read labels {path} (expected a .npy of integer class ids): {exc}") from None
    if labels.dtype.kind not in "iu":
        raise QconvError(f"labels {path} have dtype {labels.dtype}; expected integer class ids")
    return labels.reshape(-1)


def _make_plan(job: QuantizeJob, prepared: pipeline.Prepared, stored: QuantPlan | None, progress):
    """(plan, calibration or None): planned now, or the stored plan (planned again if its overrides were edited)."""
    pj = job.plan
    if stored is None:
        overrides = load_overrides(pj.overrides)
        calib = _statistics(pj, prepared, overrides, progress)
        config = pj.effective(calib.options if calib is not None else None)
        return _corrected(pj, prepared, pipeline.plan(prepared, calib, config, overrides), progress), calib
    check_plan_model(stored, job.plan_file, prepared, pj.force_calib)
    calib = pipeline.load_calibration(pj.calib, prepared, pj.force_calib) if pj.calib is not None else None
    if not stored.stale:
        return stored, calib
    return pipeline.replan(prepared, stored, calib, f"plan file {job.plan_file}"), calib


def run_quantize(job: QuantizeJob, progress=pipeline.no_progress) -> tuple[dict, pipeline.Result]:
    """Plan (or read a plan), rewrite, evaluate, write the model and reports. Nothing is written on error."""
    job.check()
    labels = load_labels(job.evaluation.labels)
    stored = read_plan(job.plan_file) if job.plan_file is not None else None
    prepared = pipeline.load(job.model, stored.config if stored is not None else job.plan.config)
    if job.converting:
        return _run_conversion(job, prepared, labels, progress)
    pipeline.check_float(prepared)
    if job.tune is not None:
        return _run_tuned(job, prepared, labels, progress)
    eval_path = job.eval_path
    o = job.plan.calib_options
    eval_source = pipeline.feeds_for(prepared, eval_path, o.batch_size, cast=o.cast_data) if eval_path else None
    plan, calib = _make_plan(job, prepared, stored, progress)
    calib_feeds = None
    if plan.config.mode == "int4" and job.plan.data is not None:
        calib_feeds = pipeline.feeds_for(prepared, job.plan.data, o.batch_size, o.samples, cast=o.cast_data)
    first = eval_source or (pipeline.feeds_for(prepared, job.plan.data, o.batch_size, cast=o.cast_data) if job.plan.data else None)
    feed = pipeline.check_feed(prepared, next(iter(first), None) if first is not None else None)
    result = pipeline.apply(prepared, plan, calib_feeds, feed)
    evaluation, notes, fallback = None, [], None
    if eval_source is not None:
        evaluation, reference = evaluate(prepared, result, eval_source, labels, job.evaluation, progress)
        if job.speed_fallback:
            fallback, faster = speed_fallback(prepared, result, calib, evaluation, eval_source, job.evaluation.threads)
            if faster is not None:
                result = faster
                evaluation, reference = evaluate(prepared, result, eval_source, labels, job.evaluation, progress)
        notes = damage_warnings(evaluation, prepared, result, calib, reference, job.evaluation.threads)
    report = _save_and_report(job, prepared, result, calib, evaluation, str(eval_path) if eval_path else None, notes)
    report["speed_fallback"] = fallback
    _write_plan(job, result.plan)
    return _finish(report, job.gates, job.reports), result


def _save_and_report(job: QuantizeJob, prepared: pipeline.Prepared, result: pipeline.Result, calib, evaluation: dict | None,
                     eval_source: str | None, notes=()) -> dict:
    """Write the model and build its report (the caller adds gates and job-specific sections, then writes it)."""
    size_q = pipeline.save_quantized(result, job.out, prepared)
    return build_report(result.plan, prepared.model, result.model, input_path=str(prepared.path), output_path=str(job.out),
                        original_opset=ai_onnx_opset(prepared.original), intake=prepared.notes, findings=result.findings.to_dict(),
                        calib=calib, sizes=(io.model_size_bytes(job.model), size_q), evaluation=evaluation,
                        eval_source=eval_source, extra_warnings=list(notes))


def _finish(report: dict, gates: Thresholds, paths) -> dict:
    """The last step of every report: its gate (passed with no checks when none was asked for; tuning sets its
    targets' own), every schema key present, then written."""
    if "gate" not in report:
        report["gate"] = evaluate_gates(gates, report)
    write_reports(complete(report), paths)
    return report


def _write_plan(job: QuantizeJob, plan: QuantPlan) -> None:
    if job.write_plan is not None:
        io.write_json(plan.to_dict(), job.write_plan)


HOLDOUT = (4, 5)  # without --eval-data, tuning measures on every fifth feed of --data and calibrates on the rest


def _run_tuned(job: QuantizeJob, prepared: pipeline.Prepared, labels, progress) -> tuple[dict, pipeline.Result]:
    """Calibrate, search the overrides (qconv.tune), then write and report the best model found."""
    pj = dataclasses.replace(job.plan, tuning=True)
    o = pj.calib_options
    if job.evaluation.data is None:
        # Every fifth feed is held out; with fewer than 10 feeds, every fifth row (feeds of one row each).
        bs = o.batch_size if pipeline.feeds_for(prepared, pj.data, o.batch_size, cast=o.cast_data).count() >= 10 else 1
        pj = dataclasses.replace(pj, holdout=HOLDOUT, calib_options=dataclasses.replace(o, batch_size=bs))
        source = pipeline.feeds_for(prepared, pj.data, bs, shard=HOLDOUT, cast=o.cast_data)
        kept = pipeline.feeds_for(prepared, pj.data, bs, cast=o.cast_data, skip=HOLDOUT).count()
        if kept < 1 or source.count() < 1:
            raise QconvError(f"--tune holds out every fifth row of {pj.data} to measure on, and it has too few rows "
                             "(give --eval-data, or at least 5 rows)")
        unit, held = ("feed" if bs > 1 else "row"), source.count()
        data_note = f"every fifth {unit} of {pj.data} ({held} of {held + kept} {unit}s), held out of calibration"
        eval_label = f"{pj.data} (every fifth {unit})"
    else:
        source = pipeline.feeds_for(prepared, job.evaluation.data, o.batch_size, cast=o.cast_data)
        data_note = f"the first rows of {job.evaluation.data}"
        eval_label = str(job.evaluation.data)
    overrides = load_overrides(pj.overrides)
    calib = _statistics(pj, prepared, overrides, progress)
    calib_source = None
    if pj.data is not None:
        calib_source = pipeline.feeds_for(prepared, pj.data, pj.calib_options.batch_size, cast=o.cast_data, skip=pj.holdout)
    tuned = tune(TuneJob(prepared=prepared, calib=calib, config=pj.effective(calib.options), overrides=overrides, source=source,
                         labels=labels, gates=job.gates, options=job.tune, evaluation=job.evaluation, calib_source=calib_source,
                         correct=lambda plan: _corrected(pj, prepared, plan, progress)), progress)
    result = tuned.result
    notes = damage_warnings(tuned.evaluation, prepared, result, calib, tuned.reference, job.evaluation.threads)
    report = _save_and_report(job, prepared, result, calib, tuned.evaluation, eval_label, notes)
    report["gate"] = evaluate_gates(dataclasses.replace(tuned.targets, max_size_mb=job.gates.max_size_mb), report)
    report["tuning"] = tuned.section(data_note, report["gate"])
    _write_plan(job, result.plan)
    return _finish(report, job.gates, job.reports), result


def _run_conversion(job: QuantizeJob, prepared: pipeline.Prepared, labels, progress) -> tuple[dict, pipeline.Result]:
    """``quantize --format qoperator`` on a QDQ model: fold, check the outputs against the QDQ model, report."""
    result = pipeline.convert_qdq(prepared, job.plan.config)
    o = job.plan.calib_options
    source = pipeline.feeds_for(prepared, job.evaluation.data, o.batch_size, cast=o.cast_data) if job.evaluation.data else None
    feed = pipeline.check_feed(prepared, next(iter(source), None) if source is not None else None)
    if feed is not None:
        ref = runtime.run(runtime.session(prepared.model, 1), feed)
        got = runtime.run(runtime.session(result.model, 1), feed)
        for r, g, o_ in zip(ref, got, prepared.model.graph.output):
            if isinstance(r, np.ndarray) and r.dtype.kind == "f":
                s = ErrorStats()
                s.update(r, g)
                if s.cosine < 0.999:
                    raise QconvError(f"the QOperator form changes output '{o_.name}' (cosine {s.cosine:.4f} against the QDQ model): "
                                     "nothing was written; please report it")
    evaluation = None
    if source is not None:
        evaluation, _ = evaluate(prepared, result, source, labels, dataclasses.replace(job.evaluation, profile=False), progress)
    report = _save_and_report(job, prepared, result, None, evaluation, str(job.evaluation.data) if job.evaluation.data else None)
    _write_plan(job, result.plan)
    return _finish(report, job.gates, job.reports), result


@dataclass
class CompareJob:
    original: Path
    quantized: Path
    data: Path
    evaluation: EvalOptions = field(default_factory=EvalOptions)
    batch_size: int = 1
    gates: Thresholds = field(default_factory=Thresholds)
    reports: tuple = ()
    cast_data: bool = False

    def check(self) -> None:
        distributed.parse_executor(self.evaluation.executor)
        self.gates.check_options(self.evaluation.labels is not None, self.evaluation.latency, True)
        check_report_paths(self.reports, self.original, self.quantized, self.data)


def run_compare(job: CompareJob, progress=pipeline.no_progress) -> dict:
    """Compare any two models on the same data: outputs, task accuracy, latency and every shared tensor."""
    job.check()
    original, quantized = io.load_model(job.original), io.load_model(job.quantized)
    labels = load_labels(job.evaluation.labels)
    initializers = {t.name for t in original.graph.initializer}
    specs = [InputSpec.from_value_info(i) for i in original.graph.input if i.name not in initializers]
    source = FeedSource(job.data, specs, batch_size=job.batch_size, cast=job.cast_data)
    io_params = io_params_of(quantized)
    evaluation, _ = evaluate_models(str(job.original), str(job.quantized), original, quantized, dequantized_of(quantized),
                                     source, labels, job.evaluation, progress, io=io_params)
    report = build_comparison_report(str(job.original), str(job.quantized), original, quantized, evaluation, str(job.data))
    return _finish(report, job.gates, job.reports)
