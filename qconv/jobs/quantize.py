"""``qconv quantize``: plan (or read a plan), rewrite, evaluate, write the model and its reports; with ``--tune``,
the search of ``qconv.tune`` in between; with a QDQ model and ``--format qoperator``, the conversion alone.
Nothing is written on error."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qconv import clock, distributed, io, pipeline, runtime
from qconv.errors import QconvError, UsageError
from qconv.graph import ai_onnx_opset
from qconv.jobs.common import finish, load_labels
from qconv.jobs.plan import time_kernels, PlanJob, adjusted, adjusts, check_plan_model, load_overrides, read_plan, recorded, statistics, with_file_ranges
from qconv.measure.evaluate import EvalOptions, damage_warnings, evaluate
from qconv.measure.stats import ErrorStats
from qconv.measure import usermetric
from qconv.measure.thresholds import Thresholds
from qconv.plan import QuantPlan
from qconv.report.build import build_report
from qconv.report.gates import evaluate_gates
from qconv.report.write import check_report_paths
from qconv.tune.budget import TuneOptions
from qconv.tune.speed import speed_fallback
from qconv.tune.tuner import TuneJob, tune


@dataclass(kw_only=True)
class QuantizeJob:
    out: Path
    planning: PlanJob  # how the plan is made (when no --plan file is given)
    plan_file: Path | None = None
    evaluation: EvalOptions = field(default_factory=EvalOptions)
    gates: Thresholds = field(default_factory=Thresholds)
    reports: tuple = ()
    speed_fallback: bool = False  # keep float the nodes the profile shows slower in int8, if the model then measures faster
    tune: TuneOptions | None = None  # search the overrides for a model that meets the targets (see qconv.tune)
    write_plan: Path | None = None  # also write the plan the model was made from (with tuning's overrides)
    @property
    def model(self) -> Path:
        return self.planning.model

    @functools.cached_property
    def _input_ops(self) -> dict:
        """Op counts of the input when the options ask for a QOperator form with nothing to plan from (else {})."""
        wants_fold = (self.plan_file is None and self.planning.calib is None and self.planning.data is None
                      and self.planning.config.mode == "int8" and self.planning.config.format == "qoperator")
        return io.op_counts(self.model) if wants_fold else {}

    @property
    def converting(self) -> bool:
        """A QDQ model given with --format qoperator alone: its pairs are folded into QLinear ops, nothing planned."""
        return pipeline.is_qdq(self._input_ops)

    def check(self) -> None:
        """Validate the options together, before any work (reads nothing but the input's op counts; writes nothing)."""
        e = self.evaluation
        if not self.converting and pipeline.quantized_ops_of(self._input_ops):
            found = ", ".join(f"{c} {op}" for op, c in pipeline.quantized_ops_of(self._input_ops).items())
            raise QconvError(f"{self.model} has no QuantizeLinear/DequantizeLinear pairs to convert ({found}): "
                             "it is in QOperator (or integer) form already")
        self.planning.check(self.plan_file is not None or self.converting)
        if self.plan_file is not None and (self.planning.overrides is not None):
            raise UsageError("--plan already holds its overrides: edit them in the plan file and drop --overrides")
        if e.labels is not None and e.data is None:
            raise UsageError("--eval-labels needs --eval-data (labels must match the evaluated rows)")
        has_eval = self.eval_path is not None
        if self.speed_fallback and not (has_eval and e.latency):
            raise UsageError("--speed-fallback measures the model: it needs evaluation data (--eval-data or --data) and latency (drop --no-latency)")
        if self.tune is not None:
            self._check_tune()
        self.gates.check_options(e.labels is not None, e.latency and has_eval, has_eval, e.metric is not None)
        if e.metric is not None and not has_eval:
            raise UsageError("--metric scores the model on evaluation rows: give --eval-data or --data")
        usermetric.load(e.metric)  # a bad --metric fails before any work
        check_report_paths(self.reports, self.model)
        io.check_output_path(self.out, self.model, self.planning.calib, self.planning.data, e.data, self.plan_file)
        if self.write_plan is not None:
            io.check_output_path(self.write_plan, self.model, self.planning.calib, self.planning.data, e.data, self.plan_file, self.out)

    def _check_tune(self) -> None:
        mode = self.planning.config.mode
        if self.plan_file is not None:
            raise UsageError("--tune searches the plan: drop --plan (or apply the tuned plan later with --plan)")
        if not self.planning.config.needs_calibration:
            raise UsageError(f"--tune searches ranges, int16 islands and float fallbacks of the static modes: --mode {mode} has none "
                             "(use --mode int8 or a16w8, or --exclude-nodes for this mode)")
        if self.speed_fallback:
            raise UsageError("--tune already weighs speed (it keeps float the nodes slower in int8 when that measures faster): drop --speed-fallback")
        if self.evaluation.data is None:
            if self.planning.data is None:
                raise UsageError("--tune measures candidates: give --eval-data (with --calib), or --data to hold part of it out")
            if distributed.parse_executor(self.planning.calib_options.executor).distributed or self.planning.calib_options.shards:
                raise UsageError("--tune without --eval-data holds out part of --data, which --executor/--shards cannot: give --eval-data")

    @property
    def eval_path(self) -> Path | None:
        return self.evaluation.data or self.planning.data


# Without --eval-data, quantize --data evaluates on the calibration rows it was made from (in-sample: how far the
# written model is from the float one, not how it generalizes); the first rows suffice for that, and the whole set would
# double the command's time (PP-OCRv4 rec, 400 lines: one float and one int8 pass more). --eval-data DATA for all.
IN_SAMPLE_ROWS = 64


def _make_plan(job: QuantizeJob, prepared: pipeline.Prepared, stored: QuantPlan | None, progress):
    """(plan, calibration or None): planned now, or the stored plan (planned again if its overrides were edited)."""
    pj = job.planning
    if stored is None:
        overrides = load_overrides(pj.overrides)
        calib = statistics(pj, prepared, overrides, progress)
        config = with_file_ranges(pj, prepared, calib, pj.effective(*recorded(calib)))
        time_kernels(pj, prepared, calib, config)
        return adjusted(pj, prepared, pipeline.plan(prepared, calib, config, overrides), progress, calib), calib
    check_plan_model(stored, job.plan_file, prepared, pj.force_calib)
    calib = pipeline.load_calibration(pj.calib, prepared, pj.force_calib) if pj.calib is not None else None
    if not stored.stale:
        return stored, calib
    return pipeline.replan(prepared, stored, calib, f"plan file {job.plan_file}"), calib


@clock.recorded
def run_quantize(job: QuantizeJob, progress=pipeline.no_progress) -> tuple[dict, pipeline.Result]:
    """Plan (or read a plan), rewrite, evaluate, write the model and reports. Nothing is written on error. The report's
    ``cost`` is what this run took (qconv.clock)."""
    job.check()
    if job.plan_file is None and job.planning.data is not None:  # calibration shards, if any, start while this prepares
        distributed.start_early(job.planning.calib_options.executor)
    labels = load_labels(job.evaluation.labels)
    stored = read_plan(job.plan_file) if job.plan_file is not None else None
    prepared = pipeline.load(job.model, stored.config if stored is not None else job.planning.config)
    if stored is not None and stored.source.get("equalization"):
        pipeline.equalize_gated(prepared, None, scales=stored.source["equalization"])
    if stored is not None and stored.source.get("smoothing"):
        pipeline.smooth_recorded(prepared, stored.source["smoothing"])
    if job.converting:
        return _run_conversion(job, prepared, labels, progress)
    pipeline.check_float(prepared)
    if job.tune is not None:
        return _run_tuned(job, prepared, labels, progress)
    eval_path = job.eval_path
    o = job.planning.calib_options
    in_sample = job.evaluation.data is None and job.planning.data is not None
    limit = min(IN_SAMPLE_ROWS, o.samples or IN_SAMPLE_ROWS) if in_sample else None
    eval_source = pipeline.feeds_for(prepared, eval_path, o.batch_size, limit, cast=o.cast_data) if eval_path else None
    plan, calib = _make_plan(job, prepared, stored, progress)
    calib_feeds = None
    if plan.config.mode == "int4" and job.planning.data is not None:
        calib_feeds = pipeline.feeds_for(prepared, job.planning.data, o.batch_size, o.samples, cast=o.cast_data)
    first = eval_source or (pipeline.feeds_for(prepared, job.planning.data, o.batch_size, cast=o.cast_data) if job.planning.data else None)
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
        evaluation["in_sample"] = in_sample
    report = _save_and_report(job, prepared, result, calib, evaluation, str(eval_path) if eval_path else None, notes)
    report["speed_fallback"] = fallback
    _write_plan(job, result.plan)
    return finish(report, job.gates, job.reports), result


def _save_and_report(job: QuantizeJob, prepared: pipeline.Prepared, result: pipeline.Result, calib, evaluation: dict | None,
                     eval_source: str | None, notes=()) -> dict:
    """Write the model and build its report (the caller adds gates and job-specific sections, then writes it)."""
    size_q = pipeline.save_quantized(result, job.out, prepared)
    return build_report(result.plan, prepared.model, result.model, input_path=str(prepared.path), output_path=str(job.out),
                        original_opset=ai_onnx_opset(prepared.original), intake=prepared.notes, findings=result.findings.to_dict(),
                        calib=calib, sizes=(io.model_size_bytes(job.model), size_q), evaluation=evaluation,
                        eval_source=eval_source, extra_warnings=list(notes))


def _write_plan(job: QuantizeJob, plan: QuantPlan) -> None:
    if job.write_plan is not None:
        io.write_json(plan.to_dict(), job.write_plan)


HOLDOUT = (4, 5)  # without --eval-data, tuning measures on every fifth feed of --data and calibrates on the rest


def _run_tuned(job: QuantizeJob, prepared: pipeline.Prepared, labels, progress) -> tuple[dict, pipeline.Result]:
    """Calibrate, search the overrides (qconv.tune), then write and report the best model found."""
    pj = job.planning
    if pj.calib_options.hist_samples is None:  # the search tries clipping methods, which read the histograms' tails
        pj = dataclasses.replace(pj, calib_options=dataclasses.replace(pj.calib_options, hist_samples=0))
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
    calib = statistics(pj, prepared, overrides, progress)
    time_kernels(pj, prepared, calib, pj.effective(*recorded(calib)))
    calib_source = None
    if pj.data is not None:
        calib_source = pipeline.feeds_for(prepared, pj.data, pj.calib_options.batch_size, cast=o.cast_data, skip=pj.holdout)
    config = pj.effective(*recorded(calib))
    tuned = tune(TuneJob(prepared=prepared, calib=calib, config=config, overrides=overrides, source=source,
                         labels=labels, gates=job.gates, options=job.tune, evaluation=job.evaluation, calib_source=calib_source,
                         correct=lambda plan: adjusted(pj, prepared, plan, progress, calib), corrects=adjusts(pj, config)), progress)
    result = tuned.result
    notes = damage_warnings(tuned.evaluation, prepared, result, calib, tuned.reference, job.evaluation.threads)
    report = _save_and_report(job, prepared, result, calib, tuned.evaluation, eval_label, notes)
    report["gate"] = evaluate_gates(dataclasses.replace(tuned.targets, max_size_mb=job.gates.max_size_mb), report)
    report["tuning"] = tuned.section(data_note, report["gate"])
    _write_plan(job, result.plan)
    return finish(report, job.gates, job.reports), result


def _run_conversion(job: QuantizeJob, prepared: pipeline.Prepared, labels, progress) -> tuple[dict, pipeline.Result]:
    """``quantize --format qoperator`` on a QDQ model: fold, check the outputs against the QDQ model, report."""
    # nothing is calibrated here: no range floors (the plan and the model record false, never the unresolved auto)
    result = pipeline.convert_qdq(prepared, dataclasses.replace(job.planning.config, floor_ranges=False))
    o = job.planning.calib_options
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
    return finish(report, job.gates, job.reports), result
