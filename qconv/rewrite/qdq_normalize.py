"""Exact rewrites that bring a QDQ model as other tools export it (PyTorch QAT, onnxruntime, ...) into the groups
the QOperator fold recognizes, without changing a single output value:

- ``Relu -> QuantizeLinear`` with the zero point at the type's minimum: the Relu goes (the quantization already
  saturates every negative value to that zero point);
- ``DequantizeLinear -> MaxPool/Reshape/Transpose/...`` read by nothing else: the DequantizeLinear moves after the
  op, which then runs on the integer tensor (max and data movement commute with a positive-scale dequantization);
- a float constant bias of a Conv/Gemm whose input and weight are dequantized: stored as int32 with scale =
  input scale x weight scale (what the int8 kernels add; the rounding is below half a step of the output).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qconv.graph import Graph, topo_sort, until_fixed
from qconv.numeric import qmath

_COMMUTES = {"MaxPool", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten"}


def normalize_qdq(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    notes = [_drop_relu_before_q(m), _move_dq_after_movement(m), _quantize_biases(m)]
    topo_sort(m)
    return m, [n for n in notes if n]


def _zero_point_is_min(g: Graph, q: onnx.NodeProto) -> bool:
    if len(q.input) < 3 or not g.is_constant(q.input[2]):
        return False
    zp = g.array(q.input[2])
    return zp.size == 1 and int(zp.reshape(-1)[0]) == int(np.iinfo(zp.dtype).min)


def _drop_relu_before_q(m: onnx.ModelProto) -> str | None:
    g = Graph(m)
    dropped = 0
    for node in list(m.graph.node):
        if node.op_type != "Relu":
            continue
        cons = g.consumers.get(node.output[0], [])
        if cons and all(c.op_type == "QuantizeLinear" and _zero_point_is_min(g, c) for c in cons) \
                and node.output[0] not in g.graph_outputs:
            for c in cons:
                c.input[0] = node.input[0]
            m.graph.node.remove(node)
            dropped += 1
    return f"{dropped} Relu before a QuantizeLinear with zero point at the minimum removed (it clamps the same)" if dropped else None


def _move_dq_after_movement(m: onnx.ModelProto) -> str | None:
    moved = until_fixed(m, _move_one_dq)
    return f"{moved} DequantizeLinear moved after the data-movement op it fed" if moved else None


def _move_one_dq(m: onnx.ModelProto, g: Graph, node: onnx.NodeProto) -> bool:
    """Move the DequantizeLinear feeding data-movement ``node`` after it (True when moved)."""
    if node.op_type not in _COMMUTES or len([o for o in node.output if o]) != 1:
        return False
    dq = g.producer.get(node.input[0])
    if dq is None or dq.op_type != "DequantizeLinear" or len(g.consumers.get(dq.output[0], [])) != 1:
        return False
    if not (len(dq.input) > 1 and g.is_constant(dq.input[1]) and np.all(g.array(dq.input[1]) > 0)):
        return False
    if g.array(dq.input[1]).size != 1 and node.op_type != "MaxPool":
        return False  # a per-axis scale follows its axis; only MaxPool keeps axes in place
    out = node.output[0]
    inner = g.unique(out + "_quantized")
    node.input[0] = dq.input[0]
    node.output[0] = inner
    dq.input[0] = inner
    dq.output[0] = out
    return True


def _quantize_biases(m: onnx.ModelProto) -> str | None:
    g = Graph(m)
    done = 0
    for node in m.graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or not node.input[2] or not g.is_constant(node.input[2]):
            continue
        dx, dw = g.producer.get(node.input[0]), g.producer.get(node.input[1])
        if not (dx is not None and dw is not None and dx.op_type == dw.op_type == "DequantizeLinear"):
            continue
        if not (g.is_constant(dx.input[1]) and g.is_constant(dw.input[1])):
            continue
        xs, ws = g.array(dx.input[1]), g.array(dw.input[1])
        bias = g.array(node.input[2]).astype(np.float32).reshape(-1)
        if xs.size != 1 or ws.size not in (1, bias.size):
            continue
        qp = qmath.bias_qparams(bias, float(xs.reshape(-1)[0]), ws.reshape(-1) if ws.size > 1 else np.float32(ws.reshape(-1)[0]))
        q = numpy_helper.from_array(qmath.quantize(bias, qp), g.unique(node.input[2] + "_int32"))
        s = numpy_helper.from_array(qp.scale.astype(np.float32), g.unique(node.input[2] + "_scale"))
        z = numpy_helper.from_array(qp.zero_point.astype(np.int32), g.unique(node.input[2] + "_zero_point"))
        out = g.unique(node.input[2] + "_dequantized")
        kwargs = {"axis": 0} if qp.scale.ndim else {}
        m.graph.initializer.extend([q, s, z])
        m.graph.node.append(helper.make_node("DequantizeLinear", [q.name, s.name, z.name], [out],
                                             name=g.unique(out + "_DequantizeLinear"), **kwargs))
        node.input[2] = out
        done += 1
    return f"{done} float biases stored as int32 (input scale x weight scale)" if done else None
