"""MatMul and Gemm: per-column int8 weights (2-D only), QLinearMatMul / MatMulIntegerToFloat / QGemm folds."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qconv.graph import Graph, attr
from qconv.numeric import qmath
from qconv.rewrite.rules import MS, Rule, weight_or_activation


def spec_matmul(node, g, per_channel: bool):
    b = node.input[1]
    rank = len(g.initializers[b].dims) if g.is_constant(b) else 0
    # per-column scales only for a 2-D weight: MatMulIntegerToFloat / QLinearMatMul take no per-axis N-D B
    return [(0, "activation", None), weight_or_activation(node, g, 1, 1 if rank == 2 else None, per_channel)]


def spec_gemm(node, g, per_channel: bool):
    if attr(node, "transA", 0):
        return "transA=1 has no int8 Gemm kernel"
    ins = list(node.input)
    out = [(0, "activation", None), weight_or_activation(node, g, 1, 0 if attr(node, "transB", 0) else 1, per_channel)]
    if len(ins) > 2 and ins[2]:
        c = g.array(ins[2]) if g.is_constant(ins[2]) else None
        simple = attr(node, "alpha", 1.0) == 1.0 and attr(node, "beta", 1.0) == 1.0
        if c is not None and simple and c.ndim in (1, 2) and c.shape[-1] == c.size and g.is_constant(ins[1]):
            out.append((2, "bias", 0))
    return out


def fold_matmul(node, view, y):
    ins = view.inputs(node, (0, 1))
    if not ins:
        return None
    (a, as_, az), (b, bs, bz) = ins
    if y:
        return "QLinearMatMul", "", [a, as_, az, b, bs, bz, y[0], y[1]], {}, y[2]
    return "MatMulIntegerToFloat", MS, [a, b, as_, bs, az, bz], {}, node.output[0]


def fold_gemm(node, view, y):
    if attr(node, "transA", 0):
        return None
    ins = view.inputs(node, range(len([i for i in node.input if i])), bias_at=2)
    if not ins:
        return None
    (a, as_, az), (b, bs, bz) = ins[0], ins[1]
    c = [ins[2][0]] if len(ins) > 2 else [""]
    out = [y[0], y[1]] if y else []
    extra = {"transB": attr(node, "transB", 0), "alpha": attr(node, "alpha", 1.0)}
    return "QGemm", MS, [a, as_, az, b, bs, bz, *c, *out], extra, y[2] if y else node.output[0]


# ---- dynamic mode: the integer pattern onnxruntime fuses into DynamicQuantizeMatMul
def dynamic_weight(node: onnx.NodeProto, g: Graph) -> tuple[np.ndarray, str] | str:
    """The [K, N] weight of a MatMul/Gemm, or the reason the node stays float."""
    if not (len(node.input) > 1 and g.is_constant(node.input[1])):
        return "weight is computed at run time"
    if not g.is_float(node.input[0]):
        return "input is not float32"
    w = g.array(node.input[1])
    if w.dtype != np.float32 or w.ndim != 2:
        return "weight is not a 2-D float32 matrix"
    if node.op_type == "Gemm":
        if attr(node, "transA", 0) or attr(node, "alpha", 1.0) != 1.0 or attr(node, "beta", 1.0) != 1.0:
            return "Gemm with transA, alpha or beta has no integer kernel"
        if attr(node, "transB", 0):
            w = w.T
    return np.ascontiguousarray(w), node.input[1]


def emit_matmul_integer(g: Graph, node, w, wname, qp, q, s, z, inits) -> list[onnx.NodeProto]:
    base = node.name or node.output[0]
    wq = numpy_helper.from_array(qmath.quantize(w, qp), g.unique(wname + "_quantized"))
    wq.doc_string = f"qconv: from '{wname}' ({qp.qtype.name} {'per-channel' if qp.scale.ndim else 'per-tensor'}, dynamic mode)"
    ws = numpy_helper.from_array(qp.scale.astype(np.float32), g.unique(wname + "_scale"))
    wz = numpy_helper.from_array(qp.zero_point.astype(qp.qtype.dtype), g.unique(wname + "_zero_point"))
    inits += [wq, ws, wz]
    acc, flt, scales = (g.unique(f"{base}_{x}") for x in ("int32", "int32_float", "scales"))
    has_bias = node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]
    out = node.output[0]
    scaled = g.unique(f"{base}_scaled") if has_bias else out
    nodes = [
        helper.make_node("MatMulInteger", [q, wq.name, z, wz.name], [acc], name=g.unique(base + "_MatMulInteger")),
        helper.make_node("Cast", [acc], [flt], to=onnx.TensorProto.FLOAT, name=g.unique(base + "_Cast")),
        helper.make_node("Mul", [s, ws.name], [scales], name=g.unique(base + "_scales_Mul")),
        helper.make_node("Mul", [flt, scales], [scaled], name=g.unique(base + "_output_Mul")),
    ]
    if has_bias:
        nodes.append(helper.make_node("Add", [scaled, node.input[2]], [out], name=g.unique(base + "_bias_Add")))
    return nodes


RULES = {"MatMul": Rule("anchor", spec_matmul, fold_matmul), "Gemm": Rule("anchor", spec_gemm, fold_gemm)}
