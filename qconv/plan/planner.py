"""graph + calibration ranges + config (+ overrides) -> QuantPlan: what gets quantized, with which parameters, and why not.

The static modes (int8, a16w8) are planned here; ``plan_dynamic`` and the fp16 / int4 planners live beside
their rewrites. The reasons a node stays float carry a code (``qconv.plan.GROUPS``) so the report can
group them the way a user reads them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import onnx

from qconv.calib.ranges import select_range
from qconv.calib.store import Ranges
from qconv.errors import QconvError
from qconv.graph import Graph, attr, integer_only, subgraphs
from qconv.numeric import pairs, qmath
from qconv.plan import NodeDecision, QuantPlan, TensorPlan
from qconv.plan.config import QuantConfig
from qconv.plan.overrides import Overrides
from qconv.rewrite import rules
from qconv.rewrite.rules import ANCHORS, OWN, SHARED, recurrent, saturation
from qconv.rewrite.rules.elementwise import scalar_scale

# Activations that a quantized producer's QuantizeLinear can absorb (its clamp is the activation).
FOLDABLE_ACT = {"Relu", "Clip"}
FOLD_PRODUCERS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Mul", "Concat", "AveragePool", "GlobalAveragePool"}
FRAGILE = {
    "Softmax": "numerically fragile: its outputs span orders of magnitude that 8 bits cannot hold",
    "LogSoftmax": "numerically fragile: its outputs span orders of magnitude that 8 bits cannot hold",
    "LayerNormalization": "numerically fragile: normalization divides by a variance that 8 bits distort",
    "InstanceNormalization": "numerically fragile: normalization divides by a variance that 8 bits distort",
    "BatchNormalization": "no int8 kernel in onnxruntime (only a BatchNormalization after a Conv is folded)",
}
MASK_LIMIT = 1e6
MIXED_SCALES = 16.0  # a Concat whose inputs' ranges differ by more than this loses the small ones at one 8-bit scale


def _range_problem(name: str, ranges: dict, nonfinite: dict, op_type: str = "", masks: dict | None = None) -> tuple[str, str] | None:
    """(code, reason) why tensor ``name`` cannot be quantized, if it cannot.

    Tensors with inf/NaN never can. Operands and results of Add/Mul whose values span more than 8 bits
    can hold (values near zero next to values beyond 1e6: -1e9 or finfo.min added to attention scores)
    cannot either: one 8-bit scale would flatten the small values to zero.
    """
    if name not in ranges:
        return "unobserved", f"tensor '{name}' has no calibration statistics (the calibration observed only the tensors the default plan needs)"
    if nonfinite.get(name, 0):
        return "nonfinite", f"tensor '{name}' held {nonfinite[name]} inf/NaN values"
    if op_type in ("Add", "Mul") and name in (masks or {}):
        ratio = masks[name] if isinstance(masks, dict) else None
        detail = f" (max/typical magnitude ratio {ratio:.3g})" if ratio else ""
        return "wide-range", f"tensor '{name}' values span more than 8 bits can hold{detail}"
    return None


@dataclass
class _State:
    """What the node walk has decided so far."""

    decisions: list = field(default_factory=list)
    wanted: dict = field(default_factory=dict)  # tensor -> (role, axis)
    readers: dict = field(default_factory=dict)  # tensor -> node names reading its DQ
    quantized: dict = field(default_factory=dict)  # node name -> node
    forced: set = field(default_factory=set)  # nodes an override quantizes: their output gets Q/DQ too
    available: set = field(default_factory=set)  # outputs of quantized nodes that can carry Q/DQ
    inherited: set = field(default_factory=set)  # outputs of data-movement ops: they take their input's parameters
    wide: set = field(default_factory=set)  # activations an int16 override widens to 16 bits
    recurrent: list = field(default_factory=list)  # LSTM nodes that become DynamicQuantizeLSTM
    scaled: dict = field(default_factory=dict)  # output of a Mul by a positive constant -> (its input, the constant)
    floors: dict = field(default_factory=dict)  # activation -> the value its readers are flat below (saturation.floor_of)
    slower: dict = field(default_factory=dict)  # node -> why int8 is slower there (the kernel cost table's verdict)

    def keep_float(self, node, code: str, reason: str) -> None:
        self.decisions.append(NodeDecision(node.name, node.op_type, "float", reason, code))


def build_plan(model: onnx.ModelProto, ranges: dict[str, tuple[float, float]], config: QuantConfig,
               nonfinite: dict[str, int] | None = None, masks: dict[str, float] | None = None,
               overrides: Overrides | None = None, methods: dict[str, str] | None = None,
               slower: dict[str, str] | None = None) -> QuantPlan:
    """The static plan of the main graph and of every If/Loop/Scan body (their nodes and tensors under scoped
    names, see qconv.graph.subgraphs). ``methods`` names the range method behind each range (default: ``config.method``).
    ``slower``: main-graph nodes kept float because int8 is slower there (qconv.plan.regions), with the reason."""
    overrides = overrides or Overrides()
    p = _plan_graph(model, ranges, config, nonfinite, masks, overrides, methods, slower)
    if not subgraphs.has_bodies(model):
        return p
    for body in subgraphs.bodies(model):
        wrapped, added = subgraphs.body_model(model, body)
        local = {r: _defined_in(r, body, ranges) for r in added}

        def mapped(d: dict | None) -> dict:
            d = d or {}
            out = {}
            prefix = body.scope + subgraphs.SEP
            for k, v in d.items():
                if k.startswith(prefix) and subgraphs.SEP not in k[len(prefix):]:
                    out[k[len(prefix):]] = v
            for r, key in local.items():
                if key in d:
                    out[r] = d[key]
            return out

        bp = _plan_graph(wrapped, mapped(ranges), config, mapped(nonfinite), mapped(masks), ScopedOverrides(overrides, body.scope),
                         mapped(methods))
        merge_body(p, body, bp)
    return p


def merge_body(p: QuantPlan, body, bp: QuantPlan) -> None:
    """Add a body's plan to ``p`` under scoped names (a branch never run says so instead of 'no statistics')."""
    name = body.name
    for d in bp.nodes:
        reason = d.reason
        if d.code == "unobserved":
            reason = (f"{body.op} body '{body.scope}' never ran on the calibration data, so its tensors have no "
                      "statistics: calibrate on data that takes it")
        p.nodes.append(NodeDecision(name(d.name), d.op_type, d.status, reason, d.code))
    for k, t in bp.tensors.items():
        p.tensors[name(k)] = t
    for a, b in bp.folded.items():
        p.folded[name(a)] = name(b)


def _defined_in(ref: str, body, ranges: dict) -> str:
    """The key an outer-scope name read by ``body`` has in the scoped statistics: the innermost enclosing body
    that defines it, else the main graph."""
    for k in range(len(body.path) - 1, 0, -1):
        scope = subgraphs.SEP.join(f"{n}.{a}" for n, a in body.path[:k])
        key = subgraphs.scoped(scope, ref)
        if key in ranges:
            return key
    return ref


class ScopedOverrides:
    """The overrides as a body's planner sees them: node lookups by the scoped name."""

    def __init__(self, overrides: Overrides, scope: str):
        self._o, self._scope = overrides, scope
        self.nodes = overrides.nodes

    def node(self, name: str):
        return self._o.node(subgraphs.scoped(self._scope, name))

    def __bool__(self) -> bool:
        return bool(self._o)


def subplan(p: QuantPlan, scope: str = "") -> QuantPlan:
    """The part of ``p`` for one graph (``scope`` '' is the main graph), under local names: what its rewrite applies."""
    prefix = scope + subgraphs.SEP if scope else ""

    def local(name: str) -> str | None:
        if not name.startswith(prefix):
            return None
        rest = name[len(prefix):]
        return None if subgraphs.SEP in rest else rest

    nodes = [NodeDecision(local(d.name), d.op_type, d.status, d.reason, d.code) for d in p.nodes if local(d.name) is not None]
    tensors = {local(k): t for k, t in p.tensors.items() if local(k) is not None}
    folded = {local(a): local(b) for a, b in p.folded.items() if local(a) is not None}
    return QuantPlan(p.config, nodes, tensors, folded, p.overrides, p.source)


def _plan_graph(model: onnx.ModelProto, ranges: dict[str, tuple[float, float]], config: QuantConfig,
                nonfinite: dict[str, int] | None = None, masks: dict[str, float] | None = None,
                overrides=None, methods: dict[str, str] | None = None, slower: dict[str, str] | None = None) -> QuantPlan:
    """The static plan of one graph."""
    g = Graph(model)
    nonfinite = nonfinite or {}
    overrides = overrides or Overrides()
    ranges = _alias_activation_inputs(model, g, ranges)
    act_q = qmath.qtype(config.act_type)
    w_q = config.weight_qtype
    st = _State()
    st.slower = dict(slower or {})
    if config.floor_ranges is True:  # "auto" is a job's to resolve (it needs rows); unresolved, no floors
        ranges, st.floors = _floored_ranges(g, ranges, act_q, methods or {})
    for node in model.graph.node:
        _decide(node, g, ranges, nonfinite, masks, config, overrides.node(node.name), st)

    # A quantized node's output gets Q/DQ when a quantized node reads it (the pair between two int8 kernels),
    # and always after Conv, whose int8 kernel (QLinearConv) needs it, and after a node an override forces.
    # MatMul and Gemm with a float consumer keep a float output: onnxruntime runs them as
    # MatMulIntegerToFloat / QGemm.
    outputs: dict[str, onnx.NodeProto] = {}
    for node in st.quantized.values():
        out = node.output[0]
        if out in st.available and (node.op_type in ("Conv", "ConvTranspose") or out in st.wanted or node.name in st.forced):
            outputs[out] = node
            st.wanted.setdefault(out, ("activation", None))

    folded = _fold_activations(model, g, st.quantized, outputs, st.wanted, config, st.wide, st.scaled)
    tensors = _qparams(model, g, st, outputs, ranges, folded, config, act_q, w_q, methods or {})
    for node in st.recurrent:
        ov = overrides.node(node.name)
        per_channel = config.per_channel if not (ov and ov.granularity) else ov.granularity == "per-channel"
        for name, qp in recurrent.plan_lstm(node, g, qmath.qtype("int8"), per_channel, config.saturation_safe):
            tensors[f"{node.name}/{name}"] = TensorPlan(name, recurrent.ROLE, qp, [node.name], "LSTM weight, int8 per gate row")
    return QuantPlan(config, st.decisions, tensors, folded, overrides)


TABLE_BYTES = 1 << 20  # a float table at least this large, read only by Gathers that stay float, is stored in 8 bits
TABLE_ORIGIN = "table read only by float Gathers: 8-bit rows, one scale a row, scaled after the gather"
TABLE_NOTE = " (its table is stored in 8 bits, one scale a row)"
_TABLE_KEEPS = ("excluded", "override", "custom-domain", "not-float", "nonfinite")  # a user's float, or not ours to touch


def weight_only_tables(model: onnx.ModelProto, p: QuantPlan) -> list[str]:
    """Store the large float tables of Gathers that stay float (an embedding whose region the kernel cost table keeps
    float, or whose readers are float) as int8 rows with one symmetric scale a row: role ``table`` in ``p``, which the
    rewrite turns into Gather of the integer rows, Gather of their scales, Cast and Mul (standard ops; the whole table
    is never dequantized, only the rows a run reads). One rounding of each value, at most half a step of its own row
    (1/254 of the row's largest): the word embeddings of all-MiniLM-L6-v2 (46.9 MB of its 91 MB) go to 11.8 MB with
    the embedding cosine of its int8 model unchanged (0.98548 -> 0.98552 on 512 lines). A Gather excluded on the
    command line or kept float by an override keeps its float table. Returns the tables."""
    g = Graph(model)
    decided = {d.name: d for d in p.nodes}
    readers: dict[str, list] = {}
    for node in model.graph.node:
        if node.op_type == "Gather" and node.domain in ("", "ai.onnx") and len(node.input) == 2 and g.is_constant(node.input[0]):
            readers.setdefault(node.input[0], []).append(node)
    tables = []
    for name, gathers in sorted(readers.items()):
        init = g.initializers.get(name)
        if init is None or init.data_type != onnx.TensorProto.FLOAT or len(init.dims) != 2 or name in g.pinned \
                or name in g.graph_outputs or int(np.prod(init.dims)) * 4 < TABLE_BYTES:
            continue
        if len(g.consumers.get(name, [])) != len(gathers) or any(attr(n, "axis", 0) not in (0, -2) or g.is_constant(n.input[1])
                                                                for n in gathers):
            continue
        if any(decided.get(n.name) is None or not decided[n.name].kept_float or decided[n.name].code in _TABLE_KEEPS
               for n in gathers):
            continue
        table = g.array(name)  # float32 (checked above), mapped and not copied past 2 GB
        if not np.all(np.isfinite(table)):
            continue
        qp = qmath.weight_qparams(table, qmath.qtype("int8"), True, 0)
        p.tensors[name] = TensorPlan(name, "table", qp, sorted(n.name for n in gathers), TABLE_ORIGIN)
        for n in gathers:
            if TABLE_NOTE not in decided[n.name].reason:
                decided[n.name].reason += TABLE_NOTE
        tables.append(name)
    return tables


def _decide(node, g: Graph, ranges, nonfinite, masks, config: QuantConfig, ov, st: _State) -> None:
    """Decide one node (graph order: its producers are decided) and record what it needs."""
    precision = ov.precision if ov else None
    forced = precision in ("int8", "int16")
    if _decided_early(node, g, config, precision, forced, st):
        return
    per_channel = config.per_channel if not (ov and ov.granularity) else ov.granularity == "per-channel"
    spec = rules.spec(node, g, per_channel)
    if isinstance(spec, str):
        return st.keep_float(node, "unsupported", spec)
    if not forced and node.op_type in SHARED and node.output and _leaves_int8(node.output[0], g):
        return st.keep_float(node, "inputs-float", "data movement on its way to a graph output: int8 gains nothing here, and "
                                                   "quantizing its input would round the model's output to 8 bits")
    if not forced:
        cost = _cost_problem(node, spec, g, st.available, st.quantized)
        if cost:
            return st.keep_float(node, *cost)
    problem = None
    for k, role, _ in spec:
        if role == "activation" and node.input[k] not in st.inherited:
            problem = problem or _range_problem(node.input[k], ranges, nonfinite, node.op_type, masks)
    scale = scalar_scale(node, g) if not forced else None
    if scale is not None and node.input[scale[0]] in st.available and not problem:
        return _take_scaled(node, g, scale, st)
    if node.op_type in ("Add", "Mul"):
        problem = problem or _range_problem(node.output[0], ranges, nonfinite, node.op_type, masks)
    if not problem and node.op_type == "Concat" and not forced:
        problem = _mixed_scales(node, g, ranges)
    if problem:
        return st.keep_float(node, *problem)
    _take(node, g, spec, precision, ranges, nonfinite, st)


def _decided_early(node, g: Graph, config: QuantConfig, precision, forced: bool, st: _State) -> bool:
    """Integer nodes, exclusions, float overrides, recurrent ops and nodes with a known problem: decided before their
    quantization spec is looked at (True when decided)."""
    if integer_only(node, g):
        st.decisions.append(NodeDecision(node.name, node.op_type, "integer", "integer output (shape or index math): nothing to quantize"))
        return True
    excluded = config.excluded(node.name, node.op_type)
    if excluded and precision in (None, "float"):
        st.keep_float(node, "excluded", excluded)
    elif precision == "float":
        st.keep_float(node, "override", "kept float by the plan's override")
    elif node.name in st.slower and precision is None:
        st.keep_float(node, "speed", st.slower[node.name])
    elif node.op_type == "LSTM" and not forced:  # no static int8 kernel: int8 weights, run-time activations
        problem = recurrent.lstm_problem(node, g)
        if problem:
            st.keep_float(node, "unsupported", problem)
        else:
            st.decisions.append(NodeDecision(node.name, node.op_type, "quantized",
                                             "int8 weights, activations quantized at run time (DynamicQuantizeLSTM)"))
            st.recurrent.append(node)
    elif node.op_type == "GRU":
        st.keep_float(node, "no-kernel", recurrent.GRU_REASON)
    else:
        found = _node_problem(node, g, forced)
        if not found:
            return False
        st.keep_float(node, *found)
    return True


def _take_scaled(node, g: Graph, scale: tuple[int, float], st: _State) -> None:
    """A multiplication by a scalar constant whose input is int8: read as the input with a scaled scale."""
    st.scaled[node.output[0]] = (node.input[scale[0]], scale[1])
    st.decisions.append(NodeDecision(node.name, node.op_type, "quantized",
                                     f"multiplies by the constant {scale[1]:.6g}: its input's int8 values are read with the scale "
                                     "times that constant (exact, no kernel runs)"))
    st.quantized[node.name] = node
    out = node.output[0]
    if out and out not in g.graph_outputs:
        st.available.add(out)
        st.inherited.add(out)
    st.wanted.setdefault(node.input[scale[0]], ("activation", None))  # the constant folds into the scale
    st.readers.setdefault(node.input[scale[0]], []).append(node.name)


def _take(node, g: Graph, spec, precision, ranges, nonfinite, st: _State) -> None:
    """Quantize the node: record it, what its output makes available to its readers, and the tensors it needs."""
    forced = precision in ("int8", "int16")
    reason = f"quantized by the plan's override ({precision})" if forced else ""
    st.decisions.append(NodeDecision(node.name, node.op_type, "quantized", reason))
    st.quantized[node.name] = node
    if forced:
        st.forced.add(node.name)
    out = node.output[0]
    if out and out not in g.graph_outputs and g.is_float(out):
        # A data-movement op's output takes its input's parameters: it needs no range of its own.
        if node.op_type in SHARED and (node.input[0] in st.available or g.is_constant(node.input[0])):
            st.available.add(out)
            st.inherited.add(out)
        elif not _range_problem(out, ranges, nonfinite):
            st.available.add(out)
    for k, role, axis in spec:
        st.wanted.setdefault(node.input[k], (role, axis))
        st.readers.setdefault(node.input[k], []).append(node.name)
        if precision == "int16" and role == "activation":
            st.wide.add(node.input[k])
    if precision == "int16" and out:
        st.wide.add(out)


def _mixed_scales(node, g: Graph, ranges: dict) -> tuple[str, str] | None:
    """A Concat that joins tensors of very different ranges (box coordinates in pixels next to class scores in
    [0, 1], as a YOLO head's output) and whose result leaves the int8 region (a graph output, or read only by
    ops without an int8 kernel): one output scale would round the small-range inputs to a few levels. Kept
    float, each input keeps its own scale. A Concat feeding a Conv gains nothing from this: the Conv quantizes
    its input at one scale anyway."""
    if not _leaves_int8(node.output[0], g):
        return None
    spans = {}
    for i in node.input:
        if i in ranges and not g.is_constant(i):
            lo, hi = ranges[i]
            spans[i] = max(abs(lo), abs(hi))
    spans = {k: v for k, v in spans.items() if v > 0}
    if len(spans) < 2:
        return None
    big, small = max(spans, key=spans.get), min(spans, key=spans.get)
    ratio = spans[big] / spans[small]
    if ratio <= MIXED_SCALES:
        return None
    return "mixed-scales", (f"joins '{big}' (up to {spans[big]:.3g}) and '{small}' (up to {spans[small]:.3g}), {ratio:.0f}x apart: "
                            "one 8-bit scale would erase the smaller, so each keeps its own")


def _leaves_int8(name: str, g: Graph, depth: int = 0) -> bool:
    """``name`` reaches only graph outputs or ops without an int8 kernel (through data movement)."""
    if name in g.graph_outputs:
        return True
    readers = g.consumers.get(name, [])
    if not readers or depth > 16:
        return False
    for c in readers:
        if c.op_type in SHARED:
            if not _leaves_int8(c.output[0], g, depth + 1):
                return False
        elif c.op_type in OWN:
            return False
    return True


def _floored_ranges(g: Graph, ranges: dict, act_q: qmath.QType, methods: dict) -> tuple[dict, dict]:
    """Ranges cut at the floor below which every reader is flat (e.g. -3 before a hard-swish): exact, finer steps.
    A range an override set stays as given."""
    out, floors = dict(ranges), {}
    for name, (lo, hi) in ranges.items():
        if lo >= 0.0 or methods.get(name) == "explicit":
            continue
        t = saturation.floor_of(name, g)
        low = saturation.floored(lo, hi, t, 2 ** act_q.bits)
        if low != lo:
            out[name], floors[name] = (low, hi), t
    return out, floors


def _alias_activation_inputs(model, g: Graph, ranges: dict) -> dict:
    """A Relu/Clip input read by nothing else can use the Relu's output range (calibration skips it).

    When the Relu is folded the input is never quantized; when it is not, clipping the input to the
    Relu's output range changes nothing the Relu lets through.
    """
    out = dict(ranges)
    for node in model.graph.node:
        if node.op_type in FOLDABLE_ACT and node.output[0] in ranges and node.input[0] not in ranges:
            if g.only_consumer(node.input[0]) is node and g.producer.get(node.input[0]) is not None:
                const_bounds = all(not i or g.is_constant(i) for i in node.input[1:])
                if node.op_type == "Relu" or (const_bounds and _clip_bounds(node, g)[0] <= 0.0):
                    out[node.input[0]] = ranges[node.output[0]]
    return out


def _cost_problem(node, spec, g: Graph, available: set[str], quantized_nodes) -> tuple[str, str] | None:
    """(code, reason) why quantizing ``node`` would cost more than it gains, if it would.

    Conv, ConvTranspose, MatMul and Gemm always gain (int8 kernels). Any other op gains only when its
    inputs are already quantized: otherwise it would add conversions around an op as fast in float.
    A bias Add right after a quantized MatMul/Gemm stays float: onnxruntime fuses it into
    MatMulIntegerToFloat, and a float bias is exact where an int8 one is not.
    """
    if node.op_type in ANCHORS:
        return None
    if node.op_type == "Add":
        consts = [i for i in node.input if g.is_constant(i)]
        other = [i for i in node.input if not g.is_constant(i)]
        producer = g.producer.get(other[0]) if len(other) == 1 and consts else None
        if producer is not None and producer.name in quantized_nodes and producer.op_type in ("MatMul", "Gemm"):
            return "bias-add", f"bias Add after the quantized {producer.op_type} '{producer.name}': onnxruntime fuses it with an exact float bias"
    for k, role, _ in spec:
        if role == "activation" and node.input[k] not in available:
            src = g.producer.get(node.input[k])
            whence = f"from {src.op_type} '{src.name}'" if src is not None else "a graph input"
            return "inputs-float", f"input '{node.input[k]}' ({whence}) stays float, so no int8 kernel gains from converting it"
    return None


def calibration_targets(model: onnx.ModelProto, config: QuantConfig, candidates: list[str],
                        overrides: Overrides | None = None) -> list[str]:
    """The activations whose ranges the plan can use: the only tensors calibration needs to observe.

    Planned with every candidate assumed to have a clean range, so masks and inf are still found (the
    tensors they would touch are observed). Conv outputs a Relu absorbs are left out (the plan gives them
    the Relu's range): they are the bulk of a CNN's activations. Outputs of data-movement ops are kept:
    if real ranges make their input float, the next layer needs their own range.
    """
    plan = build_plan(model, {n: (0.0, 1.0) for n in candidates}, config, overrides=overrides)
    needed = {n for n, t in plan.tensors.items() if t.role == "activation"}
    if subgraphs.has_bodies(model):  # a body's outer-scope input is observed where it is defined
        for body in subgraphs.bodies(model):
            wrapped, added = subgraphs.body_model(model, body)
            for r in added:
                if body.name(r) in needed:
                    needed.add(_defined_in(r, body, {n: None for n in candidates}))
            for node in wrapped.graph.node:
                d = plan.decision(body.name(node.name))
                if node.op_type in ("Add", "Mul") and d is not None and d.quantized:
                    needed.add(body.name(node.output[0]))
    # The graph outputs are always observed (integer I/O needs their ranges), whatever the options the statistics
    # were made with, so one calibration file serves every `quantize` option; they are few and small.
    needed |= {o.name for o in model.graph.output}
    # A quantized Add/Mul's result is range-checked (masks) even when no quantized node reads it.
    g = Graph(model)
    needed |= {g.producer[o].output[0] for o in g.producer
               if g.producer[o].op_type in ("Add", "Mul") and plan.decision(g.producer[o].name) is not None
               and plan.decision(g.producer[o].name).quantized}
    return [n for n in candidates if n in needed]




def _node_problem(node, g: Graph, forced: bool = False) -> tuple[str, str] | None:
    """(code, reason) why the op itself stays float; ``forced`` (an override) skips the kernel checks."""
    if node.domain not in ("", "ai.onnx"):
        return "custom-domain", f"custom-domain op ({node.domain}) is left as it is"
    if not forced and node.op_type in FRAGILE:
        return "fragile", FRAGILE[node.op_type]
    if not forced and node.op_type not in SHARED and node.op_type not in OWN:
        return "no-kernel", f"no int8 kernel for {node.op_type} in onnxruntime's CPU provider"
    first = node.input[0] if node.input else ""
    if not first or not (g.is_float(first) or (node.op_type == "Gather" and g.is_constant(first))):
        return "not-float", "input is not float32"
    if node.op_type in ("Add", "Mul"):
        for i in node.input:
            if g.is_constant(i):
                c = g.array(i)
                if c.dtype != np.float32 or not np.all(np.isfinite(c)):
                    return "nonfinite", f"operand '{i}' holds inf/NaN or non-float32 constants"
                big = float(np.abs(c).max()) if c.size else 0.0
                if big >= MASK_LIMIT:
                    return "wide-range", f"constant operand '{i}' values span more than 8 bits can hold (|x| up to {big:.3g})"
    return None


def _fold_activations(model, g: Graph, quantized_nodes, outputs, wanted, config, wide: set, scaled=()) -> dict[str, str]:
    """Relu/Clip right after a quantized op: drop them, their QuantizeLinear clamps the same way (not after a Mul
    folded into a scale: no QuantizeLinear runs there)."""
    folded = {}
    if config.symmetric_activations:
        return folded
    for node in model.graph.node:
        if node.op_type not in FOLDABLE_ACT or node.name not in quantized_nodes:
            continue
        x, y = node.input[0], node.output[0]
        producer = g.producer.get(x)
        if (
            producer is None or producer.name not in quantized_nodes or producer.op_type not in FOLD_PRODUCERS or x in scaled
            or g.only_consumer(x) is not node or y not in outputs
        ):
            continue
        if node.op_type == "Clip":
            lo, hi = _clip_bounds(node, g)
            if not lo <= 0.0 <= hi:
                continue
        folded[node.name] = producer.name
        wanted.pop(x, None)
        if x in wide:  # the activation's output now carries the producer's 16-bit quantization
            wide.add(y)
    return folded


def _clip_bounds(node, g: Graph) -> tuple[float, float]:
    lo, hi = attr(node, "min", float("-inf")), attr(node, "max", float("inf"))
    if len(node.input) > 1 and node.input[1]:
        lo = float(g.array(node.input[1]))
    if len(node.input) > 2 and node.input[2]:
        hi = float(g.array(node.input[2]))
    return lo, hi


def wide_type(act_q: qmath.QType) -> qmath.QType:
    """The 16-bit activation type an int16 override uses: unsigned stays unsigned."""
    return qmath.qtype("int16" if act_q.signed else "uint16")


def _qparams(model, g: Graph, st: _State, outputs, ranges, folded, config, act_q, w_q, methods) -> dict[str, TensorPlan]:
    plans: dict[str, TensorPlan] = {}
    wanted, readers = st.wanted, st.readers
    sym_a = config.symmetric_activations

    def act_params(name: str) -> tuple[qmath.QParams, str, str, tuple | None]:
        node = outputs.get(name)
        wide = name in st.wide and act_q.bits <= 8
        if name in st.scaled and st.scaled[name][0] in plans and not wide:
            src, c = plans[st.scaled[name][0]], st.scaled[name][1]
            qp = qmath.QParams(np.float32(src.qparams.scale * np.float32(c)), src.qparams.zero_point, src.qparams.qtype, None)
            rng = None if src.range is None else (src.range[0] * c, src.range[1] * c)
            return qp, f"the parameters of '{src.name}' with the scale times {c:.6g}", src.method, rng
        if node is not None and node.op_type in SHARED and node.input[0] in plans:
            src = plans[node.input[0]]
            if not wide or src.qparams.qtype.bits > 8:
                return src.qparams, f"shares the parameters of '{src.name}'", src.method, src.range
            if name not in ranges and src.range is not None:  # a data-movement output lies within its input's range
                lo, hi = src.range
                return qmath.choose_qparams(lo, hi, wide_type(act_q), sym_a), f"the range of '{src.name}'", src.method, (lo, hi)
        lo, hi = ranges[name]
        qt = wide_type(act_q) if wide else act_q
        method = methods.get(name, config.method)
        origin = {"explicit": "range set by override",
                  "output": "range chosen for the least error at its readers' outputs (--ranges output)",
                  "smoothquant": "range chosen with its SmoothQuant scales for the least error at its reader's output"}.get(method, "calibrated range")
        if name in st.floors:
            origin += f", floored at {st.floors[name]:.6g} (every reader is flat below it)"
        return qmath.choose_qparams(lo, hi, qt, sym_a), origin, method, (lo, hi)

    # Graph order, so a shared-parameter op's input is planned before its output.
    order = list(g.graph_inputs) + [o for n in model.graph.node for o in list(n.input) + list(n.output)]
    for name in dict.fromkeys(order):
        if name not in wanted:
            continue
        role, axis = wanted[name]
        method, rng = "", None
        if role == "activation":
            qp, origin, method, rng = act_params(name)
        elif role == "const":
            arr = g.array(name).astype(np.float32)
            qp = qmath.choose_qparams(float(arr.min()) if arr.size else 0.0, float(arr.max()) if arr.size else 0.0, act_q, sym_a)
            origin = "constant operand"
        elif role == "weight":
            qp = qmath.weight_qparams(g.array(name), w_q, config.symmetric_weights, axis)
            origin = "weight, per-channel" if axis is not None else "weight, per-tensor"
            qp, origin = pair_safe(qp, g.array(name), [st.quantized[r] for r in readers.get(name, []) if r in st.quantized],
                                   config, origin, st.wide)
        else:
            continue  # biases after their inputs and weights
        plans[name] = TensorPlan(name, role, qp, list(readers.get(name, [])), origin, method, rng)

    for name, (role, _) in wanted.items():
        if role == "bias":
            _bias_plan(model, g, name, readers[name], plans, config)
    return plans


def weight_layout(node: onnx.NodeProto) -> str | None:
    """How an int8 kernel reads this node's weight (qconv.numeric.pairs): conv, kn, nk; None: no u8 x s8 kernel."""
    if node.op_type == "Conv":
        return "conv"
    if node.op_type == "Gemm":
        return "nk" if attr(node, "transB", 0) else "kn"
    if node.op_type == "MatMul":
        return "kn"
    return None


def pair_safe(qp: qmath.QParams, w: np.ndarray, readers: list, config, origin: str, wide=()) -> tuple[qmath.QParams, str]:
    """The weight's parameters with each channel's scale widened just enough that no two adjacent int8 weights of
    one sign can saturate the 16-bit sums of x86 CPUs without VNNI (qconv.numeric.pairs), for every reader's layout;
    unchanged with --allow-saturation and for readers whose input is 16-bit (a16w8, islands: run in float)."""
    if not config.saturation_safe or qmath.qtype(config.act_type).bits > 8:
        return qp, origin
    per_channel = qp.scale.size > 1
    widest = qp
    for node in readers:
        layout = weight_layout(node)
        rows = pairs.channels(w, layout, int(attr(node, "group", 1))) if layout and node.input[0] not in wide else None
        if rows is None:
            continue
        aligned = per_channel and rows.shape[0] == qp.scale.size
        safe = pairs.safe_params(qp if aligned else dataclasses.replace(qp, scale=np.float32(qp.scale.max())), rows, aligned)
        widest = dataclasses.replace(widest, scale=np.maximum(widest.scale, safe.scale).astype(np.float32))
    changed = int(np.count_nonzero(widest.scale != qp.scale))
    if not changed:
        return qp, origin
    what = f"{changed} of {qp.scale.size} channels' scales" if per_channel else "its scale"
    return widest, f"{origin}, {what} {pairs.WIDENED}"


def _bias_plan(model, g: Graph, name: str, readers: list[str], plans: dict[str, TensorPlan], config) -> None:
    """An int32 bias at the input's scale times the weight's (the weight's scale widened where the bias would not fit)."""
    node = next(n for n in model.graph.node if n.name in readers)
    x, w = node.input[0], node.input[1]
    if x not in plans or w not in plans:
        return
    bias = g.array(name).reshape(-1)  # a Gemm's C may be (1, N)
    wp = plans[w].qparams
    if config.symmetric_weights:
        widened = qmath.widen_weight_scale_for_bias(bias, float(plans[x].qparams.scale), wp.scale)
        if wp.scale.ndim == 0:
            widened = np.float32(widened.max())
        if not np.array_equal(widened, wp.scale):
            wp = qmath.QParams(widened, wp.zero_point, wp.qtype, wp.axis)
            plans[w] = TensorPlan(w, "weight", wp, plans[w].consumers, plans[w].origin + ", widened for int32 bias")
    plans[name] = TensorPlan(name, "bias", qmath.bias_qparams(bias, float(plans[x].qparams.scale), wp.scale), list(readers), "bias, int32")


def activation_ranges(stats: Ranges, config: QuantConfig, overrides: Overrides | None = None) -> tuple[dict, dict]:
    """(ranges, methods) of every observed activation by ``config.method``, with tensor overrides applied.

    A method override needs the observers' histograms, a range override nothing. ``methods`` names the method of
    each overridden tensor ("explicit" for a set range).
    """
    ranges = stats.select(config.method, config.symmetric_activations, config.percentile)
    methods: dict[str, str] = {}
    for name, r in sorted((stats.refined or {}).items()):  # --ranges output (qconv.adjust.clip)
        ranges[name], methods[name] = r, "output"
    for name, t in sorted((overrides or Overrides()).tensors.items()):
        if t.range is not None:
            ranges[name], methods[name] = t.range, "explicit"
            continue
        obs = stats.observers.get(name)
        if obs is None or not obs.seen_finite:
            raise QconvError(f"override for tensor '{name}' asks for method {t.method}, but the calibration has no statistics "
                             "of it: re-run qconv calibrate with --all-tensors, or give its range")
        pct = config.percentile if t.percentile is None else t.percentile
        ranges[name] = select_range(obs, t.method, config.symmetric_activations, pct)
        methods[name] = t.method if t.method != "percentile" else f"percentile {pct:g}"
    return ranges, methods
