"""The calibration file: versioned JSON with the model's and data's identity and per-tensor statistics."""

from __future__ import annotations

from dataclasses import dataclass, field

from qconv import __version__
from qconv.calib.observers import MinMaxObserver
from qconv.errors import QconvError

SCHEMA = "qconv.calibration"
VERSION = 1


@dataclass
class Calibration:
    model_id: str
    data_id: str
    samples: int
    options: dict
    tensors: dict[str, MinMaxObserver] = field(default_factory=dict)
    qconv_version: str = __version__

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "version": VERSION,
            "qconv_version": self.qconv_version,
            "model_id": self.model_id,
            "data_id": self.data_id,
            "samples": self.samples,
            "options": self.options,
            "tensors": {name: obs.to_dict() for name, obs in sorted(self.tensors.items())},
        }

    @classmethod
    def from_dict(cls, d: dict, source: str = "calibration file") -> "Calibration":
        if d.get("schema") != SCHEMA:
            raise QconvError(f"{source} is not a qconv calibration file (no '{SCHEMA}' schema field)")
        if d.get("version") != VERSION:
            raise QconvError(f"{source} has calibration schema version {d.get('version')}; this qconv reads version {VERSION}: re-run qconv calibrate")
        try:
            return cls(
                model_id=str(d["model_id"]),
                data_id=str(d["data_id"]),
                samples=int(d["samples"]),
                options=dict(d.get("options", {})),
                tensors={k: MinMaxObserver.from_dict(v) for k, v in dict(d["tensors"]).items()},
                qconv_version=str(d.get("qconv_version", "")),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise QconvError(f"{source} is missing or has malformed fields ({exc}): re-run qconv calibrate") from None

    def ranges(self) -> dict[str, tuple[float, float]]:
        """Min-max range of every tensor that saw at least one finite value."""
        return {k: (o.min, o.max) for k, o in self.tensors.items() if o.seen_finite}
