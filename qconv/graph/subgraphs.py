"""Subgraph bodies (If branches, Loop and Scan bodies) as models of their own, so every stage can work on them.

A body is addressed by its path from the main graph: ((node name, attribute), ...); its *scope* is that path
written ``If_0.else_branch`` (nested: ``If_0.else_branch|rnn/If_1.then_branch``). Nodes and tensors of a body
are named in plans, overrides, calibration files and reports as ``<scope>|<name>``.

``body_model`` wraps a body as a ModelProto: its formal inputs, plus one graph input per outer-scope name it
reads (typed from the enclosing graphs), its outputs and initializers. ``put_body`` writes a rewritten
wrapped body back in place, without the added inputs. ``promote`` makes body tensors visible as outputs of
the main graph (If: an extra output of the branch and an empty one of its sibling; Loop/Scan: an extra scan
output, stacked over iterations), which is how calibration observes them.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import helper, numpy_helper

SEP = "|"
_BODIES = {"If": ("then_branch", "else_branch"), "Loop": ("body",), "Scan": ("body",)}


@dataclass(frozen=True)
class Body:
    path: tuple[tuple[str, str], ...]
    op: str

    @property
    def scope(self) -> str:
        return SEP.join(f"{n}.{a}" for n, a in self.path)

    def name(self, local: str) -> str:
        return f"{self.scope}{SEP}{local}"


def scoped(scope: str, name: str) -> str:
    return f"{scope}{SEP}{name}" if scope else name


def split_scoped(name: str) -> tuple[str, str]:
    """(scope, local name) of a scoped name; ('', name) for the main graph. Scopes end at the last separator."""
    if SEP not in name:
        return "", name
    scope, _, local = name.rpartition(SEP)
    return scope, local


def has_bodies(model: onnx.ModelProto) -> bool:
    return any(n.op_type in _BODIES for n in model.graph.node if n.domain in ("", "ai.onnx"))


def bodies(model: onnx.ModelProto) -> list[Body]:
    """Every body, outer before inner (pre-order)."""
    out: list[Body] = []

    def walk(graph: onnx.GraphProto, path: tuple) -> None:
        for node in graph.node:
            if node.domain not in ("", "ai.onnx") or node.op_type not in _BODIES:
                continue
            for a in node.attribute:
                if a.name in _BODIES[node.op_type] and a.type == onnx.AttributeProto.GRAPH:
                    b = Body(path + ((node.name, a.name),), node.op_type)
                    out.append(b)
                    walk(a.g, b.path)

    walk(model.graph, ())
    return out


def graph_at(model: onnx.ModelProto, path) -> onnx.GraphProto:
    g = model.graph
    for node_name, attr_name in path:
        node = next(n for n in g.node if n.name == node_name)
        g = next(a.g for a in node.attribute if a.name == attr_name)
    return g


def owner(model: onnx.ModelProto, body: Body) -> onnx.NodeProto:
    g = graph_at(model, body.path[:-1])
    return next(n for n in g.node if n.name == body.path[-1][0])


def _typed(graph: onnx.GraphProto) -> dict[str, onnx.TypeProto]:
    types = {}
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        if vi.type.HasField("tensor_type") or vi.type.HasField("sequence_type"):
            types[vi.name] = vi.type
    for t in graph.initializer:
        tp = onnx.TypeProto()
        tp.tensor_type.elem_type = t.data_type
        for d in t.dims:
            tp.tensor_type.shape.dim.add().dim_value = d
        types[t.name] = tp
    return types


def _free_names(graph: onnx.GraphProto) -> list[str]:
    """Names ``graph`` (and the bodies inside it) read but does not define."""
    from qconv.graph import subgraph_inputs

    local = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
    free = []
    for n in graph.node:
        for i in list(n.input) + sorted(subgraph_inputs(n)):
            if i and i not in local:
                free.append(i)
    return list(dict.fromkeys(free))


def body_model(model: onnx.ModelProto, body: Body) -> tuple[onnx.ModelProto, list[str]]:
    """The body as a model, and the names it reads from enclosing graphs: constants there (weights) are copied
    in as initializers, so the planner sees them as constants; the rest become graph inputs. ``put_body``
    drops both again (the nodes then read the outer names, as before)."""
    types: dict[str, onnx.TypeProto] = {}
    inits: dict[str, onnx.TensorProto] = {}
    for k in range(len(body.path)):
        outer = graph_at(model, body.path[:k])
        types.update(_typed(outer))
        inits.update({t.name: t for t in outer.initializer})
        for t in outer.input:  # an outer graph input shadows an initializer of the same name
            inits.pop(t.name, None)
    graph = graph_at(model, body.path)
    inputs = list(graph.input)
    injected = []
    added = []
    for r in _free_names(graph):
        if r in inits:
            injected.append(inits[r])
        else:
            vi = onnx.ValueInfoProto()
            vi.name = r
            if r in types:
                vi.type.CopyFrom(types[r])
            else:
                vi.type.tensor_type.elem_type = onnx.TensorProto.FLOAT  # unknown: float, the common case
            inputs.append(vi)
        added.append(r)
    wrapped = helper.make_graph(list(graph.node), graph.name or "body", inputs, list(graph.output),
                                list(graph.initializer) + injected, value_info=list(graph.value_info))
    m = helper.make_model(wrapped, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    return m, added


def put_body(model: onnx.ModelProto, body: Body, new: onnx.ModelProto, added: list[str]) -> None:
    """Write the rewritten wrapped body back into ``model`` in place (formal inputs and outputs unchanged)."""
    graph = graph_at(model, body.path)
    outer = set(added)
    formal = [i for i in new.graph.input if i.name not in outer]
    for field in ("node", "initializer", "value_info", "input", "output"):
        del getattr(graph, field)[:]
    graph.node.extend(new.graph.node)
    graph.initializer.extend(t for t in new.graph.initializer if t.name not in outer)
    graph.value_info.extend(v for v in new.graph.value_info if v.name not in outer)
    graph.input.extend(formal)
    graph.output.extend(new.graph.output)


def _float_vi(name: str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)


def promote(model: onnx.ModelProto, wanted: dict[str, list[str]]) -> tuple[onnx.ModelProto, dict[str, str]]:
    """A copy of ``model`` where the body tensors ``wanted`` ({scope: [local tensor names]}) are main-graph
    tensors; returns it and {main-graph tensor: scoped name}. Inner bodies are lifted first, each through
    every enclosing body in turn."""
    import numpy as np

    m = onnx.ModelProto()
    m.CopyFrom(model)
    found = {b.scope: b for b in bodies(m)}
    pending: dict[str, list[tuple[str, str]]] = {}  # scope -> [(name in that body, scoped name)]
    for scope, names in wanted.items():
        if scope in found:
            pending.setdefault(scope, []).extend((n, scoped(scope, n)) for n in names)
    lifted: dict[str, str] = {}
    counter = 0
    depth = max((len(found[s].path) for s in pending), default=0)
    for level in range(depth, 0, -1):
        for scope in sorted(s for s in pending if len(found[s].path) == level):
            body = found[scope]
            node = owner(m, body)
            graph = graph_at(m, body.path)
            have = {o.name for o in graph.output}
            new = []
            for local, full in dict.fromkeys(pending[scope]):
                counter += 1
                lifted_name = f"qconv_promoted_{counter}"
                inner = local
                if local in have:  # already a body output: an Identity gives it a second name to output
                    inner = f"{lifted_name}_in"
                    graph.node.append(helper.make_node("Identity", [local], [inner], name=inner))
                have.add(inner)
                graph.output.append(_float_vi(inner))
                new.append((lifted_name, full))
            if not new:
                continue
            if node.op_type == "If":  # the sibling branch yields an empty float tensor in the same position
                for attr in node.attribute:
                    if attr.name in _BODIES["If"] and attr.name != body.path[-1][1]:
                        for out_name, _ in new:
                            empty = f"{out_name}_empty"
                            attr.g.node.append(helper.make_node("Constant", [], [empty], name=empty,
                                                                value=numpy_helper.from_array(np.zeros((0,), np.float32))))
                            attr.g.output.append(_float_vi(empty))
            elif node.op_type == "Scan":
                for attr in node.attribute:
                    if attr.name in ("scan_output_axes", "scan_output_directions"):
                        attr.ints.extend([0] * len(new))
            node.output.extend(o for o, _ in new)
            parent = SEP.join(f"{n}.{a}" for n, a in body.path[:-1])
            if parent:
                pending.setdefault(parent, []).extend(new)
            else:
                for out_name, full in new:
                    lifted[out_name] = full
                    m.graph.value_info.append(_float_vi(out_name))
    return m, lifted


def node_names(model: onnx.ModelProto) -> list[str]:
    """Names of the main graph's nodes, then every body's under scoped names."""
    names = [n.name for n in model.graph.node]
    for body in bodies(model) if has_bodies(model) else []:
        names += [body.name(n.name) for n in graph_at(model, body.path).node]
    return names


def prune_initializers(model: onnx.ModelProto) -> int:
    """Drop initializers no node of their graph (or of a body inside it) reads, in every graph; their count."""
    from qconv.graph import subgraph_inputs

    dropped = 0
    for path in [()] + [b.path for b in bodies(model)]:
        graph = graph_at(model, path)
        used = {o.name for o in graph.output}
        for n in graph.node:
            used.update(n.input)
            used.update(subgraph_inputs(n))
        for t in list(graph.initializer):
            if t.name not in used:
                graph.initializer.remove(t)
                dropped += 1
    return dropped
