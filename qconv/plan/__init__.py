"""The quantization plan: the one contract between deciding (``planner``) and rewriting (``rewrite/``).

A ``QuantPlan`` says, for every node, whether it is quantized and why not, and for every tensor that
gets quantized its role, integer type, granularity, the range it was given and by which method, and its
scale and zero point. It is a plain value: ``to_dict`` / ``from_dict`` round-trip it losslessly through
JSON (schema ``qconv.plan``), so ``qconv plan`` can write it, a person or a tuner can edit its
``overrides``, and ``qconv quantize --plan`` applies it. Every mode (int8, a16w8, dynamic, fp16, int4)
produces one and its rewrite reads it.
"""

from __future__ import annotations

import re

from dataclasses import dataclass, field

import numpy as np

from qconv.errors import QconvError
from qconv.numeric import qmath
from qconv.plan.config import QuantConfig
from qconv.plan.overrides import Overrides

SCHEMA = "qconv.plan"
VERSION = 1

# Why a node stays float, grouped the way a user reads it: (code) -> the sentence shown once per group.
GROUPS = {
    "excluded": "excluded on the command line (--exclude-nodes / --exclude-ops)",
    "override": "kept float by an override in the plan",
    "inputs-float": "its inputs stay float: no int8 kernel gains from converting them",
    "bias-add": "bias Add after a quantized MatMul: onnxruntime fuses it with an exact float bias",
    "fragile": "numerically fragile: 8 bits distort it (Softmax, normalizations)",
    "no-kernel": "no int8 kernel for this op in onnxruntime's CPU provider",
    "wide-range": "values span more than 8 bits can hold",
    "mixed-scales": "joins tensors of very different ranges: one 8-bit scale would erase the smaller ones",
    "nonfinite": "holds inf/NaN values, which integers cannot represent",
    "unobserved": "needs a tensor the calibration did not observe: re-run qconv calibrate with --all-tensors",
    "not-float": "its input is not float32",
    "unsupported": "an input form the int8 kernels do not take",
    "custom-domain": "custom-domain op, left as it is",
    "mode": "this mode does not convert this op",
    "speed": "int8 would run slower here on this CPU (kernel cost table): the region stays float",
}


@dataclass
class NodeDecision:
    name: str
    op_type: str
    status: str  # quantized | float (kept in float, with a reason) | integer (no float data: nothing to do)
    reason: str = ""
    code: str = ""  # key of GROUPS for kept-float nodes

    @property
    def quantized(self) -> bool:
        return self.status == "quantized"

    @property
    def kept_float(self) -> bool:
        return self.status == "float"


@dataclass
class TensorPlan:
    name: str
    role: str  # activation | weight | bias | const
    qparams: qmath.QParams
    consumers: list[str] = field(default_factory=list)  # node names that read the dequantized tensor
    origin: str = ""
    method: str = ""  # activations: the range method (or "explicit" for an override range)
    range: tuple[float, float] | None = None  # activations: the range the parameters cover
    # weights: the integers learned rounding chose, as differences from nearest (qconv.numeric.rounding); None: nearest
    rounding: str | None = None

    def to_dict(self) -> dict:
        d = {"tensor": self.name, "role": self.role, **self.qparams.to_dict(), "consumers": list(self.consumers),
             "origin": self.origin}
        if self.role == "activation":
            d["method"] = self.method
            d["range"] = None if self.range is None else [float(self.range[0]), float(self.range[1])]
        if self.rounding:
            d["rounding"] = self.rounding
        return d

    @classmethod
    def from_dict(cls, name: str, d: dict) -> "TensorPlan":
        qt = qmath.qtype(d["type"])
        scale = np.asarray(d["scale"], dtype=np.float32)
        zp = np.asarray(d["zero_point"], dtype=np.int64).astype(qt.dtype)
        qp = qmath.QParams(scale, zp, qt, d.get("axis"))
        rng = d.get("range")
        rounding = d.get("rounding")
        if rounding is not None and not isinstance(rounding, str):
            raise ValueError(f"tensor '{name}': rounding is a string record")
        return cls(d.get("tensor", name), d["role"], qp, list(d.get("consumers", [])), d.get("origin", ""), d.get("method", ""),
                   None if rng is None else (float(rng[0]), float(rng[1])), rounding or None)


@dataclass
class QuantPlan:
    config: QuantConfig
    nodes: list[NodeDecision]
    tensors: dict[str, TensorPlan]
    folded: dict[str, str]  # removed activation node name -> the producer that absorbed it
    overrides: Overrides = field(default_factory=Overrides)
    # Where the decisions came from: model id, calibration identity, and the ranges the planner saw, so an
    # edited plan can be planned again without running the model (see planner.replan).
    source: dict = field(default_factory=dict)
    # Weight-level steps decided with data (qconv.adjust): node -> {"bias": tensor, "added": bool, "shift": [per channel]},
    # the mean shift bias correction adds to that float bias before the rewrite quantizes it.
    corrections: dict[str, dict] = field(default_factory=dict)

    def decision(self, name: str) -> NodeDecision | None:
        return next((n for n in self.nodes if n.name == name), None)

    def by_op(self) -> dict[str, dict[str, int]]:
        """{op type: {"quantized": n, "float": n, "integer": n}}."""
        out: dict[str, dict[str, int]] = {}
        for n in self.nodes:
            slot = out.setdefault(n.op_type, {"quantized": 0, "float": 0, "integer": 0})
            slot[n.status] += 1
        return dict(sorted(out.items()))

    def kept_float_groups(self, examples: int = 4) -> list[dict]:
        """Kept-float nodes grouped by reason: what a user reads first (most nodes first)."""
        groups: dict[str, dict] = {}
        for n in self.nodes:
            if not n.kept_float:
                continue
            code = n.code or "other"
            # a code without a label groups by its reason with the names in quotes left out ('reads 'x', float32
            # from Pow 'y'...' is one group however many nodes follow a Pow)
            label = GROUPS.get(code) or re.sub(r"\s*'[^']*'", "", n.reason or code)
            g = groups.setdefault((code, label), {"code": code, "reason": label, "nodes": 0, "ops": {}, "examples": []})
            g["nodes"] += 1
            g["ops"][n.op_type] = g["ops"].get(n.op_type, 0) + 1
            if len(g["examples"]) < examples:
                g["examples"].append({"name": n.name, "op_type": n.op_type, "detail": n.reason})
        for g in groups.values():
            g["ops"] = dict(sorted(g["ops"].items(), key=lambda kv: (-kv[1], kv[0])))
        return sorted(groups.values(), key=lambda g: (-g["nodes"], g["code"], g["reason"]))

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "version": VERSION,
            "config": self.config.to_dict(),
            "source": self.source,
            "overrides": self.overrides.to_dict(),
            "planned_with_overrides": self.overrides.digest(),
            "nodes": [{"name": n.name, "op_type": n.op_type, "status": n.status, "reason": n.reason, "code": n.code}
                      for n in self.nodes],
            "tensors": {k: t.to_dict() for k, t in sorted(self.tensors.items())},
            "folded": dict(sorted(self.folded.items())),
            "corrections": {k: dict(v) for k, v in sorted(self.corrections.items())},
        }

    @classmethod
    def from_dict(cls, d: dict, where: str = "plan file") -> "QuantPlan":
        if not isinstance(d, dict) or d.get("schema") != SCHEMA:
            raise QconvError(f"{where} is not a qconv plan (no '{SCHEMA}' schema field): write one with qconv plan")
        if d.get("version") != VERSION:
            raise QconvError(f"{where} has plan schema version {d.get('version')}; this qconv reads version {VERSION}: re-run qconv plan")
        try:
            config = QuantConfig.from_dict(d["config"])
            nodes = [NodeDecision(n["name"], n["op_type"], n["status"], n.get("reason", ""), n.get("code", "")) for n in d["nodes"]]
            tensors = {k: TensorPlan.from_dict(k, v) for k, v in dict(d["tensors"]).items()}
            folded = {str(k): str(v) for k, v in dict(d.get("folded", {})).items()}
            source = dict(d.get("source") or {})
            corrections = {str(k): {"bias": str(v["bias"]), "added": bool(v.get("added", False)),
                                    "shift": [float(x) for x in v["shift"]]} for k, v in dict(d.get("corrections") or {}).items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise QconvError(f"{where} is missing or has malformed fields ({type(exc).__name__}: {exc}): re-run qconv plan") from None
        overrides = Overrides.from_dict(d.get("overrides") or {}, where)
        plan = cls(config, nodes, tensors, folded, overrides, source, corrections)
        plan.stale = overrides.digest() != d.get("planned_with_overrides", overrides.digest())
        return plan

    stale: bool = False  # True when the overrides were edited after planning: the planner must run again

