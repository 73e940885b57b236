"""Elementwise and pooling ops with int8 kernels: QLinearAdd/Mul/Concat/Sigmoid/LeakyRelu/(Global)AveragePool;
Relu and Clip are absorbed by their producer's QuantizeLinear (see the planner)."""

from __future__ import annotations

import numpy as np
import onnx

from qconv.rewrite.rules import MS, Rule


def scalar_scale(node, g) -> tuple[int, float] | None:
    """(input index, c) when ``node`` multiplies a tensor by a positive finite scalar constant c. Such a Mul needs no
    kernel in int8: its output is its input's integers read with the scale times c (the planner gives it those
    parameters, ``qdq.fold_scaled_muls`` drops the Mul)."""
    if node.op_type != "Mul" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
        return None
    for k in (0, 1):
        c = node.input[1 - k]
        if g.is_constant(c) and not g.is_constant(node.input[k]) and g.is_float(c) and g.initializers[c].data_type == onnx.TensorProto.FLOAT:
            value = g.array(c)
            if value.size == 1 and np.isfinite(value).all() and float(value.reshape(-1)[0]) > 0.0:
                return k, float(value.reshape(-1)[0])
    return None


def spec_operands(node, g, per_channel: bool):
    """Every input: constants as quantized operands, the rest as activations."""
    return [(k, "const" if g.is_constant(i) else "activation", None) for k, i in enumerate(node.input) if i]


def spec_clip(node, g, per_channel: bool):
    if any(i and not g.is_constant(i) for i in node.input[1:]):
        return "clip bounds are computed at run time"
    return [(0, "activation", None)]


def spec_unary(node, g, per_channel: bool):
    return [(0, "activation", None)]


def fold_binary(node, view, y):
    ins = view.inputs(node, (0, 1)) if y else None
    return (f"QLinear{node.op_type}", MS, [*ins[0], *ins[1], y[0], y[1]], {}, y[2]) if ins else None


def fold_concat(node, view, y):
    ins = view.inputs(node, range(len(node.input))) if y else None
    return ("QLinearConcat", MS, [y[0], y[1], *[v for t in ins for v in t]], {}, y[2]) if ins else None


def fold_unary(node, view, y):
    ins = view.inputs(node, (0,)) if y else None
    if not ins:
        return None
    extra = {"channels_last": 0} if node.op_type.endswith("Pool") else {}
    return f"QLinear{node.op_type}", MS, [*ins[0], y[0], y[1]], extra, y[2]


RULES = {
    "Add": Rule("own", spec_operands, fold_binary),
    "Mul": Rule("own", spec_operands, fold_binary),
    "Concat": Rule("own", spec_operands, fold_concat),
    "Sigmoid": Rule("own", spec_unary, fold_unary),
    "LeakyRelu": Rule("own", spec_unary, fold_unary),
    "AveragePool": Rule("own", spec_unary, fold_unary),
    "GlobalAveragePool": Rule("own", spec_unary, fold_unary),
    "Relu": Rule("own", spec_unary),
    "Clip": Rule("own", spec_clip),
}
