"""The report as a plain dict (schema ``qconv.report`` version 1, documented in the README)."""

from __future__ import annotations

from qconv import __version__
from qconv.calib.store import Calibration
from qconv.graph import ai_onnx_opset
from qconv.pipeline import Prepared, Result, node_summary

SCHEMA = "qconv.report"
VERSION = 1


def build_report(prepared: Prepared, result: Result, calib: Calibration, out_path: str,
                 size_original: int, size_quantized: int, evaluation: dict, eval_source: str) -> dict:
    plan = result.plan
    report = {
        "schema": SCHEMA,
        "version": VERSION,
        "qconv_version": __version__,
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
        "calibration": {
            "method": plan.config.method,
            "recorded_with": calib.options,
            "samples": calib.samples,
            "model_id": calib.model_id,
            "data_id": calib.data_id,
            "tensors": len(calib.tensors),
            "nonfinite_tensors": sorted(calib.nonfinite()),
            "constant_tensors": calib.constant(),
        },
        "evaluation": {"data": eval_source, "batches": evaluation.get("batches")},
        "outputs": evaluation.get("outputs", {}),
    }
    for key in ("task", "latency_ms"):
        if key in evaluation:
            report[key] = evaluation[key]
    return report
