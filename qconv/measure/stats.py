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
        """Fold one batch in. Sums of squares are float32 BLAS dot products over chunks of CHUNK elements,
        added in float64 (relative error ~1e-6, far below what SQNR or cosine can show); a batch holding
        inf/NaN, or squares beyond float32's range (or below it), is redone in float64 without the non-finite pairs."""
        r = np.ascontiguousarray(ref, dtype=np.float32).reshape(-1)
        a = np.ascontiguousarray(approx, dtype=np.float32).reshape(-1)
        if r.size != a.size:
            raise ValueError(f"shapes differ: {np.shape(ref)} vs {np.shape(approx)}")
        if not r.size:
            return
        with np.errstate(over="ignore", invalid="ignore"):
            d = r - a
            sums = [_sumsq(r), _sumsq(d), _sumsq(a)]
            np.abs(d, out=d)
            sums += [float(np.add.reduce(d, dtype=np.float64)), float(d.max())]
        underflow = (sums[0] == 0.0 and r.any()) or (sums[2] == 0.0 and a.any()) or (sums[1] == 0.0 and sums[3] > 0.0)
        if underflow or not all(math.isfinite(x) for x in sums):  # tiny values square to 0 in float32
            finite = np.isfinite(r) & np.isfinite(a)
            r64, a64 = r[finite].astype(np.float64), a[finite].astype(np.float64)
            if not r64.size:
                return
            d64 = r64 - a64
            sums = [float(r64 @ r64), float(d64 @ d64), float(a64 @ a64), float(np.abs(d64).sum()), float(np.abs(d64).max())]
            count = int(d64.size)
        else:
            count = int(r.size)
        self.signal += sums[0]
        self.noise += sums[1]
        self.approx_sq += sums[2]
        self.abs_err_sum += sums[3]
        self.max_abs_err = max(self.max_abs_err, sums[4])
        self.count += count

    def merge(self, other: "ErrorStats") -> None:
        """Add another shard's sums (the result depends on the shard order only through float rounding)."""
        self.signal += other.signal
        self.noise += other.noise
        self.approx_sq += other.approx_sq
        self.abs_err_sum += other.abs_err_sum
        self.max_abs_err = max(self.max_abs_err, other.max_abs_err)
        self.count += other.count

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


CHUNK = 1 << 16


def _sumsq(x: np.ndarray) -> float:
    """sum(x * x) of a float32 vector: BLAS dot per chunk, chunks added in float64."""
    if x.size <= CHUNK:
        return float(np.dot(x, x))
    return float(sum(float(np.dot(c, c)) for c in np.split(x[: x.size - x.size % CHUNK], x.size // CHUNK))
                 + float(np.dot(x[x.size - x.size % CHUNK:], x[x.size - x.size % CHUNK:])))


def _finite_or_str(x: float):
    """JSON has no infinity: an exact match is reported as the string "inf"."""
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf")


def top1(logits: np.ndarray) -> np.ndarray:
    a = np.asarray(logits)
    return a.argmax(axis=-1).reshape(-1) if a.ndim > 1 else (a > 0).astype(np.int64)
