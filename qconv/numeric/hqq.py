"""HQQ (Badri & Shaji, 2023, "Half-Quadratic Quantization of Large Machine Learning Models"): block parameters
fitted to the weights alone, no calibration data, in pure numpy.

Each row of ``x [C, n]`` is one block of ``n`` weights. Round-to-nearest takes the block's min/max; HQQ instead
minimizes ``||x - (q - z) s||_p^p`` with ``p < 1`` (a sparsity-promoting norm: a few large errors cost less
than many small ones, so outliers stop dictating the grid) by half-quadratic splitting: an auxiliary error
``e`` is shrunk toward the residual (the proximal operator of the lp norm), then the zero point is the mean
that fits the rest, ``beta`` growing each step. As published, the zero point ends as a float.

qconv's difference: MatMulNBits with float zero points has no fast kernel on CPU (onnxruntime 1.32, measured
on a 1024x1024 weight, one thread: 3.4 ms a token against 0.14 ms with uint8 zero points and 0.23 ms in
float32), so onnxruntime's own HQQ output runs slower than the float model. Here the zero point is rounded to
an integer after the proximal steps and the scale refitted by least squares on the rounded grid (two
alternations), so the result is stored as the fast uint4 layout.
"""

from __future__ import annotations

import numpy as np

from qconv.numeric import qmath

LP_NORM = 0.7
BETA = 10.0
KAPPA = 1.01
ITERATIONS = 20
REFITS = 2


def _shrink(x: np.ndarray, beta: float, p: float) -> np.ndarray:
    """Proximal operator of the lp norm (p < 1), elementwise."""
    a = np.abs(x)
    with np.errstate(divide="ignore"):
        return np.sign(x) * np.maximum(a - (1.0 / beta) * np.power(a + 1e-8, p - 1.0), 0.0)


def fit(x: np.ndarray, qt: qmath.QType, iterations: int = ITERATIONS) -> qmath.QParams:
    """Per-row (block) scale and integer zero point for ``x [C, n]`` over ``qt`` (say 0..15), shape (C,)."""
    x = np.asarray(x, dtype=np.float64)
    levels = qt.qmax - qt.qmin
    lo, hi = x.min(axis=1), x.max(axis=1)
    scale = (hi - lo) / levels
    scale = np.where(scale > 0, scale, 1.0)
    zero = np.rint(qt.qmin - lo / scale)
    best_zero, best_err = zero.copy(), np.full(len(x), np.inf)
    beta = BETA
    for _ in range(iterations):
        q = np.clip(np.rint(x / scale[:, None] + zero[:, None]), qt.qmin, qt.qmax)
        r = (q - zero[:, None]) * scale[:, None]
        err = np.abs(x - r).mean(axis=1)
        better = err < best_err
        best_zero[better], best_err[better] = zero[better], err[better]
        e = _shrink(x - r, beta, LP_NORM)
        zero = np.mean(q - (x - e) / scale[:, None], axis=1)
        beta *= KAPPA
    zero = np.clip(np.rint(best_zero), qt.qmin, qt.qmax)
    for _ in range(REFITS):
        q = np.clip(np.rint(x / scale[:, None] + zero[:, None]), qt.qmin, qt.qmax) - zero[:, None]
        den = np.sum(q * q, axis=1)
        refit = np.where(den > 0, np.sum(x * q, axis=1) / np.where(den > 0, den, 1.0), scale)
        scale = np.where(refit > 0, refit, scale)
    scale = scale.astype(np.float32)
    return qmath.QParams(scale, zero.astype(qt.dtype), qt, axis=0)
