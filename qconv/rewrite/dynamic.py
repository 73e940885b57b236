"""Dynamic int8: weights quantized offline, activations quantized at run time from their own range.

For each MatMul (and Gemm) with a constant weight the rewrite emits the standard-op pattern

    DynamicQuantizeLinear(A) -> MatMulInteger(A_q, W_q, A_zp, W_zp) -> Cast -> Mul(A_scale * W_scale) [-> Add(bias)]

which any ONNX runtime can run and which onnxruntime fuses into one DynamicQuantizeMatMul kernel. One
DynamicQuantizeLinear serves every MatMul reading the same tensor. Conv stays float: onnxruntime has no
optimized ConvInteger kernel, and dynamic quantization makes CNNs several times slower than fp32 there.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from qconv.errors import QconvError
from qconv.graph import Graph, compacted, drop_unused_initializers, integer_only, topo_sort
from qconv.numeric import pairs, qmath
from qconv.plan import NodeDecision, QuantPlan, TensorPlan
from qconv.plan.config import QuantConfig
from qconv.plan.overrides import Overrides
from qconv.rewrite.qdq import table_nodes
from qconv.rewrite.rules import recurrent
from qconv.rewrite.rules.matmul import dynamic_weight, emit_matmul_integer

CONV_REASON = ("dynamic mode keeps Conv in float: onnxruntime's ConvInteger has no optimized kernel and runs "
               "several times slower than fp32; use --mode int8 (static) for CNNs")




def _decide(node, g: Graph, config: QuantConfig, ov) -> tuple[str, str] | tuple[np.ndarray, str]:
    """(code, reason) the node stays float, or (its [K, N] weight, the weight's name)."""
    excluded = config.excluded(node.name, node.op_type)
    if excluded:
        return "excluded", excluded
    if ov is not None and ov.precision == "float":
        return "override", "kept float by the plan's override"
    if node.domain not in ("", "ai.onnx"):
        return "custom-domain", f"custom-domain op ({node.domain}) is left as it is"
    if node.op_type in ("Conv", "ConvTranspose"):
        return "mode", CONV_REASON
    if node.op_type == "LSTM":
        problem = recurrent.lstm_problem(node, g)
        return ("unsupported", problem) if problem else ("lstm", "")
    if node.op_type == "GRU":
        return "no-kernel", recurrent.GRU_REASON
    if node.op_type not in ("MatMul", "Gemm"):
        return "mode", "dynamic mode quantizes MatMul and Gemm weights only"
    found = dynamic_weight(node, g)
    return ("unsupported", found) if isinstance(found, str) else found


def plan_dynamic(model: onnx.ModelProto, config: QuantConfig, overrides: Overrides | None = None) -> QuantPlan:
    """Which MatMul/Gemm weights become int8, with their parameters (axis 1 of the [K, N] matrix)."""
    overrides = overrides or Overrides()
    if any(o.precision == "int16" for o in overrides.nodes.values()):
        raise QconvError("dynamic mode has no int16 activations: use precision float or int8 in the plan's overrides")
    g = Graph(model)
    w_q = config.weight_qtype
    decisions, tensors = [], {}
    for node in model.graph.node:
        if integer_only(node, g):
            decisions.append(NodeDecision(node.name, node.op_type, "integer", "integer output (shape or index math): nothing to quantize"))
            continue
        ov = overrides.node(node.name)
        found = _decide(node, g, config, ov)
        per_channel = config.per_channel if not (ov and ov.granularity) else ov.granularity == "per-channel"
        if isinstance(found[0], str) and found[0] == "lstm":
            for name, qp in recurrent.plan_lstm(node, g, w_q, per_channel, config.saturation_safe):
                tensors[f"{node.name}/{name}"] = TensorPlan(name, recurrent.ROLE, qp, [node.name], "LSTM weight, int8 per gate row")
            decisions.append(NodeDecision(node.name, node.op_type, "quantized", "int8 weights, activations quantized at run time (DynamicQuantizeLSTM)"))
            continue
        if isinstance(found[0], str):
            decisions.append(NodeDecision(node.name, node.op_type, "float", found[1], found[0]))
            continue
        w, wname = found
        qp = qmath.weight_qparams(w, w_q, config.symmetric_weights, 1 if per_channel else None)
        origin = "weight, per-channel" if per_channel else "weight, per-tensor"
        if config.saturation_safe:  # DynamicQuantizeMatMul runs onnxruntime's u8 x s8 kernel: pairs along K of [K, N]
            safe = pairs.safe_params(qp, pairs.channels(w, "kn"), per_channel)
            if safe is not qp:
                qp, origin = safe, f"{origin}, scale {pairs.WIDENED}"
        key = f"{node.name}/{wname}"  # one plan entry per reader: a Gemm with transB reads the weight transposed
        tensors[key] = TensorPlan(wname, "weight", qp, [node.name], origin)
        decisions.append(NodeDecision(node.name, node.op_type, "quantized"))
    return QuantPlan(config, decisions, tensors, {}, overrides)


def apply_dynamic(model: onnx.ModelProto, plan: QuantPlan) -> onnx.ModelProto:
    """Rewrite every MatMul/Gemm the plan quantizes into the integer pattern, with the plan's parameters."""
    model = recurrent.apply_lstm(model, plan)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = Graph(m)
    by_reader = {t.consumers[0]: t for t in plan.tensors.values() if t.role == "weight"}
    new_nodes, new_inits, replaced = [], [], []
    by_name = {n.name: n for n in m.graph.node}
    for tp in plan.tensors.values():
        if tp.role == "table":  # planner.weight_only_tables: 8-bit rows, scaled after the gather
            nodes, inits = table_nodes(g, tp, by_name, g.array)
            new_nodes += nodes
            new_inits += inits
    dql: dict[str, tuple[str, str, str]] = {}  # activation -> (quantized, scale, zero point)
    for node in m.graph.node:
        tp = by_reader.get(node.name)
        if tp is None:
            continue
        w, wname = dynamic_weight(node, g)
        a = node.input[0]
        if a not in dql:
            q, s, z = (g.unique(f"{a}_{x}") for x in ("dynamic_quantized", "dynamic_scale", "dynamic_zero_point"))
            new_nodes.append(helper.make_node("DynamicQuantizeLinear", [a], [q, s, z], name=g.unique(a + "_DynamicQuantizeLinear"),
                                              doc_string="qconv: activation quantized at run time (uint8, its own range)"))
            dql[a] = (q, s, z)
        q, s, z = dql[a]
        new_nodes += emit_matmul_integer(g, node, w, wname, tp.qparams, q, s, z, new_inits)
        replaced.append(node)
    for node in replaced:
        m.graph.node.remove(node)
    m.graph.initializer.extend(new_inits)
    m.graph.node.extend(new_nodes)
    topo_sort(m)
    drop_unused_initializers(m, sorted({t.name for t in plan.tensors.values()}))
    return compacted(m)  # without the float weights' bytes (graph.compacted)
