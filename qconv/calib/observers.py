"""Observers accumulate statistics of one tensor over a stream of batches; they never keep the data."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class MinMaxObserver:
    """Running min and max of the finite values, with counts of all and of non-finite elements."""

    min: float = float("inf")
    max: float = float("-inf")
    count: int = 0
    nonfinite: int = 0

    def update(self, x: np.ndarray) -> None:
        if x.size == 0:
            return
        lo, hi = float(x.min()), float(x.max())
        if not (np.isfinite(lo) and np.isfinite(hi)):  # NaN propagates; +-inf from masks: filter
            finite = x[np.isfinite(x)]
            self.nonfinite += int(x.size - finite.size)
            if finite.size == 0:
                self.count += int(x.size)
                return
            lo, hi = float(finite.min()), float(finite.max())
        self.min = min(self.min, lo)
        self.max = max(self.max, hi)
        self.count += int(x.size)

    def merge(self, other: "MinMaxObserver") -> None:
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        self.count += other.count
        self.nonfinite += other.nonfinite

    @property
    def seen_finite(self) -> bool:
        return self.min <= self.max

    def to_dict(self) -> dict:
        return {
            "min": self.min if self.seen_finite else None,
            "max": self.max if self.seen_finite else None,
            "count": self.count,
            "nonfinite": self.nonfinite,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "MinMaxObserver":
        lo, hi = d.get("min"), d.get("max")
        return cls(
            float("inf") if lo is None else float(lo),
            float("-inf") if hi is None else float(hi),
            int(d.get("count", 0)),
            int(d.get("nonfinite", 0)),
        )
