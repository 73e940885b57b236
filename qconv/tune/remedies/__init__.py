"""Remedies: what tuning may change about one sensitive node, cheapest first. Each module proposes typed candidates
through one function, ``propose(ctx, node, method, overrides)``; the search measures them in this order and keeps
the first that helps enough.

- ``concat``: a Concat joining tensors of very different ranges goes float (each input keeps its own scale);
- ``ranges``: another range method for the node's inputs;
- ``smooth``: SmoothQuant scales folded into a MatMul/Gemm weight, for an input with outlier channels;
- ``island``: int16 activations around the node (an a16w8 island);
- ``floating``: the node kept float.
Whole-model speed changes (nodes slower in int8 kept float) are in ``qconv.tune.speed``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import onnx

from qconv.calib.store import Ranges
from qconv.data import FeedSource, InputSpec
from qconv.graph import Graph
from qconv.measure.reference import Reference
from qconv.plan.overrides import Overrides
from qconv.rewrite.rules import SHARED
from qconv.tune.trial import Candidate


@dataclass
class Context:
    """What remedies read: the float model, its calibration and config, and rows for per-channel statistics."""

    model: onnx.ModelProto
    stats: Ranges | None  # the calibration's statistics (None for modes without calibration)
    config: object  # QuantConfig
    held: Reference
    threads: int
    calib_source: FeedSource | None = None  # feeds for per-channel statistics (smoothing); else the held rows
    graph: Graph = field(init=False)
    nodes: dict[str, onnx.NodeProto] = field(init=False)
    specs: list[InputSpec] = field(init=False)
    channels: dict | None = None  # per-channel (min, max) of MatMul/Gemm inputs, measured once when first needed

    def __post_init__(self) -> None:
        self.graph = Graph(self.model)
        self.nodes = {n.name: n for n in self.model.graph.node}
        self.specs = [InputSpec.from_value_info(i) for i in self.model.graph.input]

    def activations(self, node: onnx.NodeProto) -> list[str]:
        """The tensors whose ranges ``node``'s float inputs take (back through data-movement ops)."""
        g = self.graph
        return [source(i, g) for i in node.input if i and not g.is_constant(i) and g.is_float(i)]


Propose = Callable[[Context, onnx.NodeProto, str, Overrides], Iterator[Candidate]]


def source(name: str, g: Graph) -> str:
    """The tensor whose range ``name`` takes: back through data-movement ops (they share their input's scale)."""
    seen = 0
    while seen < 64:
        p = g.producer.get(name)
        if p is None or p.op_type not in SHARED or not p.input or g.is_constant(p.input[0]):
            return name
        name, seen = p.input[0], seen + 1
    return name


def proposals(ctx: Context, node: onnx.NodeProto, method: str, overrides: Overrides) -> Iterator[Candidate]:
    """Every remedy's candidates for ``node``, in order."""
    from qconv.tune.remedies import concat, floating, island, ranges, smooth

    for remedy in (concat.propose, ranges.propose, smooth.propose, island.propose, floating.propose):
        yield from remedy(ctx, node, method, overrides)
