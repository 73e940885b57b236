"""Data-movement ops: their output keeps the input's scale and zero point, so onnxruntime drops the Q/DQ pair
and runs them on the integer tensor (its DropQDQNodes list; DepthToSpace/SpaceToDepth have no integer kernel
and are not here)."""

from __future__ import annotations

from qconv.rewrite.rules import Rule


def spec_first(node, g, per_channel: bool):
    return [(0, "activation", None)]


def spec_gather(node, g, per_channel: bool):
    return [(0, "const" if g.is_constant(node.input[0]) else "activation", None)]


def spec_maxpool(node, g, per_channel: bool):
    if len([o for o in node.output if o]) > 1:
        return "MaxPool with an Indices output has no int8 kernel"
    return [(0, "activation", None)]


def fold_shared(node, view, y):
    ins = view.inputs(node, (0,)) if y else None
    if ins and view.same_params(ins[0], (None, y[0], y[1])):
        return node.op_type, node.domain, [ins[0][0], *node.input[1:]], {}, y[2]
    return None


RULES = {op: Rule("shared", spec_first, fold_shared)
         for op in ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Resize", "Slice", "Expand", "Tile")}
RULES["Gather"] = Rule("shared", spec_gather, fold_shared)
RULES["MaxPool"] = Rule("shared", spec_maxpool, fold_shared)
