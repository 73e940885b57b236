"""Per-node latency of the float and the quantized model, from onnxruntime's own profiler.

``profile`` runs a model on one feed with ``SessionOptions.enable_profiling`` and returns the mean kernel time
of every node onnxruntime executed. onnxruntime renames what it fuses (a QDQ group becomes ``<node>_token_<k>``,
a layout-converted Conv ``<output>_nchwc``); ``attribute`` maps those names back to the nodes of the float
graph, so each quantized node's int8 time can be set against its float time: ``compare`` lists the nodes int8
makes slower on this CPU, and the conversions (QuantizeLinear / DequantizeLinear left between float and int8
regions) next to the nodes whose tensors cross a region boundary.
"""

from __future__ import annotations

import collections
import json
import os
import re
import tempfile
from dataclasses import dataclass

import onnx

from qconv.graph import Graph
from qconv.runtime import run, session

_TOKEN = re.compile(r"_token_\d+$")
_FUSION = re.compile(r"/[A-Za-z]+Fusion$")
CONVERSIONS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")


@dataclass
class NodeTime:
    node: str  # the float graph's node name, or "(layout)" / "(conversion)" / the runtime's name when unknown
    op: str  # the op onnxruntime ran (QLinearConv, FusedConv, Conv, QuantizeLinear, ...)
    us: float  # mean microseconds per run


def profile(model: onnx.ModelProto | str, feed: dict, threads: int = 1, runs: int = 10) -> list[tuple[str, str, float]]:
    """[(runtime node name, op, mean us)] over ``runs`` runs after one warm-up run."""
    with tempfile.TemporaryDirectory(prefix="qconv-profile.") as d:
        sess = session(model, threads, spinning=False, profile_prefix=os.path.join(d, "p"), prepack=True)
        run(sess, feed)
        for _ in range(runs):
            run(sess, feed)
        path = sess.end_profiling()
        with open(path) as f:
            events = json.load(f)
    total: dict[tuple[str, str], float] = collections.defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time"):
            name = e["name"][: -len("_kernel_time")]
            total[(name, str(e.get("args", {}).get("op_name", "")))] += float(e.get("dur", 0.0))
    # the warm-up run is in the trace too: divide by every run it holds
    return [(n, op, us / (runs + 1)) for (n, op), us in total.items()]


def attribute(events: list[tuple[str, str, float]], model: onnx.ModelProto) -> list[NodeTime]:
    """Map runtime node names to the float graph's node names (conversions to the node whose tensor they carry)."""
    g = Graph(model)
    names = {n.name for n in model.graph.node}
    out = []
    for name, op, us in events:
        out.append(NodeTime(_resolve(name, op, names, g), op, us))
    return out


def _resolve(name: str, op: str, names: set[str], g: Graph) -> str:
    if op.startswith("Reorder"):
        return "(layout)"
    base = _TOKEN.sub("", name.removesuffix("/duplicated"))
    base = _FUSION.sub("", base) if base not in names else base  # 'matmul/MatMulAddFusion': MatMul + bias Add as one Gemm
    if base in names:
        return base
    for suffix in ("_nchwc", "_fused", "_QuantizeLinear", "_DequantizeLinear", "_DynamicQuantizeLinear"):
        if base.endswith(suffix):
            tensor = base[: -len(suffix)]
            for tail in ("_quantized", "_dequantized"):
                tensor = tensor[: -len(tail)] if tensor.endswith(tail) else tensor
            producer = g.producer.get(tensor)
            if producer is not None:
                return producer.name
            if tensor in g.graph_inputs:
                return f"(input {tensor})"
    return name


def by_node(times: list[NodeTime], conversions: bool = False) -> dict[str, float]:
    """Microseconds per float-graph node: compute only, or (``conversions``) only Q/DQ work."""
    out: dict[str, float] = collections.defaultdict(float)
    for t in times:
        if (t.op in CONVERSIONS) == conversions:
            out[t.node] += t.us
    return dict(out)


def compare(float_times: list[NodeTime], quant_times: list[NodeTime], quantized: set[str], ops: dict[str, str],
            top: int = 10, margin: float = 1.10, floor_us: float = 5.0) -> dict:
    """The report's profile section: totals, top nodes of each model, and the quantized nodes that run slower
    in int8 than in float (their int8 kernel plus the conversions around it against the float kernel)."""
    f, q, conv = by_node(float_times), by_node(quant_times), by_node(quant_times, conversions=True)
    slower = []
    for node in sorted(quantized):
        if node not in f or node not in q:
            continue
        cost = q[node] + conv.get(node, 0.0)
        if cost > f[node] * margin + floor_us:
            slower.append({"node": node, "op_type": ops.get(node, ""), "float_us": f[node], "int8_us": q[node],
                           "conversions_us": conv.get(node, 0.0), "loss_us": cost - f[node]})
    slower.sort(key=lambda r: -r["loss_us"])

    def ranked(d: dict[str, float]) -> list[dict]:
        return [{"node": k, "op_type": ops.get(k, ""), "us": v} for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]]

    return {
        "float_us": sum(t.us for t in float_times), "quantized_us": sum(t.us for t in quant_times),
        "conversions_us": sum(conv.values()),
        "layout_us": {"float": f.get("(layout)", 0.0), "quantized": q.get("(layout)", 0.0)},
        "float_top": ranked(f), "quantized_top": ranked(q), "conversions_top": ranked(conv),
        "slower_in_int8": slower,
    }
