"""The one typed, validated description of what a quantization run should do."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from qconv.errors import UsageError

FORMATS = ("qdq",)
from qconv.calib.ranges import METHODS


@dataclass(frozen=True)
class QuantConfig:
    format: str = "qdq"
    per_channel: bool = True
    weight_type: str = "int8"
    activation_type: str = "uint8"
    symmetric_weights: bool = True
    symmetric_activations: bool = False
    method: str = "minmax"
    percentile: float = 99.999
    exclude_nodes: tuple[str, ...] = field(default_factory=tuple)
    exclude_ops: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if self.format not in FORMATS:
            raise UsageError(f"unknown --format '{self.format}'; choose one of: {', '.join(FORMATS)}")
        if self.method not in METHODS:
            raise UsageError(f"unknown --method '{self.method}'; choose one of: {', '.join(METHODS)}")
        if not 0.0 < self.percentile <= 100.0:
            raise UsageError(f"--percentile must be in (0, 100] (got {self.percentile:g})")
        if self.weight_type not in ("int8", "uint8") or self.activation_type not in ("int8", "uint8"):
            raise UsageError("weight and activation types must be int8 or uint8")

    @property
    def min_opset(self) -> int:
        """Per-channel DequantizeLinear (the axis attribute) needs opset 13; plain QDQ needs 10."""
        return 13 if self.per_channel else 10

    def to_dict(self) -> dict:
        d = asdict(self)
        d["exclude_nodes"] = list(self.exclude_nodes)
        d["exclude_ops"] = list(self.exclude_ops)
        return d
