"""Which quantized nodes add the most error, and what a measured change gains: pure functions of error maps and
metrics (the search and its unit tests call them; ``qconv.tune.lab`` measures the maps)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from qconv.measure.tally import Metrics
from qconv.measure.thresholds import Thresholds
from qconv.tune.trial import Group, Ranked

CAP_DB = 120.0  # SQNR above this is exact for ranking purposes


@dataclass(frozen=True)
class Site:
    """A quantized node as ranking sees it: where its error shows (its output, or its folded activation's) and the
    tensors it reads."""

    node: str
    op: str
    output: str
    inputs: tuple[str, ...]
    macs: float


def rank(sites: list[Site], sqnr: dict[str, float], total_macs: float) -> list[Ranked]:
    """Nodes by the SQNR lost across them (worst input's SQNR minus output's, in dB; a node at the model's input
    counts its output's error against an exact input), most first, ties by name."""
    ranked = []
    total = total_macs or 1.0
    for s in sites:
        s_out = sqnr.get(s.output)
        ins = [sqnr.get(i, math.inf) for i in s.inputs]
        s_in = min(ins) if ins else math.inf
        added = (min(s_in, CAP_DB) - min(s_out, CAP_DB)) if s_out is not None else 0.0
        ranked.append(Ranked(s.node, s.op, round(float(added), 3), float(s_out) if s_out is not None else None,
                             round(s.macs / total, 6)))
    ranked.sort(key=lambda r: (-r.added_db, r.node))
    return ranked


def gain(targets: Thresholds, base: Metrics | None, new: Metrics | None) -> float:
    """How much ``new`` improves on ``base``: the share of ``base``'s total shortfall against the targets it removes
    (once the targets are met, the share of the error of the worst output or part of one, 1 - cosine)."""
    if new is None or base is None:
        return 0.0
    s0 = sum(x for _, x in targets.misses(base))
    if s0 > 0:
        return float((s0 - sum(x for _, x in targets.misses(new))) / s0)
    e0, e1 = 1.0 - base.worst_cosine, 1.0 - new.worst_cosine
    return float((e0 - e1) / e0) if e0 > 0 else 0.0


def priority(r: Ranked) -> tuple:
    """Remedy order: gain per cost (big Conv/MatMul, which carry the speed, stay int8 where they can), then name."""
    return (-(r.float_gain / (1.0 + 20.0 * r.cost)), r.node)


GROUP_CAP_DB = 30.0  # one node's share of a group estimate, at most (a node at the model's input adds "everything")


def groups(ranked: list[Ranked], extra: dict[str, tuple[str, ...]], skip_ops: set[str], min_size: int = 2) -> list[Group]:
    """Candidate groups, most estimated error first: every op type with ``min_size`` or more quantized nodes (not
    ``skip_ops``: the big layers the speed comes from), and the ``extra`` named groups ({label: nodes})."""
    added = {r.node: min(max(r.added_db, 0.0), GROUP_CAP_DB) for r in ranked}
    by_op: dict[str, list[str]] = {}
    for r in ranked:
        if r.op not in skip_ops:
            by_op.setdefault(r.op, []).append(r.node)
    found = [Group(f"all {len(nodes)} {op} nodes", tuple(sorted(nodes)), 0.0) for op, nodes in by_op.items() if len(nodes) >= min_size]
    found += [Group(label, tuple(sorted(nodes)), 0.0) for label, nodes in extra.items() if nodes]
    out = [Group(g.label, g.nodes, round(sum(added.get(n, 0.0) for n in g.nodes), 3)) for g in found]
    return sorted((g for g in out if g.estimate > 0), key=lambda g: (-g.estimate, g.label))
