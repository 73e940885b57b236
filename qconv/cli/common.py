"""Shared CLI plumbing: the error boundary and options several commands take."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from qconv.cli.console import Terminal
from qconv.errors import GateFailed, QconvError
from qconv.jobs import CalibOptions, EvalOptions
from qconv.measure.compare import DEFAULT_LAYER_SAMPLES
from qconv.measure.thresholds import Thresholds
from qconv.plan.config import DEFAULT_BINS, DEFAULT_MOMENTUM, FORMATS, METHODS, MODES, QuantConfig


def guarded(fn):
    """Turn QconvError into a one-line message and its exit code; anything else is an internal error."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        ctx = click.get_current_context()
        debug = bool(ctx.find_root().params.get("debug"))
        term = Terminal(quiet=bool(kwargs.get("quiet")))
        try:
            return fn(term, *args, **kwargs)
        except QconvError as exc:
            if debug:
                raise
            term.error(str(exc))
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            term.error("interrupted; nothing was written")
            sys.exit(130)
        except Exception as exc:  # noqa: BLE001 - the boundary: no traceback unless --debug
            if debug:
                raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            term.error(f"internal error: {type(exc).__name__}: {first} (re-run with --debug for the traceback, and please report it)")
            sys.exit(1)

    return wrapper


def parse_size(text: str) -> int:
    """'512MB', '2GB', '1.5G', '300000000' -> bytes (powers of 1024 for the units)."""
    units = {"": 1, "K": 2**10, "KB": 2**10, "M": 2**20, "MB": 2**20, "G": 2**30, "GB": 2**30}
    t = text.strip().upper().replace(" ", "").replace("IB", "B")
    num = t.rstrip("KMGB")
    try:
        value = float(num) * units[t[len(num):]]
    except (ValueError, KeyError):
        raise click.BadParameter(f"'{text}' is not a size like 512MB or 2GB") from None
    if value < 2**20:
        raise click.BadParameter(f"'{text}' is below 1MB: calibration needs room for at least one tensor")
    return int(value)


def data_options(fn):
    """Options that select feeds and set what calibration records."""
    fn = click.option("--shards", type=click.IntRange(min=1), default=None,
                      help="Calibration shards run as tasks (default 16 with --executor); the result depends on this, not on the workers.")(fn)
    fn = click.option("--executor", default=None, metavar="local|local:N|dask://HOST:PORT",
                      help="Run calibration shards on Dask: local:N starts N worker processes here (pip install 'qconv[dask]').")(fn)
    fn = click.option("--max-memory", default="1GB", show_default=True, metavar="SIZE", callback=lambda ctx, p, v: parse_size(v),
                      help="Activation memory one calibration pass may hold with --hist-samples 0; beyond it tensors are observed over several passes.")(fn)
    fn = click.option("--cast-data", is_flag=True,
                      help="Use integer data for float inputs as it is (by default refused: un-normalized pixels are a classic mistake).")(fn)
    fn = click.option("--momentum", type=click.FloatRange(0.0, 1.0, min_open=True), default=DEFAULT_MOMENTUM, show_default=True,
                      help="Weight of each batch in the moving-average method.")(fn)
    fn = click.option("--hist-samples", type=click.IntRange(min=0), default=None, metavar="N",
                      help="Histogram values per tensor and batch, a strided sample (default 16384, fewer past 64 feeds: about "
                           "a million a tensor over the run; 0 counts every value, "
                           "the default when --method is percentile, entropy or mse). Min/max are always exact.")(fn)
    fn = click.option("--bins", type=click.IntRange(min=128, max=65536), default=DEFAULT_BINS, show_default=True,
                      help="Histogram bins per tensor (memory per tensor is O(bins), whatever the samples).")(fn)
    fn = click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True,
                      help="Rows per feed when an array is split into batches.")(fn)
    fn = click.option("--samples", type=click.IntRange(min=1), default=None,
                      help="Use at most N rows of calibration data (default: all).")(fn)
    return fn


def range_options(fn):
    """How activation ranges are chosen from the recorded statistics."""
    fn = click.option("--percentile", type=float, default=None,
                      help="Percent of values the percentile method keeps, in (0, 100]  [default: 99.999]")(fn)
    fn = click.option("--method", type=click.Choice(METHODS), default=None,
                      help="Range method: minmax, moving-average, percentile, entropy (KL) or mse  [default: minmax, or the calibration file's]")(fn)
    return fn


def report_options(fn):
    """Where the report goes: files by extension, JSON on stdout; whether latency is measured, how many rows the
    per-layer analysis runs on."""
    fn = click.option("--metric", default=None, metavar="MODULE:FUNCTION",
                      help="Your task metric: FUNCTION(float_outputs, outputs) -> score or (total, count), higher is better "
                           "(dicts of output name -> array, one call per feed). Reported; gated by --min-metric; tuning never "
                           "takes a candidate it scores lower and ranks by it. MODULE: importable, or a path to a .py file.")(fn)
    fn = click.option("--layer-samples", type=click.IntRange(min=0), default=DEFAULT_LAYER_SAMPLES, show_default=True,
                      help="Rows of the evaluation data used for the per-layer analysis (0: none).")(fn)
    fn = click.option("--no-latency", is_flag=True, help="Skip the latency measurement.")(fn)
    fn = click.option("--json", "as_json", is_flag=True, help="Print the JSON report on stdout.")(fn)
    fn = click.option("--report", "reports", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
                      help="Write the report to PATH; .json, .html or .md picks the format (repeatable).")(fn)
    return fn


def gate_options(fn):
    """Quality gates: any failing one makes the command exit 3 (outputs are still written)."""
    fn = click.option("--max-latency-ratio", type=float, default=None, metavar="R", help="Gate: quantized/original median latency <= R.")(fn)
    fn = click.option("--max-size-mb", type=float, default=None, metavar="MB", help="Gate: quantized model size <= MB (10^6 bytes).")(fn)
    fn = click.option("--max-top1-drop", type=float, default=None, metavar="POINTS", help="Gate: top-1 accuracy drop <= POINTS (needs --eval-labels).")(fn)
    fn = click.option("--min-metric", type=float, default=None, metavar="X", help="Gate: your --metric >= X (tuning: its target).")(fn)
    fn = click.option("--min-agreement", type=float, default=None, metavar="X",
                      help="Gate: top-1 agreement of the first output (argmax per row or position) with the original's >= X.")(fn)
    fn = click.option("--min-cosine", type=float, default=None, metavar="X", help="Gate: cosine similarity of every output >= X.")(fn)
    fn = click.option("--min-sqnr", type=float, default=None, metavar="DB", help="Gate: SQNR of every output >= DB.")(fn)
    return fn


def gates_from(kwargs: dict) -> Thresholds:
    return Thresholds(**{k: kwargs.pop(k) for k in ("min_sqnr", "min_cosine", "max_top1_drop", "max_size_mb", "max_latency_ratio", "min_agreement",
                                                     "min_metric")})


def finish(term, report: dict, as_json: bool, render) -> None:
    """Print the report (JSON or tables), then fail with exit 3 if a gate failed."""
    if as_json:
        term.print_json(report)
        for w in report.get("warnings", []):  # stdout holds the JSON; stderr still says what to act on
            term.warn(w)
    else:
        render(term, report)
    gate = report.get("gate")
    if gate and not gate["passed"]:
        raise GateFailed("\n".join(f"gate failed: {c['message']}" for c in gate["checks"] if not c["passed"]))
    if gate and gate["checks"]:
        term.info(f"all {len(gate['checks'])} quality gates passed")


def scheme_options(fn):
    """The mode and scheme of a plan (shared by ``plan`` and ``quantize``), read back by ``config_from``."""
    opts = [
        click.option("--exclude-ops", multiple=True, metavar="OP", help="Keep every node of this op type in float (repeatable, or comma-separated: Add,Mul)."),
        click.option("--quantized-io", type=click.Choice(["uint8", "int8"]), default=None,
                     help="int8: make the model's float inputs and outputs integer tensors (scales in the model's metadata)."),
        click.option("--exclude-nodes", multiple=True, metavar="GLOB", help="Keep nodes whose name matches GLOB in float (repeatable)."),
        click.option("--keep-io-types/--no-keep-io-types", default=True, show_default=True, help="fp16: keep model inputs and outputs float32."),
        click.option("--int4-method", type=click.Choice(["rtn", "gptq", "hqq", "awq", "awq_gptq"]), default="gptq", show_default=True,
                     help="int4: gptq, awq and awq_gptq (AWQ's scales, then GPTQ's rounding) need --data (without it, "
                          "round-to-nearest is used); rtn: round to nearest; hqq: half-quadratic fit of each block to its weights, no data."),
        click.option("--accuracy-level", type=click.Choice(["auto", "0", "1", "2", "3", "4"]), default="auto", show_default=True,
                     help="int4: MatMulNBits accuracy_level. auto: 4 (int8 activation products, ~3x faster a token on x86) "
                          "for a decoder with a KV cache when its outputs keep the float model's as well as the default "
                          "kernels do on the data's rows (or generated ones); 0 leaves onnxruntime's default."),
        click.option("--block-size", type=int, default=32, show_default=True, help="int4: weights per block along K (16, 32, 64, 128 or 256)."),
        click.option("--reduce-range", is_flag=True, help="7-bit weights, for CPUs without VNNI (avoids int16 overflow in their int8 kernels)."),
        click.option("--symmetric-activations", is_flag=True, help="Zero point fixed at the middle of the activation range."),
        click.option("--activation-type", type=click.Choice(["uint8", "int8", "uint16", "int16"]), default=None,
                     help="Integer type of activations  [default: uint8; uint16 for a16w8]"),
        click.option("--affine-weights", is_flag=True, help="Weights with a zero point (default: symmetric, zero point 0)."),
        click.option("--weight-type", type=click.Choice(["int8", "uint8"]), default="int8", show_default=True, help="Integer type of weights."),
        click.option("--per-tensor", is_flag=True, help="One scale per weight tensor instead of per output channel."),
        click.option("--bias-correction", type=click.Choice(["full", "fast", "off"]), is_flag=False, flag_value="full", default=None,
                     help="int8: shift each layer's bias by the mean error int8 causes at its output, measured on the calibration rows "
                          "(same graph, same speed). full: layer by layer in the int8 model (errors carried from earlier layers too); "
                          "fast: each layer alone, one pass; off.  [default: full with --data (with --tune: on the plan it chose), none with --calib]"),
        click.option("--rounding", type=click.Choice(["nearest", "gptq"]), default="nearest", show_default=True,
                     help="int8: which integer each weight takes. gptq: rounded for the layer's output on the calibration rows "
                          "(GPTQ's update on each Conv/Gemm/MatMul, im2col for Conv), same scales, graph and speed; needs --data. "
                          "The plan records the integers."),
        click.option("--ranges", type=click.Choice(["calibrated", "output"]), default=None,
                     help="int8: each activation's range. output: narrowed where that lowers the error at the outputs of the "
                          "Conv/Gemm/MatMul layers reading it (their int8 weights included), searched on the calibration rows "
                          "(--data) or taken from a file of calibrate --ranges output; same graph and speed; the plan records "
                          "the ranges. calibrated: the range method's.  [default: output with --data where a check on other "
                          "rows says it pays, or with a --calib file that has them; else calibrated]"),
        click.option("--allow-saturation", is_flag=True,
                     help="int8: keep each weight's scale as its range gives, as onnxruntime's quantizer does, even where two "
                          "adjacent int8 weights can saturate the 16-bit sums of x86 CPUs without VNNI (AVX2). For models "
                          "that only run on VNNI or ARM CPUs.  [default: such scales are widened just enough]"),
        click.option("--equalize/--no-equalize", default=None,
                     help="int8: cross-layer equalization. --equalize: Conv pairs joined by identity/Relu rescaled to equal channel "
                          "ranges (helps --per-tensor most), and every pair joined by hard-swish/SiLU rescaled on the channel ranges "
                          "of the calibration rows; a calibration file must be made with it too. --no-equalize: none.  [default: "
                          "the identity/Relu pairs, and the hard-swish/SiLU pairs where a quick int8 check on the calibration "
                          "rows says the outputs gain; with --calib, as the file records]"),
        click.option("--smooth/--no-smooth", default=None,
                     help="int8: SmoothQuant. --smooth: every MatMul/Gemm input with a constant weight divided by per-channel "
                          "scales folded into the weight (activation outliers move into the weight), each layer's alpha chosen "
                          "for its own int8 output on the calibration rows; a calibration file must be made with it too. "
                          "--no-smooth: none.  [default: on a transformer stack (8 or more such nodes) where a quick int8 check "
                          "on the calibration rows says the outputs gain; with --calib, as the file records]"),
        click.option("--kernels", default="auto", show_default=True, metavar="auto|shipped|none|FILE", envvar="QCONV_KERNELS",
                     help="int8: the kernel cost table that keeps float the regions where int8 runs slower on this CPU (env "
                          "QCONV_KERNELS). auto: this model's nodes timed float and int8 on this machine, once (cached; "
                          "`qconv kernels MODEL` times it ahead); shipped: the op-kind table shipped for this CPU family (the same "
                          "model on every machine); none: int8 wherever a kernel exists; or a table file to pin."),
        click.option("--floor-ranges/--no-floor-ranges", default=None,
                     help="int8: cut an activation's range where every reader is flat below (e.g. -3 before a hard-swish): exact, "
                          "finer steps, but a finer grid can move a constant background onto a worse level.  [default: where a check "
                          "of the int8 model's outputs on the calibration rows says they gain; with --calib, as the file records]"),
        click.option("--format", "fmt", type=click.Choice(FORMATS), default=None,
                     help="qdq (QuantizeLinear/DequantizeLinear pairs) or qoperator (QLinearConv, QLinearMatMul, ...)  [default: qdq]"),
        click.option("--mode", type=click.Choice(MODES), default="int8", show_default=True,
                     help="int8 (static), dynamic (int8 weights, run-time activations), fp16, a16w8 (int16 activations, int8 weights), int4 (weight-only)."),
    ]
    for o in opts:
        fn = o(fn)
    return fn


SCHEME_KEYS = ("mode", "fmt", "per_tensor", "weight_type", "affine_weights", "activation_type", "symmetric_activations",
               "reduce_range", "block_size", "int4_method", "accuracy_level", "keep_io_types", "exclude_nodes", "exclude_ops", "quantized_io",
               "bias_correction", "rounding", "ranges", "allow_saturation", "floor_ranges", "equalize", "smooth", "kernels")


def op_types(given) -> tuple[str, ...]:
    """--exclude-ops values, each one or a comma-separated list (an op type never holds a comma)."""
    return tuple(dict.fromkeys(op.strip() for value in given for op in value.split(",") if op.strip()))


def config_from(kwargs: dict) -> QuantConfig:
    """Pop the scheme options out of a command's kwargs into a validated QuantConfig."""
    k = {name: kwargs.pop(name) for name in SCHEME_KEYS}
    return QuantConfig(mode=k["mode"], format=k["fmt"], per_channel=not k["per_tensor"], weight_type=k["weight_type"],
                       symmetric_weights=not k["affine_weights"], activation_type=k["activation_type"],
                       symmetric_activations=k["symmetric_activations"], reduce_range=k["reduce_range"],
                       block_size=k["block_size"], int4_method=k["int4_method"], accuracy_level=k["accuracy_level"], keep_io_types=k["keep_io_types"],
                       exclude_nodes=tuple(k["exclude_nodes"]), exclude_ops=op_types(k["exclude_ops"]), quantized_io=k["quantized_io"],
                       bias_correction={None: "auto", "off": None}.get(k["bias_correction"], k["bias_correction"]), rounding=k["rounding"], ranges=k["ranges"] or "auto",
                       saturation_safe=not k["allow_saturation"], floor_ranges="auto" if k["floor_ranges"] is None else k["floor_ranges"],
                       equalize={None: "auto", True: "on", False: "off"}[k["equalize"]],
                       smooth={None: "auto", True: "on", False: "off"}[k["smooth"]], kernels=k["kernels"])


def calib_options_from(kwargs: dict) -> CalibOptions:
    """Pop the ``data_options`` (and read --threads) into the options of calibration."""
    k = {name: kwargs.pop(name) for name in ("batch_size", "samples", "bins", "momentum", "cast_data", "max_memory", "executor", "shards",
                                        "hist_samples")}
    return CalibOptions(threads=kwargs.get("threads"), **k)


def eval_options_from(kwargs: dict, data) -> EvalOptions:
    """The ``report_options`` that say what the report measures (``data``: the rows it measures on); pops them."""
    return EvalOptions(data=data, labels=kwargs.pop("eval_labels"), latency=not kwargs.pop("no_latency"),
                       layer_samples=kwargs.pop("layer_samples"), threads=kwargs.get("threads"), executor=kwargs.get("executor"),
                       shards=kwargs.get("shards"), metric=kwargs.pop("metric"))


def scheme_given(ctx: click.Context) -> list[str]:
    """The scheme options the user set on the command line (not left at their defaults)."""
    from click.core import ParameterSource

    names = []
    for p in ctx.command.params:
        if p.name in SCHEME_KEYS and ctx.get_parameter_source(p.name) == ParameterSource.COMMANDLINE:
            names.append(p.opts[0])
    return names


def calib_sources(fn):
    """Where a plan's statistics come from."""
    fn = click.option("--overrides", "overrides", type=click.Path(dir_okay=False, path_type=Path), default=None,
                      help="JSON file of per-node / per-tensor overrides (an 'overrides' object, or a plan file).")(fn)
    fn = click.option("--force-calib", is_flag=True, help="Use --calib (or --plan) even if it was made for another model.")(fn)
    fn = click.option("--data", type=click.Path(path_type=Path), default=None, help="Calibration data (calibrates in this run).")(fn)
    fn = click.option("--calib", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Calibration file from qconv calibrate.")(fn)
    return fn


def output_options(fn):
    fn = click.option("--threads", type=click.IntRange(min=1), default=None,
                      help="onnxruntime intra-op threads (default: all cores).")(fn)
    fn = click.option("--quiet", "-q", is_flag=True, help="Print nothing but errors.")(fn)
    return fn
