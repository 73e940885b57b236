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
    The signed range [-8, 7] is lopsided, and the three steps in use each win on some blocks: ``absmax / 7``
    never uses -8; onnxruntime's quantizer puts the largest magnitude on -8 (flipping the scale's sign when
    that value is positive) and clips the other side's extreme at 7; ``max(larger side / 8, smaller side / 7)``
    with the larger side on -8 clips nothing. Each block takes the one with the least squared error (three
    round trips of the block; never worse than any one of them). Measured on the Shakespeare decoder of
    scripts/bench_int4.py (block 32, RTN, 96 held-out windows, 2,048 teacher-forced greedy steps): no-clip
    alone +0.363% perplexity, greedy agreement 0.940; onnxruntime's +0.426%, 0.965; absmax/7 +0.328%, 0.953;
    the per-block choice +0.311%, 0.960. Negative scales are fine for the kernels (onnxruntime's own quantizer
    emits them). 8-bit layers (mixed models) use the no-clip step.
Affine
    The block's range widened to include 0 over 0..15 (qmath.choose_qparams), zero point rounded.
GPTQ
    One pass of the float model over the calibration feeds accumulates ``H = mean(x^T x)`` per MatMul input
    tensor (q/k/v projections share one), one batch at a time: memory is O(K^2) per input, not O(samples).
    Weights read by several MatMuls sum their inputs' Hessians. Each weight is then quantized by qconv.numeric.gptq
    (act-order off by default). Hessians taken sequentially on the partly quantized model (one pass per
    layer) gave no gain on the sample transformer, so one pass it is, unless the Hessians exceed HESSIAN_BYTES:
    then one float pass per group of inputs (hessian_groups), the same numbers. Gather tables always use
    round-to-nearest.
HQQ (no data)
    qconv.numeric.hqq: block parameters fitted to the weights by half-quadratic steps on an lp norm, zero points
    rounded to integers (float zero points have no fast CPU kernel). Always stored affine.
AWQ (data)
    qconv.numeric.awq: per input tensor, a channel scale ``s`` searched on the calibration Hessian (the same
    streamed ``H`` as GPTQ), weights stored as ``diag(s) W`` and ``1 / s`` folded into what makes the input: the
    constant of a norm's ``Mul`` (RMSNorm/LayerNorm weight), a LayerNormalization's scale and bias, or the columns
    of the MatMul that feeds an elementwise ``Mul`` (SwiGLU's up projection); anywhere else a ``Mul`` by ``1 / s``
    is inserted before the MatMuls (one per input tensor). Then each block's range is clip-searched on the error
    weighted by ``diag H``. Weights read by MatMuls with different inputs keep ``s = 1``. ``awq_gptq``: the same
    scales, then GPTQ's rounding on the scaled weights (Hessian ``H / (s s^T)``) instead of the clip search.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qconv.data import is_cache_name
from qconv.errors import QconvError, UsageError
from qconv.graph import Graph, all_finite, attr, copy_with_placeholders, drop_unused_initializers, has_lazy, stored_bytes, topo_sort
from qconv.io import Spill
from qconv.numeric import awq, gptq, hqq, qmath
from qconv.numeric.packing import consecutive
from qconv.plan.names import first_match
from qconv.runtime import exposed_session, give_back, run, session

BLOCK_SIZES = (16, 32, 64, 128, 256)
METHODS = ("rtn", "gptq", "hqq", "awq", "awq_gptq")
CALIBRATED = ("gptq", "awq", "awq_gptq")
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
MS_DOMAIN = "com.microsoft"
UINT4 = qmath.QType("uint8", 0, 15)  # 4-bit values, one per uint8 until packed
UINT8 = qmath.QType("uint8", 0, 255)  # the 8-bit layers of a mixed model (MatMulNBits bits=8)
EIGHT_BIT_LEVEL = 4  # 8-bit MatMulNBits without it has no fast CPU kernel: 3.1 ms a token for 1024x1024 vs 57 us
SYMMETRIC_ZERO_POINT = 8  # onnxruntime's default zero point: 2^(bits - 1)
PERCDAMP = 0.01
_FLOATING = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}


@dataclass
class WeightOnlyResult:
    model: onnx.ModelProto
    quantized: list[dict]  # node, op_type, weight, shape, block_size, symmetric, method, rel_error
    kept_float: list[dict]  # name, op_type, reason
    scalings: list[dict] = field(default_factory=list)  # AWQ: input, alpha, folded_into (None: a Mul), scale range


@dataclass(frozen=True)
class Int4Weight:
    """``w [K, N]`` quantized block-wise along K: ``w ~= (q - zero_point) * scale`` within each block."""

    q: np.ndarray  # uint8 [K, N], values 0..15
    scale: np.ndarray  # float32 [n_blocks, N]
    zero_point: np.ndarray  # uint8 [n_blocks, N]
    block_size: int

    def _per_row(self, p: np.ndarray, first: int) -> np.ndarray:
        return p[(first + np.arange(self.q.shape[0])) // self.block_size]

    def dequantize(self, first: int = 0) -> np.ndarray:
        """The float weight; ``first``: the row of the whole weight that ``q``'s first row is (a slice of rows)."""
        centered = self.q.astype(np.float32) - self._per_row(self.zero_point, first).astype(np.float32)
        return (centered * self._per_row(self.scale, first)).astype(np.float32)

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


def _symmetric(scale: np.ndarray, qt: qmath.QType, half: int) -> qmath.QParams:
    scale = np.asarray(scale).astype(np.float32)  # zero checked after the cast: a tiny float64 step can underflow
    scale = np.where((scale != 0) & np.isfinite(scale), scale, np.float32(1.0)).astype(np.float32)
    return qmath.QParams(scale, np.full(scale.shape, half, dtype=np.uint8), qt, axis=0)


def _round_trip_error(x: np.ndarray, scale: np.ndarray, half: int) -> np.ndarray:
    """Per row, the squared error of symmetric quantization with ``scale`` (float32, as the kernels decode it)."""
    s = scale[:, None]
    r = np.clip(np.rint(x / s), -half, half - 1) * s
    r -= x
    return np.einsum("ij,ij->i", r, r)


def fit_blocks(x: np.ndarray, symmetric: bool, bits: int = 4) -> qmath.QParams:
    """4-bit (or 8-bit) parameters for each row of ``x [C, n]`` (one block per row), shape (C,) along axis 0.

    Symmetric 4-bit: each block takes whichever of three steps leaves the least squared error (see the module
    docstring): no clipping with the larger side on -8, onnxruntime's larger side / -8 (the other side clipped at
    7), or absmax / 7."""
    x = np.asarray(x, dtype=np.float64)
    lo = np.minimum(x.min(axis=1), 0.0)
    hi = np.maximum(x.max(axis=1), 0.0)
    qt, half = (UINT4, 8) if bits == 4 else (UINT8, 128)
    if not symmetric:
        return qmath.choose_qparams(lo, hi, qt, symmetric=False, axis=0)
    step_if_positive = np.maximum(-lo / half, hi / (half - 1))  # scale > 0: the negative side reaches -half
    step_if_negative = np.maximum(hi / half, -lo / (half - 1))  # scale < 0: the positive side reaches -half
    unclipped = _symmetric(np.where(step_if_negative < step_if_positive, -step_if_negative, step_if_positive), qt, half)
    if bits != 4:
        return unclipped
    larger = np.where(-lo >= hi, lo, hi)  # the signed value of the largest magnitude
    candidates = [unclipped, _symmetric(larger / -half, qt, half), _symmetric(np.maximum(-lo, hi) / (half - 1), qt, half)]
    x32 = x.astype(np.float32)
    errors = np.stack([_round_trip_error(x32, c.scale, half) for c in candidates])
    pick = np.argmin(errors, axis=0)  # ties: the first, the unclipped step
    return _symmetric(np.choose(pick, [c.scale for c in candidates]), qt, half)


def _blocks(a: np.ndarray, block_size: int) -> np.ndarray:
    """``a [K, N]`` as blocks [n_blocks * N, block_size] along K (zero-padded to whole blocks)."""
    k_dim, n_dim = a.shape
    n_blocks = -(-k_dim // block_size)
    padded = np.zeros((n_blocks * block_size, n_dim), dtype=a.dtype)
    padded[:k_dim] = a
    return padded.reshape(n_blocks, block_size, n_dim).transpose(0, 2, 1).reshape(n_blocks * n_dim, block_size)


CHUNK_VALUES = 1 << 22  # weights are quantized this many values at a time (16 MB of float32): a 262 MB embedding
# table no longer takes 2 GB of float64 temporaries; blocks never straddle chunks, so the result is the same


def blockwise(w: np.ndarray, block_size: int, fit: Callable[[np.ndarray, slice], qmath.QParams]) -> Int4Weight:
    """Block-wise quantization of ``w [K, N]`` along K with the parameters ``fit(blocks, columns)`` chooses for each
    block of the ``columns`` of ``w`` it is given (a few columns at a time, CHUNK_VALUES values)."""
    k_dim, n_dim = w.shape
    n_blocks = -(-k_dim // block_size)
    step = max(1, CHUNK_VALUES // max(n_blocks * block_size, 1))
    q = np.empty((k_dim, n_dim), dtype=np.uint8)
    scale = zero_point = None
    for start in range(0, n_dim, step):
        cols = slice(start, min(n_dim, start + step))
        width = cols.stop - cols.start
        blocks = _blocks(np.asarray(w[:, cols], dtype=np.float32), block_size)
        qp = fit(blocks, cols)
        part = qmath.quantize(blocks, qp).reshape(n_blocks, width, block_size).transpose(0, 2, 1)
        q[:, cols] = part.reshape(n_blocks * block_size, width)[:k_dim]
        if scale is None:
            scale = np.empty((n_blocks, n_dim), dtype=qp.scale.dtype)
            zero_point = np.empty((n_blocks, n_dim), dtype=qp.zero_point.dtype)
        scale[:, cols] = qp.scale.reshape(n_blocks, width)
        zero_point[:, cols] = qp.zero_point.reshape(n_blocks, width)
    return Int4Weight(q, scale, zero_point, block_size)


def rtn(w: np.ndarray, block_size: int, symmetric: bool, bits: int = 4) -> Int4Weight:
    """Round-to-nearest block-wise quantization of ``w [K, N]`` along K (8-bit for a mixed model's chosen layers)."""
    return blockwise(w, block_size, lambda blocks, _: fit_blocks(blocks, symmetric, bits))


def hqq_weight(w: np.ndarray, block_size: int) -> Int4Weight:
    """HQQ block parameters (affine, integer zero points): qconv.numeric.hqq."""
    return blockwise(w, block_size, lambda blocks, _: hqq.fit(blocks, UINT4))


def clipped_weight(w: np.ndarray, block_size: int, symmetric: bool, importance: np.ndarray) -> Int4Weight:
    """Round-to-nearest with each block's range clip-searched on the error weighted by ``importance`` [K] (the
    mean square of the input channel each row of ``w`` multiplies)."""
    column = np.asarray(importance, np.float32)[:, None]

    def fit(blocks, cols):
        weights = _blocks(np.broadcast_to(column, (w.shape[0], cols.stop - cols.start)).copy(), block_size)
        return awq.clip_fit(blocks, weights, partial(fit_blocks, symmetric=symmetric))
    return blockwise(w, block_size, fit)


def gptq_weight(w: np.ndarray, hessian: np.ndarray, block_size: int, symmetric: bool,
                act_order: bool = False) -> Int4Weight:
    q, scale, zero_point = gptq.gptq(w, hessian, block_size, partial(fit_blocks, symmetric=symmetric),
                                     PERCDAMP, act_order)
    return Int4Weight(q, scale, zero_point, block_size)


def rel_error(w: np.ndarray, qw: Int4Weight) -> float:
    norm = float(np.linalg.norm(w))
    if not norm:
        return 0.0
    step = max(1, CHUNK_VALUES // max(w.shape[1], 1))
    squares = 0.0
    for start in range(0, w.shape[0], step):  # a few rows at a time: no float copy of the whole weight
        part = Int4Weight(qw.q[start:start + step], qw.scale, qw.zero_point, qw.block_size)
        d = w[start:start + step] - part.dequantize(start)
        squares += float(np.einsum("ij,ij->", d, d, dtype=np.float64))
    return float(np.sqrt(squares)) / norm


def matmul_nbits_tensors(qw: Int4Weight, symmetric: bool, bits: int = 4) -> list[np.ndarray]:
    """MatMulNBits inputs B, scales (and zero_points when affine) for ``qw`` of a weight [K, N]; 8-bit values are
    stored one per byte (B [N, n_blocks, block_size], zero points [N, n_blocks])."""
    n_dim = qw.q.shape[1]
    n_blocks = qw.scale.shape[0]
    b = qw.padded_q().reshape(n_blocks, qw.block_size, n_dim).transpose(2, 0, 1)
    pack = pack_nibbles if bits == 4 else np.ascontiguousarray
    arrays = [pack(b), np.ascontiguousarray(qw.scale.T)]
    return arrays if symmetric else arrays + [pack(qw.zero_point.T)]


def gather_tensors(qw: Int4Weight, symmetric: bool, bits: int = 4) -> list[np.ndarray]:
    """GatherBlockQuantized data, scales (and zero_points when affine) for ``qw`` of a transposed table [D, V]; 8-bit
    values one per byte (data [V, D], default zero point 128)."""
    pack = pack_nibbles if bits == 4 else np.ascontiguousarray
    arrays = [pack(qw.q.T), np.ascontiguousarray(qw.scale.T)]
    return arrays if symmetric else arrays + [pack(qw.zero_point.T)]


def _check_options(block_size, method: str, calib_feeds, accuracy_level) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size not in BLOCK_SIZES:
        raise UsageError(f"block_size must be a power of two from 16 to 256 ({', '.join(map(str, BLOCK_SIZES))}), "
                         f"got {block_size!r}")
    if method not in METHODS:
        raise UsageError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if method in CALIBRATED and calib_feeds is None:
        raise UsageError(f"method '{method}' needs calibration data (calib_feeds); use method 'rtn' or 'hqq' without data")
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
    if not all_finite(t):
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


def hessian_session(model: onnx.ModelProto, names: Iterable[str]):
    """A float session that also outputs ``names`` (those computed in the graph): one per model, whichever group of
    them a pass reads, so every pass computes them alike (what is exposed changes which nodes onnxruntime fuses)."""
    graph_inputs = set(Graph(model).graph_inputs)
    return exposed_session(model, {n: TensorProto.FLOAT for n in sorted(names) if n not in graph_inputs})


def input_hessians(model: onnx.ModelProto, widths: dict[str, int], feeds: Iterable[dict], sess=None) -> dict[str, np.ndarray]:
    """``mean(x^T x)`` (float64 [K, K]) of each named float tensor, streaming the feeds. Rows are pooled (float32)
    until a tensor has K of them, then one float32 product is added to the float64 sum: adding a K x K product for
    every small feed cost more memory traffic than the products themselves (MiniLM, 256 feeds of 48 tokens: 29 s
    of the run); the pool is at most K x K float32, half the sum's own size."""
    graph_inputs = set(Graph(model).graph_inputs)
    names = sorted(widths)
    computed = [n for n in names if n not in graph_inputs]
    sess = sess if sess is not None else hessian_session(model, names)
    sums = {n: np.zeros((widths[n], widths[n])) for n in names}
    rows = dict.fromkeys(names, 0)
    pools: dict[str, list[np.ndarray]] = {n: [] for n in names}
    pooled = dict.fromkeys(names, 0)

    def flush(name):
        if pools[name]:
            x = np.concatenate(pools[name]) if len(pools[name]) > 1 else pools[name][0]
            sums[name] += x.T @ x
            pools[name], pooled[name] = [], 0

    for feed in feeds:
        values = dict(zip(computed, run(sess, feed, computed)))
        for name in names:
            x = np.asarray(feed[name] if name in graph_inputs else values[name], dtype=np.float32).reshape(-1, widths[name])
            pools[name].append(x)
            pooled[name] += x.shape[0]
            rows[name] += x.shape[0]
            if pooled[name] >= widths[name]:
                flush(name)
    for name in names:
        flush(name)
        if rows[name] == 0:
            raise UsageError(f"int4 methods gptq and awq need calibration data, but calib_feeds gave no rows for '{name}'")
        if not np.all(np.isfinite(sums[name])):
            raise QconvError(f"calibration activations of '{name}' hold inf/NaN values, which GPTQ cannot use: "
                             "use method 'rtn' or exclude the MatMuls reading it")
    for name in names:  # in place: a second copy of every Hessian at once was the peak
        sums[name] /= rows[name]
    return sums


def _weight_hessians(per_input: dict[str, np.ndarray], matmuls) -> dict[str, np.ndarray]:
    """Hessian per MatMul weight: the sum over the MatMuls reading that weight."""
    hessians: dict[str, np.ndarray] = {}
    for node in matmuls:  # one reader: its input's array itself (q/k/v share one; GPTQ copies what it changes)
        w, h = node.input[1], per_input[node.input[0]]
        hessians[w] = h if w not in hessians else hessians[w] + h
    return hessians


HESSIAN_BYTES = 1 << 30  # GPTQ's Hessians one float pass may hold (each input K x K: float64 sum + float32 row pool)


def hessian_groups(matmuls: list[onnx.NodeProto], widths: dict[str, int], budget: int = HESSIAN_BYTES) -> list[list[onnx.NodeProto]]:
    """The MatMuls in groups whose inputs' Hessians fit ``budget`` bytes together, in graph order; inputs that share a
    weight stay in one group (its Hessian sums them). One group when all fit: a 7B decoder's would need ~44 GB, so
    they are taken a group at a time, one float pass over the data each."""
    parent = {n.input[0]: n.input[0] for n in matmuls}

    def root(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    first_reader: dict[str, str] = {}
    for n in matmuls:  # inputs read through one weight are one unit
        if n.input[1] in first_reader:
            parent[root(n.input[0])] = root(first_reader[n.input[1]])
        else:
            first_reader[n.input[1]] = n.input[0]
    units: dict[str, list[onnx.NodeProto]] = {}
    for n in matmuls:
        units.setdefault(root(n.input[0]), []).append(n)
    packs = consecutive(units.values(), lambda nodes: sum(12 * widths[x] ** 2 for x in {n.input[0] for n in nodes}), budget)
    return [[n for nodes in pack for n in nodes] for pack in packs] or [[]]


@dataclass
class _Scaling:
    """AWQ's result for one input tensor: the channel scale, its alpha, and where ``1 / s`` went."""

    input: str
    scale: np.ndarray
    alpha: float
    folded_into: str | None  # an initializer or node name; None: a Mul is inserted before the MatMuls


def _fold_target(g: Graph, x: str, readers: list[onnx.NodeProto]) -> tuple[str, list[str]] | None:
    """Where ``1 / s`` for input ``x`` can be folded exactly: (what, [initializers to divide, and how]); None when
    only an inserted Mul can carry it. Kinds: 'rows' (divide a [K] vector), 'columns' (divide a weight's columns)."""
    if x in g.graph_outputs or x in g.pinned or {id(n) for n in g.consumers.get(x, [])} != {id(n) for n in readers}:
        return None
    producer = g.producer.get(x)
    if producer is None:
        return None
    k_dim = int(g.initializers[readers[0].input[1]].dims[0])

    def vector(name):
        return g.is_constant(name) and g.types.get(name) == TensorProto.FLOAT and len(g.consumers[name]) == 1 and \
            int(np.prod(g.initializers[name].dims)) == k_dim and list(g.initializers[name].dims)[-1] == k_dim

    if producer.op_type in ("LayerNormalization", "SimplifiedLayerNormalization") and producer.output[0] == x \
            and all(vector(n) for n in producer.input[1:3] if n) and len(producer.input) >= 2:
        return "rows", [n for n in producer.input[1:3] if n]
    if producer.op_type == "Mul" and producer.domain in ("", "ai.onnx"):
        for const, other in ((producer.input[1], producer.input[0]), (producer.input[0], producer.input[1])):
            if vector(const):
                return "rows", [const]
        for side in producer.input:
            mm = g.producer.get(side)
            if (mm is not None and mm.op_type == "MatMul" and g.is_constant(mm.input[1]) and g.only_consumer(side) is producer
                    and g.types.get(mm.input[1]) == TensorProto.FLOAT and list(g.initializers[mm.input[1]].dims)[-1] == k_dim
                    and len(g.initializers[mm.input[1]].dims) == 2):
                return "columns", [mm.input[1]]
    return None


def _by_input(matmuls) -> dict[str, list[onnx.NodeProto]]:
    """{input tensor: the MatMuls reading it}, in graph order."""
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in matmuls:
        out.setdefault(node.input[0], []).append(node)
    return out


def _inputs_of_weight(matmuls) -> dict[str, set[str]]:
    """{weight: the input tensors of the MatMuls reading it}."""
    out: dict[str, set[str]] = {}
    for node in matmuls:
        out.setdefault(node.input[1], set()).add(node.input[0])
    return out


@dataclass
class _AwqState:
    """What AWQ has decided so far: {weight: diag(s) W}, {weight: importance [K]}, the scalings, and the weights whose
    columns took a later input's ``1 / s`` before their own input was searched (``overrides``)."""

    scaled: dict[str, np.ndarray] = field(default_factory=dict)
    importance: dict[str, np.ndarray] = field(default_factory=dict)
    scalings: list[_Scaling] = field(default_factory=list)
    overrides: dict[str, np.ndarray] = field(default_factory=dict)


def _awq(g: Graph, matmuls, per_input: dict[str, np.ndarray], block_size: int, symmetric: bool,
         state: _AwqState | None = None, only: set[str] | None = None) -> _AwqState:
    """AWQ over the int4 MatMuls, input by input in graph order (``only``: those inputs, for a group of Hessians;
    ``state`` carries the earlier groups' decisions). Folds ``1 / s`` into the initializers of ``g``'s model where
    _fold_target allows; the caller inserts Muls for the rest, and ends with ``_awq_finish``."""
    state = state or _AwqState()
    inputs_of_weight = _inputs_of_weight(matmuls)
    round_trip = lambda w: rtn(w, block_size, symmetric).dequantize()  # noqa: E731
    scaled, overrides = state.scaled, state.overrides
    for x, readers in _by_input(matmuls).items():
        if only is not None and x not in only:
            continue
        h = per_input[x]
        weights = sorted({n.input[1] for n in readers})
        shared = any(len(inputs_of_weight[w]) > 1 for w in weights)
        arrays = {w: overrides.get(w, g.array(w).astype(np.float32)) for w in weights}
        if shared:
            s, alpha = np.ones(h.shape[0]), 0.0
        else:
            s, alpha, _ = awq.search_scale([arrays[w] for w in weights], h, round_trip)
        diag = np.maximum(np.diag(h), 0.0) / (s * s)
        for w in weights:
            scaled[w] = (arrays[w] * s[:, None]).astype(np.float32)
            state.importance[w] = diag
        if alpha == 0.0:
            continue
        target = _fold_target(g, x, readers)
        folded = None
        if target is not None:
            kind, names = target
            for name in names:
                if kind == "rows":
                    v = g.array(name).astype(np.float64)
                    g.initializers[name].CopyFrom(numpy_helper.from_array((v / s.reshape(v.shape)).astype(np.float32), name))
                elif name in scaled:  # a weight already scaled and quantized earlier in this loop: divide both
                    scaled[name] = (scaled[name] / s[None, :]).astype(np.float32)
                else:
                    overrides[name] = (overrides.get(name, g.array(name).astype(np.float32)) / s[None, :]).astype(np.float32)
            folded = names[0]
        state.scalings.append(_Scaling(x, s, alpha, folded))
    return state


def _awq_finish(g: Graph, state: _AwqState, matmuls) -> None:
    """The weights that took a ``1 / s`` in their columns but are not AWQ's own (kept float): written back."""
    own = _inputs_of_weight(matmuls)
    for name, arr in state.overrides.items():
        if name not in own:
            g.initializers[name].CopyFrom(numpy_helper.from_array(arr, name))


def _column_folds(g: Graph, matmuls) -> dict[str, set[str]]:
    """{weight: the inputs whose ``1 / s`` AWQ may fold into its columns}: a weight is final only after them."""
    waits: dict[str, set[str]] = {}
    for x, readers in _by_input(matmuls).items():
        target = _fold_target(g, x, readers)
        if target is not None and target[0] == "columns":
            for name in target[1]:
                waits.setdefault(name, set()).add(x)
    return waits


def _insert_scales(m: onnx.ModelProto, g: Graph, scalings: list[_Scaling], replaced: dict[str, onnx.NodeProto]) -> None:
    """A ``Mul`` by ``1 / s`` before the int4 MatMuls of each scaling that could not be folded."""
    added = []
    for sc in scalings:
        if sc.folded_into is not None:
            continue
        inv = g.unique(sc.input + "_awq_inv_scale")
        out = g.unique(sc.input + "_awq_scaled")
        m.graph.initializer.append(numpy_helper.from_array((1.0 / sc.scale).astype(np.float32), inv))
        added.append(helper.make_node("Mul", [sc.input, inv], [out], name=g.unique(sc.input + "_awq_scale")))
        for node in m.graph.node:
            if node.op_type == "MatMulNBits" and node.input[0] == sc.input and node.name in replaced:
                node.input[0] = out
    if added:
        m.graph.node.extend(added)
        topo_sort(m)


def _encode(g: Graph, node: onnx.NodeProto, block_size: int, symmetric: bool, method: str, hessian, act_order: bool,
            weight: np.ndarray | None = None, importance: np.ndarray | None = None, bits: int = 4, gain: bool = False,
            gain_hessian: np.ndarray | None = None):
    """(new initializers, quantized record without the node name, ``_int4_gain`` or None) for the weight of ``node``;
    ``weight``, when given, replaces the stored one (AWQ's scaled weight). ``bits=8``: a mixed model's 8-bit layer
    (symmetric round-to-nearest, MatMulNBits bits=8). ``gain``: a size budget's measure of this int4 weight, on
    ``gain_hessian`` when there is one, taken here while the weight and its approximation are at hand."""
    name = _weight_input(node)
    w = _float_array(g, name) if weight is None else weight
    affine = not symmetric or method == "hqq"
    if bits == 8:
        table = node.op_type == "Gather"
        qw = rtn(w.T if table else w, block_size, True, bits=8)
        arrays = gather_tensors(qw, True, 8) if table else matmul_nbits_tensors(qw, True, 8)
        inits = [numpy_helper.from_array(a, g.unique(name + sfx)) for a, sfx in zip(arrays, ("_Q8", "_scales8"))]
        record = {"op_type": node.op_type, "weight": name, "shape": list(w.shape), "block_size": block_size,
                  "symmetric": True, "method": "rtn", "bits": 8, "rel_error": rel_error(w.T if table else w, qw)}
        return inits, record, None
    if node.op_type == "Gather":
        qw = rtn(w.T, block_size, symmetric)
        arrays, err, used = gather_tensors(qw, symmetric), rel_error(w.T, qw), "rtn"
        affine = not symmetric
    else:
        if method in ("gptq", "awq_gptq") and hessian is not None:
            qw = gptq_weight(w, hessian, block_size, symmetric, act_order)
        elif method == "hqq":
            qw = hqq_weight(w, block_size)
        elif method == "awq" and importance is not None:
            qw = clipped_weight(w, block_size, symmetric, importance)
        else:
            qw = rtn(w, block_size, symmetric)
        used = method if method != "gptq" or hessian is not None else "rtn"
        arrays, err = matmul_nbits_tensors(qw, not affine), rel_error(w, qw)
    suffixes = ("_Q4", "_scales", "_zero_points")
    inits = [numpy_helper.from_array(a, g.unique(name + s)) for a, s in zip(arrays, suffixes)]
    record = {"op_type": node.op_type, "weight": name, "shape": list(w.shape), "block_size": block_size,
              "symmetric": not affine, "method": used, "bits": 4, "rel_error": err}
    if not gain:
        return inits, record, None
    approx = qw.dequantize() if node.op_type == "MatMul" else qw.dequantize().T
    return inits, record, _int4_gain(node.op_type, w, approx, gain_hessian, block_size)


def _float_array(g: Graph, name: str) -> np.ndarray:
    """A weight as float32, not copied when it is float32 already and writable (a lazy weight, mapped from its file)."""
    w = g.array(name)
    return w if w.dtype == np.float32 and w.flags.writeable else w.astype(np.float32)


def _int4_gain(op_type: str, w: np.ndarray, approx: np.ndarray, h: np.ndarray | None, block_size: int) -> tuple[float, int]:
    """(int4 error per byte that 8 bits would add, the bytes added) of one weight: the error measured as
    ``tr(D^T H D) / tr(W^T H W)`` on the calibration Hessian when there is one (MatMuls with --data), else on the
    weight (``||D||^2 / ||W||^2``). Measured as each weight is encoded, while its Hessian is at hand, so neither the
    dequantized weights nor every Hessian are held until the budget is spent."""
    d = w.astype(np.float64) - approx
    err = awq.output_error(w, approx, h) / max(awq.output_error(w, np.zeros_like(w), h), 1e-30) if h is not None \
        else float(np.sum(d * d)) / max(float(np.sum(w.astype(np.float64) ** 2)), 1e-30)
    k_dim, n_dim = w.shape if op_type == "MatMul" else w.T.shape
    n_blocks = -(-k_dim // block_size)
    extra = n_dim * n_blocks * block_size // 2  # a byte per value instead of half of one
    return -err / max(extra, 1), extra


def _eight_bit(gains: dict[tuple[str, str], tuple[float, int]], size: int, budget: int) -> list[tuple[str, str]]:
    """The (op type, weight) keys of the MatMul weights and Gather tables to store in 8 bits so that the model stays
    within ``budget`` bytes (``size``: all in int4): greedily by int4 error removed per byte added (``_int4_gain``)."""
    chosen = []
    for _, key, extra in sorted((gain, key, extra) for key, (gain, extra) in gains.items()):
        if size + extra <= budget:
            chosen.append(key)
            size += extra
    return chosen


def _replacement(g: Graph, node: onnx.NodeProto, inits: list[TensorProto], block_size: int,
                 accuracy_level: int | None, bits: int = 4) -> onnx.NodeProto:
    data, params = inits[0].name, [t.name for t in inits[1:]]
    name = g.unique(node.name + "_Q4")
    if node.op_type == "Gather":
        return helper.make_node("GatherBlockQuantized", [data, node.input[1], *params], list(node.output), name=name,
                                domain=MS_DOMAIN, bits=bits, block_size=block_size, gather_axis=0, quantize_axis=1)
    k_dim, n_dim = g.initializers[_weight_input(node)].dims
    level = EIGHT_BIT_LEVEL if bits == 8 else accuracy_level
    extra = {} if level is None else {"accuracy_level": level}
    return helper.make_node("MatMulNBits", [node.input[0], data, *params], list(node.output), name=name,
                            domain=MS_DOMAIN, K=k_dim, N=n_dim, bits=bits, block_size=block_size, **extra)


def _scaled_hessians(hessians: dict[str, np.ndarray], scalings: list[_Scaling], matmuls) -> None:
    """The error of a scaled weight is measured on the scaled input: its Hessian divided by ``s s^T``."""
    for sc in scalings:
        for node in matmuls:
            if node.input[0] == sc.input:
                hessians[node.input[1]] = hessians[node.input[1]] / np.outer(sc.scale, sc.scale)


def _search_order_kept(groups, matmuls) -> bool:
    """Whether taking ``groups`` in turn searches the inputs in the order one pass does (AWQ's folds depend on it)."""
    order = list(_by_input(matmuls))
    return [x for group in groups for x in order if x in {n.input[0] for n in group}] == order


def _in_groups(model: onnx.ModelProto, matmuls, groups, widths: dict[str, int], calib_feeds, hessians: dict[str, np.ndarray],
               encode: Callable[[onnx.NodeProto], None], search=None, waits: dict[str, set[str]] | None = None) -> None:
    """Hessians past HESSIAN_BYTES: one float pass per group, through one session exposing every input (what is
    exposed changes which nodes onnxruntime fuses, so every pass computes them alike); ``search(per_input, weight
    Hessians, inputs)`` (AWQ) on the group; then each weight is encoded as soon as it is final: its readers' inputs
    taken, and every input in ``waits`` for it (AWQ: a later input whose ``1 / s`` may fold into its columns). Its
    Hessian is dropped then, so a pass holds one group's Hessians and the few weights still waiting."""
    feeds = list(calib_feeds) if iter(calib_feeds) is calib_feeds else calib_feeds  # a generator is read once
    readers, waits = _inputs_of_weight(matmuls), waits or {}
    taken: set[str] = set()
    done: set[str] = set()
    sess = hessian_session(model, widths)
    for group in groups:
        inputs = {n.input[0] for n in group}
        per_input = input_hessians(model, {x: widths[x] for x in inputs}, feeds, sess)
        weight_h = _weight_hessians(per_input, group)
        if search is not None:
            search(per_input, weight_h, inputs)
        del per_input
        hessians.update(weight_h)
        taken |= inputs
        for node in matmuls:
            w = node.input[1]
            if w not in done and readers[w] <= taken and waits.get(w, set()) <= taken:
                encode(node)
                done.add(w)
                hessians.pop(w, None)
    del sess


def quantize_int4(model: onnx.ModelProto, block_size: int = 32, symmetric: bool = True, method: str = "rtn",
                  calib_feeds: Iterable[dict[str, np.ndarray]] | None = None, exclude_nodes=(),
                  accuracy_level: int | None = None, act_order: bool = False, only_nodes=None,
                  max_bytes: int | None = None) -> WeightOnlyResult:
    """Store constant MatMul weights and Gather tables of ``model`` as block-wise int4 (see the module docstring).

    ``exclude_nodes`` are node-name globs kept in float. ``method`` "gptq" and "awq" stream ``calib_feeds`` (feed
    dicts, one batch each) through onnxruntime; "rtn" and "hqq" do not use them. ``max_bytes``: a size budget that
    buys 8-bit storage for the MatMuls whose int4 error is largest (_eight_bit). The input model is not changed.
    """
    _check_options(block_size, method, calib_feeds, accuracy_level)
    block_size = int(block_size)
    src = Graph(model)
    chosen, kept = _select(model, src, block_size, exclude_nodes, None if only_nodes is None else set(only_nodes))
    chosen_ids = {id(n) for n in chosen.values()}
    replaced_weights = {_weight_input(n) for n in chosen.values()}
    only_read_here = {w for w in replaced_weights if w not in src.graph_outputs and w not in src.pinned
                      and all(id(n) in chosen_ids for n in src.consumers.get(w, []))}
    m = copy_with_placeholders(model, only_read_here)  # the float weights being replaced are read from ``model``
    g = _Sourced(m, src, only_read_here)
    targets = {position: m.graph.node[position] for position in chosen}
    matmuls = [n for n in targets.values() if n.op_type == "MatMul"]
    widths = {n.input[0]: int(g.initializers[n.input[1]].dims[0]) for n in matmuls}
    hessians: dict[str, np.ndarray] = {}
    state = _AwqState()  # AWQ's decisions (empty for the other methods)
    scaled, importance, scalings = state.scaled, state.importance, state.scalings
    spill = Spill() if has_lazy(model) else None  # past 2 GB: each new weight goes to a file as it is made
    gains: dict[tuple[str, str], tuple[float, int]] = {}  # a size budget's measure of each int4 weight (_int4_gain)

    def encode(node, bits=4):
        weight = _weight_input(node)
        mm = node.op_type == "MatMul"
        inits, record, gain = _encode(g, node, block_size, symmetric, method, hessians.get(weight) if method in ("gptq", "awq_gptq") else None,
                                      act_order, scaled.get(weight) if mm else None, importance.get(weight) if mm else None, bits,
                                      gain=max_bytes is not None and bits == 4, gain_hessian=hessians.get(weight) if mm else None)
        if gain is not None:
            gains[(node.op_type, weight)] = gain
        return ([spill.keep(t) for t in inits] if spill else inits), record

    groups = hessian_groups(matmuls, widths, HESSIAN_BYTES) if method in CALIBRATED and matmuls else [matmuls]
    awq_run = method in ("awq", "awq_gptq")
    if awq_run and not _search_order_kept(groups, matmuls):
        groups = [matmuls]
    grouped, eight = {}, {}
    if len(groups) > 1:

        def encode_now(node):  # final: encoded, and AWQ's float copies of the weight dropped
            key = (node.op_type, _weight_input(node))
            grouped[key] = encode(node)
            if awq_run and max_bytes is not None:  # the 8 bits a budget may buy, from the scaled weight while it is here
                eight[key] = encode(node, bits=8)
            scaled.pop(key[1], None)
            state.overrides.pop(key[1], None)

        def search(per_input, weight_h, inputs):
            first = len(scalings)
            _awq(g, matmuls, per_input, block_size, symmetric, state, only=inputs)
            _scaled_hessians(weight_h, scalings[first:], matmuls)

        _in_groups(model, matmuls, groups, widths, calib_feeds, hessians, encode_now,
                   search if awq_run else None, _column_folds(g, matmuls) if awq_run else None)
        hessians = {}
    elif method in CALIBRATED and matmuls:
        per_input = input_hessians(model, widths, calib_feeds)
        hessians = _weight_hessians(per_input, matmuls)
        if awq_run:
            _awq(g, matmuls, per_input, block_size, symmetric, state)
            _scaled_hessians(hessians, scalings, matmuls)
        del per_input
    _awq_finish(g, state, matmuls)

    encoded = {}
    for node in targets.values():
        key = (node.op_type, _weight_input(node))
        if key not in encoded:
            encoded[key] = grouped.pop(key) if key in grouped else encode(node)
    if max_bytes is not None:
        for key in _eight_bit(gains, _size_after(m, g, encoded, targets), max_bytes):
            node = next(n for n in targets.values() if (n.op_type, _weight_input(n)) == key)
            encoded[key] = eight.pop(key) if key in eight else encode(node, bits=8)
    eight.clear()
    quantized, replaced = [], {}
    for position, node in targets.items():
        inits, record = encoded[(node.op_type, _weight_input(node))]
        quantized.append({"node": node.name, **record})
        new = _replacement(g, node, inits, block_size, accuracy_level, record["bits"])
        m.graph.node[position].CopyFrom(new)
        replaced[new.name] = new
    for key, (inits, record) in encoded.items():  # one weight's tensors at a time: extend copies them
        m.graph.initializer.extend(inits)
        encoded[key] = ([], record)
    if targets and not any(op.domain == MS_DOMAIN for op in m.opset_import):
        m.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    _insert_scales(m, g, scalings, replaced)
    drop_unused_initializers(m, [weight for _, weight in encoded])
    return WeightOnlyResult(m, quantized, kept, [{"input": sc.input, "alpha": sc.alpha, "folded_into": sc.folded_into,
                                                  "scale_range": [float(np.min(sc.scale)), float(np.max(sc.scale))]}
                                                 for sc in scalings])


def _size_after(m: onnx.ModelProto, g: "_Sourced", encoded: dict, targets: dict) -> int:
    """Bytes of the model once every target is stored as ``encoded`` says (float weights gone, new ones added)."""
    weights = {name for _, name in encoded}
    ids = {id(n) for n in targets.values()}
    readers_left = {name for name in weights for n in g.consumers.get(name, []) if id(n) not in ids}
    dropped = sum(stored_bytes(g.initializers[name]) for name in weights - readers_left)
    added = sum(stored_bytes(t) for inits, _ in encoded.values() for t in inits)
    return m.ByteSize() + sum(stored_bytes(t) - t.ByteSize() for t in m.graph.initializer) - dropped + added


class _Sourced(Graph):
    """The index of a copy whose replaced weights are placeholders: their arrays are read from the source graph."""

    def __init__(self, model: onnx.ModelProto, source: Graph, placeholders: set[str]):
        super().__init__(model)
        self.source, self.placeholders = source, placeholders

    def array(self, name: str) -> np.ndarray:
        return self.source.array(name) if name in self.placeholders else super().array(name)


FAST_LEVEL = 4  # int8 products of the activations with the 4-bit weights (VNNI / AVX-512 kernels on x86)
LEVEL_ARGMAX_DROP = 0.005  # level 4 may lose at most this much argmax agreement with the float model...
LEVEL_COSINE_GROWTH = 1.25  # ...and grow the cosine distance to it by at most this factor
LEVEL_FEEDS = 4


def with_accuracy_level(model: onnx.ModelProto, level: int | None) -> onnx.ModelProto:
    """A copy with ``accuracy_level`` set on every 4-bit MatMulNBits (None: the attribute removed, onnxruntime's
    default). 8-bit ones (mixed models) keep EIGHT_BIT_LEVEL, whatever the level: onnxruntime 1.32's CPU kernel
    for them at the default level is ~50x slower per token (measured) and slower on a batch too."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return set_accuracy_level(m, level)


def set_accuracy_level(model: onnx.ModelProto, level: int | None) -> onnx.ModelProto:
    """with_accuracy_level in place (no copy of the weights); returns ``model``."""
    for node in model.graph.node:
        if node.op_type == "MatMulNBits" and node.domain == MS_DOMAIN and attr(node, "bits", 4) == 4:
            kept = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend(kept)
            if level is not None:
                node.attribute.append(helper.make_attribute("accuracy_level", level))
    return model


def generated_feeds(model: onnx.ModelProto, count: int = LEVEL_FEEDS, length: int = 16, seed: int = 0) -> list[dict]:
    """Feeds for a model with no data given: token ids drawn from the vocabulary of the table they index,
    floats from N(0, 1), symbolic dims ``length`` (batch 1), and a decoder's cache inputs empty."""
    from qconv.data import InputSpec, complete, derivable

    g = Graph(model)
    rng = np.random.default_rng(seed)
    specs = [InputSpec.from_value_info(i) for i in model.graph.input if i.name not in g.initializers]
    auto = {s.name for s in derivable(specs, {s.name for s in specs if s.name == "input_ids"})}
    feeds = []
    for _ in range(count):
        feed = {}
        for s in specs:
            if s.name in auto:
                continue
            shape = [d if isinstance(d, int) and d > 0 else (1 if k == 0 else length) for k, d in enumerate(s.shape)]
            if s.dtype.kind in "iu":
                tables = [int(g.initializers[n.input[0]].dims[0]) for n in g.consumers.get(s.name, [])
                          if n.op_type == "Gather" and n.input[1] == s.name and n.input[0] in g.initializers]
                feed[s.name] = rng.integers(0, min(tables) if tables else 2, size=shape).astype(s.dtype)
            elif s.dtype.kind == "b":
                feed[s.name] = np.ones(shape, dtype=bool)
            else:
                feed[s.name] = rng.standard_normal(shape).astype(s.dtype)
        feeds.append(complete(feed, specs, "generated feeds"))
    return feeds


def _agreement(reference: list[list[np.ndarray]], outputs: list[list[np.ndarray]], names: list[str]) -> dict:
    """Lowest cosine over outputs against the reference and, over outputs whose last axis reads as scores (rank >= 2,
    last dim >= 2, not a cache), the fraction of positions with the reference's argmax."""
    cosines, same, total = [], 0, 0
    for k, name in enumerate(names):
        a = np.concatenate([np.asarray(r[k], np.float64).ravel() for r in reference])
        b = np.concatenate([np.asarray(o[k], np.float64).ravel() for o in outputs])
        den = float(np.sqrt((a @ a) * (b @ b)))
        cosines.append(float(a @ b) / den if den > 0 else 1.0)
        if is_cache_name(name):
            continue
        for r, o in zip(reference, outputs):
            if np.ndim(r[k]) >= 2 and np.shape(r[k])[-1] >= 2 and np.size(r[k]):
                same += int(np.sum(np.argmax(r[k], axis=-1) == np.argmax(o[k], axis=-1)))
                total += int(np.size(r[k]) // np.shape(r[k])[-1])
    return {"min_cosine": round(min(cosines), 6) if cosines else 1.0, "argmax_agreement": round(same / total, 6) if total else None}


def level_agreement(original: onnx.ModelProto, model: onnx.ModelProto, feeds: list[dict], level: int = FAST_LEVEL) -> dict:
    """Agreement with the float model of the int4 ``model`` at onnxruntime's default level and at ``level``
    (qconv.rewrite.weight_only._agreement), on ``feeds``. Deterministic: no timing decides anything."""
    ref_sess = session(original, prepack=False)
    names = [o.name for o in ref_sess.get_outputs()]
    reference = [run(ref_sess, f, names) for f in feeds]
    out = {}
    del ref_sess  # a model past 2 GB: its float weights are not held while the int4 ones are
    before = {k: [onnx.AttributeProto.FromString(a.SerializeToString()) for a in n.attribute]
              for k, n in enumerate(model.graph.node) if n.op_type == "MatMulNBits"}
    try:
        for key, lvl in (("default", None), (f"level{level}", level)):
            # in place, restored below: no copy of the weights. Prepacked whatever the model's size: onnxruntime's
            # MatMulNBits reads accuracy_level only in its packed kernels (unpacked, level 4 computed as the default).
            sess = session(set_accuracy_level(model, lvl), prepack=True)
            out[key] = _agreement(reference, [run(sess, f, names) for f in feeds], names)
            del sess
            give_back()  # its packed weights: the next session's are not held beside them
    finally:
        for k, attributes in before.items():
            del model.graph.node[k].attribute[:]
            model.graph.node[k].attribute.extend(attributes)
    return out


def choose_accuracy_level(original: onnx.ModelProto, model: onnx.ModelProto, feeds: list[dict],
                          rows: str) -> tuple[onnx.ModelProto, dict]:
    """The int4 model with accuracy_level 4 when it keeps the float model's outputs about as well as the default
    computation does on ``feeds`` (argmax agreement down at most LEVEL_ARGMAX_DROP, cosine distance grown at most
    LEVEL_COSINE_GROWTH times), else unchanged; and the record of the comparison."""
    m = level_agreement(original, model, feeds)
    base, fast = m["default"], m[f"level{FAST_LEVEL}"]
    ok = (1 - fast["min_cosine"]) <= LEVEL_COSINE_GROWTH * (1 - base["min_cosine"]) + 1e-6
    if base["argmax_agreement"] is not None:
        ok = ok and fast["argmax_agreement"] >= base["argmax_agreement"] - LEVEL_ARGMAX_DROP
    record = {"chosen": FAST_LEVEL if ok else None, "rows": rows, **m}
    if not ok:
        record["why"] = (f"accuracy_level {FAST_LEVEL} kept the float model's outputs less well (min cosine {fast['min_cosine']} vs "
                         f"{base['min_cosine']}, argmax agreement {fast['argmax_agreement']} vs {base['argmax_agreement']}): "
                         "onnxruntime's default (float activations) kept")
    return (set_accuracy_level(model, FAST_LEVEL) if ok else model), record
