"""A model as qconv holds it between stages: the file as loaded, its normalized float form, what intake changed;
and the forms derived from it for SmoothQuant overrides."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from qconv.plan.overrides import Overrides


@dataclass
class Prepared:
    """A model as loaded, its normalized float form, and what intake changed."""

    path: Path
    original: onnx.ModelProto
    model: onnx.ModelProto
    notes: list[str]
    model_id: str
    external_data: bool
    quantized_already: dict | None = None  # integer ops found in the input (it is not a float model)
    derived: dict = field(default_factory=dict, repr=False, compare=False)  # smoothed forms, by their scales
    variant: str = ""  # what changed the graph after intake (--equalize's gated pairs): kernel tables are per variant
    smoothing: dict = field(default_factory=dict)  # node -> {"scales", "range"}: the default's SmoothQuant (pipeline.smooth_checked)

    @property
    def kernel_id(self) -> str:
        """The id a kernel table of this graph is cached and matched by."""
        return f"{self.model_id}-{self.variant}" if self.variant else self.model_id


def smoothed(prepared: Prepared, overrides: Overrides | None) -> Prepared:
    """The prepared model with the overrides' SmoothQuant scales applied (itself when there are none)."""
    from qconv.rewrite.smooth import apply_smoothing

    scales = {k: v.smooth for k, v in (overrides.nodes.items() if overrides else []) if v.smooth is not None}
    if not scales:
        return prepared
    key = json.dumps(sorted(scales.items()))
    if key not in prepared.derived:
        if len(prepared.derived) > 8:
            prepared.derived.clear()
        model = apply_smoothing(prepared.model, scales)
        prepared.derived[key] = Prepared(prepared.path, prepared.original, model, prepared.notes, prepared.model_id,
                                         prepared.external_data, prepared.quantized_already, smoothing=prepared.smoothing)
    return prepared.derived[key]
