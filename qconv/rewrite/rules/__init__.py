"""What qconv knows about each op family, in one place per family: which inputs the planner quantizes and in
which role (``spec``), and how the QDQ group folds into a QOperator op (``fold``, None when it does not).

Each family module exports ``RULES``: {op type: Rule}. ``spec`` returns [(input index, role, per-channel
axis)] or a sentence saying why the node cannot be quantized; ``fold`` returns (op type, domain, inputs,
extra attributes, output) or None. The roles the planner needs come from the same table:
``anchor`` ops have int8 kernels worth converting float inputs for; ``own`` ops take int8 inputs and give
an output with its own parameters; ``shared`` ops move data and keep their input's parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx

from qconv.graph import Graph

MS = "com.microsoft"
EIGHT_BIT = (onnx.TensorProto.UINT8, onnx.TensorProto.INT8)


@dataclass(frozen=True)
class Rule:
    role: str  # anchor | own | shared
    spec: Callable  # (node, g, per_channel) -> list[(index, role, axis)] | str
    fold: Callable | None = None  # (node, view, y) -> replacement | None; y = (scale, zero point, output) of its Q


class View:
    """Q/DQ lookups on a QDQ graph (what the folds read)."""

    def __init__(self, model: onnx.ModelProto):
        self.g = Graph(model)
        self.dq = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}

    def deq(self, name: str):
        """(quantized, scale, zero point) of the 8-bit (or int32 bias) DequantizeLinear giving ``name``, or None."""
        n = self.dq.get(name)
        if n is None or len(n.input) < 3:
            return None
        zp = self.g.initializers.get(n.input[2])
        if zp is None or zp.data_type not in EIGHT_BIT + (onnx.TensorProto.INT32,):
            return None
        return n.input[0], n.input[1], n.input[2]

    def eight_bit(self, name: str) -> bool:
        n = self.dq.get(name)
        zp = self.g.initializers.get(n.input[2]) if n is not None and len(n.input) > 2 else None
        return zp is not None and zp.data_type in EIGHT_BIT

    def q_after(self, name: str):
        """The single QuantizeLinear reading ``name`` (and nothing else reading it), or None."""
        cons = self.g.consumers.get(name, [])
        if len(cons) == 1 and cons[0].op_type == "QuantizeLinear" and name not in self.g.graph_outputs and name not in self.g.pinned:
            return cons[0]
        return None

    def output_q(self, node):
        """(scale, zero point, output) of the 8-bit QuantizeLinear after ``node``, or None."""
        q = self.q_after(node.output[0]) if node.output else None
        zp = self.g.initializers.get(q.input[2]) if q is not None and len(q.input) > 2 else None
        return (q.input[1], q.input[2], q.output[0]) if zp is not None and zp.data_type in EIGHT_BIT else None

    def same_params(self, a: tuple, b: tuple) -> bool:
        g = self.g
        return all(g.is_constant(x) and g.is_constant(y) and np.array_equal(g.array(x), g.array(y)) for x, y in zip(a[1:], b[1:]))

    def inputs(self, node, indices, bias_at: int | None = None) -> list | None:
        """(q, scale, zp) of each input in ``indices`` when all are 8-bit (the input at ``bias_at`` may be int32)."""
        got = []
        for k in indices:
            if k != bias_at and not self.eight_bit(node.input[k]):
                return None
            got.append(self.deq(node.input[k]))
        return None if any(x is None for x in got) else got


def spec(node: onnx.NodeProto, g: Graph, per_channel: bool):
    """The planner's input spec for ``node`` (activation input 0 for ops without a rule of their own)."""
    rule = RULES.get(node.op_type)
    return rule.spec(node, g, per_channel) if rule else [(0, "activation", None)]


def fold(node: onnx.NodeProto, view: View):
    rule = RULES.get(node.op_type)
    if rule is None or rule.fold is None:
        return None
    return rule.fold(node, view, view.output_q(node))


def weight_or_activation(node, g: Graph, k: int, axis: int | None, per_channel: bool):
    """Input ``k`` as a weight (constant, per-channel along ``axis`` when asked) or as an activation."""
    if g.is_constant(node.input[k]):
        return (k, "weight", axis if per_channel else None)
    return (k, "activation", None)


def _registry() -> dict[str, Rule]:
    from qconv.rewrite.rules import conv, elementwise, matmul, movement

    table: dict[str, Rule] = {}
    for family in (conv, matmul, elementwise, movement):
        table.update(family.RULES)
    return table


RULES = _registry()
ANCHORS = frozenset(op for op, r in RULES.items() if r.role == "anchor")
SHARED = frozenset(op for op, r in RULES.items() if r.role == "shared")
OWN = frozenset(op for op, r in RULES.items() if r.role in ("anchor", "own"))
