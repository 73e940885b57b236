"""Where a tensor's readers stop telling values apart: the floor of its useful range.

A hard-swish ``x * clip(x + 3, 0, 6) / 6`` gives 0 for every ``x <= -3``; a Relu gives 0 for every ``x <= 0``.
When *every* reader of ``x`` is flat below some value ``t`` (its output, and so the model's, is the same for
all ``x <= t``), quantizing ``x`` on ``[t, max]`` instead of ``[min, max]`` changes no output and spends the
8 bits where they matter: on PicoDet's backbone the calibrated conv outputs reach -78 while the hard-swish
after them reads nothing below -3 (2x to 25x finer steps, for free). The planner takes the floor
slightly below ``t`` (one step of the grid) so that clamped values land at or below ``t`` exactly.

Only elementwise readers whose behaviour below ``t`` is known are followed: Relu, Clip with a constant
minimum, HardSigmoid, Add/Sub/Mul/Div by a positive scalar constant (which move ``t``), and ``x * gate``
where ``gate`` is an increasing affine function of the same ``x`` cut at zero (the hard-swish and
hard-sigmoid patterns exporters write). A graph output, a subgraph's reader or any other op: no floor.
"""

from __future__ import annotations

import math

import numpy as np

from qconv.graph import Graph, attr

MAX_DEPTH = 6


def floor_of(name: str, g: Graph, depth: int = 0) -> float | None:
    """The value below which nothing computed from tensor ``name`` changes, or None when not known."""
    if depth > MAX_DEPTH or name in g.graph_outputs or name in g.pinned:
        return None
    readers = g.consumers.get(name, [])
    if not readers:
        return None
    found = []
    for r in readers:
        t = _reader_floor(r, name, g, depth)
        if t is None:
            return None
        found.append(t)
    return min(found)


def _scalar(name: str, g: Graph) -> float | None:
    if not name or not g.is_constant(name):
        return None
    a = g.array(name)
    if a.size != 1 or a.dtype.kind != "f":
        return None
    v = float(a.reshape(-1)[0])
    return v if math.isfinite(v) else None


def _clip_min(node, g: Graph) -> float | None:
    if len(node.input) > 1 and node.input[1]:
        return _scalar(node.input[1], g)
    lo = attr(node, "min", None)
    return None if lo is None or not math.isfinite(lo) else float(lo)


def _other(node, name: str) -> str | None:
    ins = [i for i in node.input if i]
    if len(ins) != 2 or ins.count(name) != 1:
        return None
    return ins[1] if ins[0] == name else ins[0]


def _reader_floor(r, name: str, g: Graph, depth: int) -> float | None:
    if r.domain not in ("", "ai.onnx") or len(r.output) != 1:
        return None
    op = r.op_type
    if op == "Relu":
        return 0.0
    if op == "Clip" and r.input[0] == name:
        return _clip_min(r, g)
    if op == "HardSigmoid":
        alpha, beta = attr(r, "alpha", 0.2), attr(r, "beta", 0.5)
        return -beta / alpha if alpha > 0 else None
    if op not in ("Add", "Sub", "Mul", "Div"):
        return None
    other = _other(r, name)
    if other is None:
        return None
    c = _scalar(other, g)
    if c is None:
        if op == "Mul":  # x * gate(x): zero wherever the gate is
            return _zero_below(other, name, g)
        return None
    if op == "Sub" and r.input[0] != name:
        return None  # c - x decreases
    if op == "Div" and r.input[0] != name:
        return None
    t = floor_of(r.output[0], g, depth + 1)
    if t is None:
        return None
    if op == "Add":
        return t - c
    if op == "Sub":
        return t + c
    if c <= 0:
        return None
    return t / c if op == "Mul" else t * c


def _affine(v: str, x: str, g: Graph, depth: int = 0) -> tuple[float, float] | None:
    """(a, b) with ``v == a * x + b`` through scalar Add/Sub/Mul/Div, or None."""
    if v == x:
        return 1.0, 0.0
    node = g.producer.get(v)
    if node is None or depth > MAX_DEPTH or node.domain not in ("", "ai.onnx") or node.op_type not in ("Add", "Sub", "Mul", "Div"):
        return None
    ins = [i for i in node.input if i]
    if len(ins) != 2:
        return None
    k = 0 if _scalar(ins[1], g) is not None else 1 if _scalar(ins[0], g) is not None else None
    if k is None:
        return None
    c = _scalar(ins[1 - k], g)
    inner = _affine(ins[k], x, g, depth + 1)
    if inner is None:
        return None
    a, b = inner
    op = node.op_type
    if op == "Add":
        return a, b + c
    if op == "Sub":
        return (a, b - c) if k == 0 else (-a, c - b)
    if op == "Mul":
        return a * c, b * c
    if k == 0 and c != 0:  # Div by a constant
        return a / c, b / c
    return None


def _zero_below(gate: str, x: str, g: Graph, depth: int = 0) -> float | None:
    """t such that ``gate`` is exactly 0 for every ``x <= t`` (gate an increasing function of x cut at zero)."""
    node = g.producer.get(gate)
    if node is None or depth > MAX_DEPTH or node.domain not in ("", "ai.onnx"):
        return None
    op = node.op_type
    if op in ("Mul", "Div"):  # a positive scale keeps the zeros where they are
        ins = [i for i in node.input if i]
        if len(ins) != 2:
            return None
        k = 0 if _scalar(ins[1], g) is not None else 1 if op == "Mul" and _scalar(ins[0], g) is not None else None
        if k is None or _scalar(ins[1 - k], g) <= 0:
            return None
        return _zero_below(ins[k], x, g, depth + 1)
    if op == "HardSigmoid":
        lin = _affine(node.input[0], x, g)
        alpha, beta = attr(node, "alpha", 0.2), attr(node, "beta", 0.5)
        inner = None if lin is None else (lin[0] * alpha, lin[1] * alpha + beta)
    elif op == "Relu" or (op == "Clip" and _clip_min(node, g) == 0.0):
        inner = _affine(node.input[0], x, g)
    else:
        return None
    if inner is None or inner[0] <= 0:
        return None
    return -inner[1] / inner[0]


def floored(lo: float, hi: float, t: float | None, levels: int) -> float:
    """The range's low end with floor ``t``: one grid step below ``t``, never above the observed minimum."""
    if t is None or not lo < t < hi:
        return lo
    step = (hi - t) / max(levels - 1, 1)
    low = np.float32(max(lo, t - step))
    if low > t:  # float32 rounding must not lift it above the floor
        low = np.nextafter(np.float32(t), np.float32(-np.inf))
    return max(float(low), lo)  # in float64: numpy would compare a float32 with a Python float in float32
