"""An indexed view of a ModelProto's main graph: producers, consumers, constants, types, unique names."""

from __future__ import annotations

import os
from collections import defaultdict, deque
from typing import Callable, Iterator

import numpy as np
import onnx
from onnx import numpy_helper

FLOAT = onnx.TensorProto.FLOAT
FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16})


def subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Outer-scope names a node's subgraphs (If/Loop/Scan bodies) read."""
    names: set[str] = set()
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            local = {i.name for i in g.input} | {t.name for t in g.initializer}
            for n in g.node:
                local.update(n.output)
            for n in g.node:
                names.update(i for i in n.input if i and i not in local)
                names.update(subgraph_inputs(n) - local)
    return names


class Graph:
    """Index of the main graph. Rebuild it after structural edits (it is cheap)."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        g = model.graph
        self.initializers = {t.name: t for t in g.initializer}
        self.graph_inputs = [i.name for i in g.input if i.name not in self.initializers]
        self.graph_outputs = {o.name for o in g.output}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        self.pinned: set[str] = set()  # read by a subgraph: never renamed or removed
        for node in g.node:
            for o in node.output:
                if o:
                    self.producer[o] = node
            for i in node.input:
                if i:
                    self.consumers[i].append(node)
            self.pinned |= subgraph_inputs(node)
        self.types = {}
        for vi in list(g.input) + list(g.value_info) + list(g.output):
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
                self.types[vi.name] = vi.type.tensor_type.elem_type
        for t in g.initializer:
            self.types[t.name] = t.data_type
        self._names = set(self.producer) | set(self.initializers) | set(self.graph_inputs)
        self._names |= {n.name for n in g.node if n.name}

    def is_constant(self, name: str) -> bool:
        return name in self.initializers

    def array(self, name: str) -> np.ndarray:
        return tensor_array(self.initializers[name])

    def is_float(self, name: str) -> bool:
        return self.types.get(name) == FLOAT

    def shape(self, name: str) -> list | None:
        for vi in list(self.model.graph.input) + list(self.model.graph.value_info) + list(self.model.graph.output):
            if vi.name == name and vi.type.tensor_type.HasField("shape"):
                return [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
        if name in self.initializers:
            return list(self.initializers[name].dims)
        return None

    def unique(self, base: str) -> str:
        """A tensor or node name not yet used in the graph."""
        name, k = base, 1
        while name in self._names:
            name, k = f"{base}_{k}", k + 1
        self._names.add(name)
        return name

    def only_consumer(self, name: str) -> onnx.NodeProto | None:
        cons = self.consumers.get(name, [])
        if len(cons) == 1 and name not in self.graph_outputs and name not in self.pinned:
            return cons[0]
        return None


def integer_only(node: onnx.NodeProto, g: Graph) -> bool:
    """True when no output is float: shape and index math (Shape, Range, comparisons on shapes...)."""
    outs = [n for n in node.output if n]
    return bool(outs) and all(n in g.types and g.types[n] not in FLOAT_TYPES for n in outs)


# Weights left in their file (models past protobuf's 2 GB, loaded by qconv.io with ``lazy``): the tensor keeps
# data_location EXTERNAL with an absolute ``location``, and is read one at a time where it is used. onnxruntime
# refuses absolute locations, so sessions and saved models go through qconv.runtime.write_external / qconv.io.
def is_lazy(t: onnx.TensorProto) -> bool:
    return t.data_location == onnx.TensorProto.EXTERNAL and os.path.isabs(external_info(t).get("location", ""))


def external_info(t: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def lazy_span(t: onnx.TensorProto) -> tuple[str, int, int]:
    """(file, offset, length) of a lazy tensor's bytes."""
    info = external_info(t)
    offset = int(info.get("offset", 0))
    length = int(info["length"]) if "length" in info else os.path.getsize(info["location"]) - offset
    return info["location"], offset, length


def lazy_chunks(t: onnx.TensorProto, chunk: int = 1 << 24) -> Iterator[bytes]:
    """A lazy tensor's bytes, read from its file ``chunk`` bytes at a time (hashing and copying never hold it whole)."""
    path, offset, length = lazy_span(t)
    with open(path, "rb") as f:
        f.seek(offset)
        left = length
        while left:
            block = f.read(min(chunk, left))
            if not block:
                raise ValueError(f"external data of '{t.name}' ends early in {path}")
            left -= len(block)
            yield block


def tensor_array(t: onnx.TensorProto) -> np.ndarray:
    """The value of an initializer, read from its file when it is lazy (one weight at a time, one copy)."""
    if not is_lazy(t):
        return numpy_helper.to_array(t)
    if t.data_type not in _PLAIN_TYPES:  # stored differently from numpy's layout (bfloat16, 4-bit, strings)
        loaded = onnx.TensorProto()
        loaded.name, loaded.data_type = t.name, t.data_type
        loaded.dims.extend(t.dims)
        loaded.raw_data = b"".join(lazy_chunks(t))
        return numpy_helper.to_array(loaded)
    path, offset, length = lazy_span(t)
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
    count = min(length, max(0, os.path.getsize(path) - offset)) // dtype.itemsize
    if count != int(np.prod(t.dims, dtype=np.int64)):
        raise ValueError(f"external data of '{t.name}' holds {count} values for shape {list(t.dims)}")
    if not count:
        return np.zeros(tuple(t.dims), dtype)
    # Mapped copy-on-write: the values are read from the file as they are used, and only pages written to become the
    # process's own; a 250 MiB embedding is not copied into memory to be quantized a few columns at a time.
    values = np.asarray(np.memmap(path, dtype=dtype.newbyteorder("<"), mode="c", offset=offset, shape=(count,)))
    return values.astype(dtype, copy=False).reshape(tuple(t.dims))


_PLAIN_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT8,
                onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16, onnx.TensorProto.INT32,
                onnx.TensorProto.UINT32, onnx.TensorProto.INT64, onnx.TensorProto.UINT64, onnx.TensorProto.BOOL}
_RAW_DATA = 9  # TensorProto.raw_data's field number


def hash_loaded(t: onnx.TensorProto, h) -> None:
    """``h.update`` with the deterministic serialization of ``t`` as onnx.load gives it with its external data (the
    bytes read in, the external fields cleared), the bytes of a lazy tensor streamed from its file: a weight hashes
    the same lazy or loaded, and no copy of it is made. Deterministic serialization writes fields in number order:
    the fields before raw_data, raw_data, then the ones after it."""
    if not is_lazy(t):
        h.update(t.SerializeToString(deterministic=True))
        return
    low, high = onnx.TensorProto(), onnx.TensorProto()
    for field, value in t.ListFields():
        if field.name == "external_data":
            continue
        target = low if field.number < _RAW_DATA else high
        if isinstance(value, (list, tuple)) or hasattr(value, "extend"):
            getattr(target, field.name).extend(value)
        else:
            setattr(target, field.name, value)
    high.data_location = onnx.TensorProto.DEFAULT
    h.update(low.SerializeToString(deterministic=True))
    h.update(bytes([_RAW_DATA << 3 | 2]) + varint(lazy_span(t)[2]))
    for block in lazy_chunks(t):
        h.update(block)
    h.update(high.SerializeToString(deterministic=True))


def varint(n: int) -> bytes:
    """Protobuf's base-128 varint of ``n`` (a field's tag or length)."""
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


_FINITE: dict[tuple, bool] = {}


def all_finite(t: onnx.TensorProto) -> bool:
    """No inf/NaN in a float initializer; a lazy one is scanned from its file a slice at a time (and once per run)."""
    if not is_lazy(t):
        return bool(np.all(np.isfinite(numpy_helper.to_array(t))))
    path, offset, length = lazy_span(t)
    key = (path, offset, length, os.path.getmtime(path))
    if key not in _FINITE:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
        values = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(length // dtype.itemsize,))
        step = 1 << 22
        _FINITE[key] = all(bool(np.all(np.isfinite(values[i:i + step]))) for i in range(0, values.size, step))
        del values
    return _FINITE[key]


_ITEM_BITS = {onnx.TensorProto.FLOAT: 32, onnx.TensorProto.UINT8: 8, onnx.TensorProto.INT8: 8, onnx.TensorProto.UINT16: 16,
              onnx.TensorProto.INT16: 16, onnx.TensorProto.INT32: 32, onnx.TensorProto.INT64: 64, onnx.TensorProto.BOOL: 8,
              onnx.TensorProto.FLOAT16: 16, onnx.TensorProto.DOUBLE: 64, onnx.TensorProto.UINT32: 32, onnx.TensorProto.UINT64: 64,
              onnx.TensorProto.COMPLEX64: 64, onnx.TensorProto.COMPLEX128: 128, onnx.TensorProto.BFLOAT16: 16}
for _name, _bits in (("FLOAT8E4M3FN", 8), ("FLOAT8E4M3FNUZ", 8), ("FLOAT8E5M2", 8), ("FLOAT8E5M2FNUZ", 8), ("UINT4", 4), ("INT4", 4),
                     ("FLOAT4E2M1", 4)):
    if hasattr(onnx.TensorProto, _name):
        _ITEM_BITS[getattr(onnx.TensorProto, _name)] = _bits


def tensor_size(t: onnx.TensorProto) -> int:
    """About ``t.ByteSize()`` (its data held in the message, a few bytes a field besides), from its dims and type: upb's
    ByteSize serializes a message to count it, a copy of every weight in it (MiniLM's model: 0.17 s and 173 MB held for
    the call; a session's start asked it of the whole model)."""
    head = 16 + len(t.name) + 11 * len(t.dims) + sum(len(e.key) + len(e.value) + 4 for e in t.external_data)
    if t.data_location == onnx.TensorProto.EXTERNAL:
        return head
    if t.HasField("raw_data") and t.data_type in _ITEM_BITS:
        count = 1
        for d in t.dims:
            count *= d
        return head + -(-count * _ITEM_BITS[t.data_type] // 8)
    return head + 4 * (len(t.float_data) + len(t.int32_data)) + 8 * (len(t.int64_data) + len(t.double_data) + len(t.uint64_data)) + \
        sum(len(x) + 2 for x in t.string_data) + (0 if not t.HasField("raw_data") else t.ByteSize())


def graph_size(graph: onnx.GraphProto) -> int:
    """About ``graph.ByteSize()`` without serializing it: its tensors (initializers and node attributes, in every body)
    by ``tensor_size``, and 64 bytes plus names for each node and value besides."""
    total = sum(tensor_size(t) for t in graph.initializer)
    total += sum(64 + len(v.name) for v in list(graph.input) + list(graph.output) + list(graph.value_info))
    for n in graph.node:
        total += 64 + len(n.op_type) + len(n.name) + sum(len(x) + 2 for x in list(n.input) + list(n.output))
        for a in n.attribute:
            total += 16 + len(a.name) + len(a.s) + 8 * (len(a.ints) + len(a.floats)) + sum(len(x) + 2 for x in a.strings)
            if a.HasField("t"):
                total += tensor_size(a.t)
            total += sum(tensor_size(t) for t in a.tensors)
            if a.HasField("g"):
                total += graph_size(a.g)
            total += sum(graph_size(g) for g in a.graphs)
    return total


def model_size(model: onnx.ModelProto) -> int:
    """About ``model.ByteSize()`` (see graph_size): its graph and its functions' nodes."""
    return graph_size(model.graph) + sum(graph_size(onnx.GraphProto(node=f.node)) for f in model.functions)


def stored_bytes(t: onnx.TensorProto) -> int:
    """Bytes a tensor takes in a saved model, its data included when that is lazy."""
    return t.ByteSize() + (lazy_span(t)[2] if is_lazy(t) else 0)


def has_lazy(model: onnx.ModelProto) -> bool:
    return any(is_lazy(t) for t in model.graph.initializer)


def without_weights(model: onnx.ModelProto, threshold: int = 4096) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers of more than ``threshold`` bytes keep their name, type and shape but no
    data: what shape inference reads (types, dims and the values of small shape tensors) without a copy of the
    weights. ``model`` is not touched: emptying its weights in place and putting them back copied each one twice in
    protobuf's memory, which kept them (+106 MB on MiniLM's 91 MB, for good)."""
    return copy_with_placeholders(model, {t.name for t in model.graph.initializer if tensor_size(t) > threshold})


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def ai_onnx_opset(model: onnx.ModelProto) -> int:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            return op.version
    return 0


def expose(model: onnx.ModelProto, names_types: dict[str, int]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph outputs also include the given tensors (name -> element type)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    add_outputs(m, names_types)
    return m


def add_outputs(model: onnx.ModelProto, names_types: dict[str, int]) -> int:
    """Graph outputs for the given tensors (name -> element type) that are not outputs yet, added to ``model`` itself;
    the number of outputs before (``del model.graph.output[count:]`` takes them away again)."""
    count = len(model.graph.output)
    have = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.helper.make_tensor_value_info(n, t, None) for n, t in names_types.items() if n not in have)
    return count


def constant_tensors(model: onnx.ModelProto) -> set[str]:
    """Tensors computed from initializers alone (a weight's DequantizeLinear, shape constants): a run of part of the
    graph (a tuning trial's cut, a bias-correction segment) computes them itself rather than being fed them."""
    const = {t.name for t in model.graph.initializer} - {i.name for i in model.graph.input}
    for n in model.graph.node:
        if all(i in const for i in n.input if i) and not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                                                            for a in n.attribute) and "Random" not in n.op_type:
            const.update(o for o in n.output if o)
    return const


def submodel(model: onnx.ModelProto, indices: list[int]) -> onnx.ModelProto:
    """A model of the nodes of ``model`` at ``indices`` (in that order) with the initializers they read (subgraph
    bodies' outer reads included): the caller adds its inputs and outputs. The initializers are shared by copy, the
    rest of ``model`` is never copied."""
    g = model.graph
    m = onnx.ModelProto()
    m.ir_version = model.ir_version
    m.opset_import.extend(model.opset_import)
    m.functions.extend(model.functions)
    m.graph.name = g.name
    nodes = [g.node[k] for k in indices]
    read = {i for n in nodes for i in list(n.input) + sorted(subgraph_inputs(n)) if i}
    m.graph.initializer.extend(t for t in g.initializer if t.name in read)
    m.graph.node.extend(nodes)
    return m


def ensure_opset(model: onnx.ModelProto, domain: str, version: int) -> None:
    """Import ``domain`` at ``version`` at least."""
    for op in model.opset_import:
        if op.domain == domain:
            op.version = max(op.version, version)
            return
    model.opset_import.add(domain=domain, version=version)


def name_nodes(model: onnx.ModelProto) -> None:
    """Give every unnamed node a stable name (op type + index) so reports and excludes can refer to it."""
    used = {n.name for n in model.graph.node if n.name}
    for k, node in enumerate(model.graph.node):
        if not node.name:
            base = f"{node.op_type}_{k}"
            name, j = base, 1
            while name in used:
                name, j = f"{base}_{j}", j + 1
            node.name = name
            used.add(name)


def topo_sort(model: onnx.ModelProto) -> None:
    """Reorder the main graph's nodes topologically (stable for already-sorted graphs).

    The order is that of repeated passes over the nodes, each emitting in turn every node whose inputs are known by
    then, computed in one walk: a node's pass is the largest over its inputs' makers of the maker's pass (a maker
    earlier in the list) or the maker's pass + 1 (a later one); nodes sort by (pass, index). Nodes on a cycle or
    with an input nothing makes go last, in their order (the checker reports them)."""
    g = model.graph
    nodes = list(g.node)
    known = {i.name for i in g.input} | {t.name for t in g.initializer} | {""}
    maker = {}
    for k, node in enumerate(nodes):
        for o in node.output:
            if o and o not in known:
                maker.setdefault(o, k)
    deps: list[list[int] | None] = []
    for node in nodes:
        d: list[int] | None = []
        for name in set(node.input) | subgraph_inputs(node):
            if name in known:
                continue
            if name not in maker:
                d = None
                break
            d.append(maker[name])
        deps.append(d)
    passes: list[int | None] = [None] * len(nodes)
    users: list[list[int]] = [[] for _ in nodes]
    waiting = [0] * len(nodes)
    for k, d in enumerate(deps):
        if d is not None:
            deps[k] = sorted(set(d))
            waiting[k] = len(deps[k])
            for j in deps[k]:
                users[j].append(k)
    ready = deque(k for k, d in enumerate(deps) if d is not None and not waiting[k])
    while ready:
        k = ready.popleft()
        passes[k] = max([1] + [passes[j] if j < k else passes[j] + 1 for j in deps[k]])
        for u in users[k]:
            waiting[u] -= 1
            if not waiting[u]:
                ready.append(u)
    placed = sorted((p, k) for k, p in enumerate(passes) if p is not None)
    ordered = [nodes[k] for _, k in placed] + [nodes[k] for k, p in enumerate(passes) if p is None]
    del g.node[:]
    g.node.extend(ordered)


def until_fixed(model: onnx.ModelProto, step: Callable[[onnx.ModelProto, Graph, onnx.NodeProto], bool]) -> int:
    """Offer every node to ``step`` in graph order, reading the graph again after each change it makes (``step``
    returns True), until a whole pass changes nothing. Returns the number of changes.

    A change does not restart the pass from the first node: the node that changed is offered again, then the ones
    after it, and the next pass offers the earlier ones. Restarting made a model with N foldable nodes cost N passes
    over the whole graph (0.45 s of the text detector's 1.2 s load)."""
    count, changed = 0, True
    while changed:
        changed = False
        g, k = Graph(model), 0
        while k < len(model.graph.node):
            if step(model, g, model.graph.node[k]):
                count, changed = count + 1, True
                g = Graph(model)
                # ``step`` may remove nodes before this one (never more than it changed): offer this position again
                k = max(0, k - 1)
                continue
            k += 1
    return count


def drop_unused_initializers(model: onnx.ModelProto, names=None) -> None:
    """Remove initializers no node, graph output or subgraph reads (only among ``names`` when given)."""
    g = model.graph
    candidates = set(names) if names is not None else {t.name for t in g.initializer}
    if not candidates:
        return
    used = {o.name for o in g.output}
    for node in g.node:
        used.update(node.input)
        if node.attribute:
            used |= subgraph_inputs(node)
    dropped = [t for t in g.initializer if t.name in candidates and t.name not in used]
    for t in dropped:
        g.initializer.remove(t)


def compacted(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` holding only what it holds now. protobuf keeps a message's bytes in one arena and frees
    nothing in it one by one: a copy of a model whose float weights were then dropped for their int8 ones still holds
    the float bytes (MiniLM's QDQ model: 86 MB of them) for as long as it lives."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m


def copy_with_placeholders(model: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
    """A copy of ``model`` in which the initializers named in ``names`` keep their name, type and shape but no data
    (placeholders, to be replaced before the model is used), so a rewrite that replaces big weights never holds
    them twice. ``model.CopyFrom`` would copy every weight."""
    m = onnx.ModelProto()
    graph = model.graph
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        if model.HasField(field):  # proto2: setting a field marks it present, and the bytes would differ
            setattr(m, field, getattr(model, field))
    for field in ("opset_import", "metadata_props", "functions", "training_info"):
        getattr(m, field).extend(getattr(model, field))
    for field in ("name", "doc_string"):
        if graph.HasField(field):
            setattr(m.graph, field, getattr(graph, field))
    for field in ("node", "input", "output", "value_info", "sparse_initializer", "quantization_annotation"):
        getattr(m.graph, field).extend(getattr(graph, field))
    for t in graph.initializer:
        if t.name in names:
            placeholder = m.graph.initializer.add()
            placeholder.name, placeholder.data_type = t.name, t.data_type
            placeholder.dims.extend(t.dims)
        else:
            m.graph.initializer.append(t)
    return m
