"""SmoothQuant-style smoothing: move activation outliers of a MatMul/Gemm input into its constant weight.

For per-input-channel scales s, ``x @ W == (x / s) @ (diag(s) W)``: the model computes the same function,
but the activation the int8 kernel sees has its outlier channels divided down, so one per-tensor scale
serves every channel (Xiao et al., SmoothQuant, 2023). The weight, quantized per output channel, absorbs
the scales. A Mul by 1/s is inserted before the node (onnxruntime runs it in float, fused with the
QuantizeLinear that follows); the weight is rescaled in place, or copied when other nodes share it.

The scales come from a node override (``{"smooth": [s_0, ..., s_K-1]}``), which tuning writes with the
smoothed activation's range, so a plan file reproduces the model without calibration data.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qconv.errors import QconvError
from qconv.graph import Graph, attr, copy_with_placeholders

SMOOTHABLE = ("MatMul", "Gemm", "Conv")


def smoothed_input(node_name: str) -> str:
    """Name of the smoothed activation that feeds ``node_name`` (the tensor tuning's range override names)."""
    return f"{node_name}/smoothed_input"


def weight_layout(node: onnx.NodeProto, g: Graph) -> tuple[np.ndarray, int] | str:
    """(weight, axis of its input channels K) of a smoothable node, or why it is not smoothable. For a Conv the
    input's channels are its axis 1; a depthwise Conv's weight holds them on axis 0, a plain one on axis 1."""
    if node.op_type not in SMOOTHABLE:
        return f"{node.op_type} is not MatMul, Gemm or Conv"
    if len(node.input) < 2 or not g.is_constant(node.input[1]):
        return "its weight is not a constant"
    if node.op_type == "Conv":
        w = g.array(node.input[1])
        group = attr(node, "group", 1)
        if w.dtype != np.float32 or w.ndim < 3:
            return "its weight is not a float32 convolution kernel"
        if group == 1:
            return w, 1
        if w.shape[1] == 1 and group == w.shape[0]:
            return w, 0
        return "a grouped (not depthwise) Conv"
    if node.op_type == "Gemm" and attr(node, "transA", 0):
        return "Gemm with transA"
    w = g.array(node.input[1])
    if w.ndim != 2 or w.dtype != np.float32:
        return "its weight is not a 2-D float32 matrix"
    if node.op_type == "Gemm" and attr(node, "transB", 0):
        return w, 1
    return w, 0


def apply_smoothing(model: onnx.ModelProto, scales: dict[str, tuple[float, ...]]) -> onnx.ModelProto:
    """A copy of ``model`` with each named node's input divided by its scales and its weight multiplied by them."""
    if not scales:
        return model
    uses: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    given = {t.name for t in model.graph.initializer}
    # The weights replaced in place are copied as placeholders: a full copy whose weights were then replaced held the
    # old bytes too (protobuf's arena frees nothing one by one: MiniLM's smoothed model kept 50 MB more than its size)
    replaced = {n.input[1] for n in model.graph.node if n.name in scales and len(n.input) > 1 and uses.get(n.input[1], 0) == 1
                and n.input[1] in given}
    m = copy_with_placeholders(model, replaced)
    g = Graph(model)  # the weights are read from the model given
    by_name = {n.name: n for n in m.graph.node}
    originals = {n.name: n for n in model.graph.node}
    inits = {t.name: t for t in m.graph.initializer}
    inserts: dict[str, onnx.NodeProto] = {}
    for name, s in sorted(scales.items()):
        node = by_name.get(name)
        if node is None:
            raise QconvError(f"smooth override for node '{name}': the model has no such node")
        layout = weight_layout(originals[name], g)
        if isinstance(layout, str):
            raise QconvError(f"smooth override for node '{name}' ({node.op_type}): {layout}; only MatMul/Gemm with a constant "
                             "2-D weight can be smoothed")
        w, axis = layout
        k = w.shape[axis]
        s_arr = np.asarray(s, np.float32)
        if s_arr.size != k:
            raise QconvError(f"smooth override for node '{name}' has {s_arr.size} scales, its weight has {k} input channels")
        shape = [1] * w.ndim
        shape[axis] = k
        w_new = (w * s_arr.reshape(shape)).astype(np.float32)
        w_name = node.input[1]
        if uses.get(w_name, 0) > 1 or w_name not in inits:
            w_name = f"{name}/smoothed_weight"
            m.graph.initializer.append(numpy_helper.from_array(w_new, w_name))
            node.input[1] = w_name
        else:
            inits[w_name].CopyFrom(numpy_helper.from_array(w_new, w_name))
        inserts[name] = _divide_input(m, node, name, s_arr, w.ndim)
    nodes = []
    for n in m.graph.node:
        if n.name in inserts:
            nodes.append(inserts[n.name])
        nodes.append(n)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m


def _divide_input(m: onnx.ModelProto, node: onnx.NodeProto, name: str, s_arr: np.ndarray, w_ndim: int) -> onnx.NodeProto:
    """The Mul that divides ``node``'s input by the scales (its output typed like the input); ``node`` reads it."""
    k = s_arr.size
    inv = f"{name}/smooth_scale"
    inv_arr = (1.0 / s_arr).astype(np.float32)
    if node.op_type == "Conv":  # NCHW: the channels are axis 1 of the input
        inv_arr = inv_arr.reshape([k] + [1] * (w_ndim - 2))
    m.graph.initializer.append(numpy_helper.from_array(inv_arr, inv))
    out = smoothed_input(name)
    mul = helper.make_node("Mul", [node.input[0], inv], [out], name=f"{name}/smooth")
    vi = next((v for v in list(m.graph.value_info) + list(m.graph.input) if v.name == node.input[0]), None)
    typed = onnx.ValueInfoProto()
    if vi is not None:
        typed.CopyFrom(vi)
    else:
        typed.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    typed.name = out
    m.graph.value_info.append(typed)
    node.input[0] = out
    return mul


def input_axis(node: onnx.NodeProto) -> int:
    """The axis of the node's input that holds the channels its weight's K axis multiplies."""
    return 1 if node.op_type == "Conv" else -1


def weight_absmax(w: np.ndarray, axis: int) -> np.ndarray:
    """max|W_j| over each of ``w``'s slices along ``axis`` (the input channels SmoothQuant scales)."""
    return np.abs(np.moveaxis(w, axis, 0)).reshape(w.shape[axis], -1).max(axis=1)


def smoothing_scales(absmax: np.ndarray, w: np.ndarray, axis: int, alpha: float) -> np.ndarray:
    """SmoothQuant's s_j = max|x_j|^alpha / max|W_j|^(1 - alpha), for channels that carry signal (others: 1)."""
    return scales_from(absmax, weight_absmax(w, axis), alpha)


def scales_from(absmax: np.ndarray, wmax: np.ndarray, alpha: float) -> np.ndarray:
    """``smoothing_scales`` from the weight's per-channel extremes ``wmax`` (a search over alphas reads them once)."""
    a = np.asarray(absmax, np.float64)
    s = np.ones_like(a)
    ok = (a > 0) & (wmax > 0)
    s[ok] = np.power(a[ok], alpha) / np.power(wmax[ok].astype(np.float64), 1.0 - alpha)
    return np.clip(s, 1e-5, 1e5).astype(np.float32)
