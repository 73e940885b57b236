"""``tune``: one call from the quantize job: hold rows, search, rewrite the best plan, evaluate it, then speed rounds
while it misses its latency target. Returns the model and the report's "tuning" section as one value."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Callable

import numpy as np

from qconv import __version__, pipeline, runtime
from qconv.calib.store import Ranges
from qconv.data import FeedSource
from qconv.measure.evaluate import EvalOptions, evaluate
from qconv.measure.reference import Reference, hold
from qconv.measure.thresholds import Thresholds
from qconv.plan import QuantPlan
from qconv.plan.overrides import Overrides
from qconv.tune.budget import Clock, TuneOptions
from qconv.tune.lab import Lab
from qconv.tune.remedies import Context
from qconv.tune.search import Search
from qconv.tune.speed import SPEED_ROUNDS, speed_round
from qconv.tune.trial import TrialCache, cache_dir


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

    def section(self, data_note: str, gate: dict) -> dict:
        """The report's "tuning" section: targets, budget, every trial, what changed and why."""
        s = self.search
        base = s.trials[0].metrics if s.trials else None
        accepted = [t for t in s.trials if t.accepted]
        return {"targets": {**self.targets.to_dict(), "default": self.default_targets}, "budget": s.clock.budget.describe(),
                "rows": self.held_rows, "data": data_note, "seconds": round(s.clock.seconds(), 2),
                "trials": [t.to_dict() for t in s.trials], "cached_trials": sum(t.cached for t in s.trials),
                "cache": str(s.cache.path) if s.cache.path else None, "method": self.method,
                "changes": [c.to_dict() for c in s.changes], "sensitivity": [r.to_dict() for r in s.sensitivity[:24]],
                "baseline": base.to_dict() if base else {},
                "best": (accepted[-1].metrics.to_dict() if accepted[-1].metrics else {}) if accepted else None,
                "speed": self.speed, "reached": bool(gate["passed"]), "missed": gate["failed"]}


def tune(job: TuneJob, progress=pipeline.no_progress) -> Tuned:
    prepared, o = job.prepared, job.options
    targets, default = Thresholds.tuning(job.gates, job.evaluation.latency)
    threads = job.evaluation.threads or runtime.default_threads()
    held = hold(runtime.session(prepared.model, threads, spinning=False), job.source, job.labels, o.rows)
    ident = _identity(job, held)
    cache = TrialCache(cache_dir(o.cache_dir) / f"{prepared.model_id[:16]}-{ident[:16]}.json")
    ctx = Context(prepared.model, Ranges.of(job.calib), job.config, held, threads, job.calib_source)
    search = Search(Lab(prepared, ctx, cache, ident), targets, Clock(o.budget), cache, progress("tuning", o.budget.trials))
    method, overrides, _ = search.run(job.config.method, job.overrides)
    plan = job.correct(pipeline.plan(prepared, job.calib, dataclasses.replace(job.config, method=method), overrides))
    result = pipeline.apply(prepared, plan, None, pipeline.check_feed(prepared, next(iter(job.source), None)))
    evaluation, reference = evaluate(prepared, result, job.source, job.labels, job.evaluation, progress)
    speed = []
    for _ in range(SPEED_ROUNDS):  # each round keeps float the nodes the new profile shows slower in int8
        lat = evaluation.get("latency_ms") or {}
        if targets.max_latency_ratio is None or not lat or lat["ratio"] <= targets.max_latency_ratio:
            break
        record, faster = speed_round(search, prepared, result, job.calib, evaluation, job.source, job.evaluation.threads, method)
        speed.append(record)
        if faster is None:
            break
        result = faster
        evaluation, reference = evaluate(prepared, result, job.source, job.labels, job.evaluation, progress)
    return Tuned(result, evaluation, reference, method, targets, default, search, held.rows, speed)


def _identity(job: TuneJob, held: Reference) -> str:
    """What every trial's result depends on besides its candidate: the trial cache's key prefix."""
    ident = json.dumps({"qconv": __version__, "model": job.prepared.model_id, "calib": pipeline.calibration_identity(job.calib),
                        "data": job.source.identity(), "rows": held.rows,
                        "labels": None if held.labels is None else hashlib.sha256(held.labels.tobytes()).hexdigest(),
                        "config": dataclasses.replace(job.config, method="minmax").to_dict()}, sort_keys=True, default=str)
    return hashlib.sha256(ident.encode()).hexdigest()
