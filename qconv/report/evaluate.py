"""Run the float and the quantized model on the same feeds: fidelity, accuracy, per-layer error, latency.

What it costs is part of the product, so each measurement runs the models no more than it must:
- outputs, top-1 and top-1 agreement: one pass of each *shipped* model over the eval data, on plain
  sessions (no tensor exposed, so onnxruntime's int8 fusions stay as they will in production);
- per-layer error: a second pass over only the first ``layer_samples`` rows, with every compared tensor
  exposed as an output (the QDQ analysis model, numerically the same as the shipped one);
- latency: the same plain sessions, timed interleaved (see ``latency``).
The float model's outputs for the first rows are kept (``Reference``) so other candidate models can be
compared on them without running the float model again.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np

from qconv.data import feed_rows, single_rows
from qconv.errors import QconvError
from qconv.report.metrics import ErrorStats, top1
from qconv.runtime import run

DEFAULT_LAYER_SAMPLES = 32
REFERENCE_BYTES = 256 * 2**20  # float outputs (and feeds) kept for re-comparison, at most


@dataclass
class Reference:
    """The first rows of the eval data with the float model's outputs on them, kept in memory (bounded)."""

    names: list[str]
    rows: list[tuple[dict, list]] = field(default_factory=list)
    count: int = 0  # rows kept
    full: bool = False
    nbytes: int = 0

    def keep(self, feed: dict, outputs: list, rows: int, limit_rows: int) -> None:
        if self.full or self.count >= limit_rows:
            self.full = True
            return
        size = sum(_nbytes(v) for v in feed.values()) + sum(_nbytes(v) for v in outputs)
        if self.nbytes + size > REFERENCE_BYTES:
            self.full = True
            return
        self.rows.append((feed, outputs))
        self.count += rows
        self.nbytes += size


def _nbytes(value) -> int:
    """Bytes of a tensor, or of the tensors in a sequence / map output."""
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 8


def limited(feeds: Iterable[dict], specs, rows: int) -> Iterator[dict]:
    """The first ``rows`` rows, one row per feed where the model's batch dimension allows (every exposed
    tensor of a batch is alive at once: a row at a time bounds that memory and keeps runs cache-sized)."""
    seen = 0
    for feed in feeds:
        for row in single_rows(feed, specs):
            if seen >= rows:
                return
            yield row
            seen += feed_rows(row, specs)


def _agreement_axis(ref) -> bool:
    return isinstance(ref, np.ndarray) and ref.dtype.kind == "f" and ref.ndim >= 2 and ref.shape[-1] >= 2


def compare_outputs(float_sess, quant_sess, feeds: Iterable[dict], labels: np.ndarray | None = None,
                    progress: Callable[[int], None] | None = None, reference: Reference | None = None,
                    keep_rows: int = 0, specs=None) -> dict:
    """Per-output error statistics over all feeds, top-1 agreement of the first output, and top-1 accuracy
    of both models when labels are given. Streams: nothing is kept across batches but the sums (and the
    first ``keep_rows`` rows in ``reference``)."""
    names = [o.name for o in float_sess.get_outputs()]
    qnames = {o.name for o in quant_sess.get_outputs()}
    missing = [n for n in names if n not in qnames]
    if missing:
        raise QconvError(f"the quantized model lacks outputs {', '.join(missing)} of the original")
    stats = {n: ErrorStats() for n in names}
    agree = total = correct_f = correct_q = seen = batches = rows = 0
    for feed in feeds:
        ref = run(float_sess, feed, names)
        got = run(quant_sess, feed, names)
        k = feed_rows(feed, specs) if specs else 1
        rows += k
        if reference is not None:
            reference.keep(feed, ref, k, keep_rows)
        a, t, cf, cq, n = fold(names, stats, ref, got, labels, seen)
        agree, total, correct_f, correct_q, seen = agree + a, total + t, correct_f + cf, correct_q + cq, seen + n
        batches += 1
        if progress:
            progress(1)
    if batches == 0:
        raise QconvError("evaluation data set is empty")
    out = _summary(names, stats, agree, total, labels, correct_f, correct_q, seen, batches)
    out["rows"] = rows
    return out


def compare_reference(reference: Reference, quant_sess) -> dict:
    """Output statistics of another quantized model on the rows ``reference`` kept (no float run)."""
    stats = {n: ErrorStats() for n in reference.names}
    agree = total = 0
    for feed, ref in reference.rows:
        got = run(quant_sess, feed, reference.names)
        a, t, *_ = fold(reference.names, stats, ref, got, None, 0)
        agree, total = agree + a, total + t
    return _summary(reference.names, stats, agree, total, None, 0, 0, 0, len(reference.rows))


def fold(names, stats, ref, got, labels, seen):
    """Add one feed to the per-output sums; (agreeing, compared, correct float, correct quantized, labelled rows)."""
    for n, r, q in zip(names, ref, got):
        if isinstance(r, np.ndarray) and r.dtype.kind == "f":  # sequences and maps are not compared element-wise
            stats[n].update(r, q)
    agree = total = correct_f = correct_q = rows = 0
    if ref and _agreement_axis(ref[0]):
        pf, pq = top1(ref[0]), top1(got[0])
        agree, total = int((pf == pq).sum()), int(pf.size)
    if labels is not None:
        if not isinstance(ref[0], np.ndarray):
            raise QconvError("--eval-labels needs a tensor as the model's first output (it is a sequence or map)")
        pf, pq = top1(ref[0]), top1(got[0])
        want = labels[seen:seen + pf.size]
        if want.size != pf.size:
            raise QconvError(f"--eval-labels has {labels.size} labels but the eval data has more rows; give one label per row")
        correct_f, correct_q, rows = int((pf == want).sum()), int((pq == want).sum()), int(pf.size)
    return agree, total, correct_f, correct_q, rows


def _summary(names, stats, agree, total, labels, correct_f, correct_q, seen, batches) -> dict:
    result = {"outputs": {n: s.to_dict() for n, s in stats.items() if s.count}, "batches": batches,
              "top1_agreement": agree / total if total else None, "agreement_positions": total}
    if labels is not None:
        if seen != labels.size:
            raise QconvError(f"--eval-labels has {labels.size} labels but the eval data has {seen} rows; give one label per row")
        result["task"] = {"metric": "top1", "samples": seen, "original": correct_f / seen, "quantized": correct_q / seen,
                          "drop_points": 100.0 * (correct_f - correct_q) / seen}
    return result


def compare_layers(float_sess, quant_sess, feeds: Iterable[dict], probes: dict[str, str],
                   progress: Callable[[int], None] | None = None) -> dict:
    """Per-tensor statistics for ``probes`` ({tensor in the float model: tensor in the quantized model})."""
    if not probes:
        return {}
    layer_stats = {t: ErrorStats() for t in probes}
    fetch_f, fetch_q = list(probes), list(probes.values())
    for feed in feeds:
        for t, r, q in zip(probes, run(float_sess, feed, fetch_f), run(quant_sess, feed, fetch_q)):
            layer_stats[t].update(r, q)
        if progress:
            progress(1)
    return {t: s.to_dict() for t, s in layer_stats.items() if s.count}


def _block(sess, feed: dict, block: int) -> float:
    """Milliseconds of one run with the model's weights in cache: ``block`` runs back to back, the first
    dropped (it pays for the other model having evicted this one), the median of the rest."""
    times = []
    for _ in range(block):
        t0 = time.perf_counter()
        run(sess, feed)
        times.append((time.perf_counter() - t0) * 1000.0)
    return float(np.median(times[1:])) if block > 1 else times[0]


def latency(float_sess, quant_sess, feed: dict, threads: int, min_rounds: int = 25, max_rounds: int = 400,
            budget_s: float = 10.0, target_width: float = 0.04, block: int = 3) -> dict:
    """Median milliseconds of each model on one feed and the ratio with its spread, timed as A/B rounds.

    Each round times both models back to back (the order alternates), so machine noise hits both alike; each
    model's time in a round is a block of runs with its first run dropped, so neither pays for the cache the
    other just filled (in production one model runs alone);
    the per-round ratios give the median ratio and a 95% confidence interval of it (order statistics
    of the binomial, no assumption on the noise). Rounds continue past ``min_rounds`` until the interval
    is narrower than ``target_width`` or ``budget_s`` is spent (at least 5 rounds for slow models). The
    verdict is "faster" or "slower" only when the whole interval says so, else "same within noise".
    """
    for _ in range(3):
        run(float_sess, feed)
        run(quant_sess, feed)
    tf, tq = [], []
    start = time.perf_counter()
    for k in range(max_rounds):
        for sess, times in ((float_sess, tf), (quant_sess, tq)) if k % 2 == 0 else ((quant_sess, tq), (float_sess, tf)):
            times.append(_block(sess, feed, block))
        elapsed = time.perf_counter() - start
        if k + 1 >= 5 and elapsed > budget_s:
            break
        if k + 1 >= min_rounds:
            lo, hi = ratio_interval(np.array(tq) / np.array(tf))
            if hi - lo < target_width:
                break
    ratios = np.array(tq) / np.array(tf)
    lo, hi = ratio_interval(ratios)
    mf, mq = float(np.median(tf)), float(np.median(tq))
    return {"original": mf, "quantized": mq, "ratio": float(np.median(ratios)), "ratio_low": lo, "ratio_high": hi,
            "spread": {"original_iqr": _iqr(tf), "quantized_iqr": _iqr(tq)}, "runs": len(tf), "threads": threads,
            "provider": "CPUExecutionProvider", "verdict": verdict(lo, hi)}


def ratio_interval(ratios: np.ndarray, z: float = 1.96) -> tuple[float, float]:
    """95% confidence interval of the median of ``ratios`` (distribution-free, from order statistics)."""
    r = np.sort(np.asarray(ratios, dtype=np.float64))
    n = r.size
    if n == 0:
        return math.nan, math.nan
    half = z * math.sqrt(n) / 2.0
    lo_k = max(0, int(math.floor(n / 2.0 - half)))
    hi_k = min(n - 1, int(math.ceil(n / 2.0 + half)))
    return float(r[lo_k]), float(r[hi_k])


def verdict(lo: float, hi: float) -> str:
    if hi < 1.0:
        return "faster"
    if lo > 1.0:
        return "slower"
    return "same within noise"


def _iqr(x) -> float:
    q1, q3 = np.percentile(np.asarray(x), [25, 75])
    return float(q3 - q1)
