"""The search: from the plan as given to the best candidate measured, within the budget.

1. ranges: each range method for the whole model; the best measured wins (never worse than the plan as given). Such a
   move, and a group's (2.), changes every decision of the model or a part of it: where the outputs hold decisions (a
   classifier's top-1, a detector's scores passing 0.25), a decision that moves must rise beyond the noise of the feeds
   it was measured on (``measure.tally.decisions_resolved``), or the move is refused;
2. groups: whole op types (every hard-swish Mul) and a head's output Concat with what feeds it, as int16 then
   float, most estimated error first (errors that add up where no single node shows a gain alone);
3. sensitivity rounds: the lab ranks the quantized nodes by the error each adds; the top ones are measured alone
   (the model with only that node float: the gain of falling back; for the first few, the float model with only
   that node quantized);
4. remedies, per sensitive node in order of gain per cost: each remedy's candidates in turn (see
   ``qconv.tune.remedies``); the first that measures better, by at least a quarter of the node's float gain, is
   kept. Rounds repeat on the new best until the targets are met, every node was measured, or two rounds gain
   nothing.

The lab (``qconv.tune.lab``, or a fake one in tests) turns candidates into numbers; everything here is decisions.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Iterator, Protocol

from qconv.errors import QconvError
from qconv.measure.tally import Metrics, decisions_resolved
from qconv.measure.thresholds import Thresholds
from qconv.plan.overrides import NodeOverride, Overrides
from qconv.tune.budget import BudgetSpent, Clock
from qconv.tune.sensitivity import gain, priority
from qconv.tune.trial import Candidate, Change, Group, Ranked, Trial, TrialCache

RANGE_METHODS = ("minmax", "percentile", "mse", "entropy")  # moving-average is minmax smoothed: not a separate candidate
MIN_GAIN = 0.01  # a node is remedied only if keeping it float removes at least 1% of what the model misses by
FIRST_ROUND, LATER_ROUNDS = 32, 16  # nodes measured alone per round, at most
ALONE = 4  # of the first round's, how many are also measured as the only quantized node
IDLE_ROUNDS = 2  # rounds without a gain before the ranks are taken for noise
GROUPS = 3  # group moves measured (each as int16, then float), most estimated error first
SMOOTH_ALPHAS = (0.5, 0.65, 0.8, 0.95)  # SmoothQuant over every weight MatMul/Gemm: each measured, the best kept


class Bench(Protocol):
    """What the search needs measured."""

    def key(self, method: str, overrides: Overrides) -> str: ...

    def measure(self, method: str, overrides: Overrides) -> Metrics: ...

    def rank(self, method: str, overrides: Overrides) -> list[Ranked]: ...

    def costs(self, method: str, overrides: Overrides) -> dict[str, float]: ...

    def options(self, node: str, method: str, overrides: Overrides) -> Iterator[Candidate]: ...

    def groups(self, method: str, overrides: Overrides) -> list[Group]: ...

    def speed(self, method: str, overrides: Overrides) -> float | None: ...


class SpeedGuard:
    """The kernel table's estimate of a candidate's time (``Bench.speed``, x the float model's) against the latency
    target: what refuses a slow candidate before any A/B (the final evaluation and speed rounds confirm)."""

    def __init__(self, bench, limit: float | None):
        self.estimate = getattr(bench, "speed", None)
        self.limit = limit
        self._base: float | None = None  # the plan as given
        self.scale = 1.0  # measured / estimated time of the plan as given (``calibrate``): applied to every estimate
        self.record: dict | None = None  # the calibration, for the report

    def calibrate(self, bench, base: Trial) -> None:
        """Time the plan as given against the float model (``bench.timed``: one short A/B) and scale the table's
        estimates by measured / estimated. The table sums each node's kernel time and misses what the whole graph
        adds (conversions between regions, fusions onnxruntime makes or not): on YOLOv8n it put the plan as given at
        0.49x (measured 0.55x) and the plan with its 53 SiLU Muls float at 0.53x, under a 0.6x target, which then
        measured 0.63x."""
        timed = getattr(bench, "timed", None)
        if self.limit is None or self.estimate is None or timed is None:
            return
        est = self.estimate(base.method, base.overrides)
        if not est:
            return
        measured = timed(base.method, base.overrides)
        self.scale = max(1.0, measured / est)  # only ever stricter: a fast measurement never lets a slower plan through
        self._base = measured
        self.record = {"plan_as_given_measured": round(measured, 4), "plan_as_given_estimated": round(est, 4),
                       "scale": round(self.scale, 4)}

    def refusal(self, base: Trial | None, t: Trial) -> str | None:
        """Why ``t`` is over the target, if it is (never when the plan as given is over it too: the target then cannot be
        held to by refusing, the final A/B and speed rounds decide)."""
        if self.limit is None or self.estimate is None or base is None:
            return None
        if self._base is None:
            self._base = self.estimate(base.method, base.overrides) or 0.0
        if self._base > self.limit:
            return None
        est = self.estimate(t.method, t.overrides)
        if est is not None:
            est *= self.scale
        t.speed = est
        if est is not None and est > self.limit:
            how = "by the kernel table" if self.scale == 1.0 else f"by the kernel table, scaled x{self.scale:.2f} to the plan as given's A/B"
            return f"estimated at {est:.2f}x the float model's time {how} (target <= {self.limit:g}x)"
        return None


class Search:
    def __init__(self, bench: Bench, targets: Thresholds, clock: Clock, cache: TrialCache,
                 advance: Callable[[int], None] = lambda n: None):
        self.bench, self.targets, self.clock, self.cache, self.advance = bench, targets, clock, cache, advance
        self.trials: list[Trial] = []
        self.changes: list[Change] = []
        self.sensitivity: list[Ranked] = []
        self.speed = SpeedGuard(bench, targets.max_latency_ratio)

    # -- trials -----------------------------------------------------------------------------------
    def left(self) -> bool:
        # room for the next trial and one more after the search (bias correction of the chosen plan is measured as a
        # trial): PicoDet's 6 s trials still ended 15 s past a 180 s budget with room for one only; the clock adds the
        # rest of what follows the search at this median trial time (Clock.after_trials; the rest is its reserve)
        recent = [t.seconds for t in self.trials[-5:] if not t.cached]
        per = statistics.median(recent) if recent else 0.0
        return self.clock.left(len(self.trials), 2 * per, per)

    def trial(self, step: str, change: str, method: str, overrides: Overrides, force: bool = False) -> Trial:
        """Measure one candidate (or read it from the cache). ``force``: past the budget (the final speed check)."""
        if not force and not self.left():
            raise BudgetSpent
        return self._record([(step, change, method, overrides)], lambda: True)[0][0]

    def batch(self, specs: list[tuple[str, str, str, Overrides]]) -> list[Trial]:
        """Measure ``specs`` (step, change, method, overrides) in order within the budget, several at once where the
        bench runs lanes: the trials made (fewer than asked when the budget ends)."""
        return self.first_kept(specs, None)[0]

    def first_kept(self, specs: list[tuple[str, str, str, Overrides]], kept: Callable[[Trial], bool] | None) -> tuple[list[Trial], int | None]:
        """``batch`` that stops at the first trial ``kept`` accepts: (the trials made, the index of the kept one or
        None). Candidates measured alongside the kept one are dropped unrecorded: the trials and the choices are those
        of measuring one at a time."""
        lanes = max(1, int(getattr(self.bench, "lanes", lambda: 1)()))
        out: list[Trial] = []
        i = 0
        while i < len(specs) and self.left():
            room = len(specs) - i if self.clock.budget.trials is None else self.clock.budget.trials - len(self.trials)
            chunk = specs[i:i + max(1, min(room, lanes if kept is not None else len(specs)))]
            made, stop = self._record(chunk, self.left, kept)
            out += made
            i += len(chunk)
            if stop:
                return out, len(out) - 1
            if len(made) < len(chunk):
                break
        return out, None

    def _record(self, specs: list, go: Callable[[], bool], kept: Callable[[Trial], bool] | None = None) -> tuple[list[Trial], bool]:
        """Measure the uncached of ``specs`` (while ``go()``), then record trials in order up to the first unmeasured
        one, or up to the first that ``kept`` accepts (then True)."""
        keys = [self.bench.key(method, overrides) for _, _, method, overrides in specs]
        hits = [self.cache.metrics(k) for k in keys]
        todo = [(s[2], s[3]) for s, h in zip(specs, hits) if not h[0]]
        many = getattr(self.bench, "measure_many", None)
        if many is not None and len(todo) > 1:
            measured = list(many(todo, go))
        else:
            measured = []
            for method, overrides in todo:
                if measured and not go():
                    break
                t0 = time.perf_counter()
                try:
                    m, error = self.bench.measure(method, overrides), None
                except QconvError as exc:
                    m, error = None, str(exc)
                measured.append((m, error, getattr(self.bench, "share", None), time.perf_counter() - t0))
        out: list[Trial] = []
        fresh = iter(measured)
        for (step, change, method, overrides), key, (cached, metrics, error) in zip(specs, keys, hits):
            share, seconds = None, 0.0
            if not cached:
                got = next(fresh, None)
                if got is None:
                    break
                metrics, error, share, seconds = got
                self.cache.put_metrics(key, metrics, error)
            t = Trial(len(self.trials) + 1, step, change, overrides, metrics, seconds, cached, error=error, method=method,
                      share=share)
            self.trials.append(t)
            self.advance(1)
            out.append(t)
            if kept is not None and kept(t):
                return out, True
        return out, False

    def better(self, a: Trial, b: Trial | None, resolve: bool = False) -> bool:
        """``a`` measures better than ``b`` (strictly), keeps the float model's decisions at least as well as the
        plan as given, with ``resolve`` (the moves that change the whole model or a whole group: a range method, an op
        type) moves no decision of ``b``'s but up beyond the noise of the feeds (``decisions_resolved``), and is not
        estimated over the speed target where the plan as given was not (a refused candidate
        says why in its note)."""
        if a.metrics is None:
            return False
        if b is not None and b.metrics is not None and not self.targets.key(a.metrics) < self.targets.key(b.metrics):
            return False
        lost = self.decisions_lost(a.metrics)
        if lost:
            a.note = f"refused: {lost}"
            return False
        if resolve and b is not None and b.metrics is not None:
            resolved, why = decisions_resolved(a.metrics, b.metrics)
            if not resolved:
                a.note = f"refused: {why}"
                return False
        slow = self.speed.refusal(self.trials[0] if self.trials else None, a)
        if slow:
            a.note = f"refused: {slow}"
            return False
        return True

    def decisions_lost(self, m: Metrics, base: Metrics | None = None) -> str | None:
        """What ``m`` decides worse than ``base`` (default: the plan as given): top-1 agreement (per row or position)
        or which scores pass 0.25 (a detector's boxes). A range that clips the small scores raises the cosine and
        loses these."""
        if base is None:
            base = self.trials[0].metrics if self.trials else None
        if base is None:
            return None
        for what, label in (("metric", "--metric"), ("agreement", "top-1 agreement"), ("passing", "scores passing 0.25 (Jaccard)")):
            b, a = getattr(base, what), getattr(m, what)
            if b is not None and (a is None or a < b):
                return f"{label} {a if a is None else round(a, 4)} < {round(b, 4)} as planned"
        return None

    def met(self, t: Trial) -> bool:
        return t.metrics is not None and not self.targets.misses(t.metrics)

    # -- the search -------------------------------------------------------------------------------
    def run(self, method: str, overrides: Overrides) -> tuple[str, Overrides, Trial]:
        """(range method, overrides, its trial) of the best candidate measured, starting from ``method``/``overrides``."""
        best = self.trial("baseline", f"as planned (--method {method})", method, overrides)
        best.accepted = True
        if self.clock.budget.trials is None and self.left():  # a timing: never under a trial budget (same bytes each run)
            self.speed.calibrate(self.bench, best)
        method, best = self._ranges(method, overrides, best)
        try:
            overrides, best = self._groups(method, overrides, best)
            overrides, best = self._smooth(method, overrides, best)
            done: set[str] = set()
            idle = 0
            while not self.met(best) and self.left() and idle < IDLE_ROUNDS:
                before, measured = best, len(done)
                method, overrides, best = self._round(method, overrides, best, done)
                if len(done) == measured:
                    break  # every quantized node has been measured
                idle = idle + 1 if best is before else 0
        except BudgetSpent:
            pass
        return method, overrides, best

    def _ranges(self, base: str, overrides: Overrides, best: Trial) -> tuple[str, Trial]:
        """Each range method for every tensor; the best measured (before the budget ends) is kept."""
        method = base
        for t in self.batch([("ranges", f"--method {m} for every tensor", m, overrides) for m in RANGE_METHODS if m != base]):
            if self.better(t, best, resolve=True):
                best, method = t, t.method
        if method != base:
            best.accepted = True
            self.changes.append(Change("all activations", f"range method {method}", f"measured best of {', '.join(RANGE_METHODS)} "
                                       f"(worst-output cosine {best.metrics.cosine:.5f})"))
        return method, best

    def _smooth(self, method: str, overrides: Overrides, best: Trial) -> tuple[Overrides, Trial]:
        """SmoothQuant over every MatMul/Gemm with a weight, at each of SMOOTH_ALPHAS: the best that measures better
        than ``best`` beyond the noise of its decisions, and by MIN_GAIN, is kept. A transformer's error accumulates
        over its layers, where no single MatMul shows a gain alone (all-MiniLM-L6-v2: 8 MatMuls smoothed one by one
        in 160 trials reached cosine 0.9919; all 36 at alpha 0.8 reach 0.9969)."""
        make = getattr(self.bench, "smoothed_all", None)
        if make is None or self.met(best) or not self.left():
            return overrides, best
        extras = []
        for alpha in SMOOTH_ALPHAS:
            extra = make(method, overrides, alpha)
            if extra is None:
                return overrides, best
            extras.append((alpha, extra))
        specs = [("group", f"SmoothQuant on all {len(extra.nodes)} MatMul/Gemm weights (alpha {alpha:g})", method, overrides.merged(extra))
                 for alpha, extra in extras]
        made = self.batch(specs)
        base, chosen = best, None
        for t, (alpha, extra) in zip(made, extras):
            if self.better(t, best, resolve=True) and gain(self.targets, base.metrics, t.metrics) >= MIN_GAIN:
                best, chosen = t, (alpha, extra)
        if chosen is not None:
            alpha, extra = chosen
            best.accepted = True
            self.changes.append(Change(f"all {len(extra.nodes)} MatMul/Gemm weights", f"SmoothQuant scales (alpha {alpha:g}) folded into each",
                                       f"measured best of alphas {', '.join(f'{a:g}' for a in SMOOTH_ALPHAS)}; the worst cosine is "
                                       f"{best.metrics.worst_cosine:.5f} (without it {base.metrics.worst_cosine:.5f})"))
            overrides = overrides.merged(extra)
        elif len(made) < len(specs):
            raise BudgetSpent
        return overrides, best

    def _groups(self, method: str, overrides: Overrides, best: Trial) -> tuple[Overrides, Trial]:
        """Move whole groups before single nodes, in order of estimated error: int16 first (it keeps the integer
        path), then float; a move is kept when it measures better and keeps the decisions."""
        for g in self.bench.groups(method, overrides)[:GROUPS]:
            if self.met(best) or not self.left():
                break
            moves = {p: Overrides({n: NodeOverride(precision=p) for n in g.nodes}, {}) for p in ("int16", "float")}
            specs = [("group", f"{g.label} {p} (estimated {g.estimate:.0f} dB)", method, overrides.merged(extra))
                     for p, extra in moves.items()]
            ok = lambda t, base=best: self.better(t, base, resolve=True) and gain(self.targets, base.metrics, t.metrics) >= MIN_GAIN  # noqa: E731
            made, k = self.first_kept(specs, ok)
            if k is not None:
                t, precision = made[k], list(moves)[k]
                t.accepted = True
                self.changes.append(Change(g.label, "int16 activations (a16w8 islands)" if precision == "int16" else "kept float",
                                           f"together they add an estimated {g.estimate:.0f} dB of error; with this change the worst "
                                           f"cosine is {t.metrics.worst_cosine:.5f}"))
                overrides, best = overrides.merged(moves[precision]), t
            elif len(made) < len(specs):
                raise BudgetSpent
        return overrides, best

    def _round(self, method: str, overrides: Overrides, best: Trial, done: set[str]) -> tuple[str, Overrides, Trial]:
        """One round: rank the nodes on the current best, measure the top ones not tried yet, remedy in order."""
        ranked = [r for r in self.bench.rank(method, overrides) if r.node not in done and r.node not in overrides.nodes]
        first_round = not done
        k = min(self.clock.affordable(self.trials, len(ranked)), FIRST_ROUND if first_round else LATER_ROUNDS)
        anchor = getattr(self.bench, "anchor", None)
        if anchor is not None:  # the round's candidates change these nodes of the current best: run only what follows
            anchor(method, overrides, [r.node for r in ranked[:k]])
        measured = self._alone(ranked[:k], method, overrides, best, done, first_round)
        costs = self.bench.costs(method, overrides) if self.targets.max_latency_ratio is not None else None
        for r in measured:
            r.cost = costs.get(r.node, r.mac_share) if costs else r.mac_share
        order = sorted((r for r in measured if (r.float_gain or 0.0) >= MIN_GAIN), key=priority)
        for j, r in enumerate(order):
            if self.met(best):
                break
            before = best
            method, overrides, best = self._remedy(r, method, overrides, best)
            if best is not before and anchor is not None and order[j + 1:]:  # the next remedies change the new best
                anchor(method, overrides, [x.node for x in order[j + 1:]])
        return method, overrides, best

    def _alone(self, top: list[Ranked], method: str, overrides: Overrides, best: Trial, done: set[str],
               first_round: bool) -> list[Ranked]:
        """Measure each of ``top`` kept float alone (its gain); the first round's best few also quantized alone."""
        measured = []
        made = self.batch([("sensitivity", f"'{r.node}' ({r.op}) alone in float", method,
                            overrides.merged(Overrides({r.node: NodeOverride(precision="float")}, {}))) for r in top])
        for r, t in zip(top, made):
            done.add(r.node)
            measured.append(r)
            r.float_gain = gain(self.targets, best.metrics, t.metrics)
            r.float_cosine = t.metrics.cosine if t.metrics else None
            self.sensitivity.append(r)
        if len(made) < len(top):
            raise BudgetSpent
        first = sorted(measured, key=lambda r: -(r.float_gain or 0.0))[:ALONE if first_round else 0]
        made = self.batch([("sensitivity", f"'{r.node}' alone quantized", method,
                            Overrides({"*": NodeOverride(precision="float"), r.node: NodeOverride(precision="int8")}, {})) for r in first])
        for r, t in zip(first, made):
            r.alone_cosine = t.metrics.cosine if t.metrics else None
        return measured

    def _remedy(self, r: Ranked, method: str, overrides: Overrides, best: Trial) -> tuple[str, Overrides, Trial]:
        """Each candidate for ``r`` in turn; the first that measures better by enough is kept."""
        options = list(self.bench.options(r.node, method, overrides))
        ok = lambda t: self.better(t, best) and gain(self.targets, best.metrics, t.metrics) >= max(0.25 * r.float_gain, MIN_GAIN / 2)  # noqa: E731
        made, k = self.first_kept([("remedy", c.label, c.method, overrides.merged(c.extra)) for c in options], ok)
        if k is not None:
            t, c = made[k], options[k]
            t.accepted = True
            self.changes.append(Change(r.node, c.what, f"{r.describe()}; with this change the worst-output cosine is "
                                       f"{t.metrics.cosine:.5f}", op=r.op))
            return c.method, overrides.merged(c.extra), t
        if len(made) < len(options):
            raise BudgetSpent
        return method, overrides, best
