"""Which int8 regions pay on this CPU: the speed side of the default plan.

Given a plan, the per-row size of every activation (from the calibration's counts) and a kernel cost table, each
node the plan quantizes is a candidate for float. Its int8 and float cost come from the table: the node's own times
when the table was timed on this model (``--kernels auto``), else its op kind's (a depthwise convolution over few
channels, a uint8 MaxPool run slower in int8 than in float on onnxruntime's CPU kernels; a float activation or
residual Add right after a Conv costs nothing, onnxruntime fuses it). Every tensor that crosses between int8 and float
pays a conversion and a layout change. Choosing int8 or float for every candidate so that the sum is least is a
minimum s-t cut (each border cost is paid only when its two ends differ), solved exactly: whole regions move
together, never a lone node that would pay its borders twice. Float costs carry a margin so that int8 stays unless
float is clearly cheaper, and the result is kept only when the whole model's estimate drops by ``MIN_GAIN``.

Accuracy weighs in the same cut. Many choices are often within the table's timing noise of the fastest (four fresh
tables of PP-OCR's line classifier kept 27 to 190 nodes float, all timed at 0.79-0.80x all int8, and read 97.25 to
99.5% agreement), so which one a plan got was a toss-up. Each quantized activation is charged its rounding noise
relative to its power (read from the calibration's histogram), paid unless every int8 end of it is float, at a price
that spends at most ``ACCURACY_SHARE`` of the all-int8 estimate in all: of the choices that close to the fastest,
the cut finds the one that keeps the most noise away. The model table's A/B verdicts decide: the fastest choice is
taken when timed surely faster than all int8, and the accurate one replaces it (or all int8) when timed within
``TOLERANCE`` of it.

Float where int8 is slower never costs accuracy: the nodes that move keep float32 arithmetic. Nodes an override
fixes and subgraph bodies are not candidates, nor are MatMul and Gemm when only op kinds are priced.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import numpy as np

from qconv.graph import Graph, attr
from qconv.plan import QuantPlan
from qconv.plan.kernels import Table
from qconv.rewrite.rules.elementwise import scalar_scale

FLOAT_MARGIN = 1.10  # float must be 10% cheaper than int8 per node to move it
MIN_GAIN = 0.03  # and the whole model's estimate must drop by 3%
# Of the choices within ACCURACY_SHARE of the all-int8 estimate of the fastest one, the one that keeps float the most
# rounding noise (quantization_noise): timing noise makes choices that close a toss-up, and float is the accurate side.
ACCURACY_SHARE = 0.10
TOLERANCE = 0.03  # the accurate choice is taken when timed at most 3% slower than the fastest (or all int8)
FUSED_ACT = {"Relu", "Clip", "Sigmoid", "HardSigmoid", "LeakyRelu", "Tanh"}  # onnxruntime fuses these into a float Conv
FIXED = {"MatMul", "Gemm", "ConvTranspose"}


@dataclass
class Estimate:
    """The cost model's verdict: nodes to keep float, and the model's estimated time before and after (ns per row)."""

    floats: list[str] = field(default_factory=list)
    int8_ns: float = 0.0
    chosen_ns: float = 0.0
    float_ns: float = 0.0  # every candidate float
    by_op: list[dict] = field(default_factory=list)
    verified: dict | None = None  # the A/B timing that decided this choice, when the table holds one
    pending: dict | None = None  # an A/B the table lacks: {"float_nodes", "against"} (a new model table times it)
    noise_float: float | None = None  # the share of the rounding noise (quantization_noise) the float nodes keep away
    choice: str = ""  # which choice the floats are: "fastest" or "accurate" (empty: all int8)

    def to_dict(self, table: Table) -> dict:
        return {"table": table.summary(), "float_nodes": list(self.floats), "estimate_us": {
            "int8": round(self.int8_ns / 1e3, 3), "chosen": round(self.chosen_ns / 1e3, 3), "all_float": round(self.float_ns / 1e3, 3)},
            "by_op": self.by_op, **({"choice": self.choice} if self.choice else {}),
            **({"verified": self.verified} if self.verified else {}),
            **({"noise_float": self.noise_float} if self.noise_float is not None else {}),
            **({"pending": self.pending} if self.pending else {})}


class _Sizes:
    """Elements per row of a tensor: the calibration's count, else a static shape, else a neighbour's."""

    def __init__(self, g: Graph, counts: dict[str, float]):
        self.g, self.counts = g, counts

    def __call__(self, name: str, depth: int = 0) -> float:
        if name in self.counts:
            return self.counts[name]
        shape = self.g.shape(name)
        if shape and all(isinstance(d, int) and d > 0 for d in shape):
            return float(np.prod(shape))
        if depth > 4:
            return 0.0
        producer = self.g.producer.get(name)
        if producer is not None and producer.op_type in FUSED_ACT | {"Add", "Mul", "Div", "Sub", "BatchNormalization"}:
            return self(producer.input[0], depth + 1)
        only = self.g.only_consumer(name)
        if only is not None and only.op_type in FUSED_ACT and only.output:
            return self(only.output[0], depth + 1)
        return 0.0


def _conv_cost(node, g: Graph, table: Table, out_elements: float) -> tuple[float, float] | None:
    if len(node.input) < 2 or not g.is_constant(node.input[1]):
        return None
    w = g.initializers.get(node.input[1])
    dims = list(w.dims) if w is not None else list(g.array(node.input[1]).shape)
    if len(dims) != 4:
        return None
    cout, cin_g, kh, kw = dims
    groups = int(attr(node, "group", 1))
    if groups > 1 and cin_g == 1 and cout == groups:
        key = "conv.depthwise3" if kh * kw <= 9 else "conv.depthwise5"
        units = out_elements * (kh * kw / 25.0 if kh * kw > 25 else 1.0)
        x = float(cout)
    else:
        key = "conv.pointwise" if kh * kw == 1 else "conv.dense3"
        units = out_elements * cin_g * kh * kw
        x = float(np.sqrt(cin_g * (cout / max(groups, 1))))
    if not table.has(key):
        return None
    return table.cost(key, "int8", x, units), table.cost(key, "float", x, units)


def _costs(node, g: Graph, table: Table, size: _Sizes, plan: QuantPlan, own: bool) -> tuple[float, float]:
    """(int8 ns, float ns) of one node, without its borders: as timed in its model when the table is the model's own."""
    timed = table.node(node.name) if own else None
    if timed is not None:
        return timed
    op = node.op_type
    out = size(node.output[0]) if node.output else 0.0
    if op == "Conv":
        got = _conv_cost(node, g, table, out)
        if got:
            return got
    producer = g.producer.get(node.input[0]) if node.input else None
    after_conv = producer is not None and producer.op_type == "Conv" and len(g.consumers.get(node.input[0], [])) == 1
    if op in FUSED_ACT:
        if node.name in plan.folded or op in ("Relu", "Clip", "LeakyRelu") or not table.has("Sigmoid"):
            return 0.0, 0.0
        return table.cost("Sigmoid", "int8", 64, out), 0.0 if after_conv else table.cost("Sigmoid", "float", 64, out)
    acts = [i for i in node.input if i and not g.is_constant(i)]
    if op in ("Add", "Mul") and len(acts) == 1:  # by a constant: a scaled Mul runs no kernel, an Add a QLinearAdd
        if op == "Mul" and scalar_scale(node, g) is not None:  # the planner read it as its input with a scaled scale
            return 0.0, table.cost("MulBcast", "float", 64, out) if table.has("MulBcast") else 0.0
        key = "MulBcast" if op == "Mul" else "Add"
        return table.cost(key, "int8", 64, out), table.cost(key, "float", 64, out)
    if op in ("Add", "Mul") and len(acts) == 2:
        sizes = [size(a) for a in acts]
        key = op if min(sizes) >= max(sizes) else ("MulBcast" if op == "Mul" else "Add")
        fused = op == "Add" and any(
            (p := g.producer.get(a)) is not None and p.op_type == "Conv" and len(g.consumers.get(a, [])) == 1 for a in acts)
        return table.cost(key, "int8", 64, out), 0.0 if fused else table.cost(key, "float", 64, out)
    if op in ("MaxPool", "AveragePool", "GlobalAveragePool", "Concat") and table.has(op):
        units = size(node.input[0]) if op != "Concat" else out
        return table.cost(op, "int8", 64, units), table.cost(op, "float", 64, units)
    return 0.0, 0.0


class _Flow:
    """Max flow / min cut on a small graph (Edmonds-Karp with BFS; deterministic order)."""

    def __init__(self, n: int):
        self.n = n
        self.cap: list[dict[int, float]] = [collections.defaultdict(float) for _ in range(n)]

    def add(self, u: int, v: int, c: float) -> None:
        if c > 0:
            self.cap[u][v] += c
            self.cap[v][u] += 0.0

    def sink_side(self, s: int, t: int) -> set[int]:
        """The nodes that can still reach ``t`` after the maximum flow: the smallest sink side of a minimum cut."""
        while True:
            parent = {s: s}
            queue = collections.deque([s])
            while queue and t not in parent:
                u = queue.popleft()
                for v in sorted(self.cap[u]):
                    if v not in parent and self.cap[u][v] > 1e-9:
                        parent[v] = u
                        queue.append(v)
            if t not in parent:
                break
            path, v = [], t
            while v != s:
                path.append((parent[v], v))
                v = parent[v]
            push = min(self.cap[u][v] for u, v in path)
            for u, v in path:
                self.cap[u][v] -= push
                self.cap[v][u] += push
        reach, queue = {t}, collections.deque([t])
        while queue:
            v = queue.popleft()
            for u in sorted(self.cap[v]):  # every edge u -> v has its reverse entry in cap[v]
                if u not in reach and self.cap[u].get(v, 0.0) > 1e-9:
                    reach.add(u)
                    queue.append(u)
        return reach


def _problem(model, plan: QuantPlan, counts: dict[str, float], table: Table, fixed, own: bool, noise: dict[str, float]):
    """(candidates, int8 ns, float ns, border ns by (int8 end, float end), noise groups) of the nodes ``plan`` quantizes.
    A noise group is (candidate indices, noise) of a quantized activation whose every int8 end (its producer and
    readers) is a candidate: it stays quantized unless all of them are float."""
    g = Graph(model)
    size = _Sizes(g, counts)
    quantized = {d.name for d in plan.nodes if d.quantized}
    nodes = [n for n in model.graph.node if n.name in quantized]
    # MatMul/Gemm have no op-kind entry: they are weighed only with the model's own times
    cand = [n for n in nodes if (own or n.op_type not in FIXED) and n.name not in fixed]
    index = {n.name: k for k, n in enumerate(cand)}
    unary8, unaryf = np.zeros(len(cand)), np.zeros(len(cand))
    for n in cand:
        unary8[index[n.name]], unaryf[index[n.name]] = _costs(n, g, table, size, plan, own)
    pairs: dict[tuple[int, int], float] = collections.defaultdict(float)
    for name, t in sorted(plan.tensors.items()):
        if t.role != "activation":
            continue
        elements, producer = size(name), g.producer.get(name)
        src = index.get(producer.name) if producer is not None else None
        float_readers = [c for c in g.consumers.get(name, []) if c.name not in quantized]
        if src is not None and (float_readers or name in g.graph_outputs):
            unary8[src] += table.border(elements, into_int8=False, blocked=any(c.op_type == "Conv" for c in float_readers))
        for c in g.consumers.get(name, []):
            dst = index.get(c.name)
            if dst is None:
                continue
            if src is None:
                if producer is None or producer.name not in quantized:  # float (or graph input) into an int8 node
                    unary8[dst] += table.border(elements, into_int8=True, blocked=producer is not None and producer.op_type == "Conv")
                continue
            pairs[(src, dst)] += table.border(elements, into_int8=False, blocked=c.op_type == "Conv")  # src int8, dst float
            pairs[(dst, src)] += table.border(elements, into_int8=True, blocked=producer.op_type == "Conv")  # dst int8, src float
    by_name = {n.name: n for n in nodes}
    for act, producer_name in sorted(plan.folded.items()):  # a folded Relu/Clip split from its producer gets a Q/DQ pair
        a, b = index.get(act), index.get(producer_name)
        if a is not None and b is not None:
            elements = size(by_name[act].input[0])
            pairs[(b, a)] += table.border(elements, into_int8=False, blocked=False)
            pairs[(a, b)] += table.border(elements, into_int8=True)
    groups = []
    for name, w in sorted(noise.items()):
        ends = [n for n in [g.producer.get(name)] + list(g.consumers.get(name, [])) if n is not None and n.name in quantized]
        if ends and all(n.name in index for n in ends):
            groups.append((sorted({index[n.name] for n in ends}), w))
    return cand, unary8, unaryf, pairs, groups


def quantization_noise(plan: QuantPlan, observers: dict) -> dict[str, float]:
    """Each quantized activation's rounding noise relative to its power, (scale^2 / 12) / E[x^2] (the power read from
    the calibration's histogram), capped at 1: what keeping the tensor float saves, before any gain downstream."""
    out = {}
    for name, t in plan.tensors.items():
        if t.role != "activation" or t.qparams.qtype.bits > 8:
            continue
        o = observers.get(name)
        h = getattr(o, "hist", None)
        if h is None or not h.width or not h.counts.sum():
            continue
        centres = (h.edges[:-1] + h.edges[1:]) / 2
        power = float((h.counts * centres * centres).sum() / h.counts.sum())
        step = float(np.max(t.qparams.scale))
        out[name] = 1.0 if power <= 0 else min(1.0, step * step / 12.0 / power)
    return out


def choose(model, plan: QuantPlan, counts: dict[str, float], table: Table, fixed: set[str] = frozenset(),
           model_id: str | None = None, noise: dict[str, float] | None = None) -> Estimate:
    """The candidates to keep float (empty: int8 everywhere). A table timed on the model ``model_id`` gives its nodes'
    own times, and its A/B verdicts decide; any other gives the op kinds' times, and the estimate decides.

    Two choices are weighed. The fastest (the least estimate) is taken when it is timed surely faster than all int8
    (or, without a verdict, estimated ``MIN_GAIN`` faster); call that, or all int8, the reference. The accurate one (of
    the choices within ``ACCURACY_SHARE`` of the all-int8 estimate of the fastest, the one leaving the most of
    ``noise`` unquantized: quantization_noise) replaces the reference when timed within ``TOLERANCE`` of it (the 95%
    interval's upper end). A verdict the table lacks is left as ``pending`` (qconv.jobs.plan.time_kernels times it):
    meanwhile the fastest choice stands on its estimate, as it always did, and the accurate one is not taken."""
    own = bool(table.data.get("nodes")) and table.data.get("model_id") == model_id
    cand, unary8, unaryf, pairs, groups = _problem(model, plan, counts, table, fixed, own, noise or {})
    est = Estimate(float_ns=float(unaryf.sum()))
    if not cand:
        return est
    est.int8_ns = est.chosen_ns = cost(unary8, unaryf, pairs, np.zeros(len(cand), bool))
    names = lambda label: [n.name for n, f in zip(cand, label) if f]  # noqa: E731
    fastest = solve(unary8, unaryf * FLOAT_MARGIN, pairs)
    reference = np.zeros(len(cand), bool)
    if fastest.any() and cost(unary8, unaryf, pairs, fastest) <= est.int8_ns * (1.0 - MIN_GAIN):
        verdict = table.verdict(names(fastest), []) if own else None
        if verdict is None and own:
            est.pending = {"float_nodes": names(fastest), "against": []}
        if verdict is None or float(verdict.get("ratio_high", verdict["ratio"])) < 1.0:
            reference = fastest
        est.verified = verdict
    total = sum(w for _, w in groups)
    chosen = reference
    if total > 0 and est.pending is None:
        paid = [(ends, ACCURACY_SHARE * est.int8_ns * w / total) for ends, w in groups]
        accurate = solve(unary8, unaryf * FLOAT_MARGIN, pairs, paid)
        if accurate.any() and (accurate != reference).any() and (accurate != fastest).any():  # the fastest was judged above
            verdict = table.verdict(names(accurate), names(reference)) if own else None
            if own and verdict is None:
                est.pending = {"float_nodes": names(accurate), "against": names(reference)}
            elif verdict is not None and float(verdict.get("ratio_high", verdict["ratio"])) <= 1.0 + TOLERANCE:
                chosen, est.verified, est.choice = accurate, verdict, "accurate"
            elif verdict is None and cost(unary8, unaryf, pairs, accurate) <= cost(unary8, unaryf, pairs, reference) + TOLERANCE * est.int8_ns:
                chosen, est.choice = accurate, "accurate"  # an op-kind table: the estimate decides
        est.noise_float = round(1.0 - penalty(groups, chosen) / total, 4)
    if chosen.any():
        est.floats, est.chosen_ns = names(chosen), cost(unary8, unaryf, pairs, chosen)
        est.choice = est.choice or "fastest"
        ops = collections.Counter(n.op_type for n, f in zip(cand, chosen) if f)
        est.by_op = [{"op_type": op, "nodes": c} for op, c in sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))]
    return est


def cost(unary8, unaryf, pairs: dict, label) -> float:
    """The estimate of one labelling (True: float): each node's cost in its precision, plus every border it crosses."""
    total = float(np.where(label, unaryf, unary8).sum())
    return total + sum(c for (u, v), c in pairs.items() if not label[u] and label[v])


def solve(unary8, unaryf, pairs: dict, groups: list | None = None) -> np.ndarray:
    """The labelling (True: float) of least ``cost`` plus ``penalty`` (each group's weight, paid unless all its nodes
    are float), by a minimum s-t cut (source side int8, sink side float); of the least labellings, the one with the
    fewest float nodes."""
    n = len(unary8)
    groups = groups or []
    s, t = n + len(groups), n + len(groups) + 1
    flow = _Flow(n + len(groups) + 2)
    for j, (ends, w) in enumerate(groups):  # pay w unless every end is float: an extra node z, float only when all are
        z = n + j
        flow.add(z, t, w)
        for k in ends:
            flow.add(k, z, 1e18)
    for k in range(n):
        base = min(unaryf[k], unary8[k])
        flow.add(s, k, unaryf[k] - base)  # cut when k is float
        flow.add(k, t, unary8[k] - base)  # cut when k is int8
    for (u, v), c in sorted(pairs.items()):
        flow.add(u, v, c)  # cut when u is int8 and v float
    label = np.zeros(n, bool)
    label[sorted(k for k in flow.sink_side(s, t) if k < n)] = True
    return label


def penalty(groups: list, label) -> float:
    """What ``groups`` ((node indices, weight)) charge a labelling: each weight unless all its nodes are float."""
    return float(sum(w for ends, w in groups if not all(label[k] for k in ends)))


def counts_per_row(observers: dict, identity: dict | None) -> dict[str, float]:
    """Elements per row of every observed tensor: its count over the feeds that observed it, over the batch size
    (a calibration in several memory passes observes a tensor once per pass)."""
    batch = int(((identity or {}).get("options") or {}).get("batch_size") or 1)
    out = {}
    for k, o in observers.items():
        if getattr(o, "count", 0) and getattr(o, "batches", 0):
            out[k] = float(o.count) / o.batches / max(batch, 1)
    return out


def estimate(model, plan: QuantPlan, counts: dict[str, float], table: Table, model_id: str | None) -> tuple[float, float] | None:
    """(ns a row of ``plan``'s model, ns a row of the float model) by a table timed on this model, else None: each node
    at its int8 time where the plan quantizes it to 8 bits, its float time otherwise (a 16-bit island runs in float in
    onnxruntime), and a conversion wherever a quantized tensor meets a float node or comes from one."""
    if not (table.data.get("nodes") and table.data.get("model_id") == model_id):
        return None
    g = Graph(model)
    size = _Sizes(g, counts)
    wide = {n for n, t in plan.tensors.items() if t.role == "activation" and t.qparams.qtype.bits > 8}
    int8 = {d.name for d in plan.nodes if d.quantized}
    int8 -= {n.name for n in model.graph.node if n.name in int8 and any(i in wide for i in n.input)}
    planned = fp32 = 0.0
    for n in model.graph.node:
        t = table.node(n.name)
        if t is None:
            continue
        planned += t[0] if n.name in int8 else t[1]
        fp32 += t[1]
    for name, t in plan.tensors.items():
        if t.role != "activation":
            continue
        producer = g.producer.get(name)
        if producer is None or producer.name not in int8:
            planned += table.border(size(name), into_int8=True, blocked=producer is not None and producer.op_type == "Conv")
        for c in g.consumers.get(name, []):
            if c.name not in int8:
                planned += table.border(size(name), into_int8=False, blocked=c.op_type == "Conv")
    return planned, fp32
