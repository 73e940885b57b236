"""Static int8 and a16w8: activations quantized with calibrated ranges, weights per channel; QDQ pairs, optionally
folded into QOperator form, optionally with integer model I/O."""

from __future__ import annotations

import collections

from qconv.adjust import bias
from qconv.calib.store import Ranges
from qconv.errors import QconvError
from qconv.modes import Applied, Findings
from qconv.modes.common import apply_bodies
from qconv.plan import QuantPlan, kernels, regions
from qconv.plan.overrides import NodeOverride, Overrides
from qconv.plan.planner import activation_ranges, build_plan, subplan, weight_only_tables
from qconv.rewrite.qdq import apply_qdq
from qconv.rewrite.smooth import smoothed_input
from qconv.rewrite.qoperator import fold_qoperator

SMOOTH = True


def check(overrides: Overrides, config, where: str) -> None:
    """Every override applies to a static mode."""


def plan(prepared, stats: Ranges | None, config, overrides: Overrides) -> QuantPlan:
    if stats is None:
        raise QconvError(f"--mode {config.mode} needs calibration: give --data or --calib")
    smooth_muls = {f"{k}/smooth" for k, v in overrides.nodes.items() if v.smooth is not None} | {f"{k}/smooth" for k in prepared.smoothing}
    ranges, methods = activation_ranges(stats, config, overrides)
    for node, sm in sorted(prepared.smoothing.items()):  # the default's SmoothQuant chose each smoothed input's range
        t = smoothed_input(node)
        if t in ranges and t not in methods:  # (--ranges output and overrides come first)
            ranges[t], methods[t] = (float(sm["range"][0]), float(sm["range"][1])), "smoothquant"
    nonfinite, masks = stats.nonfinite, stats.masks
    # The smoothing Mul runs in float: quantizing its input would crush the channels it exists to rescale.
    internal = overrides.merged(Overrides({m: NodeOverride(precision="float") for m in smooth_muls}, {}))
    p = build_plan(prepared.model, ranges, config, nonfinite, masks, internal, methods)
    speed = _speed(prepared, p, stats, config, overrides)
    if speed and speed.get("float_nodes"):
        why = _slower_reason(speed)
        p = build_plan(prepared.model, ranges, config, nonfinite, masks, internal, methods,
                       {n: why for n in speed["float_nodes"]})
    p.overrides = overrides
    weight_only_tables(prepared.model, p)
    for d in p.nodes:
        if d.name in smooth_muls:
            d.reason, d.code = "SmoothQuant's division of the input by its channel scales, in float before it is quantized", "mode"
    p.source = {"ranges": {k: [float(v[0]), float(v[1])] for k, v in sorted(ranges.items()) if k not in methods},
                "nonfinite": dict(sorted(nonfinite.items())), "masks": dict(sorted(masks.items()))}
    if stats.refined:
        p.source["output_ranges"] = {k: [float(v[0]), float(v[1])] for k, v in sorted(stats.refined.items()) if methods.get(k) == "output"}
    if speed is not None:
        p.source["speed"] = speed
    return p


def _speed(prepared, p: QuantPlan, stats: Ranges, config, overrides: Overrides) -> dict | None:
    """The kernel cost table's verdict for an int8 plan (qconv.plan.regions): recorded by a stored plan (replanned
    without the table), else computed from the calibration's tensor sizes; None when not weighed."""
    if config.mode != "int8":
        return None
    if stats.speed is not None:
        return stats.speed
    table = kernels.load(config.kernels, prepared.kernel_id)
    counts = regions.counts_per_row(stats.observers, stats.identity)
    if table is None or not counts:
        return None
    fixed = {d.name for d in p.nodes if getattr(overrides.node(d.name), "precision", None) is not None}
    return regions.choose(prepared.model, p, counts, table, fixed, prepared.kernel_id,
                          regions.quantization_noise(p, stats.observers)).to_dict(table)


def _slower_reason(speed: dict) -> str:
    est = speed["estimate_us"]
    ab = speed.get("verified")
    against = "the fastest choice's" if ab and ab.get("against") else "the all-int8 model's"
    timed = f"; timed A/B at {ab['ratio']:.3g}x {against} time" if ab else ""
    table = f"(kernel table '{speed['table']['name']}'; --kernels none quantizes them)"
    if speed.get("choice") == "accurate":
        return (f"int8 gains too little here on this CPU to pay for its rounding: {len(speed['float_nodes'])} nodes stay float, the "
                f"model estimated at {est['chosen']:.4g} us a row against {est['int8']:.4g} us all int8{timed} (within "
                f"{regions.TOLERANCE:.0%}), keeping {speed['noise_float']:.0%} of the estimated rounding noise away {table}")
    return (f"int8 is slower here on this CPU: {len(speed['float_nodes'])} nodes stay float, the model estimated at {est['chosen']:.4g} "
            f"us a row against {est['int8']:.4g} us all int8{timed} {table}")


def apply(prepared, p: QuantPlan, calib_feeds=None) -> Applied:
    config = p.config
    qmodel, dequantized = apply_qdq(bias.apply(prepared.model, p.corrections), subplan(p))
    findings = Findings()
    apply_bodies(qmodel, p, findings, lambda m, sub: _body(m, sub, config))
    analysis = qmodel
    if config.quantized_io:
        from qconv.rewrite.quantized_io import integer_io

        ranges = {k: (float(v[0]), float(v[1])) for k, v in dict(p.source.get("ranges") or {}).items()}
        ranges.update({k: t.range for k, t in p.tensors.items() if t.range is not None})
        qmodel, findings.quantized_io = integer_io(qmodel, p, ranges)
    if config.output_format == "qoperator":
        qmodel, folded = fold_qoperator(qmodel)
        findings.qoperator = dict(sorted(collections.Counter(folded.values()).items()))
    return Applied(qmodel, findings, analysis, dequantized, retyped_io=bool(config.quantized_io))


def _body(model, sub: QuantPlan, config):
    rewritten, _ = apply_qdq(model, sub)
    if config.output_format == "qoperator":
        rewritten, _ = fold_qoperator(rewritten)
    return rewritten
