"""Trials that run only what changed: a model's values at cut tensors on the held rows, kept once, and for each
candidate the part of its graph downstream of them.

Two rewritten models compute the same value at a tensor when the tensor's *signature* is the same in both: a digest
of the node that makes it (op, attributes) over the signatures of its inputs, down to the graph inputs and the
initializers' bytes. A candidate that keeps one node float differs from the current best only downstream of that node,
so its run starts at the last cut before it. Which nodes a candidate has to run is found by walking back from its
outputs and stopping at any tensor whose signature the anchor has values for: the result is the candidate's own
graph, cut, never an approximation of it built by hand.

What a cut can change: where onnxruntime fuses across a cut tensor in a full run (DequantizeLinear -> Conv ->
QuantizeLinear into one integer kernel), the cut run computes that tensor in float and quantizes it after: the same
value to within one step of its rounding, on a few elements. ``tests/test_cuts.py`` holds cut runs to full runs.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import onnx

from qconv import runtime
from qconv.graph import constant_tensors, submodel

CUT_BYTES = 128 * 2**20  # values held at the cuts, over all held rows, at most
QDQ = ("QuantizeLinear", "DequantizeLinear")


def enabled() -> bool:
    """``QCONV_TRIAL_CUTS=0`` runs every trial whole (what benchmarks compare against)."""
    return os.environ.get("QCONV_TRIAL_CUTS", "1") != "0"


def _tensor_digest(t: onnx.TensorProto) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{t.data_type}|{list(t.dims)}|{t.data_location}".encode())
    if t.data_location == onnx.TensorProto.EXTERNAL:
        h.update(repr([(e.key, e.value) for e in t.external_data]).encode())
    elif t.HasField("raw_data"):
        h.update(t.raw_data)
    else:
        c = onnx.TensorProto()
        c.CopyFrom(t)
        c.name = ""
        h.update(c.SerializeToString())
    return h.digest()


def signatures(model: onnx.ModelProto) -> dict[str, bytes] | None:
    """{tensor: signature} of every tensor of the main graph; None when a node holds a subgraph (its body may read
    outer tensors by name, which a digest of its attributes does not see) or draws random numbers (two runs of the
    same node then differ)."""
    g = model.graph
    sig: dict[str, bytes] = {}
    for t in g.initializer:
        sig[t.name] = b"init" + _tensor_digest(t)
    for i in g.input:  # an input of an old model that shares an initializer's name: a feed may override it
        sig[i.name] = b"input:" + i.name.encode() + sig.get(i.name, b"")
    for node in g.node:
        if "Random" in node.op_type or node.op_type in ("Multinomial", "Bernoulli"):
            return None
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{node.domain}|{node.op_type}".encode())
        for a in sorted(node.attribute, key=lambda a: a.name):
            if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                return None
            h.update(a.SerializeToString())
        for name in node.input:
            h.update(b"|" + (sig.get(name, b"?" + name.encode()) if name else b""))
        d = h.digest()
        for k, o in enumerate(node.output):
            if o:
                sig[o] = d + bytes([k % 256])
    return sig


def _spans(model: onnx.ModelProto, const: set[str]) -> dict[str, tuple[int, int]]:
    """{tensor made from the data: (index of the node that makes it, index of the last node that reads it)}; a graph
    output counts as read after the last node."""
    nodes = model.graph.node
    spans: dict[str, list[int]] = {}
    for k, n in enumerate(nodes):
        for i in n.input:
            if i in spans:
                spans[i][1] = k
        for o in n.output:
            if o and o not in const:
                spans[o] = [k, k]
    for o in model.graph.output:
        if o.name in spans:
            spans[o.name][1] = len(nodes)
    return {t: (a, b) for t, (a, b) in spans.items()}


def live_at(model: onnx.ModelProto, index: int, const: set[str] | None = None) -> list[str]:
    """Tensors made by nodes before ``index`` from the data (not from constants alone) and read by a node at or after
    it (or by the graph's outputs): what a run that starts at node ``index`` needs besides the graph inputs and the
    initializers."""
    const = constant_tensors(model) if const is None else const
    return [t for t, (a, b) in _spans(model, const).items() if a < index <= b]


def unsafe_tensors(model: onnx.ModelProto) -> set[str]:
    """Tensors a full run may never compute on their own, so a cut there would not see the full run's value: a
    DequantizeLinear's output (onnxruntime fuses it into its consumer's integer kernel) and a tensor read only by a
    QuantizeLinear (fused into its producer: Conv -> QuantizeLinear computes the int8 output from the accumulator)."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    outputs = {o.name for o in model.graph.output}
    out = set()
    for n in model.graph.node:
        for o in n.output:
            r = readers.get(o, [])
            if n.op_type == "DequantizeLinear" or (o not in outputs and len(r) == 1 and r[0].op_type == "QuantizeLinear"):
                out.add(o)
    return out


def cut_points(model: onnx.ModelProto, starts: list[int], const: set[str], back: int = 64) -> list[list[str]]:
    """For each start index, the live tensors at the latest index at or before it (within ``back`` nodes) where no
    live tensor is unsafe: the cut a candidate that changes the nodes from that start on can run from."""
    spans = _spans(model, const)
    unsafe = unsafe_tensors(model)
    n = len(model.graph.node)
    bad = np.zeros(n + 2, np.int64)
    for t, (a, b) in spans.items():
        if t in unsafe:
            bad[a + 1] += 1
            bad[b + 1] -= 1
    bad = np.cumsum(bad)
    inputs = {i.name for i in model.graph.input}
    out, seen = [], set()
    for start in starts:
        for k in range(start, max(start - back, 0), -1):
            if bad[k] == 0:
                if k not in seen:
                    seen.add(k)
                    live = [t for t, (a, b) in spans.items() if a < k <= b and t not in inputs]
                    if live:
                        out.append(live)
                break
    return out


def starts_of(model: onnx.ModelProto, names: list[str], const: set[str] | None = None) -> list[int]:
    """Where a change to one of ``names`` can begin in a rewritten model, sorted: for each node, the first of its
    DequantizeLinear inputs (a change that keeps its inputs' quantization: weights, smoothing) and the first of the
    QuantizeLinear nodes before them (a change to an input's range or precision)."""
    nodes = model.graph.node
    const = constant_tensors(model) if const is None else const
    index = {n.name: k for k, n in enumerate(nodes)}
    producer = {o: k for k, n in enumerate(nodes) for o in n.output if o}
    out = set()
    for name in names:
        if name not in index:
            continue
        for ops in (("DequantizeLinear",), QDQ):
            first, stack = index[name], [index[name]]
            while stack:
                for t in nodes[stack.pop()].input:
                    k = producer.get(t) if t not in const else None
                    if k is not None and nodes[k].op_type in ops and k < first:
                        first = k
                        stack.append(k)
            out.add(first)
    return sorted(out)


@dataclass
class Cut:
    model: onnx.ModelProto  # the candidate's nodes downstream of the cut tensors
    inputs: dict[str, bytes]  # the cut model's input -> the signature whose kept values feed it
    feeds: list[str]  # graph inputs of the candidate the cut model still reads
    share: float  # the share of the candidate's nodes (those not computed from constants alone) it runs


class Anchor:
    """The values of one model (the current best) at cut tensors on the held rows, and cuts of other models that
    start from them."""

    def __init__(self, model: onnx.ModelProto, feeds: list[dict], threads: int, starts: list[str],
                 budget: int = CUT_BYTES):
        self.values: list[dict[bytes, np.ndarray]] = []
        self.available: set[bytes] = set()
        self.elem: dict[bytes, tuple[int, int]] = {}  # signature -> (element type, rank) of its kept values
        sig = signatures(model)
        if sig is None or not feeds:
            return
        const = constant_tensors(model)
        cuts = cut_points(model, [k for k in starts_of(model, starts, const) if k], const)
        tensors = list(dict.fromkeys(t for c in cuts for t in c))
        if not tensors:
            return
        sess = runtime.session(expose_only(model, tensors), threads, spinning=False)
        first = {t: v for t, v in zip(tensors, runtime.run(sess, feeds[0], tensors)) if isinstance(v, np.ndarray)}
        # Which cuts fit the budget (the first row's sizes times the rows): middle first, then the quarters, ...
        size = {t: v.nbytes * len(feeds) for t, v in first.items()}
        chosen: list[str] = []
        for k in _spread(len(cuts)):
            extra = [t for t in cuts[k] if t not in chosen]
            if any(t not in size for t in extra):
                continue
            if sum(size[t] for t in chosen + extra) <= budget:
                chosen.extend(extra)
        if not chosen:
            return
        order = [t for t in tensors if t in chosen]
        self.values.append({sig[t]: first[t] for t in order})
        for feed in feeds[1:]:
            self.values.append({sig[t]: v for t, v in zip(order, runtime.run(sess, feed, order))})
        self.available = set(self.values[0])
        self.elem = {sig[t]: (onnx.helper.np_dtype_to_tensor_dtype(first[t].dtype), first[t].ndim) for t in order}

    def cut(self, model: onnx.ModelProto) -> Cut | None:
        """The part of ``model`` to run from the kept values (None: no cut saves enough, run it whole)."""
        if not self.available:
            return None
        sig = signatures(model)
        if sig is None:
            return None
        g = model.graph
        inits = {t.name for t in g.initializer}
        graph_inputs = {i.name for i in g.input}
        producer = {o: k for k, n in enumerate(g.node) for o in n.output if o}
        needed: set[int] = set()
        cut_inputs: dict[str, bytes] = {}
        fed: set[str] = set()
        seen: set[str] = set()
        stack = [o.name for o in g.output]
        while stack:
            t = stack.pop()
            if t in seen or not t:
                continue
            seen.add(t)
            if t in graph_inputs:
                fed.add(t)
                continue
            if t in inits:
                continue
            if sig.get(t) in self.available:
                cut_inputs[t] = sig[t]
                continue
            k = producer.get(t)
            if k is None:
                return None
            needed.add(k)
            stack.extend(i for i in g.node[k].input if i)
        const = constant_tensors(model)
        data = [k for k, n in enumerate(g.node) if not all(o in const for o in n.output if o)]
        run = sum(1 for k in data if k in needed)
        if not cut_inputs or run >= len(data):
            return None
        return Cut(_cut_model(model, sorted(needed), {t: self.elem[s] for t, s in cut_inputs.items()}, fed), cut_inputs,
                   sorted(fed), run / max(len(data), 1))

    def feeds(self, cut: Cut, feeds: list[dict]):
        """The cut model's feeds for the held rows: the kept values at its cut inputs, and the graph inputs it reads."""
        renamed = {t: _cut_name(cut.model, t) for t in cut.inputs}
        for feed, values in zip(feeds, self.values):
            f = {k: feed[k] for k in cut.feeds if k in feed}  # an old model's input with an initializer may go unfed
            f.update({renamed[t]: values[s] for t, s in cut.inputs.items()})
            yield f


def expose_only(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` that outputs only the given tensors, untyped (onnxruntime types them from the nodes that
    make them, where onnx's shape inference stops at a contrib-domain 16-bit QuantizeLinear)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.output[:]
    for name in names:
        m.graph.output.add().name = name
    return m


def _cut_name(model: onnx.ModelProto, tensor: str) -> str:
    outputs = {o.name for o in model.graph.output}
    return tensor + "__qconv_cut" if tensor in outputs else tensor


def _spread(n: int) -> list[int]:
    """0..n-1 in bisection order (the middle, then the quarters, ...): cuts kept under a budget spread over the graph."""
    out, parts = [], [(0, n)]
    while parts:
        nxt = []
        for lo, hi in parts:
            if lo >= hi:
                continue
            mid = (lo + hi) // 2
            out.append(mid)
            nxt += [(lo, mid), (mid + 1, hi)]
        parts = nxt
    return out


def _cut_model(model: onnx.ModelProto, needed: list[int], cut_inputs: dict[str, tuple[int, int]], fed: list[str]) -> onnx.ModelProto:
    g = model.graph
    m = submodel(model, needed)
    sub = m.graph
    sub.input.extend(i for i in g.input if i.name in fed)
    outputs = {o.name for o in g.output}
    renamed = []
    for k, (t, (elem, rank)) in enumerate(cut_inputs.items()):
        name = _cut_name(model, t)
        sub.input.append(onnx.helper.make_tensor_value_info(name, elem, [f"cut{k}_{d}" for d in range(rank)]))
        if t in outputs:
            renamed.append(onnx.helper.make_node("Identity", [name], [t]))
    for k, node in enumerate(renamed):  # before the nodes that read them
        sub.node.insert(k, node)
    sub.output.extend(g.output)
    return m
