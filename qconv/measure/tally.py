"""What one comparison of two models adds up to: per-output error sums, top-1 agreement counts and, with labels,
the correct predictions of both (``Tally``); and the few numbers a search compares (``Metrics``). Pure numpy.

A tally is filled feed by feed (``add``), merged over shards in shard order (``merge``), and read once
(``summary`` for the report, ``metrics`` for gates and tuning).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from qconv.errors import QconvError
from qconv.measure.stats import ErrorStats, top1


@dataclass(frozen=True)
class Metrics:
    """The worst output's cosine and SQNR, top-1 agreement of the first output, the top-1 drop (with labels); the worst
    cosine of any part of a concatenated output, and the worst agreement of which scores pass ``PASS_SCORE``."""

    cosine: float
    sqnr_db: float
    agreement: float | None = None
    top1_drop: float | None = None
    slice_cosine: float | None = None  # worst part of an output a Concat made (box coordinates vs class scores)
    passing: float | None = None  # worst Jaccard index of the entries over PASS_SCORE, float vs quantized (scores in [0, 1])
    metric: float | None = None  # the user's --metric (higher is better)
    # per feed, for each decision the search compares (top-1 agreement, each output or part's scores passing
    # PASS_SCORE): ((name, (value of feed 1, ...)), ...), feeds in order; a search pairs two trials' values feed by feed
    # (``decisions_resolved``). None where unknown (a trial read from an older cache).
    per_feed: tuple | None = None

    @property
    def worst_cosine(self) -> float:
        """The cosine a search ranks by: the worst of every output and every part of one."""
        return self.cosine if self.slice_cosine is None else min(self.cosine, self.slice_cosine)

    def to_dict(self, per_feed: bool = False) -> dict:
        """JSON-safe (infinite SQNR as "inf"); ``per_feed``: with the per-feed decisions (the trial cache keeps them,
        a report does not)."""
        d = {"cosine": self.cosine, "sqnr_db": json_number(self.sqnr_db), "agreement": self.agreement, "top1_drop": self.top1_drop,
             "slice_cosine": self.slice_cosine, "passing": self.passing}
        if self.metric is not None:
            d["metric"] = self.metric
        if per_feed and self.per_feed is not None:
            d["per_feed"] = [[name, list(values)] for name, values in self.per_feed]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Metrics:
        s = d["sqnr_db"]
        feeds = d.get("per_feed")
        return cls(d["cosine"], float(s) if s in ("inf", "-inf") else s, d.get("agreement"), d.get("top1_drop"), d.get("slice_cosine"),
                   d.get("passing"), d.get("metric"),
                   None if feeds is None else tuple((str(n), tuple(float(v) for v in values)) for n, values in feeds))


RESOLVE_Z = 1.645  # one-sided 95%: how far a paired mean of per-feed decisions must lie from zero to count as a change


def decisions_resolved(new: Metrics, old: Metrics) -> tuple[bool, str | None]:
    """Whether the decisions ``new`` makes differ from ``old``'s beyond the noise of the feeds both were measured on,
    and how: (True, None) when every decision either stayed the same on every feed or rose by more than
    RESOLVE_Z standard errors of its per-feed differences (paired); (False, why) when one moved without that (a
    change within noise, or a fall). Without per-feed values for both, or with fewer than 3 feeds, (True, None): the
    totals decide as before. On 16 tuning pages, "--method mse" raised YOLOv8n's passing scores 0.862 -> 0.874 and
    lost 4 points of boxes kept on 64 pages the search never saw (94.9 -> 90.8): one page more or less decides
    such a difference."""
    if new.per_feed is None or old.per_feed is None:
        return True, None
    before = dict(old.per_feed)
    for name, values in new.per_feed:
        base = before.get(name)
        if base is None or len(base) != len(values) or len(values) < 3:
            continue
        d = np.asarray(values, np.float64) - np.asarray(base, np.float64)
        if not d.any():
            continue
        mean, se = float(d.mean()), float(d.std(ddof=1) / math.sqrt(d.size))
        if not mean - RESOLVE_Z * se > 0.0:
            return False, (f"{name} moved {mean:+.4f} a feed on average (standard error {se:.4f}, {d.size} feeds): "
                           f"not a gain beyond noise")
    return True, None


def json_number(x):
    """JSON has no infinity: +-inf as the strings "inf" / "-inf"."""
    if isinstance(x, float) and math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


PASS_SCORE = 0.25  # a detector's usual confidence threshold: entries above it are the decisions


def agreement_axis(ref) -> bool:
    """Outputs whose last axis is class scores (float, rank >= 2, at least two classes) have a top-1 to agree on."""
    return isinstance(ref, np.ndarray) and ref.dtype.kind == "f" and ref.ndim >= 2 and ref.shape[-1] >= 2


@dataclass
class Tally:
    names: list[str]
    stats: dict[str, ErrorStats] = field(default_factory=dict)
    agree: int = 0  # positions where the first output's top-1 is the same
    positions: int = 0
    correct_float: int = 0  # with labels: rows each model predicts right
    correct_quant: int = 0
    labelled: int = 0
    batches: int = 0
    rows: int = 0
    objective: bool = False  # also what a search ranks by: parts of concatenated outputs, scores passing PASS_SCORE
    slices: dict = field(default_factory=dict)  # {output: (axis, [(start, stop), ...])}: parts scored on their own
    slice_stats: dict[str, ErrorStats] = field(default_factory=dict)
    # {output or part: [both pass, either passes, in [0, 1] so far, each feed's Jaccard (Metrics.per_feed)]}
    decisions: dict[str, list] = field(default_factory=dict)
    metric: object = None  # a measure.usermetric.UserMetric: the user's task metric, summed feed by feed
    metric_total: float = 0.0
    metric_count: float = 0.0
    agree_feeds: list[float] = field(default_factory=list)  # objective: each feed's top-1 agreement (Metrics.per_feed)
    metric_feeds: list[float] = field(default_factory=list)  # objective: each feed's --metric, total / count (1 if no count)

    def __post_init__(self) -> None:
        if not self.stats:
            self.stats = {n: ErrorStats() for n in self.names}

    def add(self, ref: list, got: list, labels: np.ndarray | None = None, rows: int = 1) -> None:
        """One feed: the float model's outputs ``ref`` and the other model's ``got`` (in ``names`` order); ``labels``
        is the whole label array (this feed's are the next ones)."""
        for n, r, q in zip(self.names, ref, got):
            if isinstance(r, np.ndarray) and r.dtype.kind == "f":  # sequences and maps are not compared element-wise
                self.stats[n].update(r, q)
                if self.objective:
                    self._parts(n, r, np.asarray(q))
        if self.metric is not None:
            total, count = self.metric.score(self.names, ref, got, rows)
            self.metric_total += total
            self.metric_count += count
            if self.objective:
                self.metric_feeds.append(total / count if count else 1.0)
        if ref and agreement_axis(ref[0]):
            pf, pq = top1(ref[0]), top1(got[0])
            same = int((pf == pq).sum())
            self.agree += same
            self.positions += int(pf.size)
            if self.objective:
                self.agree_feeds.append(same / max(int(pf.size), 1))
        if labels is not None:
            if not isinstance(ref[0], np.ndarray):
                raise QconvError("--eval-labels needs a tensor as the model's first output (it is a sequence or map)")
            pf, pq = top1(ref[0]), top1(got[0])
            want = labels[self.labelled:self.labelled + pf.size]
            if want.size != pf.size:
                raise QconvError(f"--eval-labels has {labels.size} labels but the eval data has more rows; give one label per row")
            self.correct_float += int((pf == want).sum())
            self.correct_quant += int((pq == want).sum())
            self.labelled += int(pf.size)
        self.batches += 1
        self.rows += rows

    def _parts(self, name: str, r: np.ndarray, q: np.ndarray) -> None:
        """The parts of a concatenated output, and which scores pass the threshold, for the search's objective."""
        parts = [(name, r, q)]
        if name in self.slices and r.shape == q.shape:
            axis, bounds = self.slices[name]
            if axis < r.ndim and bounds[-1][1] == r.shape[axis]:
                for a, b in bounds:
                    key = f"{name}[{a}:{b}]"
                    rs, qs = np.take(r, range(a, b), axis=axis), np.take(q, range(a, b), axis=axis)
                    self.slice_stats.setdefault(key, ErrorStats()).update(rs, qs)
                    parts.append((key, rs, qs))
        for key, rs, qs in parts:
            d = self.decisions.setdefault(key, [0, 0, True, []])
            if d[2] and rs.size and (float(rs.min()) < 0.0 or float(rs.max()) > 1.0):
                d[2] = False  # not scores: no decisions to agree on
            if d[2]:
                pf, pq = rs > PASS_SCORE, qs > PASS_SCORE
                both, either = int(np.count_nonzero(pf & pq)), int(np.count_nonzero(pf | pq))
                d[0] += both
                d[1] += either
                d[3].append(both / either if either else 1.0)

    def merge(self, other: Tally) -> None:
        """Add another shard's tally (labels are scored by the driver, in feed order: see ``score_labels``)."""
        for n in self.names:
            self.stats[n].merge(other.stats[n])
        self.agree += other.agree
        self.positions += other.positions
        self.metric_total += other.metric_total
        self.metric_count += other.metric_count
        self.batches += other.batches
        self.rows += other.rows

    def score_labels(self, pred_float: np.ndarray, pred_quant: np.ndarray, labels: np.ndarray) -> None:
        """Top-1 of both models, gathered from shards in feed order, against the labels."""
        if pred_float.size != labels.size:
            raise QconvError(f"--eval-labels has {labels.size} labels but the eval data has {pred_float.size} rows; "
                             "give one label per row")
        self.correct_float, self.correct_quant = int((pred_float == labels).sum()), int((pred_quant == labels).sum())
        self.labelled = int(pred_float.size)

    @property
    def agreement(self) -> float | None:
        return self.agree / self.positions if self.positions else None

    @property
    def metric_value(self) -> float | None:
        return self.metric_total / self.metric_count if self.metric is not None and self.metric_count else None

    def summary(self, labels: np.ndarray | None = None) -> dict:
        """The report's fidelity section: every compared output, agreement and (with labels) the task."""
        result = {"outputs": {n: s.to_dict() for n, s in self.stats.items() if s.count}, "batches": self.batches,
                  "top1_agreement": self.agreement, "agreement_positions": self.positions}
        if self.metric is not None:
            result["metric"] = {"name": self.metric.spec, "value": self.metric_value, "count": self.metric_count}
        if labels is not None:
            seen = self.labelled
            if seen != labels.size:
                raise QconvError(f"--eval-labels has {labels.size} labels but the eval data has {seen} rows; give one label per row")
            result["task"] = {"metric": "top1", "samples": seen, "original": self.correct_float / seen,
                              "quantized": self.correct_quant / seen,
                              "drop_points": 100.0 * (self.correct_float - self.correct_quant) / seen}
        return result

    def metrics(self, labelled: bool = False) -> Metrics:
        used = [s for s in self.stats.values() if s.count]
        drop = None
        if labelled and self.labelled:
            drop = 100.0 * (self.correct_float - self.correct_quant) / self.labelled
        parts = [s.cosine for s in self.slice_stats.values() if s.count]
        passing = [d[0] / d[1] for d in self.decisions.values() if d[2] and d[1]]
        per_feed = tuple((f"scores passing {PASS_SCORE} in {k}", tuple(d[3])) for k, d in self.decisions.items() if d[2]) + (
            (("top-1 agreement", tuple(self.agree_feeds)),) if self.agree_feeds else ()) + (
            (("your --metric", tuple(self.metric_feeds)),) if self.metric_feeds else ())
        return Metrics(float(min((s.cosine for s in used), default=1.0)), float(min((s.sqnr_db for s in used), default=math.inf)),
                       self.agreement, drop, float(min(parts)) if parts else None, float(min(passing)) if passing else None,
                       self.metric_value, per_feed if self.objective else None)
