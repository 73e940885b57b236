"""fp16: float weights and activations halved where the op has an fp16 kernel and the values fit (casts at the
borders); the plan names every node converted or kept float32, and why."""

from __future__ import annotations

from qconv.modes import Applied, Findings
from qconv.modes.common import check_float_only, decisions_from
from qconv.plan import QuantPlan
from qconv.plan.overrides import NodeOverride, Overrides

SMOOTH = False


def check(overrides: Overrides, config, where: str) -> None:
    check_float_only(overrides, config, where)


def plan(prepared, stats, config, overrides: Overrides) -> QuantPlan:
    from qconv.rewrite.fp16 import fp16_decisions

    forced = {n.name for n in prepared.model.graph.node if (overrides.node(n.name) or NodeOverride()).precision == "float"}
    rows = fp16_decisions(prepared.model, config.exclude_ops, config.exclude_nodes, forced)
    reasons, touched = {}, set()
    for node, reason, uses_float in rows:
        if reason:
            excluded = config.excluded(node.name, node.op_type)
            code = "excluded" if excluded else "override" if node.name in forced else "fp16"
            reasons[node.name] = (code, excluded or reason)
        elif uses_float:
            touched.add(node.name)
    return QuantPlan(config, decisions_from(prepared.model, reasons, lambda n: n.name in touched), {}, {}, overrides)


def apply(prepared, p: QuantPlan, calib_feeds=None) -> Applied:
    from qconv.rewrite.fp16 import convert_fp16

    config = p.config
    forced = [n.name for n in p.nodes if n.kept_float and n.code in ("excluded", "override")]
    r = convert_fp16(prepared.model, keep_io_types=config.keep_io_types, float_nodes=forced)
    findings = Findings(fp16={"overflow": r.overflow, "underflow": r.underflow, "converted_nodes": r.converted_nodes,
                              "keep_io_types": config.keep_io_types})
    return Applied(r.model, findings, r.model, retyped_io=not config.keep_io_types)
