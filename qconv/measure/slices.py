"""Where one output tensor holds several kinds of values: a graph output made by a Concat (a detector's head joins
box coordinates, in pixels, and class scores, in [0, 1]: ``[1, 4 + 80, N]``). Each concatenated part is scored
as an output of its own, so an error that clipping hides in the mean (the small scores) still shows."""

from __future__ import annotations

import onnx

from qconv.graph import Graph

PASS_OVER = ("Identity",)


def output_concat(g: Graph, output: str):
    """The Concat node that makes graph output ``output`` (through Identity), or None."""
    node = g.producer.get(output)
    while node is not None and node.op_type in PASS_OVER:
        node = g.producer.get(node.input[0])
    return node if node is not None and node.op_type == "Concat" else None


def output_slices(model: onnx.ModelProto, sizes: dict[str, int] | None = None) -> dict[str, tuple[int, list[tuple[int, int]]]]:
    """{output: (axis, [(start, stop), ...])} for each graph output a Concat of two or more parts makes, from the
    parts' static sizes along the axis (``sizes``: measured ones, by part name, where the graph does not say)."""
    g = Graph(model)
    out = {}
    for o in model.graph.output:
        node = output_concat(g, o.name)
        if node is None or len([i for i in node.input if i]) < 2:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        rank = len(g.shape(node.output[0]) or g.shape(node.input[0]) or [])
        if axis < 0:
            if not rank:
                continue
            axis += rank
        bounds, start = [], 0
        for part in node.input:
            shape = g.shape(part)
            size = shape[axis] if shape is not None and len(shape) > axis and shape[axis] else (sizes or {}).get(part)
            if not size:
                break
            bounds.append((start, start + size))
            start += size
        else:
            out[o.name] = (axis, bounds)
    return out


def concat_parts(model: onnx.ModelProto) -> dict[str, tuple[str, int]]:
    """{part tensor: (output, axis)} of every output Concat's parts (to measure sizes the graph leaves unknown)."""
    g = Graph(model)
    parts = {}
    for o in model.graph.output:
        node = output_concat(g, o.name)
        if node is not None:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            for part in node.input:
                if part:
                    parts[part] = (o.name, axis)
    return parts
