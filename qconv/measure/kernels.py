"""The kernel cost table's micro-benchmark: what one int8 kernel and its float twin cost on this CPU.

Each probe is a one-op model, float and QDQ (which onnxruntime fuses into its int8 kernel), profiled by
onnxruntime itself (``measure.profile``), so a kernel's time comes without the conversions and layout changes at
the model's borders; those are read from the same traces (QuantizeLinear, DequantizeLinear, the uint8 NHWC
Transposes, the float NCHWc Reorders) and priced per element. Every time is one thread's, in nanoseconds per unit
of work (a multiply-add for dense convolutions, an output element otherwise), at a few channel counts; the
planner interpolates between them (``qconv.plan.kernels``).
"""

from __future__ import annotations

import platform
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, shape_inference

from qconv.measure.profile import profile
from qconv.plan import kernels

RUNS = 16
PROFILE_SECONDS = 0.4  # a model's profile in one round of a model table: at most RUNS runs, at least 2
TARGET_ELEMENTS = 1 << 16  # output elements of a probe: big enough to be timed, small enough to stay in cache like a layer
CHANNELS = (8, 16, 32, 64, 128, 256, 512)
LAYOUT = ("Transpose", "ReorderInput", "ReorderOutput")


def _side(channels: int) -> int:
    return max(4, int(round((TARGET_ELEMENTS / channels) ** 0.5)))


def _model(nodes, inputs, output, inits) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "probe", inputs, [output], initializer=inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


def _vi(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, None if shape is None else list(shape))


class _Qdq:
    """Builds the QDQ twin of a probe: every float activation through a Q/DQ pair, weights int8 per channel."""

    def __init__(self):
        self.nodes, self.inits, self._k = [], [], 0

    def const(self, name: str, arr: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def act(self, x: str, scale: float = 0.05, zp: int = 128) -> str:
        self._k += 1
        s, z = self.const(f"s{self._k}", np.float32(scale)), self.const(f"z{self._k}", np.uint8(zp))
        self.nodes.append(helper.make_node("QuantizeLinear", [x, s, z], [f"{x}_q{self._k}"]))
        self.nodes.append(helper.make_node("DequantizeLinear", [f"{x}_q{self._k}", s, z], [f"{x}_dq{self._k}"]))
        return f"{x}_dq{self._k}"

    def weight(self, name: str, w: np.ndarray) -> tuple[str, np.ndarray]:
        """(the dequantized weight's name, its per-channel scales)."""
        scale = (np.abs(w).reshape(w.shape[0], -1).max(1) / 127 + 1e-8).astype(np.float32)
        q = np.clip(np.round(w / scale.reshape(-1, *[1] * (w.ndim - 1))), -127, 127).astype(np.int8)
        self.const(name + "_q", q)
        self.const(name + "_s", scale)
        self.const(name + "_z", np.zeros(w.shape[0], np.int8))
        self.nodes.append(helper.make_node("DequantizeLinear", [name + "_q", name + "_s", name + "_z"], [name], axis=0))
        return name, scale


def conv_probe(cin: int, cout: int, k: int, groups: int, side: int, quantized: bool) -> tuple[onnx.ModelProto, dict]:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((cout, cin // groups, k, k)).astype(np.float32) * 0.1
    b = rng.standard_normal(cout).astype(np.float32) * 0.1
    b_ = _Qdq()
    x = "x"
    if quantized:
        x = b_.act("x")
        wn, ws = b_.weight("w", w)
        bq = np.round(b / (0.05 * ws)).astype(np.int32)
        b_.const("b_q", bq)
        b_.const("b_s", (0.05 * ws).astype(np.float32))
        b_.const("b_z", np.zeros(cout, np.int32))
        b_.nodes.append(helper.make_node("DequantizeLinear", ["b_q", "b_s", "b_z"], ["b"], axis=0))
    else:
        wn = b_.const("w", w)
        b_.const("b", b)
    b_.nodes.append(helper.make_node("Conv", [x, wn, "b"], ["c"], kernel_shape=[k, k], pads=[k // 2] * 4, group=groups))
    out = b_.act("c") if quantized else "c"
    b_.nodes.append(helper.make_node("Identity", [out], ["y"]))
    m = _model(b_.nodes, [_vi("x", (1, cin, side, side))], _vi("y", (1, cout, side, side)), b_.inits)
    return m, {"x": rng.standard_normal((1, cin, side, side)).astype(np.float32)}


def eltwise_probe(op: str, channels: int, side: int, quantized: bool, **attrs) -> tuple[onnx.ModelProto, dict, int]:
    """(model, feed, units) of one elementwise/pooling op on a [1, C, side, side] activation: units are output
    elements, input elements for a pool (what the planner knows of a pool is its input's size)."""
    rng = np.random.default_rng(0)
    b_ = _Qdq()
    shape = (1, channels, side, side)
    inputs = [_vi("x", shape)]
    feed = {"x": rng.standard_normal(shape).astype(np.float32)}
    args = ["x"]
    if op in ("Add", "Mul", "Concat"):
        inputs.append(_vi("x2", shape))
        feed["x2"] = rng.standard_normal(shape).astype(np.float32)
        args.append("x2")
    elif op == "MulBcast":
        inputs.append(_vi("x2", (1, channels, 1, 1)))
        feed["x2"] = rng.random((1, channels, 1, 1)).astype(np.float32)
        args.append("x2")
    if quantized:
        args = [b_.act(a) for a in args]
    onnx_op = "Mul" if op == "MulBcast" else op
    if op == "Concat":
        attrs = {"axis": 1}
    b_.nodes.append(helper.make_node(onnx_op, args, ["o"], **attrs))
    out = b_.act("o") if quantized else "o"
    b_.nodes.append(helper.make_node("Identity", [out], ["y"]))
    m = _model(b_.nodes, inputs, _vi("y", None), b_.inits)
    oshape = shape_inference.infer_shapes(m).graph.value_info
    n_out = next(int(np.prod([d.dim_value for d in v.type.tensor_type.shape.dim])) for v in oshape if v.name == "o")
    return m, feed, (int(np.prod(shape)) if op in POOLS else n_out)


def _split(events: list[tuple[str, str, float]]) -> dict[str, float]:
    """{'kernel', 'QuantizeLinear', 'DequantizeLinear', 'layout'} microseconds of one probe's trace."""
    out = {"kernel": 0.0, "QuantizeLinear": 0.0, "DequantizeLinear": 0.0, "layout": 0.0}
    for _, op, us in events:
        if op in ("QuantizeLinear", "DequantizeLinear"):
            out[op] += us
        elif op in LAYOUT:
            out["layout"] += us
        elif op not in ("Identity",):
            out["kernel"] += us
    return out


def _best(model, feed, repeats: int = 5) -> dict[str, float]:
    """Each part's least time over ``repeats`` profiles (a noisy machine only ever adds time)."""
    runs = [_split(profile(model, feed, threads=1, runs=RUNS)) for _ in range(repeats)]
    return {k: min(r[k] for r in runs) for k in runs[0]}


CONV_KINDS = {  # key -> (kernel, depthwise?, units: "mac" | "out")
    "conv.depthwise3": (3, True),
    "conv.depthwise5": (5, True),
    "conv.pointwise": (1, False),
    "conv.dense3": (3, False),
}
ELTWISE = {  # key -> (op, attributes)
    "Add": ("Add", {}),
    "Mul": ("Mul", {}),
    "MulBcast": ("MulBcast", {}),
    "Concat": ("Concat", {}),
    "Sigmoid": ("Sigmoid", {}),
    "MaxPool": ("MaxPool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    "AveragePool": ("AveragePool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    "GlobalAveragePool": ("GlobalAveragePool", {}),
}
ELTWISE_CHANNELS = (16, 64, 256)
POOLS = ("MaxPool", "AveragePool", "GlobalAveragePool")


def measure(progress: Callable[[str], None] = lambda _: None) -> dict:
    """A kernel cost table of this CPU (the ``qconv.kernels`` JSON ``plan.kernels.Table`` reads)."""
    ops: dict[str, dict[str, list]] = {}
    per_element = {"QuantizeLinear": [], "DequantizeLinear": [], "layout.int8": [], "layout.float": []}
    for key, (k, depthwise) in CONV_KINDS.items():
        points = {"float": [], "int8": []}
        for c in CHANNELS:
            if not depthwise and k == 3 and c > 256:
                continue
            side = _side(c)
            macs = side * side * c * (k * k if depthwise else c * k * k)
            units = side * side * c if depthwise else macs
            for prec in ("float", "int8"):
                m, feed = conv_probe(c, c, k, c if depthwise else 1, side, prec == "int8")
                t = _best(m, feed)
                points[prec].append([c, 1000.0 * t["kernel"] / units])
                n = side * side * c
                if prec == "int8":
                    per_element["QuantizeLinear"].append(1000.0 * t["QuantizeLinear"] / (2 * n))
                    per_element["DequantizeLinear"].append(1000.0 * t["DequantizeLinear"] / n)
                    per_element["layout.int8"].append(1000.0 * t["layout"] / (2 * n))
                else:
                    per_element["layout.float"].append(1000.0 * t["layout"] / (2 * n))
            progress(f"{key} C={c}")
        ops[key] = points
    for key, (op, attrs) in ELTWISE.items():
        points = {"float": [], "int8": []}
        for c in ELTWISE_CHANNELS:
            side = _side(c)
            for prec in ("float", "int8"):
                m, feed, units = eltwise_probe(op, c, side, prec == "int8", **attrs)
                t = _best(m, feed)
                points[prec].append([c, 1000.0 * t["kernel"] / units])
            progress(f"{key} C={c}")
        ops[key] = points
    calls = {"float": [], "int8": []}
    for prec in ("float", "int8"):  # the fixed cost of one kernel call: a tiny Add
        m, feed, _ = eltwise_probe("Add", 4, 2, prec == "int8")
        calls[prec].append(1000.0 * _best(m, feed)["kernel"])
    return kernels.new_table(
        name=f"measured: {platform.machine()} {kernels.cpu_family()}",
        ops=ops,
        per_element={k: float(np.median(v)) for k, v in per_element.items()},
        call_ns={k: float(np.median(v)) for k, v in calls.items()},
        measured=True,
    )


# ---- a model's own table: its nodes timed in context ---------------------------------------------------------

FAMILY = {"Conv": ("Conv",), "FusedConv": ("Conv",), "MatMul": ("MatMul",), "FusedMatMul": ("MatMul",),
          "Gemm": ("Gemm", "MatMul"), "FusedGemm": ("Gemm", "MatMul")}


def _owner(node_name: str, op: str, g, by_name: dict) -> str:
    """onnxruntime names a float Conv/MatMul fused with what follows it (activation, bias or residual Add) after the
    last fused node's output: give the time to the Conv/MatMul, as the int8 model's kernel has it."""
    family = FAMILY.get(op)
    node = by_name.get(node_name)
    if family is None or node is None or node.op_type in family:
        return node_name
    for _ in range(3):
        producers = [g.producer.get(i) for i in node.input if g.producer.get(i) is not None]
        own = [p for p in producers if p.op_type in family]
        if own:
            return own[0].name
        if not producers:
            break
        node = producers[0]
    return node_name


def _node_times(models: dict, float_model: onnx.ModelProto, feed: dict, folded: dict, repeats: int) -> dict[str, dict[str, float]]:
    """{model key: {float-graph node: ns a run}} (conversions and layout changes left out): each node's least time over
    ``repeats`` rounds, the models profiled in turn within a round, so a machine whose load drifts biases neither."""
    from qconv.graph import Graph
    from qconv.measure.profile import attribute, by_node

    g = Graph(float_model)
    by_name = {n.name: n for n in float_model.graph.node}
    best: dict[str, dict[str, float]] = {k: {} for k in models}
    runs = 2  # the first round sizes the others: about PROFILE_SECONDS a profile (a 1024x1024 detector gets few runs)
    for _ in range(repeats):
        for key, model in models.items():
            events = profile(model, feed, threads=1, runs=runs)
            times = attribute(events, float_model)
            for t in times:
                t.node = _owner(folded.get(t.node, t.node), t.op, g, by_name)
            for node, us in by_node(times).items():
                if node in by_name:
                    best[key][node] = min(best[key].get(node, float("inf")), 1000.0 * us)
            per_run = sum(us for _, _, us in events) / 1e6
            runs = max(2, min(RUNS, int(PROFILE_SECONDS / max(per_run, 1e-6))))
    return best


def model_table(float_model: onnx.ModelProto, int8_model: onnx.ModelProto, feed: dict, folded: dict, model_id: str,
                repeats: int = 5) -> dict:
    """The table of one model: every node's int8 time (in the all-int8 model) and float time (in the float model),
    measured in place on one row, so onnxruntime's layout choices and fusions around each node are the real ones;
    conversions and call costs from the shipped table of this CPU family."""
    times = _node_times({"float": float_model, "int8": int8_model}, float_model, feed, folded, repeats)
    fl, q8 = times["float"], times["int8"]
    base = kernels.shipped().data
    nodes = {n: [round(q8.get(n, 0.0), 1), round(fl.get(n, 0.0), 1)] for n in sorted(set(fl) | set(q8))}
    data = kernels.new_table(name=f"measured for this model: {kernels.cpu_family()}, 1 thread", ops=base["ops"],
                             per_element=base["per_element"], call_ns=base["call_ns"], measured=True)
    data.update({"model_id": model_id, "feed": {k: list(np.shape(v)) for k, v in sorted(feed.items())}, "nodes": nodes})
    return data
