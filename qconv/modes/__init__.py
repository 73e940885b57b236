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
class Applied:
    model: onnx.ModelProto
    findings: dict = field(default_factory=dict)  # the mode's findings for the report
    analysis: onnx.ModelProto | None = None  # numerically the same as model, with DequantizeLinear to probe
    dequantized: dict[str, str] = field(default_factory=dict)  # float tensor -> its DequantizeLinear output
    retyped_io: bool = False  # the interface's element types changed on purpose (fp16 I/O, integer I/O)


def of(mode: str) -> ModuleType:
    from qconv.modes import dynamic, fp16, int4, static

    return {"int8": static, "a16w8": static, "dynamic": dynamic, "fp16": fp16, "int4": int4}[mode]
