"""AWQ (Lin et al., 2023, "Activation-aware Weight Quantization"), the search half, in pure numpy.

A MatMul ``y = x @ W`` (W [K, N]) computes the same with ``x / s`` and ``diag(s) W`` for any positive ``s``
[K]. Scaling up the rows that meet large activations gives them finer steps after block quantization, at the
price of coarser steps elsewhere. AWQ searches ``s = a^alpha`` over a grid of ``alpha`` (``a`` the activations'
per-channel magnitude), keeping the ``alpha`` whose quantized layer is closest to the float one on the
calibration inputs; ``alpha = 0`` is plain rounding, so the search never does worse by its own measure.

Both the magnitude and the error come from ``H = mean(x^T x)`` (float64 [K, K]), which qconv's GPTQ already
streams: ``a = sqrt(diag H)`` (the RMS; the paper uses mean |x|) and the expected squared output error of a
weight ``W`` quantized as ``Q`` is ``tr((W - Q)^T H (W - Q))``, exact over the calibration rows and with no
rows held in memory. MatMuls that read the same input (q/k/v; gate/up) share one ``s``, searched on the sum
of their errors, so that ``1 / s`` can be folded once into what produces the input.

Then a clip search: each block's range is shrunk by the ratio (1.0 down to 0.5) that minimizes the block's
error weighted by ``diag H`` (a saturated outlier can cost less than coarse steps for all the others).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from qconv.numeric import qmath

ALPHAS = tuple(np.round(np.linspace(0.0, 1.0, 11), 2))
CLIP_RATIOS = tuple(np.round(np.linspace(1.0, 0.5, 11), 2))
SCALE_LIMIT = 1e4
# weight [K, N] -> the same weight after quantization and dequantization
RoundTrip = Callable[[np.ndarray], np.ndarray]
# blocks [C, n] -> parameters per block (C,)
Fit = Callable[[np.ndarray], qmath.QParams]


def output_error(w: np.ndarray, approx: np.ndarray, hessian: np.ndarray) -> float:
    """``tr(D^T H D)`` with ``D = w - approx``: the mean squared output error over the calibration rows."""
    d = np.asarray(w, dtype=np.float64) - np.asarray(approx, dtype=np.float64)
    return float(np.sum(d * (hessian @ d)))


def magnitudes(hessian: np.ndarray) -> np.ndarray:
    """Per-channel RMS of the input, from the diagonal of ``H``; channels never active read 0."""
    return np.sqrt(np.maximum(np.diag(hessian), 0.0))


def scales_for(alpha: float, magnitude: np.ndarray) -> np.ndarray:
    """``magnitude^alpha`` normalized to a geometric mean range of 1 (dead channels: 1), clipped to stay finite."""
    live = magnitude > 0
    if not np.any(live) or alpha == 0:
        return np.ones_like(magnitude)
    s = np.ones_like(magnitude)
    s[live] = magnitude[live] ** alpha
    s[live] /= np.sqrt(s[live].max() * s[live].min())
    return np.clip(s, 1.0 / SCALE_LIMIT, SCALE_LIMIT)


def search_scale(weights: list[np.ndarray], hessian: np.ndarray, round_trip: RoundTrip,
                 alphas=ALPHAS) -> tuple[np.ndarray, float, dict[float, float]]:
    """(s [K], the chosen alpha, {alpha: summed output error}) for the weights that read one input."""
    magnitude = magnitudes(hessian)
    errors = {}
    best = (np.inf, 0.0, np.ones_like(magnitude))
    for alpha in alphas:
        s = scales_for(float(alpha), magnitude)
        err = 0.0
        for w in weights:
            scaled = np.asarray(w, dtype=np.float64) * s[:, None]
            err += output_error(w, round_trip(scaled.astype(np.float32)) / s[:, None], hessian)
        errors[float(alpha)] = err
        if err < best[0]:
            best = (err, float(alpha), s)
    return best[2], best[1], errors


def clip_fit(blocks: np.ndarray, importance: np.ndarray, fit: Fit, ratios=CLIP_RATIOS) -> qmath.QParams:
    """Per block, the parameters of ``fit`` on the block's range shrunk by the ratio with the least
    importance-weighted squared error (ratio 1.0 is ``fit`` itself, so no block gets worse by this measure)."""
    blocks = np.asarray(blocks, dtype=np.float32)
    best_err = np.full(len(blocks), np.inf)
    best = None
    for r in ratios:
        qp = fit(blocks * np.float32(r))
        err = np.sum(importance * (blocks - qmath.dequantize(qmath.quantize(blocks, qp), qp)) ** 2, axis=1)
        if best is None:
            best, best_err = qp, err
            continue
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best = qmath.QParams(np.where(better, qp.scale, best.scale).astype(np.float32),
                             np.where(better, qp.zero_point, best.zero_point).astype(qp.zero_point.dtype), qp.qtype, qp.axis)
    return best
