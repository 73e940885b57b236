"""Convert a float32 model to float16: weights stored and compute run in float16, float32 kept where float16 is wrong.

``convert_fp16`` is a pure function: it returns a new model plus what it could not convert and why.

* Every node that reads or writes float tensors runs in float16 unless a rule below keeps it in float32.
  Casts are inserted only where a float32 and a float16 region meet: one Cast per tensor and direction,
  and never a Cast fed by a Cast (the new Cast reads the first one's input instead).
* Constants are never clamped. A constant with a finite |x| > 65504 (a -3.4e38 or -1e9 attention mask)
  stays float32 and is listed in ``overflow``; its readers, and everything downstream that can carry such
  values, stay float32 until an op with a bounded output (Softmax, Sigmoid, ...). Masked positions stay
  exactly masked instead of becoming -inf (and NaN for rows that are all padding).
* A constant with nonzero |x| < 2**-24 (float16's smallest subnormal) is listed in ``underflow``: those
  elements become 0 or 2**-24. It is converted, unless every nonzero element underflows (an epsilon of
  1e-12 would become 0 and divide by zero): then the constant stays float32, and so does what it feeds
  until that meets another activation (Add(|x|, eps) -> Div(x, .) stays float32 through the Div).
* The ONNX schema decides per type variable: inputs typed float-only (Resize 'scales', Range,
  NonMaxSuppression, ai.onnx.ml ops) stay float32, the rest of the node converts.
* Float values computed only from integers (a Cast from an integer type: shapes, positions, counts, masks)
  stay float32: float16 holds integers exactly only up to 2048, and shape math feeding Reshape or Resize
  must stay exact.
* Ops whose result routinely exceeds 65504 though their inputs do not (sums and products over an axis,
  Exp, Pow, x*x) stay float32, as in PyTorch autocast's float32 list, and so does what they feed until it
  meets another activation: Pow -> ReduceMean -> Add(eps) -> Sqrt -> Div(x - mean, .) stays float32
  through the Div, whose result is back at activation scale. A Cast right after the Pow would overflow.
* If/Loop/Scan stay float32 with their bodies; outer tensors a body reads keep float32 under their name.
* Constant nodes are turned into initializers first (as ``qconv.graph.intake`` does), so they convert like weights.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from itertools import chain

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qconv.graph import FLOAT_TYPES, Graph, attr, compacted, subgraph_inputs, topo_sort
from qconv.graph.intake import constants_to_initializers, infer_types
from qconv.plan.names import first_match

FLOAT, FLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16
FP16_MAX = 65504.0
FP16_TINY = 2.0**-24  # smallest positive float16 (subnormal)
_SUFFIX = {FLOAT: "fp32", FLOAT16: "fp16"}

_SUM = "a sum over an axis can exceed float16's maximum 65504"
_GROWS = {  # their float32 region runs on until the result meets another activation (see _Planner._propagate)
    "ReduceSum": _SUM,
    "ReduceSumSquare": _SUM,
    "ReduceL1": _SUM,
    "CumSum": _SUM,
    "ReduceProd": "a product over an axis can exceed float16's maximum 65504",
    "Exp": "exp(x) exceeds float16's maximum 65504 for x > 11.1",
    "Pow": "powers exceed float16's maximum 65504 quickly (x**2 for |x| > 256)",
}
_SQUARE = "x*x exceeds float16's maximum 65504 for |x| > 256"
_FROM_INTEGERS = "computes on values cast from integers (shapes, positions, counts); float16 is exact only up to 2048"
# Ops whose output stays in a small range whatever their input: values beyond float16's range stop here.
_BOUNDED = {"Softmax", "Sigmoid", "Tanh", "Erf", "HardSigmoid", "Softsign", "Sin", "Cos"}
# Ops that read any float type alike and output no float: they read a tensor as it is, never through a Cast.
_TYPE_BLIND = {"Shape", "Size"}
# Derived by experiment with onnxruntime 1.31 on x86-64: every single-node case of onnx's backend test
# generators (onnx.backend.test.case.node) with float inputs was retyped to float16, loaded and run on the
# CPU provider next to its float32 original. Data-movement ops, Clip, Max, Min and LayerNormalization have
# float16 kernels; the math ops (Conv, MatMul, Gemm, Add, Softmax, ...) do not, and onnxruntime's
# InsertCastTransformer runs each region of them in float32 with one Cast at each edge, so they are converted:
# the same file runs float16 kernels on CUDA, DirectML or ARM. Loading failed only where the ONNX schema
# forbids float16 (the schema rule covers it); running failed only for these reductions ("MLFloat16 data type
# is not supported with ScatterElements opset 16 when reduction is 'add'").
_CPU_NO_FP16_REDUCTION = {"ScatterElements", "ScatterND"}
# Found by running every case of onnx's operator suite through fp16 (scripts/sweep_onnx_cases.py): ops that
# must keep float32 whatever their schema allows.
_KEEP_FP32 = {
    "BitCast": "reinterprets the bits of its input: a float16 input would change the result's width",
    "MeanVarianceNormalization": "onnxruntime expands its function body with float32 constants, which a float16 input contradicts",
}
_SEQUENCE_OPS = {"SplitToSequence", "SequenceConstruct", "SequenceInsert", "SequenceAt", "SequenceErase", "SequenceLength",
                 "ConcatFromSequence", "SequenceMap", "SequenceEmpty"}


@dataclass
class Fp16Result:
    """The converted model and what the conversion could not do in float16, by name."""

    model: onnx.ModelProto
    overflow: list[dict]  # {"tensor", "max_abs", "count"}: constants with |x| > 65504, kept float32, never clamped
    underflow: list[dict]  # {"tensor", "min_abs_nonzero", "count"}: constants with nonzero |x| < 2**-24
    kept_float: list[dict]  # {"name", "op_type", "reason"}: nodes left in float32
    converted_nodes: int  # nodes of the input model that now read or write float16


@dataclass
class _Plan:
    """How one node is rewritten."""

    inputs: list  # dtype each input slot must read, or None to leave the slot as it is
    outputs: list  # dtype each output is produced in, or None for non-float outputs
    reason: str | None = None  # why the node stays float32


def convert_fp16(
    model: onnx.ModelProto, keep_io_types: bool = True, block_ops: Iterable[str] = (), block_nodes: Iterable[str] = (),
    float_nodes: Iterable[str] = (),
) -> Fp16Result:
    """Return a float16 copy of ``model``. ``block_ops`` are op types and ``block_nodes`` node-name globs
    (as ``--exclude-nodes``) to keep in float32, ``float_nodes`` exact node names (a plan's decisions);
    ``keep_io_types`` keeps float graph inputs/outputs float32."""
    m, g, nodes, plans, planner, overflow, underflow = _plan_nodes(model, block_ops, block_nodes, float_nodes)
    _Rewriter(m, g, plans, FLOAT if keep_io_types else FLOAT16, planner.types).run()
    kept = [{"name": n.name, "op_type": n.op_type, "reason": p.reason} for n, p in zip(nodes, plans) if p.reason]
    converted = sum(1 for p in plans if not p.reason and FLOAT16 in p.inputs + p.outputs)
    return Fp16Result(compacted(m), overflow, underflow, kept, converted)  # without the float32 weights' bytes


def fp16_decisions(model: onnx.ModelProto, block_ops: Iterable[str] = (), block_nodes: Iterable[str] = (),
                   float_nodes: Iterable[str] = ()) -> list[tuple[onnx.NodeProto, str | None, bool]]:
    """(node, reason it stays float32 or None, whether it touches float data) for every node, without rewriting."""
    _, _, nodes, plans, _, _, _ = _plan_nodes(model, block_ops, block_nodes, float_nodes)
    return [(n, p.reason, any(t is not None for t in p.inputs + p.outputs)) for n, p in zip(nodes, plans)]


def _plan_nodes(model, block_ops, block_nodes, float_nodes):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    constants_to_initializers(m)
    topo_sort(m)
    if _has_untyped_outputs(m):  # normalized models carry value_info already; inference copies every weight
        infer_types(m)
    g = Graph(m)
    overflow, underflow, all_under = _scan_constants(g)
    planner = _Planner(m, g, set(block_ops), tuple(block_nodes), {o["tensor"]: o["max_abs"] for o in overflow}, all_under,
                       set(float_nodes))
    nodes = list(m.graph.node)
    plans = [planner.plan(node) for node in nodes]
    return m, g, nodes, plans, planner, overflow, underflow


def _has_untyped_outputs(m: onnx.ModelProto) -> bool:
    typed = {vi.name for vi in chain(m.graph.value_info, m.graph.output) if vi.type.tensor_type.elem_type}
    return any(o and o not in typed for n in m.graph.node for o in n.output)


def _scan_constants(g: Graph) -> tuple[list[dict], list[dict], set[str]]:
    """Float initializers float16 cannot hold (finite |x| > 65504; nonzero |x| < 2**-24), and those whose
    nonzero values all underflow."""
    overflow, underflow, all_under = [], [], set()
    for name in sorted(g.initializers):
        if not g.is_float(name) or 0 in g.initializers[name].dims:  # empty tensors hold nothing to check
            continue
        a = np.abs(g.array(name))
        if not a.max() <= FP16_MAX:  # also true when a NaN hides the maximum
            big = a[np.isfinite(a) & (a > FP16_MAX)]
            if big.size:
                overflow.append({"tensor": name, "max_abs": float(big.max()), "count": int(big.size)})
        zeros = np.count_nonzero(a == 0)
        if np.count_nonzero(a < FP16_TINY) > zeros:
            tiny = a[(a > 0) & (a < FP16_TINY)]
            underflow.append({"tensor": name, "min_abs_nonzero": float(tiny.min()), "count": int(tiny.size)})
            if tiny.size == a.size - zeros - np.count_nonzero(np.isnan(a)):
                all_under.add(name)
    return overflow, underflow, all_under


def _schema(node: onnx.NodeProto, opsets: dict[str, int]):
    domain = "" if node.domain == "ai.onnx" else node.domain
    try:
        return onnx.defs.get_schema(node.op_type, opsets.get(domain, 1), domain)
    except onnx.defs.SchemaError:
        return None


def _slot_types(params, count: int) -> list[str | None]:
    """The schema's type string ('T' or 'tensor(float)') for each of ``count`` slots."""
    variadic = params and params[-1].option == onnx.defs.OpSchema.FormalParameterOption.Variadic
    return [params[k].type_str if k < len(params) else (params[-1].type_str if variadic else None) for k in range(count)]


def _growth(node: onnx.NodeProto) -> str | None:
    """Why the node's result can leave float16's range although its inputs are in it, or None."""
    if node.op_type == "Mul" and len(node.input) == 2 and node.input[0] == node.input[1]:
        return _SQUARE
    return _GROWS.get(node.op_type)


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


class _Planner:
    """Decides node by node, in topological order, which nodes run in float16 and which dtype each slot takes."""

    def __init__(self, m, g: Graph, block_ops: set, block_nodes: tuple, overflow: dict, all_under: set,
                 float_nodes: set = frozenset()):
        self.g = g
        self.float_nodes = float_nodes
        self.types = dict(g.types)  # original dtypes, completed from schemas as nodes are visited
        self.opsets = {("" if o.domain == "ai.onnx" else o.domain): o.version for o in m.opset_import}
        self.block_ops, self.block_nodes = block_ops, block_nodes
        self.overflow, self.all_under = overflow, all_under
        self.huge = {name: name for name in overflow}  # tensor -> constant whose out-of-range values it carries
        self.scaled: dict[str, str] = {}  # tensor -> what started the float32 region it belongs to
        self.int_sourced: set[str] = set()

    def plan(self, node: onnx.NodeProto) -> _Plan:
        schema = _schema(node, self.opsets)
        ins = _slot_types(schema.inputs, len(node.input)) if schema else [None] * len(node.input)
        outs = _slot_types(schema.outputs, len(node.output)) if schema else [None] * len(node.output)
        self._infer_outputs(node, ins, outs)
        float_in = [k for k, i in enumerate(node.input) if i and self.types.get(i) == FLOAT]
        float_out = [k for k, o in enumerate(node.output) if o and self.types.get(o) == FLOAT]
        implicit = _has_subgraph(node) and any(self.types.get(n) == FLOAT for n in sorted(subgraph_inputs(node)))
        if node.op_type in _TYPE_BLIND or not (float_in or float_out or implicit):
            return _Plan([None] * len(node.input), [None] * len(node.output))
        float_vars = {ins[k] for k in float_in} | {outs[k] for k in float_out}
        eligible = {v for v in float_vars if v and self._allows_fp16(schema, v)}
        reason = self._reason(node, schema, eligible, set(ins), [node.input[k] for k in float_in])
        self._propagate(node, float_in, float_out)
        half = set() if reason else eligible
        is_cast = node.op_type == "Cast"
        return _Plan(
            [None if is_cast or k not in float_in else (FLOAT16 if ins[k] in half else FLOAT) for k in range(len(ins))],
            [None if k not in float_out else (FLOAT16 if outs[k] in half else FLOAT) for k in range(len(outs))],
            reason,
        )

    def _infer_outputs(self, node, ins: list, outs: list) -> None:
        """Fill unknown output dtypes from the type variables the inputs bind (or Cast's 'to')."""
        bound = {v: self.types[i] for v, i in zip(ins, node.input) if v and i in self.types}
        for k, o in enumerate(node.output):
            if o and o not in self.types:
                dtype = attr(node, "to") if node.op_type == "Cast" else bound.get(outs[k])
                if dtype:
                    self.types[o] = dtype

    @staticmethod
    def _allows_fp16(schema, type_str: str) -> bool:
        allowed = {c.type_param_str: c.allowed_type_strs for c in schema.type_constraints}
        return "tensor(float16)" in allowed.get(type_str, [type_str])

    def _reason(self, node, schema, eligible: set, input_vars: set, float_inputs: list) -> str | None:
        """Why ``node`` must stay float32, or None."""
        pattern = first_match(node.name, self.block_nodes)
        if pattern is not None:
            return f"blocked by block_nodes pattern '{pattern}'"
        if node.op_type in self.block_ops:
            return "blocked by block_ops"
        if node.name in self.float_nodes:
            return "kept float32 by the plan"
        if _has_subgraph(node):
            return f"{node.op_type} has a subgraph body; it stays float32 with its body"
        if node.op_type in _KEEP_FP32:
            return _KEEP_FP32[node.op_type]
        if node.op_type in _SEQUENCE_OPS:
            return "sequence-typed values keep float32 (their element type is fixed where the sequence is made)"
        if schema is None:
            return f"no ONNX schema for {node.domain}:{node.op_type}, so float16 support is unknown"
        if not eligible:
            return f"the ONNX schema of {node.op_type}-{schema.since_version} allows no float16 where it takes float"
        if node.op_type != "Cast" and eligible - input_vars:
            return "its float output type is set by an attribute"
        if node.op_type in _CPU_NO_FP16_REDUCTION and attr(node, "reduction", b"none") != b"none":
            return "no float16 kernel in onnxruntime's CPU provider (reduction=" + attr(node, "reduction").decode() + ")"
        return self._value_reason(node, float_inputs) or _growth(node)

    def _value_reason(self, node, float_inputs: list) -> str | None:
        for i in float_inputs:
            if i in self.overflow:
                return f"reads constant '{i}', whose values exceed float16's range (max |x| {self.overflow[i]:.3g})"
            if i in self.huge:
                return f"reads '{i}', which carries values beyond float16's range (from constant '{self.huge[i]}')"
            if i in self.all_under:
                return f"reads constant '{i}', whose nonzero values are all below float16's smallest subnormal 2**-24"
            if i in self.scaled:
                return f"reads '{i}', float32 from {self.scaled[i]} until it meets another activation"
        if self._from_integers(node, float_inputs):
            return _FROM_INTEGERS
        return None

    def _from_integers(self, node, float_inputs: list) -> bool:
        if node.op_type == "Cast":
            src = self.types.get(node.input[0])
            return (src is not None and src not in FLOAT_TYPES) or node.input[0] in self.int_sourced
        computed = [i for i in float_inputs if not self.g.is_constant(i)]
        return bool(computed) and all(i in self.int_sourced for i in computed)

    def _propagate(self, node, float_in: list, float_out: list) -> None:
        """Mark the node's float outputs: computed from integers, carrying out-of-range constants, or in a
        float32 region. Out-of-range values (a -3.4e38 mask) survive Add and Mul, so only an op with a bounded
        output ends their region. A region started by an op that grows values (Pow, ReduceSum, Exp) or by an
        all-underflow epsilon ends at the node combining it with another activation: the normalizing
        Div(x - mean, sqrt(var + eps)) or the residual Add, whose result is back at activation scale."""
        float_inputs = [node.input[k] for k in float_in]
        outputs = [node.output[k] for k in float_out]
        from_integers = self._from_integers(node, float_inputs)
        if from_integers:
            self.int_sourced.update(outputs)
        if node.op_type in _BOUNDED:
            return
        # Clip's bounds limit its output: a -3.4e38 lower bound does not make the output out of range.
        huge = [i for i in float_inputs if i in self.huge and (node.op_type != "Clip" or i == node.input[0])]
        if huge:
            self.huge.update({o: self.huge[huge[0]] for o in outputs})
        origin = self._region_origin(node, float_inputs, from_integers)
        if origin:
            self.scaled.update({o: origin for o in outputs})

    def _region_origin(self, node, float_inputs: list, from_integers: bool) -> str | None:
        tiny = [i for i in float_inputs if i in self.all_under]
        if tiny:
            return f"constant '{tiny[0]}'"
        if _growth(node) and not from_integers:
            return f"{node.op_type} '{node.name}'"
        computed = [i for i in float_inputs if not self.g.is_constant(i)]
        scaled = [i for i in computed if i in self.scaled]
        return self.scaled[scaled[0]] if scaled and len(scaled) == len(computed) else None


class _Rewriter:
    """Applies the plans: retypes weights, I/O and value_info, rewires slots, inserts the boundary Casts."""

    def __init__(self, m, g: Graph, plans: list[_Plan], io_dtype: int, types: dict):
        self.m, self.g, self.plans = m, g, plans
        floats = {n for n, t in types.items() if t == FLOAT}
        self.required = {o.name: io_dtype for o in m.graph.output if o.name in floats}
        self.required.update({n: FLOAT for n in g.pinned & floats})  # subgraph bodies read them as float32
        self.home: dict[str, int] = {}  # dtype each float tensor is produced in
        self.versions: dict[tuple[str, int], str] = {}  # (tensor, dtype) -> name holding it in that dtype
        self.final: dict[str, tuple[int, str]] = {}  # name -> (dtype, original tensor it holds)
        self.cast_input: dict[str, str] = {}  # output of a model Cast -> its input
        self.nodes: list[onnx.NodeProto] = []
        for name in g.graph_inputs:
            if name in floats:
                self._add(name, name, self.required.get(name, io_dtype), home=True)

    def run(self) -> None:
        self._convert_initializers()
        for node, plan in zip(list(self.m.graph.node), self.plans):
            for k, (name, dtype) in enumerate(zip(node.input, plan.inputs)):
                if dtype is not None:
                    node.input[k] = self._version(name, dtype)
                elif name in self.home:  # a Cast or Shape reads any float: take it as produced, never via a Cast
                    node.input[k] = self.versions[(name, self.home[name])]
            self.nodes.append(node)
            for k, dtype in enumerate(plan.outputs):
                if dtype is not None:
                    self._produce(node, k, dtype)
        del self.m.graph.node[:]
        self.m.graph.node.extend(self.nodes)
        _retype_value_info(self.m, self.final)

    def _add(self, tensor: str, name: str, dtype: int, home: bool = False) -> None:
        self.versions[(tensor, dtype)] = name
        self.final[name] = (dtype, tensor)
        if home:
            self.home[tensor] = dtype

    def _convert_initializers(self) -> None:
        demand: dict[str, set] = {}
        for node, plan in zip(self.m.graph.node, self.plans):
            for name, dtype in zip(node.input, plan.inputs):
                if dtype is not None and self.g.is_constant(name):
                    demand.setdefault(name, set()).add(dtype)
        for t in self.m.graph.initializer:
            if t.data_type != FLOAT:
                continue
            dtype = self.required.get(t.name, FLOAT16 if demand.get(t.name) == {FLOAT16} else FLOAT)
            if dtype == FLOAT16:
                t.CopyFrom(numpy_helper.from_array(self.g.array(t.name).astype(np.float16), t.name))
            self._add(t.name, t.name, dtype, home=True)

    def _produce(self, node: onnx.NodeProto, k: int, dtype: int) -> None:
        """Register output ``k``; if its name must hold another dtype, write it under a new name and Cast back."""
        name = node.output[k]
        want = self.required.get(name, dtype)
        if node.op_type == "Cast":
            next(a for a in node.attribute if a.name == "to").i = want
            self.cast_input[name] = node.input[0]
            dtype = want
        elif want != dtype:
            node.output[k] = self.g.unique(f"{name}_{_SUFFIX[dtype]}")
            self._add(name, node.output[k], dtype)
            self.nodes.append(self._cast(node.output[k], name, want))
        self._add(name, name, want)
        self.home[name] = dtype

    def _version(self, tensor: str, dtype: int) -> str:
        """The name holding ``tensor`` in ``dtype``, adding one Cast the first time it is asked for."""
        if (tensor, dtype) not in self.versions:
            src = self.versions[(tensor, self.home[tensor])]
            new = self.g.unique(f"{tensor}_{_SUFFIX[dtype]}")
            self.nodes.append(self._cast(self.cast_input.get(src, src), new, dtype))
            self._add(tensor, new, dtype)
        return self.versions[(tensor, dtype)]

    def _cast(self, src: str, out: str, dtype: int) -> onnx.NodeProto:
        return helper.make_node("Cast", [src], [out], to=dtype, name=self.g.unique(f"{out}_Cast"))


def _retype_value_info(m: onnx.ModelProto, final: dict[str, tuple[int, str]]) -> None:
    """Set the dtype of every graph input, output and value_info entry; describe the new tensors too."""
    infos = {}
    for vi in chain(m.graph.input, m.graph.value_info, m.graph.output):
        infos.setdefault(vi.name, vi)
        if vi.name in final:
            vi.type.tensor_type.elem_type = final[vi.name][0]
    for name, (dtype, origin) in final.items():
        if name not in infos and origin in infos:
            vi = m.graph.value_info.add()
            vi.CopyFrom(infos[origin])
            vi.name = name
            vi.type.tensor_type.elem_type = dtype
