"""Run the float and the quantized model on the same feeds and measure fidelity, accuracy and latency."""

from __future__ import annotations

import time
from typing import Callable, Iterable

import numpy as np

from qconv.errors import QconvError
from qconv.report.metrics import ErrorStats, top1
from qconv.runtime import run


def compare(float_sess, quant_sess, feeds: Iterable[dict], labels: np.ndarray | None = None,
            progress: Callable[[int], None] | None = None, probes: dict[str, str] | None = None) -> dict:
    """Per-output error statistics over all feeds, top-1 accuracy of both when labels are given, and
    per-tensor statistics for ``probes`` ({tensor in the float model: tensor in the quantized model}),
    all streamed: nothing is kept across batches but the sums."""
    probes = probes or {}
    names = [o.name for o in float_sess.get_outputs() if o.name not in probes]
    qnames = {o.name for o in quant_sess.get_outputs()}
    missing = [n for n in names if n not in qnames]
    if missing:
        raise QconvError(f"the quantized model lacks outputs {', '.join(missing)} of the original")
    stats = {n: ErrorStats() for n in names}
    layer_stats = {t: ErrorStats() for t in probes}
    fetch_f, fetch_q = names + list(probes), names + list(probes.values())
    correct_f = correct_q = seen = batches = 0
    for feed in feeds:
        ref = run(float_sess, feed, fetch_f)
        got = run(quant_sess, feed, fetch_q)
        for n, r, q in zip(names, ref, got):
            if np.asarray(r).dtype.kind == "f":
                stats[n].update(r, q)
        for t, r, q in zip(probes, ref[len(names):], got[len(names):]):
            layer_stats[t].update(r, q)
        ref, got = ref[:len(names)], got[:len(names)]
        if labels is not None:
            pf, pq = top1(ref[0]), top1(got[0])
            want = labels[seen:seen + pf.size]
            if want.size != pf.size:
                raise QconvError(f"--eval-labels has {labels.size} labels but the eval data has more rows; give one label per row")
            correct_f += int((pf == want).sum())
            correct_q += int((pq == want).sum())
            seen += pf.size
        batches += 1
        if progress:
            progress(1)
    if batches == 0:
        raise QconvError("evaluation data set is empty")
    result = {"outputs": {n: s.to_dict() for n, s in stats.items() if s.count}, "batches": batches,
              "layers": {t: s.to_dict() for t, s in layer_stats.items() if s.count}}
    if labels is not None:
        if seen != labels.size:
            raise QconvError(f"--eval-labels has {labels.size} labels but the eval data has {seen} rows; give one label per row")
        result["task"] = {
            "metric": "top1",
            "samples": seen,
            "original": correct_f / seen,
            "quantized": correct_q / seen,
            "drop_points": 100.0 * (correct_f - correct_q) / seen,
        }
    return result


def latency(float_sess, quant_sess, feed: dict, threads: int, runs: int = 30, warmup: int = 3,
            budget_s: float = 10.0) -> dict:
    """Median milliseconds of each model on one feed; runs interleaved so machine noise hits both alike."""
    for _ in range(warmup):
        run(float_sess, feed)
        run(quant_sess, feed)
    tf, tq = [], []
    start = time.perf_counter()
    for k in range(runs):
        for sess, times in ((float_sess, tf), (quant_sess, tq)) if k % 2 == 0 else ((quant_sess, tq), (float_sess, tf)):
            t0 = time.perf_counter()
            run(sess, feed)
            times.append((time.perf_counter() - t0) * 1000.0)
        if time.perf_counter() - start > budget_s and k >= 4:
            break
    mf, mq = float(np.median(tf)), float(np.median(tq))
    return {"original": mf, "quantized": mq, "ratio": mq / mf if mf else None, "runs": len(tf),
            "threads": threads, "provider": "CPUExecutionProvider"}
