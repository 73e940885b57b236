"""Where candidates become models and models become numbers: each candidate is planned, rewritten and *run* by
onnxruntime on the held rows (whose float outputs were computed once), and the sensitivity maps and time costs the
search ranks by are measured here. The search itself (``qconv.tune.search``) sees only this class's five methods, so
its unit tests drive it with a fake lab."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
import threading
import time
from typing import Iterator

import numpy as np
import onnx

from qconv import pipeline, runtime
from qconv.errors import QconvError
from qconv.graph import Graph
from qconv.measure import cuts
from qconv.measure.compare import limited
from qconv.measure.layers import probe_pairs
from qconv.measure.stats import ErrorStats
from qconv.measure.tally import Metrics
from qconv.plan import kernels, regions
from qconv.plan.overrides import Overrides
from qconv.rewrite.rules import ANCHORS, SHARED
from qconv.tune.remedies import Context, proposals
from qconv.measure.slices import concat_parts, output_concat
from qconv.tune.sensitivity import Site, groups, rank
from qconv.tune.trial import Candidate, Group, Ranked, TrialCache

RANK_ROWS = 8  # held rows the sensitivity pass runs on
TIMED_SECONDS = 5.0  # A/B rounds of Lab.timed past its first 10


class Lab:
    def __init__(self, prepared: pipeline.Prepared, ctx: Context, cache: TrialCache, ident: str):
        self.prepared, self.ctx, self.cache, self.ident = prepared, ctx, cache, ident
        self._last = None  # (key, result) of the last candidate built: ranking and costs rebuild the current best
        self._ranked = None  # (key, ranked nodes) of the last ranking
        self._anchor = None  # (method, overrides, nodes) the next candidates change, until measured: cuts.Anchor
        self.share = 1.0  # the share of the last measured candidate's graph that ran (below 1: from a cut)
        self._building = threading.Lock()  # candidates are planned and rewritten one at a time (shared caches)

    def key(self, method: str, overrides: Overrides) -> str:
        return hashlib.sha256(f"{self.ident}|{method}|{self.ctx.config.percentile}|{overrides.digest()}".encode()).hexdigest()

    def candidate(self, method: str, overrides: Overrides) -> pipeline.Result:
        key = (method, overrides.digest())
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        config = dataclasses.replace(self.ctx.config, method=method)
        result = pipeline.apply(self.prepared, pipeline.plan(self.prepared, self.ctx.stats, config, overrides, "tuning"), check=False)
        self._last = (key, result)
        return result

    def speed(self, method: str, overrides: Overrides) -> float | None:
        """The candidate's time as a multiple of the float model's, estimated by the kernel table timed on this model
        (qconv.plan.regions.estimate; None without one): what a speed target refuses a candidate by before any A/B."""
        table = kernels.load(self.ctx.config.kernels, self.prepared.kernel_id)  # per graph variant (--equalize's pairs)
        stats = self.ctx.stats
        if table is None or stats is None or not stats.observers:
            return None
        if self._last is not None and self._last[0] == (method, overrides.digest()):
            plan = self._last[1].plan  # the candidate just measured: its plan is built already
        else:
            plan = pipeline.plan(self.prepared, stats, dataclasses.replace(self.ctx.config, method=method), overrides, "tuning")
        got = regions.estimate(self.prepared.model, plan, regions.counts_per_row(stats.observers, stats.identity), table,
                               self.prepared.kernel_id)
        return None if got is None or got[1] <= 0 else got[0] / got[1]

    def smoothed_all(self, method: str, overrides: Overrides, alpha: float) -> Overrides | None:
        """The overrides that smooth every MatMul/Gemm weight input ``overrides`` leaves alone, at ``alpha``
        (remedies.smooth.smoothing_all): the search's SmoothQuant group move."""
        from qconv.tune.remedies.smooth import smoothing_all

        if self.prepared.smoothing:  # the default smoothed them already, each at its own alpha
            return None
        return smoothing_all(self.ctx, alpha, overrides)

    def timed(self, method: str, overrides: Overrides) -> float:
        """The candidate's time as a multiple of the float model's, measured: A/B rounds on the first held feed (a
        short timing: at least 10 rounds, about 5 s), what calibrates the kernel table's estimates (SpeedGuard)."""
        from qconv.measure.latency import latency

        threads = self.ctx.threads
        model = self.candidate(method, overrides).model
        got = latency(runtime.session(self.prepared.model, threads, spinning=False, prepack=True),
                      runtime.session(model, threads, spinning=False, prepack=True), self.ctx.held.feeds[0], threads,
                      min_rounds=10, budget_s=TIMED_SECONDS)
        return float(got["ratio"])

    def anchor(self, method: str, overrides: Overrides, nodes: list[str]) -> None:
        """The candidates that follow change ``nodes`` of this one (the current best): its values at the cuts before
        them are kept on the first trial, and each candidate then runs only its graph after the last cut it shares."""
        self._anchor = (method, overrides, list(nodes)) if cuts.enabled() else None

    def lanes(self) -> int:
        """Candidates measured at once: two sessions of half the threads each (on 2 cores, two one-thread runs of a
        batch-1 model do twice the work of one two-thread run), the next candidate built while the other runs.
        ``QCONV_TRIAL_LANES=1`` measures one at a time (what benchmarks compare against)."""
        if os.environ.get("QCONV_TRIAL_LANES") == "1":
            return 1
        return 2 if self.ctx.threads >= 2 else 1

    def measure(self, method: str, overrides: Overrides) -> Metrics:
        """The candidate's worst-output metrics on the held rows (QconvError when it cannot be built). After it,
        ``share`` is the share of the candidate's graph that ran (below 1 when it ran from a cut)."""
        sess, cut, feeds = self._prepare(method, overrides, self.ctx.threads)
        self.share = cut.share if cut is not None else 1.0
        return self._run(sess, feeds)

    def measure_many(self, cands: list[tuple[str, Overrides]], go=lambda: True) -> list[tuple]:
        """(metrics or None, error or None, share, seconds) of each candidate in order, ``lanes()`` at a time, while
        ``go()``: the prefix measured. Candidates are built one at a time (planning and rewriting share this lab's
        caches); their onnxruntime runs overlap."""
        lanes = self.lanes()
        threads = max(1, self.ctx.threads // lanes)
        out: list = [None] * len(cands)
        claim = threading.Lock()
        state = {"next": 0, "stop": False}

        def lane():
            while True:
                with claim:
                    k = state["next"]
                    if k >= len(cands) or state["stop"] or (k > 0 and not go()):
                        state["stop"] = True
                        return
                    state["next"] = k + 1
                t0 = time.perf_counter()
                try:
                    with self._building:
                        sess, cut, feeds = self._prepare(*cands[k], threads)
                    out[k] = (self._run(sess, feeds), None, cut.share if cut is not None else 1.0, time.perf_counter() - t0)
                except QconvError as exc:
                    out[k] = (None, str(exc), None, time.perf_counter() - t0)
                except BaseException as exc:  # noqa: BLE001 - a bug: raised again in the caller's thread
                    failed.append(exc)
                    with claim:
                        state["stop"] = True
                    return

        failed: list[BaseException] = []
        workers = [threading.Thread(target=lane, daemon=True) for _ in range(lanes)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        if failed:
            raise failed[0]
        return list(itertools.takewhile(lambda got: got is not None, out))

    def _prepare(self, method: str, overrides: Overrides, threads: int):
        """(a session of the candidate, or of its cut when it runs from the anchor's values; the cut or None; the
        cut's feeds for the held rows or None)."""
        model = self.candidate(method, overrides).model
        anchor = self._anchored()
        cut = anchor.cut(model) if anchor is not None else None
        if cut is None:
            return runtime.session(model, threads, spinning=False), None, None
        return runtime.session(cut.model, threads, spinning=False), cut, anchor.feeds(cut, self.ctx.held.feeds)

    def _run(self, sess, feeds) -> Metrics:
        held = self.ctx.held
        return held.compare(sess, feeds).metrics(labelled=held.labels is not None)

    def _anchored(self) -> cuts.Anchor | None:
        if isinstance(self._anchor, tuple):
            method, overrides, nodes = self._anchor
            model = self.candidate(method, overrides).model
            self._anchor = cuts.Anchor(model, self.ctx.held.feeds, self.ctx.threads, nodes)
        return self._anchor

    def measure_plan(self, plan) -> Metrics:
        """A complete plan (e.g. with bias corrections) on the held rows."""
        held = self.ctx.held
        sess = runtime.session(pipeline.apply(self.prepared, plan, check=False).model, self.ctx.threads, spinning=False)
        return held.compare(sess).metrics(labelled=held.labels is not None)

    def options(self, node: str, method: str, overrides: Overrides) -> Iterator[Candidate]:
        yield from proposals(self.ctx, self.ctx.nodes[node], method, overrides)

    def groups(self, method: str, overrides: Overrides) -> list[Group]:
        """Op-type groups of the quantized nodes not overridden yet (not Conv/MatMul/Gemm: the speed), and each output
        Concat with the nodes that make its parts, by their summed error on the current candidate."""
        ranked = [r for r in self.rank(method, overrides) if r.node not in overrides.nodes]
        g = self.ctx.graph
        heads: dict[str, list[str]] = {}
        for part, (out, _) in concat_parts(self.prepared.model).items():
            nodes = heads.setdefault(f"output '{out}': its Concat and the nodes that make its parts", [output_concat(g, out).name])
            maker = g.producer.get(part)
            if maker is not None:
                nodes.append(maker.name)
        return groups(ranked, {k: tuple(v) for k, v in heads.items()}, set(ANCHORS))

    def rank(self, method: str, overrides: Overrides) -> list[Ranked]:
        """Quantized nodes by the error each adds, from one pass of the float and the QDQ analysis model (kept for
        the candidate it was measured on)."""
        key = (method, overrides.digest())
        if self._ranked is None or self._ranked[0] != key:
            self._ranked = (key, self._rank(method, overrides))
        return [dataclasses.replace(r) for r in self._ranked[1]]

    def _rank(self, method: str, overrides: Overrides) -> list[Ranked]:
        result = self.candidate(method, overrides)
        sqnr, shapes = self._error_map(result)
        plan = result.plan
        by_name = self.ctx.nodes
        for act, producer in plan.folded.items():  # a folded Relu's output has its producer's shape
            if by_name[act].output[0] in shapes:
                shapes.setdefault(by_name[producer].output[0], shapes[by_name[act].output[0]])
        macs = node_macs(self.prepared.model, shapes)
        g = self.ctx.graph
        folded_into = {v: k for k, v in plan.folded.items()}  # producer -> its folded activation
        sites = []
        for d in plan.nodes:
            node = by_name.get(d.name)
            if node is None or not d.quantized or d.name in plan.folded or node.op_type in SHARED or not node.output:
                continue
            out = by_name[folded_into[d.name]].output[0] if d.name in folded_into else node.output[0]
            sites.append(Site(d.name, node.op_type, out, tuple(i for i in node.input if i and not g.is_constant(i)),
                              macs.get(d.name, 0.0)))
        return rank(sites, sqnr, sum(macs.values()))

    def _error_map(self, result: pipeline.Result) -> tuple[dict[str, float], dict[str, tuple]]:
        """SQNR of every probed tensor and model output (float model vs QDQ analysis model), and their shapes."""
        model = self.prepared.model
        ftypes = self.ctx.graph.types
        qtypes = {**ftypes, **{dq: onnx.TensorProto.FLOAT for dq in result.dequantized.values()}}
        pairs = probe_pairs(model, result.analysis_model, result.dequantized, ftypes, qtypes)
        fl = runtime.exposed_session(model, {t: onnx.TensorProto.FLOAT for t in pairs}, self.ctx.threads)
        ql = runtime.exposed_session(result.analysis_model, dict(pairs.values()), self.ctx.threads)
        held = self.ctx.held
        feeds = list(limited(held.feeds, self.ctx.specs, RANK_ROWS))
        outs = [o for o, v in zip(held.names, held.outputs[0]) if isinstance(v, np.ndarray) and v.dtype.kind == "f"]
        fetch_f, fetch_q = list(pairs) + outs, [q for q, _ in pairs.values()] + outs
        stats = {t: ErrorStats() for t in fetch_f}
        shapes: dict[str, tuple] = {}
        for feed in feeds:
            for t, r, q in zip(fetch_f, runtime.run(fl, feed, fetch_f), runtime.run(ql, feed, fetch_q)):
                stats[t].update(r, q)
                shapes.setdefault(t, tuple(r.shape))
        return {t: s.sqnr_db for t, s in stats.items() if s.count}, shapes

    def costs(self, method: str, overrides: Overrides) -> dict[str, float]:
        """The share of the float model's time each node would give back in float (float kernel time minus int8
        kernel time, from onnxruntime's profiler on one held feed), measured once and kept in the trial cache (so a
        re-run orders the same way)."""
        key = f"profile|{self.ident}"
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        from qconv.measure import profile as prof

        result = self.candidate(method, overrides)
        feed, threads = self.ctx.held.feeds[0], self.ctx.threads
        f = prof.by_node(prof.attribute(prof.profile(self.prepared.model, feed, threads), self.prepared.model))
        q = prof.by_node(prof.attribute(prof.profile(result.model, feed, threads), self.prepared.model))
        for act, producer in result.plan.folded.items():  # onnxruntime reports a fused Conv+Relu under the Relu
            for d in (f, q):
                if act in d:
                    d[producer] = d.get(producer, 0.0) + d.pop(act)
        total = sum(f.values()) or 1.0
        costs = {n: round(max(0.0, f.get(n, 0.0) - q.get(n, 0.0)) / total, 6) for n in set(f) | set(q)}
        self.cache.put(key, costs)
        return costs


def node_macs(model: onnx.ModelProto, shapes: dict[str, tuple]) -> dict[str, float]:
    """Multiply-accumulates per node from the output shapes of one run (weights' sizes for Conv/MatMul/Gemm)."""
    g = Graph(model)
    out = {}
    for node in model.graph.node:
        shape = shapes.get(node.output[0]) if node.output else None
        elems = float(np.prod(shape)) if shape is not None else 0.0
        if node.op_type in ANCHORS and len(node.input) > 1 and g.is_constant(node.input[1]):
            w = g.array(node.input[1])
            per = w.size / max(1, w.shape[0]) if node.op_type in ("Conv", "ConvTranspose") else (w.shape[-2] if w.ndim >= 2 else w.size)
            out[node.name] = elems * float(per)
        else:
            out[node.name] = elems
    return out
