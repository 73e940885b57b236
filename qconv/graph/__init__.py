"""An indexed view of a ModelProto's main graph: producers, consumers, constants, types, unique names."""

from __future__ import annotations

from collections import defaultdict, deque
from contextlib import contextmanager
from typing import Callable

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
        return numpy_helper.to_array(self.initializers[name])

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


@contextmanager
def weights_held(model: onnx.ModelProto, threshold: int = 4096):
    """Empty the large initializers for the block and restore them after: shape inference, which reads only types,
    dims and the values of small (shape) tensors, then never copies a 500 MB model."""
    held = {}
    for t in model.graph.initializer:
        if len(t.raw_data) > threshold:
            held[t.name] = t.raw_data
            t.ClearField("raw_data")
    try:
        yield model
    finally:
        for t in model.graph.initializer:
            if t.name in held:
                t.raw_data = held[t.name]


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
    have = {o.name for o in m.graph.output}
    for name, elem in names_types.items():
        if name not in have:
            m.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
    return m


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
    returns True), until a whole pass changes nothing. Returns the number of changes."""
    count, changed = 0, True
    while changed:
        changed = False
        g = Graph(model)
        for node in list(model.graph.node):
            if step(model, g, node):
                count, changed = count + 1, True
                break
    return count


def drop_unused_initializers(model: onnx.ModelProto, names=None) -> None:
    """Remove initializers no node, graph output or subgraph reads (only among ``names`` when given)."""
    g = Graph(model)
    used = set(g.consumers) | g.graph_outputs | g.pinned
    candidates = set(names) if names is not None else set(g.initializers)
    for t in list(model.graph.initializer):
        if t.name in candidates and t.name not in used:
            model.graph.initializer.remove(t)


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
