"""The stages as library calls: load, calibrate, plan, apply (rewrite + verify), save.

``qconv.run`` wires them into the jobs the CLI runs; the library never prints (progress goes to a callback).
"""

from __future__ import annotations

import collections
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import onnx

from qconv import __version__, io, runtime
from qconv.calib.collect import (
    DEFAULT_MAX_MEMORY,
    activation_tensors,
    collect,
    memory_groups,
)
from qconv.calib.observers import DEFAULT_BINS, DEFAULT_MOMENTUM
from qconv.calib.store import Calibration
from qconv.config import QuantConfig
from qconv.data import FeedSource, InputSpec
from qconv.errors import QconvError
from qconv.intake import interface_change, prepare, prepare_quantized
from qconv.overrides import NodeOverride, Overrides
from qconv.plan import NodeDecision, QuantPlan
from qconv import subgraphs
from qconv.graph import ensure_opset
from qconv.planner import ScopedOverrides, activation_ranges, build_plan, calibration_targets, merge_body, subplan
from qconv.rewrite.dynamic import apply_dynamic, plan_dynamic
from qconv.rewrite.qdq import apply_qdq
from qconv.rewrite.qoperator import fold_qoperator
from qconv.adjust import bias

Progress = Callable[[str, int | None], Callable[[int], None]]  # (label, total) -> advance(n)


def no_progress(label: str, total: int | None):
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
    quantized_already: dict | None = None  # integer ops found in the input (it is not a float model)
    derived: dict = field(default_factory=dict, repr=False, compare=False)  # smoothed forms, by their scales


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
                                         prepared.external_data, prepared.quantized_already)
    return prepared.derived[key]


QUANTIZED_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinear", "ConvInteger", "MatMulInteger",
                 "QGemm", "MatMulNBits", "GatherBlockQuantized", "DynamicQuantizeMatMul", "DynamicQuantizeLSTM", "QAttention")


def quantized_ops(model: onnx.ModelProto) -> dict[str, int] | None:
    """{op: count} of the quantization ops an already-quantized model holds (main graph), or None."""
    return quantized_ops_of(collections.Counter(n.op_type for n in model.graph.node))


def quantized_ops_of(op_counts: dict[str, int]) -> dict[str, int] | None:
    found = {op: c for op, c in op_counts.items() if op.startswith(QUANTIZED_OPS)}
    return dict(sorted(found.items())) or None


def load(path: str | os.PathLike, config: QuantConfig) -> Prepared:
    original, external = io.load_model_and_layout(path)
    identity = io.model_identity(original)
    found = quantized_ops(original)
    model, notes = prepare_quantized(original) if found else prepare(original, config.min_opset)
    if config.needs_calibration and not found:
        from qconv.intake import expand_hard_activations

        notes += [n for n in [expand_hard_activations(model)] if n]
        if config.equalize:
            from qconv.adjust.equalize import equalize

            pairs = equalize(model)
            notes.append(f"cross-layer equalization: {pairs} Conv pair{'s' if pairs != 1 else ''} rescaled"
                         if pairs else "cross-layer equalization: no Conv pair joined by identity or Relu to rescale")
    del original.graph.initializer[:]  # only its structure is read later: do not hold the weights twice
    return Prepared(Path(path), original, model, notes, identity, external, found)


def check_float(prepared: Prepared) -> None:
    """Quantizing needs a float model: refuse one that already holds Q/DQ pairs or integer ops."""
    found = prepared.quantized_already
    if found:
        ops = ", ".join(f"{c} {op}" for op, c in found.items())
        hint = " (to turn its QDQ pairs into QLinear ops, pass --format qoperator alone)" if is_qdq(found) else ""
        raise QconvError(f"{prepared.path} is already quantized ({ops}): qconv quantizes float models; give it the float "
                         f"original{hint}")


def is_qdq(ops: dict[str, int] | None) -> bool:
    """QuantizeLinear/DequantizeLinear pairs and no QOperator ops yet: a QDQ model (e.g. exported after QAT)."""
    ops = ops or {}
    return bool(ops.get("DequantizeLinear")) and not any(op.startswith(("QLinear", "QGemm", "MatMulInteger", "ConvInteger"))
                                                         for op in ops)


def convert_qdq(prepared: Prepared, config: QuantConfig) -> Result:
    """A QDQ model (QAT-exported, or any tool's) in QOperator form, with no recalibration: the scales and zero
    points are the model's own. The plan records which nodes became QLinear ops."""
    from qconv.rewrite.qdq_normalize import normalize_qdq

    normalized, notes = normalize_qdq(prepared.model)
    prepared.notes.extend(notes)
    qmodel, folded = fold_qoperator(normalized)
    if not folded:
        raise QconvError(f"{prepared.path} holds QuantizeLinear/DequantizeLinear pairs, but none around an op with a "
                         "QOperator form (Conv, MatMul, Gemm, Add, Mul, Concat, pooling, ...): nothing to convert")
    decisions = [NodeDecision(n.name, n.op_type, "quantized", f"QDQ group folded into {folded[n.name]}") if n.name in folded
                 else NodeDecision(n.name, n.op_type, "float", "left as it is in the QDQ model", "mode")
                 for n in prepared.model.graph.node]
    p = QuantPlan(config, decisions, {}, {}, source={"model_id": prepared.model_id, "calibration": None,
                                                      "converted_from": "qdq"})
    _keep_value_info(qmodel, {vi.name for vi in prepared.original.graph.value_info})
    changed = interface_change(prepared.model, qmodel)
    if changed:
        raise QconvError(f"internal error: the converted model's interface differs from the original's ({changed}); please report it")
    _annotate(qmodel, config, None, prepared)
    verify(qmodel)
    findings = {"qoperator": dict(sorted(collections.Counter(folded.values()).items())), "converted_from": "qdq"}
    return Result(qmodel, p, findings, qmodel, {})


def feeds_for(prepared: Prepared, data: str | os.PathLike, batch_size: int = 1, samples: int | None = None,
              shard: tuple[int, int] = (0, 1), cast: bool = False, skip: tuple[int, int] | None = None) -> FeedSource:
    specs = [InputSpec.from_value_info(i) for i in prepared.model.graph.input]
    return FeedSource(data, specs, batch_size=batch_size, samples=samples, shard=shard, cast=cast, skip=skip)


def calibration_options(source: FeedSource, method: str | None = None, bins: int = DEFAULT_BINS,
                        momentum: float = DEFAULT_MOMENTUM) -> dict:
    return {"method": method, "bins": bins, "momentum": momentum, "batch_size": source.batch_size,
            "samples": source.samples, "shard": f"{source.shard[0]}/{source.shard[1]}"}


def calibrate(prepared: Prepared, source: FeedSource, threads: int | None = None,
              progress: Progress = no_progress, method: str | None = None, bins: int = DEFAULT_BINS,
              momentum: float = DEFAULT_MOMENTUM, config: QuantConfig | None = None,
              overrides: Overrides | None = None, max_memory: int = DEFAULT_MAX_MEMORY) -> Calibration:
    """Observe the tensors ``config``'s plan (with ``overrides``) can use (every float activation when ``config`` is None)."""
    names = activation_tensors(prepared.model)
    if config is not None:
        names = calibration_targets(prepared.model, config, names, overrides)
    groups = memory_groups(prepared.model, source, names, max_memory)
    label = "calibrating" if len(groups) == 1 else f"calibrating ({len(groups)} passes within --max-memory)"
    advance = progress(label, source.count() * len(groups))
    observers, seen = collect(prepared.model, source, threads=threads, progress=advance, bins=bins, momentum=momentum,
                              names=names, groups=groups)
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
    findings: dict = field(default_factory=dict)  # mode-specific findings for the report (fp16 overflow, int4 blocks)
    analysis_model: onnx.ModelProto | None = None  # numerically the same as model, with DequantizeLinear to probe
    dequantized: dict[str, str] = field(default_factory=dict)  # float tensor -> its DequantizeLinear output


def plan(prepared: Prepared, calib: Calibration | None, config: QuantConfig, overrides: Overrides | None = None,
         where: str = "overrides") -> QuantPlan:
    """Decide what ``config.mode`` does to every node of the prepared model: the plan its rewrite applies."""
    overrides = overrides or Overrides()
    if any(o.smooth is not None for o in overrides.nodes.values()):
        if config.mode not in ("int8", "a16w8"):
            raise QconvError(f"{where}: smooth overrides apply to the static modes (int8, a16w8), not --mode {config.mode}")
        prepared = smoothed(prepared, overrides)
        smooth_muls = {f"{k}/smooth" for k, v in overrides.nodes.items() if v.smooth is not None}
    else:
        smooth_muls = set()
    overrides.check_against(subgraphs.node_names(prepared.model), set(activation_tensors(prepared.model)), where)
    if config.mode in ("fp16", "int4") and any(o.precision not in (None, "float") or o.granularity for o in overrides.nodes.values()):
        raise QconvError(f"--mode {config.mode} takes only {{\"precision\": \"float\"}} node overrides")
    if overrides.tensors and not config.needs_calibration:
        raise QconvError(f"--mode {config.mode} has no activation ranges: drop the plan's tensor overrides")
    if config.needs_calibration:
        if calib is None:
            raise QconvError(f"--mode {config.mode} needs calibration: give --data or --calib")
        ranges, methods = activation_ranges(calib, config, overrides)
        nonfinite, masks = calib.nonfinite(), calib.mask_like()
        # The smoothing Mul runs in float: quantizing its input would crush the channels it exists to rescale.
        internal = overrides.merged(Overrides({m: NodeOverride(precision="float") for m in smooth_muls}, {}))
        p = build_plan(prepared.model, ranges, config, nonfinite, masks, internal, methods)
        p.overrides = overrides
        for d in p.nodes:
            if d.name in smooth_muls:
                d.reason, d.code = "SmoothQuant's division of the input by its channel scales, in float before it is quantized", "mode"
        p.source = {"ranges": {k: [float(v[0]), float(v[1])] for k, v in sorted(ranges.items()) if k not in methods},
                    "nonfinite": dict(sorted(nonfinite.items())), "masks": dict(sorted(masks.items()))}
    elif config.mode == "dynamic":
        p = plan_dynamic(prepared.model, config, overrides)
        for body in subgraphs.bodies(prepared.model) if subgraphs.has_bodies(prepared.model) else []:
            wrapped, _ = subgraphs.body_model(prepared.model, body)
            bp = plan_dynamic(wrapped, config, ScopedOverrides(overrides, body.scope))
            merge_body(p, body, bp)
            p.overrides = overrides
    elif config.mode == "fp16":
        p = _plan_fp16(prepared, config, overrides)
    else:
        p = _plan_int4(prepared, config, overrides)
    p.source = {"model_id": prepared.model_id, "calibration": calibration_identity(calib), **p.source}
    return p


def correct_bias(prepared: Prepared, p: QuantPlan, source: FeedSource, threads: int | None = None,
                 progress: Progress = no_progress) -> QuantPlan:
    """``p`` with bias correction measured on ``source`` (when its config asks for it) and recorded in the plan."""
    if not p.config.bias_correction:
        return p
    model = smoothed(prepared, p.overrides).model
    if p.config.bias_correction == "fast":
        rows = min(source.count() * source.batch_size, bias.MAX_ROWS)
        advance = progress("bias correction (fast)", -(-rows // source.batch_size))
        shifts, rows = bias.measure(model, p, source, threads, advance)
    else:
        advance = progress("bias correction, layer by layer", len(bias.targets(model, p)))
        shifts, rows = bias.measure_full(model, p, source, threads, advance)
    bias.record(p, model, shifts)
    p.source["bias_correction"] = {"method": p.config.bias_correction, "rows": rows}
    return p


def keep_corrections(prepared: Prepared, stored: QuantPlan, p: QuantPlan) -> QuantPlan:
    """``p`` (planned again from ``stored`` with other overrides) with the corrections of ``stored`` that still hold."""
    bias.carry(stored, p, smoothed(prepared, p.overrides).model)
    return p


def replan(prepared: Prepared, stored: QuantPlan, calib: Calibration | None, where: str = "plan file") -> QuantPlan:
    """Plan again after the overrides of a stored plan were edited: from its recorded ranges, or from ``calib``
    (needed only by method overrides)."""
    config = stored.config
    if calib is None and config.needs_calibration:
        needs = sorted(k for k, t in stored.overrides.tensors.items() if t.method is not None)
        if needs:
            raise QconvError(f"{where}: the override for tensor '{needs[0]}' changes its range method, which needs the calibration "
                             "statistics (a plan records ranges only): pass --calib FILE")
        calib = _StoredRanges(stored.source)
    p = plan(prepared, calib, config, stored.overrides, where)
    keep_corrections(prepared, stored, p)
    if isinstance(calib, _StoredRanges):
        p.source["calibration"] = stored.source.get("calibration")
    return p


class _StoredRanges:
    """The statistics a stored plan recorded (ranges by its method): enough to plan again without the model."""

    def __init__(self, source: dict):
        self._ranges = {k: (float(v[0]), float(v[1])) for k, v in dict(source.get("ranges") or {}).items()}
        self._nonfinite = dict(source.get("nonfinite") or {})
        self._masks = dict(source.get("masks") or {})
        self.tensors: dict = {}  # no histograms: replan asks for the calibration file before a method override

    def ranges(self, method, symmetric, percentile) -> dict:
        return dict(self._ranges)

    def nonfinite(self) -> dict:
        return dict(self._nonfinite)

    def mask_like(self) -> dict:
        return dict(self._masks)


def calibration_identity(calib: Calibration | None) -> dict | None:
    if calib is None or isinstance(calib, _StoredRanges):
        return None
    return {"model_id": calib.model_id, "data_id": calib.data_id, "samples": calib.samples, "options": calib.options}


def apply(prepared: Prepared, p: QuantPlan, calib_feeds: Iterable[dict] | None = None, feed: dict | None = None,
          check: bool = True) -> Result:
    """Rewrite the prepared model as the plan says, annotate it, and check that onnxruntime loads it (and runs it
    on ``feed``, from ``check_feed``). ``check=False`` (a tuning candidate, run right after) skips the check."""
    config = p.config
    prepared = smoothed(prepared, p.overrides)
    findings: dict = {}
    analysis, dequantized = None, {}
    if config.needs_calibration:
        qmodel, dequantized = apply_qdq(bias.apply(prepared.model, p.corrections), subplan(p))
        _apply_bodies(qmodel, p, findings, lambda m, sub: _qdq_body(m, sub, config))
        analysis = qmodel
        if config.quantized_io:
            from qconv.rewrite.quantized_io import integer_io

            ranges = {k: (float(v[0]), float(v[1])) for k, v in dict(p.source.get("ranges") or {}).items()}
            ranges.update({k: t.range for k, t in p.tensors.items() if t.range is not None})
            qmodel, findings["quantized_io"] = integer_io(qmodel, p, ranges)
        if config.output_format == "qoperator":
            qmodel, folded = fold_qoperator(qmodel)
            findings["qoperator"] = dict(sorted(collections.Counter(folded.values()).items()))
    elif config.mode == "dynamic":
        qmodel = apply_dynamic(prepared.model, subplan(p))
        _apply_bodies(qmodel, p, findings, apply_dynamic)
    elif config.mode == "fp16":
        qmodel, findings = _apply_fp16(prepared, p)
    else:
        qmodel, findings = _apply_int4(prepared, p, calib_feeds)
    if p.corrections:
        findings["bias_correction"] = bias.summary(p)
    _keep_value_info(qmodel, {vi.name for vi in prepared.original.graph.value_info})
    subgraphs.prune_initializers(qmodel)  # e.g. the bounds of a Clip folded into its producer's QuantizeLinear
    changed = interface_change(prepared.model, qmodel)
    retyped = (config.mode == "fp16" and not config.keep_io_types) or config.quantized_io
    if changed and not (retyped and changed.endswith("changes type")):
        raise QconvError(f"internal error: the rewritten model's interface differs from the original's ({changed}); "
                         "nothing was written, please report it")
    _annotate(qmodel, config, p.source.get("calibration"), prepared)
    if findings.get("quantized_io"):
        from qconv.rewrite.quantized_io import META_KEY

        qmodel.metadata_props.add(key=META_KEY, value=json.dumps(findings["quantized_io"], sort_keys=True))
    if check:
        verify(qmodel, feed)
    return Result(qmodel, p, findings, analysis if analysis is not None else qmodel, dequantized)


def _qdq_body(model: onnx.ModelProto, sub: QuantPlan, config: QuantConfig) -> onnx.ModelProto:
    rewritten, _ = apply_qdq(model, sub)
    if config.output_format == "qoperator":
        rewritten, _ = fold_qoperator(rewritten)
    return rewritten


def _apply_bodies(qmodel: onnx.ModelProto, p: QuantPlan, findings: dict, rewrite) -> None:
    """Rewrite each If/Loop/Scan body as its part of the plan says (``rewrite(body model, its plan)``), in place,
    outer bodies first."""
    if not subgraphs.has_bodies(qmodel):
        return
    done = quantized = 0
    for body in subgraphs.bodies(qmodel):
        sub = subplan(p, body.scope)
        if not sub.tensors:
            continue
        wrapped, added = subgraphs.body_model(qmodel, body)
        rewritten = rewrite(wrapped, sub)
        subgraphs.put_body(qmodel, body, rewritten, added)
        for op in rewritten.opset_import:  # e.g. com.microsoft for a DynamicQuantizeLSTM in the body
            ensure_opset(qmodel, op.domain, op.version)
        done += 1
        quantized += sum(d.quantized for d in sub.nodes)
    subgraphs.prune_initializers(qmodel)  # float weights a body's int8 copies replaced
    if done:
        findings["subgraphs"] = {"bodies_quantized": done, "nodes_quantized": quantized,
                                 "bodies": len(subgraphs.bodies(qmodel))}


def quantize(prepared: Prepared, calib: Calibration | None, config: QuantConfig,
             calib_feeds: Iterable[dict] | None = None, overrides: Overrides | None = None) -> Result:
    """Plan and apply in one call (``qconv quantize`` without --plan)."""
    return apply(prepared, plan(prepared, calib, config, overrides), calib_feeds)


def _decisions_from(prepared: Prepared, reasons: dict[str, tuple[str, str]], touched) -> list[NodeDecision]:
    out = []
    for n in prepared.model.graph.node:
        if n.name in reasons:
            out.append(NodeDecision(n.name, n.op_type, "float", reasons[n.name][1], reasons[n.name][0]))
        elif touched(n):
            out.append(NodeDecision(n.name, n.op_type, "quantized"))
        else:
            out.append(NodeDecision(n.name, n.op_type, "integer", "no float data: nothing to convert"))
    return out


def _plan_fp16(prepared: Prepared, config: QuantConfig, overrides: Overrides) -> QuantPlan:
    from qconv.rewrite.fp16 import fp16_decisions

    forced = {n.name for n in prepared.model.graph.node if (overrides.node(n.name) or NodeOverride()).precision == "float"}
    rows = fp16_decisions(prepared.model, config.exclude_ops, config.exclude_nodes, forced)
    reasons, touched = {}, set()
    for node, reason, uses_float in rows:
        if reason:
            excluded = config.excluded(node.name, node.op_type)
            code = "excluded" if excluded else "override" if node.name in forced else "fp16"
            reasons[node.name] = (code, excluded or reason)
        elif uses_float:
            touched.add(node.name)
    return QuantPlan(config, _decisions_from(prepared, reasons, lambda n: n.name in touched), {}, {}, overrides)


def _apply_fp16(prepared: Prepared, p: QuantPlan):
    from qconv.rewrite.fp16 import convert_fp16

    config = p.config
    forced = [n.name for n in p.nodes if n.kept_float and n.code in ("excluded", "override")]
    r = convert_fp16(prepared.model, keep_io_types=config.keep_io_types, float_nodes=forced)
    findings = {"fp16": {"overflow": r.overflow, "underflow": r.underflow, "converted_nodes": r.converted_nodes,
                         "keep_io_types": config.keep_io_types}}
    return r.model, findings


def _plan_int4(prepared: Prepared, config: QuantConfig, overrides: Overrides) -> QuantPlan:
    from qconv.rewrite.weight_only import int4_decisions

    converted, kept = int4_decisions(prepared.model, config.block_size)
    reasons = {}
    for n in prepared.model.graph.node:
        excluded = config.excluded(n.name, n.op_type)
        ov = overrides.node(n.name)
        if excluded:
            reasons[n.name] = ("excluded", excluded)
        elif ov is not None and ov.precision == "float":
            reasons[n.name] = ("override", "kept float by the plan's override")
        elif n.name in kept:
            reasons[n.name] = ("unsupported", kept[n.name])
        elif n.name not in converted:
            reasons[n.name] = ("mode", "int4 is weight-only: MatMul and Gather weights are converted, the rest stays float")
    return QuantPlan(config, _decisions_from(prepared, reasons, lambda n: n.name in converted), {}, {}, overrides)


def _apply_int4(prepared: Prepared, p: QuantPlan, calib_feeds):
    from qconv.rewrite.weight_only import quantize_int4

    config = p.config
    method = config.int4_method if calib_feeds is not None else "rtn"
    r = quantize_int4(prepared.model, block_size=config.block_size, symmetric=config.symmetric_weights, method=method,
                      calib_feeds=calib_feeds if method == "gptq" else None, only_nodes={n.name for n in p.nodes if n.quantized})
    findings = {"int4": {"method": method, "block_size": config.block_size, "symmetric": config.symmetric_weights,
                         "weights": r.quantized}}
    return r.model, findings


def _keep_value_info(model: onnx.ModelProto, names: set[str]) -> None:
    """Drop the shape annotations intake inferred (onnxruntime infers them again); keep the exporter's."""
    keep = [vi for vi in model.graph.value_info if vi.name in names]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)


def _annotate(model: onnx.ModelProto, config: QuantConfig, calib: dict | None, prepared: Prepared) -> None:
    meta = {
        "qconv.version": __version__,
        "qconv.mode": config.mode,
        "qconv.config": json.dumps(config.to_dict(), sort_keys=True),
        "qconv.calibration": json.dumps(calib, sort_keys=True),
        "qconv.source_model_id": prepared.model_id,
    }
    kept = [p for p in model.metadata_props if not p.key.startswith("qconv.")]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    model.producer_name = "qconv"
    model.producer_version = __version__


def check_feed(prepared: Prepared, feed: dict | None) -> dict | None:
    """The feed ``verify`` runs the written model on: the first of the user's data, or, without data, a synthetic
    one (zeros; 1 for every free dimension) when the float model itself runs on it (else None: load only)."""
    if feed is not None:
        return feed
    feed = {}
    for vi in prepared.model.graph.input:
        try:
            spec = InputSpec.from_value_info(vi)
        except QconvError:
            return None
        feed[spec.name] = np.zeros([d if isinstance(d, int) and d > 0 else 1 for d in spec.shape], dtype=spec.dtype)
    try:
        runtime.run(runtime.session(prepared.model, threads=1), feed)
    except QconvError:
        return None  # the float model cannot run on made-up inputs either: nothing to learn from them
    return feed


def verify(model: onnx.ModelProto, feed: dict | None = None) -> None:
    """The output must pass onnx.checker, load in onnxruntime and, given ``feed``, run on it; or nothing is written."""
    try:
        if model.ByteSize() < 2**31 - 2**26:
            onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise QconvError(f"internal error: the quantized model fails onnx.checker ({str(exc).splitlines()[0]}); please report it") from None
    try:
        sess = runtime.session(model, threads=1)
    except QconvError as exc:
        raise QconvError(f"internal error: the rewritten model does not load ({exc}); nothing was written, please report it") from None
    if feed is None:
        return
    from qconv.rewrite.quantized_io import IntegerIO, io_params_of

    io_params = io_params_of(model)
    if io_params:
        sess = IntegerIO(sess, io_params)
    try:
        runtime.run(sess, feed)
    except QconvError as exc:
        raise QconvError(f"internal error: the quantized model loads but fails to run ({exc}); nothing was written, please report it") from None


def save_quantized(result: Result, out: Path, prepared: Prepared) -> int:
    io.save_model(result.model, out, external_data=prepared.external_data or None)
    return io.model_size_bytes(out)

