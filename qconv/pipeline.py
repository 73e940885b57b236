"""The stages wired together: what the CLI calls. The library never prints; progress goes to a callback."""

from __future__ import annotations

import collections
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import onnx

from qconv import __version__, io, runtime
from qconv.calib.collect import activation_tensors, collect
from qconv.calib.observers import DEFAULT_BINS, DEFAULT_MOMENTUM
from qconv.calib.store import Calibration
from qconv.config import QuantConfig
from qconv.data import FeedSource, InputSpec
from qconv.errors import QconvError
from qconv.intake import prepare
from qconv.plan import NodeDecision, QuantPlan, build_plan, calibration_targets
from qconv.graph import expose
from qconv.report.evaluate import compare, latency
from qconv.report.layers import probe_pairs
from qconv.rewrite.dynamic import apply_dynamic
from qconv.rewrite.qdq import apply_qdq
from qconv.rewrite.qoperator import fold_qoperator

Progress = Callable[[str, int | None], Callable[[int], None]]  # (label, total) -> advance(n)


def _no_progress(label: str, total: int | None):
    return lambda n: None


@dataclass
class Prepared:
    """A model as loaded, its normalized float form, and what intake changed."""

    path: Path
    original: onnx.ModelProto
    model: onnx.ModelProto
    notes: list[str]
    model_id: str
    external_data: bool


def load(path: str | os.PathLike, config: QuantConfig) -> Prepared:
    original = io.load_model(path)
    identity = io.model_identity(original)
    external = io.has_external_data(onnx.load(str(path), load_external_data=False))
    model, notes = prepare(original, config.min_opset)
    del original.graph.initializer[:]  # only its structure is read later: do not hold the weights twice
    return Prepared(Path(path), original, model, notes, identity, external)


def feeds_for(prepared: Prepared, data: str | os.PathLike, batch_size: int = 1, samples: int | None = None,
              shard: tuple[int, int] = (0, 1)) -> FeedSource:
    specs = [InputSpec.from_value_info(i) for i in prepared.model.graph.input]
    return FeedSource(data, specs, batch_size=batch_size, samples=samples, shard=shard)


def calibration_options(source: FeedSource, method: str = "minmax", bins: int = DEFAULT_BINS,
                        momentum: float = DEFAULT_MOMENTUM) -> dict:
    return {"method": method, "bins": bins, "momentum": momentum, "batch_size": source.batch_size,
            "samples": source.samples, "shard": f"{source.shard[0]}/{source.shard[1]}"}


def calibrate(prepared: Prepared, source: FeedSource, threads: int | None = None,
              progress: Progress = _no_progress, method: str = "minmax", bins: int = DEFAULT_BINS,
              momentum: float = DEFAULT_MOMENTUM, config: QuantConfig | None = None) -> Calibration:
    """Observe the tensors ``config``'s plan can use (every float activation when ``config`` is None)."""
    names = activation_tensors(prepared.model)
    if config is not None:
        names = calibration_targets(prepared.model, config, names)
    advance = progress("calibrating", source.count())
    observers, seen = collect(prepared.model, source, threads=threads, progress=advance, bins=bins, momentum=momentum, names=names)
    options = calibration_options(source, method, bins, momentum)
    options["tensors"] = "all" if config is None else "planned"
    return Calibration(prepared.model_id, source.identity(), seen, options, observers)


def load_calibration(path: str | os.PathLike, prepared: Prepared, force: bool = False) -> Calibration:
    calib = Calibration.from_dict(io.read_json(path, "calibration file"), f"calibration file {path}")
    if calib.model_id != prepared.model_id and not force:
        raise QconvError(f"calibration file {path} was made for another model (id {calib.model_id[:12]}, this model {prepared.model_id[:12]}): re-run qconv calibrate, or pass --force-calib")
    return calib


@dataclass
class Result:
    model: onnx.ModelProto
    plan: QuantPlan
    extras: dict = field(default_factory=dict)  # mode-specific findings for the report (fp16 overflow, int4 blocks)
    analysis_model: onnx.ModelProto | None = None  # numerically the same as model, with DequantizeLinear to probe
    dequantized: dict[str, str] = field(default_factory=dict)  # float tensor -> its DequantizeLinear output


def quantize(prepared: Prepared, calib: Calibration | None, config: QuantConfig,
             calib_feeds: Iterable[dict] | None = None) -> Result:
    """Rewrite the prepared model as ``config.mode`` asks; ``calib`` is needed by the static modes."""
    extras: dict = {}
    analysis, dequantized = None, {}
    if config.needs_calibration:
        if calib is None:
            raise QconvError(f"--mode {config.mode} needs calibration: give --data or --calib")
        ranges = calib.ranges(config.method, config.symmetric_activations, config.percentile)
        plan = build_plan(prepared.model, ranges, config, calib.nonfinite(), calib.mask_like())
        qmodel, dequantized = apply_qdq(prepared.model, plan)
        analysis = qmodel
        if config.output_format == "qoperator":
            qmodel, folded = fold_qoperator(qmodel)
            extras["qoperator"] = dict(sorted(collections.Counter(folded.values()).items()))
    elif config.mode == "dynamic":
        qmodel, plan = apply_dynamic(prepared.model, config)
    elif config.mode == "fp16":
        qmodel, plan, extras = _fp16(prepared, config)
    else:
        qmodel, plan, extras = _int4(prepared, config, calib_feeds)
    _keep_value_info(qmodel, {vi.name for vi in prepared.original.graph.value_info})
    _annotate(qmodel, config, calib, prepared)
    verify(qmodel)
    return Result(qmodel, plan, extras, analysis if analysis is not None else qmodel, dequantized)


def _fp16(prepared: Prepared, config: QuantConfig):
    from qconv.rewrite.fp16 import convert_fp16

    r = convert_fp16(prepared.model, keep_io_types=config.keep_io_types, block_ops=config.exclude_ops,
                     block_nodes=config.exclude_nodes)
    kept = {k["name"]: k["reason"] for k in r.kept_float}
    decisions = [NodeDecision(n.name, n.op_type, "float" if n.name in kept else "quantized", kept.get(n.name, ""))
                 for n in prepared.model.graph.node]
    extras = {"fp16": {"overflow": r.overflow, "underflow": r.underflow, "converted_nodes": r.converted_nodes,
                       "keep_io_types": config.keep_io_types}}
    return r.model, QuantPlan(config, decisions, {}, {}), extras


def _int4(prepared: Prepared, config: QuantConfig, calib_feeds):
    from qconv.rewrite.weight_only import quantize_int4

    method = config.int4_method if calib_feeds is not None else "rtn"
    r = quantize_int4(prepared.model, block_size=config.block_size, symmetric=config.symmetric_weights, method=method,
                      calib_feeds=calib_feeds if method == "gptq" else None, exclude_nodes=config.exclude_nodes + tuple(
                          n.name for n in prepared.model.graph.node if n.op_type in config.exclude_ops))
    done = {q["node"] for q in r.quantized}
    kept = {k["name"]: k["reason"] for k in r.kept_float}
    decisions = []
    for n in prepared.model.graph.node:
        if n.name in done:
            decisions.append(NodeDecision(n.name, n.op_type, "quantized"))
        else:
            decisions.append(NodeDecision(n.name, n.op_type, "float", kept.get(n.name, "int4 is weight-only: MatMul and Gather weights are converted, the rest stays float")))
    extras = {"int4": {"method": method, "block_size": config.block_size, "symmetric": config.symmetric_weights,
                       "weights": r.quantized}}
    return r.model, QuantPlan(config, decisions, {}, {}), extras


def _keep_value_info(model: onnx.ModelProto, names: set[str]) -> None:
    """Drop the shape annotations intake inferred (onnxruntime infers them again); keep the exporter's."""
    keep = [vi for vi in model.graph.value_info if vi.name in names]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)


def _annotate(model: onnx.ModelProto, config: QuantConfig, calib: Calibration | None, prepared: Prepared) -> None:
    meta = {
        "qconv.version": __version__,
        "qconv.mode": config.mode,
        "qconv.config": json.dumps(config.to_dict(), sort_keys=True),
        "qconv.calibration": json.dumps({"model_id": calib.model_id, "data_id": calib.data_id, "samples": calib.samples,
                                         "options": calib.options} if calib else None, sort_keys=True),
        "qconv.source_model_id": prepared.model_id,
    }
    kept = [p for p in model.metadata_props if not p.key.startswith("qconv.")]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    model.producer_name = "qconv"
    model.producer_version = __version__


def verify(model: onnx.ModelProto) -> None:
    """The output must pass onnx.checker and load in onnxruntime, or nothing is written."""
    try:
        if model.ByteSize() < 2**31 - 2**26:
            onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise QconvError(f"internal error: the quantized model fails onnx.checker ({str(exc).splitlines()[0]}); please report it") from None
    runtime.session(model, threads=1)


def evaluate(prepared: Prepared, result: Result, source: FeedSource, labels: np.ndarray | None,
             threads: int | None, progress: Progress = _no_progress, measure_latency: bool = True,
             layers: bool = True) -> dict:
    """Fidelity of every output (and, with ``layers``, of every comparable tensor), accuracy, latency."""
    threads = threads or runtime.default_threads()
    analysis = result.analysis_model or result.model
    return compare_models(prepared.model, analysis, source, labels, threads, progress,
                          result.dequantized if layers else None, layers, latency_models=(str(prepared.path), result.model) if measure_latency else None)


def compare_models(float_model: onnx.ModelProto, quant_model: onnx.ModelProto, source: FeedSource,
                   labels: np.ndarray | None, threads: int, progress: Progress = _no_progress,
                   dequantized: dict[str, str] | None = None, layers: bool = True, latency_models=None) -> dict:
    """Run both models over ``source`` once, with the tensors to compare exposed; latency on plain sessions."""
    pairs = probe_pairs(float_model, quant_model, dequantized) if layers else {}
    fsess = runtime.session(expose(float_model, {t: onnx.TensorProto.FLOAT for t in pairs}), threads)
    qsess = runtime.session(expose(quant_model, dict(pairs.values())), threads)
    advance = progress("evaluating", source.count())
    report = compare(fsess, qsess, source, labels, progress=advance, probes={t: q for t, (q, _) in pairs.items()})
    del fsess, qsess  # free their weights before the latency sessions load theirs
    if latency_models is not None:
        plain_f, plain_q = (runtime.session(m, threads) for m in latency_models)
        report["latency_ms"] = latency(plain_f, plain_q, next(iter(source)), threads)
    return report


def node_summary(plan: QuantPlan) -> dict:
    by_op: dict[str, dict[str, int]] = {}
    for n in plan.nodes:
        slot = by_op.setdefault(n.op_type, {"quantized": 0, "float": 0, "integer": 0})
        slot[n.status] += 1
    return dict(sorted(by_op.items()))


def save_quantized(result: Result, out: Path, prepared: Prepared) -> int:
    io.save_model(result.model, out, external_data=prepared.external_data or None)
    return io.model_size_bytes(out)


def temp_model_size(model: onnx.ModelProto) -> int:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "m.onnx"
        io.save_model(model, p)
        return io.model_size_bytes(p)
