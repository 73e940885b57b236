"""Statistics computed inside onnxruntime: the calibration graph reduces each observed tensor where it is made.

For each observed tensor the graph gains, next to its producer: per-channel ReduceMin, ReduceMax and ReduceSum (the
sum is there to see inf and NaN, which onnxruntime's min and max skip), its Size, and every s-th value of it in
flattened order (s = ceil(size / samples), made odd so that it cannot fall in step with an even width or channel
count; s = 1 when ``samples`` is 0 or the tensor is small). Only these few numbers and the sample leave onnxruntime,
and with priority-based node order each reduction runs while its tensor is in cache, after which the tensor is freed:
calibration runs at about the cost of one float pass, and holds about what inference holds.

The per-channel partial results are reduced again in numpy: a min of mins is exact, so the extremes are the ones a
full read of the tensor gives. A tensor whose batch held inf or NaN is reported as such (``None``), and the caller
observes it in full instead (qconv.calib.collect).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qconv.calib import observers
from qconv.calib.observers import Batch
from qconv.graph import Graph, ai_onnx_opset, without_weights

DEFAULT_SAMPLES = 16384  # histogram values per observed tensor per batch, at most (0: every value)
# ... and about this many per tensor over the whole run: a run of many small batches takes fewer a batch. At batch 1 the
# sample was most of what the statistics cost past a float pass: PP-OCRv4 rec, 400 lines, 3.2 M values a batch over 103
# observed tensors, strided out of onnxruntime (0.35x a float pass), histogrammed and derived in numpy (3.8 s). The
# histogram of a default (min-max) run serves later method changes, the report's plots and the plan's estimate of each
# tensor's power; a million values a tensor serve all three. Runs of up to 64 batches take 16384 a batch, as before.
RUN_SAMPLES = 1 << 20
MIN_SAMPLES = 1024  # per tensor and batch, however many batches


MIN_OPSET = 13  # ReduceSum's axes input, Slice's steps input


HISTOGRAM_METHODS = ("percentile", "entropy", "mse")


def samples_for(asked: int | None, method: str | None, batches: int = 1) -> int:
    """Histogram values per tensor and batch: as asked, else every value when the run's range method reads the
    histogram's tails (a sample's 99.999th percentile is its largest value), else a sample of about RUN_SAMPLES values a
    tensor over the run's ``batches`` (the whole data set's feeds: every shard of a run takes the same), DEFAULT_SAMPLES
    a batch at most, MIN_SAMPLES at least."""
    if asked is not None:
        return asked
    if method in HISTOGRAM_METHODS:
        return 0
    return max(MIN_SAMPLES, min(DEFAULT_SAMPLES, RUN_SAMPLES // max(1, batches)))


def sample_step(size: int, samples: int) -> int:
    """Every how many values (flattened order) the histogram counts: odd, and 1 for ``samples`` 0 or small tensors."""
    if samples <= 0 or size <= samples:
        return 1
    s = -(-size // samples)
    return s + 1 - s % 2


def batch_of(x: np.ndarray, samples: int) -> Batch:
    """A Batch read from the whole tensor (graph inputs, tensors observed in full), sampled by the graph's rule."""
    x = np.asarray(x)
    return observers.batch_of(x, sample_step(x.size, samples))


@dataclass(frozen=True)
class _Probe:
    lo: str
    hi: str
    total: str
    size: str
    sample: str


class StatsGraph:
    """``model`` with statistics of ``reduced`` computed in the graph and ``full`` exposed as they are. The additions
    are applied to the model only while a session is made from it (``applied``), so the weights are never copied.

    ``rows``: each statistic per row of a feed that stacks several one-row feeds along axis 0 of ``rows`` (a graph
    input): every reduced tensor is read as [rows, -1], so a row's extremes, size and sample are those the one-row feed
    gives, wherever that tensor keeps each row's values together in flattened order (``read_rows``; the caller checks
    that it does, qconv.calib.collect). Without it, the reductions keep axis 1 (see ``_probe_nodes``)."""

    def __init__(self, model: onnx.ModelProto, reduced: list[str], full: list[str], samples: int, rows: str | None = None):
        self.samples = samples
        self.full = list(full)
        self.model = model
        self._inits: list = []
        ranks = _ranks(model)
        g = Graph(model)
        opset = ai_onnx_opset(model)
        consts = self._constants(g, samples)
        nodes_after: dict[int, list] = {}
        position = {o: k for k, node in enumerate(model.graph.node) for o in node.output}
        if rows is not None:  # [rows of the stacked feed, -1], from the stacked input's shape: the graph's first nodes
            consts["rows"] = g.unique("qconv_calib/rows")
            shape, n = g.unique("qconv_calib/rows_shape"), g.unique("qconv_calib/rows_n")
            nodes_after[-1] = [helper.make_node("Shape", [rows], [shape]),
                               helper.make_node("Slice", [shape, consts["zero"], consts["one"]], [n]),
                               helper.make_node("Concat", [n, consts["flat"]], [consts["rows"]], axis=0)]
        self.probes: dict[str, _Probe] = {}
        outputs = []
        for name in reduced:
            probe = _Probe(*(g.unique(f"qconv_calib/{name}/{part}") for part in ("min", "max", "sum", "size", "sample")))
            self.probes[name] = probe
            made = _probe_nodes(name, probe, ranks.get(name), opset, consts, g, samples) if rows is None else \
                _row_probe_nodes(name, probe, opset, consts, g, samples)
            nodes_after.setdefault(position.get(name, -1), []).extend(made)
            outputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in (probe.lo, probe.hi, probe.total, probe.sample)]
            outputs.append(helper.make_tensor_value_info(probe.size, TensorProto.INT64, [1 if rows is None else 2]))
        have = {o.name for o in model.graph.output}
        outputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in self.full if n not in have]
        self._after = nodes_after
        self._outputs = outputs

    @contextmanager
    def applied(self):
        """The model with the statistics nodes placed right after their tensors' producers, and their outputs; the
        model is restored on leaving (nodes, outputs and initializers as they were)."""
        m = self.model
        saved = [n.SerializeToString() for n in m.graph.node]
        outputs, inits = len(m.graph.output), len(m.graph.initializer)
        try:
            ordered = list(self._after.get(-1, []))
            for k, raw in enumerate(saved):
                ordered.append(onnx.NodeProto.FromString(raw))
                ordered.extend(self._after.get(k, []))
            del m.graph.node[:]
            m.graph.node.extend(ordered)
            m.graph.output.extend(self._outputs)
            m.graph.initializer.extend(self._inits)
            yield m
        finally:
            del m.graph.node[:]
            m.graph.node.extend(onnx.NodeProto.FromString(raw) for raw in saved)
            del m.graph.output[outputs:]
            del m.graph.initializer[inits:]

    def _constants(self, g: Graph, samples: int) -> dict[str, str]:
        k = max(samples, 1)  # 0: every value (no Slice is made)
        values = {"flat": np.array([-1], np.int64), "zero": np.array([0], np.int64), "k1": np.array([k - 1], np.int64),
                  "k2": np.array([2 * k], np.int64), "one": np.array([1], np.int64), "two": np.array([2], np.int64),
                  "end": np.array([np.iinfo(np.int64).max], np.int64)}
        names = {}
        for key, value in values.items():
            names[key] = g.unique(f"qconv_calib/{key}")
            self._inits.append(numpy_helper.from_array(value, names[key]))
        return names

    def outputs(self) -> list[str]:
        """The session outputs to fetch, in the order ``read`` takes them."""
        out = []
        for p in self.probes.values():
            out += [p.lo, p.hi, p.total, p.size, p.sample]
        return out + self.full

    def _probed(self, fetched: list):
        """(tensor, lo, hi, total, size, sample) of each reduced tensor, from the fetched outputs in ``outputs`` order."""
        for k, name in enumerate(self.probes):
            yield (name, *fetched[5 * k:5 * k + 5])

    def read(self, fetched: list) -> dict[str, Batch | None]:
        """Each tensor's Batch from the fetched outputs; None for a reduced tensor whose batch held inf or NaN."""
        out: dict[str, Batch | None] = {}
        for name, lo, hi, total, size, sample in self._probed(fetched):
            n = int(size[0])
            if n == 0:
                out[name] = Batch(0, 0, 0.0, 0.0, np.zeros(0, np.float32))
                continue
            lo, hi = float(np.min(lo)), float(np.max(hi))
            if not (np.isfinite(lo) and np.isfinite(hi) and np.isfinite(total).all()):
                out[name] = None
                continue
            out[name] = Batch(n, 0, lo, hi, np.asarray(sample, dtype=np.float32).reshape(-1))
        for name, value in zip(self.full, fetched[5 * len(self.probes):]):
            out[name] = batch_of(value, self.samples)
        return out

    def read_rows(self, fetched: list) -> dict[str, Rows | None]:
        """``read`` of a ``rows`` graph: each reduced tensor's Rows, None where some row held inf or NaN."""
        out: dict[str, Rows | None] = {}
        for name, lo, hi, total, size, sample in self._probed(fetched):
            if int(size[1]) == 0:
                out[name] = Rows(0, lo, hi, np.zeros((len(lo), 0), np.float32))
                continue
            if not (np.isfinite(lo).all() and np.isfinite(hi).all() and np.isfinite(total).all()):
                out[name] = None
                continue
            out[name] = Rows(int(size[1]), lo, hi, sample)
        return out


@dataclass(frozen=True)
class Rows:
    """One tensor in a stacked feed, row by row: each row's element ``count``, finite extremes ``lo``/``hi`` ([rows]
    float32) and histogram sample ``values`` ([rows, k]): what ``read`` gives for each one-row feed alone."""

    count: int
    lo: np.ndarray
    hi: np.ndarray
    values: np.ndarray


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Rank of each tensor onnx's shape inference can tell (for the per-channel reductions)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(without_weights(model), strict_mode=False)
    except Exception:  # noqa: BLE001 - unknown ranks reduce over every axis
        return {}
    g = inferred.graph
    return {vi.name: len(vi.type.tensor_type.shape.dim) for vi in list(g.value_info) + list(g.input) + list(g.output)
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape")}


def _probe_nodes(name: str, p: _Probe, rank: int | None, opset: int, c: dict, g: Graph, samples: int) -> list:
    """Per-channel min, max and sum (axis 1 kept: onnxruntime splits such reductions over its threads, where a
    reduction to one number runs on one), the size, and the strided sample."""
    axes = [0] + list(range(2, rank)) if rank and rank >= 3 else ([1] if rank == 2 else None)
    nodes = []
    axes_name = None
    if axes is not None:
        axes_name = g.unique(f"qconv_calib/{name}/axes")
        nodes.append(helper.make_node("Constant", [], [axes_name], value=numpy_helper.from_array(np.array(axes, np.int64))))
    for op, out in (("ReduceMin", p.lo), ("ReduceMax", p.hi), ("ReduceSum", p.total)):
        if axes is None:
            nodes.append(helper.make_node(op, [name], [out], keepdims=0))
        elif op == "ReduceSum" or opset >= 18:
            nodes.append(helper.make_node(op, [name, axes_name], [out], keepdims=0))
        else:
            nodes.append(helper.make_node(op, [name], [out], keepdims=0, axes=axes))
    flat = p.sample if samples <= 0 else g.unique(f"qconv_calib/{name}/flat")  # 0: every value, the flattened tensor
    nodes += [helper.make_node("Reshape", [name, c["flat"]], [flat]), helper.make_node("Shape", [flat], [p.size])]
    if samples <= 0:
        return nodes
    step, made = _step_nodes(name, p.size, c, g)
    return nodes + made + [helper.make_node("Slice", [flat, c["zero"], c["end"], c["zero"], step], [p.sample])]


def _step_nodes(name: str, size: str, c: dict, g: Graph) -> tuple[str, list]:
    """(the sample's step, the nodes making it) from ``size`` ([1]: the values a tensor or row holds). s = 2 floor((n +
    k - 1) / 2k) + 1: ceil(n / k), made odd (plus one where even), in four [1]-shaped integer ops the Slice reads
    directly (its ends past the size: clamped). Ten nodes a tensor became seven: at batch 1 a node's own cost is most of
    what these take (PP-OCRv4 rec, 103 observed tensors x 400 lines)."""
    t = {k: g.unique(f"qconv_calib/{name}/{k}") for k in ("a", "h", "d", "s")}
    return t["s"], [
        helper.make_node("Add", [size, c["k1"]], [t["a"]]),
        helper.make_node("Div", [t["a"], c["k2"]], [t["h"]]),
        helper.make_node("Mul", [t["h"], c["two"]], [t["d"]]),
        helper.make_node("Add", [t["d"], c["one"]], [t["s"]]),
    ]


def _row_probe_nodes(name: str, p: _Probe, opset: int, c: dict, g: Graph, samples: int) -> list:
    """``_probe_nodes`` per row: the tensor as [rows, -1], reduced over axis 1 (each row's min, max and sum); the
    size is that shape, and the sample takes every s-th value of each row (s from the row's size, as one row alone)."""
    flat = g.unique(f"qconv_calib/{name}/rows")
    nodes = [helper.make_node("Reshape", [name, c["rows"]], [flat]), helper.make_node("Shape", [flat], [p.size])]
    for op, out in (("ReduceMin", p.lo), ("ReduceMax", p.hi), ("ReduceSum", p.total)):
        if op == "ReduceSum" or opset >= 18:
            nodes.append(helper.make_node(op, [flat, c["one"]], [out], keepdims=0))
        else:
            nodes.append(helper.make_node(op, [flat], [out], keepdims=0, axes=[1]))
    if samples <= 0:
        return nodes + [helper.make_node("Identity", [flat], [p.sample])]
    n = g.unique(f"qconv_calib/{name}/n")
    step, made = _step_nodes(name, n, c, g)
    return nodes + [helper.make_node("Slice", [p.size, c["one"], c["two"]], [n])] + made + \
        [helper.make_node("Slice", [flat, c["zero"], c["end"], c["one"], step], [p.sample])]


def supported(model: onnx.ModelProto) -> bool:
    return ai_onnx_opset(model) >= MIN_OPSET
