"""Which integer each weight was rounded to, stored compactly: the difference from round-to-nearest.

Learned rounding (qconv.adjust.rounding) moves some weights one step up or down from nearest; a plan records the
differences as little-endian int16, zlib-compressed and base64-encoded (most are 0, so a 1 M-weight layer takes a
few tens of KB), and the rewrite adds them back. Pure numpy and the standard library: deterministic bytes.
"""

from __future__ import annotations

import base64
import zlib

import numpy as np

from qconv.numeric import qmath

PREFIX = "int16-zlib-base64:"


def pack(deltas: np.ndarray) -> str:
    return PREFIX + base64.b64encode(zlib.compress(np.asarray(deltas, dtype="<i2").tobytes(), 6)).decode("ascii")


def unpack(text: str, shape: tuple[int, ...]) -> np.ndarray:
    """The differences ``pack`` stored, in ``shape``; ValueError when the text is not such a record of that size."""
    if not text.startswith(PREFIX):
        raise ValueError(f"a rounding record starts with '{PREFIX}'")
    raw = zlib.decompress(base64.b64decode(text[len(PREFIX):].encode("ascii"), validate=True))
    d = np.frombuffer(raw, dtype="<i2")
    if d.size != int(np.prod(shape, dtype=np.int64)):
        raise ValueError(f"a rounding record of {d.size} weights for a weight of shape {list(shape)}")
    return d.reshape(shape).astype(np.int64)


def deltas(q: np.ndarray, w: np.ndarray, qp: qmath.QParams) -> np.ndarray:
    """The integers ``q`` of ``w`` as their difference from round-to-nearest with ``qp``."""
    return np.asarray(q, dtype=np.int64) - qmath.quantize(w, qp).astype(np.int64)


def integers(w: np.ndarray, qp: qmath.QParams, record: str | None) -> np.ndarray:
    """``w`` quantized with ``qp``: to nearest, or as a rounding record says."""
    q = qmath.quantize(w, qp)
    if not record:
        return q
    moved = q.astype(np.int64) + unpack(record, q.shape)
    return np.clip(moved, qp.qtype.qmin, qp.qtype.qmax).astype(qp.qtype.dtype)
