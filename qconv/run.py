"""The jobs the CLI runs, and the one place that wires the stages together.

``run_plan``     load -> calibrate (or read statistics) -> plan                      (``qconv plan``)
``run_quantize`` load -> calibrate / read statistics / read a plan -> plan -> apply -> evaluate -> report
``run_compare``  evaluate any two models on the same data -> report                   (``qconv report``)

The CLI only parses options into these dataclasses and renders what comes back.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from qconv import distributed, io, pipeline, runtime
from qconv.calib.collect import activation_tensors
from qconv.planner import calibration_targets
from qconv.calib.observers import DEFAULT_BINS, DEFAULT_MOMENTUM
from qconv.calib.ranges import METHODS
from qconv.config import QuantConfig
from qconv.data import FeedSource, InputSpec
from qconv.errors import QconvError, UsageError
from qconv.data import feed_rows
from qconv.graph import Graph, ai_onnx_opset, expose
from qconv.overrides import NodeOverride, Overrides
from qconv.plan import QuantPlan
from qconv.report import evaluate as ev
from qconv.report.build import build_comparison_report, build_report
from qconv.report.gates import Gates, evaluate_gates
from qconv.report.metrics import ErrorStats
from qconv.report.layers import dequantized_of, probe_pairs
from qconv.report.write import check_report_paths, write_reports

DAMAGE_COSINE = 0.9  # below this output cosine (or top-1 agreement) the model is damaged: say so loudly
ALTERNATIVE_ROWS = 16  # rows on which other range methods are measured when a model is damaged


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


@dataclass(frozen=True)
class EvalOptions:
    """What the report measures."""

    data: Path | None = None
    labels: Path | None = None
    latency: bool = True
    layer_samples: int = ev.DEFAULT_LAYER_SAMPLES  # 0: no per-layer analysis
    threads: int | None = None
    profile: bool = True  # with latency: per-node kernel times of both models
    executor: str | None = None  # the output comparison as shard tasks on Dask (see qconv.distributed)
    shards: int | None = None


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

    def check(self, plan_file: bool = False) -> None:
        """With a plan file the mode is the plan's: --calib then only serves method overrides, --data evaluation."""
        self.calib_options.check()
        config = self.config
        if plan_file:
            return
        if config.needs_calibration:
            if (self.calib is None) == (self.data is None):
                raise UsageError(f"--mode {config.mode} needs calibration: give exactly one of --calib FILE or --data DATA")
        elif self.calib is not None:
            raise UsageError(f"--mode {config.mode} takes no calibration file: drop --calib (--data, if given, is used for evaluation"
                             f"{' and GPTQ' if config.mode == 'int4' else ''})")

    def effective(self, recorded: dict | None) -> QuantConfig:
        """The config with the range method and percentile: from the options, else as calibration recorded them."""
        recorded = recorded or {}
        method = self.method or recorded.get("method", "minmax")
        pct = self.percentile if self.percentile is not None else float(recorded.get("percentile", 99.999))
        return dataclasses.replace(self.config, method=method, percentile=pct)


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
        return pipeline.load_calibration(job.calib, prepared, job.force_calib)
    o = job.calib_options
    source = pipeline.feeds_for(prepared, job.data, o.batch_size, o.samples, cast=o.cast_data)
    if distributed.parse_executor(o.executor).distributed or o.shards:
        names = calibration_targets(prepared.model, job.effective(None), activation_tensors(prepared.model), overrides)
        return sharded_calibration(prepared, job.data, source, names, job.config.per_channel, job.method or "minmax", o, progress)
    return pipeline.calibrate(prepared, source, o.threads, progress, job.method or "minmax", o.bins, o.momentum,
                              job.effective(None), overrides, o.max_memory)


def sharded_calibration(prepared: pipeline.Prepared, data: Path, source: FeedSource, names: list[str], per_channel: bool,
                        method: str, o: CalibOptions, progress):
    """Calibration of ``names`` as shard tasks on the executor, merged in shard order (see qconv.distributed)."""
    from qconv.calib.store import Calibration, merge_tensors

    executor = distributed.parse_executor(o.executor)
    shards = o.shards or distributed.DEFAULT_SHARDS
    data_id = source.identity()  # once, here: workers never hash the data
    tasks = [(str(prepared.path), str(data), per_channel, o.batch_size, (k, shards), o.bins, o.momentum, names, o.max_memory,
              o.cast_data) for k in range(shards)]
    parts = distributed.run_tasks(executor, distributed.calibrate_shard, tasks, "calibrating shards", progress)
    seen = sum(p["seen"] for p in parts)
    if seen == 0:
        raise QconvError("no calibration samples: the data set is empty")
    observers = merge_tensors([p["tensors"] for p in parts])
    options = pipeline.calibration_options(source, method, o.bins, o.momentum)
    options["shards"] = shards
    options["tensors"] = "planned"
    return Calibration(prepared.model_id, data_id, seen, options, {n: observers[n] for n in names if n in observers})


def run_plan(job: PlanJob, progress=pipeline._no_progress) -> tuple[QuantPlan, pipeline.Prepared]:
    """The plan of ``job`` (``qconv plan``): nothing is rewritten."""
    job.check()
    overrides = load_overrides(job.overrides)
    prepared = pipeline.load(job.model, job.config)
    pipeline.check_float(prepared)
    calib = _statistics(job, prepared, overrides, progress)
    config = job.effective(calib.options if calib is not None else None)
    return pipeline.plan(prepared, calib, config, overrides), prepared


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
    gates: Gates = field(default_factory=Gates)
    reports: tuple = ()
    speed_fallback: bool = False  # keep float the nodes the profile shows slower in int8, if the model then measures faster
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
        self.gates.check_options(e.labels is not None, e.latency and has_eval, has_eval)
        check_report_paths(self.reports, self.model)
        io.check_output_path(self.out, self.model, self.plan.calib, self.plan.data, e.data, self.plan_file)

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
        return pipeline.plan(prepared, calib, config, overrides), calib
    check_plan_model(stored, job.plan_file, prepared, pj.force_calib)
    calib = pipeline.load_calibration(pj.calib, prepared, pj.force_calib) if pj.calib is not None else None
    if not stored.stale:
        return stored, calib
    return pipeline.replan(prepared, stored, calib, f"plan file {job.plan_file}"), calib


def run_quantize(job: QuantizeJob, progress=pipeline._no_progress) -> tuple[dict, pipeline.Result]:
    """Plan (or read a plan), rewrite, evaluate, write the model and reports. Nothing is written on error."""
    job.check()
    labels = load_labels(job.evaluation.labels)
    stored = read_plan(job.plan_file) if job.plan_file is not None else None
    prepared = pipeline.load(job.model, stored.config if stored is not None else job.plan.config)
    if job.converting:
        return _run_conversion(job, prepared, labels, progress)
    pipeline.check_float(prepared)
    eval_path = job.eval_path
    o = job.plan.calib_options
    eval_source = pipeline.feeds_for(prepared, eval_path, o.batch_size, cast=o.cast_data) if eval_path else None
    plan, calib = _make_plan(job, prepared, stored, progress)
    calib_feeds = None
    if plan.config.mode == "int4" and job.plan.data is not None:
        calib_feeds = pipeline.feeds_for(prepared, job.plan.data, o.batch_size, o.samples, cast=o.cast_data)
    result = pipeline.apply(prepared, plan, calib_feeds)
    first = eval_source or (pipeline.feeds_for(prepared, job.plan.data, o.batch_size, cast=o.cast_data) if job.plan.data else None)
    pipeline.check_runs(prepared, result.model, next(iter(first), None) if first is not None else None)
    evaluation, notes, fallback = None, [], None
    if eval_source is not None:
        evaluation, reference = evaluate(prepared, result, eval_source, labels, job.evaluation, progress)
        if job.speed_fallback:
            fallback, faster = speed_fallback(prepared, result, calib, evaluation, eval_source, job.evaluation)
            if faster is not None:
                result = faster
                evaluation, reference = evaluate(prepared, result, eval_source, labels, job.evaluation, progress)
        notes = damage_warnings(evaluation, prepared, result, calib, reference, job.evaluation.threads)
    plan = result.plan
    size_q = pipeline.save_quantized(result, job.out, prepared)
    report = build_report(plan, prepared.model, result.model, input_path=str(prepared.path), output_path=str(job.out),
                          original_opset=ai_onnx_opset(prepared.original), intake=prepared.notes, findings=result.findings,
                          calib=calib, sizes=(io.model_size_bytes(job.model), size_q), evaluation=evaluation,
                          eval_source=str(eval_path) if eval_path else None, extra_warnings=notes)
    if fallback is not None:
        report["speed_fallback"] = fallback
    if job.gates.any():
        report["gate"] = evaluate_gates(job.gates, report)
    write_reports(report, job.reports)
    return report, result


def _run_conversion(job: QuantizeJob, prepared: pipeline.Prepared, labels, progress) -> tuple[dict, pipeline.Result]:
    """``quantize --format qoperator`` on a QDQ model: fold, check the outputs against the QDQ model, report."""
    result = pipeline.convert_qdq(prepared, job.plan.config)
    o = job.plan.calib_options
    source = pipeline.feeds_for(prepared, job.evaluation.data, o.batch_size, cast=o.cast_data) if job.evaluation.data else None
    feed = next(iter(source), None) if source is not None else pipeline._synthetic_feed(prepared)
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
    size_q = pipeline.save_quantized(result, job.out, prepared)
    report = build_report(result.plan, prepared.model, result.model, input_path=str(prepared.path), output_path=str(job.out),
                          original_opset=ai_onnx_opset(prepared.original), intake=prepared.notes, findings=result.findings,
                          calib=None, sizes=(io.model_size_bytes(job.model), size_q), evaluation=evaluation,
                          eval_source=str(job.evaluation.data) if job.evaluation.data else None)
    if job.gates.any():
        report["gate"] = evaluate_gates(job.gates, report)
    write_reports(report, job.reports)
    return report, result


def speed_fallback(prepared: pipeline.Prepared, result: pipeline.Result, calib, evaluation: dict, source: FeedSource,
                   opts: EvalOptions) -> tuple[dict, pipeline.Result | None]:
    """Keep float the nodes the profile shows slower in int8, rewrite, and time both int8 models A/B: the new one
    is taken only when the whole interval says it is faster. Returns (what was tried, the faster result or None).
    The decisions become float overrides in the plan, so ``--plan`` reproduces the chosen model exactly."""
    slow = [r["node"] for r in (evaluation.get("profile") or {}).get("slower_in_int8", [])]
    if not slow:
        return {"tried": [], "taken": False, "reason": "no node is slower in int8 than in float on this CPU"}, None
    extra = Overrides({n: NodeOverride(precision="float") for n in slow}, {})
    stored = result.plan
    merged = stored.overrides.merged(extra)
    if calib is not None or not stored.config.needs_calibration:
        candidate_plan = pipeline.plan(prepared, calib, stored.config, merged)
    else:
        candidate_plan = pipeline.replan(prepared, dataclasses.replace(stored, overrides=merged), None)
    candidate = pipeline.apply(prepared, candidate_plan)
    threads = opts.threads or runtime.default_threads()
    timing = ev.latency(runtime.session(result.model, threads, spinning=False),
                        runtime.session(candidate.model, threads, spinning=False), next(iter(source)), threads)
    taken = timing["verdict"] == "faster"
    record = {"tried": slow, "taken": taken, "ratio": timing["ratio"], "ratio_low": timing["ratio_low"],
              "ratio_high": timing["ratio_high"], "runs": timing["runs"],
              "reason": "measured faster with these nodes float" if taken else f"not measurably faster ({timing['verdict']})"}
    return record, candidate if taken else None


def evaluate(prepared: pipeline.Prepared, result: pipeline.Result, source: FeedSource, labels, opts: EvalOptions,
             progress=pipeline._no_progress) -> tuple[dict, ev.Reference]:
    """Fidelity of the written model against the original file, latency, and per-layer error on a sample."""
    qtypes = None
    if result.plan.config.needs_calibration:  # the QDQ analysis model: known types, no shape inference
        ftypes = Graph(prepared.model).types
        qtypes = {**ftypes, **{dq: onnx.TensorProto.FLOAT for dq in result.dequantized.values()}}
    io = result.findings.get("quantized_io")
    out, reference = _evaluate_models(str(prepared.path), result.model, prepared.model, result.analysis_model,
                                      result.dequantized, source, labels, opts, progress, qtypes, io)
    if opts.latency and opts.profile and not io:
        out["profile"] = node_profile(prepared, result, next(iter(source)), opts.threads or runtime.default_threads())
    return out, reference


def _sharded_outputs(float_src, quant_src, source: FeedSource, labels, opts: EvalOptions, io_params, progress) -> dict:
    """compare_outputs as shard tasks: error sums merged in shard order, predictions scored in feed order."""
    import tempfile

    executor = distributed.parse_executor(opts.executor)
    shards = opts.shards or distributed.DEFAULT_SHARDS
    with tempfile.TemporaryDirectory(prefix="qconv-eval.") as tmp:
        paths = []
        for k, src in enumerate((float_src, quant_src)):  # workers load models from paths, never from shipped bytes
            if isinstance(src, onnx.ModelProto):
                p = Path(tmp) / f"model{k}.onnx"
                io.save_model(src, p)
                src = str(p)
            paths.append(str(src))
        tasks = [(paths[0], paths[1], str(source.path), source.specs, source.batch_size, (k, shards), source.cast, io_params,
                  labels is not None) for k in range(shards)]
        parts = distributed.run_tasks(executor, distributed.evaluate_shard, tasks, "evaluating shards", progress)
    names = list(parts[0]["stats"])
    stats = {n: ev.ErrorStats() for n in names}
    for p in parts:
        for n in names:
            stats[n].merge(p["stats"][n])
    agree, total = sum(p["agree"] for p in parts), sum(p["total"] for p in parts)
    batches, rows = sum(p["batches"] for p in parts), sum(p["rows"] for p in parts)
    if batches == 0:
        raise QconvError("evaluation data set is empty")
    correct_f = correct_q = seen = 0
    if labels is not None:
        preds = sorted((x for p in parts for x in p["preds"]), key=lambda x: x[0])
        pf = np.concatenate([x[1] for x in preds])
        pq = np.concatenate([x[2] for x in preds])
        if pf.size != labels.size:
            raise QconvError(f"--eval-labels has {labels.size} labels but the eval data has {pf.size} rows; give one label per row")
        correct_f, correct_q, seen = int((pf == labels).sum()), int((pq == labels).sum()), int(pf.size)
    out = ev._summary(names, stats, agree, total, labels, correct_f, correct_q, seen, batches)
    out["rows"] = rows
    return out


def node_profile(prepared: pipeline.Prepared, result: pipeline.Result, feed: dict, threads: int) -> dict:
    """Per-node kernel times of the float and the written model (onnxruntime's profiler) on one feed."""
    from qconv.report import profile as prof

    plan = result.plan
    ft = prof.attribute(prof.profile(prepared.model, feed, threads), prepared.model)
    qt = prof.attribute(prof.profile(result.model, feed, threads), prepared.model)
    for t in ft + qt:  # onnxruntime fuses Conv+Relu under the Relu's output name; qconv folded that Relu into the Conv
        t.node = plan.folded.get(t.node, t.node)
    quantized = {n.name for n in plan.nodes if n.quantized and n.name not in plan.folded}
    ops = {n.name: n.op_type for n in prepared.model.graph.node}
    return prof.compare(ft, qt, quantized, ops)


def _evaluate_models(float_src, quant_src, float_layers, quant_layers, dequantized, source: FeedSource, labels,
                     opts: EvalOptions, progress, qtypes=None, io: dict | None = None) -> tuple[dict, ev.Reference]:
    """``io``: integer-I/O parameters of the quantized model; its inputs are quantized and outputs dequantized here."""
    threads = opts.threads or runtime.default_threads()
    fsess = runtime.session(float_src, threads, spinning=False)
    qsess = runtime.session(quant_src, threads, spinning=False)
    if io:
        from qconv.rewrite.quantized_io import IntegerIO

        qsess = IntegerIO(qsess, io)
    reference = ev.Reference([o.name for o in fsess.get_outputs()])
    if distributed.parse_executor(opts.executor).distributed or opts.shards:
        out = _sharded_outputs(float_src, quant_src, source, labels, opts, io, progress)
        for feed in ev.limited(source, source.specs, ALTERNATIVE_ROWS):  # the rows other candidates are measured on
            reference.keep(feed, runtime.run(fsess, feed, reference.names), 1, ALTERNATIVE_ROWS)
    else:
        out = ev.compare_outputs(fsess, qsess, source, labels, progress("evaluating", source.count()), reference,
                                 ALTERNATIVE_ROWS, source.specs)
    if opts.latency:
        out["latency_ms"] = ev.latency(fsess, qsess, next(iter(source)), threads)
    del fsess, qsess  # free their weights before the analysis sessions load theirs
    out["layer_rows"] = 0
    if opts.layer_samples > 0:
        ftypes = Graph(float_layers).types if qtypes is not None else None
        pairs = probe_pairs(float_layers, quant_layers, dequantized, ftypes, qtypes)
        if pairs:
            fl = runtime.session(expose(float_layers, {t: onnx.TensorProto.FLOAT for t in pairs}), threads)
            ql = runtime.session(expose(quant_layers, dict(pairs.values())), threads)
            feeds = list(ev.limited(source, source.specs, opts.layer_samples))
            out["layers"] = ev.compare_layers(fl, ql, feeds, {t: q for t, (q, _) in pairs.items()},
                                              progress("per-layer analysis", len(feeds)))
            out["layer_rows"] = sum(feed_rows(f, source.specs) for f in feeds)
    return out, reference


def damage_warnings(evaluation: dict, prepared, result: pipeline.Result, calib, reference: ev.Reference,
                    threads: int | None) -> list[str]:
    """A loud warning when the written model is damaged (output cosine or top-1 agreement below 0.9):
    the outputs hurt, the worst layers, and, for calibrated modes, which range method measures better."""
    outs = evaluation.get("outputs", {})
    bad = [(k, v["cosine"]) for k, v in outs.items() if v["cosine"] < DAMAGE_COSINE]
    agreement = evaluation.get("top1_agreement")
    classifier = bool(outs) and (evaluation.get("task") is not None or _rank(prepared.model) == 2)
    low_agreement = classifier and agreement is not None and agreement < DAMAGE_COSINE
    if not bad and not low_agreement:
        return []
    what = [f"output '{k}' cosine {c:.3f}" for k, c in bad]
    if low_agreement:
        what.append(f"top-1 agreement with the original {agreement:.3f}")
    msg = f"the quantized model is damaged: {', '.join(what)} (below {DAMAGE_COSINE})"
    layers = sorted(((t, v["sqnr_db"]) for t, v in evaluation.get("layers", {}).items() if isinstance(v["sqnr_db"], float)),
                    key=lambda kv: kv[1])[:3]
    if layers:
        msg += "; worst layers: " + ", ".join(f"{t} ({db:.1f} dB)" for t, db in layers)
    if result.plan.config.needs_calibration and calib is not None and reference.rows:
        msg += "; " + _better_method(prepared, result, calib, reference, threads)
    return [msg]


def _rank(model: onnx.ModelProto) -> int:
    t = model.graph.output[0].type.tensor_type if model.graph.output else None
    return len(t.shape.dim) if t is not None and t.HasField("shape") else 0


def _better_method(prepared, result: pipeline.Result, calib, reference: ev.Reference, threads) -> str:
    """Measure the other range methods on the reference rows; name the best if it beats the one used."""
    config = result.plan.config
    scores = {config.method: _worst_cosine(ev.compare_reference(reference, runtime.session(result.model, threads)))}
    for method in METHODS:
        if method == config.method:
            continue
        try:
            other = pipeline.quantize(prepared, calib, dataclasses.replace(config, method=method), overrides=result.plan.overrides)
        except QconvError:
            continue
        scores[method] = _worst_cosine(ev.compare_reference(reference, runtime.session(other.model, threads)))
    best = max(scores, key=lambda m: (scores[m], m == config.method))
    measured = ", ".join(f"{m} {c:.3f}" for m, c in sorted(scores.items(), key=lambda kv: -kv[1]))
    rows = reference.count
    if best != config.method:
        return f"--method {best} measured better on {rows} rows (worst-output cosine: {measured})"
    return f"no other range method measured better on {rows} rows ({measured}): keep the worst layers float with --exclude-nodes"


def _worst_cosine(summary: dict) -> float:
    return min((v["cosine"] for v in summary["outputs"].values()), default=1.0)


@dataclass
class CalibrateJob:
    """``qconv calibrate``: statistics of the tensors the default plan needs (or all, ``all_tensors``)."""

    model: Path
    data: Path
    out: Path
    shard: tuple[int, int] = (0, 1)
    per_tensor: bool = False
    all_tensors: bool = False
    method: str = "minmax"
    percentile: float | None = None
    options: CalibOptions = field(default_factory=CalibOptions)

    def check(self) -> None:
        QuantConfig(method=self.method, percentile=99.999 if self.percentile is None else self.percentile)  # validates
        self.options.check()
        if self.shard != (0, 1) and (distributed.parse_executor(self.options.executor).distributed or self.options.shards):
            raise UsageError("--shard K/N runs one shard by hand; --executor/--shards runs them all: give one of them")
        io.check_output_path(self.out, self.model, self.data)


def run_calibrate(job: CalibrateJob, progress=pipeline._no_progress):
    """The calibration written to ``job.out``, or None when the file there is already up to date."""
    from qconv.calib.store import Calibration

    job.check()
    config = QuantConfig(per_channel=not job.per_tensor)
    prepared = pipeline.load(job.model, config)
    o = job.options
    sharded = distributed.parse_executor(o.executor).distributed or o.shards
    source = pipeline.feeds_for(prepared, job.data, o.batch_size, o.samples, job.shard, o.cast_data)
    options = pipeline.calibration_options(source, job.method, o.bins, o.momentum)
    if sharded:
        options["shards"] = o.shards or distributed.DEFAULT_SHARDS
    options["tensors"] = "all" if job.all_tensors else "planned"
    if job.percentile is not None:
        options["percentile"] = job.percentile
    data_id = source.identity()
    if job.out.exists():
        try:
            old = Calibration.from_dict(io.read_json(job.out, "calibration file"))
        except QconvError:
            old = None
        if old and old.model_id == prepared.model_id and old.data_id == data_id and old.options == options:
            return None
    if sharded:
        names = activation_tensors(prepared.model)
        if not job.all_tensors:
            names = calibration_targets(prepared.model, config, names)
        calib = sharded_calibration(prepared, job.data, source, names, config.per_channel, job.method, o, progress)
    else:
        calib = pipeline.calibrate(prepared, source, o.threads, progress, job.method, o.bins, o.momentum,
                                   None if job.all_tensors else config, None, o.max_memory)
    calib.options = options
    io.write_json(calib.to_dict(), job.out)
    return calib


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

    method = method or calib.options.get("method", "minmax")
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
    from qconv.planner import build_plan

    config = QuantConfig(per_channel=not per_tensor)
    prepared = pipeline.load(model_path, config)
    sess = runtime.session(prepared.model, threads=1, optimize=False)
    if calib_path:
        calib = pipeline.load_calibration(calib_path, prepared)
        ranges, nonfinite, masks = calib.ranges(), calib.nonfinite(), calib.mask_like()
    else:  # structure only: every activation assumed to have a usable range
        ranges, nonfinite, masks = {n: (0.0, 1.0) for n in activation_tensors(prepared.model)}, {}, {}
    plan = build_plan(prepared.model, ranges, config, nonfinite, masks)
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
        "quantized_io": next((json.loads(m.value) for m in prepared.original.metadata_props if m.key == "qconv.quantized_io"), None),
        "ranges_checked": bool(calib_path),
        "size_bytes": io.model_size_bytes(model_path),
    }


@dataclass
class CompareJob:
    original: Path
    quantized: Path
    data: Path
    evaluation: EvalOptions = field(default_factory=EvalOptions)
    batch_size: int = 1
    gates: Gates = field(default_factory=Gates)
    reports: tuple = ()
    cast_data: bool = False

    def check(self) -> None:
        distributed.parse_executor(self.evaluation.executor)
        self.gates.check_options(self.evaluation.labels is not None, self.evaluation.latency, True)
        check_report_paths(self.reports, self.original, self.quantized, self.data)


def run_compare(job: CompareJob, progress=pipeline._no_progress) -> dict:
    """Compare any two models on the same data: outputs, task accuracy, latency and every shared tensor."""
    job.check()
    original, quantized = io.load_model(job.original), io.load_model(job.quantized)
    labels = load_labels(job.evaluation.labels)
    initializers = {t.name for t in original.graph.initializer}
    specs = [InputSpec.from_value_info(i) for i in original.graph.input if i.name not in initializers]
    source = FeedSource(job.data, specs, batch_size=job.batch_size, cast=job.cast_data)
    io_params = next((json.loads(m.value) for m in quantized.metadata_props if m.key == "qconv.quantized_io"), None)
    evaluation, _ = _evaluate_models(str(job.original), str(job.quantized), original, quantized, dequantized_of(quantized),
                                     source, labels, job.evaluation, progress, io=io_params)
    report = build_comparison_report(str(job.original), str(job.quantized), original, quantized, evaluation, str(job.data))
    if job.gates.any():
        report["gate"] = evaluate_gates(job.gates, report)
    write_reports(report, job.reports)
    return report
