"""Speed as a remedy: the nodes onnxruntime's profiler shows slower in int8 than in float are kept float, and the
new model is taken only when an A/B timing says it is faster (``speed_fallback``, also ``quantize
--speed-fallback``). Tuning runs it in rounds after the search while the model misses its latency target, and only
when the accuracy targets still hold."""

from __future__ import annotations

import dataclasses

from qconv import pipeline, runtime
from qconv.data import FeedSource
from qconv.measure.latency import latency
from qconv.plan.overrides import NodeOverride, Overrides
from qconv.tune.search import Search
from qconv.tune.trial import Change

SPEED_ROUNDS = 4


def slower_in_int8(evaluation: dict) -> list[str]:
    return [r["node"] for r in (evaluation.get("profile") or {}).get("slower_in_int8", [])]


def speed_fallback(prepared: pipeline.Prepared, result: pipeline.Result, calib, evaluation: dict, source: FeedSource,
                   threads: int | None) -> tuple[dict, pipeline.Result | None]:
    """Keep float the nodes the profile shows slower in int8, rewrite, and time both int8 models A/B: the new one
    is taken only when the whole interval says it is faster. Returns (what was tried, the faster result or None).
    The decisions become float overrides in the plan, so ``--plan`` reproduces the chosen model exactly."""
    slow = slower_in_int8(evaluation)
    if not slow:
        return {"tried": [], "taken": False, "reason": "no node is slower in int8 than in float on this CPU"}, None
    extra = Overrides({n: NodeOverride(precision="float") for n in slow}, {})
    stored = result.plan
    merged = stored.overrides.merged(extra)
    if calib is not None or not stored.config.needs_calibration:
        candidate_plan = pipeline.keep_corrections(prepared, stored, pipeline.plan(prepared, calib, stored.config, merged))
    else:
        candidate_plan = pipeline.replan(prepared, dataclasses.replace(stored, overrides=merged), None)
    candidate = pipeline.apply(prepared, candidate_plan)
    threads = threads or runtime.default_threads()
    timing = latency(runtime.session(result.model, threads, spinning=False, prepack=True),
                     runtime.session(candidate.model, threads, spinning=False, prepack=True), next(iter(source)), threads)
    taken = timing["verdict"] == "faster"
    record = {"tried": slow, "taken": taken, "ratio": timing["ratio"], "ratio_low": timing["ratio_low"],
              "ratio_high": timing["ratio_high"], "runs": timing["runs"],
              "reason": "measured faster with these nodes float" if taken else f"not measurably faster ({timing['verdict']})"}
    return record, candidate if taken else None


def speed_round(search: Search, prepared, result, calib, evaluation, source, threads, method) -> tuple[dict, pipeline.Result | None]:
    """The tuned model is slower than the target: keep float the nodes slower in int8, if that keeps the accuracy
    targets and measures faster."""
    slow = slower_in_int8(evaluation)
    if not slow:
        return {"tried": [], "taken": False, "reason": "no node is slower in int8 than in float on this CPU"}, None
    trial = search.trial("speed", f"{len(slow)} node{'s' if len(slow) > 1 else ''} slower in int8 kept float", method,
                         result.plan.overrides.merged(Overrides({n: NodeOverride(precision="float") for n in slow}, {})), force=True)
    if trial.metrics is None or search.targets.misses(trial.metrics):
        return {"tried": slow, "taken": False, "reason": "keeping them float misses the accuracy target"}, None
    record, faster = speed_fallback(prepared, result, calib, evaluation, source, threads)
    trial.accepted = faster is not None
    if faster is not None:
        search.changes.append(Change(", ".join(slow[:6]) + (f" (+{len(slow) - 6} more)" if len(slow) > 6 else ""), "kept float",
                                     f"slower in int8 on this CPU; the model measured {record['ratio']:.2f}x the time without it"))
    return record, faster
