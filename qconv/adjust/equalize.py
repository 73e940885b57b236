"""Cross-layer equalization (Nagel et al. 2019, data-free): rescale the channels between two convolutions.

For ``Conv1 -> f -> Conv2`` with ``f`` positively homogeneous (identity, Relu, LeakyRelu: ``f(x / s) = f(x) / s``
for ``s > 0``), dividing Conv1's output channel ``c`` (its weights and bias) by ``s_c`` and multiplying the
weights Conv2 reads from channel ``c`` by ``s_c`` leaves the model's function unchanged. With
``s_c = sqrt(r1_c / r2_c)`` (``r1_c``: Conv1's largest weight of output channel ``c``; ``r2_c``: Conv2's largest
weight read from channel ``c``) both become ``sqrt(r1_c * r2_c)``: the channels of each weight tensor get equal
ranges, which is what one scale per tensor (``--per-tensor``, what some NPUs require) needs. Depthwise and
grouped Conv2 included. Clip (Relu6), HardSwish, Sigmoid are not homogeneous and block the pair: the report's
intake note says how many pairs were equalized.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from qconv.graph import Graph, ai_onnx_opset, attr, subgraph_inputs, tensor_array

HOMOGENEOUS = ("Relu", "LeakyRelu")
ITERATIONS = 8  # chains (Conv -> Conv -> Conv) converge in a few sweeps


def pairs(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, onnx.NodeProto]]:
    """(Conv1, Conv2) pairs joined by identity or a homogeneous activation, each weight and bias constant."""
    g = Graph(model)
    out = []
    for node in model.graph.node:
        if not _conv(node, g):
            continue
        nxt = g.only_consumer(node.output[0])
        if nxt is not None and nxt.op_type in HOMOGENEOUS and nxt.domain in ("", "ai.onnx"):
            nxt = g.only_consumer(nxt.output[0])
        if nxt is None or not _conv(nxt, g) or nxt.input[0] == node.input[0]:
            continue
        c = g.array(node.input[1]).shape[0]
        w2 = g.array(nxt.input[1])
        if w2.shape[1] * attr(nxt, "group", 1) != c:
            continue
        out.append((node, nxt))
    return out


def _conv(node, g: Graph) -> bool:
    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.input) < 2 or not g.is_constant(node.input[1]):
        return False
    if len(node.input) > 2 and node.input[2] and not g.is_constant(node.input[2]):
        return False
    return len(g.consumers.get(node.input[1], [])) == 1 and (len(node.input) < 3 or not node.input[2]
                                                              or len(g.consumers.get(node.input[2], [])) == 1)


def equalize(model: onnx.ModelProto, iterations: int = ITERATIONS) -> int:
    """Equalize every pair in place; returns how many pairs there were."""
    found = pairs(model)
    if not found:
        return 0
    inits = {t.name: t for t in model.graph.initializer}
    arrays = {name: tensor_array(inits[name]).astype(np.float64) for a, b in found for name in _params(a) + _params(b)}
    for _ in range(iterations):
        for a, b in found:
            w1, w2 = arrays[a.input[1]], arrays[b.input[1]]
            groups = attr(b, "group", 1)
            r1 = np.abs(w1.reshape(w1.shape[0], -1)).max(axis=1)
            r2 = _input_ranges(w2, groups)
            s = np.where((r1 > 0) & (r2 > 0), np.sqrt(r1 / np.where(r2 > 0, r2, 1.0)), 1.0)
            s = np.clip(s, 1e-3, 1e3)
            arrays[a.input[1]] = w1 / s.reshape(-1, *[1] * (w1.ndim - 1))
            if len(a.input) > 2 and a.input[2]:
                arrays[a.input[2]] = arrays[a.input[2]] / s
            arrays[b.input[1]] = _scale_inputs(w2, groups, s)
    for name, arr in arrays.items():
        inits[name].CopyFrom(numpy_helper.from_array(arr.astype(np.float32), name))
    return len(found)


def _params(node) -> list[str]:
    return [node.input[1]] + ([node.input[2]] if len(node.input) > 2 and node.input[2] else [])


def _input_ranges(w2: np.ndarray, groups: int) -> np.ndarray:
    """Largest |weight| Conv2 applies to each of its input channels."""
    k, cpg = w2.shape[0], w2.shape[1]
    per_group = np.abs(w2).reshape(groups, k // groups, cpg, -1).max(axis=(1, 3))  # [groups, cpg]
    return per_group.reshape(-1)


def _scale_inputs(w2: np.ndarray, groups: int, s: np.ndarray) -> np.ndarray:
    k, cpg = w2.shape[0], w2.shape[1]
    shaped = w2.reshape(groups, k // groups, cpg, -1) * s.reshape(groups, 1, cpg, 1)
    return shaped.reshape(w2.shape)


# ---- gated activations: Conv1 -> y * gate(y) -> Conv2, rescaled on measured channel ranges -----------------------

GATE_OPS = ("Add", "Sub", "Mul", "Div", "Clip", "Sigmoid", "HardSigmoid", "Relu")  # elementwise, with constants
RANGE_ROWS = 8  # calibration rows whose per-channel extremes set the scales
MIN_GAIN_DB = 6.0  # a pair is rescaled when the estimated noise its next Conv sees falls by this much (PicoDet: 35 of 76 pairs; 3 dB took 69, read worse and ran slower)
MAX_SCALE = 1000.0


@dataclass(frozen=True)
class Gated:
    """``conv`` -> y; ``gate`` (the first node of a chain of elementwise ops on y and constants) -> g;
    ``mul`` = y * g -> h, read only by the Convs ``readers``. Hard-swish (expanded: y * Clip(y + 3, 0, 6) / 6) and
    SiLU (y * Sigmoid(y)) are such gates."""

    conv: str
    gate: str
    mul: str
    readers: tuple[str, ...]


def gated_pairs(model: onnx.ModelProto) -> list[Gated]:
    """Every Conv whose output goes through a gated activation into Convs only (weights and biases constant, each
    read by that Conv alone): the pairs where f(x / s) = f(x) / s fails, but y * gate(y) rescales exactly when the
    gate reads y / s (see ``apply_gated``)."""
    g = Graph(model)
    out = []
    for node in model.graph.node:
        if not _conv(node, g):
            continue
        y = node.output[0]
        readers = g.consumers.get(y, [])
        muls = [c for c in readers if c.op_type == "Mul" and c.domain in ("", "ai.onnx") and list(c.input).count(y) == 1
                and not any(g.is_constant(i) for i in c.input if i != y)]  # y * gate, not the gate's own y * alpha
        if len(readers) != 2 or len(muls) != 1:
            continue
        mul = muls[0]
        first = next(c for c in readers if c is not mul)
        other = [i for i in mul.input if i != y][0]
        if not _gate_chain(first, y, other, g):
            continue
        convs = g.consumers.get(mul.output[0], [])
        if not convs or mul.output[0] in g.graph_outputs or any(not _conv(c, g) or c.input[0] != mul.output[0] for c in convs):
            continue
        c = g.array(node.input[1]).shape[0]
        if any(g.array(c2.input[1]).shape[1] * attr(c2, "group", 1) != c for c2 in convs):
            continue
        out.append(Gated(node.name, first.name, mul.name, tuple(c2.name for c2 in convs)))
    return out


def _gate_chain(first, y: str, end: str, g: Graph) -> bool:
    """``first`` starts a chain of GATE_OPS from ``y`` to ``end``, each node's other inputs constant, each output read
    once (by the next node, or by the Mul)."""
    node, prev = first, y
    for _ in range(6):
        if node.op_type not in GATE_OPS or node.domain not in ("", "ai.onnx") or list(node.input).count(prev) != 1:
            return False
        if any(i and i != prev and not g.is_constant(i) for i in node.input) or len(node.output) != 1:
            return False
        if node.output[0] == end:
            return len(g.consumers.get(end, [])) == 1 and end not in g.graph_outputs
        nxt = g.only_consumer(node.output[0])
        if nxt is None:
            return False
        node, prev = nxt, node.output[0]
    return False


def range_probe(model: onnx.ModelProto, pairs: list[Gated]) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` whose outputs are the per-channel largest |h| of each pair (computed in the graph)."""
    from qconv.graph import ai_onnx_opset

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = Graph(m)
    opset = ai_onnx_opset(m)
    by_name = {n.name: n for n in m.graph.node}
    del m.graph.output[:]
    names = []
    for p in pairs:
        h = by_name[p.mul].output[0]
        absolute, peak = g.unique(f"{h}.eq_abs"), g.unique(f"{h}.eq_peak")
        m.graph.node.append(onnx.helper.make_node("Abs", [h], [absolute], name=g.unique(f"{p.mul}.eq_abs")))
        rank = g.array(by_name[p.conv].input[1]).ndim
        axes = [0] + list(range(2, rank))
        if opset >= 18:
            ax = g.unique(f"{h}.eq_axes")
            m.graph.initializer.append(numpy_helper.from_array(np.array(axes, np.int64), ax))
            m.graph.node.append(onnx.helper.make_node("ReduceMax", [absolute, ax], [peak], keepdims=0, name=g.unique(f"{p.mul}.eq_max")))
        else:
            m.graph.node.append(onnx.helper.make_node("ReduceMax", [absolute], [peak], axes=axes, keepdims=0, name=g.unique(f"{p.mul}.eq_max")))
        m.graph.output.append(onnx.helper.make_tensor_value_info(peak, onnx.TensorProto.FLOAT, None))
        names.append(peak)
    return m, names


def gated_scales(model: onnx.ModelProto, pairs: list[Gated], peaks: dict[str, np.ndarray]) -> dict[str, list[float]]:
    """{Conv1: per-channel scale t} for the pairs worth rescaling. ``peaks``: the largest |h| per channel measured
    on the calibration rows. t_c = sqrt(R / r_c) (R the largest channel's extreme, t >= 1) halves the log range gap
    of h's channels, and the weights Conv2 reads from channel c are divided by t_c: one 8-bit scale for h then
    resolves its small channels t_c times finer, while Conv2's weights (per output channel) lose little. A pair is
    kept when the estimated quantization noise at Conv2's output, sum_c a_c step^2 with a_c = sum of Conv2's squared
    weights on channel c, falls by MIN_GAIN_DB (a kept pair can cost a per-channel Mul at run time: SiLU's inserted
    one, or a hard-swish's 1/6 that no longer folds into a quantization scale)."""
    g = Graph(model)
    by_name = {n.name: n for n in model.graph.node}
    out = {}
    for p in pairs:
        r = np.asarray(peaks[p.conv], np.float64)
        big = float(r.max()) if r.size else 0.0
        if big <= 0:
            continue
        t = np.clip(np.sqrt(big / np.maximum(r, big / MAX_SCALE**2)), 1.0, MAX_SCALE)
        a = np.zeros(r.size)
        for name in p.readers:
            c2 = by_name[name]
            a += _input_energy(g.array(c2.input[1]).astype(np.float64), attr(c2, "group", 1))
        before = float((a * big * big).sum())
        after = float((a / t**2).sum() * float((t * r).max()) ** 2)
        if after > 0 and 10 * np.log10(before / after) >= MIN_GAIN_DB:
            out[p.conv] = [float(v) for v in t]
    return out


def _input_energy(w2: np.ndarray, groups: int) -> np.ndarray:
    """Sum of Conv2's squared weights applied to each of its input channels."""
    k, cpg = w2.shape[0], w2.shape[1]
    return (w2.reshape(groups, k // groups, cpg, -1) ** 2).sum(axis=(1, 3)).reshape(-1)


def apply_gated(model: onnx.ModelProto, scales: dict[str, list[float]]) -> int:
    """Rescale the pairs of ``scales`` in place, exactly: Conv1's output channel c (weights, bias) times t_c, the gate
    reading y / t as before (1/t folded into a hard-swish's first op, ``_fold_inverse``; else a Mul inserted before the
    gate), and the weights Conv2 reads from channel c divided by t_c; then y * gate(y) carries the factor t to Conv2,
    which removes it. Returns how many pairs were rescaled."""
    if not scales:
        return 0
    g = Graph(model)
    inits = {t.name: t for t in model.graph.initializer}

    def array(name: str) -> np.ndarray:  # read afresh: a Conv2 of one pair may be the Conv1 of the next
        return tensor_array(inits[name]).astype(np.float64)

    found = {p.conv: p for p in gated_pairs(model)}
    missing = sorted(set(scales) - set(found))
    if missing:
        from qconv.errors import QconvError

        raise QconvError(f"the recorded equalization names Conv '{missing[0]}', which is not a Conv -> gated activation -> Conv "
                         "pair of this model: re-run qconv calibrate --equalize (or quantize --data --equalize)")
    by_name = {n.name: n for n in model.graph.node}
    unread: list[str] = []  # constants a folded gate no longer reads (dropped at the end: ``inits`` holds the protos)
    for name in sorted(scales):
        p = found[name]
        t = np.asarray(scales[name], np.float64)
        conv = by_name[p.conv]
        w1 = array(conv.input[1])
        inits[conv.input[1]].CopyFrom(numpy_helper.from_array((w1 * t.reshape(-1, *[1] * (w1.ndim - 1))).astype(np.float32), conv.input[1]))
        if len(conv.input) > 2 and conv.input[2]:
            b = array(conv.input[2])
            inits[conv.input[2]].CopyFrom(numpy_helper.from_array((b * t).astype(np.float32), conv.input[2]))
        for reader in p.readers:
            c2 = by_name[reader]
            w2 = array(c2.input[1])
            inits[c2.input[1]].CopyFrom(numpy_helper.from_array(_scale_inputs(w2, attr(c2, "group", 1), 1.0 / t).astype(np.float32), c2.input[1]))
        y = conv.output[0]
        shape = [1, t.size] + [1] * (w1.ndim - 2)
        folded = _fold_inverse(model, g, by_name, p, y, (1.0 / t).reshape(shape))
        if folded is not None:
            unread += folded
            continue
        inverse, unscaled = g.unique(f"{p.conv}.eq_inverse"), g.unique(f"{y}.eq_unscaled")
        model.graph.initializer.append(numpy_helper.from_array((1.0 / t).reshape(shape).astype(np.float32), inverse))
        gate = by_name[p.gate]
        gate.input[list(gate.input).index(y)] = unscaled
        at = list(model.graph.node).index(conv) + 1
        model.graph.node.insert(at, onnx.helper.make_node("Mul", [y, inverse], [unscaled], name=g.unique(f"{p.conv}.eq_unscale")))
        typed = next((vi for vi in model.graph.value_info if vi.name == y), None)  # intake types every tensor: so is this one
        if typed is not None:
            vi = model.graph.value_info.add()
            vi.CopyFrom(typed)
            vi.name = unscaled
    _drop_unread(model, unread)
    return len(scales)


def _fold_inverse(model: onnx.ModelProto, g: Graph, by_name: dict, p: Gated, y: str, inverse: np.ndarray) -> list[str] | None:
    """Fold the gate's 1/t into the gate's own first op, so a rescaled pair runs as many ops as before; returns the
    constants the gate no longer reads, or None where it cannot fold (a Sigmoid first: SiLU). Two forms, both exact up
    to float rounding:

    - ``y * c`` or ``y / c`` with a scalar c first (hard-swish as intake expands it: Mul 1/6, Add 1/2, Clip 0..1):
      the constant becomes per channel, c / t (or c * t);
    - ``Clip(y + a, lo, hi) * m`` (or ``/ d``) with m > 0 (Paddle's hard-swish: Add 3, Clip 0..6, Mul 1/6) is
      ``Clip(y * m + a * m, lo * m, hi * m)``: the three nodes become Mul (by m / t per channel), Add, Clip."""
    first = by_name[p.gate]
    const = [i for i in first.input if i != y]
    if len(const) != 1 or not _scalar(g, const[0]):
        return None
    c = float(g.array(const[0]).reshape(()))
    if first.op_type in ("Mul", "Div"):
        if first.op_type == "Div" and list(first.input).index(const[0]) != 1:
            return None  # c / y
        name = g.unique(f"{first.name}.eq_scale")
        value = c * inverse if first.op_type == "Mul" else c / inverse
        model.graph.initializer.append(numpy_helper.from_array(value.astype(g.array(const[0]).dtype), name))
        first.input[list(first.input).index(const[0])] = name
        return [const[0]]
    if first.op_type != "Add":
        return None
    clip = g.only_consumer(first.output[0])
    last = g.only_consumer(clip.output[0]) if clip is not None and clip.op_type == "Clip" else None
    if last is None or last.op_type not in ("Mul", "Div") or last.name == p.mul or list(by_name[p.mul].input).count(last.output[0]) != 1:
        return None
    lc = [i for i in last.input if i != clip.output[0]]
    if len(lc) != 1 or not _scalar(g, lc[0]) or (last.op_type == "Div" and list(last.input).index(lc[0]) != 1):
        return None
    m = float(g.array(lc[0]).reshape(()))
    m = m if last.op_type == "Mul" else 1.0 / m
    bounds = _clip_bounds(clip, g)
    if not m > 0 or bounds is None:
        return None
    lo, hi = bounds
    bound_names = [i for i in list(clip.input)[1:] if i]
    dtype = g.array(const[0]).dtype
    y_in, mid1, mid2, out = y, first.output[0], clip.output[0], last.output[0]
    m_name, a_name = g.unique(f"{first.name}.eq_scale"), g.unique(f"{clip.name}.eq_offset")
    model.graph.initializer.extend([numpy_helper.from_array((m * inverse).astype(dtype), m_name),
                                    numpy_helper.from_array(np.array(c * m, dtype), a_name)])
    _rebuild(first, "Mul", [y_in, m_name], mid1)
    _rebuild(clip, "Add", [mid1, a_name], mid2)
    if ai_onnx_opset(model) >= 11:
        lo_name, hi_name = g.unique(f"{last.name}.eq_min"), g.unique(f"{last.name}.eq_max")
        model.graph.initializer.extend([numpy_helper.from_array(np.array(lo * m, dtype), lo_name),
                                        numpy_helper.from_array(np.array(hi * m, dtype), hi_name)])
        _rebuild(last, "Clip", [mid2, lo_name, hi_name], out)
    else:
        _rebuild(last, "Clip", [mid2], out, min=float(lo * m), max=float(hi * m))
    return [const[0], lc[0]] + bound_names


def _scalar(g: Graph, name: str) -> bool:
    return g.is_constant(name) and g.array(name).size == 1 and g.array(name).dtype in (np.float32, np.float64)


def _clip_bounds(clip, g: Graph) -> tuple[float, float] | None:
    """(min, max) of a Clip whose bounds are constants (attributes before opset 11, inputs after)."""
    lo, hi = attr(clip, "min", float("-inf")), attr(clip, "max", float("inf"))
    for k, name in ((1, "lo"), (2, "hi")):
        if len(clip.input) > k and clip.input[k]:
            if not _scalar(g, clip.input[k]):
                return None
            v = float(g.array(clip.input[k]).reshape(()))
            lo, hi = (v, hi) if name == "lo" else (lo, v)
    return lo, hi


def _rebuild(node, op: str, inputs: list[str], output: str, **attrs) -> None:
    """``node`` in place (its name and output kept) as ``op`` on ``inputs``."""
    node.op_type = op
    del node.input[:]
    node.input.extend(inputs)
    del node.attribute[:]
    node.attribute.extend(onnx.helper.make_attribute(k, v) for k, v in attrs.items())
    assert list(node.output) == [output]


def _drop_unread(model: onnx.ModelProto, names: list[str]) -> None:
    """Remove the initializers of ``names`` that no node reads any more (a constant shared by other gates stays)."""
    read = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output} | set().union(*(subgraph_inputs(n) for n in model.graph.node))
    gone = {n for n in names if n not in read}
    if gone:
        keep = [t for t in model.graph.initializer if t.name not in gone]
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
