"""Range selection: pure functions from an observer's statistics to the (min, max) an activation gets.

- ``minmax``: the observed extremes.
- ``moving-average``: moving averages of per-batch extremes (robust to a few extreme batches).
- ``percentile``: the range spans the central ``percentile`` % of the values: (100 - p) / 2 % is cut
  from each end (onnxruntime's convention; at the end of one-sided data, e.g. the zeros after a ReLU,
  that cut is empty). Symmetric ranges cut (100 - p) % of |x|.
- ``entropy``: the clipping threshold of |x| minimizing the KL divergence between the histogram and its
  quantized version (TensorRT's method), searched over the whole histogram with 128 quantization levels
  (TensorRT's int8 resolution per side of zero; for one-sided uint8 data this errs towards wider ranges).
- ``mse``: the range minimizing the expected squared quantization error (clipping plus rounding) under
  the histogram.
All histogram-based results are exact to within one bin width (see observers.py).
"""

from __future__ import annotations

import numpy as np

from qconv.calib.observers import Histogram, TensorObserver

METHODS = ("minmax", "moving-average", "percentile", "entropy", "mse")
# The range method when neither the options nor the calibration file name one: the one the quality ledger
# (scripts/bench_ledger.py) finds never worse on a bench model's task. Clipping (percentile) reads more characters
# on PP-OCRv4 rec (96.9% vs 95.2%) and a better text map (95.9 vs 92.9 IoU), but keeps half the detections of
# PicoDet layout (15% vs 31%; 30% even at 99.99999): a detector's rare strong activations are its objects. So the
# extremes stay the default, and a clipping method is an option (or tuning's choice) where the ledger shows it pays.
DEFAULT_METHOD = "minmax"
_EPS = 1e-4


def _quantile(h: Histogram, q: float) -> float:
    """Value below which a fraction ``q`` of the counted elements lie (linear within a bin)."""
    cum = np.cumsum(h.counts)
    total = cum[-1]
    if total == 0:
        return 0.0
    target = q * total
    k = int(np.searchsorted(cum, target, side="left"))
    k = min(k, h.bins - 1)
    before = cum[k - 1] if k else 0
    inside = h.counts[k]
    frac = (target - before) / inside if inside else 0.0
    return float((h.start + k + min(max(frac, 0.0), 1.0)) * h.width)


def _abs_hist(h: Histogram) -> tuple[np.ndarray, float]:
    """Histogram of |x| on bins [k*w, (k+1)*w): exact because the grid is anchored at zero."""
    idx = h.start + np.arange(h.bins)
    absidx = np.where(idx >= 0, idx, -idx - 1)
    out = np.zeros(int(absidx.max()) + 1, np.int64)
    np.add.at(out, absidx, h.counts)
    return out, h.width


def percentile_range(o: TensorObserver, percentile: float, symmetric: bool) -> tuple[float, float]:
    h = o.hist
    tail = (100.0 - percentile) / 100.0
    if symmetric:
        counts, w = _abs_hist(h)
        t = _quantile(Histogram(counts.size, w, 0, counts), 1.0 - tail)
        return -t, t
    return max(o.min, _quantile(h, tail / 2)), min(o.max, _quantile(h, 1.0 - tail / 2))


def _kl_threshold(counts: np.ndarray, width: float, levels: int) -> float:
    """TensorRT's entropy calibration on a |x| histogram: the threshold with the least KL(P || Q)."""
    n = counts.size
    if n <= levels:
        return n * width
    counts = counts.astype(np.float64)
    best, best_i = np.inf, n
    step = max(1, (n - levels) // 512)  # at most ~512 candidates: bounded time per tensor
    for i in list(range(levels, n, step)) + [n]:
        p = counts[:i].copy()
        p[i - 1] += counts[i:].sum()  # clipped values saturate into the last bin
        support_mask = p > 0
        # Q: merge the unclipped reference bins into `levels` groups, spread each over its nonzero bins
        groups = np.minimum((np.arange(i) * levels) // i, levels - 1)
        mass = np.bincount(groups, weights=counts[:i], minlength=levels)
        support = np.bincount(groups, weights=support_mask.astype(np.float64), minlength=levels)
        q = np.where(support_mask, mass[groups] / np.maximum(support[groups], 1), 0.0)
        p, q = p / p.sum(), q / max(q.sum(), 1e-300)
        q = np.where(support_mask & (q == 0), _EPS, q)  # smoothing, as TensorRT does: finite KL when clipping
        q /= q.sum()
        m = support_mask
        kl = float(np.sum(p[m] * np.log(p[m] / q[m])))
        if kl < best:
            best, best_i = kl, i
    return best_i * width


def entropy_range(o: TensorObserver, symmetric: bool, levels: int | None = None) -> tuple[float, float]:
    counts, w = _abs_hist(o.hist)
    if counts.size > 1:
        counts[0] = counts[1]  # the bin holding exact zeros (ReLU, padding) would dominate the KL search
    t = _kl_threshold(counts, w, levels or 128)
    if symmetric:
        return -t, t
    return max(o.min, -t), min(o.max, t)


def mse_range(o: TensorObserver, symmetric: bool, levels: int = 256) -> tuple[float, float]:
    """Shrink the observed range by factors in (0, 1] and keep the one with the least expected error."""
    h = o.hist
    centers = (h.start + np.arange(h.bins) + 0.5) * h.width
    counts = h.counts.astype(np.float64)
    m = counts > 0
    centers, counts = centers[m], counts[m]
    if symmetric:
        a = max(abs(o.min), abs(o.max))
        lo0, hi0 = -a, a
    else:
        lo0, hi0 = min(o.min, 0.0), max(o.max, 0.0)
    extent = max(hi0 - lo0, 1e-30)
    smallest = min(1.0, max(4 * h.width / extent, 1e-4))  # below a few bins the histogram cannot tell
    alphas = np.geomspace(smallest, 1.0, 160)[:, None]
    lo, hi = lo0 * alphas, hi0 * alphas
    scale = (hi - lo) / (levels - 1)
    clipped = np.clip(centers[None, :], lo, hi)
    err = np.sum(counts[None, :] * (centers[None, :] - clipped) ** 2, axis=1) + counts.sum() * scale[:, 0] ** 2 / 12.0
    k = int(np.argmin(err))
    return float(lo[k, 0]), float(hi[k, 0])


def select_range(o: TensorObserver, method: str, symmetric: bool = False, percentile: float = 99.999) -> tuple[float, float]:
    """(min, max) for one tensor by ``method``; falls back to min-max when no histogram was recorded."""
    if method == "minmax" or o.min == o.max:
        return o.min, o.max
    if method == "moving-average":
        return (o.ema_min, o.ema_max) if o.ema_min is not None else (o.min, o.max)
    if o.hist is None or o.hist.width == 0.0:
        return o.min, o.max
    if method == "percentile":
        return percentile_range(o, percentile, symmetric)
    if method == "entropy":
        return entropy_range(o, symmetric)
    if method == "mse":
        return mse_range(o, symmetric)
    raise ValueError(f"unknown range method {method}")
