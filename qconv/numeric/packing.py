"""Consecutive groups under a budget: how a pass over the data is split when everything it would hold does not fit
(the output-aware range search's exposed activations, GPTQ's Hessians)."""

from __future__ import annotations

from typing import Callable, Iterable, TypeVar

T = TypeVar("T")


def consecutive(items: Iterable[T], cost: Callable[[T], float], budget: float) -> list[list[T]]:
    """``items`` in order, cut into groups whose costs sum to ``budget`` or less; an item costing more than the
    budget alone is a group of its own (nothing is dropped). No items: no groups."""
    out: list[list[T]] = []
    used = 0.0
    for item in items:
        c = cost(item)
        if not out or (out[-1] and used + c > budget):
            out.append([])
            used = 0.0
        out[-1].append(item)
        used += c
    return out
