"""A/B latency of two sessions on one feed: interleaved rounds, the median ratio and a distribution-free 95% interval.

Machines are noisy: a verdict ("faster", "slower") is given only when the whole interval says so.
"""

from __future__ import annotations

import math
import time

import numpy as np

from qconv.runtime import run


def _block(sess, feed: dict, block: int) -> float:
    """Milliseconds of one run with the model's weights in cache: ``block`` runs back to back, the first
    dropped (it pays for the other model having evicted this one), the median of the rest."""
    times = []
    for _ in range(block):
        t0 = time.perf_counter()
        run(sess, feed)
        times.append((time.perf_counter() - t0) * 1000.0)
    return float(np.median(times[1:])) if block > 1 else times[0]


BUDGET_S = 10.0  # seconds of A/B rounds at most (past the minimum rounds)


def latency(float_sess, quant_sess, feed: dict, threads: int, min_rounds: int = 25, max_rounds: int = 400,
            budget_s: float = BUDGET_S, target_width: float = 0.04, block: int = 3) -> dict:
    """Median milliseconds of each model on one feed and the ratio with its spread, timed as A/B rounds.

    Each round times both models back to back (the order alternates), so machine noise hits both alike; each
    model's time in a round is a block of runs with its first run dropped, so neither pays for the cache the
    other just filled (in production one model runs alone);
    the per-round ratios give the median ratio and a 95% confidence interval of it (order statistics
    of the binomial, no assumption on the noise). Rounds continue past ``min_rounds`` until the interval
    is narrower than ``target_width`` or ``budget_s`` is spent (at least 5 rounds for slow models). The
    verdict is "faster" or "slower" only when the whole interval says so, else "same within noise".
    """
    for _ in range(3):
        run(float_sess, feed)
        run(quant_sess, feed)
    tf, tq = [], []
    start = time.perf_counter()
    for k in range(max_rounds):
        for sess, times in ((float_sess, tf), (quant_sess, tq)) if k % 2 == 0 else ((quant_sess, tq), (float_sess, tf)):
            times.append(_block(sess, feed, block))
        elapsed = time.perf_counter() - start
        if k + 1 >= 5 and elapsed > budget_s:
            break
        if k + 1 >= min_rounds:
            lo, hi = ratio_interval(np.array(tq) / np.array(tf))
            if hi - lo < target_width:
                break
    ratios = np.array(tq) / np.array(tf)
    lo, hi = ratio_interval(ratios)
    mf, mq = float(np.median(tf)), float(np.median(tq))
    return {"original": mf, "quantized": mq, "ratio": float(np.median(ratios)), "ratio_low": lo, "ratio_high": hi,
            "spread": {"original_iqr": _iqr(tf), "quantized_iqr": _iqr(tq)}, "runs": len(tf), "threads": threads,
            "provider": "CPUExecutionProvider", "verdict": verdict(lo, hi)}


def ratio_interval(ratios: np.ndarray, z: float = 1.96) -> tuple[float, float]:
    """95% confidence interval of the median of ``ratios`` (distribution-free, from order statistics)."""
    r = np.sort(np.asarray(ratios, dtype=np.float64))
    n = r.size
    if n == 0:
        return math.nan, math.nan
    half = z * math.sqrt(n) / 2.0
    lo_k = max(0, int(math.floor(n / 2.0 - half)))
    hi_k = min(n - 1, int(math.ceil(n / 2.0 + half)))
    return float(r[lo_k]), float(r[hi_k])


def verdict(lo: float, hi: float) -> str:
    if hi < 1.0:
        return "faster"
    if lo > 1.0:
        return "slower"
    return "same within noise"


def _iqr(x) -> float:
    q1, q3 = np.percentile(np.asarray(x), [25, 75])
    return float(q3 - q1)
