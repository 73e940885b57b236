"""Dynamic int8: int8 weights, activations quantized at run time (MatMulInteger, DynamicQuantizeLSTM); no
calibration. If/Loop/Scan bodies are planned and rewritten as their own models."""

from __future__ import annotations

from qconv.graph import subgraphs
from qconv.modes import Applied, Findings
from qconv.modes.common import apply_bodies, check_no_ranges
from qconv.plan import QuantPlan
from qconv.plan.overrides import Overrides
from qconv.plan.planner import ScopedOverrides, merge_body, subplan, weight_only_tables
from qconv.rewrite.dynamic import apply_dynamic, plan_dynamic

SMOOTH = False


def check(overrides: Overrides, config, where: str) -> None:
    check_no_ranges(overrides, config, where)


def plan(prepared, stats, config, overrides: Overrides) -> QuantPlan:
    p = plan_dynamic(prepared.model, config, overrides)
    weight_only_tables(prepared.model, p)
    for body in subgraphs.bodies(prepared.model) if subgraphs.has_bodies(prepared.model) else []:
        wrapped, _ = subgraphs.body_model(prepared.model, body)
        bp = plan_dynamic(wrapped, config, ScopedOverrides(overrides, body.scope))
        merge_body(p, body, bp)
        p.overrides = overrides
    return p


def apply(prepared, p: QuantPlan, calib_feeds=None) -> Applied:
    qmodel = apply_dynamic(prepared.model, subplan(p))
    findings = Findings()
    apply_bodies(qmodel, p, findings, apply_dynamic)
    return Applied(qmodel, findings, qmodel)
