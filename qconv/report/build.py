"""The report as a plain dict (schema ``qconv.report`` version 1, documented in the README)."""

from __future__ import annotations

import collections

from qconv import __version__
from qconv.calib.store import Calibration
from qconv.graph import ai_onnx_opset
from qconv.pipeline import Prepared, Result, node_summary

SCHEMA = "qconv.report"
VERSION = 1


def build_report(prepared: Prepared, result: Result, calib: Calibration | None, out_path: str,
                 size_original: int, size_quantized: int, evaluation: dict, eval_source: str | None) -> dict:
    plan = result.plan
    report = {
        "schema": SCHEMA,
        "version": VERSION,
        "qconv_version": __version__,
        "mode": plan.config.mode,
        "model": {
            "input": str(prepared.path),
            "output": str(out_path),
            "opset_original": ai_onnx_opset(prepared.original),
            "opset_quantized": ai_onnx_opset(result.model),
            "intake": list(prepared.notes),
        },
        "config": plan.config.to_dict(),
        "size_bytes": {
            "original": size_original,
            "quantized": size_quantized,
            "ratio": size_original / size_quantized if size_quantized else None,
        },
        "nodes": {
            "quantized": sum(1 for n in plan.nodes if n.quantized),
            "float": sum(1 for n in plan.nodes if n.kept_float),
            "integer": sum(1 for n in plan.nodes if n.status == "integer"),
            "folded_activations": len(plan.folded),
            "by_op": node_summary(plan),
            "kept_float": [{"name": n.name, "op_type": n.op_type, "reason": n.reason} for n in plan.nodes if n.kept_float],
        },
        "calibration": _calibration(calib, plan),
        "evaluation": {"data": eval_source, "batches": evaluation.get("batches")},
        "outputs": evaluation.get("outputs", {}),
        **result.extras,
    }
    for key in ("task", "latency_ms"):
        if key in evaluation:
            report[key] = evaluation[key]
    report["warnings"] = warnings(report, prepared)
    return report


def _calibration(calib: Calibration | None, plan) -> dict | None:
    if calib is None:
        return None
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


def warnings(report: dict, prepared: Prepared) -> list[str]:
    """Things a user should act on: a slower model (with the mode that would not be), constants fp16 cannot hold."""
    out = []
    if report["nodes"]["quantized"] == 0:
        out.append(f"nothing was quantized in {report['mode']} mode: see the reasons under kept_float")
    lat = report.get("latency_ms")
    if lat and lat.get("ratio") and lat["ratio"] > 1.0:
        out.append(f"the {report['mode']} model is slower than the original on this CPU ({lat['ratio']:.2f}x the time); "
                   + _faster_suggestion(report["mode"], prepared))
    if not report["outputs"]:
        out.append("no evaluation data: give --eval-data (or --data) to measure fidelity and speed")
    fp16 = report.get("fp16")
    if fp16 and fp16.get("overflow"):
        names = ", ".join(o["tensor"] for o in fp16["overflow"][:5])
        out.append(f"{len(fp16['overflow'])} constants exceed float16's range and were kept float32: {names}")
    return out


def _faster_suggestion(mode: str, prepared: Prepared) -> str:
    ops = collections.Counter(n.op_type for n in prepared.model.graph.node)
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
