"""LSTM (and GRU, which stays float): int8 weights with activations quantized at run time, as onnxruntime's
DynamicQuantizeLSTM (com.microsoft) computes them. Used by dynamic mode and, for the recurrent layers of a CRNN,
by static int8 too: an LSTM has no static int8 kernel, and its weights dominate a text recognizer's size.

DynamicQuantizeLSTM takes W [directions, input, 4*hidden] and R [directions, hidden, 4*hidden] (the ONNX LSTM's
weights transposed) as int8, with per-(direction, gate row) scales of shape [directions, 4*hidden].
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qconv.graph import Graph, attr
from qconv.numeric import pairs, qmath

MS = "com.microsoft"
GRU_REASON = "onnxruntime has no int8 GRU kernel (no DynamicQuantizeGRU): GRU weights stay float"


def lstm_problem(node: onnx.NodeProto, g: Graph) -> str | None:
    """Why this LSTM cannot run as DynamicQuantizeLSTM, or None."""
    ins = list(node.input)
    if len(ins) < 3 or not (g.is_constant(ins[1]) and g.is_constant(ins[2])):
        return "LSTM weights are computed at run time"
    if attr(node, "layout", 0) != 0:
        return "LSTM with layout=1 (batch first) has no int8 kernel"
    if not g.is_float(ins[0]):
        return "input is not float32"
    w, r = g.array(ins[1]), g.array(ins[2])
    if w.ndim != 3 or r.ndim != 3 or w.dtype != np.float32:
        return "LSTM weights are not 3-D float32"
    return None


def lstm_qparams(w: np.ndarray, qt: qmath.QType, per_channel: bool, pair_safe: bool = True) -> qmath.QParams:
    """Symmetric int8 parameters of an LSTM weight [D, 4H, K]: one per (direction, gate row), or per direction.
    ``pair_safe``: widened where two adjacent weights along K could saturate the 16-bit sums of x86 CPUs without VNNI
    (qconv.numeric.pairs; DynamicQuantizeLSTM runs the same u8 x s8 kernel: 13 dB -> 71 dB on an all-positive LSTM)."""
    d, rows, k = w.shape
    if per_channel:
        qp = qmath.weight_qparams(w.reshape(d * rows, k), qt, True, 0)
        qp = pairs.safe_params(qp, w.reshape(d * rows, k), True) if pair_safe else qp
        return qmath.QParams(qp.scale.reshape(d, rows), qp.zero_point.reshape(d, rows), qt, None)
    scales, zps = [], []
    for i in range(d):
        qp = qmath.weight_qparams(w[i], qt, True, None)
        qp = pairs.safe_params(qp, w[i], False) if pair_safe else qp
        scales.append(qp.scale)
        zps.append(qp.zero_point)
    return qmath.QParams(np.asarray(scales, np.float32), np.asarray(zps).astype(qt.dtype), qt, None)


def _quantized(w: np.ndarray, qp: qmath.QParams) -> np.ndarray:
    """[D, 4H, K] quantized with its per-row (or per-direction) parameters, transposed to [D, K, 4H]."""
    d, rows, k = w.shape
    scale = qp.scale.reshape(d, -1, 1) if qp.scale.ndim == 2 else qp.scale.reshape(d, 1, 1)
    q = np.clip(np.rint(w.astype(np.float32) / scale), qp.qtype.qmin, qp.qtype.qmax).astype(qp.qtype.dtype)
    return np.ascontiguousarray(np.transpose(q, (0, 2, 1)))


def emit_dynamic_lstm(g: Graph, node: onnx.NodeProto, qp_w: qmath.QParams, qp_r: qmath.QParams,
                      inits: list) -> onnx.NodeProto:
    """The DynamicQuantizeLSTM replacing ``node`` (its new initializers are appended to ``inits``)."""
    ins = list(node.input) + [""] * (8 - len(node.input))
    names = []
    for src, qp, tag in ((ins[1], qp_w, "W"), (ins[2], qp_r, "R")):
        w = g.array(src)
        q = numpy_helper.from_array(_quantized(w, qp), g.unique(f"{src}_quantized"))
        q.doc_string = f"qconv: from '{src}' (int8 symmetric, DynamicQuantizeLSTM layout [directions, K, 4*hidden])"
        s = numpy_helper.from_array(qp.scale.astype(np.float32), g.unique(f"{src}_scale"))
        z = numpy_helper.from_array(qp.zero_point.astype(qp.qtype.dtype), g.unique(f"{src}_zero_point"))
        inits += [q, s, z]
        names.append((q.name, s.name, z.name))
    (wq, ws, wz), (rq, rs, rz) = names
    kwargs = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name != "layout"}
    new = helper.make_node("DynamicQuantizeLSTM", [ins[0], wq, rq, *ins[3:8], ws, wz, rs, rz], list(node.output),
                           name=g.unique(node.name + "_DynamicQuantizeLSTM"), domain=MS, **kwargs)
    new.doc_string = "qconv: LSTM with int8 weights, activations quantized at run time"
    return new


ROLE = "lstm-weight"  # a TensorPlan role: the W or R of an LSTM that becomes DynamicQuantizeLSTM


def plan_lstm(node: onnx.NodeProto, g: Graph, qt: qmath.QType, per_channel: bool, pair_safe: bool = True) -> list:
    """The two weight plans (W, R) of an LSTM that can run as DynamicQuantizeLSTM: [(name, qparams)]."""
    return [(node.input[k], lstm_qparams(g.array(node.input[k]), qt, per_channel, pair_safe)) for k in (1, 2)]


def apply_lstm(model: onnx.ModelProto, plan) -> onnx.ModelProto:
    """Every LSTM with weight plans of role ``lstm-weight`` becomes DynamicQuantizeLSTM (a copy of the model)."""
    from qconv.graph import drop_unused_initializers, ensure_opset, topo_sort

    by_node: dict[str, dict[str, qmath.QParams]] = {}
    for t in plan.tensors.values():
        if t.role == ROLE:
            by_node.setdefault(t.consumers[0], {})[t.name] = t.qparams
    if not by_node:
        return model
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = Graph(m)
    inits: list = []
    for k, node in enumerate(m.graph.node):
        params = by_node.get(node.name)
        if node.op_type == "LSTM" and params:
            m.graph.node[k].CopyFrom(emit_dynamic_lstm(g, node, params[node.input[1]], params[node.input[2]], inits))
    m.graph.initializer.extend(inits)
    ensure_opset(m, MS, 1)
    topo_sort(m)
    drop_unused_initializers(m)
    return m
