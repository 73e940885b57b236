"""Quantization arithmetic as pure numpy: quantization types, parameter choice, quantize, dequantize.

Nothing here knows about graphs or files. The conventions are ONNX's: ``q = saturate(round(x / scale) +
zero_point)`` with round-half-to-even, ``x ~= (q - zero_point) * scale``, scales stored as float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# TensorProto element types, repeated here so this module needs no onnx import.
_ONNX_ELEM = {"uint8": 2, "int8": 3, "uint16": 4, "int16": 5, "int32": 6}


@dataclass(frozen=True)
class QType:
    """An integer type used to hold quantized values."""

    name: str
    qmin: int
    qmax: int

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.name)

    @property
    def onnx_type(self) -> int:
        return _ONNX_ELEM[self.name]

    @property
    def bits(self) -> int:
        return self.dtype.itemsize * 8

    @property
    def signed(self) -> bool:
        return self.qmin < 0

    def restricted(self) -> "QType":
        """The symmetric range used for symmetric signed weights: [-127, 127] for int8."""
        return QType(self.name, -self.qmax, self.qmax) if self.signed else self


QTYPES = {
    "uint8": QType("uint8", 0, 255),
    "int8": QType("int8", -128, 127),
    "uint16": QType("uint16", 0, 65535),
    "int16": QType("int16", -32768, 32767),
    "int32": QType("int32", -(2**31), 2**31 - 1),
}


def qtype(name: str) -> QType:
    return QTYPES[name]


@dataclass(frozen=True)
class QParams:
    """Scale and zero point; arrays of shape () for per-tensor, (C,) for per-axis along ``axis``."""

    scale: np.ndarray
    zero_point: np.ndarray
    qtype: QType
    axis: int | None = None

    def to_dict(self) -> dict:
        return {
            "scale": self.scale.astype(np.float64).tolist(),
            "zero_point": self.zero_point.astype(np.int64).tolist(),
            "type": self.qtype.name,
            "axis": self.axis,
        }


def choose_qparams(rmin, rmax, qt: QType, symmetric: bool, axis: int | None = None) -> QParams:
    """Scale and zero point covering [rmin, rmax] (scalars or per-channel arrays).

    The range is first widened to include 0 so that zero is exactly representable (padding and ReLU
    outputs stay exact). A zero-width range gets scale 1 so nothing divides by zero.
    """
    rmin = np.minimum(np.asarray(rmin, dtype=np.float64), 0.0)
    rmax = np.maximum(np.asarray(rmax, dtype=np.float64), 0.0)
    if symmetric:
        absmax = np.maximum(np.abs(rmin), np.abs(rmax))
        if qt.signed:
            scale = absmax / qt.qmax
            zp = np.zeros_like(scale)
        else:
            scale = absmax / ((qt.qmax - qt.qmin) / 2.0)
            zp = np.full_like(scale, (qt.qmax + qt.qmin + 1) // 2)
    else:
        scale = (rmax - rmin) / (qt.qmax - qt.qmin)
        zp = None
    scale = scale.astype(np.float32)
    scale = np.where((scale > 0) & np.isfinite(scale), scale, np.float32(1.0)).astype(np.float32)
    if zp is None:
        zp = np.clip(np.rint(qt.qmin - rmin / scale.astype(np.float64)), qt.qmin, qt.qmax)
    return QParams(scale, zp.astype(qt.dtype), qt, axis)


def _broadcast(p: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    if axis is None or p.ndim == 0:
        return p
    shape = [1] * ndim
    shape[axis] = -1
    return p.reshape(shape)


def quantize(x: np.ndarray, qp: QParams) -> np.ndarray:
    """Quantize like ONNX QuantizeLinear: float32 division, round half to even, saturate."""
    x = np.asarray(x, dtype=np.float32)
    scale = _broadcast(qp.scale, x.ndim, qp.axis)
    zp = _broadcast(qp.zero_point.astype(np.float64), x.ndim, qp.axis)
    with np.errstate(over="ignore"):  # saturates below, as QuantizeLinear does
        q = np.rint(x / scale).astype(np.float64) + zp
    return np.clip(q, qp.qtype.qmin, qp.qtype.qmax).astype(qp.qtype.dtype)


def dequantize(q: np.ndarray, qp: QParams) -> np.ndarray:
    """Dequantize like ONNX DequantizeLinear."""
    scale = _broadcast(qp.scale, q.ndim, qp.axis)
    zp = _broadcast(qp.zero_point.astype(np.int64), q.ndim, qp.axis)
    return ((q.astype(np.int64) - zp).astype(np.float32) * scale).astype(np.float32)


def weight_qparams(w: np.ndarray, qt: QType, symmetric: bool, axis: int | None) -> QParams:
    """Parameters for a weight tensor, per-tensor (axis None) or per-channel along ``axis``."""
    w = np.asarray(w, dtype=np.float32)
    if axis is None:
        lo, hi = (float(w.min()), float(w.max())) if w.size else (0.0, 0.0)
    else:
        moved = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
        lo, hi = (moved.min(axis=1), moved.max(axis=1)) if moved.shape[1] else (0.0, 0.0)
    return choose_qparams(lo, hi, qt.restricted() if symmetric else qt, symmetric, axis)


INT32_LIMIT = 2**31 - 1


def bias_qparams(bias: np.ndarray, input_scale: float, weight_scale: np.ndarray) -> QParams:
    """int32 bias parameters: scale = input_scale * weight_scale, zero point 0 (what int8 kernels add)."""
    scale = (np.float32(input_scale) * np.asarray(weight_scale, dtype=np.float32)).astype(np.float32)
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
    axis = 0 if scale.ndim else None
    return QParams(scale, np.zeros(scale.shape, dtype=np.int32), QTYPES["int32"], axis)


def widen_weight_scale_for_bias(bias: np.ndarray, input_scale: float, weight_scale: np.ndarray) -> np.ndarray:
    """Weight scales widened where the int32 bias would otherwise overflow (tiny input*weight scale)."""
    needed = np.abs(np.asarray(bias, dtype=np.float64)) / (float(input_scale) * INT32_LIMIT * 0.5)
    return np.maximum(np.asarray(weight_scale, dtype=np.float32), needed.astype(np.float32))


def sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    """Signal to quantization-noise ratio in dB; +inf when identical."""
    ref = np.asarray(reference, dtype=np.float64)
    noise = float(np.sum((ref - np.asarray(approx, dtype=np.float64)) ** 2))
    signal = float(np.sum(ref**2))
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return 10.0 * np.log10(signal / noise)
