"""Conv and ConvTranspose: int8 weights per output channel, int32 bias; Conv folds into QLinearConv."""

from __future__ import annotations

from qconv.graph import attr
from qconv.rewrite.rules import Rule, weight_or_activation


def spec(node, g, per_channel: bool):
    op = node.op_type
    if op == "ConvTranspose" and attr(node, "group", 1) != 1:
        per_channel = False  # its weight's output-channel axis is split across groups
    ins = list(node.input)
    out = [(0, "activation", None), weight_or_activation(node, g, 1, 0 if op == "Conv" else 1, per_channel)]
    if len(ins) > 2 and ins[2]:
        if not (g.is_constant(ins[1]) and g.is_constant(ins[2])):
            return "bias is computed at run time; int8 kernels need a constant bias"
        out.append((2, "bias", 0))
    return out


def fold_conv(node, view, y):
    if not y:
        return None
    ins = view.inputs(node, range(len([i for i in node.input if i])), bias_at=2)
    if not ins:
        return None
    (x, xs, xz), (w, ws, wz) = ins[0], ins[1]
    bias = [ins[2][0]] if len(ins) > 2 else []
    return "QLinearConv", "", [x, xs, xz, w, ws, wz, y[0], y[1], *bias], {}, y[2]


RULES = {"Conv": Rule("anchor", spec, fold_conv), "ConvTranspose": Rule("anchor", spec)}
