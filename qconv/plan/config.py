"""The one typed, validated description of what a quantization run should do."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from qconv.calib.observers import DEFAULT_BINS, DEFAULT_MOMENTUM  # noqa: F401 - re-exported for the CLI
from qconv.calib.ranges import METHODS
from qconv.errors import UsageError
from qconv.plan.names import first_match

MODES = ("int8", "dynamic", "fp16", "a16w8", "int4")
FORMATS = ("qdq", "qoperator")
BLOCK_SIZES = (16, 32, 64, 128, 256)
INT4_METHODS = ("rtn", "gptq", "hqq", "awq", "awq_gptq")  # qconv.rewrite.weight_only.METHODS
ACCURACY_LEVELS = ("auto", "0", "1", "2", "3", "4")
ROUNDINGS = ("nearest", "gptq")  # --rounding: nearest, or qconv.adjust.rounding
RANGE_CHOICES = ("calibrated", "output", "auto")  # --ranges: the range method's, or qconv.adjust.clip; auto: jobs resolve it
# Modes that need calibration statistics, and the formats each mode can be written in.
CALIBRATED = {"int8", "a16w8"}
MODE_FORMATS = {"int8": ("qdq", "qoperator"), "a16w8": ("qdq",), "dynamic": ("qoperator",), "fp16": (), "int4": ()}


@dataclass(frozen=True)
class QuantConfig:
    mode: str = "int8"
    format: str | None = None  # None: the mode's natural form (qdq for static modes)
    per_channel: bool = True
    weight_type: str = "int8"
    activation_type: str | None = None  # None: uint8 (int8 mode), uint16 (a16w8)
    symmetric_weights: bool = True
    symmetric_activations: bool = False
    reduce_range: bool = False
    method: str = "minmax"  # calib.ranges.DEFAULT_METHOD (jobs fill it from the options or the calibration file)
    percentile: float = 99.999
    block_size: int = 32
    int4_method: str = "rtn"
    # int4: auto (accuracy_level 4 when the outputs agree with the float-activation kernels on the data's rows, or
    # on generated rows without data), or a level 0-4 pinned (0: the attribute left out, onnxruntime's default)
    accuracy_level: str = "auto"
    # int4: the size the model may reach (the --max-size-mb gate): the MatMuls whose int4 error is largest are stored
    # in 8 bits while the model stays within it (mixed int4/int8); None: every weight int4
    size_budget_mb: float | None = None
    keep_io_types: bool = True
    exclude_nodes: tuple[str, ...] = field(default_factory=tuple)
    exclude_ops: tuple[str, ...] = field(default_factory=tuple)
    quantized_io: str | None = None  # uint8 | int8: the model's float inputs and outputs become integer tensors
    # full | fast: shift each int8 layer's bias by the mean error measured on the data (qconv.adjust.bias); auto (the
    # command line's default): full when the run has calibration rows (--data, no --tune), else none. Jobs resolve it.
    bias_correction: str | None = None
    # nearest | gptq: the integer each int8 weight takes; gptq rounds for the layer's output on the calibration rows
    # (qconv.adjust.rounding), keeping the plan's scales
    rounding: str = "nearest"
    # calibrated | output: each activation's range by the range method, or narrowed where that lowers the error at
    # the outputs of the layers reading it, on the calibration rows (qconv.adjust.clip); auto (the command line's
    # default): output where the run has calibration rows (--data) and a check on other rows says it pays, else
    # calibrated. Jobs resolve it; plans store calibrated or output.
    ranges: str = "calibrated"
    # int8 weights whose adjacent pairs could saturate the 16-bit sums of x86 CPUs without VNNI get a scale just wide
    # enough (qconv.numeric.pairs); False (--allow-saturation): the scales the weights' ranges give
    saturation_safe: bool = True
    # cut activation ranges where every reader is flat below (rules.saturation): exact, finer steps. auto (the command
    # line's default): on where a check of the int8 model's outputs on calibration rows says they gain (with --data at
    # quantize time; with --calib as `qconv calibrate` checked and recorded it), else off. Jobs resolve it; plans
    # store true or false.
    floor_ranges: bool | str = False
    # cross-layer equalization (qconv.adjust.equalize). on (--equalize): Conv pairs joined by identity/Relu rescaled
    # data-free at intake, and the pairs joined by hard-swish/SiLU on the calibration rows; auto (the default): the
    # same, the hard-swish/SiLU pairs kept only where a quick check on those rows says the int8 model's outputs gain
    # enough to pay for them (pipeline.equalize_checked); off (--no-equalize). Jobs resolve auto to on or off as the
    # calibration decided, so plans store on (true) or off (false) and replay the scales they recorded
    # (source.equalization), never the check.
    equalize: str = "auto"
    # SmoothQuant before calibration (qconv.adjust.smooth): every MatMul/Gemm input divided by per-channel scales folded
    # into its weight, each layer's alpha chosen for its own int8 output on the calibration rows. auto (the default):
    # on a transformer stack (adjust.smooth.MIN_NODES such nodes or more), kept where a quick check on those rows says the
    # int8 model's outputs gain (pipeline.smooth_checked); on (--smooth): on any such node, no check; off (--no-smooth).
    # Jobs resolve auto as the calibration decided; plans store true only when scales were applied (source.smoothing).
    smooth: str = "auto"
    # int8: the kernel cost table that decides where int8 is slower than float (qconv.plan.kernels): auto | shipped |
    # none | a table file
    kernels: str = "auto"

    def __post_init__(self):
        if self.mode not in MODES:
            raise UsageError(f"unknown --mode '{self.mode}'; choose one of: {', '.join(MODES)}")
        if self.format is not None and self.format not in FORMATS:
            raise UsageError(f"unknown --format '{self.format}'; choose one of: {', '.join(FORMATS)}")
        if self.format is not None and self.format not in MODE_FORMATS[self.mode]:
            allowed = MODE_FORMATS[self.mode]
            detail = f"it is written as {allowed[0]}" if allowed else "it has no integer operator form"
            raise UsageError(f"--mode {self.mode} cannot be written as --format {self.format} ({detail}); drop --format")
        if self.method not in METHODS:
            raise UsageError(f"unknown --method '{self.method}'; choose one of: {', '.join(METHODS)}")
        if not 0.0 < self.percentile <= 100.0:
            raise UsageError(f"--percentile must be in (0, 100] (got {self.percentile:g})")
        if self.weight_type not in ("int8", "uint8"):
            raise UsageError(f"--weight-type must be int8 or uint8 (got {self.weight_type})")
        allowed_act = ("uint16", "int16") if self.mode == "a16w8" else ("uint8", "int8")
        if self.activation_type is not None and self.activation_type not in allowed_act:
            raise UsageError(f"--mode {self.mode} takes --activation-type {' or '.join(allowed_act)} (got {self.activation_type})")
        if self.block_size not in BLOCK_SIZES:
            raise UsageError(f"--block-size must be one of {', '.join(map(str, BLOCK_SIZES))} (got {self.block_size})")
        if self.quantized_io is not None:
            if self.quantized_io not in ("uint8", "int8"):
                raise UsageError(f"--quantized-io must be uint8 or int8 (got {self.quantized_io})")
            if self.mode != "int8":
                raise UsageError(f"--quantized-io needs --mode int8 (integer inputs and outputs are 8-bit); drop it for --mode {self.mode}")
            if self.activation_type is not None and self.activation_type != self.quantized_io:
                raise UsageError(f"--quantized-io {self.quantized_io} needs {self.quantized_io} activations: drop --activation-type "
                                 f"{self.activation_type} (or make them match)")
        if self.bias_correction not in (None, "full", "fast", "auto"):
            raise UsageError(f"--bias-correction is full, fast or off (got {self.bias_correction})")
        if self.rounding not in ROUNDINGS:
            raise UsageError(f"--rounding is {' or '.join(ROUNDINGS)} (got {self.rounding})")
        if self.rounding != "nearest" and not self.needs_calibration:
            raise UsageError(f"--rounding {self.rounding} rounds the int8 weights of the static modes (int8, a16w8); --mode {self.mode} "
                             f"{'has its own --int4-method' if self.mode == 'int4' else 'rounds to nearest'}: drop it")
        if self.ranges not in RANGE_CHOICES:
            raise UsageError(f"--ranges is {' or '.join(RANGE_CHOICES)} (got {self.ranges})")
        if self.ranges == "output" and not self.needs_calibration:
            raise UsageError(f"--ranges {self.ranges} chooses the activation ranges of the static modes (int8, a16w8); --mode "
                             f"{self.mode} has none: drop it")
        if isinstance(self.equalize, bool):  # plans store it so, and the API's older spelling
            object.__setattr__(self, "equalize", "on" if self.equalize else "off")
        if self.equalize not in ("auto", "on", "off"):
            raise UsageError(f"equalize is auto, on or off (got {self.equalize})")
        if isinstance(self.smooth, bool):  # plans store it so
            object.__setattr__(self, "smooth", "on" if self.smooth else "off")
        if self.smooth not in ("auto", "on", "off"):
            raise UsageError(f"smooth is auto, on or off (got {self.smooth})")
        if self.smooth == "on" and not self.needs_calibration:
            raise UsageError(f"--smooth rescales the weights for the static int8 modes (int8, a16w8), not --mode {self.mode}: drop it")
        if self.equalize == "on" and not self.needs_calibration:
            raise UsageError(f"--equalize prepares the weights for the static int8 modes (int8, a16w8), not --mode {self.mode}: drop it")
        if self.bias_correction in ("full", "fast") and not self.needs_calibration:
            raise UsageError(f"--bias-correction corrects the static int8 modes (int8, a16w8); --mode {self.mode} has no activation "
                             "quantization to correct: drop it")
        if self.floor_ranges not in (True, False, "auto"):
            raise UsageError(f"floor_ranges is auto, true or false (got {self.floor_ranges})")
        if not self.kernels:
            raise UsageError("--kernels takes auto, shipped, none or a kernel table file (got an empty value)")
        if self.int4_method not in INT4_METHODS:
            raise UsageError(f"unknown int4 method '{self.int4_method}'; choose one of {', '.join(INT4_METHODS)}")
        if self.accuracy_level not in ACCURACY_LEVELS:
            raise UsageError(f"--accuracy-level must be one of {', '.join(ACCURACY_LEVELS)} (got {self.accuracy_level})")

    @property
    def output_format(self) -> str:
        return self.format or (MODE_FORMATS[self.mode][0] if MODE_FORMATS[self.mode] else self.mode)

    @property
    def weight_qtype(self):
        """The weight QType; ``reduce_range``: 7-bit, so int8 products cannot overflow int16 sums on CPUs without VNNI."""
        from qconv.numeric import qmath

        w_q = qmath.qtype(self.weight_type)
        if self.reduce_range:
            w_q = qmath.QType(w_q.name, -64, 63) if w_q.signed else qmath.QType(w_q.name, 0, 127)
        return w_q

    @property
    def act_type(self) -> str:
        return self.activation_type or self.quantized_io or ("uint16" if self.mode == "a16w8" else "uint8")

    @property
    def needs_calibration(self) -> bool:
        return self.mode in CALIBRATED

    @property
    def min_opset(self) -> int:
        """Per-channel DequantizeLinear (the axis attribute) needs opset 13; plain QDQ needs 10."""
        if self.mode in ("fp16", "int4"):
            return 1
        return 13 if self.per_channel or self.mode == "dynamic" else 10

    def excluded(self, name: str, op_type: str) -> str | None:
        """Why --exclude-nodes / --exclude-ops keep this node in float, if they do: the one place they are read."""
        pattern = first_match(name, self.exclude_nodes)
        if pattern is not None:
            return f"excluded by --exclude-nodes {pattern}"
        if op_type in self.exclude_ops:
            return f"excluded by --exclude-ops {op_type}"
        return None

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        """The inverse of ``to_dict`` (unknown keys are refused by the caller's error handling)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config key '{unknown[0]}'")
        kw = dict(d)
        mode = kw.get("mode", "int8")
        if kw.get("format") not in MODE_FORMATS.get(mode, ()):
            kw["format"] = None
        kw["exclude_nodes"] = tuple(kw.get("exclude_nodes", ()))
        kw["exclude_ops"] = tuple(kw.get("exclude_ops", ()))
        return cls(**kw)  # a plan's equalize is a bool: __post_init__ reads it as on/off

    def to_dict(self) -> dict:
        d = asdict(self)
        d["exclude_nodes"] = list(self.exclude_nodes)
        d["exclude_ops"] = list(self.exclude_ops)
        d["format"] = self.output_format
        d["activation_type"] = self.act_type
        d["equalize"] = self.equalize == "on"
        if self.smooth == "on":
            d["smooth"] = True
        else:
            d.pop("smooth")  # plans without SmoothQuant stay as they were
        if self.mode != "int4":
            d.pop("accuracy_level")  # int4 only; plans of the other modes stay as they were
            d.pop("size_budget_mb")
        if self.mode != "int8":
            d.pop("kernels")
        if self.rounding == "nearest":
            d.pop("rounding")  # plans without learned rounding stay as they were
        if self.ranges != "output":
            d.pop("ranges")
        if self.saturation_safe:
            d.pop("saturation_safe")
        return d
