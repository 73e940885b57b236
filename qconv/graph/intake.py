"""Bring a model as exporters really produce it into the form the quantizer works on.

Each pass edits the model in place and returns a note (or None) saying what it did, for the report:
old-IR inputs that are really initializers, weights held in Constant nodes or computed from constants,
inference no-ops (Identity, Dropout), BatchNorm and per-channel Mul/Add folded into the Conv before
them, and an opset upgrade where the QDQ rewrite needs one.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from qconv.errors import QconvError
from qconv.graph import (Graph, ai_onnx_opset, attr, copy_with_placeholders, drop_unused_initializers, name_nodes, tensor_size, topo_sort,
                         until_fixed, without_weights)

_NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
# Ops whose outputs are sequences or optionals: an initializer is a tensor, so their values cannot become one.
_NOT_TENSORS = {"Optional", "SequenceConstruct", "SequenceEmpty", "SequenceInsert", "SequenceErase", "SplitToSequence", "SequenceMap"}
# IR version that first allows each ai.onnx opset (onnx.helper.VERSION_TABLE), enough for our targets.
_MIN_IR = {10: 5, 11: 6, 12: 7, 13: 7, 14: 7, 15: 8, 16: 8, 17: 8, 18: 8, 19: 9, 20: 9, 21: 10}


def strip_initializer_inputs(model: onnx.ModelProto) -> str | None:
    """Old IR (< 4) lists every initializer as a graph input too; such inputs are weights, not feeds."""
    g = model.graph
    inits = {t.name for t in g.initializer}
    keep = [i for i in g.input if i.name not in inits]
    dropped = len(g.input) - len(keep)
    if not dropped:
        return None
    del g.input[:]
    g.input.extend(keep)
    model.ir_version = max(model.ir_version, 4)
    return f"{dropped} initializers listed as graph inputs (old IR) treated as weights"


def constants_to_initializers(model: onnx.ModelProto) -> str | None:
    """Constant nodes become initializers, so weights held in them are quantized like any other."""
    g = model.graph
    moved, keep = 0, []
    for node in g.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.attribute) == 1:
            value = _constant_value(node)
            if value is not None:
                t = numpy_helper.from_array(value, node.output[0])
                g.initializer.append(t)
                moved += 1
                continue
        keep.append(node)
    if not moved:
        return None
    del g.node[:]
    g.node.extend(keep)
    return f"{moved} Constant nodes turned into initializers"


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    a = node.attribute[0]
    if a.name == "value":
        return numpy_helper.to_array(a.t)
    scalars = {"value_float": np.float32, "value_int": np.int64}
    lists = {"value_floats": np.float32, "value_ints": np.int64}
    if a.name in scalars:
        return np.array(onnx.helper.get_attribute_value(a), dtype=scalars[a.name])
    if a.name in lists:
        return np.array(onnx.helper.get_attribute_value(a), dtype=lists[a.name])
    return None  # sparse or string constants stay as they are


def remove_noops(model: onnx.ModelProto) -> str | None:
    """Identity and inference-mode Dropout pass their input through; they only break patterns."""
    g = Graph(model)
    removed = 0
    keep = []
    rename: dict[str, str] = {}
    for node in model.graph.node:
        is_noop = node.op_type == "Identity" or (
            node.op_type == "Dropout" and (len(node.output) < 2 or not node.output[1] or not g.consumers.get(node.output[1]))
        )
        out = node.output[0] if node.output else ""
        if is_noop and node.domain in ("", "ai.onnx") and out not in g.graph_outputs and out not in g.pinned:
            src = node.input[0]
            rename[out] = rename.get(src, src)
            removed += 1
            continue
        keep.append(node)
    if not removed:
        return None
    for node in keep:
        for k, i in enumerate(node.input):
            if i in rename:
                node.input[k] = rename[i]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return f"{removed} Identity/Dropout nodes removed (no-ops at inference)"


def sum_to_add(model: onnx.ModelProto) -> str | None:
    """A two-input Sum (old exporters' residual add) is an Add, which has an int8 kernel."""
    changed = 0
    for node in model.graph.node:
        if node.op_type == "Sum" and node.domain in ("", "ai.onnx") and len(node.input) == 2:
            node.op_type = "Add"
            changed += 1
    return f"{changed} two-input Sum nodes rewritten as Add" if changed else None


def div_to_mul(model: onnx.ModelProto) -> str | None:
    """x / c with a constant float c becomes x * (1/c): Mul has an int8 kernel (QLinearMul), Div has none, so a
    hard-swish written x * clip(x + 3, 0, 6) / 6 can stay int8. The reciprocal differs from the division by at
    most one float32 rounding (far below int8 resolution)."""
    g = Graph(model)
    changed = 0
    for node in model.graph.node:
        if node.op_type != "Div" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            continue
        c = node.input[1]
        if not g.is_constant(c) or g.initializers[c].data_type != onnx.TensorProto.FLOAT or c in g.pinned:
            continue
        value = g.array(c)
        if value.size > 4096 or not np.all(np.isfinite(value)) or np.any(value == 0):
            continue
        recip = numpy_helper.from_array((np.float32(1.0) / value).astype(np.float32), g.unique(c + "_reciprocal"))
        model.graph.initializer.append(recip)
        node.op_type = "Mul"
        node.input[1] = recip.name
        changed += 1
    if changed:
        drop_unused_initializers(model)
    return f"{changed} divisions by a constant rewritten as multiplications by its reciprocal" if changed else None


_GATES = ("Clip", "Sigmoid", "HardSigmoid")  # bounded: their product with x is no wider than x


def scale_the_gate(model: onnx.ModelProto) -> str | None:
    """``(x * gate) * c`` with a bounded gate (Clip, Sigmoid, HardSigmoid) and a constant scalar c becomes
    ``x * (gate * c)``: a hard-swish written ``x * clip(x + 3, 0, 6) / 6`` then never materializes the product
    before the division, whose range is c^-1 times wider than the result's. In int8 that product is rounded on
    a grid six times coarser than the output's (PP-OCRv4's recognizer lost points of characters to it); scaled
    first, the gate keeps its own [0, 1] grid and the output is rounded once on its own. Same ops, same count:
    the speed is unchanged. Reassociation changes float results by rounding only."""
    g = Graph(model)
    changed = 0
    for outer in model.graph.node:
        if outer.op_type != "Mul" or outer.domain not in ("", "ai.onnx") or len(outer.input) != 2:
            continue
        k = next((k for k in (0, 1) if g.is_constant(outer.input[k]) and g.is_float(outer.input[k])), None)
        if k is None or g.array(outer.input[k]).size != 1:
            continue
        product, const = outer.input[1 - k], outer.input[k]
        inner = g.producer.get(product)
        if inner is None or inner.op_type != "Mul" or inner.domain not in ("", "ai.onnx") or g.only_consumer(product) is not outer:
            continue
        gates = [j for j in (0, 1) if (p := g.producer.get(inner.input[j])) is not None and p.op_type in _GATES]
        if len(gates) != 1 or g.is_constant(inner.input[1 - gates[0]]):
            continue
        x, gate = inner.input[1 - gates[0]], inner.input[gates[0]]
        scaled = g.unique(product + "_gate")
        inner.input[:] = [gate, const]
        inner.output[0] = scaled
        outer.input[:] = [x, scaled]
        changed += 1
    return f"{changed} gate products scaled at the gate (x * gate * c as x * (gate * c))" if changed else None


def expand_hard_activations(model: onnx.ModelProto) -> str | None:
    """HardSigmoid(x) as Clip(x * alpha + beta, 0, 1) and HardSwish(x) as x * that (alpha 1/6, beta 1/2): Mul, Add
    and Clip have int8 kernels (QLinearMul, QLinearAdd; a Clip folds into the QuantizeLinear before it), the two
    hard activations have none, so a MobileNetV3/PP-LCNet block stays int8 instead of converting around each
    activation. For the static modes only (in float the single op is faster)."""
    g = Graph(model)
    nodes, changed = [], 0
    for node in model.graph.node:
        if node.op_type not in ("HardSwish", "HardSigmoid") or node.domain not in ("", "ai.onnx") or not node.output[0]:
            nodes.append(node)
            continue
        x, y = node.input[0], node.output[0]
        alpha = attr(node, "alpha", 0.2) if node.op_type == "HardSigmoid" else 1.0 / 6.0
        beta = attr(node, "beta", 0.5) if node.op_type == "HardSigmoid" else 0.5
        base = node.name or g.unique(node.op_type)
        consts = {}
        for key, value in (("alpha", alpha), ("beta", beta), ("zero", 0.0), ("one", 1.0)):
            consts[key] = g.unique(f"{base}/{key}")
            model.graph.initializer.append(numpy_helper.from_array(np.array(value, np.float32), consts[key]))
        scaled, shifted = g.unique(f"{base}/scaled"), g.unique(f"{base}/shifted")
        gate = y if node.op_type == "HardSigmoid" else g.unique(f"{base}/gate")
        nodes += [onnx.helper.make_node("Mul", [x, consts["alpha"]], [scaled], name=f"{base}/mul"),
                  onnx.helper.make_node("Add", [scaled, consts["beta"]], [shifted], name=f"{base}/add"),
                  onnx.helper.make_node("Clip", [shifted, consts["zero"], consts["one"]], [gate], name=f"{base}/clip")]
        if node.op_type == "HardSwish":
            nodes.append(onnx.helper.make_node("Mul", [x, gate], [y], name=base))
        changed += 1
    if not changed:
        return None
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    infer_types(model)
    return f"{changed} HardSwish/HardSigmoid written as Mul/Add/Clip, which have int8 kernels"


def fold_constants(model: onnx.ModelProto, keep_ops: frozenset = frozenset()) -> str | None:
    """Evaluate nodes whose inputs are all constant (e.g. weights made by ConstantOfShape or Unsqueeze); nodes of
    ``keep_ops`` stay (a QDQ model keeps the DequantizeLinear of its weights, while QuantizeLinear of a float
    weight, as quantization-aware training exports it, becomes an int8 initializer). A value read outside the folded
    nodes must be a tensor: sequences and optionals (onnx's test_if_opt: an If branch returning
    Optional(SequenceConstruct(constant))) stay computed, their producers left in the graph."""
    g = Graph(model)
    barred: set[str] = set()  # outputs whose values are not tensors: their nodes are not folded
    while True:
        const = set(g.initializers) | {""}
        foldable = []
        for node in model.graph.node:
            if (
                node.domain in ("", "ai.onnx")
                and node.op_type not in keep_ops
                and node.op_type not in _NONDETERMINISTIC
                and not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)
                and all(i in const for i in node.input)
                and not any(o in g.graph_outputs or o in g.pinned or o in barred for o in node.output)
            ):
                foldable.append(node)
                const.update(node.output)
        if not foldable:
            return None
        folded_outputs = {o for n in foldable for o in n.output if o}
        needed = [o for o in sorted(folded_outputs) if any(c not in foldable for c in g.consumers.get(o, []))]
        made_by = {o: n for n in foldable for o in n.output}
        odd = {o for o in needed if made_by[o].op_type in _NOT_TENSORS}
        if odd:
            barred |= odd
            continue
        used_inits = {i for n in foldable for i in n.input if i in g.initializers}
        sub = onnx.helper.make_model(
            onnx.helper.make_graph(
                foldable, "fold", [],
                [onnx.helper.make_value_info(o, onnx.TypeProto()) for o in needed],
                [g.initializers[n] for n in sorted(used_inits)],
            ),
            opset_imports=[op for op in model.opset_import if op.domain in ("", "ai.onnx")],
        )
        try:
            values = _folded_exactly(foldable, g, needed)
            if values is None:
                from onnx.reference import ReferenceEvaluator  # here: importing it costs 12 MB resident

                values = ReferenceEvaluator(sub).run(needed, {}) if needed else []
        except Exception:  # noqa: BLE001 - an op the reference runtime lacks: leave the graph as it is
            return None
        odd = {o for o, v in zip(needed, values) if not isinstance(v, (np.ndarray, np.generic))}  # a list, None, a map
        if not odd:
            break
        barred |= odd
    folded_ids = {id(n) for n in foldable}
    keep = [n for n in model.graph.node if id(n) not in folded_ids]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    for name, value in zip(needed, values):
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    still_used = {i for n in keep for i in n.input} | {o.name for o in model.graph.output}
    unused = [t for t in model.graph.initializer if t.name not in still_used and t.name not in g.pinned]
    for t in unused:
        model.graph.initializer.remove(t)
    return f"{len(foldable)} nodes with constant inputs folded into initializers"


# Ops folded in numpy as onnx.reference computes them (the same numpy calls), without importing it: 12 MB resident that
# stayed to the end of a run (PP-OCRv4 rec folds 15 Casts, the text-line classifier 18 Reshapes and a Cast; every
# other public model here folds nothing).
_STANDARD = frozenset(onnx.helper.np_dtype_to_tensor_dtype(np.dtype(t)) for t in (
    "float32", "float64", "float16", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool"))


@np.errstate(all="ignore")  # a cast out of range (inf to int32) is onnx.reference's value, without its warning
def _folded_exactly(nodes: list, g: Graph, needed: list[str]) -> list | None:
    """``needed``'s values from ``nodes`` (in graph order, every input constant) when each is an Identity, a Cast between
    standard numeric types or a Reshape; None otherwise (onnx.reference folds them)."""
    values: dict[str, np.ndarray] = {}
    for node in nodes:
        if any(not i for i in node.input):
            return None
        ins = [values[i] if i in values else numpy_helper.to_array(g.initializers[i]) for i in node.input]
        if node.op_type == "Identity" and len(ins) == 1:
            out = ins[0]
        elif node.op_type == "Cast" and len(ins) == 1 and attr(node, "to") in _STANDARD and ins[0].dtype.kind in "biuf":
            out = ins[0].astype(onnx.helper.tensor_dtype_to_np_dtype(attr(node, "to")))  # onnx.reference's Cast
        elif node.op_type == "Reshape" and len(ins) == 2 and ins[1].dtype == np.int64:
            shape = np.copy(ins[1])
            if not attr(node, "allowzero", 0):
                zeros = np.where(shape == 0)
                shape[zeros] = np.array(ins[0].shape)[zeros]
            out = np.reshape(ins[0], shape)
        else:
            return None
        values[node.output[0]] = out
    return [values[n] for n in needed]


def upgrade_opset(model: onnx.ModelProto, target: int) -> str | None:
    """Raise the ai.onnx opset to ``target`` with onnx's version converter (never lowers it)."""
    current = ai_onnx_opset(model)
    if current >= target:
        return None
    try:
        converted = _converted(model, target)
    except Exception as exc:  # noqa: BLE001 - the converter raises bare RuntimeErrors
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QconvError(
            f"cannot upgrade the model from opset {current} to {target} ({msg}); "
            f"re-export it at opset >= {target}, or use --per-tensor which needs only opset 10"
        ) from None
    changed = interface_change(model, converted)
    if changed:
        raise QconvError(
            f"onnx's version converter changes the model's interface when upgrading it from opset {current} to {target} "
            f"({changed}); re-export it at opset >= {target}, or use --per-tensor which needs only opset 10"
        )
    model.CopyFrom(converted)
    model.ir_version = max(model.ir_version, _MIN_IR.get(target, 7))
    return f"opset upgraded from {current} to {target} (needed by the QDQ form)"


CONVERT_STRIP_BYTES = 4096  # initializers this big go through the version converter as placeholders


def _converted(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """``onnx.version_converter.convert_version(model, target)``, run on a copy whose big initializers are placeholders
    (name, type, shape), their data put back after: the converter serializes, parses and copies the model several
    times (PP-OCRv4 rec, 11 MB: 94 MB more at the peak of its normalizing). Its adapters read small constants (shapes,
    axes, scales) only; where a big one came back renamed, reshaped or retyped, or not at all, the whole model is
    converted as it is instead."""
    big = {t.name: t for t in model.graph.initializer if tensor_size(t) >= CONVERT_STRIP_BYTES}  # external ones: their head only
    if not big:
        return onnx.version_converter.convert_version(model, target)
    converted = onnx.version_converter.convert_version(copy_with_placeholders(model, set(big)), target)
    back = {t.name: t for t in converted.graph.initializer if t.name in big}
    if set(back) != set(big) or any(list(t.dims) != list(big[n].dims) or t.data_type != big[n].data_type or _has_data(t)
                                    for n, t in back.items()):
        return onnx.version_converter.convert_version(model, target)
    for name, t in back.items():
        t.CopyFrom(big[name])
    return converted


def _has_data(t: onnx.TensorProto) -> bool:
    return bool(t.raw_data or t.float_data or t.int32_data or t.int64_data or t.double_data or t.uint64_data or t.string_data
                or t.external_data)


def interface(model: onnx.ModelProto) -> dict[str, tuple]:
    """{name: (input/output, element type, rank, fixed dims)} of the graph's real inputs and its outputs."""
    inits = {t.name for t in model.graph.initializer}
    out = {}
    for kind, values in (("input", [i for i in model.graph.input if i.name not in inits]), ("output", model.graph.output)):
        for v in values:
            t = v.type.tensor_type
            dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim) if t.HasField("shape") else None
            out[v.name] = (kind, t.elem_type, None if dims is None else len(dims), dims)
    return out


def interface_change(before: onnx.ModelProto, after: onnx.ModelProto) -> str | None:
    """The first difference in names, types, ranks or fixed dimensions of the inputs and outputs, or None."""
    a, b = interface(before), interface(after)
    for name, (kind, elem, rank, dims) in a.items():
        if name not in b:
            return f"{kind} '{name}' is gone"
        _, elem2, rank2, dims2 = b[name]
        if elem2 and elem and elem2 != elem:
            return f"{kind} '{name}' changes type"
        if rank is not None and rank2 is not None and rank != rank2:
            return f"{kind} '{name}' changes rank from {rank} to {rank2}: dims {list(dims)} became {list(dims2)}"
        if dims and dims2 and any(x is not None and y is not None and x != y for x, y in zip(dims, dims2)):
            return f"{kind} '{name}' changes shape from {list(dims)} to {list(dims2)}"
    extra = sorted(set(b) - set(a))
    return f"new {b[extra[0]][0]} '{extra[0]}'" if extra else None


def _per_channel_factor(c: np.ndarray, channels: int, rank: int) -> np.ndarray | None:
    """``c`` as a per-output-channel vector when it broadcasts only along axis 1 of an NC... tensor."""
    if c.size == 1 and c.ndim <= rank:
        return np.full(channels, c.reshape(()), dtype=np.float32)
    shape = [1] * (rank - c.ndim) + list(c.shape)
    if len(shape) != rank or shape[1] != channels or any(s != 1 for k, s in enumerate(shape) if k != 1):
        return None
    return c.reshape(channels).astype(np.float32)


def fold_into_conv(model: onnx.ModelProto) -> str | None:
    """Fold BatchNormalization, and Mul/Add by per-channel constants, into the Conv that feeds them."""
    folded = until_fixed(model, _fold_one_into_conv)
    return f"{folded} BatchNormalization/Mul/Add nodes folded into the Conv before them" if folded else None


def _fold_one_into_conv(model: onnx.ModelProto, g: Graph, conv: onnx.NodeProto) -> bool:
    """Fold the BatchNormalization or per-channel Mul/Add after ``conv`` into it (True when folded)."""
    if conv.op_type != "Conv" or conv.domain not in ("", "ai.onnx") or not g.is_constant(conv.input[1]):
        return False
    nxt = g.only_consumer(conv.output[0])
    if nxt is None or nxt.domain not in ("", "ai.onnx"):
        return False
    w = g.array(conv.input[1]).astype(np.float32)
    channels = w.shape[0]
    has_bias = len(conv.input) > 2 and conv.input[2]
    if has_bias and not g.is_constant(conv.input[2]):
        return False
    b = g.array(conv.input[2]).astype(np.float32) if has_bias else np.zeros(channels, np.float32)
    new = _affine_after(nxt, g, channels, w.ndim)
    if new is None:
        return False
    mul, add = new
    w = w * mul.reshape([-1] + [1] * (w.ndim - 1))
    b = b * mul + add
    _set_conv_weights(model, g, conv, w, b)
    conv.output[0] = nxt.output[0]
    model.graph.node.remove(nxt)
    return True


def fold_into_batchnorm(model: onnx.ModelProto) -> str | None:
    """Fold Mul/Add by per-channel constants into the BatchNormalization before them (its scale and bias)."""
    folded = until_fixed(model, _fold_one_into_batchnorm)
    return f"{folded} Mul/Add nodes folded into the BatchNormalization before them" if folded else None


def _fold_one_into_batchnorm(model: onnx.ModelProto, g: Graph, bn: onnx.NodeProto) -> bool:
    """Fold the per-channel Mul/Add after ``bn`` into its scale and bias (True when folded)."""
    if bn.op_type != "BatchNormalization" or len([o for o in bn.output if o]) != 1 or not all(g.is_constant(i) for i in bn.input[1:5]):
        return False
    nxt = g.only_consumer(bn.output[0])
    scale, bias = g.array(bn.input[1]).astype(np.float32), g.array(bn.input[2]).astype(np.float32)
    rank = len(g.shape(bn.output[0]) or []) or 4
    if nxt is None or nxt.op_type not in ("Mul", "Add") or nxt.domain not in ("", "ai.onnx"):
        return False
    affine = _affine_after(nxt, g, scale.size, rank)
    if affine is None:
        return False
    mul, add = affine
    names = [g.unique(bn.input[1] + "_folded"), g.unique(bn.input[2] + "_folded")]
    model.graph.initializer.extend([numpy_helper.from_array(scale * mul, names[0]),
                                    numpy_helper.from_array(bias * mul + add, names[1])])
    old = list(bn.input[1:3])
    bn.input[1], bn.input[2] = names
    bn.output[0] = nxt.output[0]
    model.graph.node.remove(nxt)
    drop_unused_initializers(model, old)
    return True


def _affine_after(node, g: Graph, channels: int, rank: int):
    """(mul, add) per-channel vectors equivalent to ``node`` applied to a conv output, or None."""
    if node.op_type == "BatchNormalization":
        if len([o for o in node.output if o]) != 1 or not all(g.is_constant(i) for i in node.input[1:5]):
            return None
        scale, bias, mean, var = (g.array(i).astype(np.float64) for i in node.input[1:5])
        if scale.shape != (channels,):
            return None
        s = scale / np.sqrt(var + attr(node, "epsilon", 1e-5))
        return s.astype(np.float32), (bias - mean * s).astype(np.float32)
    if node.op_type in ("Mul", "Add") and len(node.input) == 2:
        const = [i for i in node.input if g.is_constant(i)]
        if len(const) != 1:
            return None
        c = _per_channel_factor(g.array(const[0]), channels, rank)
        if c is None or not np.all(np.isfinite(c)):
            return None
        if node.op_type == "Mul":
            return c, np.zeros(channels, np.float32)
        return np.ones(channels, np.float32), c
    return None


def _set_conv_weights(model, g: Graph, conv, w: np.ndarray, b: np.ndarray) -> None:
    wname = g.unique(conv.input[1] + "_folded")
    bname = g.unique((conv.input[2] if len(conv.input) > 2 and conv.input[2] else conv.output[0]) + "_bias_folded")
    model.graph.initializer.extend([numpy_helper.from_array(w, wname), numpy_helper.from_array(b, bname)])
    old = [i for i in conv.input[1:3] if i]
    conv.input[1] = wname
    if len(conv.input) > 2:
        conv.input[2] = bname
    else:
        conv.input.append(bname)
    drop_unused_initializers(model, old)


def infer_types(model: onnx.ModelProto) -> None:
    """Fill value_info with inferred types and shapes where onnx can infer them.

    Inference reads initializers' types and dims, and the values of small ones (shape tensors): large
    initializers are left out of the copy it reads (``without_weights``), so a 500 MB model is not copied.
    """
    try:
        inferred = onnx.shape_inference.infer_shapes(without_weights(model), strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - inference is best effort; calibration reports real dtypes
        inferred = None
    if inferred is not None:  # take everything inference touched except the (emptied) initializers
        for field in ("node", "value_info", "output"):
            del getattr(model.graph, field)[:]
            getattr(model.graph, field).extend(getattr(inferred.graph, field))


def check_supported(model: onnx.ModelProto) -> None:
    if ai_onnx_opset(model) == 0:
        raise QconvError("model imports no ai.onnx opset: not a model qconv can quantize")
    if not model.graph.node:
        raise QconvError("model graph has no nodes: nothing to quantize")


def prepare_quantized(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """The passes that keep an already-quantized model's numbers: no folding (it would evaluate the
    DequantizeLinear of every weight), no opset change."""
    check_supported(model)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    notes = [strip_initializer_inputs(m), constants_to_initializers(m)]
    topo_sort(m)
    notes += [fold_constants(m, keep_ops=frozenset({"DequantizeLinear"})), remove_noops(m)]
    drop_unused_initializers(m)
    name_nodes(m)
    infer_types(m)
    return m, [n for n in notes if n]


def prepare(model: onnx.ModelProto, min_opset: int, in_place: bool = False) -> tuple[onnx.ModelProto, list[str]]:
    """Return a normalized copy of ``model`` (``in_place``: ``model`` itself, normalized; the caller keeps what it
    needs of the original, and no weight is held twice) and notes on what was changed."""
    check_supported(model)
    if in_place:
        before = copy_with_placeholders(model, {t.name for t in model.graph.initializer})
        m = model
    else:
        before = model
        m = onnx.ModelProto()
        m.CopyFrom(model)
    notes = [strip_initializer_inputs(m), constants_to_initializers(m)]
    topo_sort(m)
    notes.append(upgrade_opset(m, min_opset))
    notes += [constants_to_initializers(m), fold_constants(m), remove_noops(m), sum_to_add(m), div_to_mul(m), scale_the_gate(m),
              fold_into_batchnorm(m), fold_into_conv(m)]
    drop_unused_initializers(m)
    name_nodes(m)
    infer_types(m)
    notes.append(normalize_bodies(m))
    changed = interface_change(before, m)
    if changed:
        raise QconvError(f"internal error: normalizing the model changed its interface ({changed}); please report it")
    return m, [n for n in notes if n]


def normalize_bodies(model: onnx.ModelProto) -> str | None:
    """The main graph's passes on every If/Loop/Scan body (weights in Constant nodes become body initializers,
    BatchNormalization folds into its Conv, nodes get names, types are inferred), outer bodies first."""
    from qconv.graph.subgraphs import bodies, body_model, put_body

    count = len(bodies(model))
    if not count:
        return None
    k = 0
    while k < len(found := bodies(model)):  # found again each time: naming an outer body's nodes renames paths inside it
        body = found[k]
        k += 1
        wrapped, added = body_model(model, body)
        constants_to_initializers(wrapped)
        topo_sort(wrapped)
        for step in (fold_constants, div_to_mul, scale_the_gate, fold_into_batchnorm, fold_into_conv):
            step(wrapped)
        drop_unused_initializers(wrapped)
        name_nodes(wrapped)
        infer_types(wrapped)
        put_body(model, body, wrapped, added)
    return f"{count} If/Loop/Scan bodies normalized like the main graph"
