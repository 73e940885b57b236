"""The calibration file: versioned JSON with the model's and data's identity and per-tensor statistics.

It stores statistics, not ranges, so the range method can change at quantize time without running the
model again; shards of one calibration merge into the file a single run would have produced.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import numpy as np

from qconv import __version__
from qconv.calib.observers import TensorObserver
from qconv.calib.ranges import select_range
from qconv.errors import QconvError

SCHEMA = "qconv.calibration"
VERSION = 2


@dataclass(frozen=True, kw_only=True)
class Record:
    """How a calibration was made: what its file keeps under "options", and what a re-run compares to skip work."""

    method: str | None  # the range method asked for (None: quantize picks its default)
    bins: int
    momentum: float
    batch_size: int
    samples: int | None
    shard: tuple[int, int]
    tensors: str  # "all" | "planned"
    shards: int | None = None  # calibrated as this many shard tasks
    equalize: bool = False  # the model was calibrated after cross-layer equalization
    smooth: bool = False  # ... and after SmoothQuant (Calibration.smoothing holds the scales)
    percentile: float | None = None
    row_shapes: dict | None = None  # input -> shape of the first row: what a model is timed on (qconv.plan.kernels)
    hist_samples: int = 0  # histogram values per tensor and batch (0: every value; qconv.calib.ingraph)
    ranges: str = "calibrated"  # output: the file also holds output-aware ranges (calibrate --ranges output)

    def to_dict(self) -> dict:
        d = {"method": self.method, "bins": self.bins, "momentum": self.momentum, "batch_size": self.batch_size,
             "samples": self.samples, "shard": f"{self.shard[0]}/{self.shard[1]}", "tensors": self.tensors,
             "hist_samples": self.hist_samples}
        if self.shards is not None:
            d["shards"] = self.shards
        if self.equalize:
            d["equalize"] = True
        if self.smooth:
            d["smooth"] = True
        if self.percentile is not None:
            d["percentile"] = self.percentile
        if self.row_shapes:
            d["row_shapes"] = {k: list(v) for k, v in sorted(self.row_shapes.items())}
        if self.ranges != "calibrated":
            d["ranges"] = self.ranges
        return d


@dataclass
class Calibration:
    model_id: str
    data_id: str
    samples: int
    options: dict
    tensors: dict[str, TensorObserver] = field(default_factory=dict)
    qconv_version: str = __version__
    equalization: dict[str, list[float]] = field(default_factory=dict)  # --equalize: Conv -> its gated pair's scales
    smoothing: dict[str, dict] = field(default_factory=dict)  # SmoothQuant: MatMul/Gemm -> {"scales": [...], "range": [lo, hi]}
    # calibrate --ranges output (qconv.adjust.clip): {"ranges": {tensor: [lo, hi]}, "search": summary, "scheme": the
    # plan's scheme they were searched for}; quantize --calib uses them where its scheme is the same
    output_ranges: dict = field(default_factory=dict)
    # calibrate's check of range floors (pipeline.floors_checked, on the all-int8 plan of "scheme"): {"tensors": how many
    # activations a floor moves, "kept": the verdict, "check": what it measured, "scheme": ...}; quantize --calib
    # follows it by default where its scheme is the same. Empty: not checked (--floor-ranges / --no-floor-ranges).
    floors: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = {
            "schema": SCHEMA,
            "version": VERSION,
            "qconv_version": self.qconv_version,
            "model_id": self.model_id,
            "data_id": self.data_id,
            "samples": self.samples,
            "options": self.options,
            "tensors": {name: obs.to_dict() for name, obs in sorted(self.tensors.items())},
        }
        if self.equalization:
            d["equalization"] = {k: list(v) for k, v in sorted(self.equalization.items())}
        if self.smoothing:
            d["smoothing"] = {k: dict(sorted(v.items())) for k, v in sorted(self.smoothing.items())}
        if self.output_ranges:
            d["output_ranges"] = self.output_ranges
        if self.floors:
            d["floors"] = self.floors
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "calibration file") -> "Calibration":
        if d.get("schema") != SCHEMA:
            raise QconvError(f"{source} is not a qconv calibration file (no '{SCHEMA}' schema field)")
        if d.get("version") != VERSION:
            raise QconvError(f"{source} has calibration schema version {d.get('version')}; this qconv reads version {VERSION}: re-run qconv calibrate")
        try:
            options = dict(d.get("options", {}))
            return cls(
                model_id=str(d["model_id"]),
                data_id=str(d["data_id"]),
                samples=int(d["samples"]),
                options=options,
                tensors={k: TensorObserver.from_dict(v, momentum=float(options.get("momentum", 0.01))) for k, v in dict(d["tensors"]).items()},
                qconv_version=str(d.get("qconv_version", "")),
                equalization={str(k): [float(x) for x in v] for k, v in dict(d.get("equalization") or {}).items()},
                smoothing=smoothing_of(d.get("smoothing")),
                output_ranges=_output_ranges(d.get("output_ranges")),
                floors=_floors(d.get("floors")),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise QconvError(f"{source} is missing or has malformed fields ({exc}): re-run qconv calibrate") from None

    def ranges(self, method: str = "minmax", symmetric: bool = False, percentile: float = 99.999) -> dict[str, tuple[float, float]]:
        """The range of every tensor that saw at least one finite value, by ``method``."""
        return {k: select_range(o, method, symmetric, percentile) for k, o in self.tensors.items() if o.seen_finite}

    def nonfinite(self) -> dict[str, int]:
        return {k: o.nonfinite for k, o in self.tensors.items() if o.nonfinite}

    def mask_like(self, limit: float = 1e6) -> dict[str, float]:
        """Tensors whose values span more than 8 bits can hold: values beyond ``limit`` next to values near
        zero (>= 1% of them within 1e-3 of the extreme), as attention-mask arithmetic makes, unlike uniformly
        large activations. Maps each to the ratio of its largest to its typical (median) magnitude."""
        out = {}
        for k, o in self.tensors.items():
            if not o.seen_finite:
                continue
            extreme = max(abs(o.min), abs(o.max))
            if extreme < limit:
                continue
            h = o.hist
            if h is None or h.width == 0.0:
                out[k] = math.inf  # no histogram: by magnitude alone
                continue
            centers = (h.start + np.arange(h.bins) + 0.5) * h.width
            small = h.counts[np.abs(centers) <= max(1e-3 * extreme, h.width)].sum()
            if small >= 0.01 * max(h.counts.sum(), 1):
                mags = np.abs(centers)
                order = np.argsort(mags, kind="stable")
                cum = np.cumsum(h.counts[order])
                median = float(mags[order][int(np.searchsorted(cum, cum[-1] / 2.0))]) if cum[-1] else 0.0
                out[k] = extreme / max(median, h.width / 2.0)
        return out

    def constant(self) -> list[str]:
        return sorted(k for k, o in self.tensors.items() if o.seen_finite and o.min == o.max)

    def identity(self) -> dict:
        """What a plan and a written model record of the calibration they were made from."""
        return {"model_id": self.model_id, "data_id": self.data_id, "samples": self.samples, "options": self.options}


@dataclass(frozen=True)
class Ranges:
    """What planning reads from statistics: from a calibration (its observers: any range method, per-tensor method
    overrides) or from a stored plan (the ranges it recorded, by its own method: enough to plan again without data)."""

    observers: dict[str, TensorObserver]
    recorded: dict[str, tuple[float, float]] | None  # a stored plan's ranges; None: chosen from the observers
    nonfinite: dict[str, int]
    masks: dict[str, float]
    identity: dict | None  # the calibration's identity (a stored plan's: as it recorded it)
    speed: dict | None = None  # a stored plan's kernel-table verdict (qconv.plan.regions), reused without the table
    # ranges chosen for their readers' output error (--ranges output, qconv.adjust.clip), over the method's
    refined: dict[str, tuple[float, float]] | None = None
    _selected: dict = field(default_factory=dict, compare=False, repr=False)  # (method, symmetric, percentile) -> ranges

    @classmethod
    def of(cls, calib: Calibration | Ranges | None) -> Ranges | None:
        if calib is None or isinstance(calib, Ranges):
            return calib
        return cls(calib.tensors, None, calib.nonfinite(), calib.mask_like(), calib.identity())

    @classmethod
    def recorded_in(cls, source: dict) -> Ranges:
        """The ranges a plan recorded in its ``source`` (no histograms: a method override needs the calibration file)."""
        return cls({}, {k: (float(v[0]), float(v[1])) for k, v in dict(source.get("ranges") or {}).items()},
                   dict(source.get("nonfinite") or {}), dict(source.get("masks") or {}), source.get("calibration"),
                   source.get("speed"), refined_in(source))

    def select(self, method: str, symmetric: bool, percentile: float) -> dict[str, tuple[float, float]]:
        """The range of every observed tensor by ``method`` (a stored plan: the ranges it recorded)."""
        if self.recorded is not None:
            return dict(self.recorded)
        key = (method, symmetric, percentile)  # observers do not change once calibrated: tuning plans many times per method
        if key not in self._selected:
            self._selected[key] = {k: select_range(o, method, symmetric, percentile) for k, o in self.observers.items() if o.seen_finite}
        return dict(self._selected[key])


def _output_ranges(d) -> dict:
    if not d:
        return {}
    return {"ranges": {str(k): [float(v[0]), float(v[1])] for k, v in dict(d["ranges"]).items()}, "search": dict(d["search"]),
            "scheme": dict(d["scheme"])}


def refined_in(source: dict) -> dict[str, tuple[float, float]] | None:
    """The output-aware ranges a plan recorded (``source.output_ranges``), or None."""
    got = source.get("output_ranges")
    return {k: (float(v[0]), float(v[1])) for k, v in dict(got).items()} if got else None


_MERGE_KEYS = ("bins", "momentum", "batch_size", "hist_samples")


def merge_tensors(parts: list[dict[str, TensorObserver]]) -> dict[str, TensorObserver]:
    """Observers of the same tensors from shards, merged in the order given (min/max and histograms exactly). Each
    tensor's moving average is folded once, from all shards' per-batch extremes (not once per shard)."""
    groups: dict[str, list[TensorObserver]] = {}
    for part in parts:
        for k, o in part.items():
            groups.setdefault(k, []).append(o)
    tensors: dict[str, TensorObserver] = {}
    for k, group in groups.items():
        merged = group[0].copy()
        deferred = merged.extremes is not None and all(o.extremes is not None for o in group[1:])
        for o in group[1:]:
            merged.merge(o, refold=not deferred)
        if deferred and len(group) > 1:
            merged.refold()
        merged.canonicalize()
        tensors[k] = merged
    return tensors


def merge(parts: list[tuple[str, Calibration]]) -> Calibration:
    """One calibration from shards of the same model made with the same options."""
    if not parts:
        raise QconvError("nothing to merge: give two or more calibration files")
    first_name, first = parts[0]
    for name, c in parts[1:]:
        if c.model_id != first.model_id:
            raise QconvError(f"cannot merge {name} with {first_name}: they were made for different models")
        if c.qconv_version != first.qconv_version:
            raise QconvError(f"cannot merge {name} (qconv {c.qconv_version}) with {first_name} (qconv {first.qconv_version}): re-run calibrate with one version")
        for key in (*_MERGE_KEYS, "equalize", "smooth"):
            if c.options.get(key) != first.options.get(key):
                raise QconvError(f"cannot merge {name} with {first_name}: option {key} differs ({c.options.get(key)} vs {first.options.get(key)})")
        for key in ("equalization", "smoothing"):  # the weights the statistics were observed with
            if getattr(c, key) != getattr(first, key):
                raise QconvError(f"cannot merge {name} with {first_name}: their {key} scales differ (made from other data): calibrate "
                                 "the shards with --shard K/N on the same data")
    tensors = merge_tensors([c.tensors for _, c in parts])
    h = hashlib.sha256()
    for data_id in sorted(c.data_id for _, c in parts):
        h.update(data_id.encode())
    options = {k: first.options.get(k) for k in _MERGE_KEYS}
    options["method"] = first.options.get("method")
    options["merged_from"] = len(parts)
    options.update({k: True for k in ("equalize", "smooth") if first.options.get(k)})
    return Calibration(first.model_id, h.hexdigest(), sum(c.samples for _, c in parts), options, tensors, first.qconv_version,
                       equalization=dict(first.equalization), smoothing=dict(first.smoothing))


def smoothing_of(d) -> dict[str, dict]:
    """SmoothQuant as a calibration file or plan records it: node -> {"scales": [...], "range": [lo, hi]}."""
    out = {}
    for k, v in dict(d or {}).items():
        scales, rng = [float(x) for x in v["scales"]], [float(x) for x in v["range"]]
        if not scales or min(scales) <= 0 or len(rng) != 2 or not rng[0] <= 0.0 <= rng[1]:
            raise ValueError(f"smoothing of '{k}'")
        out[str(k)] = {"scales": scales, "range": rng}
        if v.get("alpha") is not None:
            out[str(k)]["alpha"] = float(v["alpha"])
    return out


def _floors(d) -> dict:
    if not d:
        return {}
    return {"tensors": int(d["tensors"]), "kept": bool(d["kept"]), "check": str(d.get("check", "")), "scheme": dict(d["scheme"])}
