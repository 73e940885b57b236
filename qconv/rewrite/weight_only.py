"""Int4 weight-only quantization: MatMul -> com.microsoft MatMulNBits, Gather -> com.microsoft GatherBlockQuantized.

Activations stay float; only constant float32 weights are stored as 4-bit integers in blocks, each block with
its own scale (and, when affine, zero point); a value decodes as ``(q - zero_point) * scale`` with ``q`` in 0..15.
Every layout below is pinned by tests/test_weight_only.py against onnxruntime 1.31 on CPU.

MatMul ``y = x @ W``, W float32 [K, N] (MatMulNBits, domain com.microsoft, version 1)
    Blocks are ``block_size`` consecutive rows of one column (along K). K is padded up to
    ``n_blocks * block_size`` with values equal to the block's zero point, which decode to exactly 0.
    - B: uint8 [N, n_blocks, block_size / 2]; column n's blocks in K order, two values per byte, the first
      in the low nibble.
    - scales: float32 [N, n_blocks]. float32 because onnxruntime binds scales to A's type: float16 scales
      next to a float32 A are rejected when the session is created.
    - zero_points (affine only): uint8 [N, ceil(n_blocks / 2)], packed like B. Symmetric weights omit the
      input and get onnxruntime's default zero point 8: signed int4 stored offset by 8.
    - attributes K, N, bits=4, block_size; accuracy_level only when asked for.

Gather on a float32 table [V, D] along axis 0 (embeddings) (GatherBlockQuantized, com.microsoft, version 1)
    Blocks run along D. Data is uint8 [V, D / 2] packed along D like B, with bits=4, quantize_axis=1,
    gather_axis=0, scales float32 [V, n_blocks], zero_points uint8 [V, ceil(n_blocks / 2)] when affine; the
    default zero point for uint8 data is 8, so both ops share one storage convention. Measured alternatives:
    int4/uint4-typed data runs too, for any D, but the INT4 element type is defined only from IR version 10,
    so a typical IR 8 model would have to be raised; opset-21 DequantizeLinear(block_size) + Gather runs too
    but needs the model raised to opset 21 and dequantizes the whole table rather than the gathered rows.
    Packed uint8 is valid at any IR and opset. Its one gap: the packed shape implies an even D (onnxruntime
    returns D + 1 columns for an odd D), so such tables stay float. Unlike Gather, an out-of-range index yields zeros
    instead of an error.

Symmetric scale
    The signed range [-8, 7] is lopsided. ``absmax / 7`` never uses -8. onnxruntime's quantizer puts the
    largest magnitude on -8 (flipping the scale's sign when that value is positive) and clips the other
    side's extreme at 7, which can cost a whole step on that value. Here the step is
    ``max(larger side / 8, smaller side / 7)`` with the sign of the scale chosen so the larger side lands on
    -8: never coarser than absmax / 7, often absmax / 8, and nothing is clipped, so every value is within half
    a step. Measured mean relative error at block 32 on the sample transformer's weights: absmax/7 0.0809,
    this 0.0732, onnxruntime's 0.0724 (slightly lower on average, but without the half-step bound).
    Negative scales are fine for the kernels (onnxruntime's own quantizer emits them).
Affine
    The block's range widened to include 0 over 0..15 (qmath.choose_qparams), zero point rounded.
GPTQ
    One pass of the float model over the calibration feeds accumulates ``H = mean(x^T x)`` per MatMul input
    tensor (q/k/v projections share one), one batch at a time: memory is O(K^2) per input, not O(samples).
    Weights read by several MatMuls sum their inputs' Hessians. Each weight is then quantized by qconv.numeric.gptq
    (act-order off by default). Hessians taken sequentially on the partly quantized model (one pass per
    layer) gave no gain on the sample transformer, so one pass it is. Gather tables always use round-to-nearest.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qconv.errors import QconvError, UsageError
from qconv.graph import Graph, attr, drop_unused_initializers, expose
from qconv.numeric import gptq, qmath
from qconv.plan.names import first_match
from qconv.runtime import run, session

BLOCK_SIZES = (16, 32, 64, 128, 256)
METHODS = ("rtn", "gptq")
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
MS_DOMAIN = "com.microsoft"
UINT4 = qmath.QType("uint8", 0, 15)  # 4-bit values, one per uint8 until packed
SYMMETRIC_ZERO_POINT = 8
PERCDAMP = 0.01
_FLOATING = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}


@dataclass
class WeightOnlyResult:
    model: onnx.ModelProto
    quantized: list[dict]  # node, op_type, weight, shape, block_size, symmetric, method, rel_error
    kept_float: list[dict]  # name, op_type, reason


@dataclass(frozen=True)
class Int4Weight:
    """``w [K, N]`` quantized block-wise along K: ``w ~= (q - zero_point) * scale`` within each block."""

    q: np.ndarray  # uint8 [K, N], values 0..15
    scale: np.ndarray  # float32 [n_blocks, N]
    zero_point: np.ndarray  # uint8 [n_blocks, N]
    block_size: int

    def _per_row(self, p: np.ndarray) -> np.ndarray:
        return p[np.arange(self.q.shape[0]) // self.block_size]

    def dequantize(self) -> np.ndarray:
        centered = self.q.astype(np.float32) - self._per_row(self.zero_point).astype(np.float32)
        return (centered * self._per_row(self.scale)).astype(np.float32)

    def padded_q(self) -> np.ndarray:
        """``q`` padded along K to whole blocks with the zero point (padding decodes to exactly 0)."""
        padding = np.repeat(self.zero_point, self.block_size, axis=0)[self.q.shape[0]:]
        return np.concatenate([self.q, padding])


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """Pack 4-bit values along the last axis, two per byte, the first in the low nibble (odd length: 0-padded)."""
    q = np.asarray(q, dtype=np.uint8)
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.zeros(q.shape[:-1] + (1,), dtype=np.uint8)], axis=-1)
    return (q[..., 0::2] & 0x0F) | (q[..., 1::2] << 4)


def unpack_nibbles(packed: np.ndarray, length: int) -> np.ndarray:
    """Inverse of pack_nibbles: the first ``length`` 4-bit values along the last axis."""
    packed = np.asarray(packed, dtype=np.uint8)
    q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(packed.shape[:-1] + (-1,))
    return q[..., :length]


def fit_blocks(x: np.ndarray, symmetric: bool) -> qmath.QParams:
    """4-bit parameters for each row of ``x [C, n]`` (one block per row), shape (C,) along axis 0."""
    x = np.asarray(x, dtype=np.float64)
    lo = np.minimum(x.min(axis=1), 0.0)
    hi = np.maximum(x.max(axis=1), 0.0)
    if not symmetric:
        return qmath.choose_qparams(lo, hi, UINT4, symmetric=False, axis=0)
    step_if_positive = np.maximum(-lo / 8, hi / 7)  # scale > 0: the negative side reaches -8
    step_if_negative = np.maximum(hi / 8, -lo / 7)  # scale < 0: the positive side reaches -8
    scale = np.where(step_if_negative < step_if_positive, -step_if_negative, step_if_positive).astype(np.float32)
    scale = np.where((scale != 0) & np.isfinite(scale), scale, np.float32(1.0)).astype(np.float32)
    return qmath.QParams(scale, np.full(scale.shape, SYMMETRIC_ZERO_POINT, dtype=np.uint8), UINT4, axis=0)


def rtn(w: np.ndarray, block_size: int, symmetric: bool) -> Int4Weight:
    """Round-to-nearest block-wise quantization of ``w [K, N]`` along K."""
    k_dim, n_dim = w.shape
    n_blocks = -(-k_dim // block_size)
    padded = np.zeros((n_blocks * block_size, n_dim), dtype=np.float32)
    padded[:k_dim] = w
    blocks = padded.reshape(n_blocks, block_size, n_dim).transpose(0, 2, 1).reshape(n_blocks * n_dim, block_size)
    qp = fit_blocks(blocks, symmetric)
    q = qmath.quantize(blocks, qp).reshape(n_blocks, n_dim, block_size).transpose(0, 2, 1)
    q = q.reshape(n_blocks * block_size, n_dim)[:k_dim]
    return Int4Weight(q, qp.scale.reshape(n_blocks, n_dim), qp.zero_point.reshape(n_blocks, n_dim), block_size)


def gptq_weight(w: np.ndarray, hessian: np.ndarray, block_size: int, symmetric: bool,
                act_order: bool = False) -> Int4Weight:
    q, scale, zero_point = gptq.gptq(w, hessian, block_size, partial(fit_blocks, symmetric=symmetric),
                                     PERCDAMP, act_order)
    return Int4Weight(q, scale, zero_point, block_size)


def rel_error(w: np.ndarray, qw: Int4Weight) -> float:
    norm = float(np.linalg.norm(w))
    return float(np.linalg.norm(w - qw.dequantize())) / norm if norm else 0.0


def matmul_nbits_tensors(qw: Int4Weight, symmetric: bool) -> list[np.ndarray]:
    """MatMulNBits inputs B, scales (and zero_points when affine) for ``qw`` of a weight [K, N]."""
    n_dim = qw.q.shape[1]
    n_blocks = qw.scale.shape[0]
    b = pack_nibbles(qw.padded_q().reshape(n_blocks, qw.block_size, n_dim).transpose(2, 0, 1))
    arrays = [b, np.ascontiguousarray(qw.scale.T)]
    return arrays if symmetric else arrays + [pack_nibbles(qw.zero_point.T)]


def gather_tensors(qw: Int4Weight, symmetric: bool) -> list[np.ndarray]:
    """GatherBlockQuantized data, scales (and zero_points when affine) for ``qw`` of a transposed table [D, V]."""
    arrays = [pack_nibbles(qw.q.T), np.ascontiguousarray(qw.scale.T)]
    return arrays if symmetric else arrays + [pack_nibbles(qw.zero_point.T)]


def _check_options(block_size, method: str, calib_feeds, accuracy_level) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size not in BLOCK_SIZES:
        raise UsageError(f"block_size must be a power of two from 16 to 256 ({', '.join(map(str, BLOCK_SIZES))}), "
                         f"got {block_size!r}")
    if method not in METHODS:
        raise UsageError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "gptq" and calib_feeds is None:
        raise UsageError("method 'gptq' needs calibration data (calib_feeds); use method 'rtn' without data")
    if accuracy_level is not None and accuracy_level not in ACCURACY_LEVELS:
        levels = ", ".join(map(str, ACCURACY_LEVELS))
        raise UsageError(f"accuracy_level must be one of {levels}, got {accuracy_level!r}")


def _weight_input(node: onnx.NodeProto) -> str:
    return node.input[1] if node.op_type == "MatMul" else node.input[0]


def _is_candidate(g: Graph, node: onnx.NodeProto) -> bool:
    """A float MatMul (type unknown counts as float), or a Gather reading a constant float table.

    Other Gathers index shapes or activations: they hold no weight, so they are not reported as kept float.
    """
    name = _weight_input(node)
    if node.op_type == "Gather":
        return g.is_constant(name) and g.types[name] in _FLOATING
    return g.types.get(name, TensorProto.FLOAT) in _FLOATING


def _weight_problem(node: onnx.NodeProto, g: Graph, block_size: int) -> str | None:
    """Why the node's weight cannot be stored in int4, or None."""
    name = _weight_input(node)
    what = "weight" if node.op_type == "MatMul" else "table"
    if not g.is_constant(name):
        return f"{what} '{name}' is computed at run time, not a constant"
    t = g.initializers[name]
    if t.data_type != TensorProto.FLOAT:
        return f"{what} '{name}' is {TensorProto.DataType.Name(t.data_type).lower()}: only float32 is converted"
    dims = list(t.dims)
    if len(dims) != 2:
        return f"{what} '{name}' has shape {dims}: only 2-D {what}s are converted"
    if node.op_type == "Gather" and attr(node, "axis", 0) % 2 != 0:
        return "gathers along axis 1: only row lookups (axis 0) of a [V, D] table are converted"
    label, width = ("K", dims[0]) if node.op_type == "MatMul" else ("D", dims[1])
    if width < block_size:
        return f"{label}={width} is smaller than block_size {block_size}"
    if node.op_type == "Gather" and width % 2:
        return f"D={width} is odd: GatherBlockQuantized packs two 4-bit values per byte along D"
    if not np.all(np.isfinite(g.array(name))):
        return f"{what} '{name}' holds inf/NaN values"
    return None


def _excluded(node: onnx.NodeProto, patterns) -> str | None:
    pattern = first_match(node.name, patterns)
    return f"excluded by --exclude-nodes {pattern}" if pattern is not None else None


def _select(model: onnx.ModelProto, g: Graph, block_size: int, exclude_nodes, only: set | None = None):
    """({position: node} to convert, kept_float records) over the main graph's float MatMul and Gather nodes;
    ``only`` (node names), when given, limits the conversion to those nodes (a plan's decisions)."""
    targets, kept = {}, []
    for position, node in enumerate(model.graph.node):
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gather") or not _is_candidate(g, node):
            continue
        reason = _excluded(node, exclude_nodes) or _weight_problem(node, g, block_size)
        if reason is None and only is not None and node.name not in only:
            reason = "kept float by the plan"
        if reason:
            kept.append({"name": node.name, "op_type": node.op_type, "reason": reason})
        else:
            targets[position] = node
    return targets, kept


def int4_decisions(model: onnx.ModelProto, block_size: int, exclude_nodes=()) -> tuple[set[str], dict[str, str]]:
    """(names of the nodes int4 converts, {node name: reason} for the candidates it keeps float), without rewriting."""
    targets, kept = _select(model, Graph(model), int(block_size), exclude_nodes)
    return {n.name for n in targets.values()}, {k["name"]: k["reason"] for k in kept}


def input_hessians(model: onnx.ModelProto, widths: dict[str, int], feeds: Iterable[dict]) -> dict[str, np.ndarray]:
    """``mean(x^T x)`` (float64 [K, K]) of each named float tensor, streaming one batch at a time."""
    graph_inputs = set(Graph(model).graph_inputs)
    names = sorted(widths)
    computed = [n for n in names if n not in graph_inputs]
    sess = session(expose(model, {n: TensorProto.FLOAT for n in computed}))
    sums = {n: np.zeros((widths[n], widths[n])) for n in names}
    rows = dict.fromkeys(names, 0)
    for feed in feeds:
        values = dict(zip(computed, run(sess, feed, computed)))
        for name in names:
            x = np.asarray(feed[name] if name in graph_inputs else values[name], dtype=np.float64)
            x = x.reshape(-1, widths[name])
            sums[name] += x.T @ x
            rows[name] += x.shape[0]
    for name in names:
        if rows[name] == 0:
            raise UsageError(f"method 'gptq' needs calibration data, but calib_feeds gave no rows for '{name}'")
        if not np.all(np.isfinite(sums[name])):
            raise QconvError(f"calibration activations of '{name}' hold inf/NaN values, which GPTQ cannot use: "
                             "use method 'rtn' or exclude the MatMuls reading it")
    return {n: sums[n] / rows[n] for n in names}


def _weight_hessians(model: onnx.ModelProto, g: Graph, targets, feeds) -> dict[tuple[str, str], np.ndarray]:
    """Hessian per ("MatMul", weight): the sum over the MatMuls reading that weight."""
    matmuls = [n for n in targets if n.op_type == "MatMul"]
    if not matmuls:
        return {}
    widths = {n.input[0]: int(g.initializers[n.input[1]].dims[0]) for n in matmuls}
    per_input = input_hessians(model, widths, feeds)
    hessians: dict[tuple[str, str], np.ndarray] = {}
    for node in matmuls:
        key = ("MatMul", node.input[1])
        hessians[key] = hessians.get(key, 0.0) + per_input[node.input[0]]
    return hessians


def _encode(g: Graph, node: onnx.NodeProto, block_size: int, symmetric: bool, hessian, act_order: bool):
    """(new initializers, quantized record without the node name) for the weight of ``node``."""
    name = _weight_input(node)
    w = g.array(name).astype(np.float32)
    if node.op_type == "Gather":
        qw = rtn(w.T, block_size, symmetric)
        arrays, err = gather_tensors(qw, symmetric), rel_error(w.T, qw)
    else:
        if hessian is None:
            qw = rtn(w, block_size, symmetric)
        else:
            qw = gptq_weight(w, hessian, block_size, symmetric, act_order)
        arrays, err = matmul_nbits_tensors(qw, symmetric), rel_error(w, qw)
    suffixes = ("_Q4", "_scales", "_zero_points")
    inits = [numpy_helper.from_array(a, g.unique(name + s)) for a, s in zip(arrays, suffixes)]
    record = {"op_type": node.op_type, "weight": name, "shape": list(w.shape), "block_size": block_size,
              "symmetric": symmetric, "method": "rtn" if hessian is None else "gptq", "rel_error": err}
    return inits, record


def _replacement(g: Graph, node: onnx.NodeProto, inits: list[TensorProto], block_size: int,
                 accuracy_level: int | None) -> onnx.NodeProto:
    data, params = inits[0].name, [t.name for t in inits[1:]]
    name = g.unique(node.name + "_Q4")
    if node.op_type == "Gather":
        return helper.make_node("GatherBlockQuantized", [data, node.input[1], *params], list(node.output), name=name,
                                domain=MS_DOMAIN, bits=4, block_size=block_size, gather_axis=0, quantize_axis=1)
    k_dim, n_dim = g.initializers[_weight_input(node)].dims
    extra = {} if accuracy_level is None else {"accuracy_level": accuracy_level}
    return helper.make_node("MatMulNBits", [node.input[0], data, *params], list(node.output), name=name,
                            domain=MS_DOMAIN, K=k_dim, N=n_dim, bits=4, block_size=block_size, **extra)


def quantize_int4(model: onnx.ModelProto, block_size: int = 32, symmetric: bool = True, method: str = "rtn",
                  calib_feeds: Iterable[dict[str, np.ndarray]] | None = None, exclude_nodes=(),
                  accuracy_level: int | None = None, act_order: bool = False, only_nodes=None) -> WeightOnlyResult:
    """Store constant MatMul weights and Gather tables of ``model`` as block-wise int4 (see the module docstring).

    ``exclude_nodes`` are node-name globs kept in float. ``method="gptq"`` streams ``calib_feeds`` (feed dicts,
    one batch each) through onnxruntime; with ``method="rtn"`` they are not used. The input model is not changed.
    """
    _check_options(block_size, method, calib_feeds, accuracy_level)
    block_size = int(block_size)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = Graph(m)
    targets, kept = _select(m, g, block_size, exclude_nodes, None if only_nodes is None else set(only_nodes))
    hessians = _weight_hessians(m, g, targets.values(), calib_feeds) if method == "gptq" else {}
    encoded: dict[tuple[str, str], tuple[list[TensorProto], dict]] = {}
    quantized = []
    for position, node in targets.items():
        key = (node.op_type, _weight_input(node))
        if key not in encoded:
            encoded[key] = _encode(g, node, block_size, symmetric, hessians.get(key), act_order)
        inits, record = encoded[key]
        quantized.append({"node": node.name, **record})
        m.graph.node[position].CopyFrom(_replacement(g, node, inits, block_size, accuracy_level))
    m.graph.initializer.extend(t for inits, _ in encoded.values() for t in inits)
    if targets and not any(op.domain == MS_DOMAIN for op in m.opset_import):
        m.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    drop_unused_initializers(m, [weight for _, weight in encoded])
    return WeightOnlyResult(m, quantized, kept)
