"""Output-aware activation ranges (``--ranges output``): each activation's clip range chosen by the error it causes
at the outputs of the layers that read it, not by its own histogram alone. Same graph, same speed.

A range method looks at one tensor: min-max keeps every value and pays for it with a coarse step; MSE or entropy
clip the tails by how often values fall there. Neither knows what the tail is worth downstream: a channel of rare
large values multiplied by large weights is an object a detector sees, one multiplied by small weights is noise. The
error a range causes at the output of its reader ``y = x W`` is what matters (AdaQuant, Hubara et al. 2021, learns
it by gradient descent along with the weights; here the range alone is searched, on a grid):

    err(range) = || Q_range(x) Wq - x W ||^2 / || x W ||^2

with ``Wq`` the reader's int8 weights as the plan quantizes them (their error is part of the output's), summed over
the readers, on the first ``MAX_ROWS`` calibration rows (a Conv's inputs are its im2col patches, evenly spaced
positions as learned rounding takes them, ``SAMPLES`` per layer). The candidates shrink the calibrated range towards
zero by factors in [``SMALLEST``, 1]: its far end (a hard-swish's output: the high end), or where both ends are far,
each alone and both together (zero stays where it was).

A tensor takes the best candidate only where it cuts that error to ``MOVE_BELOW`` of the calibrated range's or less:
where rare outliers stretched the range (a BatchNorm output at +-27 whose values sit within +-9, a residual sum with
one far tail). A small local gain does not pay: rounding noise is zero-mean and averages out in the layers after,
clipping is not (it shaves the same sign off the largest values, which a detector's objects are made of). Measured
(bench_ledger rows, no bias correction, 2026-12-03): moving every tensor that gains 2% took the PP-OCRv4 recognizer
from 94.6 to 97.7 characters (fp32 97.8) but YOLOv8n DocLayNet from 93.1 to 89.6% of fp32's boxes; moving only those
cut to 0.3 or less moves 7 of the recognizer's 41 tensors and 4 of YOLOv8n's 47: 97.5 characters, 93.2% of boxes.

- Targets: activations whose every quantized reader is a Conv (grouped, depthwise), Gemm or 2-D MatMul with int8
  weights (what ``qconv.adjust.rounding`` rounds), whose range is their own (calibrated, not shared from another
  tensor or set by an override). An activation also read by an Add, a Concat or a float node is left as calibrated:
  its error there is not measured.
- The plan records the chosen ranges (``source.output_ranges``) and names the method ``output`` on each tensor, so
  ``--plan`` reproduces them without data.
- With ``--data`` the default keeps them only when the int8 model's outputs on other rows say they pay (the check bias
  correction passes: output SQNR up, top classes and passing scores agreeing with fp32 at least as well).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import onnx

from qconv.adjust.bias import quantized_layers
from qconv.adjust.rounding import Target, _samples, _target, exposed_rows
from qconv.graph import Graph
from qconv.numeric import qmath
from qconv.numeric.packing import consecutive
from qconv.plan import QuantPlan

MAX_ROWS = 32
SAMPLES = 2048  # input vectors per reader, spread over the rows
SMALLEST = 0.25  # the narrowest candidate: a quarter of the calibrated range
STEPS = 16  # factors in [SMALLEST, 1] per way of shrinking
MOVE_BELOW = 0.3  # a tensor moves only where its readers' output error falls to 30% of the calibrated range's or less
CHUNK = 512  # input vectors per product
PRUNE_AFTER = 0.25  # after a quarter of a reader's samples, ...
PRUNE_ABOVE = 2.0  # ... candidates whose error is twice the best one's or more are no longer measured
BATCH_VALUES = 1 << 18  # a reader's samples wait until they hold this many values (a row of a 1-row feed has ~64)


@dataclass
class Activation:
    """One activation to search: its calibrated range and parameters, and the layers that read it."""

    name: str
    lo: float
    hi: float
    qtype: qmath.QType
    symmetric: bool
    readers: list[Target] = field(default_factory=list)

    def candidates(self) -> list[tuple[float, float]]:
        """The calibrated range first, then its far end shrunk towards zero; where both ends are far (neither is
        within a quarter of the other), each end alone and both together."""
        alphas = np.geomspace(SMALLEST, 1.0, STEPS)[:-1][::-1]
        f32 = lambda v: float(np.float32(v))  # noqa: E731
        lo, hi = self.lo, self.hi
        out = [(lo, hi)]
        if hi > 0 and -lo < SMALLEST * hi:
            return out + [(lo, f32(hi * a)) for a in alphas]
        if lo < 0 and hi < SMALLEST * -lo:
            return out + [(f32(lo * a), hi) for a in alphas]
        return out + [(lo, f32(hi * a)) for a in alphas] + [(f32(lo * a), hi) for a in alphas] + [(f32(lo * a), f32(hi * a)) for a in alphas]


def targets(model: onnx.ModelProto, plan: QuantPlan) -> list[Activation]:
    """The activations whose range the search may move, in graph order."""
    g = Graph(model)
    layers: dict[str, Target] = {}  # node -> its weight's matrices (one weight a node)
    for _, node, tx, tw in quantized_layers(model, plan):
        if tx.qparams.qtype.bits > 8 or tw.qparams.qtype.bits > 8 or node.input[1] not in g.initializers:
            continue
        t = _target(node, tuple(g.initializers[node.input[1]].dims), tw.qparams)
        if t is not None:
            layers[node.name] = t
    out = []
    for name, tp in plan.tensors.items():  # "calibrated range": its own (not shared, not an override, not searched)
        if tp.role != "activation" or tp.range is None or tp.qparams.qtype.bits > 8 or not tp.consumers \
                or not tp.origin.startswith("calibrated range"):
            continue
        readers = [layers[c] for c in tp.consumers if c in layers and layers[c].x == name]
        if len(readers) != len(tp.consumers) or len(g.consumers.get(name, [])) != len(tp.consumers):
            continue  # a reader the search cannot measure (an Add, a Concat, a float node)
        lo, hi = tp.range
        if not (hi > lo) or not np.isfinite([lo, hi]).all():
            continue
        out.append(Activation(name, float(lo), float(hi), tp.qparams.qtype, bool(plan.config.symmetric_activations), readers))
    order = {n: k for k, n in enumerate(dict.fromkeys(i for node in model.graph.node for i in node.input))}
    return sorted(out, key=lambda a: order.get(a.name, len(order)))


def _fake_quant(x: np.ndarray, qp: qmath.QParams, out: np.ndarray | None = None) -> np.ndarray:
    """QuantizeLinear then DequantizeLinear in float32 (round half to even, saturate), per tensor, into ``out``.
    ``clip(rint(x / s) + zp, qmin, qmax) - zp`` is ``clip(rint(x / s), qmin - zp, qmax - zp)``: integers in float32.
    An estimate for the search: ``x * (1 / s)`` (a third of a float32 division's time here) may differ from ``x / s``
    in the last bit, which moves a value only where it sits on a rounding midpoint."""
    s = np.float32(np.asarray(qp.scale).reshape(-1)[0])
    zp = float(np.asarray(qp.zero_point).reshape(-1)[0])
    out = np.multiply(x, np.float32(1.0) / s, out=out, dtype=np.float32)
    np.rint(out, out=out)
    np.clip(out, np.float32(qp.qtype.qmin - zp), np.float32(qp.qtype.qmax - zp), out=out)
    return np.multiply(out, s, out=out)


@dataclass
class Errors:
    """Each candidate's squared output error and the outputs' power, summed over a tensor's readers' samples."""

    error: np.ndarray
    power: float = 0.0
    samples: int = 0
    alive: np.ndarray | None = None  # the candidates still measured (``prune``)

    def __post_init__(self) -> None:
        if self.alive is None:
            self.alive = np.ones(self.error.shape, bool)

    def prune(self) -> None:
        """Stop measuring the candidates whose error so far is ``PRUNE_ABOVE`` times the best one's or more (the
        calibrated range, first, always stays): a candidate that far behind on a quarter of the samples does not
        win on all of them, and dropping it halves the search's products."""
        best = float(np.min(self.error[self.alive]))
        self.alive &= ~(self.error > PRUNE_ABOVE * best)
        self.alive[0] = True

    def relative(self) -> np.ndarray | None:
        """Each candidate's error over the outputs' power (inf for those pruned); None when a sum overflowed."""
        rel = self.error / max(self.power, 1e-30)
        if not (np.isfinite(self.power) and np.all(np.isfinite(rel[self.alive]))):
            return None
        return np.where(self.alive, rel, np.inf)


@dataclass
class Layer:
    """A reader's float and int8 weights as [groups, K, per] stacks of matrices; where K < per (a layer widening its
    input), also ``gram = Wq Wq^T`` and ``cross = (Wq - W) Wq^T`` [groups, K, K], so each candidate costs K x K, not
    K x per, a row: with e = Q(x) - x and D = Wq - W, ``|Q(x) Wq - x W|^2 = e gram e^T + 2 (x cross) e^T + |x D|^2``."""

    w: np.ndarray
    wq: np.ndarray
    gram: np.ndarray | None = None
    cross: np.ndarray | None = None

    @classmethod
    def of(cls, g: Graph, t: Target, plan: QuantPlan) -> "Layer":
        w = g.array(t.w).astype(np.float32)
        wq = qmath.dequantize(qmath.quantize(w, plan.tensors[t.w].qparams), plan.tensors[t.w].qparams)
        if t.op == "Conv":
            per = w.shape[0] // t.groups
            w, wq = (np.ascontiguousarray(a.reshape(t.groups, per, -1).transpose(0, 2, 1)) for a in (w, wq))
        else:
            w, wq = (np.ascontiguousarray(a.T if t.trans else a)[None] for a in (w, wq))
        if w.shape[1] >= w.shape[2]:
            return cls(w, wq)
        wqt = wq.transpose(0, 2, 1)
        return cls(w, wq, np.matmul(wq, wqt), np.matmul(wq - w, wqt))


def _accumulate(errors: Errors, chunk: np.ndarray, layer: Layer, params: list[qmath.QParams]) -> None:
    """Add one chunk [s, groups, K] of a reader's inputs to ``errors`` (every group in one batched product). Sums of
    squares past float32's range (activations near 1e19) become inf: ``search`` leaves such a tensor as calibrated."""
    with np.errstate(over="ignore", invalid="ignore"):
        _accumulate_chunks(errors, chunk, layer, params)


def _accumulate_chunks(errors: Errors, chunk: np.ndarray, layer: Layer, params: list[qmath.QParams]) -> None:
    for start in range(0, chunk.shape[0], CHUNK):
        x = np.ascontiguousarray(chunk[start:start + CHUNK].transpose(1, 0, 2))  # [groups, s, K]
        y = np.matmul(x, layer.w)
        errors.power += float(np.sum(np.square(y, dtype=np.float64)))
        errors.samples += x.shape[1]
        buf = np.empty_like(x)
        live = np.flatnonzero(errors.alive)
        if layer.gram is None:
            for k in live:
                d = np.matmul(_fake_quant(x, params[k], buf), layer.wq)
                d -= y
                flat = d.reshape(-1)
                errors.error[k] += float(np.dot(flat, flat))
            continue
        xd = (np.matmul(x, layer.wq) - y).reshape(-1)
        base = float(np.dot(xd, xd))
        z = np.matmul(x, layer.cross).reshape(-1)
        for k in live:
            e = _fake_quant(x, params[k], buf)
            e -= x
            u = np.matmul(e, layer.gram).reshape(-1)
            flat = e.reshape(-1)
            errors.error[k] += float(np.dot(u, flat)) + 2.0 * float(np.dot(flat, z)) + base


def measure(model: onnx.ModelProto, plan: QuantPlan, feeds: Iterable[dict], found: list[Activation], threads: int | None = None,
            rows: int = MAX_ROWS, advance: Callable[[int], None] = lambda n: None,
            parts: list[list[Activation]] | None = None) -> tuple[dict[str, Errors], int]:
    """({tensor: each candidate's error at its readers' outputs}, rows used) on the first ``MAX_ROWS`` rows of
    ``feeds`` (``rows``: how many the feeds hold, if fewer): a float pass with the targets exposed, row by row; given
    ``parts`` (``groups``: the targets in groups whose exposed values fit a memory budget), a pass per group (``feeds``
    re-iterable). A tensor's errors do not depend on the group it is measured in."""
    errors: dict[str, Errors] = {}
    total = 0
    for group in ([found] if parts is None else parts):
        got, total = _measure(model, plan, feeds, group, threads, rows, advance)
        errors.update(got)
    return errors, total


def groups(model: onnx.ModelProto, feeds: Iterable[dict], found: list[Activation], max_memory: int | None) -> list[list[Activation]]:
    """Consecutive targets whose exposed values (a feed's, twice: onnxruntime's and ours) and readers' matrices fit
    ``max_memory`` (all of them in one group without a budget)."""
    if max_memory is None or len(found) < 2:
        return [found] if found else []
    from qconv.calib.collect import tensor_bytes

    first = next(iter(feeds), None)
    if first is None:
        return [found]
    names = [a.name for a in found if a.name not in first]
    sizes = tensor_bytes(model, first, names) if names else {}

    def cost(a: Activation) -> int:
        return 2 * sizes.get(a.name, 0) + 3 * 4 * sum(int(np.prod(t.shape)) for t in a.readers) + 4 * BATCH_VALUES * len(a.readers)
    return consecutive(found, cost, max_memory)


def _measure(model: onnx.ModelProto, plan: QuantPlan, feeds: Iterable[dict], found: list[Activation], threads: int | None,
             rows: int, advance: Callable[[int], None]) -> tuple[dict[str, Errors], int]:
    g = Graph(model)
    layers = {t.node: Layer.of(g, t, plan) for a in found for t in a.readers}
    params = {a.name: [qmath.choose_qparams(lo, hi, a.qtype, a.symmetric) for lo, hi in a.candidates()] for a in found}
    errors = {a.name: Errors(np.zeros(len(params[a.name]))) for a in found}
    per_row = -(-SAMPLES // max(1, min(MAX_ROWS, rows)))
    prune_after = PRUNE_AFTER * SAMPLES
    pending: dict[tuple[str, str], list[np.ndarray]] = {}  # a row's few samples wait for more: one product, not many

    def flush(a: Activation, t: Target, least: int) -> None:
        chunks = pending.get((a.name, t.node))
        if chunks and sum(c.size for c in chunks) >= least:
            _accumulate(errors[a.name], np.concatenate(chunks) if len(chunks) > 1 else chunks[0], layers[t.node], params[a.name])
            chunks.clear()
            if errors[a.name].samples >= prune_after * len(a.readers):
                errors[a.name].prune()

    total = 0
    for values, n in exposed_rows(model, errors, feeds, threads):
        for a in found:
            x = np.asarray(values[a.name], dtype=np.float32)
            for t in a.readers:
                pending.setdefault((a.name, t.node), []).extend(_samples(x, t, t.features, per_row * n))
                flush(a, t, BATCH_VALUES)
        total += n
        advance(1)
    for a in found:
        for t in a.readers:
            flush(a, t, 1)
    return errors, total


def search(model: onnx.ModelProto, plan: QuantPlan, feeds: Iterable[dict], threads: int | None = None,
           found: list[Activation] | None = None, rows: int = MAX_ROWS,
           advance: Callable[[int], None] = lambda n: None,
           parts: list[list[Activation]] | None = None) -> tuple[dict[str, tuple[float, float]], dict]:
    """({tensor: chosen range} for the tensors that move, summary): ``measure``, then each tensor's candidate with
    the least error, where it is ``MOVE_BELOW`` times the calibrated range's or less."""
    found = targets(model, plan) if found is None else found
    summary = {"method": "output", "rows": 0, "tensors": len(found), "moved": 0, "median_error_ratio": 1.0}
    if not found:
        return {}, summary
    errors, total = measure(model, plan, feeds, found, threads, rows, advance, parts)
    chosen: dict[str, tuple[float, float]] = {}
    ratios = []
    for a in found:
        rel = errors[a.name].relative()
        if rel is None:
            continue
        k = int(np.argmin(rel))
        if k and rel[k] <= MOVE_BELOW * rel[0]:
            chosen[a.name] = a.candidates()[k]
            ratios.append(float(rel[k] / rel[0]))
    summary.update({"rows": int(total), "moved": len(chosen), "median_error_ratio": float(np.median(ratios)) if ratios else 1.0})
    return chosen, summary


def summary(plan: QuantPlan) -> dict | None:
    """What the report says about output-aware ranges (None when the plan did not search them)."""
    made = plan.source.get("output_ranges_search")
    return dict(made) if made else None


SCHEME_KEYS = ("method", "percentile", "per_channel", "weight_type", "symmetric_weights", "symmetric_activations",
               "reduce_range", "saturation_safe", "floor_ranges")


def scheme(config) -> dict:
    """What a search's ranges depend on besides the model and the rows: the range method they narrow and the
    quantization of the activations and of their readers' weights (``calibrate --ranges output`` records it)."""
    d = {k: getattr(config, k) for k in SCHEME_KEYS}
    d["activation_type"] = config.act_type
    if config.method != "percentile":
        d.pop("percentile")
    return d
