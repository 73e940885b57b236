"""One module per mode, each exposing the same four names, looked up by ``--mode``:

``check(overrides, config, where)``           the overrides this mode can honour (one-line errors otherwise)
``plan(prepared, calib, config, overrides)``  what the mode does to every node: a complete plan
``apply(prepared, plan, calib_feeds)``        the rewrite of that plan, nothing decided again -> ``Applied``
``SMOOTH``                                    whether SmoothQuant overrides apply (the static modes)

``qconv.pipeline`` does what is common to every mode around them (override checks, the plan's source, the interface
check, annotation, verification).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType

import onnx


@dataclass
class Findings:
    """What a rewrite found worth a report section (each mode fills its own; unset sections are left out)."""

    fp16: dict | None = None  # overflow / underflow of the halved values, nodes converted
    int4: dict | None = None  # method, block size, the weights converted and their error
    quantized_io: dict | None = None  # the integer inputs' and outputs' scales
    qoperator: dict | None = None  # {QLinear op: count} of the QOperator form
    subgraphs: dict | None = None  # If/Loop/Scan bodies rewritten
    bias_correction: dict | None = None
    rounding: dict | None = None  # learned weight rounding: layers, weights moved, error ratio
    output_ranges: dict | None = None  # --ranges output: activations searched and narrowed, error ratio, the check
    smoothing: dict | None = None  # SmoothQuant before calibration: inputs smoothed, the alphas chosen
    fused: dict | None = None  # float regions written as onnxruntime fuses them (qconv.rewrite.fusible)
    converted_from: str | None = None  # "qdq": a QDQ model folded into QOperator form

    def to_dict(self) -> dict:
        return {k: v for k, v in vars(self).items() if v is not None}


@dataclass
class Applied:
    model: onnx.ModelProto
    findings: Findings = field(default_factory=Findings)
    analysis: onnx.ModelProto | None = None  # numerically the same as model, with DequantizeLinear to probe
    dequantized: dict[str, str] = field(default_factory=dict)  # float tensor -> its DequantizeLinear output
    retyped_io: bool = False  # the interface's element types changed on purpose (fp16 I/O, integer I/O)


def of(mode: str) -> ModuleType:
    from qconv.modes import dynamic, fp16, int4, static

    return {"int8": static, "a16w8": static, "dynamic": dynamic, "fp16": fp16, "int4": int4}[mode]
