"""Fold a QDQ graph into the QOperator form: DequantizeLinear -> op -> QuantizeLinear becomes QLinearOp.

One plan, two forms: this pass reads only the QDQ graph the plan produced, so every scale and zero
point is the one the QDQ form carries. The fold of each op family lives with the rest of what qconv knows
about that family in ``qconv.rewrite.rules``. Data-movement ops whose input and output share parameters
(Reshape, Transpose, MaxPool, ...) simply run on the integer tensor.
"""

from __future__ import annotations

import onnx
from onnx import helper

from qconv.graph import Graph, drop_unused_initializers, ensure_opset, topo_sort
from qconv.rewrite import rules
from qconv.rewrite.rules import MS


def fold_qoperator(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, str]]:
    """The QOperator form of a QDQ model, and which op each folded node became."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    view = rules.View(m)
    folded: dict[str, str] = {}
    out_nodes, absorbed = [], set()
    for node in m.graph.node:
        rule = rules.fold(node, view)
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
