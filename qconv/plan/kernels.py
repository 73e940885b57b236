"""The kernel cost table: what an int8 kernel and its float twin cost on one CPU, which the default plan weighs.

A table (JSON, schema ``qconv.kernels``) holds, per op kind and precision, nanoseconds per unit of work at a few
channel counts (a multiply-add for dense convolutions, an output element otherwise), the per-element price of the
conversions an int8 region's border adds (QuantizeLinear / DequantizeLinear, and the layout changes: onnxruntime
runs int8 convolutions channels-last and float ones in blocked NCHWc), and the fixed cost of a kernel call. A model's
own table (``nodes``: each node timed float and int8 in place, ``model_id``, the ``feed`` it was timed on, and the
A/B ``verdicts`` of the region choices it makes) is written by qconv.measure.kernels.model_table, cached per
model and machine. ``--kernels`` picks which a plan uses: ``auto`` (the model's cached table, else none), ``shipped``
(the op-kind table of this CPU family), a file, or ``none``. A plan is a pure function of the model, the statistics,
the options and the table, so the same table gives the same bytes on any machine; the plan records its name and
digest.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path

from qconv.errors import QconvError

SCHEMA = "qconv.kernels"
VERSION = 1


def cpu_family() -> str:
    """The CPU family a shipped table is chosen by: the instruction set onnxruntime's int8 kernels use."""
    machine = platform.machine().lower()
    if machine in ("arm64", "aarch64"):
        return "arm64"
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line
                    break
    except OSError:
        pass
    words = set(flags.split())
    if "avx512_vnni" in words or "avx_vnni" in words:
        return "x86-64-vnni"
    if "avx2" in words:
        return "x86-64-avx2"
    return "generic"


def _runtime_version() -> str:
    try:
        return metadata.version("onnxruntime")
    except metadata.PackageNotFoundError:
        return "unknown"


def cache_dir() -> Path:
    """``$QCONV_CACHE_DIR/kernels`` (the tuning cache's root too), else ``~/.cache/qconv/kernels``."""
    root = os.environ.get("QCONV_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "qconv")
    return Path(root) / "kernels"


def model_cache_path(model_id: str) -> Path:
    """Where a model's own table (its nodes timed in place) is cached on this machine."""
    key = "".join(c for c in model_id if c.isalnum())[-24:] or "model"
    return cache_dir() / "models" / f"{key}-{cpu_family()}-{platform.machine().lower()}-ort{_runtime_version()}.json"


def new_table(name: str, ops: dict, per_element: dict, call_ns: dict, measured: bool) -> dict:
    return {"schema": SCHEMA, "version": VERSION, "name": name, "cpu_family": cpu_family(), "machine": platform.machine(),
            "onnxruntime": _runtime_version(), "threads": 1, "measured": measured, "call_ns": call_ns,
            "per_element": per_element, "ops": ops}


@dataclass(frozen=True)
class Table:
    """A loaded kernel cost table: ``cost`` of an op kind's work in one precision, ``border`` of a conversion."""

    name: str
    data: dict
    digest: str

    @classmethod
    def of(cls, data: dict, where: str) -> "Table":
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise QconvError(f"{where} is not a kernel cost table (no '{SCHEMA}' schema field): write one with qconv kernels --measure")
        if data.get("version") != VERSION:
            raise QconvError(f"{where} has kernel table version {data.get('version')}; this qconv reads version {VERSION}: "
                             "measure it again with qconv kernels --measure")
        try:
            for key, points in data["ops"].items():
                for prec in ("float", "int8"):
                    for x, ns in points[prec]:
                        float(x), float(ns)
            float(data["call_ns"]["float"]), float(data["call_ns"]["int8"])
            for k in ("QuantizeLinear", "DequantizeLinear", "layout.int8", "layout.float"):
                float(data["per_element"][k])
            for name, (int8, flt) in dict(data.get("nodes") or {}).items():
                float(int8), float(flt)
            for v in verdicts(data):
                list(v["float_nodes"]), float(v["ratio"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise QconvError(f"{where} is missing or has malformed fields ({type(exc).__name__}: {exc}): "
                             "measure it again with qconv kernels --measure") from None
        text = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return cls(str(data.get("name", where)), data, hashlib.sha256(text.encode()).hexdigest()[:16])

    def node(self, name: str) -> tuple[float, float] | None:
        """(int8 ns, float ns) of a node timed in its model (a model's own table), else None."""
        got = (self.data.get("nodes") or {}).get(name)
        return None if got is None else (float(got[0]), float(got[1]))

    def verdict(self, floats: list[str], against: list[str]) -> dict | None:
        """The A/B timing (when the table was made) of the choice keeping ``floats`` float against the one keeping
        ``against`` float (empty: the all-int8 model), if timed."""
        want = (sorted(floats), sorted(against))
        for v in verdicts(self.data):
            if (sorted(v.get("float_nodes") or []), sorted(v.get("against") or [])) == want:
                return v
        return None

    def has(self, key: str) -> bool:
        return key in self.data["ops"]

    def cost(self, key: str, precision: str, x: float, units: float) -> float:
        """Nanoseconds of ``units`` of work of op kind ``key`` at channel count ``x``, plus the call."""
        points = sorted(self.data["ops"][key][precision])
        return self.call(precision) + units * _interpolate(points, x)

    def call(self, precision: str) -> float:
        return float(self.data["call_ns"]["int8" if precision == "int8" else "float"])

    def border(self, elements: float, into_int8: bool, blocked: bool = True) -> float:
        """Nanoseconds of converting ``elements`` values across an int8 region's border: the conversion, the int8
        side's channels-last layout, and (``blocked``: the float side is a convolution) the float side's NCHWc one."""
        pe = self.data["per_element"]
        convert = pe["QuantizeLinear"] if into_int8 else pe["DequantizeLinear"]
        layout = pe["layout.int8"] + (pe["layout.float"] if blocked else 0.0)
        return elements * (convert + layout) + self.call("int8")

    def summary(self) -> dict:
        d = {"name": self.name, "digest": self.digest, "cpu_family": self.data.get("cpu_family"),
             "onnxruntime": self.data.get("onnxruntime"), "measured": bool(self.data.get("measured"))}
        if self.data.get("nodes"):
            d["nodes"] = len(self.data["nodes"])
            d["feed"] = self.data.get("feed")
        return d


def verdicts(data: dict) -> list[dict]:
    """A model table's A/B verdicts, oldest first: ``verdicts``, or the one ``verified`` dict of a table written before
    there could be several (new tables leave that key out, so an older qconv reading them plans by the estimate)."""
    if "verdicts" in data:
        return list(data["verdicts"] or [])
    got = data.get("verified")
    return [got] if isinstance(got, dict) else []


def _interpolate(points: list, x: float) -> float:
    """Piecewise linear in log2(x) between measured points, flat beyond the ends."""
    if len(points) == 1 or x <= points[0][0]:
        return float(points[0][1])
    if x >= points[-1][0]:
        return float(points[-1][1])
    lx = math.log2(x)
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x <= x1:
            t = (lx - math.log2(x0)) / (math.log2(x1) - math.log2(x0))
            return float(y0 + t * (y1 - y0))
    return float(points[-1][1])


def shipped(family: str | None = None) -> Table:
    """The table shipped for ``family`` (this CPU's by default), else the generic one."""
    family = family or cpu_family()
    folder = resources.files("qconv") / "kernels"
    name = f"{family}.json" if (folder / f"{family}.json").is_file() else "generic.json"
    data = json.loads((folder / name).read_text())
    return Table.of(data, f"shipped kernel table {name}")


def load(spec: str | None, model_id: str | None = None) -> Table | None:
    """The table ``--kernels`` names. auto: the model's own table cached on this machine (``qconv kernels MODEL``, or the
    first int8 run that had rows to time it on), else None (no table: int8 wherever a kernel exists); shipped: the
    op-kind table of this CPU family; none; or a JSON file."""
    spec = spec or "auto"
    if spec == "none":
        return None
    if spec == "shipped":
        return shipped()
    if spec == "auto":
        if model_id is None:
            return None
        path = model_cache_path(model_id)
        if not path.is_file():
            return None
        try:
            return Table.of(json.loads(path.read_text()), f"cached kernel table {path}")
        except (QconvError, ValueError):
            return None  # a broken cache is no table, never a failed run
    path = Path(spec)
    if not path.is_file():
        raise QconvError(f"--kernels {spec}: no such file; give auto, shipped, none or a table written by qconv kernels")
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise QconvError(f"--kernels {spec}: not JSON ({exc}): give a table written by qconv kernels") from None
    return Table.of(data, f"--kernels {spec}")
