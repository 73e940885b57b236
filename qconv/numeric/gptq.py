"""GPTQ (Frantar et al., 2022, "Accurate Post-Training Quantization for Generative Pre-trained Transformers")
for one weight matrix, in pure numpy.

The weight is ``W [K, N]`` as ONNX MatMul holds it (``y = x @ W``), so GPTQ's "columns" are our rows: row
``k`` multiplies input feature ``k``. Given ``H = mean(x^T x)`` over calibration inputs, the rows are quantized
one at a time and the rounding error of each is spread over the rows not yet quantized, weighted by the
inverse Hessian, which minimizes ``||x W - x Q||^2`` far better than rounding every row to nearest.

Standard details: dead inputs (``H[k, k] == 0``) get weight 0; ``percdamp * mean(diag H)`` is added to the
diagonal; the upper Cholesky factor of ``H^-1`` drives the updates; updates are applied lazily in batches of
rows (``LAZY_ROWS``, a multiple of the block size so that a quantization block never straddles two batches).

Quantization blocks are ``block_size`` consecutive rows sharing one scale / zero point per output column.
Without act-order a block's parameters are fitted when its first row is reached, on the rows as already
updated by earlier errors (what makes GPTQ with groups work well). With act-order rows are visited by
decreasing ``H[k, k]`` and the block parameters are fitted up front on the original weight ("static groups"),
so the stored layout stays plain consecutive blocks along K, which MatMulNBits requires.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from qconv.numeric import qmath

LAZY_ROWS = 128
# rows [C, n] -> parameters of shape (C,) along axis 0, one set per row of the argument
Fit = Callable[[np.ndarray], qmath.QParams]


def inverse_hessian_factor(hessian: np.ndarray, percdamp: float) -> np.ndarray:
    """Upper Cholesky factor ``U`` of ``(H + damp I)^-1`` (so that ``H^-1 = U^T U``), in float64."""
    h = np.array(hessian, dtype=np.float64)
    h[np.diag_indices_from(h)] += percdamp * float(np.mean(np.diag(h)))
    lower_inv = np.linalg.inv(np.linalg.cholesky(h))
    return np.linalg.cholesky(lower_inv.T @ lower_inv).T


def gptq(w: np.ndarray, hessian: np.ndarray, block_size: int, fit: Fit, percdamp: float = 0.01,
         act_order: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantize ``w [K, N]`` block-wise along K; returns (q [K, N], scale [n_blocks, N], zero_point [n_blocks, N]).

    ``q`` holds the stored integers (``w ~= (q - zero_point) * scale`` per block), with the dtype and range of
    the QType that ``fit`` returns.
    """
    return _gptq(w, hessian, block_size, fit, percdamp, act_order)


def gptq_fixed(w: np.ndarray, hessian: np.ndarray, params: qmath.QParams, percdamp: float = 0.01,
               act_order: bool = True) -> np.ndarray:
    """GPTQ's rounding of ``w [K, N]`` with parameters already chosen (one scale / zero point per column, shape (N,)):
    the int8 weights of a plan, whose scales the rewrite keeps. Returns the integers q [K, N]. Act-order is free
    here (no block parameters are fitted on the way), and it rounds the features that matter most first."""
    q, _, _ = _gptq(w, hessian, w.shape[0], lambda rows: params, percdamp, act_order, fixed=True)
    dead = np.diag(np.asarray(hessian)) == 0  # features the rows never fed: nearest, not GPTQ's 0 (run-time rows may)
    if dead.any():
        q[dead] = qmath.quantize(w[dead], params)
    return q


def _gptq(w: np.ndarray, hessian: np.ndarray, block_size: int, fit: Fit, percdamp: float, act_order: bool,
          fixed: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    k_dim = w.shape[0]
    n_blocks = -(-k_dim // block_size)
    h = np.array(hessian, dtype=np.float64)
    weights = np.array(w, dtype=np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    weights[dead, :] = 0.0

    params: list[qmath.QParams | None] = [None] * n_blocks
    if act_order and not fixed:
        params = [fit(weights[b * block_size:(b + 1) * block_size].T) for b in range(n_blocks)]
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k_dim)
    weights = weights[order]
    u = inverse_hessian_factor(h[np.ix_(order, order)], percdamp)

    rows: list[np.ndarray | None] = [None] * k_dim
    lazy = LAZY_ROWS if fixed else max(LAZY_ROWS, block_size)
    for start in range(0, k_dim, lazy):
        stop = min(start + lazy, k_dim)
        batch = weights[start:stop]  # a view: updates land in ``weights``
        errors = np.zeros_like(batch)
        for i in range(stop - start):
            k = start + i
            row = int(order[k])
            block = row // block_size
            if params[block] is None:  # no act-order: rows come in order, this is the block's first row
                params[block] = fit(batch[i:i + block_size].T)
            qp = params[block]
            q_row = rows[row] = qmath.quantize(batch[i], qp)
            errors[i] = (batch[i] - qmath.dequantize(q_row, qp)) / u[k, k]
            batch[i + 1:] -= np.outer(u[k, k + 1:stop], errors[i])
        weights[stop:] -= u[start:stop, stop:].T @ errors
    scale = np.stack([p.scale for p in params]).astype(np.float32)
    zero_point = np.stack([p.zero_point for p in params])
    return np.stack(rows), scale, zero_point


def gptq_fixed_stack(w: np.ndarray, hessian: np.ndarray, params: qmath.QParams, percdamp: float = 0.01) -> np.ndarray:
    """``gptq_fixed`` (act-order) of a stack of ``G`` small matrices at once, ``w [G, K, N]`` with Hessians
    ``[G, K, K]`` and parameters of shape ``(G, N)``: a grouped or depthwise Conv's groups (a depthwise layer is
    hundreds of 9 x 1 problems, where a loop over them costs Python, not arithmetic). The same steps as
    ``gptq_fixed`` per group, batched; a group whose damped Hessian is not positive definite gets nearest rounding
    (``gptq_fixed`` raises there). Returns the integers ``[G, K, N]``. For ``K`` up to ``LAZY_ROWS``."""
    g_dim, k_dim, _ = w.shape
    if k_dim > LAZY_ROWS:
        raise ValueError(f"gptq_fixed_stack takes K <= {LAZY_ROWS} (got {k_dim})")
    h = np.array(hessian, dtype=np.float64)
    diag = np.diagonal(h, axis1=1, axis2=2)
    dead = diag == 0
    gi, ki = np.nonzero(dead)
    h[gi, ki, ki] = 1.0
    weights = np.array(w, dtype=np.float64)
    weights[dead] = 0.0
    order = np.argsort(-diag, axis=1, kind="stable")  # [G, K] (``diag`` is a view: the dead features read 1 now)
    weights = np.take_along_axis(weights, order[:, :, None], axis=1)
    hp = np.take_along_axis(np.take_along_axis(h, order[:, :, None], axis=1), order[:, None, :], axis=2)
    hp[:, np.arange(k_dim), np.arange(k_dim)] += percdamp * np.mean(np.diagonal(hp, axis1=1, axis2=2), axis=1)[:, None]
    u = np.zeros_like(hp)
    ok = np.ones(g_dim, bool)
    try:
        lower_inv = np.linalg.inv(np.linalg.cholesky(hp))
        u = np.linalg.cholesky(np.matmul(lower_inv.transpose(0, 2, 1), lower_inv)).transpose(0, 2, 1)
    except np.linalg.LinAlgError:  # some group is not positive definite: factor one by one, nearest where it fails
        for j in range(g_dim):
            try:
                lj = np.linalg.inv(np.linalg.cholesky(hp[j]))
                u[j] = np.linalg.cholesky(lj.T @ lj).T
            except np.linalg.LinAlgError:
                ok[j] = False
    u[~ok] = np.eye(k_dim)
    qp = qmath.QParams(np.asarray(params.scale, np.float32), np.asarray(params.zero_point), params.qtype)
    q = np.empty(weights.shape, params.qtype.dtype)
    for k in range(k_dim):
        q[:, k] = qmath.quantize(weights[:, k], qp)
        err = (weights[:, k] - qmath.dequantize(q[:, k], qp)) / u[:, k, k][:, None]
        weights[:, k + 1:] -= u[:, k, k + 1:, None] * err[:, None, :]
    out = np.empty_like(q)
    np.put_along_axis(out, order[:, :, None], q, axis=1)
    nearest = qmath.quantize(np.asarray(w, np.float32), qmath.QParams(qp.scale[:, None, :], qp.zero_point[:, None, :], qp.qtype))
    out[~ok] = nearest[~ok]
    out[dead] = nearest[dead]  # features the rows never fed: nearest, not GPTQ's 0 (run-time rows may)
    return out
