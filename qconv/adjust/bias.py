"""Bias correction: quantizing a layer's weights and input shifts the mean of its output; add the shift back.

For every quantized Conv, Gemm and MatMul (whose bias is the Add after it) the float model is run once over the
calibration feeds with a twin of the layer beside it: the same op on the fake-quantized input (the plan's
QuantizeLinear/DequantizeLinear) with the dequantized int8 weight and bias. The per-output-channel mean of
``float - twin`` is the shift (Nagel et al. 2019's empirical correction; NNCF's "fast bias correction" measures
it the same way, layer by layer on float inputs). All layers are measured in one pass: each twin reads the float
model's input, so one layer's correction never feeds another's measurement. Only channel sums leave the runtime
(in-graph ReduceSum), so memory is one batch of the float model plus one twin activation per layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qconv import qmath
from qconv.graph import FLOAT, Graph, ai_onnx_opset, attr
from qconv.plan import QuantPlan, TensorPlan
from qconv.runtime import run, session

OPS = ("Conv", "Gemm", "MatMul")
MAX_ROWS = 256  # feeds beyond these change the means by less than their noise (NNCF uses 100)


@dataclass(frozen=True)
class Target:
    """One layer to correct: where its bias lives, and whether the correction has to add one."""

    node: str
    op: str
    x: str  # the activation input (quantized in the plan)
    w: str  # the constant weight
    bias: str  # the float tensor the shift is added to: the node's bias, a new one, or the Add's constant after a MatMul
    added: bool  # the node had no bias: the correction adds it (and the plan an int32 TensorPlan for it)
    channels: int


def targets(model: onnx.ModelProto, plan: QuantPlan) -> list[Target]:
    """The layers of the main graph bias correction can shift, in graph order."""
    g = Graph(model)
    quantized = {d.name for d in plan.nodes if d.quantized}
    out = []
    for node in model.graph.node:
        if node.op_type not in OPS or node.domain not in ("", "ai.onnx") or node.name not in quantized or len(node.input) < 2:
            continue
        x, w = node.input[0], node.input[1]
        tx, tw = plan.tensors.get(x), plan.tensors.get(w)
        if tx is None or tw is None or tx.role != "activation" or tw.role != "weight" or not g.is_constant(w):
            continue
        if node.name not in tx.consumers or node.name not in tw.consumers:
            continue
        t = _target(node, g, plan)
        if t is not None:
            out.append(t)
    return out


def _target(node, g: Graph, plan: QuantPlan) -> Target | None:
    w = g.array(node.input[1])
    if node.op_type == "Conv":
        channels = w.shape[0]
    elif node.op_type == "Gemm":
        if attr(node, "transA", 0) or w.ndim != 2:
            return None
        channels = w.shape[0] if attr(node, "transB", 0) else w.shape[1]
    else:  # MatMul: the bias is the constant of the Add after it (the planner keeps that Add float: exact)
        if w.ndim != 2:
            return None
        channels = w.shape[1]
        add = g.only_consumer(node.output[0])
        if add is None or add.op_type != "Add":
            return None
        other = [i for i in add.input if i != node.output[0]]
        if len(other) != 1 or not g.is_constant(other[0]) or len(g.consumers.get(other[0], [])) != 1:
            return None
        if g.array(other[0]).size != channels or g.array(other[0]).shape[-1] != channels:
            return None
        return Target(node.name, node.op_type, node.input[0], node.input[1], other[0], False, channels)
    if len(node.input) > 2 and node.input[2]:
        b = node.input[2]
        tb = plan.tensors.get(b)
        if not g.is_constant(b) or tb is None or tb.role != "bias" or len(g.consumers.get(b, [])) != 1 or g.array(b).size != channels:
            return None
        return Target(node.name, node.op_type, node.input[0], node.input[1], b, False, channels)
    if node.op_type == "Gemm" and attr(node, "beta", 1.0) != 1.0:
        return None
    return Target(node.name, node.op_type, node.input[0], node.input[1], f"{node.name}.bias_correction", True, channels)


def probe(model: onnx.ModelProto, plan: QuantPlan, found: list[Target]) -> tuple[onnx.ModelProto, list[tuple[str, str]]]:
    """The float model with every target's twin beside it; outputs (channel sums of twin - float, element count)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = Graph(m)
    opset = ai_onnx_opset(m)
    del m.graph.output[:]
    nodes, inits, outputs, names = [], [], [], []
    fq_of: dict[str, str] = {}
    for t in found:
        node = next(n for n in m.graph.node if n.name == t.node)
        if t.x not in fq_of:
            fq_of[t.x] = _fake_quant(g, plan.tensors[t.x], nodes, inits)
        tw = plan.tensors[t.w]
        wdq = qmath.dequantize(qmath.quantize(g.array(t.w).astype(np.float32), tw.qparams), tw.qparams)
        w_name = g.unique(f"{t.node}.bc_weight")
        inits.append(numpy_helper.from_array(wdq, w_name))
        ins = [fq_of[t.x], w_name]
        if t.op != "MatMul" and not t.added:
            tb = plan.tensors[t.bias]
            b = g.array(t.bias).astype(np.float32)
            bdq = qmath.dequantize(qmath.quantize(b.reshape(-1), tb.qparams), tb.qparams).reshape(b.shape)
            b_name = g.unique(f"{t.node}.bc_bias")
            inits.append(numpy_helper.from_array(bdq, b_name))
            ins.append(b_name)
        twin = g.unique(f"{t.node}.bc_twin")
        nodes.append(helper.make_node(t.op, ins, [twin], name=g.unique(f"{t.node}.bc_twin_node"), **{a.name: helper.get_attribute_value(a) for a in node.attribute}))
        diff = g.unique(f"{t.node}.bc_diff")
        nodes.append(helper.make_node("Sub", [twin, node.output[0]], [diff], name=g.unique(f"{t.node}.bc_sub")))
        if t.op == "Conv":
            rank = g.array(t.w).ndim
            axes = [0] + list(range(2, rank))
        elif t.op == "Gemm":
            axes = [0]
        else:
            shape = numpy_helper.from_array(np.array([-1, t.channels], dtype=np.int64), g.unique(f"{t.node}.bc_shape"))
            inits.append(shape)
            flat = g.unique(f"{t.node}.bc_flat")
            nodes.append(helper.make_node("Reshape", [diff, shape.name], [flat], name=g.unique(f"{t.node}.bc_reshape")))
            diff, axes = flat, [0]
        sums, size = g.unique(f"{t.node}.bc_sum"), g.unique(f"{t.node}.bc_size")
        if opset >= 13:
            ax = numpy_helper.from_array(np.array(axes, dtype=np.int64), g.unique(f"{t.node}.bc_axes"))
            inits.append(ax)
            nodes.append(helper.make_node("ReduceSum", [diff, ax.name], [sums], name=g.unique(f"{t.node}.bc_reduce"), keepdims=0))
        else:
            nodes.append(helper.make_node("ReduceSum", [diff], [sums], name=g.unique(f"{t.node}.bc_reduce"), axes=axes, keepdims=0))
        nodes.append(helper.make_node("Size", [diff], [size], name=g.unique(f"{t.node}.bc_count")))
        outputs += [helper.make_tensor_value_info(sums, FLOAT, None),
                    helper.make_tensor_value_info(size, onnx.TensorProto.INT64, None)]
        names.append((sums, size))
    m.graph.node.extend(nodes)
    m.graph.initializer.extend(inits)
    m.graph.output.extend(outputs)
    return m, names


def _fake_quant(g: Graph, tp: TensorPlan, nodes: list, inits: list) -> str:
    qp = tp.qparams
    domain = "com.microsoft" if qp.qtype.bits > 8 and ai_onnx_opset(g.model) < 21 else ""
    scale = numpy_helper.from_array(np.asarray(qp.scale, dtype=np.float32), g.unique(f"{tp.name}.bc_scale"))
    zp = numpy_helper.from_array(np.asarray(qp.zero_point).astype(qp.qtype.dtype), g.unique(f"{tp.name}.bc_zp"))
    inits += [scale, zp]
    q, dq = g.unique(f"{tp.name}.bc_q"), g.unique(f"{tp.name}.bc_dq")
    nodes.append(helper.make_node("QuantizeLinear", [tp.name, scale.name, zp.name], [q], name=g.unique(f"{tp.name}.bc_q_node"), domain=domain))
    nodes.append(helper.make_node("DequantizeLinear", [q, scale.name, zp.name], [dq], name=g.unique(f"{tp.name}.bc_dq_node"), domain=domain))
    if domain and not any(o.domain == domain for o in g.model.opset_import):
        g.model.opset_import.append(helper.make_opsetid(domain, 1))
    return dq


def measure(model: onnx.ModelProto, plan: QuantPlan, feeds: Iterable[dict], threads: int | None = None,
            advance: Callable[[int], None] = lambda n: None, max_rows: int = MAX_ROWS) -> dict[str, np.ndarray]:
    """{node: mean over the feeds of (float output - int8 twin output), per output channel} for every target."""
    found = targets(model, plan)
    if not found:
        return {}
    m, names = probe(model, plan, found)
    sess = session(m, threads)
    sums = [np.zeros(t.channels, dtype=np.float64) for t in found]
    counts = [0] * len(found)
    rows = 0
    for feed in feeds:
        got = run(sess, feed)
        for k in range(len(found)):
            sums[k] += got[2 * k].astype(np.float64)
            counts[k] += int(got[2 * k + 1])
        n = len(next(iter(feed.values()))) if feed else 1
        rows += n
        advance(1)
        if rows >= max_rows:
            break
    out = {}
    for t, s, c in zip(found, sums, counts):
        if c:
            out[t.node] = (-s / (c / t.channels)).astype(np.float32)  # float - twin
    return out


def record(plan: QuantPlan, model: onnx.ModelProto, shifts: dict[str, np.ndarray]) -> None:
    """Write the shifts into the plan: ``plan.corrections`` and, for a layer without a bias, its int32 bias plan."""
    by_node = {t.node: t for t in targets(model, plan)}
    corrections = {}
    for name, shift in sorted(shifts.items()):
        t = by_node.get(name)
        if t is None:
            continue
        corrections[name] = {"bias": t.bias, "added": t.added, "shift": [float(v) for v in shift]}
        if t.added:
            tx, tw = plan.tensors[t.x], plan.tensors[t.w]
            qp = qmath.bias_qparams(shift, float(tx.qparams.scale), tw.qparams.scale)
            plan.tensors[t.bias] = TensorPlan(t.bias, "bias", qp, [name], "bias added by bias correction, int32")
    plan.corrections = corrections


def apply(model: onnx.ModelProto, corrections: dict) -> onnx.ModelProto:
    """A copy of the float model with each correction's shift added to its bias (the bias created where missing)."""
    if not corrections:
        return model
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name: t for t in m.graph.initializer}
    nodes = {n.name: n for n in m.graph.node}
    for name, c in sorted(corrections.items()):
        shift = np.asarray(c["shift"], dtype=np.float32)
        if c.get("added"):
            node = nodes[name]
            m.graph.initializer.append(numpy_helper.from_array(shift, c["bias"]))
            while len(node.input) < 2:
                node.input.append("")
            if len(node.input) == 2:
                node.input.append(c["bias"])
            else:
                node.input[2] = c["bias"]
            continue
        t = inits[c["bias"]]
        b = numpy_helper.to_array(t).astype(np.float32)
        t.CopyFrom(numpy_helper.from_array((b + shift.reshape(b.shape)).astype(np.float32), t.name))
    return m


def carry(stored: QuantPlan, plan: QuantPlan, model: onnx.ModelProto) -> None:
    """After a stored plan's overrides were edited and it was planned again: keep each correction whose layer is
    still a target quantized exactly as before (same input and weight parameters); the others no longer hold."""
    if not stored.corrections:
        return

    def same(a: TensorPlan | None, b: TensorPlan | None) -> bool:
        return a is not None and b is not None and a.qparams.to_dict() == b.qparams.to_dict()

    kept = {}
    for t in targets(model, plan):
        c = stored.corrections.get(t.node)
        if c is not None and c["bias"] == t.bias and same(stored.tensors.get(t.x), plan.tensors.get(t.x)) \
                and same(stored.tensors.get(t.w), plan.tensors.get(t.w)):
            kept[t.node] = np.asarray(c["shift"], dtype=np.float32)
    record(plan, model, kept)
