"""Learned weight rounding for the static int8 modes (``--rounding gptq``): which integer each weight takes, chosen
for the layer's output rather than for the weight alone. Same graph, same scales, same speed.

Rounding every weight to nearest minimizes each weight's own error, but a layer's output is ``x W``: errors of
weights that multiply correlated inputs add up or cancel. With the second moment of the layer's inputs
``H = sum x x^T`` over calibration rows, GPTQ's update (Frantar & Alistarh 2022, after Optimal Brain Quantization;
the same rounding qconv's int4 mode uses, ``qconv.numeric.gptq``) rounds one input feature at a time and moves its
error onto the features not rounded yet, weighted by ``H^-1``, which lowers ``tr(D^T H D)``, the layer's output
error on those rows (D is the weight's error). AdaRound (Nagel et al. 2020) learns the same up/down choices by
gradient descent over many iterations per layer; GPTQ takes one pass and one Cholesky factor per layer.

- Targets: every quantized Conv (grouped and depthwise ones per group), Gemm and 2-D MatMul whose constant weight
  has 8-bit integer parameters in the plan and no other reader. The plan's scales are kept: only integers move.
- Inputs: the float model's, on the first ``MAX_ROWS`` calibration rows. A Conv's features are its im2col patches;
  positions are taken evenly spaced, about ``SAMPLES_PER_FEATURE`` per feature in all (at least ``MIN_SAMPLES``),
  so the cost of a layer does not grow with the image.
- Memory: layers are taken in groups whose exposed inputs (one row) and Hessians fit ``max_memory``; one float pass
  over the rows per group, as calibration does.
- A layer keeps the learned integers only when its output error on its own rows, ``tr(D^T H D)``, is below
  nearest rounding's; features the rows never fed keep nearest.
- The plan records each weight's integers as differences from nearest (``TensorPlan.rounding``), so ``--plan``
  reproduces the model without data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np
import onnx
from numpy.lib.stride_tricks import sliding_window_view

from qconv.adjust.bias import quantized_layers, rows_of
from qconv.graph import FLOAT, Graph, attr
from qconv.numeric import pairs, qmath, rounding
from qconv.numeric.gptq import LAZY_ROWS, gptq_fixed, gptq_fixed_stack
from qconv.plan import QuantPlan
from qconv.runtime import exposed_session, run

MAX_ROWS = 32
MIN_SAMPLES = 2048  # input vectors per layer at least (where the rows have them)
SAMPLES_PER_FEATURE = 4  # ... and about this many per weight row (K), so H is well conditioned
CHUNK_VALUES = 1 << 23  # floats of im2col patches formed at once
PERCDAMP = 0.01


@dataclass(frozen=True)
class Target:
    """One layer whose weight is rounded: its input, its weight, and how the weight maps to [K, N] matrices."""

    node: str
    op: str
    x: str
    w: str
    shape: tuple[int, ...]  # the weight's, as stored
    groups: int = 1  # Conv groups: one matrix and one Hessian each
    trans: bool = False  # the weight is stored [N, K] (Gemm transB, Conv): transpose to [K, N]
    conv: dict = field(default_factory=dict)  # kernel, strides, dilations, pads (begin..., end...) or auto_pad

    @property
    def features(self) -> int:
        """K of one matrix."""
        if self.op == "Conv":
            return int(np.prod(self.shape[1:]))
        return int(self.shape[0] if not self.trans else self.shape[1])


def targets(model: onnx.ModelProto, plan: QuantPlan) -> list[Target]:
    """The main graph's layers learned rounding can round, in graph order."""
    out = []
    for g, node, tx, tw in quantized_layers(model, plan):
        w = node.input[1]
        if tw.consumers != [node.name] or len(g.consumers.get(w, [])) != 1 or tw.qparams.qtype.bits > 8:
            continue
        t = _target(node, tuple(g.initializers[w].dims), tw.qparams)
        if t is not None:
            out.append(t)
    return out


def _target(node: onnx.NodeProto, shape: tuple[int, ...], qp: qmath.QParams) -> Target | None:
    per_channel = qp.scale.ndim > 0 and qp.scale.size > 1
    if node.op_type == "MatMul":
        if len(shape) != 2 or (per_channel and qp.axis not in (1, -1)):
            return None
        return Target(node.name, "MatMul", node.input[0], node.input[1], shape)
    if node.op_type == "Gemm":
        trans = bool(attr(node, "transB", 0))
        if attr(node, "transA", 0) or len(shape) != 2 or (per_channel and qp.axis != (0 if trans else 1)):
            return None
        return Target(node.name, "Gemm", node.input[0], node.input[1], shape, trans=trans)
    if len(shape) < 3 or (per_channel and qp.axis != 0):
        return None
    spatial = len(shape) - 2
    kernel = [int(k) for k in shape[2:]]
    conv = {"kernel": kernel, "strides": list(attr(node, "strides", None) or [1] * spatial),
            "dilations": list(attr(node, "dilations", None) or [1] * spatial),
            "pads": list(attr(node, "pads", None) or [0] * (2 * spatial)),
            "auto_pad": attr(node, "auto_pad", b"NOTSET")}
    if isinstance(conv["auto_pad"], bytes):
        conv["auto_pad"] = conv["auto_pad"].decode()
    return Target(node.name, "Conv", node.input[0], node.input[1], shape, int(attr(node, "group", 1)), True, conv)


# ---- inputs: the rows a layer's Hessian is taken on

def _conv_patches(x: np.ndarray, t: Target, count: int) -> Iterable[np.ndarray]:
    """About ``count`` im2col patches of ``x [N, C, *S]``, evenly spaced over its output positions, in chunks
    [s, C, *kernel] (feature order (c, k...) as the weight [M, C/g, *kernel] is flattened)."""
    c = t.conv
    spatial = x.ndim - 2
    kernel, strides, dil = c["kernel"], c["strides"], c["dilations"]
    eff = [(k - 1) * d + 1 for k, d in zip(kernel, dil)]
    size = x.shape[2:]
    if c["auto_pad"] in ("SAME_UPPER", "SAME_LOWER"):
        total = [max(0, (-(-n // s) - 1) * s + e - n) for n, s, e in zip(size, strides, eff)]
        small = [p // 2 for p in total]
        begin = small if c["auto_pad"] == "SAME_UPPER" else [p - b for p, b in zip(total, small)]
        end = [p - b for p, b in zip(total, begin)]
    elif c["auto_pad"] == "VALID":
        begin = end = [0] * spatial
    else:
        begin, end = c["pads"][:spatial], c["pads"][spatial:]
    xp = np.pad(x, [(0, 0), (0, 0)] + list(zip(begin, end))) if any(begin) or any(end) else x
    out = [(n + b + e - k) // s + 1 for n, b, e, k, s in zip(size, begin, end, eff, strides)]
    if min(out) < 1:
        return
    windows = sliding_window_view(xp, eff, axis=tuple(range(2, 2 + spatial)))  # [N, C, *positions, *eff]
    positions = int(np.prod([x.shape[0]] + out))
    pick = np.unique(np.linspace(0, positions - 1, min(positions, count)).round().astype(np.int64))
    per = max(1, CHUNK_VALUES // max(1, x.shape[1] * int(np.prod(eff))))
    taps = (Ellipsis,) + tuple(slice(None, None, d) for d in dil)
    for start in range(0, pick.size, per):
        idx = np.unravel_index(pick[start:start + per], [x.shape[0]] + out)
        where = (idx[0], slice(None)) + tuple(i * s for i, s in zip(idx[1:], strides))
        yield np.ascontiguousarray(windows[where][taps], dtype=np.float32)  # [s, C, *kernel]


def _samples(x: np.ndarray, t: Target, k: int, count: int) -> Iterable[np.ndarray]:
    """Input vectors of ``t`` from one row's ``x``, as [s, groups, K] chunks."""
    if t.op == "Conv":
        for p in _conv_patches(x, t, count):
            yield p.reshape(p.shape[0], t.groups, k)
        return
    rows = x.reshape(-1, k)
    pick = np.unique(np.linspace(0, rows.shape[0] - 1, min(rows.shape[0], count)).round().astype(np.int64))
    step = max(1, CHUNK_VALUES // k)
    for start in range(0, pick.size, step):
        yield np.ascontiguousarray(rows[pick[start:start + step]], dtype=np.float32)[:, None, :]


class Moments:
    """``sum x x^T`` per group, in float64 (each chunk's product in float32)."""

    def __init__(self, groups: int, k: int):
        self.h = np.zeros((groups, k, k), np.float64)
        self.n = 0

    def add(self, chunk: np.ndarray) -> None:  # [s, groups, K]
        xg = chunk.transpose(1, 0, 2)
        self.h += np.matmul(xg.transpose(0, 2, 1), xg)
        self.n += chunk.shape[0]


# ---- rounding one layer

@dataclass
class Rounded:
    """A layer's result: the integers' differences from nearest, and the output error of both on its rows."""

    deltas: np.ndarray
    error_nearest: float
    error_learned: float
    samples: int

    @property
    def moved(self) -> int:
        return int(np.count_nonzero(self.deltas))


def _columns(qp: qmath.QParams, cols: slice, n: int) -> qmath.QParams:
    """The parameters of output channels ``cols`` as one per column of a [K, n] matrix."""
    scale, zp = qp.scale.reshape(-1), qp.zero_point.reshape(-1)
    if scale.size > 1:
        return qmath.QParams(scale[cols].astype(np.float32), zp[cols], qp.qtype)
    return qmath.QParams(np.full(n, scale[0], np.float32), np.full(n, zp[0], dtype=zp.dtype), qp.qtype)


def _error(w: np.ndarray, q: np.ndarray, qp: qmath.QParams, h: np.ndarray) -> float:
    """The output error ``tr(D^T H D)`` of integers ``q`` for one [K, N] matrix (``_errors`` of a stack of one)."""
    return float(_errors(w[None], q[None], qp, h[None])[0])


def round_layer(w: np.ndarray, t: Target, qp: qmath.QParams, moments: Moments, pair_safe: bool = True) -> Rounded:
    """GPTQ's integers for weight ``w`` (as stored) with the plan's ``qp``, group by group; a group keeps nearest
    rounding where GPTQ's output error on its Hessian is not lower. ``pair_safe``: an output channel where a step
    would let two adjacent weights saturate x86's 16-bit sums (qconv.numeric.pairs; the plan's scales keep nearest
    rounding clear of it) keeps nearest."""
    nearest = qmath.quantize(w, qp)
    learned = nearest.copy()
    before = after = 0.0
    groups = t.groups
    if t.op == "Conv" and groups > 1 and w[0].size <= LAZY_ROWS:  # depthwise / grouped: every group at once
        learned, before, after = _round_stack(w, nearest, qp, moments.h, groups)
    elif t.op == "Conv":
        per = w.shape[0] // groups
        for j in range(groups):
            cols = slice(j * per, (j + 1) * per)
            wm = w[cols].reshape(per, -1).T  # [K, per]
            qp_j = _columns(qp, cols, per)
            q_near = nearest[cols].reshape(per, -1).T
            q, e0, e1 = _round_matrix(wm, q_near, qp_j, moments.h[j])
            learned[cols] = q.T.reshape(learned[cols].shape)
            before, after = before + e0, after + e1
    else:
        wm = w.T if t.trans else w
        n = wm.shape[1]
        qp_m = _columns(qp, slice(0, n), n)
        q, before, after = _round_matrix(wm, nearest.T if t.trans else nearest, qp_m, moments.h[0])
        learned = q.T if t.trans else q
    if pair_safe:
        learned = _clear_of_saturation(learned, nearest, t)
    return Rounded(rounding.deltas(learned, w, qp), before, after, moments.n)


def _clear_of_saturation(learned: np.ndarray, nearest: np.ndarray, t: Target) -> np.ndarray:
    """``learned`` with nearest rounding back in every output channel where it made a pair pass ``pairs.LIMIT``."""
    layout = "conv" if t.op == "Conv" else ("nk" if t.trans else "kn")
    rows = pairs.channels(learned, layout, t.groups)
    if rows is None or learned.dtype.itemsize != 1 or not np.issubdtype(learned.dtype, np.signedinteger):
        return learned
    bad = pairs.violations(rows) & ~pairs.violations(pairs.channels(nearest, layout, t.groups))  # only where it was clear
    if not bad.any():
        return learned
    out = learned.copy()
    if layout == "kn":
        out[:, bad] = nearest[:, bad]
    else:
        out[bad] = nearest[bad]
    return out


def _round_stack(w: np.ndarray, nearest: np.ndarray, qp: qmath.QParams, h: np.ndarray, groups: int) -> tuple[np.ndarray, float, float]:
    """``_round_matrix`` for every group of a grouped Conv weight ``w [C_out, C_in/groups, kh, kw]`` in one batched
    GPTQ (``gptq_fixed_stack``): (integers as stored, output error of nearest, of the integers kept), each group
    keeping nearest where GPTQ's error on its Hessian is not lower."""
    per = w.shape[0] // groups
    wm = w.reshape(groups, per, -1).transpose(0, 2, 1)  # [G, K, per]
    q_near = nearest.reshape(groups, per, -1).transpose(0, 2, 1)
    scale = np.broadcast_to(np.asarray(qp.scale, np.float32).reshape(-1), (w.shape[0],)).reshape(groups, 1, per)
    zp = np.broadcast_to(np.asarray(qp.zero_point).reshape(-1), (w.shape[0],)).reshape(groups, 1, per)
    stacked = qmath.QParams(scale, zp, qp.qtype)
    e_near = _errors(wm, q_near, stacked, h)
    live = np.any(np.diagonal(h, axis1=1, axis2=2) > 0, axis=1) & (e_near != 0.0)
    q = q_near.copy()
    if live.any():
        flat = qmath.QParams(scale[live, 0], zp[live, 0], qp.qtype)
        q[live] = gptq_fixed_stack(wm[live], h[live], flat, PERCDAMP).astype(q_near.dtype)
    e = _errors(wm, q, stacked, h)
    better = e < e_near
    q = np.where(better[:, None, None], q, q_near)
    e_kept = np.where(better, e, e_near)
    return q.transpose(0, 2, 1).reshape(nearest.shape), float(np.sum(e_near)), float(np.sum(e_kept))


def _errors(w: np.ndarray, q: np.ndarray, qp: qmath.QParams, h: np.ndarray) -> np.ndarray:
    """The output error ``tr(D^T H D)``, ``D = W - dequantize(q)``, of each matrix of a stack [G, K, N]."""
    d = w.astype(np.float64) - qmath.dequantize(q, qp).astype(np.float64)
    return np.sum(d * np.matmul(h, d), axis=(1, 2))


def _round_matrix(wm: np.ndarray, q_near: np.ndarray, qp: qmath.QParams, h: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(integers, output error of nearest, of the integers kept) for one [K, N] matrix."""
    e_near = _error(wm, q_near, qp, h)
    if not np.any(np.diag(h) > 0) or e_near == 0.0:
        return q_near, e_near, e_near
    try:
        q = gptq_fixed(wm, h, qp, PERCDAMP).astype(q_near.dtype)
    except np.linalg.LinAlgError:  # a Hessian damping cannot make positive definite: nearest
        return q_near, e_near, e_near
    e = _error(wm, q, qp, h)
    return (q, e_near, e) if e < e_near else (q_near, e_near, e_near)


# ---- the whole model

def learn(model: onnx.ModelProto, plan: QuantPlan, feeds: Iterable[dict], threads: int | None = None,
          max_memory: int = 1 << 30, advance: Callable[[int], None] = lambda n: None, rows: int = MAX_ROWS,
          found: list[Target] | None = None) -> tuple[dict[str, Rounded], int]:
    """({weight: Rounded}, rows used) for every target of ``plan`` (``found``, when the caller has them), on the first
    ``MAX_ROWS`` rows of ``feeds`` (re-iterable: read once per group of layers); ``rows``: how many the feeds hold, if
    fewer (each then gives more input vectors)."""
    from qconv.calib.collect import tensor_bytes

    found = targets(model, plan) if found is None else found
    first = next(iter(feeds), None) if found else None
    if first is None:
        return {}, 0
    g = Graph(model)
    inputs = sorted({t.x for t in found if t.x not in first})
    sizes = tensor_bytes(model, first, inputs) if inputs else {}
    pair_safe = plan.config.saturation_safe and qmath.qtype(plan.config.act_type).bits <= 8  # a16w8 runs in float
    out: dict[str, Rounded] = {}
    expected = max(1, min(MAX_ROWS, rows))
    for group in _groups(found, sizes, max_memory):
        got, rows = _hessians(model, group, feeds, threads, expected)
        for t in group:
            out[t.w] = round_layer(g.array(t.w).astype(np.float32), t, plan.tensors[t.w].qparams, got.pop(t.node), pair_safe)
        advance(len(group))
    return out, rows


def _groups(found: list[Target], sizes: dict[str, int], max_memory: int) -> list[list[Target]]:
    """Consecutive targets whose exposed inputs (one row, twice: ORT's and ours) and Hessians fit ``max_memory``."""
    out, current, used, seen = [], [], 0, set()
    for t in found:
        hessians = t.groups * t.features * t.features * 8
        cost = hessians + (0 if t.x in seen else 2 * sizes.get(t.x, 0))
        if current and used + cost > max_memory:
            out.append(current)
            current, used, seen = [], 0, set()
            cost = hessians + 2 * sizes.get(t.x, 0)
        current.append(t)
        used += cost
        seen.add(t.x)
    if current:
        out.append(current)
    return out


def exposed_rows(model: onnx.ModelProto, names: Iterable[str], feeds: Iterable[dict], threads: int | None,
                 max_rows: int = MAX_ROWS) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """({tensor: value}, rows) for each feed of the first ``max_rows`` rows of one float pass with ``names`` exposed
    (graph inputs read from the feed)."""
    names = set(names)
    graph_inputs = {i.name for i in model.graph.input}
    fetch = sorted(n for n in names if n not in graph_inputs)
    sess = exposed_session(model, {n: FLOAT for n in fetch}, threads)
    total = 0
    for feed in feeds:
        if total >= max_rows:
            break
        values = dict(zip(fetch, run(sess, feed, fetch))) if fetch else {}
        values.update({k: v for k, v in feed.items() if k in names})
        n = max(1, rows_of(feed))
        yield values, n
        total += n


def _hessians(model: onnx.ModelProto, group: list[Target], feeds: Iterable[dict], threads: int | None,
              expected: int) -> tuple[dict[str, Moments], int]:
    """One float pass over the first ``MAX_ROWS`` rows with the group's inputs exposed: {node: Moments}."""
    moments = {t.node: Moments(t.groups, t.features) for t in group}
    total = 0
    for values, n in exposed_rows(model, {t.x for t in group}, feeds, threads):
        for t in group:
            per_row = -(-max(MIN_SAMPLES, SAMPLES_PER_FEATURE * t.features) // expected)
            x = np.asarray(values[t.x], dtype=np.float32)
            for chunk in _samples(x, t, t.features, per_row * n):
                moments[t.node].add(chunk)
        total += n
    return moments, total


# ---- the plan

def record(plan: QuantPlan, results: dict[str, Rounded], rows: int) -> dict:
    """Write the learned integers into the plan's weights; returns the summary kept in ``plan.source['rounding']``."""
    layers = moved = weights = 0
    ratios = []
    for name, r in sorted(results.items()):
        weights += r.deltas.size
        if r.moved:
            plan.tensors[name].rounding = rounding.pack(r.deltas)
            layers += 1
            moved += r.moved
            if r.error_nearest > 0:
                ratios.append(r.error_learned / r.error_nearest)
    summary = {"method": "gptq", "rows": int(rows), "layers": len(results), "layers_changed": layers,
               "weights_moved": int(moved), "weights": int(weights),
               "median_error_ratio": float(np.median(ratios)) if ratios else 1.0}
    plan.source["rounding"] = summary
    return summary


def carry(stored: QuantPlan, plan: QuantPlan) -> None:
    """After a stored plan was planned again: keep each weight's learned integers where its parameters and its reader
    are unchanged."""
    for name, tp in stored.tensors.items():
        new = plan.tensors.get(name)
        if tp.rounding and new is not None and new.role == "weight" and new.consumers == tp.consumers \
                and new.qparams.to_dict() == tp.qparams.to_dict():
            new.rounding = tp.rounding
    if stored.source.get("rounding"):
        plan.source["rounding"] = stored.source["rounding"]


def summary(plan: QuantPlan) -> dict | None:
    """What the report says about learned rounding (None when the plan has none)."""
    made = plan.source.get("rounding")
    return dict(made) if made else None
