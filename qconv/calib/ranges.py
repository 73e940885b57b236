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
    """TensorRT's entropy calibration on a |x| histogram: the threshold with the least KL(P || Q).

    For a candidate threshold of i bins, P is the histogram's first i bins with the clipped mass added to the last,
    Q merges those bins (unclipped) into ``levels`` groups spread over each group's nonzero bins, with a zero Q bin
    where P has mass smoothed to a small epsilon. Both are constant over a group, so KL(P || Q) is a sum over the
    ``levels`` groups of prefix sums (counts, nonzero bins, c log c): every candidate at once, in O(levels) each
    rather than O(bins) (a tuning run's entropy trial was ~10 s of loops; the values agree with the per-bin sum to
    ~1e-15). Candidates within 1e-12 of the least KL are ties, and the smallest threshold among them is taken."""
    n = counts.size
    if n <= levels:
        return n * width
    c = counts.astype(np.float64)
    step = max(1, (n - levels) // 512)  # at most ~512 candidates
    i = np.array(list(range(levels, n, step)) + [n], np.int64)
    total = c.sum()
    cum = np.concatenate([[0.0], np.cumsum(c)])  # integers: exact
    nonzero = np.concatenate([[0], np.cumsum(c > 0)])
    clogc = np.concatenate([[0.0], np.cumsum(c * np.log(np.where(c > 0, c, 1.0)))])
    start = (np.arange(levels)[None, :] * i[:, None] + levels - 1) // levels  # each group's first bin
    end = np.concatenate([start[:, 1:], i[:, None]], axis=1)
    mass = cum[end] - cum[start]
    support = (nonzero[end] - nonzero[start]).astype(np.float64)
    last, above = c[i - 1], total - cum[i]
    support[:, -1] += (last == 0) & (above > 0)  # the clipped mass puts the last bin in P's support
    p_last = (last + above) / total
    smoothed = (mass[:, -1] == 0) & (above > 0)  # the last group is the clipped bin alone: Q is epsilon there
    z = (cum[i] > 0) + _EPS * smoothed  # Q's sum before it is normalized again
    weight = mass / total  # P's mass over each group's support
    weight[:, -1] = (mass[:, -1] + above) / total
    with np.errstate(divide="ignore", invalid="ignore"):
        p_log_p = (clogc[i - 1] - np.log(total) * cum[i - 1]) / total + np.where(p_last > 0, p_last * np.log(p_last), 0.0)
        log_q = np.log(mass / (np.maximum(support, 1.0) * np.maximum(cum[i], 1e-300)[:, None] * z[:, None]))
        p_log_q = np.where(mass > 0, weight * np.where(mass > 0, log_q, 0.0), 0.0).sum(axis=1)
        p_log_q += np.where(smoothed, p_last * np.log(_EPS / z), 0.0)
    kl = p_log_p - p_log_q
    k = int(np.argmax(kl <= kl.min() + 1e-12 * max(1.0, abs(float(kl.min())))))
    return int(i[k]) * width


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
