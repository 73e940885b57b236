"""The report as a plain dict (schema ``qconv.report`` version 2, documented in the README)."""

from __future__ import annotations

import collections
import math

import numpy as np

from qconv import __version__, clock, io
from qconv.calib.store import Calibration
from qconv.graph import ai_onnx_opset
from qconv.plan import QuantPlan

SCHEMA = "qconv.report"
VERSION = 3  # 3: every top-level key is always present (null plus a *_reason where not measured or not asked)

# Sections that are measured or asked for only with some options: null, with the reason, when absent.
OPTIONAL_SECTIONS = {
    "fidelity": "not measured: pass --eval-data",
    "task": "not measured: pass --eval-labels with --eval-data",
    "latency_ms": "not measured: needs --eval-data (or --data), without --no-latency",
    "profile": "not measured: needs --eval-data (or --data), without --no-latency",
    "speed_fallback": "not asked for: pass --speed-fallback",
    "tuning": "not asked for: pass --tune",
}
# Findings of one mode or form: null in the others.
FINDINGS = ("quantized_io", "qoperator", "converted_from", "fp16", "int4", "subgraphs", "bias_correction", "rounding", "output_ranges",
            "smoothing", "fused")
NO_GATES = {"passed": True, "checks": [], "failed": []}


@clock.timed("report")
def build_report(plan: QuantPlan, float_model, quant_model, *, input_path: str, output_path: str, original_opset: int,
                 intake: list[str], findings: dict, calib, sizes: tuple[int, int], evaluation: dict | None,
                 eval_source: str | None, extra_warnings: list[str] = ()) -> dict:
    """The report of ``qconv quantize`` from plain values: the plan, the float and written models, what
    evaluation measured (None: nothing was measured) and the calibration statistics (or None)."""
    evaluation = evaluation or {}
    size_original, size_quantized = sizes
    report = {
        "schema": SCHEMA,
        "version": VERSION,
        "qconv_version": __version__,
        "mode": plan.config.mode,
        "model": {
            "input": str(input_path),
            "output": str(output_path),
            "opset_original": original_opset,
            "opset_quantized": ai_onnx_opset(quant_model),
            "intake": list(intake),
        },
        "config": plan.config.to_dict(),
        "overrides": plan.overrides.to_dict() if plan.overrides else None,
        "size_bytes": {
            "original": size_original,
            "quantized": size_quantized,
            "ratio": size_original / size_quantized if size_quantized else None,
        },
        "node_summary": node_summary(plan),
        "nodes": node_rows(plan, float_model, evaluation.get("layers", {})),
        "layers": layer_rows_of(float_model, evaluation.get("layers", {})),
        "size_by_op": size_by_op(float_model, quant_model),
        "calibration": _calibration(calib, plan),
        "evaluation": {"data": eval_source, "batches": evaluation.get("batches"), "layer_rows": evaluation.get("layer_rows"),
                       "in_sample": bool(evaluation.get("in_sample"))},
        "fidelity": _fidelity(evaluation) if evaluation else None,
        "outputs": evaluation.get("outputs", {}),
        **findings,
    }
    for key in ("task", "latency_ms", "profile"):
        if key in evaluation:
            report[key] = evaluation[key]
    report["histograms"] = histograms(calib, plan, report["layers"]) if isinstance(calib, Calibration) else {}
    report["warnings"] = list(extra_warnings) + warnings(report, float_model)
    return report


def node_summary(plan: QuantPlan) -> dict:
    return {
        "quantized": sum(1 for n in plan.nodes if n.quantized),
        "float": sum(1 for n in plan.nodes if n.kept_float),
        "integer": sum(1 for n in plan.nodes if n.status == "integer"),
        "folded_activations": len(plan.folded),
        "by_op": plan.by_op(),
        "kept_float": [{"name": n.name, "op_type": n.op_type, "reason": n.reason, "code": n.code} for n in plan.nodes if n.kept_float],
        "kept_float_groups": plan.kept_float_groups(),
        # planner.weight_only_tables: float Gathers whose tables are stored as int8 rows
        "tables": [{"tensor": t.name, "rows": int(t.qparams.scale.size), "gathers": list(t.consumers)}
                   for _, t in sorted(plan.tensors.items()) if t.role == "table"],
    }


def _fidelity(evaluation: dict) -> dict:
    outs = evaluation.get("outputs", {})
    worst = min(outs.items(), key=lambda kv: kv[1]["cosine"]) if outs else None
    return {"rows": evaluation.get("rows"), "batches": evaluation.get("batches"),
            "top1_agreement": evaluation.get("top1_agreement"),
            "worst_output": worst[0] if worst else None, "worst_cosine": worst[1]["cosine"] if worst else None,
            "layer_rows": evaluation.get("layer_rows"), "metric": evaluation.get("metric")}




def node_rows(plan: QuantPlan, float_model, layers: dict) -> list[dict]:
    """One row per node of the float graph: status, reason, its output's SQNR and quantization parameters."""
    producers = {n.name: n for n in float_model.graph.node}
    absorbed_by = {producer: act for act, producer in plan.folded.items()}  # Conv -> the Relu it took over
    rows = []
    for d in plan.nodes:
        node = producers.get(absorbed_by.get(d.name, d.name))
        out = node.output[0] if node is not None and node.output else ""
        folded_into = plan.folded.get(d.name)
        tp = plan.tensors.get(out)
        rows.append({
            "name": d.name, "op_type": d.op_type, "status": d.status, "quantized": d.quantized,
            "reason": d.reason or (f"folded into {folded_into}: its QuantizeLinear clamps the same way" if folded_into else ""),
            "code": d.code,
            "output": out,
            "sqnr_db": layers[out]["sqnr_db"] if out in layers else None,
            "scale": float(tp.qparams.scale) if tp is not None and tp.qparams.scale.ndim == 0 else None,
            "zero_point": int(tp.qparams.zero_point) if tp is not None and tp.qparams.scale.ndim == 0 else None,
        })
    return rows


def layer_rows_of(float_model, layers: dict) -> list[dict]:
    """Per-tensor fidelity, worst (lowest SQNR) first: where to look, and what to --exclude-nodes."""
    producer = {o: n for n in float_model.graph.node for o in n.output}
    rows = [{"tensor": t, "node": producer[t].name if t in producer else "", "op_type": producer[t].op_type if t in producer else "",
             **{k: v[k] for k in ("sqnr_db", "cosine", "max_abs_err")}} for t, v in layers.items()]
    return sorted(rows, key=lambda r: (r["sqnr_db"] if isinstance(r["sqnr_db"], float) else math.inf, r["tensor"]))


def size_by_op(float_model, quant_model) -> dict:
    """Bytes of constants by the op type that consumes them (through a DequantizeLinear in QDQ models)."""
    def tally(model) -> dict[str, int]:
        consumers = collections.defaultdict(list)
        for n in model.graph.node:
            for i in n.input:
                consumers[i].append(n)
        out = collections.Counter()
        for t in model.graph.initializer:
            users = consumers.get(t.name, [])
            while users and users[0].op_type in ("DequantizeLinear", "Cast") and users[0].output:
                users = consumers.get(users[0].output[0], [])
            out[users[0].op_type if users else "(unused)"] += t.ByteSize()
        return out
    f, q = tally(float_model), tally(quant_model)
    return {op: {"original": f.get(op, 0), "quantized": q.get(op, 0)} for op in sorted(set(f) | set(q), key=lambda o: -f.get(o, 0))}


def histograms(calib: Calibration, plan, layers: list[dict], count: int = 6, bins: int = 96) -> dict:
    """Calibration histograms of the worst quantized tensors, with the range the method chose."""
    ranges = calib.ranges(plan.config.method, plan.config.symmetric_activations, plan.config.percentile)
    ranges.update({k: t.range for k, t in plan.tensors.items() if t.range is not None})
    chosen = [r["tensor"] for r in layers if r["tensor"] in calib.tensors and r["tensor"] in ranges][:count]
    out = {}
    for name in chosen:
        o = calib.tensors[name]
        h = o.hist
        if h is None or not h.width or not h.counts.any():
            continue
        nz = np.flatnonzero(h.counts)
        counts = h.counts[nz[0]:nz[-1] + 1]
        group = -(-counts.size // bins)
        counts = np.add.reduceat(counts, np.arange(0, counts.size, group))
        start = (h.start + nz[0]) * h.width
        edges = start + np.arange(counts.size + 1) * group * h.width
        out[name] = {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts],
                     "range": [float(ranges[name][0]), float(ranges[name][1])], "min": o.min, "max": o.max,
                     "method": plan.tensors[name].method if name in plan.tensors and plan.tensors[name].method else plan.config.method}
    return out


def _calibration(calib, plan) -> dict | None:
    if calib is None:
        recorded = plan.source.get("calibration")
        if not recorded:
            return None
        return {"method": plan.config.method, "recorded_with": recorded.get("options"), "samples": recorded.get("samples"),
                "model_id": recorded.get("model_id"), "data_id": recorded.get("data_id"), "tensors": None,
                "nonfinite_tensors": sorted(plan.source.get("nonfinite", {})), "constant_tensors": None}
    return {
        "method": plan.config.method,
        "recorded_with": calib.options,
        "samples": calib.samples,
        "model_id": calib.model_id,
        "data_id": calib.data_id,
        "tensors": len(calib.tensors),
        "nonfinite_tensors": sorted(calib.nonfinite()),
        "constant_tensors": calib.constant(),
    }


def unmatched_exclusions(report: dict) -> list[str]:
    """--exclude-ops / --exclude-nodes values that name no node the plan saw: a typo keeps nothing float, silently."""
    from qconv.plan.names import matches_any

    nodes = report.get("nodes") or []
    if not nodes:
        return []
    config = report.get("config") or {}
    ops = {n.get("op_type") for n in nodes}
    out = [f"--exclude-ops {op}: no node of this model has that op type (op types are case-sensitive: Conv, MatMul, Mul)"
           for op in config.get("exclude_ops") or [] if op not in ops]
    names = [n.get("name") or "" for n in nodes]
    out += [f"--exclude-nodes {pattern}: no node of this model has a matching name (the report's nodes and `qconv plan` list them)"
            for pattern in config.get("exclude_nodes") or [] if not matches_any(pattern, names)]
    return out


def warnings(report: dict, float_model) -> list[str]:
    """Things a user should act on: a measurably slower model (with the mode that would not be), fp16 overflow."""
    out = []
    if report["node_summary"]["quantized"] == 0:
        groups = report["node_summary"].get("kept_float_groups") or []
        if any(g.get("code") == "speed" for g in groups):
            out.append(f"nothing was quantized in {report['mode']} mode: every region that could be int8 runs slower in int8 than in "
                       "float on this CPU (kernel table); --kernels none quantizes them anyway (a smaller file), or try --mode dynamic")
        else:
            out.append(f"nothing was quantized in {report['mode']} mode: see the reasons under kept_float")
    lat = report.get("latency_ms")
    if lat and lat.get("verdict") == "slower":
        advice = _faster_suggestion(report["mode"], float_model) if float_model is not None else "see the per-layer table for what to keep float"
        slow = (report.get("profile") or {}).get("slower_in_int8") or []
        if slow:
            names = ", ".join(f"{r['node']} ({r['op_type']}: {r['int8_us'] + r['conversions_us']:.0f} us int8 vs {r['float_us']:.0f} us float)"
                              for r in slow[:4])
            advice = (f"the profile shows {len(slow)} nodes slower in int8 than in float on this CPU: {names}"
                      f"{' ...' if len(slow) > 4 else ''}; --speed-fallback keeps them float when that measures faster")
        out.append(f"the {report['mode']} model is slower than the original on this CPU ({lat['ratio']:.2f}x the time, "
                   f"95% interval {lat['ratio_low']:.2f}-{lat['ratio_high']:.2f}x over {lat['runs']} runs); {advice}")
    cal = report.get("calibration") or {}
    sampled = (cal.get("recorded_with") or {}).get("hist_samples")
    if sampled and cal.get("method") in ("percentile", "entropy"):
        out.append(f"the {cal['method']} ranges come from histograms of a sample ({sampled} values per tensor and batch), which "
                   f"cannot place a tail exactly: re-run qconv calibrate with --method {cal['method']} (or --hist-samples 0) "
                   "to count every value")
    out += unmatched_exclusions(report)
    fp16 = report.get("fp16")
    if fp16 and fp16.get("overflow"):
        names = ", ".join(o["tensor"] for o in fp16["overflow"][:5])
        out.append(f"{len(fp16['overflow'])} constants exceed float16's range and were kept float32: {names}")
    return out


def _faster_suggestion(mode: str, float_model) -> str:
    ops = collections.Counter(n.op_type for n in float_model.graph.node)
    convs, matmuls = ops["Conv"] + ops["ConvTranspose"], ops["MatMul"] + ops["Gemm"]
    if mode == "dynamic" and convs:
        return "this model is convolutional: static int8 (--mode int8 with calibration data) runs int8 Conv kernels"
    if mode == "int8" and matmuls > convs:
        return "for MatMul-heavy models try --mode dynamic, or keep small layers float with --exclude-nodes"
    if mode == "a16w8":
        return "16-bit activations run as Q/DQ around float kernels on CPU; --mode int8 is the fast mode"
    if mode == "fp16":
        return "the CPU provider has few float16 kernels: fp16 halves size but not CPU time; --mode int8 or dynamic for speed"
    if mode == "int4":
        return "int4 MatMulNBits pays off on large, memory-bound MatMuls; keep small models at int8 (--mode dynamic)"
    return "keep the slowest layers float with --exclude-nodes, or keep the float model"


def build_comparison_report(original_path: str, quantized_path: str, original, quantized, evaluation: dict,
                            eval_source: str, extra_warnings: list[str] = ()) -> dict:
    """The report of ``qconv report``: any two models (any tool's) compared on the same data."""
    from qconv.measure.layers import dequantized_of

    layers = evaluation.get("layers", {})
    quantized_tensors = set(dequantized_of(quantized))
    dq_outputs = {o for n in quantized.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    integer_ops = ("QLinear", "QGemm", "MatMulInteger", "MatMulNBits", "DynamicQuantize", "GatherBlockQuantized")
    qnodes = {n.name: n for n in quantized.graph.node}
    rows = []
    for n in original.graph.node:
        out = n.output[0] if n.output else ""
        q = qnodes.get(n.name)
        reads_dq = q is not None and any(i in dq_outputs for i in q.input)
        status = "quantized" if out in quantized_tensors or reads_dq or (q is not None and q.op_type.startswith(integer_ops)) else "float"
        rows.append({"name": n.name, "op_type": n.op_type, "status": status, "quantized": status == "quantized", "reason": "",
                     "output": out, "sqnr_db": layers[out]["sqnr_db"] if out in layers else None, "scale": None, "zero_point": None})
    size_o, size_q = io.model_size_bytes(original_path), io.model_size_bytes(quantized_path)
    report = {
        "schema": SCHEMA, "version": VERSION, "qconv_version": __version__, "mode": "compare",
        "model": {"input": str(original_path), "output": str(quantized_path), "opset_original": ai_onnx_opset(original),
                  "opset_quantized": ai_onnx_opset(quantized), "intake": []},
        "config": {},
        "overrides": None,
        "size_bytes": {"original": size_o, "quantized": size_q, "ratio": size_o / size_q if size_q else None},
        "node_summary": {"quantized": sum(r["quantized"] for r in rows), "float": sum(not r["quantized"] for r in rows),
                         "integer": 0, "folded_activations": 0, "by_op": {}, "kept_float": [], "kept_float_groups": []},
        "nodes": rows,
        "layers": layer_rows_of(original, layers),
        "size_by_op": size_by_op(original, quantized),
        "calibration": None,
        "evaluation": {"data": eval_source, "batches": evaluation.get("batches"), "layer_rows": evaluation.get("layer_rows"),
                       "in_sample": bool(evaluation.get("in_sample"))},
        "fidelity": _fidelity(evaluation),
        "outputs": evaluation.get("outputs", {}),
        "histograms": {},
    }
    for key in ("task", "latency_ms"):
        if key in evaluation:
            report[key] = evaluation[key]
    report["warnings"] = list(extra_warnings) + [w for w in warnings(report, None) if "nothing was quantized" not in w]
    return report


def complete(report: dict) -> dict:
    """Every top-level key the schema defines, whatever the options: absent sections become null with a
    ``<key>_reason``, mode findings null, and the gate passed with no checks when none was asked for."""
    for key, reason in OPTIONAL_SECTIONS.items():
        report[key] = report.get(key)
        report[f"{key}_reason"] = reason if report[key] is None else None
    for key in FINDINGS:
        report.setdefault(key, None)
    report.setdefault("gate", dict(NO_GATES))
    report.setdefault("cost", None)
    return report
