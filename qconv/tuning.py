"""Tuning: search the plan's overrides for a model that meets the targets, within a budget, and say why.

Every candidate is a plan (the same config, other overrides), rewritten and *run* by onnxruntime on held
rows whose float outputs were computed once (``Reference``). The search, cheapest first:

1. ranges: each range method for the whole model (minmax, percentile, mse, entropy); the best measured
   wins, so the result is never worse than minmax on these rows ("auto");
2. sensitivity: one pass of the QDQ analysis model ranks the quantized nodes by the error each adds
   (SQNR of its output against its inputs); the top ones are measured alone: the model with only that
   node kept float (the gain of falling back) and the float model with only that node quantized;
3. remedies, per sensitive node in order of gain per cost (cost: its share of the model's MACs, so big
   Conv/MatMul stay int8 where they can): a better range method for its input, float for a Concat that
   joins tensors of very different ranges (each keeps its own scale), int16 activations (an a16w8
   island), float. A remedy is kept only when the measured score improves;
4. speed: the final candidate is timed against the float model (A/B); if it is slower than the target,
   the nodes the profile shows slower in int8 go float, and that is kept only if it measures faster
   and keeps the accuracy targets.

Measured trials are cached in a file keyed by model, calibration, rows and candidate, so a re-run is
instant and, with a budget in trials, deterministic. The result is the plan's overrides: ``--plan``
reproduces the model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from qconv import __version__, pipeline, runtime
from qconv.calib.ranges import select_range
from qconv.data import FeedSource, feed_rows
from qconv.errors import QconvError, UsageError
from qconv.graph import Graph, expose
from qconv.overrides import NodeOverride, Overrides, TensorOverride
from qconv.report import evaluate as ev
from qconv.report.gates import Gates
from qconv.report.layers import probe_pairs
from qconv.report.metrics import ErrorStats
from qconv.rewrite.rules import ANCHORS, SHARED

DEFAULT_COSINE = 0.999
DEFAULT_ROWS = 64
FLOAT_PASS_SECONDS = 3.0  # the held rows are cut so one float pass over them takes about this long (at least 8 rows)
RANGE_METHODS = ("minmax", "percentile", "mse", "entropy")  # moving-average is minmax smoothed: not a separate candidate
WIDE_CONCAT = 16.0  # a Concat whose input ranges differ by more than this factor loses the small ones at one scale
CACHE_VERSION = 1


@dataclass(frozen=True)
class Budget:
    """How much search: wall seconds, or a number of trials (deterministic: cached trials count too)."""

    seconds: float | None = 600.0
    trials: int | None = None

    @classmethod
    def parse(cls, text: str) -> Budget:
        t = text.strip().lower().replace(" ", "")
        m = re.fullmatch(r"(\d+)(trials?)", t)
        if m:
            if int(m.group(1)) < 1:
                raise UsageError("--budget in trials must be at least 1")
            return cls(None, int(m.group(1)))
        m = re.fullmatch(r"(\d+(?:\.\d+)?)(s|m|min|h)?", t)
        if not m:
            raise UsageError(f"--budget '{text}' is not a time like 10m, 90s, 1h or a trial count like 40trials")
        scale = {"s": 1, None: 1, "m": 60, "min": 60, "h": 3600}[m.group(2)]
        seconds = float(m.group(1)) * scale
        if seconds <= 0:
            raise UsageError("--budget must be positive")
        return cls(seconds, None)

    def describe(self) -> str:
        return f"{self.trials} trials" if self.trials is not None else f"{self.seconds:g} s"


@dataclass(frozen=True)
class Targets:
    """What tuning aims for: the gates given, or (none given) output cosine >= 0.999 and never slower than fp32."""

    min_cosine: float | None = None
    min_sqnr: float | None = None
    max_top1_drop: float | None = None
    max_latency_ratio: float | None = None
    min_agreement: float | None = None
    default: bool = False

    @classmethod
    def from_gates(cls, gates: Gates, latency: bool) -> Targets:
        given = (gates.min_cosine, gates.min_sqnr, gates.max_top1_drop, gates.max_latency_ratio, gates.min_agreement)
        if any(v is not None for v in given):
            return cls(*given)
        return cls(DEFAULT_COSINE, None, None, 1.0 if latency else None, default=True)

    def gates(self, size: float | None = None) -> Gates:
        return Gates(self.min_sqnr, self.min_cosine, self.max_top1_drop, size, self.max_latency_ratio, self.min_agreement)

    def to_dict(self) -> dict:
        d = {k: v for k, v in (("min_cosine", self.min_cosine), ("min_sqnr", self.min_sqnr), ("min_agreement", self.min_agreement),
                                ("max_top1_drop", self.max_top1_drop), ("max_latency_ratio", self.max_latency_ratio)) if v is not None}
        d["default"] = self.default
        return d

    def misses(self, m: dict) -> list[tuple[str, float]]:
        """(target, shortfall in units of its tolerance) for each accuracy target ``m`` misses."""
        out = []
        if self.min_cosine is not None and m["cosine"] < self.min_cosine:
            out.append(("min-cosine", (self.min_cosine - m["cosine"]) / max(1.0 - self.min_cosine, 1e-6)))
        if self.min_sqnr is not None and m["sqnr_db"] < self.min_sqnr:
            out.append(("min-sqnr", (self.min_sqnr - m["sqnr_db"]) / 3.0))
        if self.min_agreement is not None and (m.get("agreement") is None or m["agreement"] < self.min_agreement):
            out.append(("min-agreement", (self.min_agreement - (m.get("agreement") or 0.0)) / max(1.0 - self.min_agreement, 1e-3)))
        if self.max_top1_drop is not None and m.get("top1_drop") is not None and m["top1_drop"] > self.max_top1_drop:
            out.append(("max-top1-drop", (m["top1_drop"] - self.max_top1_drop) / max(self.max_top1_drop, 0.5)))
        return out

    def key(self, m: dict) -> tuple:
        """Smaller is better: unmet targets, their total shortfall, then the worst output's error."""
        miss = self.misses(m)
        return (len(miss), round(sum(s for _, s in miss), 9), round(1.0 - m["cosine"], 12), -round(m["agreement"] or 0.0, 9))


@dataclass(frozen=True)
class TuneOptions:
    budget: Budget = field(default_factory=Budget)
    rows: int = DEFAULT_ROWS  # held rows every trial is measured on (fewer if one float pass would take long)
    cache_dir: Path | None = None  # default: $QCONV_CACHE_DIR or ~/.cache/qconv/tuning


@dataclass
class Trial:
    n: int
    step: str
    change: str
    overrides: Overrides
    metrics: dict | None  # None: the candidate could not be built
    seconds: float
    cached: bool
    accepted: bool = False
    error: str | None = None

    def to_dict(self) -> dict:
        m = self.metrics or {}
        return {"n": self.n, "step": self.step, "change": self.change, "cosine": m.get("cosine"), "sqnr_db": _num(m.get("sqnr_db")),
                "agreement": m.get("agreement"), "top1_drop": m.get("top1_drop"), "seconds": round(self.seconds, 3),
                "cached": self.cached, "accepted": self.accepted, "error": self.error}


def _num(x):
    if isinstance(x, float) and math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


class BudgetSpent(Exception):
    pass


class TrialCache:
    """Measured trials in a JSON file: {key: metrics}; written after every trial, so an interrupted run keeps them."""

    def __init__(self, path: Path | None):
        self.path = path
        self.data: dict = {}
        if path is not None and path.exists():
            try:
                d = json.loads(path.read_text())
                if d.get("version") == CACHE_VERSION:
                    self.data = dict(d.get("trials") or {})
            except (OSError, ValueError):
                self.data = {}

    def get(self, key: str):
        return self.data.get(key)

    def put(self, key: str, value) -> None:
        self.data[key] = value
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"version": CACHE_VERSION, "trials": self.data}, sort_keys=True))
            os.replace(tmp, self.path)
        except OSError:
            self.path = None  # a read-only cache directory: tune without a cache


def cache_dir(opts: TuneOptions) -> Path:
    if opts.cache_dir is not None:
        return opts.cache_dir
    env = os.environ.get("QCONV_CACHE_DIR")
    return Path(env) / "tuning" if env else Path.home() / ".cache" / "qconv" / "tuning"


@dataclass
class Held:
    """The held rows: feeds, the float model's outputs on them, and their labels (if any)."""

    feeds: list[dict]
    outputs: list[list]
    names: list[str]
    labels: np.ndarray | None
    rows: int
    float_seconds: float


def hold_rows(prepared: pipeline.Prepared, source: FeedSource, labels: np.ndarray | None, rows: int, threads: int) -> Held:
    """The first ``rows`` rows of ``source`` and the float outputs on them (cut when a float pass gets long)."""
    sess = runtime.session(prepared.model, threads, spinning=False)
    names = [o.name for o in sess.get_outputs()]
    feeds, outputs, seen, spent, nbytes = [], [], 0, 0.0, 0
    for feed in source:
        t0 = time.perf_counter()
        out = runtime.run(sess, feed, names)
        spent += time.perf_counter() - t0
        feeds.append(feed)
        outputs.append(out)
        seen += feed_rows(feed, source.specs)
        nbytes += sum(v.nbytes for v in feed.values()) + sum(getattr(v, "nbytes", 0) for v in out)
        if seen >= rows or (seen >= 8 and spent > FLOAT_PASS_SECONDS) or nbytes > ev.REFERENCE_BYTES:
            break
    if not feeds:
        raise QconvError("tuning has no rows to measure on: the evaluation data set is empty")
    held_labels = None
    if labels is not None:
        if labels.size < seen:
            raise QconvError(f"--eval-labels has {labels.size} labels but tuning holds {seen} rows; give one label per row")
        held_labels = labels[:seen]
    return Held(feeds, outputs, names, held_labels, seen, spent)


def score(held: Held, sess) -> dict:
    """Worst output cosine and SQNR, top-1 agreement of the first output (and top-1 drop with labels)."""
    stats = {n: ErrorStats() for n in held.names}
    agree = total = correct_f = correct_q = seen = 0
    for feed, ref in zip(held.feeds, held.outputs):
        a, t, cf, cq, n = ev.fold(held.names, stats, ref, runtime.run(sess, feed, held.names), held.labels, seen)
        agree, total, correct_f, correct_q, seen = agree + a, total + t, correct_f + cf, correct_q + cq, seen + n
    used = [s for s in stats.values() if s.count]
    m = {"cosine": float(min((s.cosine for s in used), default=1.0)), "sqnr_db": float(min((s.sqnr_db for s in used), default=math.inf)),
         "agreement": agree / total if total else None, "top1_drop": None}
    if held.labels is not None and seen:
        m["top1_drop"] = 100.0 * (correct_f - correct_q) / seen
    return m


def _macs(prepared: pipeline.Prepared, shapes: dict[str, tuple]) -> dict[str, float]:
    """Multiply-accumulates per node from the output shapes of one run (weights' sizes for Conv/MatMul/Gemm)."""
    g = Graph(prepared.model)
    out = {}
    for node in prepared.model.graph.node:
        shape = shapes.get(node.output[0]) if node.output else None
        elems = float(np.prod(shape)) if shape is not None else 0.0
        if node.op_type in ANCHORS and len(node.input) > 1 and g.is_constant(node.input[1]):
            w = g.array(node.input[1])
            if node.op_type in ("Conv", "ConvTranspose"):
                per = w.size / max(1, w.shape[0])
            else:
                per = w.shape[-2] if w.ndim >= 2 else w.size
            out[node.name] = elems * float(per)
        else:
            out[node.name] = elems
    return out


class Tuner:
    def __init__(self, prepared: pipeline.Prepared, calib, config, base: Overrides, held: Held, data_id: str,
                 targets: Targets, opts: TuneOptions, threads: int, progress=pipeline._no_progress,
                 calib_source: FeedSource | None = None):
        self.prepared, self.calib, self.config, self.base = prepared, calib, config, base
        self.calib_source = calib_source  # feeds for per-channel statistics (smoothing); else the held rows
        self._channels: dict | None = None
        self._last = None  # (key, result) of the last candidate built
        self.held, self.targets, self.opts, self.threads = held, targets, opts, threads
        self.trials: list[Trial] = []
        self.start = time.perf_counter()
        ident = json.dumps({"qconv": __version__, "model": prepared.model_id, "calib": pipeline.calibration_identity(calib), "data": data_id,
                            "rows": held.rows, "labels": None if held.labels is None else hashlib.sha256(held.labels.tobytes()).hexdigest(),
                            "config": dataclasses.replace(config, method="minmax").to_dict()}, sort_keys=True, default=str)
        self.ident = hashlib.sha256(ident.encode()).hexdigest()
        self.cache = TrialCache(cache_dir(opts) / f"{prepared.model_id[:16]}-{self.ident[:16]}.json")
        self.advance = progress("tuning", opts.budget.trials)
        self.sensitivity: list[dict] = []
        self.changes: list[dict] = []

    # -- budget -----------------------------------------------------------------------------------
    def left(self) -> bool:
        b = self.opts.budget
        if b.trials is not None:
            return len(self.trials) < b.trials
        return time.perf_counter() - self.start < b.seconds

    def seconds(self) -> float:
        return time.perf_counter() - self.start

    # -- one candidate ----------------------------------------------------------------------------
    def candidate(self, method: str, overrides: Overrides):
        """The rewritten model of one candidate; the last one is kept (ranking and costs rebuild the current best)."""
        key = (method, overrides.digest())
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        config = dataclasses.replace(self.config, method=method)
        p = pipeline.plan(self.prepared, self.calib, config, overrides, "tuning")
        result = pipeline.apply(self.prepared, p, check=False)
        self._last = (key, result)
        return result

    def trial(self, step: str, change: str, method: str, overrides: Overrides, force: bool = False) -> Trial:
        """Measure one candidate (or read it from the cache). ``force``: past the budget (the final speed check)."""
        if not force and not self.left():
            raise BudgetSpent
        key = hashlib.sha256(f"{self.ident}|{method}|{self.config.percentile}|{overrides.digest()}".encode()).hexdigest()
        t0 = time.perf_counter()
        hit = self.cache.get(key)
        cached = hit is not None
        error = None
        if cached:
            metrics = hit.get("metrics")
            error = hit.get("error")
        else:
            try:
                result = self.candidate(method, overrides)
                metrics = score(self.held, runtime.session(result.model, self.threads, spinning=False))
            except QconvError as exc:
                metrics, error = None, str(exc)
            self.cache.put(key, {"metrics": {k: _num(v) for k, v in metrics.items()} if metrics else None, "error": error})
        if metrics is not None:
            metrics = {k: (float(v) if v in ("inf", "-inf") else v) for k, v in metrics.items()}
        t = Trial(len(self.trials) + 1, step, change, overrides, metrics, time.perf_counter() - t0, cached, error=error)
        self.trials.append(t)
        self.advance(1)
        return t

    def better(self, a: Trial, b: Trial | None) -> bool:
        """``a`` measures better than ``b`` (strictly)."""
        if a.metrics is None:
            return False
        if b is None or b.metrics is None:
            return True
        return self.targets.key(a.metrics) < self.targets.key(b.metrics)

    def met(self, t: Trial) -> bool:
        return t.metrics is not None and not self.targets.misses(t.metrics)

    def report(self, method: str, data_note: str, speed: dict | None, gate: dict) -> dict:
        """The report's "tuning" section: targets, budget, every trial, what changed and why."""
        base = self.trials[0].metrics if self.trials else None
        accepted = [t for t in self.trials if t.accepted]
        return {"targets": self.targets.to_dict(), "budget": self.opts.budget.describe(), "rows": self.held.rows, "data": data_note,
                "seconds": round(self.seconds(), 2), "trials": [t.to_dict() for t in self.trials],
                "cached_trials": sum(t.cached for t in self.trials), "cache": str(self.cache.path) if self.cache.path else None,
                "method": method, "changes": self.changes, "sensitivity": self.sensitivity[:24],
                "baseline": {k: _num(v) for k, v in (base or {}).items()},
                "best": {k: _num(v) for k, v in (accepted[-1].metrics or {}).items()} if accepted else None,
                "speed": speed, "reached": bool(gate["passed"]), "missed": gate["failed"]}

    def _time_costs(self, method: str, overrides: Overrides) -> dict[str, float] | None:
        """With a latency target: the share of the float model's time each node would give back in float
        (float kernel time minus int8 kernel time, from onnxruntime's profiler on one held feed), measured once
        and kept in the trial cache (so a re-run orders the same way). Without one: None (MACs are the cost)."""
        if self.targets.max_latency_ratio is None:
            return None
        key = f"profile|{self.ident}"
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        from qconv.report import profile as prof

        result = self.candidate(method, overrides)
        feed = self.held.feeds[0]
        f = prof.by_node(prof.attribute(prof.profile(self.prepared.model, feed, self.threads), self.prepared.model))
        q = prof.by_node(prof.attribute(prof.profile(result.model, feed, self.threads), self.prepared.model))
        for act, producer in result.plan.folded.items():  # onnxruntime reports a fused Conv+Relu under the Relu
            for d in (f, q):
                if act in d:
                    d[producer] = d.get(producer, 0.0) + d.pop(act)
        total = sum(f.values()) or 1.0
        costs = {n: round(max(0.0, f.get(n, 0.0) - q.get(n, 0.0)) / total, 6) for n in set(f) | set(q)}
        self.cache.put(key, costs)
        return costs

    def _smoothing(self, node, alpha: float) -> Overrides | None:
        """Overrides that smooth ``node``'s input (scales and the smoothed input's range), if it has outlier channels."""
        from qconv.rewrite.smooth import input_axis, smoothed_input, smoothing_scales, weight_layout

        g = Graph(self.prepared.model)
        layout = weight_layout(node, g)
        if isinstance(layout, str) or not g.is_float(node.input[0]):
            return None
        if self._channels is None:
            names = {n.input[0]: input_axis(n) for n in self.prepared.model.graph.node
                     if not isinstance(weight_layout(n, g), str) and g.is_float(n.input[0])}
            feeds = self.calib_source if self.calib_source is not None else self.held.feeds
            self._channels = _channel_stats(self.prepared, ev.limited(feeds, _specs(self.prepared), STAT_ROWS), names, self.threads)
        w, axis = layout
        st = self._channels.get(node.input[0])
        if st is None or st[0].size != w.shape[axis]:
            return None
        lo, hi = st
        absmax = np.maximum(np.abs(lo), np.abs(hi))
        med = float(np.median(absmax))
        if med <= 0 or float(absmax.max()) / med < SMOOTH_OUTLIERS:
            return None
        s = smoothing_scales(absmax, w, axis, alpha)
        rng = (float(min(0.0, (lo / s).min())), float(max(0.0, (hi / s).max())))
        return Overrides({node.name: NodeOverride(smooth=tuple(float(x) for x in s))},
                         {smoothed_input(node.name): TensorOverride(range=rng)})

    # -- the search -------------------------------------------------------------------------------
    def run(self) -> tuple[str, Overrides, Trial]:
        base_method = self.config.method
        best = self.trial("baseline", f"as planned (--method {base_method})", base_method, self.base)
        best.accepted = True
        method, overrides = base_method, self.base
        try:
            for m in RANGE_METHODS:
                if m == base_method:
                    continue
                t = self.trial("ranges", f"--method {m} for every tensor", m, self.base)
                if self.better(t, best):
                    best, method = t, m
            if best.n != 1:
                best.accepted = True
                self.changes.append({"what": "all activations", "change": f"range method {method}",
                                     "why": f"measured best of {', '.join(RANGE_METHODS)} (worst-output cosine {best.metrics['cosine']:.5f})"})
            done: set[str] = set()
            idle = 0
            while not self.met(best) and self.left() and idle < 2:
                before, measured = best, len(done)
                method, overrides, best = self._remedies(method, overrides, best, done)
                if len(done) == measured:
                    break  # every quantized node has been measured
                idle = idle + 1 if best is before else 0  # two rounds without a gain: the next ranks are noise
        except BudgetSpent:
            pass
        return method, overrides, best

    def _ranked(self, method: str, overrides: Overrides) -> list[dict]:
        """Quantized nodes by the error each adds (dB of SQNR lost across it), measured on a few held rows."""
        result = self.candidate(method, overrides)
        plan = result.plan
        ftypes = Graph(self.prepared.model).types
        qtypes = {**ftypes, **{dq: onnx.TensorProto.FLOAT for dq in result.dequantized.values()}}
        pairs = probe_pairs(self.prepared.model, result.analysis_model, result.dequantized, ftypes, qtypes)
        fl = runtime.session(expose(self.prepared.model, {t: onnx.TensorProto.FLOAT for t in pairs}), self.threads)
        ql = runtime.session(expose(result.analysis_model, dict(pairs.values())), self.threads)
        feeds = list(ev.limited(self.held.feeds, _specs(self.prepared), 8))
        outs = [o for o, v in zip(self.held.names, self.held.outputs[0]) if isinstance(v, np.ndarray) and v.dtype.kind == "f"]
        fetch_f = list(pairs) + outs
        fetch_q = [q for q, _ in pairs.values()] + outs
        stats = {t: ErrorStats() for t in fetch_f}
        shapes: dict[str, tuple] = {}
        for feed in feeds:
            for t, r, q in zip(fetch_f, runtime.run(fl, feed, fetch_f), runtime.run(ql, feed, fetch_q)):
                stats[t].update(r, q)
                shapes.setdefault(t, tuple(r.shape))
        del fl, ql
        sqnr = {t: s.sqnr_db for t, s in stats.items() if s.count}
        by_name = {n.name: n for n in self.prepared.model.graph.node}
        for act, producer in plan.folded.items():  # a folded Relu's output has its producer's shape
            if by_name[act].output[0] in shapes:
                shapes.setdefault(by_name[producer].output[0], shapes[by_name[act].output[0]])
        macs = _macs(self.prepared, shapes)
        total = sum(macs.values()) or 1.0
        g = Graph(self.prepared.model)
        folded_into = {v: k for k, v in plan.folded.items()}  # producer -> its folded activation
        ranked = []
        for d in plan.nodes:
            node = by_name.get(d.name)
            if node is None or not d.quantized or d.name in plan.folded or node.op_type in SHARED or not node.output:
                continue
            out = node.output[0]
            if d.name in folded_into:  # the Relu's output carries this node's quantization
                out = by_name[folded_into[d.name]].output[0]
            s_out = sqnr.get(out)
            ins = [sqnr.get(i, math.inf) for i in node.input if i and not g.is_constant(i)]
            s_in = min(ins) if ins else math.inf
            added = (min(s_in, 120.0) - min(s_out, 120.0)) if s_out is not None else 0.0
            ranked.append({"node": d.name, "op": node.op_type, "added_db": round(float(added), 3),
                           "output_sqnr_db": _num(float(s_out)) if s_out is not None else None,
                           "mac_share": round(macs.get(d.name, 0.0) / total, 6)})
        ranked.sort(key=lambda r: (-r["added_db"], r["node"]))
        return ranked

    def _remedies(self, method: str, overrides: Overrides, best: Trial, done: set[str]) -> tuple[str, Overrides, Trial]:
        """One round: rank the nodes on the current best, measure the top ones not tried yet, remedy in order."""
        ranked = [r for r in self._ranked(method, overrides) if r["node"] not in done and r["node"] not in overrides.nodes]
        b = self.opts.budget
        if b.trials is not None:
            k = max(1, min(len(ranked), (b.trials - len(self.trials)) // 3))
        else:
            per = max(0.05, np.median([t.seconds for t in self.trials if not t.cached] or [1.0]))
            k = max(1, min(len(ranked), int(0.35 * (b.seconds - self.seconds()) / per)))
        first_round = not done
        k = min(k, 32 if first_round else 16)
        plan_nodes = {n.name: n for n in self.prepared.model.graph.node}
        # Sensitivity: the gain of keeping each top-ranked node alone in float (and, for the first few, the
        # loss of quantizing it alone in the float model).
        measured = []
        for r in ranked[:k]:
            done.add(r["node"])
            measured.append(r)
            t = self.trial("sensitivity", f"'{r['node']}' ({r['op']}) alone in float", method,
                           overrides.merged(Overrides({r["node"]: NodeOverride(precision="float")}, {})))
            r["float_gain"] = _gain(self.targets, best, t)
            r["float_cosine"] = t.metrics["cosine"] if t.metrics else None
            self.sensitivity.append(r)
        for r in sorted(measured, key=lambda r: -(r.get("float_gain") or 0.0))[:4 if first_round else 0]:
            if not self.left():
                break
            alone = Overrides({"*": NodeOverride(precision="float"), r["node"]: NodeOverride(precision="int8")}, {})
            t = self.trial("sensitivity", f"'{r['node']}' alone quantized", method, alone)
            r["alone_cosine"] = t.metrics["cosine"] if t.metrics else None
        # Remedies, in order of gain per cost.
        costs = self._time_costs(method, overrides)
        for r in measured:
            r["cost"] = costs.get(r["node"], r["mac_share"]) if costs else r["mac_share"]
        order = sorted((r for r in measured if (r.get("float_gain") or 0.0) >= MIN_GAIN),
                       key=lambda r: (-(r["float_gain"] / (1.0 + 20.0 * r["cost"])), r["node"]))
        for r in order:
            if self.met(best):
                break
            node = plan_nodes[r["node"]]
            for what, change, m, extra in self._options(node, method, overrides, best):
                t = self.trial("remedy", change, m, overrides.merged(extra))
                if self.better(t, best) and _gain(self.targets, best, t) >= max(0.25 * r["float_gain"], MIN_GAIN / 2):
                    t.accepted = True
                    best, overrides, method = t, overrides.merged(extra), m
                    self.changes.append({"what": r["node"], "op": r["op"], "change": what,
                                         "why": f"{_added(r)}; with this change the worst-output cosine is "
                                                f"{t.metrics['cosine']:.5f}"})
                    break
        return method, overrides, best

    def _options(self, node, method: str, overrides: Overrides, best: Trial):
        """(what, trial label, method, extra overrides) for ``node``, cheapest first."""
        g = Graph(self.prepared.model)
        acts = [_source(i, g) for i in node.input if i and not g.is_constant(i) and g.is_float(i)]
        if node.op_type == "Concat" and self.calib is not None:
            ranges = self.calib.ranges(method, self.config.symmetric_activations, self.config.percentile)
            spans = [max(abs(ranges[i][0]), abs(ranges[i][1])) for i in acts if i in ranges]
            spans = [s for s in spans if s > 0]
            if len(spans) >= 2 and max(spans) / min(spans) > WIDE_CONCAT:
                yield ("float Concat: its inputs keep their own scales", f"'{node.name}' float (inputs span {max(spans) / min(spans):.0f}x)",
                       method, Overrides({node.name: NodeOverride(precision="float")}, {}))
        if self.calib is not None and getattr(self.calib, "tensors", None):
            sym, pct = self.config.symmetric_activations, self.config.percentile
            observed = [i for i in acts if i in self.calib.tensors and self.calib.tensors[i].seen_finite
                        and i not in overrides.tensors]
            now = {i: select_range(self.calib.tensors[i], method, sym, pct) for i in observed}
            tried = [tuple(now[i] for i in observed)]
            for m in ("percentile", "mse", "entropy", "minmax"):
                if m == method:
                    continue
                ranges = tuple(select_range(self.calib.tensors[i], m, sym, pct) for i in observed)
                if any(np.allclose(ranges, r, rtol=1e-6, atol=0.0) for r in tried):
                    continue  # the same ranges as a candidate already measured
                tried.append(ranges)
                ts = {i: TensorOverride(method=m) for i in observed}
                if ts:
                    yield (f"range method {m} for its input{'s' if len(ts) > 1 else ''}", f"'{node.name}' inputs: --method {m}",
                           method, Overrides({}, ts))
        for alpha in (0.5, 0.75):
            smooth = self._smoothing(node, alpha)
            if smooth is not None:
                yield (f"SmoothQuant scales (alpha {alpha:g}) folded into its weight", f"'{node.name}' smoothed (alpha {alpha:g})",
                       method, smooth)
        yield ("int16 activations (a16w8 island)", f"'{node.name}' int16", method, Overrides({node.name: NodeOverride(precision="int16")}, {}))
        yield ("kept float", f"'{node.name}' float", method, Overrides({node.name: NodeOverride(precision="float")}, {}))


MIN_GAIN = 0.01  # a node is remedied only if keeping it float removes at least 1% of what the model misses by
SMOOTH_OUTLIERS = 4.0  # smooth a MatMul input whose largest channel magnitude is this many times the median channel's
STAT_ROWS = 64


def _channel_stats(prepared: pipeline.Prepared, feeds, names: dict[str, int], threads: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-channel (min, max) of each tensor ({name: channel axis}) over ``feeds`` (one pass with them exposed)."""
    sess = runtime.session(expose(prepared.model, {n: onnx.TensorProto.FLOAT for n in names}), threads)
    stats: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    order = list(names)
    for feed in feeds:
        for n, v in zip(order, runtime.run(sess, feed, order)):
            v = np.asarray(v)
            if v.ndim < 2:
                continue
            flat = np.moveaxis(v, names[n], -1).reshape(-1, v.shape[names[n]])
            lo, hi = flat.min(0), flat.max(0)
            if n in stats:
                lo, hi = np.minimum(stats[n][0], lo), np.maximum(stats[n][1], hi)
            stats[n] = (lo, hi)
    return stats


def _added(r: dict) -> str:
    """How a ranked node's error reads: the dB it adds, or, at the model's input (nothing before it), its output SQNR."""
    if r["added_db"] >= 60.0 and isinstance(r.get("output_sqnr_db"), float):
        return f"its output SQNR is {r['output_sqnr_db']:.1f} dB (it quantizes the model's input)"
    return f"it added {max(r['added_db'], 0.0):.1f} dB of error"


def _gain(targets: Targets, base: Trial, t: Trial) -> float:
    """How much ``t`` improves on ``base``, as a fraction of what ``base`` misses the targets by (of its worst output's
    error, 1 - cosine, once the targets are met)."""
    if t.metrics is None or base.metrics is None:
        return 0.0
    s0 = sum(x for _, x in targets.misses(base.metrics))
    if s0 > 0:
        return float((s0 - sum(x for _, x in targets.misses(t.metrics))) / s0)
    e0, e1 = 1.0 - base.metrics["cosine"], 1.0 - t.metrics["cosine"]
    return float((e0 - e1) / e0) if e0 > 0 else 0.0


def _specs(prepared: pipeline.Prepared):
    from qconv.data import InputSpec

    return [InputSpec.from_value_info(i) for i in prepared.model.graph.input]


def _source(name: str, g: Graph) -> str:
    """The tensor whose range ``name`` takes: back through data-movement ops (they share their input's scale)."""
    seen = 0
    while seen < 64:
        p = g.producer.get(name)
        if p is None or p.op_type not in SHARED or not p.input or g.is_constant(p.input[0]):
            return name
        name, seen = p.input[0], seen + 1
    return name
