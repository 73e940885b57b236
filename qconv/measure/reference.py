"""The float model's outputs on held rows, computed once: every other model (a candidate of tuning, another range
method for a damaged model's warning) is compared on them without running the float model again.

Two ways to fill one: ``Reference.keep`` during an evaluation pass (the first rows, bounded in rows and bytes), and
``hold`` for tuning (the first rows of a source, cut when one float pass gets long).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from qconv import runtime
from qconv.data import FeedSource, feed_rows
from qconv.errors import QconvError
from qconv.measure.tally import Tally

REFERENCE_BYTES = 256 * 2**20  # float outputs (and feeds) kept for re-comparison, at most
FLOAT_PASS_SECONDS = 3.0  # tuning's held rows are cut so one float pass over them takes about this long (at least 8 rows)


@dataclass
class Reference:
    names: list[str]
    feeds: list[dict] = field(default_factory=list)
    outputs: list[list] = field(default_factory=list)
    rows: int = 0  # rows kept (a feed may hold several)
    nbytes: int = 0
    full: bool = False
    labels: np.ndarray | None = None  # one class id per kept row
    float_seconds: float = 0.0  # the float model's time over the kept feeds (tuning sizes its trials by it)
    slices: dict = field(default_factory=dict)  # parts of concatenated outputs, scored on their own (measure.slices)
    metric: object = None  # the user's --metric (measure.usermetric), scored on every comparison

    def keep(self, feed: dict, outputs: list, rows: int, limit_rows: int) -> None:
        """Keep this feed and its float outputs, while under ``limit_rows`` rows and ``REFERENCE_BYTES``."""
        if self.full or self.rows >= limit_rows:
            self.full = True
            return
        size = sum(nbytes(v) for v in feed.values()) + sum(nbytes(v) for v in outputs)
        if self.nbytes + size > REFERENCE_BYTES:
            self.full = True
            return
        self.feeds.append(feed)
        self.outputs.append(outputs)
        self.rows += rows
        self.nbytes += size

    def compare(self, sess, feeds=None) -> Tally:
        """Another model's outputs on the kept rows against the float ones (with the labels, if kept). ``feeds``: that
        model's own feeds for the same rows, in order (a cut model's: measure.cuts), instead of the kept ones."""
        tally = Tally(self.names, slices=self.slices, objective=True, metric=self.metric)
        for feed, ref in zip(self.feeds if feeds is None else feeds, self.outputs):
            tally.add(ref, runtime.run(sess, feed, self.names), self.labels)
        return tally


def hold(sess, source: FeedSource, labels: np.ndarray | None, rows: int) -> Reference:
    """The first ``rows`` rows of ``source`` with ``sess``'s outputs on them (fewer when a float pass over them would
    take over ``FLOAT_PASS_SECONDS``, at least 8 rows, or hold over ``REFERENCE_BYTES``)."""
    ref = Reference([o.name for o in sess.get_outputs()])
    for feed in source:
        t0 = time.perf_counter()
        out = runtime.run(sess, feed, ref.names)
        ref.float_seconds += time.perf_counter() - t0
        ref.feeds.append(feed)
        ref.outputs.append(out)
        ref.rows += feed_rows(feed, source.specs)
        ref.nbytes += sum(v.nbytes for v in feed.values()) + sum(nbytes(v) for v in out)
        if ref.rows >= rows or (ref.rows >= 8 and ref.float_seconds > FLOAT_PASS_SECONDS) or ref.nbytes > REFERENCE_BYTES:
            break
    if not ref.feeds:
        raise QconvError("tuning has no rows to measure on: the evaluation data set is empty")
    if labels is not None:
        if labels.size < ref.rows:
            raise QconvError(f"--eval-labels has {labels.size} labels but tuning holds {ref.rows} rows; give one label per row")
        ref.labels = labels[:ref.rows]
    return ref


def nbytes(value) -> int:
    """Bytes of a tensor, or of the tensors in a sequence / map output."""
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, dict):
        return sum(nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(nbytes(v) for v in value)
    return 8
