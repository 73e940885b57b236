"""A Concat whose inputs' ranges differ widely loses the small ones at one 8-bit scale: kept float, each input keeps
its own scale (the planner's mixed-scales rule applies the same threshold to model outputs)."""

from __future__ import annotations

from typing import Iterator

from qconv.plan.overrides import NodeOverride, Overrides
from qconv.plan.planner import MIXED_SCALES
from qconv.tune.remedies import Context
from qconv.tune.trial import Candidate


def propose(ctx: Context, node, method: str, overrides: Overrides) -> Iterator[Candidate]:
    if node.op_type != "Concat" or ctx.stats is None:
        return
    ranges = ctx.stats.select(method, ctx.config.symmetric_activations, ctx.config.percentile)
    spans = [max(abs(ranges[i][0]), abs(ranges[i][1])) for i in ctx.activations(node) if i in ranges]
    spans = [s for s in spans if s > 0]
    if len(spans) >= 2 and max(spans) / min(spans) > MIXED_SCALES:
        yield Candidate("float Concat: its inputs keep their own scales", f"'{node.name}' float (inputs span {max(spans) / min(spans):.0f}x)",
                        method, Overrides({node.name: NodeOverride(precision="float")}, {}))
