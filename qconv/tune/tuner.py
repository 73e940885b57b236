"""``tune``: one call from the quantize job: hold rows, search, rewrite the best plan, evaluate it, then speed rounds
while it misses its latency target. Returns the model and the report's "tuning" section as one value."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx

from qconv import __version__, clock, pipeline, runtime
from qconv.calib.store import Ranges
from qconv.data import FeedSource, feed_rows
from qconv.measure.slices import concat_parts, output_slices
from qconv.measure.tally import Tally
from qconv.measure.evaluate import EvalOptions, evaluate
from qconv.measure.latency import BUDGET_S as LATENCY_BUDGET_S
from qconv.measure import usermetric
from qconv.measure.reference import Reference, hold
from qconv.measure.thresholds import Thresholds
from qconv.plan import QuantPlan
from qconv.plan.overrides import Overrides
from qconv.tune.budget import Clock, TuneOptions
from qconv.tune.lab import Lab
from qconv.tune.remedies import Context
from qconv.tune.search import Search
from qconv.tune.speed import SPEED_ROUNDS, speed_round
from qconv.tune.trial import Change, Trial, TrialCache, cache_dir


@dataclass(frozen=True, kw_only=True)
class TuneJob:
    prepared: pipeline.Prepared
    calib: object  # the Calibration the candidates are planned from
    config: object  # QuantConfig (the range method is where the search starts)
    overrides: Overrides
    source: FeedSource  # rows the trials are measured on (never calibrated on)
    labels: np.ndarray | None
    gates: Thresholds
    options: TuneOptions
    evaluation: EvalOptions
    calib_source: FeedSource | None = None  # calibration rows, for per-channel statistics
    correct: Callable[[QuantPlan], QuantPlan] = lambda plan: plan  # bias correction of the final plan, when asked for
    corrects: bool = False  # whether ``correct`` measures anything (its time is kept out of the search's budget)


@dataclass
class Tuned:
    result: pipeline.Result
    evaluation: dict
    reference: Reference
    method: str
    targets: Thresholds
    default_targets: bool
    search: Search
    held_rows: int
    speed: list
    unseen: dict
    after: dict  # what follows the search: the seconds kept for it (estimated before the search) and those it took

    def section(self, data_note: str, gate: dict) -> dict:
        """The report's "tuning" section: targets, budget, every trial, what changed and why."""
        s = self.search
        base = s.trials[0].metrics if s.trials else None
        accepted = [t for t in s.trials if t.accepted]
        return {"targets": {**self.targets.to_dict(), "default": self.default_targets}, "budget": s.clock.budget.describe(),
                "rows": self.held_rows, "data": data_note, "seconds": round(s.clock.seconds(), 2),
                "trials": [t.to_dict() for t in s.trials], "cached_trials": sum(t.cached for t in s.trials),
                "cut_trials": sum(t.share is not None and t.share < 1.0 for t in s.trials),
                "cache": str(s.cache.path) if s.cache.path else None, "method": self.method,
                "changes": [c.to_dict() for c in s.changes], "sensitivity": [r.to_dict() for r in s.sensitivity[:24]],
                "baseline": base.to_dict() if base else {},
                "best": (accepted[-1].metrics.to_dict() if accepted[-1].metrics else {}) if accepted else None,
                "speed": self.speed, "speed_guard": s.speed.record, "unseen": self.unseen, "after_search": self.after,
                "reached": bool(gate["passed"]), "missed": gate["failed"]}


@clock.timed("tuning")
def tune(job: TuneJob, progress=pipeline.no_progress) -> Tuned:
    prepared, o = job.prepared, job.options
    targets, default = Thresholds.tuning(job.gates, job.evaluation.latency)
    threads = job.evaluation.threads or runtime.default_threads()
    fsess = runtime.session(prepared.model, threads, spinning=False)
    held = hold(fsess, job.source, job.labels, o.rows)
    held.slices = _slices(prepared.model, held, threads)
    held.metric = usermetric.load(job.evaluation.metric)
    ident = _identity(job, held)
    cache = TrialCache(cache_dir(o.cache_dir) / f"{prepared.model_id[:16]}-{ident[:16]}.json")
    ctx = Context(prepared.model, Ranges.of(job.calib), job.config, held, threads, job.calib_source)
    # Time kept for what follows the search, estimated from the float model's time on the held rows (after_search);
    # and, as the search goes, three of its trials (the two models the unseen rows compare, the final rewrite). A time
    # budget is a hard limit.
    estimate = after_search(job, held)
    clock = Clock(o.budget, reserve=reserved(estimate, o.budget), after_trials=AFTER_TRIALS)
    lab = Lab(prepared, ctx, cache, ident)
    search = Search(lab, targets, clock, cache, progress("tuning", o.budget.trials))
    method, overrides, best = search.run(job.config.method, job.overrides)
    search_s = clock.seconds()
    tuned = pipeline.plan(prepared, job.calib, dataclasses.replace(job.config, method=method), overrides)
    feed = pipeline.check_feed(prepared, next(iter(job.source), None))
    # The search's choices against the plan as given, both as the trials measured them (no bias correction), on
    # rows the search never saw; then the final model, with bias correction as the default has it.
    untuned = pipeline.plan(prepared, job.calib, job.config, job.overrides)
    unseen = _unseen(job, fsess, held, {"untuned": untuned, "tuned": tuned}, threads)
    if unseen.get("kept_as_given"):  # the search's choices lost decisions on rows it never saw: they are not taken
        tuned, method, best = untuned, job.config.method, search.trials[0]
        search.changes = [Change("the whole plan", "kept as given", unseen["warning"])]
    result = pipeline.apply(prepared, _corrected_if_better(search, lab, tuned, best, job.correct(copy.deepcopy(tuned))), None, feed)
    evaluation, reference = evaluate(prepared, result, job.source, job.labels, job.evaluation, progress)
    speed = []
    # a speed round: a trial, a rewrite and an A/B timing, then the evaluation again
    round_s = estimate["latency"] + estimate["evaluation"] + estimate["profile"] + LATENCY_BUDGET_S + 2.0 * held.float_seconds
    for _ in range(SPEED_ROUNDS):  # each round keeps float the nodes the new profile shows slower in int8
        lat = evaluation.get("latency_ms") or {}
        if targets.max_latency_ratio is None or not lat or lat["ratio"] <= targets.max_latency_ratio:
            break
        if not clock.fits(round_s):
            speed.append({"tried": [], "taken": False, "reason": f"no time left in the budget for a speed round (about {round_s:.0f} s)"})
            break
        record, faster = speed_round(search, prepared, result, job.calib, evaluation, job.source, job.evaluation.threads, method)
        speed.append(record)
        if faster is None:
            break
        result = faster
        evaluation, reference = evaluate(prepared, result, job.source, job.labels, job.evaluation, progress)
    after = {"estimated_s": {k: round(v, 1) for k, v in estimate.items()}, "reserved_s": round(clock.reserve, 1),
             "search_s": round(search_s, 1), "took_s": round(clock.seconds() - search_s, 1)}
    if sum(estimate.values()) > clock.reserve:
        after["note"] = (f"the steps after the search were estimated at {sum(estimate.values()):.0f} s, more than "
                         f"{RESERVE_SHARE:.0%} of the budget: the search kept the rest, and the run may end past the budget")
    return Tuned(result, evaluation, reference, method, targets, default, search, held.rows, speed, unseen, after)


UNSEEN_ROWS = 256
AFTER_TRIALS = 3  # trial-sized steps after the search: the unseen rows' two models, the final rewrite
# The default's steps on calibration rows (job.correct: range floors, output-aware ranges searched and checked, bias
# correction checked) as (rows, float-model passes over them): each check runs the float model and two int8 models.
# Measured against the float model's time per row: PicoDet (64 pages) 19 s = 290 rows, the text detector 292 rows.
CORRECT_PASSES = ((pipeline.FLOORS_CHECK_ROWS, 3), (pipeline.clip.MAX_ROWS, 3), (pipeline.RANGES_CHECK_ROWS, 3),
                  (pipeline.BIAS_CHECK_ROWS, 3))
RESERVE_SHARE = 0.6  # of a time budget at most: the search keeps the rest, and the run says when the estimate was larger


def after_search(job: TuneJob, held: Reference) -> dict[str, float]:
    """Seconds of what follows the search, estimated from the float model's time on the held rows before it starts: the
    default's steps on the calibration rows (``job.correct``), the unseen rows (float, untuned and tuned), the
    evaluation of the written model (float and int8 over the evaluation rows, per-layer analysis), its latency A/B and
    node profile. The first estimate kept four float passes over the held rows: PicoDet's tuning ended 21 s past a 180
    s budget (the steps on calibration rows alone took 19 s, the evaluation with its A/B timing and profile 17 s)."""
    per_row = held.float_seconds / max(held.rows, 1)
    per_feed = held.float_seconds / max(len(held.feeds), 1)
    calib = job.calib_source
    calib_rows = calib.count() * max(1, calib.batch_size) if job.corrects and calib is not None else 0
    eval_rows = job.source.count() * max(1, job.source.batch_size)
    ev = job.evaluation
    return {"corrections": per_row * sum(passes * min(calib_rows, rows) for rows, passes in CORRECT_PASSES),
            "unseen rows": per_row * 3 * min(max(eval_rows - held.rows, 0), UNSEEN_ROWS),
            "evaluation": per_row * (2 * eval_rows + 4 * min(eval_rows, ev.layer_samples)),
            "latency": LATENCY_BUDGET_S + 12 * per_feed if ev.latency else 0.0,
            "profile": 44 * per_feed + 1.0 if ev.latency and ev.profile else 0.0}


def reserved(estimate: dict[str, float], budget) -> float:
    """The seconds a time budget keeps for what follows the search: the estimate, at most RESERVE_SHARE of it."""
    total = sum(estimate.values())
    return min(total, RESERVE_SHARE * budget.seconds) if budget.seconds else total


def _corrected_if_better(search: Search, lab: Lab, plain, best: Trial, corrected):
    """The chosen plan with its weight steps (learned rounding, bias correction: ``job.correct``) only when that
    measures at least as well on the held rows as the plan without them (``best``, the search's trial of it) and keeps
    the decisions: a step measured on calibration rows is a change like any other, measured, not assumed."""
    rounded = (corrected.source.get("rounding") or {}).get("layers_changed", 0)
    if not (corrected.corrections or rounded) or best.metrics is None:
        return plain
    steps = ([f"learned rounding ({rounded} layers)"] if rounded else []) + \
        ([f"bias correction ({len(corrected.corrections)} layers)"] if corrected.corrections else [])
    what = " and ".join(steps)
    t0 = time.perf_counter()
    base, m = best.metrics, lab.measure_plan(corrected)
    lost = search.decisions_lost(m, base)
    ok = search.targets.key(m) <= search.targets.key(base) and not lost
    step = "weight steps" if rounded else "bias correction"
    t = Trial(len(search.trials) + 1, step, f"{what} on the chosen plan",
              corrected.overrides, m, time.perf_counter() - t0, False, accepted=ok,
              note=None if ok else f"refused: worst cosine {m.worst_cosine:.5f} vs {base.worst_cosine:.5f} without it"
              + (f"; {lost}" if lost else ""))
    search.trials.append(t)
    if ok:
        search.changes.append(Change("all adjusted layers" if rounded else "all corrected layers", what if rounded else step,
                                     f"measured on the tuning rows: worst cosine "
                                     f"{m.worst_cosine:.6f} (without it {base.worst_cosine:.6f})"))
    return corrected if ok else plain


def _unseen(job: TuneJob, fsess, held: Reference, plans: dict, threads: int) -> dict:
    """The untuned and the tuned plan (as the trials measure them: no bias correction) on rows of the source the search
    never measured (after the held ones, at most ``UNSEEN_ROWS``): what its choices are worth on data it did not
    choose on. Nothing is rewritten when there are no such rows."""
    if job.source.count() <= len(held.feeds):
        return {"rows": 0, "note": "every row of the tuning data was used by the search: give --eval-data with more rows"}
    sessions = {k: runtime.session(pipeline.apply(job.prepared, p, check=False).model, threads, spinning=False) for k, p in plans.items()}
    tallies = {k: Tally(held.names, slices=held.slices, objective=True, metric=held.metric) for k in plans}
    rows = 0
    for k, feed in enumerate(job.source):
        if k < len(held.feeds):
            continue
        if rows >= UNSEEN_ROWS:
            break
        ref = runtime.run(fsess, feed, held.names)
        for name, sess in sessions.items():
            tallies[name].add(ref, runtime.run(sess, feed, held.names))
        rows += feed_rows(feed, job.source.specs)
    if not rows:
        return {"rows": 0, "note": "every row of the tuning data was used by the search: give --eval-data with more rows"}
    out = {"rows": rows, **{k: t.metrics().to_dict() for k, t in tallies.items()}}
    return unseen_verdict(out, rows)


def unseen_verdict(out: dict, rows: int) -> dict:
    """``out`` (the untuned and tuned metrics on rows the search never saw) with a warning where tuned is lower, and
    ``kept_as_given`` where it decides worse (the user's metric, top-1 agreement, scores passing 0.25): then the tuned
    choices are not taken."""
    lost = [k for k in ("metric", "agreement", "passing", "slice_cosine", "cosine")
            if out["untuned"].get(k) is not None and (out["tuned"].get(k) or 0.0) < out["untuned"][k]]
    decisive = [k for k in lost if k in ("metric", "agreement", "passing")]
    if decisive:
        out["kept_as_given"] = True
        out["warning"] = (f"on {rows} rows the search never saw, the tuned plan decides worse than the plan as given "
                          f"({', '.join(decisive)}): the plan as given is kept (raise --tune-rows, or give --eval-data with more rows)")
    elif lost:
        out["warning"] = (f"on {rows} rows the search never saw, the tuned model is below the untuned one in {', '.join(lost)}: "
                          "the search rows may be too few to choose on (raise --tune-rows)")
    return out


def _slices(model, held: Reference, threads: int) -> dict:
    """The parts of the concatenated outputs, with the sizes the graph does not give measured on one held feed."""
    parts = concat_parts(model)
    slices = output_slices(model)
    missing = [p for p, (out, _) in parts.items() if out not in slices]
    if not missing:
        return slices
    sess = runtime.exposed_session(model, {p: onnx.TensorProto.FLOAT for p in missing}, threads)
    sizes = {}
    for p, v in zip(missing, runtime.run(sess, held.feeds[0], missing)):
        axis = parts[p][1]
        if isinstance(v, np.ndarray) and v.ndim:
            sizes[p] = int(v.shape[axis])
    return output_slices(model, sizes)


def _identity(job: TuneJob, held: Reference) -> str:
    """What every trial's result depends on besides its candidate: the trial cache's key prefix."""
    ident = json.dumps({"qconv": __version__, "model": job.prepared.model_id, "calib": pipeline.calibration_identity(job.calib),
                        "data": job.source.identity(), "rows": held.rows,
                        "labels": None if held.labels is None else hashlib.sha256(held.labels.tobytes()).hexdigest(),
                        **({"metric": job.evaluation.metric} if job.evaluation.metric else {}),
                        "config": dataclasses.replace(job.config, method="minmax").to_dict()}, sort_keys=True, default=str)
    return hashlib.sha256(ident.encode()).hexdigest()
