"""Bias correction: quantizing a layer's weights and input shifts the mean of its output; add the shift back.

Targets: every quantized Conv, Gemm and MatMul (whose bias is the Add after it). Two ways to measure, both on the
calibration rows and both leaving only per-channel sums the runtime computes in-graph (memory stays one batch):

- ``full`` (Nagel et al. 2019's empirical correction, NNCF's BiasCorrection): the int8 model itself, layer by
  layer in graph order, each layer's shift measured with every earlier layer already corrected, so the error a
  layer inherits (an earlier output's rounding, which on a white page is the same for every pixel and reaches
  the next depthwise kernel 9 times) is corrected too. The corrections so far are fed as inputs (``+ delta``
  after each layer); layers no path connects (a level) are measured in one run; each level runs only its own
  segment of the int8 model, from the values of the segments before it, cached per row: about one int8 pass per
  row in all, with exactly the values of whole runs (YOLOv8n at 1024x1024: 75 -> 4.9 s). The default with
  calibration rows: YOLOv8n DocLayNet 64.6% -> 86.0% of fp32's detections kept,
  PicoDet 31.2% -> 50.4%, the text detector 92.9 -> 95.4 IoU (bench_ledger.py).
- ``fast`` (NNCF's FastBiasCorrection): the float model with an int8 twin of each layer beside it (the op on
  the fake-quantized float input with the dequantized weight and bias), all layers in one pass. Cheaper, but
  blind to inherited error: on PicoDet it measured worse than none (26.5% vs 31.2% of detections kept).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qconv.graph import (FLOAT, Graph, ai_onnx_opset, attr, constant_tensors, ensure_opset, subgraph_inputs, submodel, tensor_array,
                         topo_sort)
from qconv.numeric import qmath, rounding
from qconv.plan import QuantPlan, TensorPlan
from qconv.rewrite.qdq import activation_pair
from qconv.runtime import run, session

OPS = ("Conv", "Gemm", "MatMul")
MAX_ROWS = 256  # fast: feeds beyond these change the means by less than their noise (NNCF uses 100)
FULL_ROWS = 8  # full: one run per layer and row; the inherited shifts it corrects are the same in every row


@dataclass(frozen=True)
class Target:
    """One layer to correct: where its bias lives, and whether the correction has to add one."""

    node: str
    op: str
    x: str  # the activation input (quantized in the plan)
    w: str  # the constant weight
    bias: str  # the float tensor the shift is added to: the node's bias, a new one, or the Add's constant after a MatMul
    added: bool  # the node had no bias: the correction adds it (and the plan an int32 TensorPlan for it)
    channels: int
    rank: int = 2  # the weight's rank (a Conv's output rank)


def quantized_layers(model: onnx.ModelProto, plan: QuantPlan):
    """(graph, node, input's plan, weight's plan) of each main-graph Conv/Gemm/MatMul the plan quantizes whose input
    is a quantized activation and whose weight a constant, in graph order: what the weight-level steps adjust."""
    g = Graph(model)
    quantized = {d.name for d in plan.nodes if d.quantized}
    for node in model.graph.node:
        if node.op_type not in OPS or node.domain not in ("", "ai.onnx") or node.name not in quantized or len(node.input) < 2:
            continue
        tx, tw = plan.tensors.get(node.input[0]), plan.tensors.get(node.input[1])
        if tx is None or tw is None or tx.role != "activation" or tw.role != "weight" or not g.is_constant(node.input[1]):
            continue
        yield g, node, tx, tw


def targets(model: onnx.ModelProto, plan: QuantPlan) -> list[Target]:
    """The layers of the main graph bias correction can shift, in graph order."""
    out = []
    for g, node, tx, tw in quantized_layers(model, plan):
        w = node.input[1]
        if node.name not in tx.consumers or node.name not in tw.consumers:
            continue
        ty = plan.tensors.get(node.output[0])
        if plan.config.mode == "int8" and (tx.qparams.qtype.bits > 8 or (ty is not None and ty.qparams.qtype.bits > 8)):
            continue  # a 16-bit island in an int8 model: corrected with it, YOLOv8n's scores collapsed (issue 19 note)
        t = _target(node, g, plan)
        if t is not None:
            out.append(dataclasses.replace(t, rank=g.array(w).ndim))
    return out


def _target(node, g: Graph, plan: QuantPlan) -> Target | None:
    w = g.array(node.input[1])
    if node.op_type == "Conv":
        channels = w.shape[0]
    elif node.op_type == "Gemm":
        if attr(node, "transA", 0) or w.ndim != 2:
            return None
        channels = w.shape[0] if attr(node, "transB", 0) else w.shape[1]
    else:  # MatMul: the bias is the constant of the Add after it (the planner keeps that Add float: exact)
        if w.ndim != 2:
            return None
        channels = w.shape[1]
        add = g.only_consumer(node.output[0])
        if add is None or add.op_type != "Add":
            return None
        other = [i for i in add.input if i != node.output[0]]
        if len(other) != 1 or not g.is_constant(other[0]) or len(g.consumers.get(other[0], [])) != 1:
            return None
        if g.array(other[0]).size != channels or g.array(other[0]).shape[-1] != channels:
            return None
        return Target(node.name, node.op_type, node.input[0], node.input[1], other[0], False, channels)
    if len(node.input) > 2 and node.input[2]:
        b = node.input[2]
        tb = plan.tensors.get(b)
        if not g.is_constant(b) or tb is None or tb.role != "bias" or len(g.consumers.get(b, [])) != 1 or g.array(b).size != channels:
            return None
        return Target(node.name, node.op_type, node.input[0], node.input[1], b, False, channels)
    if node.op_type == "Gemm" and attr(node, "beta", 1.0) != 1.0:
        return None
    return Target(node.name, node.op_type, node.input[0], node.input[1], f"{node.name}.bias_correction", True, channels)


def probe(model: onnx.ModelProto, plan: QuantPlan, found: list[Target]) -> onnx.ModelProto:
    """The float model with every target's twin beside it; outputs (channel sums of twin - float, element count)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = Graph(m)
    opset = ai_onnx_opset(m)
    del m.graph.output[:]
    nodes, inits, outputs = [], [], []
    fq_of: dict[str, str] = {}
    by_name = {n.name: n for n in m.graph.node}
    for t in found:
        node = by_name[t.node]
        if t.x not in fq_of:
            pair, params, fq_of[t.x] = activation_pair(g, plan.tensors[t.x])
            nodes += pair
            inits += params
        tw = plan.tensors[t.w]
        wdq = qmath.dequantize(rounding.integers(g.array(t.w).astype(np.float32), tw.qparams, tw.rounding), tw.qparams)
        w_name = g.unique(f"{t.node}.bc_weight")
        inits.append(numpy_helper.from_array(wdq, w_name))
        ins = [fq_of[t.x], w_name]
        if t.op != "MatMul" and not t.added:
            tb = plan.tensors[t.bias]
            b = g.array(t.bias).astype(np.float32)
            bdq = qmath.dequantize(qmath.quantize(b.reshape(-1), tb.qparams), tb.qparams).reshape(b.shape)
            b_name = g.unique(f"{t.node}.bc_bias")
            inits.append(numpy_helper.from_array(bdq, b_name))
            ins.append(b_name)
        twin = g.unique(f"{t.node}.bc_twin")
        nodes.append(helper.make_node(t.op, ins, [twin], name=g.unique(f"{t.node}.bc_twin_node"), **{a.name: helper.get_attribute_value(a) for a in node.attribute}))
        diff = g.unique(f"{t.node}.bc_diff")
        nodes.append(helper.make_node("Sub", [twin, node.output[0]], [diff], name=g.unique(f"{t.node}.bc_sub")))
        _reduce(nodes, inits, outputs, g, t, diff, opset)
    m.graph.node.extend(nodes)
    m.graph.initializer.extend(inits)
    m.graph.output.extend(outputs)
    if any(n.domain == "com.microsoft" for n in nodes):  # 16-bit Q/DQ below opset 21
        ensure_opset(m, "com.microsoft", 1)
    return m


def rows_of(feed: dict) -> int:
    """Rows in a feed (its first input's leading dimension; 1 for a scalar input, as onnx's test_loop11 feeds)."""
    if not feed:
        return 1
    shape = np.shape(next(iter(feed.values())))
    return int(shape[0]) if shape else 1


def first_rows(feeds: Iterable[dict], max_rows: int, seen: list[int]):
    """The feeds, until they hold ``max_rows`` rows (streamed: never all in memory); each feed's rows go to ``seen``."""
    for feed in feeds:
        yield feed
        seen.append(rows_of(feed))
        if sum(seen) >= max_rows:
            return


def _channel_sums(sess, found: list[Target], feeds: Iterable[dict], fetch: list[str] | None = None, extra: dict | None = None,
                  advance: Callable[[int], None] = lambda n: None) -> list[tuple[np.ndarray, int]]:
    """(channel sums, element count) of each target over ``feeds``: the runs return (sum, size) pairs in ``found``'s order."""
    sums, counts = [np.zeros(t.channels, np.float64) for t in found], [0] * len(found)
    for feed in feeds:
        _add_sums(sums, counts, run(sess, {**feed, **(extra or {})}, fetch))
        advance(1)
    return list(zip(sums, counts))


def _add_sums(sums: list[np.ndarray], counts: list[int], got: list) -> None:
    """Fold one run's (channel sums, element count) pairs, in order, into the running totals."""
    for k in range(len(sums)):
        sums[k] += got[2 * k].astype(np.float64)
        counts[k] += int(got[2 * k + 1])


def _mean(pair: tuple[np.ndarray, int], channels: int) -> np.ndarray:
    s, c = pair
    return s / (c / channels)


def measure(model: onnx.ModelProto, plan: QuantPlan, feeds: Iterable[dict], threads: int | None = None,
            advance: Callable[[int], None] = lambda n: None, max_rows: int = MAX_ROWS) -> tuple[dict[str, np.ndarray], int]:
    """({node: mean over the feeds of (float output - int8 twin output), per output channel}, rows measured)."""
    found = targets(model, plan)
    if not found:
        return {}, 0
    sess = session(probe(model, plan, found), threads)
    seen: list[int] = []
    got = _channel_sums(sess, found, first_rows(feeds, max_rows, seen), advance=advance)
    return {t.node: (-_mean(p, t.channels)).astype(np.float32) for t, p in zip(found, got) if p[1]}, sum(seen)  # float - twin


def measure_full(model: onnx.ModelProto, plan: QuantPlan, feeds: Iterable[dict], threads: int | None = None,
                 advance: Callable[[int], None] = lambda n: None, max_rows: int = FULL_ROWS) -> tuple[dict[str, np.ndarray], int]:
    """({node: float mean - int8 mean, per output channel}, rows measured), layer by layer in the int8 model with the
    corrections of the layers before it in place.

    The int8 model is cut into one segment per level (``segments``): a level's run starts from the values the runs
    before it left, row by row, and runs only the nodes between the previous level and its own layers, so the whole
    measurement costs about one pass of the int8 model per row (onnxruntime runs every node of a session whatever
    outputs are asked for)."""
    from qconv.plan.planner import subplan
    from qconv.rewrite.qdq import apply_qdq

    found = targets(model, plan)
    if not found:
        return {}, 0
    seen: list[int] = []
    rows = list(first_rows(feeds, max_rows, seen))
    reference = _sums(model, found, rows, threads)
    qmodel, _ = apply_qdq(model, subplan(plan))
    m, deltas = _with_deltas(qmodel, found)
    fed = {name: np.zeros(shape, np.float32) for name, shape in deltas.values()}
    groups = levels(found, _out_levels(m, found))
    out: dict[str, np.ndarray] = {}
    cache = [dict(feed) for feed in rows]  # the values later levels read, row by row (first: the graph inputs)
    for level, seg in zip(groups, segments(m, groups)):
        sums = [o for t in level for o in (f"{t.node}.bc_sum", f"{t.node}.bc_size")]
        sess = session(_segment_model(m, seg, {k: v.dtype for k, v in cache[0].items()}, sums), threads)
        totals, counts = [np.zeros(t.channels, np.float64) for t in level], [0] * len(level)
        for values in cache:
            got = run(sess, {**{k: values[k] for k in seg.inputs}, **_inputs_of(sess, fed)}, sums + seg.keep)
            _add_sums(totals, counts, got)
            for name in [k for k in values if k not in seg.later]:
                del values[name]
            values.update(zip(seg.keep, got[len(sums):]))
        for t, pair in zip(level, zip(totals, counts)):  # no layer of a level is upstream of another: corrected together
            shift = (_mean(reference[t.node], t.channels) - _mean(pair, t.channels)).astype(np.float32)
            name, shape = deltas[t.node]
            fed[name] = shift.reshape(shape)
            out[t.node] = shift
        advance(len(level))
    return out, sum(seen)


@dataclass
class Segment:
    """What one level runs: its nodes (indices into the int8 model), the cached values it reads, the values it makes
    that later levels read (``keep``), and every cached value a later level still reads (``later``)."""

    nodes: list[int]
    inputs: list[str]
    keep: list[str]
    later: set[str]


def segments(m: onnx.ModelProto, groups: list[list[Target]]) -> list[Segment]:
    """One segment per level of targets (``groups``, from ``levels``). A layer of level L runs in segment L, every
    other node in the segment of its latest input, where a correction ``+ delta`` of level L counts as made in
    segment L + 1 (it is known once level L is measured). Nodes of constants only (a weight's DequantizeLinear) and an
    activation's DequantizeLinear run in every segment that reads them: onnxruntime then fuses DequantizeLinear -> op
    -> QuantizeLinear into the integer kernel as in a whole run, and only what a whole run computes crosses from one
    segment to the next. A segment keeps only the nodes its level's sums and later segments need."""
    nodes = list(m.graph.node)
    level_of = {t.node: k + 1 for k, group in enumerate(groups) for t in group}
    deltas = {f"{name}.bc_delta": k + 1 for name, k in level_of.items()}
    inits = {t.name for t in m.graph.initializer}
    const = constant_tensors(m)
    made_in: dict[str, int] = {i.name: 1 for i in m.graph.input}
    made_in.update(deltas)
    seg: list[int] = []
    floating: set[int] = set()  # recomputed where read: constants only, and an activation's DequantizeLinear

    def reads(n) -> list[str]:
        return [i for i in list(n.input) + sorted(subgraph_inputs(n)) if i]

    for k, n in enumerate(nodes):
        ins = reads(n)
        if n.op_type == "DequantizeLinear" or all(o in const for o in n.output if o):
            floating.add(k)
        at = level_of.get(n.name) or max([made_in[i] for i in ins if i in made_in] + [1])
        seg.append(at)
        made_in.update((o, at) for o in n.output if o and o not in const)
    producer = {o: k for k, n in enumerate(nodes) for o in n.output if o}
    out: list[Segment] = []
    later: set[str] = set()  # cached values the segments after the current one read
    for s in range(len(groups), 0, -1):
        after = later
        keep = sorted(v for v in after if v in producer and seg[producer[v]] == s)
        chosen: set[int] = set()
        inputs: set[str] = set()
        stack = [o for t in groups[s - 1] for o in (f"{t.node}.bc_sum", f"{t.node}.bc_size")] + keep
        while stack:
            v = stack.pop()
            k = producer.get(v)
            if k is None:
                if v not in inits and v not in deltas:
                    inputs.add(v)  # a graph input
            elif k in floating or seg[k] == s:
                if k not in chosen:
                    chosen.add(k)
                    stack.extend(reads(nodes[k]))
            else:
                inputs.add(v)
        later = (after - {o for k in chosen for o in nodes[k].output}) | inputs
        out.append(Segment(sorted(chosen), sorted(inputs), keep, after))
    return out[::-1]


def _segment_model(m: onnx.ModelProto, seg: Segment, have: dict, sums: list[str]) -> onnx.ModelProto:
    """The nodes of ``seg`` as a model of their own: the cached values it reads as inputs (typed by ``have``, name ->
    dtype), its level's sums and the values later segments read as outputs (the latter untyped: onnxruntime types
    them from the nodes that make them)."""
    g = m.graph
    sub_m = submodel(m, seg.nodes)
    sub = sub_m.graph
    graph_inputs = {i.name: i for i in g.input}
    read = {i for n in sub.node for i in list(n.input) + sorted(subgraph_inputs(n)) if i}
    for name in seg.inputs:
        if name in graph_inputs:
            sub.input.append(graph_inputs[name])
        else:
            sub.input.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(have[name])), None))
    sub.input.extend(i for i in g.input if i.name.endswith(".bc_delta") and i.name in read)
    outputs = {o.name: o for o in g.output}
    sub.output.extend(outputs[name] for name in sums)
    for name in seg.keep:
        sub.output.add().name = name
    return sub_m


def _inputs_of(sess, fed: dict) -> dict:
    names = getattr(sess, "_qconv_inputs", None)
    if names is None:
        names = {i.name for i in sess.get_inputs()}
        sess._qconv_inputs = names
    return {k: v for k, v in fed.items() if k in names}


def _out_levels(m: onnx.ModelProto, found: list[Target]) -> dict[str, int]:
    """Node name -> level of its outputs (how many targets lie on the longest path into them)."""
    targets_ = {t.node for t in found}
    level_of: dict[str, int] = {}
    out: dict[str, int] = {}
    for node in m.graph.node:
        lv = max((level_of.get(i, 0) for i in list(node.input) + sorted(subgraph_inputs(node)) if i), default=0)
        if node.name in targets_:
            lv += 1
        for o in node.output:
            level_of[o] = lv
        out[node.name] = lv
    return out


def levels(found: list[Target], lv: dict[str, int]) -> list[list[Target]]:
    """The targets grouped by how many targets lie on the longest path from the inputs to them (``_out_levels``), in
    graph order: no target of a group is upstream of another."""
    groups: dict[int, list[Target]] = {}
    for t in found:
        groups.setdefault(lv[t.node], []).append(t)
    return [groups[k] for k in sorted(groups)]


def _reduce(nodes: list, inits: list, outputs: list, g: Graph, t: Target, y: str, opset: int) -> None:
    """Nodes that reduce ``y`` (the layer's output) to channel sums and an element count, both graph outputs."""
    if t.op == "Conv":
        axes = [0] + list(range(2, t.rank))
    else:
        shape = numpy_helper.from_array(np.array([-1, t.channels], dtype=np.int64), g.unique(f"{t.node}.bc_shape"))
        inits.append(shape)
        flat = g.unique(f"{t.node}.bc_flat")
        nodes.append(helper.make_node("Reshape", [y, shape.name], [flat], name=g.unique(f"{t.node}.bc_reshape")))
        y, axes = flat, [0]
    sums, size = f"{t.node}.bc_sum", f"{t.node}.bc_size"
    if opset >= 13:
        ax = numpy_helper.from_array(np.array(axes, dtype=np.int64), g.unique(f"{t.node}.bc_axes"))
        inits.append(ax)
        nodes.append(helper.make_node("ReduceSum", [y, ax.name], [sums], name=g.unique(f"{t.node}.bc_reduce"), keepdims=0))
    else:
        nodes.append(helper.make_node("ReduceSum", [y], [sums], name=g.unique(f"{t.node}.bc_reduce"), axes=axes, keepdims=0))
    nodes.append(helper.make_node("Size", [y], [size], name=g.unique(f"{t.node}.bc_count")))
    outputs += [helper.make_tensor_value_info(sums, FLOAT, None), helper.make_tensor_value_info(size, onnx.TensorProto.INT64, None)]


def _sums(model: onnx.ModelProto, found: list[Target], rows: list[dict], threads) -> dict[str, tuple[np.ndarray, int]]:
    """{node: (channel sums, element count)} of each target's output in ``model`` over ``rows``."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = Graph(m)
    nodes, inits, outputs = [], [], []
    by_name = {n.name: n for n in m.graph.node}
    for t in found:
        _reduce(nodes, inits, outputs, g, t, by_name[t.node].output[0], ai_onnx_opset(m))
    del m.graph.output[:]
    m.graph.node.extend(nodes)
    m.graph.initializer.extend(inits)
    m.graph.output.extend(outputs)
    return {t.node: p for t, p in zip(found, _channel_sums(session(m, threads), found, rows))}


def _with_deltas(qmodel: onnx.ModelProto, found: list[Target]) -> tuple[onnx.ModelProto, dict]:
    """The int8 model with, after each target, ``+ delta`` fed as an input (its correction so far), and the channel
    sums of the uncorrected output exposed. Returns the model and {node: (delta input, its shape)}."""
    m = onnx.ModelProto()
    m.CopyFrom(qmodel)
    g = Graph(m)
    opset = ai_onnx_opset(m)
    nodes_by = {n.name: n for n in m.graph.node}
    extra, inits, outputs, deltas = [], [], [], {}
    del m.graph.output[:]
    for t in found:
        node = nodes_by[t.node]
        y = node.output[0]
        raw = g.unique(f"{y}.bc_raw")
        node.output[0] = raw
        shape = [1, t.channels] + [1] * (t.rank - 2) if t.op == "Conv" else [t.channels]
        delta = f"{t.node}.bc_delta"
        m.graph.input.append(helper.make_tensor_value_info(delta, FLOAT, shape))
        extra.append(helper.make_node("Add", [raw, delta], [y], name=g.unique(f"{t.node}.bc_shift")))
        _reduce(extra, inits, outputs, g, t, raw, opset)
        deltas[t.node] = (delta, tuple(shape))
    m.graph.node.extend(extra)
    m.graph.initializer.extend(inits)
    m.graph.output.extend(outputs)
    topo_sort(m)
    return m, deltas


def summary(plan: QuantPlan) -> dict | None:
    """What the report says about the plan's corrections (None when it has none)."""
    if not plan.corrections:
        return None
    largest = max((max(abs(v) for v in c["shift"]) for c in plan.corrections.values() if c["shift"]), default=0.0)
    made = dict(plan.source.get("bias_correction") or {})
    return {"method": made.get("method"), "rows": made.get("rows"), "layers": len(plan.corrections),
            "biases_added": sum(1 for c in plan.corrections.values() if c["added"]), "largest_shift": float(largest)}


def record(plan: QuantPlan, model: onnx.ModelProto, shifts: dict[str, np.ndarray]) -> None:
    """Write the shifts into the plan: ``plan.corrections`` and, for a layer without a bias, its int32 bias plan."""
    by_node = {t.node: t for t in targets(model, plan)}
    outputs = {n.name: n.output[0] for n in model.graph.node if n.name in shifts}
    absorbed = set(plan.folded.values())  # layers whose Relu/Clip their QuantizeLinear took over: quantized outputs
    corrections = {}
    for name, shift in sorted(shifts.items()):
        t = by_node.get(name)
        if t is None:
            continue
        corrections[name] = {"bias": t.bias, "added": t.added, "shift": [float(v) for v in shift]}
        # An added bias is int32 where the layer runs as an int8 kernel (its output quantized); where it runs in float
        # (its output stays float, e.g. a graph output) it stays a float initializer: exact, and no DequantizeLinear.
        if t.added and (outputs.get(name) in plan.tensors or name in absorbed):
            tx, tw = plan.tensors[t.x], plan.tensors[t.w]
            qp = qmath.bias_qparams(shift, float(tx.qparams.scale), tw.qparams.scale)
            plan.tensors[t.bias] = TensorPlan(t.bias, "bias", qp, [name], "bias added by bias correction, int32")
    plan.corrections = corrections


def apply(model: onnx.ModelProto, corrections: dict) -> onnx.ModelProto:
    """A copy of the float model with each correction's shift added to its bias (the bias created where missing)."""
    if not corrections:
        return model
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name: t for t in m.graph.initializer}
    nodes = {n.name: n for n in m.graph.node}
    for name, c in sorted(corrections.items()):
        shift = np.asarray(c["shift"], dtype=np.float32)
        if c.get("added"):
            node = nodes[name]
            m.graph.initializer.append(numpy_helper.from_array(shift, c["bias"]))
            while len(node.input) < 2:
                node.input.append("")
            if len(node.input) == 2:
                node.input.append(c["bias"])
            else:
                node.input[2] = c["bias"]
            continue
        t = inits[c["bias"]]
        b = tensor_array(t).astype(np.float32)
        t.CopyFrom(numpy_helper.from_array((b + shift.reshape(b.shape)).astype(np.float32), t.name))
    return m


def carry(stored: QuantPlan, plan: QuantPlan, model: onnx.ModelProto) -> None:
    """After a stored plan's overrides were edited and it was planned again: keep each correction whose layer is
    still a target quantized exactly as before (same input and weight parameters); the others no longer hold."""
    if not stored.corrections:
        return

    def same(a: TensorPlan | None, b: TensorPlan | None) -> bool:
        return a is not None and b is not None and a.qparams.to_dict() == b.qparams.to_dict()

    kept = {}
    for t in targets(model, plan):
        c = stored.corrections.get(t.node)
        if c is not None and c["bias"] == t.bias and same(stored.tensors.get(t.x), plan.tensors.get(t.x)) \
                and same(stored.tensors.get(t.w), plan.tensors.get(t.w)):
            kept[t.node] = np.asarray(c["shift"], dtype=np.float32)
    record(plan, model, kept)
