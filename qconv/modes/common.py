"""What several modes share: rewriting If/Loop/Scan bodies as their part of the plan says, and plan rows for the
weight-conversion modes (fp16, int4)."""

from __future__ import annotations

import onnx

from qconv.errors import QconvError
from qconv.graph import ensure_opset, subgraphs
from qconv.plan import NodeDecision, QuantPlan
from qconv.plan.planner import subplan


def apply_bodies(qmodel: onnx.ModelProto, p: QuantPlan, findings, rewrite) -> None:
    """Rewrite each If/Loop/Scan body as its part of the plan says (``rewrite(body model, its plan)``), in place,
    outer bodies first."""
    if not subgraphs.has_bodies(qmodel):
        return
    done = quantized = 0
    for body in subgraphs.bodies(qmodel):
        sub = subplan(p, body.scope)
        if not sub.tensors:
            continue
        wrapped, added = subgraphs.body_model(qmodel, body)
        rewritten = rewrite(wrapped, sub)
        subgraphs.put_body(qmodel, body, rewritten, added)
        for op in rewritten.opset_import:  # e.g. com.microsoft for a DynamicQuantizeLSTM in the body
            ensure_opset(qmodel, op.domain, op.version)
        done += 1
        quantized += sum(d.quantized for d in sub.nodes)
    subgraphs.prune_initializers(qmodel)  # float weights a body's int8 copies replaced
    if done:
        findings.subgraphs = {"bodies_quantized": done, "nodes_quantized": quantized,
                                 "bodies": len(subgraphs.bodies(qmodel))}


def decisions_from(model: onnx.ModelProto, reasons: dict[str, tuple[str, str]], touched) -> list[NodeDecision]:
    """Plan rows: kept float for the nodes in ``reasons`` ({name: (code, reason)}), converted where ``touched``, else
    integer (no float data)."""
    out = []
    for n in model.graph.node:
        if n.name in reasons:
            out.append(NodeDecision(n.name, n.op_type, "float", reasons[n.name][1], reasons[n.name][0]))
        elif touched(n):
            out.append(NodeDecision(n.name, n.op_type, "quantized"))
        else:
            out.append(NodeDecision(n.name, n.op_type, "integer", "no float data: nothing to convert"))
    return out


def check_float_only(overrides, config, where: str) -> None:
    """The weight-conversion modes: a node is converted or kept float, nothing else; no activation ranges."""
    if any(o.precision not in (None, "float") or o.granularity for o in overrides.nodes.values()):
        raise QconvError(f"--mode {config.mode} takes only {{\"precision\": \"float\"}} node overrides")
    check_no_ranges(overrides, config, where)


def check_no_ranges(overrides, config, where: str) -> None:
    if overrides.tensors:
        raise QconvError(f"--mode {config.mode} has no activation ranges: drop the plan's tensor overrides")
