"""The limits a run is held to: the CI gates of a report and the targets tuning searches for are one type.

A failed gate gives exit code 3; tuning ranks its candidates by how far they miss the accuracy limits.
Pure: no sessions, no models.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from qconv.errors import UsageError
from qconv.measure.tally import Metrics

DEFAULT_COSINE = 0.999  # tuning's target when no limit is given (with "never slower than fp32" when latency is measured)


@dataclass(frozen=True, kw_only=True)
class Thresholds:
    min_sqnr: float | None = None  # dB, worst model output
    min_cosine: float | None = None  # worst model output
    max_top1_drop: float | None = None  # percentage points
    max_size_mb: float | None = None  # quantized file(s), 1 MB = 1,000,000 bytes
    max_latency_ratio: float | None = None  # quantized / original median time
    min_agreement: float | None = None  # top-1 agreement of the first output with the original's (no labels needed)
    min_metric: float | None = None  # the user's --metric

    def any(self) -> bool:
        return any(getattr(self, f.name) is not None for f in fields(self))

    def check_options(self, has_labels: bool, has_latency: bool, has_eval: bool, has_metric: bool = False) -> None:
        if self.min_metric is not None and not has_metric:
            raise UsageError("--min-metric gates on your task metric: give --metric MODULE:FUNCTION")
        if (self.min_sqnr is not None or self.min_cosine is not None or self.min_agreement is not None) and not has_eval:
            raise UsageError("--min-sqnr, --min-cosine and --min-agreement need evaluation data (--eval-data or --data)")
        if self.max_top1_drop is not None and not has_labels:
            raise UsageError("--max-top1-drop needs --eval-labels")
        if self.max_latency_ratio is not None and not has_latency:
            raise UsageError("--max-latency-ratio needs the latency measurement: drop --no-latency")

    @classmethod
    def tuning(cls, gates: Thresholds, latency: bool) -> tuple[Thresholds, bool]:
        """(what tuning aims for, whether it is the default): the limits given except size, else output cosine >= 0.999
        and, when latency is measured, never slower than fp32."""
        given = (gates.min_cosine, gates.min_sqnr, gates.max_top1_drop, gates.max_latency_ratio, gates.min_agreement, gates.min_metric)
        if any(v is not None for v in given):
            return cls(min_sqnr=gates.min_sqnr, min_cosine=gates.min_cosine, max_top1_drop=gates.max_top1_drop,
                       max_latency_ratio=gates.max_latency_ratio, min_agreement=gates.min_agreement,
                       min_metric=gates.min_metric), False
        return cls(min_cosine=DEFAULT_COSINE, max_latency_ratio=1.0 if latency else None), True

    def to_dict(self) -> dict:
        """The accuracy and speed limits that are set, in a fixed order (size is a gate, never a tuning target)."""
        order = ("min_metric", "min_cosine", "min_sqnr", "min_agreement", "max_top1_drop", "max_latency_ratio")
        return {k: getattr(self, k) for k in order if getattr(self, k) is not None}

    def misses(self, m: Metrics) -> list[tuple[str, float]]:
        """(limit, shortfall in units of its tolerance) for each accuracy limit ``m`` misses."""
        out = []
        if self.min_cosine is not None and m.cosine < self.min_cosine:
            out.append(("min-cosine", (self.min_cosine - m.cosine) / max(1.0 - self.min_cosine, 1e-6)))
        if self.min_sqnr is not None and m.sqnr_db < self.min_sqnr:
            out.append(("min-sqnr", (self.min_sqnr - m.sqnr_db) / 3.0))
        if self.min_agreement is not None and (m.agreement is None or m.agreement < self.min_agreement):
            out.append(("min-agreement", (self.min_agreement - (m.agreement or 0.0)) / max(1.0 - self.min_agreement, 1e-3)))
        if self.min_metric is not None and (m.metric is None or m.metric < self.min_metric):
            out.append(("min-metric", (self.min_metric - (m.metric or 0.0)) / max(abs(self.min_metric) * 0.01, 1e-6)))
        if self.max_top1_drop is not None and m.top1_drop is not None and m.top1_drop > self.max_top1_drop:
            out.append(("max-top1-drop", (m.top1_drop - self.max_top1_drop) / max(self.max_top1_drop, 0.5)))
        return out

    def key(self, m: Metrics) -> tuple:
        """Smaller is better: unmet limits, their total shortfall, the user's --metric (when given), then the error of the
        worst output or part of one, then agreement."""
        miss = self.misses(m)
        task = () if m.metric is None else (-round(m.metric, 9),)
        return (len(miss), round(sum(s for _, s in miss), 9), *task, round(1.0 - m.worst_cosine, 12), -round(m.agreement or 0.0, 9))
