"""Observers accumulate statistics of one tensor over a stream of batches; they never keep the data.

``TensorObserver`` keeps, in O(bins) memory whatever the number of samples:
- the min and max of the finite values, element count and count of inf/NaN elements;
- a moving average of per-batch min and max (``momentum``), and the per-batch extremes it is made from with
  each batch's index in the data set (O(batches) floats), so shards merge into exactly the moving average a
  single run computes;
- a histogram on a grid anchored at zero with a power-of-two bin width. When new values fall outside the
  window, the window first slides, and if the values still do not fit the width doubles: pairs of bins
  merge exactly, so no count is ever split or interpolated. After any stream the width is at most
  2 * (max - min) / (bins - 1) (or the first batch's width, if that was larger), so any quantile read from
  the histogram is exact to within one bin width. Two histograms merge exactly too: the finer one's bins
  merge onto the coarser grid.
"""

from __future__ import annotations

import base64
import math
import zlib
from dataclasses import dataclass, field

import numpy as np

DEFAULT_BINS = 2048
DEFAULT_MOMENTUM = 0.01


@dataclass
class Histogram:
    """Counts of bins ``[(start + k) * width, (start + k + 1) * width)`` for k in 0..bins-1."""

    bins: int
    width: float = 0.0  # 0 until the first finite value arrives
    start: int = 0
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def __post_init__(self):
        if self.counts.size == 0:
            self.counts = np.zeros(self.bins, np.int64)

    @property
    def edges(self) -> np.ndarray:
        return (self.start + np.arange(self.bins + 1, dtype=np.float64)) * self.width

    def _fit(self, lo: float, hi: float) -> None:
        """Slide and widen the window until [lo, hi] and every non-empty bin fit."""
        if self.width == 0.0:
            self.width = fitting_width(lo, hi, self.bins)
            self.start = math.floor(lo / self.width)
        if self.start <= math.floor(lo / self.width) and math.floor(hi / self.width) < self.start + self.bins:
            return  # already inside the window (most batches): nothing moves
        nz = np.flatnonzero(self.counts)
        while True:
            first = math.floor(lo / self.width)
            last = math.floor(hi / self.width)
            if nz.size:
                first = min(first, self.start + int(nz[0]))
                last = max(last, self.start + int(nz[-1]))
            if last - first < self.bins:
                break
            self._double()
            nz = np.flatnonzero(self.counts)
        if first != self.start:
            self._slide(first)

    def _slide(self, new_start: int) -> None:
        shift = new_start - self.start
        moved = np.zeros_like(self.counts)
        src = np.flatnonzero(self.counts)
        moved[src - shift] = self.counts[src]
        self.counts, self.start = moved, new_start

    def _double(self) -> None:
        idx = self.start + np.arange(self.bins)
        new_start = math.floor(self.start / 2)
        merged = np.zeros(self.bins, np.int64)
        np.add.at(merged, (idx // 2) - new_start, self.counts)
        self.counts, self.start, self.width = merged, new_start, self.width * 2.0

    def add(self, x: np.ndarray, lo: float, hi: float) -> None:
        """Count finite values ``x`` whose min and max are ``lo`` and ``hi``."""
        self._fit(lo, hi)
        # The width is a power of two, so x / width is exact and each value's grid index depends on the
        # width alone, never on the window: shards and single runs bin every value identically.
        y = np.multiply(x.ravel(), np.float32(1.0 / self.width), dtype=np.float32)
        np.floor(y, out=y)
        # Every y lies in the window [start, start + bins) (its top edge up to float rounding), so int32 holds them when
        # start does (it always has: a width is never finer than 2^-24 of the extremes), and converting to int32 takes
        # a quarter of the time of int64.
        small = abs(self.start) < 1 << 30
        idx = y.astype(np.int32 if small else np.intp)
        idx -= self.start
        counts = np.bincount(idx, minlength=self.bins)
        if counts.size > self.bins:  # float rounding at the top edge only
            counts[self.bins - 1] += counts[self.bins:].sum()
        self.counts += counts[: self.bins]

    def canonical(self, lo: float, hi: float) -> "Histogram":
        """This histogram on the canonical grid of data with extremes ``lo``/``hi``: the finest power-of-two width
        that holds them (``fitting_width``), the window starting at the first non-empty bin. Any stream of the same
        values, in any order or any split into shards, ends on that grid: a width only ever doubles to hold values
        within [lo, hi], so it is never coarser than the canonical one, and doubling to it is exact."""
        h = Histogram(self.bins, self.width, self.start, self.counts.copy())
        if h.width and lo < hi:
            target = fitting_width(lo, hi, self.bins)
            while h.width < target:
                h._double()
        span = _span(h)
        if span and span[0] != h.start:
            h._slide(span[0])
        return h

    def coarsened_to(self, width: float) -> "Histogram":
        """This histogram's counts on a grid of ``width`` (a power-of-two multiple of our width)."""
        h = Histogram(self.bins, self.width, self.start, self.counts.copy())
        while h.width < width:
            h._double()
        return h

    def merge(self, other: "Histogram") -> None:
        """Add ``other``'s counts: both move to the coarser grid (exact: widths are powers of two)."""
        if other.width == 0.0:
            return
        if self.width == 0.0:
            self.width, self.start, self.counts = other.width, other.start, other.counts.copy()
            return
        a, b = self.coarsened_to(max(self.width, other.width)), other.coarsened_to(max(self.width, other.width))
        while True:
            spans = [s for s in (_span(a), _span(b)) if s]
            lo = min(s[0] for s in spans) if spans else a.start
            hi = max(s[1] for s in spans) if spans else a.start
            if hi - lo < self.bins:
                break
            a._double()
            b._double()
        a._slide(lo)
        b._slide(lo)
        self.width, self.start, self.counts = a.width, lo, a.counts + b.counts

    def to_dict(self) -> dict:
        raw = zlib.compress(self.counts.astype("<i8").tobytes(), 6)
        return {"bins": self.bins, "width": self.width, "start": self.start, "counts_zlib_b64": base64.b64encode(raw).decode()}

    @classmethod
    def from_dict(cls, d: dict) -> "Histogram":
        counts = np.frombuffer(zlib.decompress(base64.b64decode(d["counts_zlib_b64"])), dtype="<i8").astype(np.int64)
        if counts.size != int(d["bins"]):
            raise ValueError("histogram counts do not match its bin count")
        return cls(int(d["bins"]), float(d["width"]), int(d["start"]), counts)


MIN_WIDTH = 2.0 ** -126  # values are scaled by 1 / width in float32: no finer grid than that can hold


def fitting_width(lo: float, hi: float, bins: int) -> float:
    """The finest power of two w (at least MIN_WIDTH, and never finer than the float32 resolution of the larger
    extreme) with floor(hi / w) - floor(lo / w) < bins. For lo == hi that resolution, so a constant first batch never
    forces a coarser grid on the values after it; and values a few float32 steps apart (hypothesis: 33 +- 0.01, three
    values) get that grid too, not a finer one a batch of one constant value could not have started from."""
    big = max(abs(lo), abs(hi))
    floor_w = max(2.0 ** (math.frexp(big)[1] - 24), MIN_WIDTH) if big else MIN_WIDTH
    if hi > lo:
        w = max(2.0 ** math.ceil(math.log2((hi - lo) / (bins - 1))), floor_w)
        while w > floor_w and math.floor(hi / (w / 2)) - math.floor(lo / (w / 2)) < bins:
            w /= 2
        return w
    return floor_w


def _span(h: Histogram) -> tuple[int, int] | None:
    """Grid indices of the first and last non-empty bins."""
    nz = np.flatnonzero(h.counts)
    return (h.start + int(nz[0]), h.start + int(nz[-1])) if nz.size else None


@dataclass(frozen=True)
class Batch:
    """One batch of one tensor, as an observer folds it in: ``count`` elements, ``nonfinite`` of them inf/NaN, the
    finite extremes ``lo``/``hi``, and the finite ``values`` the histogram counts (all, or a sample within [lo, hi])."""

    count: int
    nonfinite: int
    lo: float
    hi: float
    values: np.ndarray


def batch_of(x: np.ndarray, step: int = 1) -> Batch:
    """A Batch read from the whole tensor; the histogram takes every ``step``-th value in flattened order."""
    x = np.asarray(x, dtype=np.float32)
    if x.size == 0:
        return Batch(0, 0, 0.0, 0.0, x.reshape(-1))
    lo, hi = float(x.min()), float(x.max())
    values = x.reshape(-1)[::step]
    if math.isfinite(lo) and math.isfinite(hi):
        return Batch(int(x.size), 0, lo, hi, values)
    finite = np.isfinite(x)  # NaN propagates through min/max; +-inf from masks: both filtered
    nonfinite = int(x.size - np.count_nonzero(finite))
    if nonfinite == x.size:
        return Batch(int(x.size), nonfinite, 0.0, 0.0, values[:0])
    return Batch(int(x.size), nonfinite, float(x[finite].min()), float(x[finite].max()), values[np.isfinite(values)])


@dataclass
class TensorObserver:
    """Everything any range method needs, accumulated batch by batch."""

    bins: int = DEFAULT_BINS
    momentum: float = DEFAULT_MOMENTUM
    min: float = float("inf")
    max: float = float("-inf")
    count: int = 0
    nonfinite: int = 0
    batches: int = 0
    ema_min: float | None = None
    ema_max: float | None = None
    hist: Histogram | None = None
    # (index of the batch in the data set, its finite min, its finite max), in index order; None when unknown
    # (a file written before they were recorded): then shards merge their moving averages weighted by batches.
    extremes: list | None = field(default_factory=list)

    def __post_init__(self):
        if self.hist is None and self.bins:
            self.hist = Histogram(self.bins)

    def update(self, x: np.ndarray, index: int | None = None, sample_step: int = 1) -> None:
        """Fold one batch in; ``index`` is its position in the whole data set (default: the next one). The histogram
        counts every ``sample_step``-th value of the flattened batch (1: every value)."""
        self.add(batch_of(x, sample_step), index)

    def add(self, b: "Batch", index: int | None = None) -> None:
        """Fold one batch in from its statistics (see Batch)."""
        self.count += b.count
        self.nonfinite += b.nonfinite
        if b.count == b.nonfinite:
            return
        self.min, self.max = min(self.min, b.lo), max(self.max, b.hi)
        self.ema_min, self.ema_max = _ema_step(self.ema_min, self.ema_max, b.lo, b.hi, self.momentum)
        if self.extremes is not None:
            self.extremes.append((self.extremes[-1][0] + 1 if index is None and self.extremes else index or 0, b.lo, b.hi))
        self.batches += 1
        if self.hist is not None and b.values.size:
            self.hist.add(b.values, b.lo, b.hi)

    def add_rows(self, count: int, lo: np.ndarray, hi: np.ndarray, values: np.ndarray, indices: list[int]) -> None:
        """Fold in several batches at once, in order: batch r has ``count`` finite elements, extremes ``lo[r]``/``hi[r]``
        and is batch ``indices[r]`` of the data set; ``values`` are all their histogram samples. The same observer as
        adding each batch alone: the histogram counts the same values, and its grid ends as the canonical one
        (``canonicalize``) whichever batches it took at a time."""
        if count == 0:
            return
        momentum, ema_min, ema_max = self.momentum, self.ema_min, self.ema_max
        for index, a, b in zip(indices, lo.tolist(), hi.tolist()):
            ema_min, ema_max = _ema_step(ema_min, ema_max, a, b, momentum)
            if self.extremes is not None:
                self.extremes.append((index, a, b))
        self.ema_min, self.ema_max = ema_min, ema_max
        n = len(indices)
        self.count += count * n
        self.batches += n
        low, high = float(lo.min()), float(hi.max())
        self.min, self.max = min(self.min, low), max(self.max, high)
        if self.hist is not None and values.size:
            self.hist.add(values, low, high)

    @property
    def seen_finite(self) -> bool:
        return self.min <= self.max

    def copy(self) -> "TensorObserver":
        hist = None if self.hist is None else Histogram(self.hist.bins, self.hist.width, self.hist.start, self.hist.counts.copy())
        return TensorObserver(self.bins, self.momentum, self.min, self.max, self.count, self.nonfinite, self.batches,
                              self.ema_min, self.ema_max, hist, None if self.extremes is None else list(self.extremes))

    def merge(self, other: "TensorObserver", refold: bool = True) -> None:
        """Combine two observers of the same tensor (shards). With per-batch extremes on both sides the moving
        average is the single run's (``refold`` False defers that fold to one ``refold()`` after many merges);
        without, moving averages combine weighted by batches."""
        self.min, self.max = min(self.min, other.min), max(self.max, other.max)
        self.count += other.count
        self.nonfinite += other.nonfinite
        if self.extremes is not None and other.extremes is not None:
            self.extremes = self.extremes + other.extremes
            if refold:
                self.refold()
        elif other.ema_min is not None:
            self.extremes = None
            if self.ema_min is None:
                self.ema_min, self.ema_max = other.ema_min, other.ema_max
            else:
                total = max(self.batches + other.batches, 1)
                self.ema_min = (self.ema_min * self.batches + other.ema_min * other.batches) / total
                self.ema_max = (self.ema_max * self.batches + other.ema_max * other.batches) / total
        self.batches += other.batches
        if self.hist is not None and other.hist is not None:
            self.hist.merge(other.hist)

    def canonicalize(self) -> None:
        """Put the histogram on its canonical grid (Histogram.canonical): what a run, or a merge of shards, ends with."""
        if self.hist is not None and self.hist.width and self.seen_finite:
            self.hist = self.hist.canonical(self.min, self.max)

    def refold(self) -> None:
        """The single run's moving average: every batch's extremes folded again in data-set order."""
        self.extremes.sort()
        self.ema_min = self.ema_max = None
        for _, lo, hi in self.extremes:
            self.ema_min, self.ema_max = _ema_step(self.ema_min, self.ema_max, lo, hi, self.momentum)

    def to_dict(self) -> dict:
        d = {
            "min": self.min if self.seen_finite else None,
            "max": self.max if self.seen_finite else None,
            "count": self.count,
            "nonfinite": self.nonfinite,
            "batches": self.batches,
            "ema_min": self.ema_min,
            "ema_max": self.ema_max,
        }
        if self.hist is not None and self.hist.width:
            d["hist"] = (self.hist.canonical(self.min, self.max) if self.seen_finite else self.hist).to_dict()
        if self.extremes:
            d["extremes"] = _pack_extremes(self.extremes)
        return d

    @classmethod
    def from_dict(cls, d: dict, bins: int = DEFAULT_BINS, momentum: float = DEFAULT_MOMENTUM) -> "TensorObserver":
        lo, hi = d.get("min"), d.get("max")
        hist = Histogram.from_dict(d["hist"]) if d.get("hist") else Histogram(bins)
        return cls(
            bins=hist.bins, momentum=momentum,
            min=float("inf") if lo is None else float(lo), max=float("-inf") if hi is None else float(hi),
            count=int(d.get("count", 0)), nonfinite=int(d.get("nonfinite", 0)), batches=int(d.get("batches", 0)),
            ema_min=d.get("ema_min"), ema_max=d.get("ema_max"), hist=hist,
            extremes=_unpack_extremes(d["extremes"]) if d.get("extremes") else ([] if not d.get("batches") else None),
        )


def _ema_step(ema_min, ema_max, lo: float, hi: float, momentum: float):
    """One batch of the moving average (the first batch starts it): one definition for a run and for a merge."""
    if ema_min is None:
        return lo, hi
    return ema_min + momentum * (lo - ema_min), ema_max + momentum * (hi - ema_max)


def _pack_extremes(extremes: list) -> dict:
    """Batch indices (int64) and extremes (float32: they are values of float32 tensors, exactly), zlib + base64."""
    a = np.asarray(extremes, dtype=np.float64)
    idx = a[:, 0].astype("<i8")
    vals = a[:, 1:].astype("<f4")
    return {"batches": len(extremes), "index_zlib_b64": base64.b64encode(zlib.compress(np.diff(idx, prepend=0).astype("<i8").tobytes(), 6)).decode(),
            "minmax_zlib_b64": base64.b64encode(zlib.compress(vals.tobytes(), 6)).decode()}


def _unpack_extremes(d: dict) -> list:
    idx = np.cumsum(np.frombuffer(zlib.decompress(base64.b64decode(d["index_zlib_b64"])), dtype="<i8"))
    vals = np.frombuffer(zlib.decompress(base64.b64decode(d["minmax_zlib_b64"])), dtype="<f4").reshape(-1, 2)
    if len(idx) != int(d["batches"]) or len(vals) != len(idx):
        raise ValueError("per-batch extremes do not match their batch count")
    return [(int(k), float(lo), float(hi)) for k, (lo, hi) in zip(idx, vals)]
