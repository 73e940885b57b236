"""Streaming error statistics between a reference and an approximation (pure numpy)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class ErrorStats:
    """Accumulates sums over batches so SQNR, cosine and errors cover the whole data set."""

    signal: float = 0.0
    noise: float = 0.0
    dot: float = 0.0
    approx_sq: float = 0.0
    abs_err_sum: float = 0.0
    max_abs_err: float = 0.0
    count: int = 0

    def update(self, ref: np.ndarray, approx: np.ndarray) -> None:
        r = np.asarray(ref, dtype=np.float64).ravel()
        a = np.asarray(approx, dtype=np.float64).ravel()
        finite = np.isfinite(r) & np.isfinite(a)
        if not finite.all():
            r, a = r[finite], a[finite]
        d = r - a
        self.signal += float(r @ r)
        self.noise += float(d @ d)
        self.dot += float(r @ a)
        self.approx_sq += float(a @ a)
        if d.size:
            self.abs_err_sum += float(np.abs(d).sum())
            self.max_abs_err = max(self.max_abs_err, float(np.abs(d).max()))
        self.count += int(d.size)

    @property
    def sqnr_db(self) -> float:
        if self.noise == 0.0:
            return math.inf
        if self.signal == 0.0:
            return -math.inf
        return 10.0 * math.log10(self.signal / self.noise)

    @property
    def cosine(self) -> float:
        denom = math.sqrt(self.signal) * math.sqrt(self.approx_sq)
        if denom == 0.0:
            return 1.0 if self.signal == self.approx_sq else 0.0
        return self.dot / denom

    def to_dict(self) -> dict:
        return {
            "sqnr_db": _finite_or_str(self.sqnr_db),
            "cosine": self.cosine,
            "max_abs_err": self.max_abs_err,
            "mean_abs_err": self.abs_err_sum / self.count if self.count else 0.0,
        }


def _finite_or_str(x: float):
    """JSON has no infinity: an exact match is reported as the string "inf"."""
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf")


def top1(logits: np.ndarray) -> np.ndarray:
    a = np.asarray(logits)
    return a.argmax(axis=-1).reshape(-1) if a.ndim > 1 else (a > 0).astype(np.int64)
