"""SmoothQuant for one MatMul/Gemm: an input with outlier channels is divided by per-channel scales that are folded
into the weight (the same function), so both quantize with less error. Per-channel extremes of every candidate
input are measured once, on up to ``STAT_ROWS`` calibration rows."""

from __future__ import annotations

from typing import Iterator

import numpy as np

from qconv.adjust.smooth import capture
from qconv.measure.compare import limited
from qconv.plan.overrides import NodeOverride, Overrides, TensorOverride
from qconv.rewrite.smooth import input_axis, smoothed_input, smoothing_scales, weight_layout
from qconv.tune.remedies import Context
from qconv.tune.trial import Candidate

ALPHAS = (0.5, 0.75)
SMOOTH_OUTLIERS = 4.0  # smooth an input whose largest channel magnitude is this many times the median channel's
STAT_ROWS = 64
# The whole-model move needs this many weight MatMul/Gemm nodes (a transformer's layers, where the error accumulates);
# fewer are the per-node remedy's: on a two-layer MLP whose second input has outlier channels, smoothing both at one
# alpha reached cosine 0.9984 and left the node that needed its own alpha no remedy (per node: >= 0.999).
GROUP_MIN = 8


def propose(ctx: Context, node, method: str, overrides: Overrides) -> Iterator[Candidate]:
    for alpha in ALPHAS:
        extra = smoothing(ctx, node, alpha)
        if extra is not None:
            yield Candidate(f"SmoothQuant scales (alpha {alpha:g}) folded into its weight", f"'{node.name}' smoothed (alpha {alpha:g})",
                            method, extra)


def smoothing(ctx: Context, node, alpha: float, outliers: float = SMOOTH_OUTLIERS) -> Overrides | None:
    """Overrides that smooth ``node``'s input (scales and the smoothed input's range), if it has outlier channels (its
    largest channel magnitude ``outliers`` times the median channel's; 0: any input)."""
    g = ctx.graph
    layout = weight_layout(node, g)
    if isinstance(layout, str) or not g.is_float(node.input[0]) or node.input[0] == smoothed_input(node.name):
        return None  # (an input the default's SmoothQuant divided already is not divided again)
    if ctx.channels is None:
        names = {n.input[0]: input_axis(n) for n in ctx.model.graph.node
                 if not isinstance(weight_layout(n, g), str) and g.is_float(n.input[0])}
        feeds = ctx.calib_source if ctx.calib_source is not None else ctx.held.feeds
        got = capture(ctx.model, names, limited(feeds, ctx.specs, STAT_ROWS), ctx.threads, sampled=0)
        ctx.channels = {k: (c.lo, c.hi) for k, c in got.items()}
    w, axis = layout
    st = ctx.channels.get(node.input[0])
    if st is None or st[0].size != w.shape[axis]:
        return None
    lo, hi = st
    absmax = np.maximum(np.abs(lo), np.abs(hi))
    med = float(np.median(absmax))
    if med <= 0 or float(absmax.max()) / med < outliers:
        return None
    s = smoothing_scales(absmax, w, axis, alpha)
    rng = (float(min(0.0, (lo / s).min())), float(max(0.0, (hi / s).max())))
    return Overrides({node.name: NodeOverride(smooth=tuple(float(x) for x in s))}, {smoothed_input(node.name): TensorOverride(range=rng)})


def smoothing_all(ctx: Context, alpha: float, overrides: Overrides) -> Overrides | None:
    """Every MatMul/Gemm with a constant weight and a float input smoothed at ``alpha`` (SmoothQuant over the whole
    model, as NNCF's transformer preset applies it), leaving the nodes ``overrides`` names already; None when there are
    fewer than GROUP_MIN. all-MiniLM-L6-v2's 36 weight MatMuls at alpha 0.8: neighbours 77.1 -> 90.2%, cosine 0.9853 -> 0.9969 at
    0.49x -> 0.52x fp32's time (NNCF's transformer preset: 90.2%, 0.9969 at 0.79x); at alpha 0.5: 74.8%, 0.9851."""
    nodes, tensors = {}, {}
    for n in ctx.model.graph.node:
        if n.op_type not in ("MatMul", "Gemm") or n.name in overrides.nodes:
            continue
        extra = smoothing(ctx, n, alpha, outliers=0.0)
        if extra is not None:
            nodes.update(extra.nodes)
            tensors.update(extra.tensors)
    return Overrides(nodes, tensors) if len(nodes) >= GROUP_MIN else None
