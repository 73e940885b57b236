"""The values a search passes around: a candidate (overrides to try), a measured trial, a kept change, a ranked node;
and the trial cache that makes a re-run instant."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from qconv.measure.tally import Metrics, json_number
from qconv.plan.overrides import Overrides

CACHE_VERSION = 4  # 2: metrics with the parts of concatenated outputs and passing scores; 3: and their per-feed values; 4: and the --metric per feed


@dataclass(frozen=True)
class Candidate:
    """A remedy's proposal: ``extra`` overrides on top of the current ones, measured with range ``method``."""

    what: str  # the change as the report's "changes" name it
    label: str  # the trial as the report's trial table names it
    method: str
    extra: Overrides


@dataclass(frozen=True)
class Group:
    """Nodes moved together (every node of one op type; a head's output Concat and the nodes that feed it): their
    errors add up where no single one shows a gain alone (28 hard-swish Muls of a recognizer)."""

    label: str
    nodes: tuple[str, ...]
    estimate: float  # first-order: the dB of SQNR the nodes add, summed (each capped), from one ranking pass


@dataclass
class Trial:
    n: int
    step: str  # baseline | ranges | sensitivity | remedy | speed
    change: str
    overrides: Overrides
    metrics: Metrics | None  # None: the candidate could not be built
    seconds: float
    cached: bool
    accepted: bool = False
    error: str | None = None
    note: str | None = None  # why a candidate that measured better was not taken
    method: str = ""  # the range method it was measured with
    speed: float | None = None  # its time as a multiple of the float model's, by the kernel table (when it was asked)
    share: float | None = None  # the share of its graph's nodes that ran (below 1: from a cut of the current best's values)

    def to_dict(self) -> dict:
        m = self.metrics
        return {"n": self.n, "step": self.step, "change": self.change, "cosine": m.cosine if m else None,
                "sqnr_db": json_number(m.sqnr_db) if m else None, "agreement": m.agreement if m else None,
                "top1_drop": m.top1_drop if m else None, "slice_cosine": m.slice_cosine if m else None,
                "passing": m.passing if m else None, "seconds": round(self.seconds, 3), "cached": self.cached,
                "accepted": self.accepted, "error": self.error, "note": self.note,
                **({"estimated_speed": round(self.speed, 4)} if self.speed is not None else {}),
                **({"graph_share": round(self.share, 4)} if self.share is not None and self.share < 1.0 else {})}


@dataclass(frozen=True)
class Change:
    """A change the search kept, and why."""

    what: str  # a node, or "all activations"
    change: str
    why: str
    op: str | None = None

    def to_dict(self) -> dict:
        d = {"what": self.what, "change": self.change, "why": self.why}
        if self.op is not None:
            d["op"] = self.op
        return d


@dataclass
class Ranked:
    """A quantized node ranked by the error it adds, then what measuring it alone showed."""

    node: str
    op: str
    added_db: float  # dB of SQNR lost across the node
    output_sqnr_db: float | None
    mac_share: float
    float_gain: float | None = None  # share of what the model misses that keeping it float removes
    float_cosine: float | None = None
    alone_cosine: float | None = None  # the float model with only this node quantized
    cost: float | None = None  # share of the model's time (or MACs) it would give back in float

    def to_dict(self) -> dict:
        d = {"node": self.node, "op": self.op, "added_db": self.added_db, "output_sqnr_db": json_number(self.output_sqnr_db),
             "mac_share": self.mac_share}
        for k in ("float_gain", "float_cosine", "alone_cosine", "cost"):
            if getattr(self, k) is not None or k in ("float_gain", "float_cosine"):
                d[k] = getattr(self, k)
        return d

    def describe(self) -> str:
        """How the node's error reads: the dB it adds, or, at the model's input (nothing before it), its output SQNR."""
        if self.added_db >= 60.0 and self.output_sqnr_db is not None and math.isfinite(self.output_sqnr_db):
            return f"its output SQNR is {self.output_sqnr_db:.1f} dB (it quantizes the model's input)"
        return f"it added {max(self.added_db, 0.0):.1f} dB of error"


class TrialCache:
    """Measured trials in a JSON file: {key: value}; written after every trial, so an interrupted run keeps them."""

    def __init__(self, path: Path | None):
        self.path = path
        self.data: dict = {}
        if path is not None and path.exists():
            try:
                d = json.loads(path.read_text())
                if d.get("version") == CACHE_VERSION:
                    self.data = dict(d.get("trials") or {})
            except (OSError, ValueError):
                self.data = {}

    def get(self, key: str):
        return self.data.get(key)

    def put(self, key: str, value) -> None:
        self.data[key] = value
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"version": CACHE_VERSION, "trials": self.data}, sort_keys=True))
            os.replace(tmp, self.path)
        except OSError:
            self.path = None  # a read-only cache directory: tune without a cache

    def metrics(self, key: str) -> tuple[bool, Metrics | None, str | None]:
        """(hit, metrics, error) of a cached trial."""
        hit = self.get(key)
        if hit is None:
            return False, None, None
        m = hit.get("metrics")
        return True, Metrics.from_dict(m) if m else None, hit.get("error")

    def put_metrics(self, key: str, metrics: Metrics | None, error: str | None) -> None:
        self.put(key, {"metrics": metrics.to_dict(per_feed=True) if metrics else None, "error": error})


def cache_dir(configured: Path | None) -> Path:
    if configured is not None:
        return configured
    env = os.environ.get("QCONV_CACHE_DIR")
    return Path(env) / "tuning" if env else Path.home() / ".cache" / "qconv" / "tuning"
