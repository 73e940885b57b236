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
    approx_sq: float = 0.0
    abs_err_sum: float = 0.0
    max_abs_err: float = 0.0
    count: int = 0

    def update(self, ref: np.ndarray, approx: np.ndarray) -> None:
        """Fold one batch in: float32 arithmetic with numpy's pairwise sums (relative error ~1e-7 * log2 n),
        a float64 total across batches; non-finite pairs are left out."""
        r = np.asarray(ref, dtype=np.float32).ravel()
        a = np.asarray(approx, dtype=np.float32).ravel()
        if r.size != a.size:
            raise ValueError(f"shapes differ: {np.shape(ref)} vs {np.shape(approx)}")
        if not (np.isfinite(r).all() and np.isfinite(a).all()):
            finite = np.isfinite(r) & np.isfinite(a)
            r, a = r[finite], a[finite]
        if not r.size:
            return
        d = r - a
        ad = np.abs(d)
        with np.errstate(over="ignore"):
            sums = [np.add.reduce(x * x, dtype=np.float32) for x in (r, d, a)] + [np.add.reduce(ad, dtype=np.float32)]
        if not all(np.isfinite(sums)):  # squares beyond float32's range (|x| > 1.8e19): redo in float64
            r64, a64 = r.astype(np.float64), a.astype(np.float64)
            d64 = r64 - a64
            sums = [np.add.reduce(x * x) for x in (r64, d64, a64)] + [np.add.reduce(np.abs(d64))]
        self.signal += float(sums[0])
        self.noise += float(sums[1])
        self.approx_sq += float(sums[2])
        self.abs_err_sum += float(sums[3])
        self.max_abs_err = max(self.max_abs_err, float(ad.max()))
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
        """From the noise, not the dot product: 1 - cos = (|r - a|^2 - (|r| - |a|)^2) / (2 |r| |a|) keeps
        full precision when the two are close (where a float32 dot product would round it away)."""
        denom = math.sqrt(self.signal) * math.sqrt(self.approx_sq)
        if denom == 0.0:
            return 1.0 if self.signal == self.approx_sq else 0.0
        gap = (math.sqrt(self.signal) - math.sqrt(self.approx_sq)) ** 2
        return min(1.0, max(-1.0, 1.0 - (self.noise - gap) / (2.0 * denom)))

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
