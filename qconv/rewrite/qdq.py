"""Apply a QuantPlan as QuantizeLinear/DequantizeLinear pairs (the QDQ form onnxruntime fuses to int8)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qconv.graph import Graph, ai_onnx_opset, compacted, copy_with_placeholders, drop_unused_initializers, ensure_opset, topo_sort
from qconv.numeric import qmath, rounding
from qconv.plan import QuantPlan, TensorPlan
from qconv.rewrite.rules import recurrent
from qconv.rewrite.rules.elementwise import scalar_scale


def _fmt(qp: qmath.QParams) -> str:
    if qp.scale.ndim:
        return f"{qp.qtype.name} axis={qp.axis} scale=[{qp.scale.min():.3g},{qp.scale.max():.3g}]"
    return f"{qp.qtype.name} scale={float(qp.scale):.4g} zp={int(qp.zero_point)}"


def _param_inits(g: Graph, base: str, qp: qmath.QParams) -> tuple[onnx.TensorProto, onnx.TensorProto]:
    scale = numpy_helper.from_array(qp.scale.astype(np.float32), g.unique(base + "_scale"))
    zp = numpy_helper.from_array(qp.zero_point.astype(qp.qtype.dtype), g.unique(base + "_zero_point"))
    return scale, zp


def _domain(g: Graph, qp: qmath.QParams) -> str:
    """16-bit Q/DQ are standard from opset 21; below that onnxruntime has them in com.microsoft."""
    return "com.microsoft" if qp.qtype.name in ("int16", "uint16") and ai_onnx_opset(g.model) < 21 else ""


def _dq_node(g: Graph, src: str, scale: str, zp: str, out: str, qp: qmath.QParams, doc: str) -> onnx.NodeProto:
    kwargs = {"axis": qp.axis} if qp.scale.ndim else {}
    node = helper.make_node("DequantizeLinear", [src, scale, zp], [out], name=g.unique(out + "_DequantizeLinear"),
                            domain=_domain(g, qp), **kwargs)
    node.doc_string = doc
    return node


def apply_qdq(model: onnx.ModelProto, plan: QuantPlan) -> tuple[onnx.ModelProto, dict[str, str]]:
    """The QDQ model, and for each quantized activation the DequantizeLinear output that replaces it. The weights the
    plan quantizes are read from ``model`` and copied as placeholders: a full copy held every float weight beside its
    integers until the end (PP-OCRv4 rec's candidates in the default's checks: 11 MB each); one that a float node still
    reads as it is gets its data back."""
    weights = {n for n, tp in plan.tensors.items() if tp.role not in ("activation", "lstm-weight")}
    read = {t.name for t in model.graph.initializer if t.name in weights}
    m = copy_with_placeholders(model, read)
    src = Graph(model)
    by_name = {n.name: n for n in m.graph.node}
    for act_name, producer_name in plan.folded.items():
        act = by_name[act_name]
        by_name[producer_name].output[0] = act.output[0]
        m.graph.node.remove(act)
    g = Graph(m)
    new_nodes, new_inits, dequantized = [], [], {}
    for name, tp in sorted(plan.tensors.items()):
        if tp.role == "lstm-weight":  # rewritten by rules.recurrent after the QDQ pass
            continue
        if tp.role == "table":
            nodes, inits = table_nodes(g, tp, by_name, src.array)
            new_nodes += nodes
            new_inits += inits
            continue
        if tp.role == "activation":
            nodes, inits, dq_out = activation_pair(g, tp)
            dequantized[name] = dq_out
        else:
            nodes, inits, dq_out = _constant(g, tp, src.array)
        new_nodes += nodes
        new_inits += inits
        readers = set(tp.consumers) if tp.role != "activation" else None
        for consumer in g.consumers.get(name, []):
            if consumer.op_type == "QuantizeLinear" or (readers is not None and consumer.name not in readers):
                continue
            for k, i in enumerate(consumer.input):
                if i == name:
                    consumer.input[k] = dq_out
    m.graph.initializer.extend(new_inits)
    m.graph.node.extend(new_nodes)
    if any(n.domain == "com.microsoft" for n in new_nodes):
        ensure_opset(m, "com.microsoft", 1)
    constants = fold_scaled_muls(m)
    topo_sort(m)
    drop_unused_initializers(m, [p.name for p in plan.tensors.values() if p.role not in ("activation", "lstm-weight")] + constants)
    for t in m.graph.initializer:
        if t.name in read:  # still read in float by some node: its data, where it was
            t.CopyFrom(src.initializers[t.name])
    return recurrent.apply_lstm(compacted(m), plan), dequantized


def activation_pair(g: Graph, tp: TensorPlan):
    """QuantizeLinear -> DequantizeLinear of an activation with its plan's parameters: (nodes, initializers, DQ output)."""
    qp = tp.qparams
    scale, zp = _param_inits(g, tp.name, qp)
    q_out, dq_out = g.unique(tp.name + "_quantized"), g.unique(tp.name + "_dequantized")
    q = helper.make_node("QuantizeLinear", [tp.name, scale.name, zp.name], [q_out], name=g.unique(tp.name + "_QuantizeLinear"),
                         domain=_domain(g, qp))
    q.doc_string = f"qconv: {tp.origin}, {_fmt(qp)}"
    dq = _dq_node(g, q_out, scale.name, zp.name, dq_out, qp, "qconv")
    return [q, dq], [scale, zp], dq_out


def _constant(g: Graph, tp: TensorPlan, array):
    qp = tp.qparams
    arr = array(tp.name).astype(np.float32)
    if tp.role == "bias":
        arr = arr.reshape(-1)
    q = numpy_helper.from_array(rounding.integers(arr, qp, tp.rounding), g.unique(tp.name + "_quantized"))
    q.doc_string = f"qconv: from '{tp.name}' ({tp.origin}), {_fmt(qp)}{', learned rounding' if tp.rounding else ''}"
    scale, zp = _param_inits(g, tp.name, qp)
    dq_out = g.unique(tp.name + "_dequantized")
    dq = _dq_node(g, q.name, scale.name, zp.name, dq_out, qp, "qconv")
    return [dq], [q, scale, zp], dq_out


TABLE_ROWS = 4096  # rows of a table rounded at once (quantize's float64 temporaries stay small)


def table_nodes(g: Graph, tp: TensorPlan, by_name: dict, array) -> tuple[list, list]:
    """A weight-only table (planner.weight_only_tables): each of its Gathers reads the int8 rows, a second Gather reads
    their scales ([V, 1], so they broadcast over each row), and Cast then Mul give the float rows, the same values
    DequantizeLinear would give, for the rows a run reads only."""
    qp = tp.qparams
    table = array(tp.name)  # a weight past 2 GB stays mapped from its file: rows are read and rounded a block at a time
    ints = np.empty(table.shape, qp.qtype.dtype)
    for start in range(0, table.shape[0], TABLE_ROWS):
        part = slice(start, start + TABLE_ROWS)
        ints[part] = qmath.quantize(table[part], qmath.QParams(qp.scale[part], qp.zero_point[part], qp.qtype, 0))
    q = numpy_helper.from_array(ints, g.unique(tp.name + "_quantized"))
    q.doc_string = f"qconv: from '{tp.name}' ({tp.origin}), {_fmt(qp)}"
    scale = numpy_helper.from_array(qp.scale.astype(np.float32).reshape(-1, 1), g.unique(tp.name + "_row_scale"))
    nodes = []
    for reader in tp.consumers:
        gather = by_name[reader]
        out = gather.output[0]
        rows, scales, floats = (g.unique(f"{out}_{k}") for k in ("int8_rows", "row_scales", "float_rows"))
        gather.input[0], gather.output[0] = q.name, rows
        nodes += [helper.make_node("Gather", [scale.name, gather.input[1]], [scales], name=g.unique(reader + "_row_scales"), axis=0),
                  helper.make_node("Cast", [rows], [floats], name=g.unique(reader + "_to_float"), to=onnx.TensorProto.FLOAT),
                  helper.make_node("Mul", [floats, scales], [out], name=g.unique(reader + "_scaled"))]
        for n in nodes[-3:]:
            n.doc_string = f"qconv: {tp.origin}"
    return nodes, [q, scale]


def fold_scaled_muls(m: onnx.ModelProto) -> list[str]:
    """``DQ(x_q, s) -> Mul(c) -> Q(s * c) -> DQ(s * c)`` is the identity on x's integers: the last DQ reads x_q
    directly and the Mul and its QuantizeLinear go (the planner gives a Mul by a positive constant its input's
    parameters with the scale times c). Exact, and no QLinearMul runs (onnxruntime's is slower than a float Mul).
    Returns the constants that may now be unused."""
    g = Graph(m)
    dropped, constants = set(), []
    for node in m.graph.node:
        found = scalar_scale(node, g)
        if found is None:
            continue
        k, c = found
        dq_in = g.producer.get(node.input[k])
        readers = g.consumers.get(node.output[0], [])
        if dq_in is None or dq_in.op_type != "DequantizeLinear" or len(readers) != 1 or readers[0].op_type != "QuantizeLinear":
            continue
        q_out = readers[0]
        dqs = g.consumers.get(q_out.output[0], [])
        if not dqs or any(d.op_type != "DequantizeLinear" or d.domain != dq_in.domain for d in dqs) or node.output[0] in g.graph_outputs:
            continue
        if len(dq_in.input) < 3 or len(q_out.input) < 3 or not all(g.is_constant(i) for i in (*dq_in.input[1:3], *q_out.input[1:3])):
            continue
        s_in, z_in = g.array(dq_in.input[1]), g.array(dq_in.input[2])
        s_out, z_out = g.array(q_out.input[1]), g.array(q_out.input[2])
        if s_in.size != 1 or z_in.dtype != z_out.dtype or not np.array_equal(z_in, z_out) \
                or np.float32(s_in.reshape(-1)[0] * np.float32(c)) != np.float32(s_out.reshape(-1)[0]):
            continue
        for d in dqs:
            d.input[0] = dq_in.input[0]
        dropped |= {id(node), id(q_out)}
        if len(g.consumers.get(dq_in.output[0], [])) == 1:  # the Mul was its only reader
            dropped.add(id(dq_in))
        constants.append(node.input[1 - k])
    if dropped:
        keep = [n for n in m.graph.node if id(n) not in dropped]
        del m.graph.node[:]
        m.graph.node.extend(keep)
    return constants
