"""Another range method for a node's inputs (only the methods that give other ranges than those measured)."""

from __future__ import annotations

from typing import Iterator

import numpy as np

from qconv.calib.ranges import select_range
from qconv.plan.overrides import Overrides, TensorOverride
from qconv.tune.remedies import Context
from qconv.tune.trial import Candidate

ORDER = ("percentile", "mse", "entropy", "minmax")


def propose(ctx: Context, node, method: str, overrides: Overrides) -> Iterator[Candidate]:
    tensors = ctx.stats.observers if ctx.stats is not None else None
    if not tensors:
        return
    sym, pct = ctx.config.symmetric_activations, ctx.config.percentile
    observed = [i for i in ctx.activations(node) if i in tensors and tensors[i].seen_finite and i not in overrides.tensors]
    tried = [tuple(select_range(tensors[i], method, sym, pct) for i in observed)]
    for m in ORDER:
        if m == method:
            continue
        ranges = tuple(select_range(tensors[i], m, sym, pct) for i in observed)
        if any(np.allclose(ranges, r, rtol=1e-6, atol=0.0) for r in tried):
            continue  # the same ranges as a candidate already measured
        tried.append(ranges)
        ts = {i: TensorOverride(method=m) for i in observed}
        if ts:
            yield Candidate(f"range method {m} for its input{'s' if len(ts) > 1 else ''}", f"'{node.name}' inputs: --method {m}",
                            method, Overrides({}, ts))
