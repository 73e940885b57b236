"""Per-node and per-tensor overrides of the planner's choices: what a user edits in a plan, what tuning drives.

In a plan file::

    "overrides": {
      "nodes":   {"head/*": {"precision": "float"}, "conv7": {"precision": "int16"},
                  "fc": {"granularity": "per-tensor"}},
      "tensors": {"relu3_out": {"method": "percentile", "percentile": 99.99}, "x": {"range": [-1.0, 1.0]}}
    }

Node keys are node names or fnmatch globs; every key must match a node. ``precision``: ``float`` keeps
the node in float, ``int8`` quantizes it even where the cost rule would not, ``int16`` quantizes its
activations (inputs and output) to 16 bits: an a16w8 island. ``granularity`` sets its weight to
``per-tensor`` or ``per-channel``. ``smooth`` (MatMul/Gemm with a constant weight) is a list of per-input-channel
scales s: the activation is divided by s (a Mul inserted before the node) and the weight's rows multiplied by
it, SmoothQuant's migration of activation outliers into the weight; tuning writes it with the smoothed
activation's range as a tensor override. Tensor keys are exact activation names: ``method`` (with
``percentile``) picks that tensor's range method, ``range`` sets the range outright.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field

from qconv.calib.ranges import METHODS
from qconv.errors import QconvError
from qconv.plan.names import first_match, matches_any

PRECISIONS = ("float", "int8", "int16")
GRANULARITIES = ("per-tensor", "per-channel")
_NODE_KEYS = {"precision", "granularity", "smooth"}
_TENSOR_KEYS = {"method", "percentile", "range"}


@dataclass(frozen=True)
class NodeOverride:
    precision: str | None = None
    granularity: str | None = None
    smooth: tuple[float, ...] | None = None

    def to_dict(self) -> dict:
        d = {k: v for k, v in (("precision", self.precision), ("granularity", self.granularity)) if v is not None}
        if self.smooth is not None:
            d["smooth"] = list(self.smooth)
        return d


@dataclass(frozen=True)
class TensorOverride:
    method: str | None = None
    percentile: float | None = None
    range: tuple[float, float] | None = None

    def to_dict(self) -> dict:
        d: dict = {}
        if self.method is not None:
            d["method"] = self.method
        if self.percentile is not None:
            d["percentile"] = self.percentile
        if self.range is not None:
            d["range"] = [self.range[0], self.range[1]]
        return d


@dataclass(frozen=True)
class Overrides:
    nodes: dict[str, NodeOverride] = field(default_factory=dict)  # name or glob -> override
    tensors: dict[str, TensorOverride] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.nodes or self.tensors)

    def node(self, name: str) -> NodeOverride | None:
        """The override for node ``name``: an exact key wins, else the first matching glob in key order."""
        if name in self.nodes:
            return self.nodes[name]
        pattern = first_match(name, sorted(self.nodes))
        return self.nodes[pattern] if pattern is not None else None

    def to_dict(self) -> dict:
        return {"nodes": {k: v.to_dict() for k, v in sorted(self.nodes.items())},
                "tensors": {k: v.to_dict() for k, v in sorted(self.tensors.items())}}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def merged(self, other: "Overrides") -> "Overrides":
        """These overrides with ``other``'s on top (``other`` wins per key)."""
        return Overrides({**self.nodes, **other.nodes}, {**self.tensors, **other.tensors})

    @classmethod
    def from_dict(cls, d, where: str = "plan file") -> "Overrides":
        if not isinstance(d, dict) or set(d) - {"nodes", "tensors"}:
            extra = sorted(set(d) - {"nodes", "tensors"}) if isinstance(d, dict) else []
            raise QconvError(f"{where}: 'overrides' must be an object with 'nodes' and 'tensors'"
                             + (f" (unknown key '{extra[0]}')" if extra else ""))
        nodes = {str(k): _node_override(k, v, where) for k, v in dict(d.get("nodes") or {}).items()}
        tensors = {str(k): _tensor_override(k, v, where) for k, v in dict(d.get("tensors") or {}).items()}
        return cls(nodes, tensors)

    def check_against(self, node_names: list[str], activations: set[str], where: str = "plan file") -> None:
        """Every node key must match a node, every tensor key must name a float activation of the model."""
        for pattern in self.nodes:
            if not matches_any(pattern, node_names):
                raise QconvError(f"{where}: override for node '{pattern}' matches no node of the model "
                                 "(names are listed under 'nodes' in the plan)")
        for name in self.tensors:
            if name not in activations:
                raise QconvError(f"{where}: override for tensor '{name}' names no float activation of the model "
                                 "(tensor overrides take graph inputs and node outputs)")


def _check_keys(kind: str, key, v, allowed: set[str], example: str, where: str) -> None:
    if not isinstance(v, dict):
        raise QconvError(f"{where}: override for {kind} '{key}' must be an object like {example}")
    unknown = sorted(set(v) - allowed)
    if unknown:
        raise QconvError(f"{where}: override for {kind} '{key}' has unknown key '{unknown[0]}' ({kind} overrides take: {', '.join(sorted(allowed))})")


def _node_override(key, v, where: str) -> NodeOverride:
    _check_keys("node", key, v, _NODE_KEYS, '{"precision": "float"}', where)
    p, gr = v.get("precision"), v.get("granularity")
    if p is not None and p not in PRECISIONS:
        raise QconvError(f"{where}: node '{key}': precision '{p}' is not one of {', '.join(PRECISIONS)}")
    if gr is not None and gr not in GRANULARITIES:
        raise QconvError(f"{where}: node '{key}': granularity '{gr}' is not one of {', '.join(GRANULARITIES)}")
    sm = v.get("smooth")
    if sm is not None:
        ok = isinstance(sm, list) and sm and all(isinstance(x, (int, float)) and math.isfinite(x) and x > 0 for x in sm)
        if not ok:
            raise QconvError(f"{where}: node '{key}': smooth must be a list of positive per-channel scales")
        if any(ch in str(key) for ch in "*?["):
            raise QconvError(f"{where}: node '{key}': smooth scales belong to one node: give its exact name, not a pattern")
        sm = tuple(float(x) for x in sm)
    if p is None and gr is None and sm is None:
        raise QconvError(f"{where}: override for node '{key}' is empty: give precision, granularity or smooth")
    return NodeOverride(p, gr, sm)


def _tensor_override(key, v, where: str) -> TensorOverride:
    _check_keys("tensor", key, v, _TENSOR_KEYS, '{"method": "percentile"}', where)
    method, pct, rng = v.get("method"), v.get("percentile"), v.get("range")
    if method is not None and rng is not None:
        raise QconvError(f"{where}: tensor '{key}': give either method or range, not both")
    if method is not None and method not in METHODS:
        raise QconvError(f"{where}: tensor '{key}': method '{method}' is not one of {', '.join(METHODS)}")
    if pct is not None:
        if method != "percentile":
            raise QconvError(f"{where}: tensor '{key}': percentile goes with method 'percentile'")
        if not isinstance(pct, (int, float)) or not 0.0 < float(pct) <= 100.0:
            raise QconvError(f"{where}: tensor '{key}': percentile must be a number in (0, 100] (got {pct!r})")
        pct = float(pct)
    if rng is not None:
        ok = isinstance(rng, (list, tuple)) and len(rng) == 2 and all(isinstance(x, (int, float)) and math.isfinite(x) for x in rng)
        if not ok or rng[0] > rng[1]:
            raise QconvError(f"{where}: tensor '{key}': range must be [low, high] with finite low <= high (got {rng!r})")
        rng = (float(rng[0]), float(rng[1]))
    if method is None and rng is None:
        raise QconvError(f"{where}: override for tensor '{key}' is empty: give method or range")
    return TensorOverride(method, pct, rng)
