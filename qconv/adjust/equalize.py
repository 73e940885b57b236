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

import numpy as np
import onnx
from onnx import numpy_helper

from qconv.graph import Graph, attr

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
    arrays = {name: numpy_helper.to_array(inits[name]).astype(np.float64) for a, b in found for name in _params(a) + _params(b)}
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
