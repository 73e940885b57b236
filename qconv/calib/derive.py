"""Tensors whose statistics follow exactly from another tensor's: calibration observes the one and computes the rest.

A tensor made from another by a copy that keeps the flattened order (Reshape, Squeeze, ...) holds the same values; one made by a monotone
elementwise op with constant operands (Relu, Clip, Neg, LeakyRelu, Add/Sub/Mul/Div by a float scalar) holds f(x) for
each value x, and f maps the extremes of x to its own extremes (swapped when f decreases). Every such f is one IEEE
float32 operation per step (a rounded add, multiply or divide, a comparison), which onnxruntime's own kernels compute
the same way, so the derived extremes and histogram sample are bit-identical to what observing the tensor gives
(tests/test_ingraph.py). Not observing them also lets onnxruntime fuse more of the model (a MatMul with the Div
after it, a LayerNorm): then the observed tensors themselves are computed as the fused float model computes them,
which can differ from an unfused run by float rounding.

Observing fewer tensors is most of what makes calibration cheap: an observed tensor is read again after it is made,
and the chains of scalar ops a hard-swish or a normalization makes (x + 3, clip, / 6) can then no longer run in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from qconv.graph import Graph, attr

# Copies that keep the flattened order: a derived tensor's histogram sample is then the values at the same positions
# as observing it would sample, so a file never depends on whether a tensor was derived or observed (a tensor whose
# source held inf/NaN in one shard is observed there). Transpose permutes: it is observed.
COPIES = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"})
_ARITH = {"Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div"}


@dataclass(frozen=True)
class Step:
    """One exact elementwise op: ``op`` in copy, add, sub, rsub (c - x), mul, div, clip, relu, neg, leaky."""

    op: str
    a: float = 0.0  # the constant (clip: the low bound; leaky: alpha)
    b: float = 0.0  # clip: the high bound

    def __post_init__(self):
        object.__setattr__(self, "_f32", (np.float32(self.a), np.float32(self.b)))  # once, not on every batch

    def apply(self, x):
        """f(x) in float32, elementwise (``x`` an array or a float32 scalar)."""
        a, b = self._f32
        x = np.asarray(x, dtype=np.float32)
        if self.op == "copy":
            return x
        if self.op == "add":
            return x + a
        if self.op == "sub":
            return x - a
        if self.op == "rsub":
            return a - x
        if self.op == "mul":
            return x * a
        if self.op == "div":
            return x / a
        if self.op == "clip":
            return np.minimum(np.maximum(x, a), b)
        if self.op == "relu":
            return np.maximum(x, np.float32(0))
        if self.op == "neg":
            return -x
        if self.op == "leaky":
            return np.where(x >= 0, x, x * a)
        raise ValueError(f"unknown step {self.op}")

    @property
    def decreasing(self) -> bool:
        return self.op in ("rsub", "neg") or (self.op in ("mul", "div") and self.a < 0)


def extremes(steps: tuple[Step, ...], lo: float, hi: float) -> tuple[float, float]:
    """The extremes of f(x) for x with extremes ``lo``, ``hi`` (f = the steps in order): both ends as one float32 pair
    through each step (elementwise: the same values as one at a time), swapped after a decreasing one."""
    a, b = extremes_rows(steps, np.float32(lo), np.float32(hi))
    return float(a), float(b)


def extremes_rows(steps: tuple[Step, ...], lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``extremes`` of several batches at once (``lo``, ``hi``: float32 [rows]): the same float32 operations, row by row."""
    v = np.stack([lo, hi]).astype(np.float32, copy=False)
    for s in steps:
        v = s.apply(v)
        if s.decreasing:
            v = v[::-1]
    return v[0], v[1]


def values(steps: tuple[Step, ...], x: np.ndarray) -> np.ndarray:
    for s in steps:
        x = s.apply(x)
    return x


def followers(derived: dict[str, tuple[str, tuple[Step, ...]]]) -> dict[str, list[tuple[str, str | None, tuple[Step, ...]]]]:
    """``chains``' result grouped by the observed tensor each follows from: per root, (tensor, the follower whose steps
    its own extend, the longest such, or None for the root itself; the steps past it), each after that follower. A
    batch's values and extremes of each follower are then computed from that follower's by the steps past it: the same
    float32 operations in the same order as from the root, but a hard-swish's ``+ 3``, clip and ``/ 6`` are applied
    once, not once for every tensor down the chain (PP-OCRv4 rec: 5.3 steps a derived tensor and batch -> 1)."""
    out: dict[str, list] = {}
    for t, (root, steps) in derived.items():
        out.setdefault(root, []).append((t, steps))
    planned = {}
    for root, group in out.items():
        done: list[tuple[str, tuple[Step, ...]]] = []
        placed = []
        for t, steps in sorted(group, key=lambda f: len(f[1])):  # stable: graph order among equals
            parent, base = None, ()
            for u, s in done:  # shorter or as long (sorted): the longest prefix, the first of equals
                if steps[:len(s)] == s and (parent is None or len(s) > len(base)):
                    parent, base = u, s
            placed.append((t, parent, steps[len(base):]))
            done.append((t, steps))
        planned[root] = placed
    return planned


def _scalar(g: Graph, name: str) -> float | None:
    """The value of a float32 constant holding one element, else None."""
    if not name or not g.is_constant(name) or g.initializers[name].data_type != onnx.TensorProto.FLOAT:
        return None
    a = g.array(name)
    return float(a.reshape(-1)[0]) if a.size == 1 else None


def step_of(node: onnx.NodeProto, g: Graph) -> tuple[str, Step] | None:
    """(the input it reads, the step) when ``node``'s float output is an exact monotone function of one input."""
    op, ins = node.op_type, list(node.input)
    if len(node.output) != 1 or not ins or not ins[0]:
        return None
    if op in COPIES:
        return ins[0], Step("copy")
    if op == "Relu":
        return ins[0], Step("relu")
    if op == "Neg":
        return ins[0], Step("neg")
    if op == "LeakyRelu":
        alpha = float(attr(node, "alpha", 0.01))
        return (ins[0], Step("leaky", alpha)) if alpha >= 0 else None
    if op == "Clip":
        if len(ins) > 1 or any(a.name in ("min", "max") for a in node.attribute):
            lo = _scalar(g, ins[1]) if len(ins) > 1 and ins[1] else attr(node, "min", -np.inf)
            hi = _scalar(g, ins[2]) if len(ins) > 2 and ins[2] else attr(node, "max", np.inf)
            if lo is None or hi is None:
                return None
            return ins[0], Step("clip", float(lo), float(hi))
        return ins[0], Step("copy")
    if op in _ARITH and len(ins) == 2:
        first, second = _scalar(g, ins[0]), _scalar(g, ins[1])
        if second is not None and first is None:
            return ins[0], Step(_ARITH[op], second)
        if first is not None and second is None and op in ("Add", "Mul"):
            return ins[1], Step(_ARITH[op], first)
        if first is not None and second is None and op == "Sub":
            return ins[1], Step("rsub", first)
    return None


def chains(model: onnx.ModelProto, names: list[str]) -> dict[str, tuple[str, tuple[Step, ...]]]:
    """For each of ``names`` (float tensors of the main graph) that follows exactly from another of them, or from a
    tensor such a chain starts at: name -> (the observed tensor it follows from, the steps in order). The tensors not
    in the result are the ones to observe. Each target is resolved only through tensors observed or derived anyway,
    so deriving never adds an observation (a Conv output a Relu absorbs stays unobserved, and fused)."""
    g = Graph(model)
    have = {}  # tensor -> (root, steps): observed roots map to themselves
    wanted = set(names)
    out = {}
    order = {o: k for k, node in enumerate(model.graph.node) for o in node.output}
    for name in sorted(wanted, key=lambda n: order.get(n, -1)):
        path, t = [], name
        while t not in have:
            node = g.producer.get(t)
            found = step_of(node, g) if node is not None and g.is_float(t) else None
            if found is None or not g.is_float(found[0]):
                break
            t, step = found
            path.append(step)
        if t in have and path:
            root, steps = have[t]
            out[name] = (root, steps + tuple(reversed(path)))
            have[name] = out[name]
        else:
            have[name] = (name, ())
    return out
