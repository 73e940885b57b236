"""int8 weights that cannot overflow the 16-bit sums of x86 CPUs without VNNI.

On x86-64 with AVX2 (or AVX-512 without VNNI) onnxruntime's u8 x s8 kernels (MLAS: QLinearConv, QLinearMatMul,
QGemm, MatMulIntegerToFloat, DynamicQuantizeMatMul) multiply with ``vpmaddubsw``, which adds the products of two
consecutive K elements into a *saturating* int16: ``a0 q0 + a1 q1`` with activations ``a`` in [0, 255] (int8
activations are shifted into that range first) and int8 weights ``q``. Two weights of the same sign with
``|q0| + |q1| > 128`` can pass 32767 and be clipped: measured here on an AMD EPYC (AVX2), the sample digits CNN's
int8 output fell from 41 to 16 dB SQNR, and onnxruntime's own quantizer documents the effect (its advice is 7-bit
weights, ``reduce_range``, for all of them). VNNI (``vpdpbusd``) and ARM kernels sum in int32 and never saturate.

The pairs are consecutive elements of the kernel's K axis, measured on onnxruntime 1.31-1.32
(``tests/test_pairs.py`` holds each layout to onnxruntime on the machine it runs on):

- MatMul / Gemm weight ``[K, N]`` (Gemm transB: ``[N, K]``): rows (2i, 2i+1) of K, per output column;
- Conv weight ``[M, C/g, *kernel]``: K runs over the kernel taps with the group's channels fastest, ``(taps..., c)``,
  flattened, pairs (2i, 2i+1) of that order (so with odd C/g a pair can join two taps);
- depthwise Conv (one input and one output channel per group, group > 1): its own kernel sums in int32: no limit. A
  Conv of one input channel (a grayscale stem) or a channel multiplier runs the GEMM: its pairs are kernel taps.

``safe_scale`` widens a channel's scale only as far as its largest same-sign pair needs (``(|w0| + |w1|) / 127``),
so a channel whose largest weight pairs with a small one keeps its scale, and no channel loses more than one bit.
"""

from __future__ import annotations

import numpy as np

from qconv.numeric import qmath

LIMIT = 128  # 255 * 128 = 32640 <= 32767 < 255 * 129
SIGNED_MAX = 127  # the limit binds int8 weights whose magnitudes reach past LIMIT / 2
WIDENED = "widened so no two adjacent int8 weights can saturate the 16-bit sums of x86 CPUs without VNNI"  # plans say so


def applies(qt: qmath.QType) -> bool:
    """Signed 8-bit weights whose pairs can pass the limit (7-bit, reduce_range, ones cannot; uint8 runs u8 x u8)."""
    return qt.signed and qt.bits == 8 and 2 * qt.qmax > LIMIT


def safe_params(qp: qmath.QParams, rows: np.ndarray | None, per_channel: bool) -> qmath.QParams:
    """``qp`` with ``safe_scale`` applied for the weight ``rows`` (``channels``' layout; one row per scale when
    ``per_channel``); ``qp`` itself where the rule does not apply (no pairs, not signed 8-bit, asymmetric weights)."""
    if rows is None or not applies(qp.qtype) or np.any(qp.zero_point != 0):
        return qp
    scale = safe_scale(rows, qp.scale, per_channel)
    return qp if np.array_equal(scale, qp.scale) else qmath.QParams(scale, qp.zero_point, qp.qtype, qp.axis)


def channels(w: np.ndarray, layout: str, groups: int = 1) -> np.ndarray | None:
    """The weight as [output channels, K] in the kernel's K order, or None where the kernel has no pairs.

    ``layout``: "kn" (MatMul, Gemm: ``[..., K, N]``), "nk" (Gemm transB: ``[N, K]``), "conv" (``[M, C/g, *kernel]``)."""
    w = np.asarray(w, dtype=np.float32)
    if layout == "conv":
        if w.ndim < 3 or (w.shape[1] == 1 and groups > 1 and w.shape[0] == groups):  # depthwise: summed in int32
            return None
        return np.moveaxis(w, 1, -1).reshape(w.shape[0], -1)
    if layout == "nk":
        return w.reshape(w.shape[0], -1) if w.ndim == 2 else None
    if w.ndim < 2:
        return None
    return np.moveaxis(w, -2, -1).reshape(-1, w.shape[-2])  # [..., N, K] rows: per (batch, column)


def _pair_sums(c: np.ndarray) -> np.ndarray:
    """Per row of ``c [R, K]``: the largest |x0| + |x1| over its pairs (2i, 2i+1) whose signs agree."""
    if c.shape[1] % 2:
        c = np.concatenate([c, np.zeros((c.shape[0], 1), c.dtype)], axis=1)
    a, b = c[:, 0::2].astype(np.float64), c[:, 1::2].astype(np.float64)
    same = (a * b) > 0
    return np.where(same, np.abs(a) + np.abs(b), 0.0).max(axis=1, initial=0.0)


def violations(q: np.ndarray) -> np.ndarray:
    """Per row of integers ``q [R, K]`` (kernel order): whether a same-sign pair passes ``LIMIT``.

    Where every |q| <= LIMIT (int8 weights, and any scale at least the weight's own), |q0 + q1| is |q0| + |q1| for a
    pair of one sign and at most LIMIT otherwise, so the test is max |q0 + q1| > LIMIT, in float32 (integers far below
    2^24 are exact): a quarter of the time of the sums in float64 (MiniLM's 36 weights in every plan: 0.8 s a run)."""
    q = np.asarray(q)
    if q.dtype != np.float32:
        q = q.astype(np.float32)
    if q.size == 0 or max(float(q.max()), -float(q.min())) > LIMIT:
        return _pair_sums(q.astype(np.int64)) > LIMIT
    if q.shape[1] % 2:
        q = np.concatenate([q, np.zeros((q.shape[0], 1), q.dtype)], axis=1)
    s = q[:, 0::2] + q[:, 1::2]
    np.abs(s, out=s)
    return s.max(axis=1) > LIMIT


def safe_scale(c: np.ndarray, scale: np.ndarray, per_channel: bool) -> np.ndarray:
    """The scale (per row of ``c [R, K]``, or one for all) widened where a same-sign pair rounds past ``LIMIT``:
    to the smallest of ``pair / (LIMIT - k/4)`` that clears every pair of the row (at most ``pair / 127``, where
    rounding cannot add more than 1). float32; rows that already clear keep their scale exactly."""
    scale = np.asarray(scale, dtype=np.float32)
    rows = np.array(np.broadcast_to(scale.reshape(-1) if per_channel else scale, (c.shape[0],)), dtype=np.float32)
    bad = violations(np.rint(c / rows[:, None]))
    if not bad.any():
        return scale
    sums = _pair_sums(c)
    for k in range(4 * (LIMIT - SIGNED_MAX) + 1):  # 128, 127.75, ... 127
        trial = np.maximum(rows, (sums / (LIMIT - k / 4)).astype(np.float32))
        still = violations(np.rint(c / trial[:, None]))
        rows = np.where(bad & ~still, trial, rows).astype(np.float32)
        bad &= still
        if not bad.any():
            break
    for _ in range(4):  # float32 rounding of the division: nudge a row that still rounds past the limit
        if not bad.any():
            break
        rows = np.where(bad, np.nextafter(rows * np.float32(1.0 + 1e-6), np.float32(np.inf)), rows).astype(np.float32)
        bad = violations(np.rint(c / rows[:, None]))
    if not per_channel:
        return np.float32(rows.max())
    return rows.reshape(scale.shape)
