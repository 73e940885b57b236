"""Fold a QDQ graph into the QOperator form: DequantizeLinear -> op -> QuantizeLinear becomes QLinearOp.

One plan, two forms: this pass reads only the QDQ graph the plan produced, so every scale and zero
point is the one the QDQ form carries. Each op family is a rule: a pattern check that says why it does
not apply, and the replacement's input list. Data-movement ops whose input and output share parameters
(Reshape, Transpose, MaxPool, ...) simply run on the integer tensor.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from qconv.graph import Graph, attr, ensure_opset, topo_sort
from qconv.intake import drop_unused_initializers
from qconv.planner import SHARED

MS = "com.microsoft"


class _View:
    """Q/DQ lookups on a QDQ graph."""

    def __init__(self, model: onnx.ModelProto):
        self.g = Graph(model)
        self.dq = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}

    def deq(self, name: str):
        """(quantized, scale, zero point) feeding float tensor ``name`` through an 8-bit DQ, or None
        (16-bit and int32-bias DQ are not QLinear inputs, except a bias, which ``bias`` reads)."""
        n = self.dq.get(name)
        if n is None or len(n.input) < 3:
            return None
        zp = self.g.initializers.get(n.input[2])
        if zp is None or zp.data_type not in _EIGHT_BIT + (onnx.TensorProto.INT32,):
            return None
        return n.input[0], n.input[1], n.input[2]

    def eight_bit(self, name: str) -> bool:
        n = self.dq.get(name)
        zp = self.g.initializers.get(n.input[2]) if n is not None and len(n.input) > 2 else None
        return zp is not None and zp.data_type in _EIGHT_BIT

    def q_after(self, name: str):
        """The single QuantizeLinear reading ``name`` (and nothing else reading it), or None."""
        cons = self.g.consumers.get(name, [])
        if len(cons) == 1 and cons[0].op_type == "QuantizeLinear" and name not in self.g.graph_outputs and name not in self.g.pinned:
            return cons[0]
        return None

    def same_params(self, a: tuple, b: tuple) -> bool:
        g = self.g
        return all(g.is_constant(x) and g.is_constant(y) and np.array_equal(g.array(x), g.array(y)) for x, y in zip(a[1:], b[1:]))


_EIGHT_BIT = (onnx.TensorProto.UINT8, onnx.TensorProto.INT8)


def _inputs_quantized(node, view: _View, indices) -> list | None:
    """The (q, scale, zp) of each input in ``indices``: 8-bit ones, except a Conv/Gemm bias (int32)."""
    got = []
    for k in indices:
        bias = k == 2 and node.op_type in ("Conv", "Gemm")
        if not bias and not view.eight_bit(node.input[k]):
            return None
        got.append(view.deq(node.input[k]))
    return None if any(x is None for x in got) else got


def _rule(node, view: _View):
    """(op_type, domain, inputs, extra attributes, output name) replacing ``node``, or None."""
    op = node.op_type
    q = view.q_after(node.output[0]) if node.output else None
    zp = view.g.initializers.get(q.input[2]) if q is not None and len(q.input) > 2 else None
    y = (q.input[1], q.input[2], q.output[0]) if zp is not None and zp.data_type in _EIGHT_BIT else None
    if op == "Conv" and y:
        ins = _inputs_quantized(node, view, range(len([i for i in node.input if i])))
        if ins:
            (x, xs, xz), (w, ws, wz) = ins[0], ins[1]
            bias = [ins[2][0]] if len(ins) > 2 else []
            return "QLinearConv", "", [x, xs, xz, w, ws, wz, y[0], y[1], *bias], {}, y[2]
    if op == "MatMul":
        ins = _inputs_quantized(node, view, (0, 1))
        if ins and y:
            (a, as_, az), (b, bs, bz) = ins
            return "QLinearMatMul", "", [a, as_, az, b, bs, bz, y[0], y[1]], {}, y[2]
        if ins:
            (a, as_, az), (b, bs, bz) = ins
            return "MatMulIntegerToFloat", MS, [a, b, as_, bs, az, bz], {}, node.output[0]
    if op == "Gemm" and not attr(node, "transA", 0):
        ins = _inputs_quantized(node, view, range(len([i for i in node.input if i])))
        if ins:
            (a, as_, az), (b, bs, bz) = ins[0], ins[1]
            c = [ins[2][0]] if len(ins) > 2 else [""]
            out = [y[0], y[1]] if y else []
            extra = {"transB": attr(node, "transB", 0), "alpha": attr(node, "alpha", 1.0)}
            return "QGemm", MS, [a, as_, az, b, bs, bz, *c, *out], extra, y[2] if y else node.output[0]
    if op in ("Add", "Mul") and y:
        ins = _inputs_quantized(node, view, (0, 1))
        if ins:
            return f"QLinear{op}", MS, [*ins[0], *ins[1], y[0], y[1]], {}, y[2]
    if op == "Concat" and y:
        ins = _inputs_quantized(node, view, range(len(node.input)))
        if ins:
            return "QLinearConcat", MS, [y[0], y[1], *[v for t in ins for v in t]], {}, y[2]
    if op in ("GlobalAveragePool", "AveragePool", "Sigmoid", "LeakyRelu") and y:
        ins = _inputs_quantized(node, view, (0,))
        if ins:
            extra = {"channels_last": 0} if op.endswith("Pool") else {}
            return f"QLinear{op}", MS, [*ins[0], y[0], y[1]], extra, y[2]
    if op in SHARED and y:
        ins = _inputs_quantized(node, view, (0,))
        if ins and view.same_params(ins[0], (None, y[0], y[1])):
            return op, node.domain, [ins[0][0], *node.input[1:]], {}, y[2]
    return None


def fold_qoperator(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, str]]:
    """The QOperator form of a QDQ model, and which op each folded node became."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    view = _View(m)
    folded: dict[str, str] = {}
    out_nodes, absorbed = [], set()
    for node in m.graph.node:
        rule = _rule(node, view)
        if rule is None:
            out_nodes.append(node)
            continue
        op, domain, inputs, extra, output = rule
        if output != node.output[0]:  # the QuantizeLinear after it is now part of the QLinear op
            absorbed.add(id(view.q_after(node.output[0])))
        keep = {a.name: a for a in node.attribute}
        new = helper.make_node(op, inputs, [output], name=node.name, domain=domain)
        if op == node.op_type:
            new.attribute.extend(node.attribute)
        elif op in ("QLinearConv", "QLinearAveragePool", "QLinearConcat", "QLinearLeakyRelu"):
            new.attribute.extend(keep.values())
        for k, v in extra.items():
            if k not in {a.name for a in new.attribute}:
                new.attribute.append(helper.make_attribute(k, v))
        new.doc_string = f"qconv: {node.op_type} folded from the QDQ form"
        folded[node.name] = op
        out_nodes.append(new)
    del m.graph.node[:]
    m.graph.node.extend(n for n in out_nodes if id(n) not in absorbed)
    _drop_dead(m)
    if any(n.domain == MS for n in m.graph.node):
        ensure_opset(m, MS, 1)
    topo_sort(m)
    return m, folded


def _drop_dead(m: onnx.ModelProto) -> None:
    """Remove Q/DQ nodes whose outputs nobody reads any more, then unused initializers."""
    while True:
        g = Graph(m)
        dead = [n for n in m.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(g.consumers.get(o) or o in g.graph_outputs or o in g.pinned for o in n.output)]
        if not dead:
            break
        for n in dead:
            m.graph.node.remove(n)
    drop_unused_initializers(m)
