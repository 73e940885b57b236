"""Run the float and the quantized model on the same feeds: fidelity, accuracy, per-layer error.

What it costs is part of the product, so each measurement runs the models no more than it must:
- outputs, top-1 and top-1 agreement: one pass of each *shipped* model over the eval data, on plain
  sessions (no tensor exposed, so onnxruntime's int8 fusions stay as they will in production);
- per-layer error: a second pass over only the first ``layer_samples`` rows, with every compared tensor
  exposed as an output (the QDQ analysis model, numerically the same as the shipped one);
- latency: the same plain sessions, timed interleaved (``qconv.measure.latency``).
The float model's outputs for the first rows are kept (``qconv.measure.reference``) so other candidate models
can be compared on them without running the float model again.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import numpy as np

from qconv.data import feed_rows, single_rows
from qconv.errors import QconvError
from qconv.measure.reference import Reference
from qconv.measure.stats import ErrorStats
from qconv.measure.tally import Tally
from qconv.runtime import run

DEFAULT_LAYER_SAMPLES = 32
LAYER_VALUES = 1 << 26  # values of the probed tensors the per-layer analysis compares, over its rows (at least 2 rows)
CHUNK_BYTES = 128 << 20  # float32 bytes of the tensors one analysis run exposes: onnxruntime holds them all at once


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


def compare_outputs(float_sess, quant_sess, feeds: Iterable[dict], labels: np.ndarray | None = None,
                    progress: Callable[[int], None] | None = None, reference: Reference | None = None,
                    keep_rows: int = 0, specs=None, metric=None) -> dict:
    """Per-output error statistics over all feeds, top-1 agreement of the first output, and top-1 accuracy
    of both models when labels are given. Streams: nothing is kept across batches but the sums (and the
    first ``keep_rows`` rows in ``reference``)."""
    names = [o.name for o in float_sess.get_outputs()]
    qnames = {o.name for o in quant_sess.get_outputs()}
    missing = [n for n in names if n not in qnames]
    if missing:
        raise QconvError(f"the quantized model lacks outputs {', '.join(missing)} of the original")
    tally = Tally(names, metric=metric)
    for feed in feeds:
        ref = run(float_sess, feed, names)
        got = run(quant_sess, feed, names)
        k = feed_rows(feed, specs) if specs else 1
        if reference is not None:
            reference.keep(feed, ref, k, keep_rows)
        tally.add(ref, got, labels, k)
        if progress:
            progress(1)
    if tally.batches == 0:
        raise QconvError("evaluation data set is empty")
    return {**tally.summary(labels), "rows": tally.rows}


def layer_plan(sizes: dict[str, int], rows: int) -> tuple[int, list[list[str]]]:
    """How the per-layer analysis bounds its cost: the rows to compare (of the ``rows`` offered: as many as hold
    ``LAYER_VALUES`` values in the probed tensors, at least 2), and the probes (``sizes``: elements a row, in graph
    order) in chunks that each expose at most ``CHUNK_BYTES`` a run. A text-line recognizer keeps its 32 rows and
    one chunk; a 1024x1024 detector (~1.5e8 probed values a row) compares 2 rows in a few chunks."""
    per_row = max(1, sum(sizes.values()))
    use = max(min(rows, 2), min(rows, LAYER_VALUES // per_row))
    chunks: list[list[str]] = [[]]
    held = 0
    for t, n in sizes.items():
        if chunks[-1] and held + 4 * n > CHUNK_BYTES:
            chunks.append([])
            held = 0
        chunks[-1].append(t)
        held += 4 * n
    return use, [c for c in chunks if c]


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


