"""Benchmark qconv against onnxruntime's own static quantizer (a benchmark, not a test).

Run from the repository root:

    PYTHONPATH=. python scripts/bench_quality.py [--models 'digits*'] [--skip-light] [--json out.json]

Models: every sample_models/*/ folder with model.onnx, calib.np[yz], eval.np[yz] and eval_labels.npy
(folders missing files are skipped), and the nine structural models in onnx's
backend/test/data/light/ (fed uniform [0, 1) noise from numpy's default_rng(0); their weights are
constants, so only "quantizes and runs", size and latency mean anything there).

Tools, each given the original model and the same calibration feeds (batch 1):
  qconv    qconv's library pipeline with its default QuantConfig (QDQ, per-channel int8 weights, uint8 activations)
  ort      onnxruntime.quantization.quantize_static (QDQ, per_channel, QUInt8 activations, QInt8 weights, MinMax)
  ort+pre  the same after onnxruntime's recommended quant_pre_process (skip_symbolic_shape: no sympy needed)
Each tool calibrates and quantizes in its own spawned child process, which reports its wall time and
its peak RSS above its RSS after imports (the memory the calibration and rewrite themselves took).

Measured in this process, with the same code and onnxruntime settings (CPU, --threads intra-op threads)
for every model: per-output SQNR (dB) and cosine vs fp32 over the eval feeds, top-1 accuracy of the first
output against eval_labels, median latency over interleaved runs on one eval feed (ratio to fp32), and bytes
on disk (fp32 / quantized). The fp32 reference for all of these is the original with its weights
materialized: initializers dropped from the graph inputs (old IR lists them there, which stops folding) and
onnxruntime's basic constant folding saved to a file (without ConstantSharing, which would merge identical
weight fills). Then a "targets" section marks each goal PASS/FAIL; the exit code is 0 either way.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import fnmatch
import json
import logging
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qconv import pipeline
from qconv.plan.config import QuantConfig
from scripts.benchlib import (
    Case,
    Reader,
    check,
    feeds,
    fidelity,
    first_line,
    fmt,
    latencies,
    light_cases,
    peak_rss_mb,
    sample_cases,
    session,
)

# ---- models -------------------------------------------------------------------------------------


def materialize_fp32(model: Path, out: Path) -> None:
    """Save ``model`` with constant weights folded, so fp32 size and latency are not flattered by ConstantOfShape."""
    m = onnx.load(str(model))
    inits = {t.name for t in m.graph.initializer}
    keep = [i for i in m.graph.input if i.name not in inits]
    del m.graph.input[:]
    m.graph.input.extend(keep)
    m.ir_version = max(m.ir_version, 4)
    stripped = out.with_suffix(".in.onnx")
    onnx.save(m, str(stripped))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(out)
    opts.log_severity_level = 3
    # ConstantSharing would merge identical fills (the light models' weights), shrinking the fp32 file
    ort.InferenceSession(str(stripped), opts, providers=["CPUExecutionProvider"], disabled_optimizers=["ConstantSharing"])
    stripped.unlink()


# ---- calibrate + quantize, one tool per child process --------------------------------------------


def ort_quantize(model: Path, calib: Path, out: Path, pre: bool) -> None:
    source = feeds(model, calib)  # the original's inputs: pre-processing may expose more graph inputs
    if pre:
        pre_path = out.with_suffix(".pre.onnx")
        quant_pre_process(str(model), str(pre_path), skip_symbolic_shape=True)
        model = pre_path
    quantize_static(str(model), str(out), Reader(source), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)


def qconv_quantize(model: Path, calib: Path, out: Path) -> None:
    cfg = QuantConfig()
    prep = pipeline.load(model, cfg)
    calibration = pipeline.calibrate(prep, pipeline.feeds_for(prep, calib, batch_size=1), config=cfg)  # as `qconv quantize --data`
    pipeline.save_quantized(pipeline.quantize(prep, calibration, cfg), out, prep)


def child(tool: str, model: Path, calib: Path, out: Path) -> dict:
    """Runs in a fresh process: calibrate + quantize with one tool, report time and memory."""
    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime.quantization warns through the root logger
    ort.set_default_logger_severity(3)
    base = peak_rss_mb()
    start = time.perf_counter()
    try:
        if tool == "qconv":
            qconv_quantize(model, calib, out)
        else:
            ort_quantize(model, calib, out, pre=tool == "ort+pre")
    except Exception as exc:  # noqa: BLE001 - any failure of the tool is a result
        return {"status": "FAILED", "error": f"{type(exc).__name__}: {first_line(exc)}"}
    peak = peak_rss_mb()
    return {"status": "ok", "wall_s": time.perf_counter() - start, "rss_base_mb": base, "rss_peak_mb": peak,
            "rss_mb": peak - base}


def run_in_child(tool: str, case: Case, out: Path) -> dict:
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        try:
            return pool.submit(child, tool, case.model, case.calib, out).result()
        except concurrent.futures.process.BrokenProcessPool:
            return {"status": "FAILED", "error": "child process died (killed or crashed)"}


# ---- evaluation: the same code for every model --------------------------------------------------


def int8_weight_bytes(path: Path) -> int:
    m = onnx.load(str(path))
    return sum(len(t.raw_data) or len(t.int32_data) for t in m.graph.initializer
               if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) and len(t.dims) >= 2)


def evaluate(case: Case, fp32_path: Path, outs: dict[str, Path], threads: int, runs: int) -> None:
    labels = np.load(case.labels).reshape(-1) if case.labels else None
    source = feeds(case.model, case.eval)
    ref_sess = session(fp32_path, threads, spinning=False)
    names = [o.name for o in ref_sess.get_outputs()]
    reference = [ref_sess.run(names, feed) for feed in source]
    weights = sum(onnx.numpy_helper.to_array(t).nbytes for t in onnx.load(str(fp32_path)).graph.initializer)
    case.fp32 = {"bytes_on_disk": case.model.stat().st_size, "bytes": fp32_path.stat().st_size, "weight_bytes": weights}
    if labels is not None:
        case.fp32["top1"] = fidelity(ref_sess, names, reference, source, labels)["top1"]
    sessions = {"fp32": ref_sess}
    for tool, out in outs.items():
        r = case.tools[tool]
        try:
            sess = session(out, threads, spinning=False)
            r.update(fidelity(sess, names, reference, source, labels))
        except Exception as exc:  # noqa: BLE001 - a model that will not load or run is a result
            r.update(status="RUN FAILED", error=first_line(exc))
            continue
        sessions[tool] = sess
        r.update(bytes=out.stat().st_size, size_ratio=case.fp32["bytes"] / out.stat().st_size,
                 int8_weight_bytes=int8_weight_bytes(out))
    ms = latencies(sessions, next(iter(source)), runs)
    case.fp32["latency_ms"] = ms["fp32"]
    for tool in sessions.keys() - {"fp32"}:
        case.tools[tool].update(latency_ms=ms[tool], latency_ratio=ms[tool] / ms["fp32"])


def bench(case: Case, tools: list[str], threads: int, runs: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench_quality.", dir="/tmp") as tmp:
        fp32_path = Path(tmp) / "fp32.onnx"
        materialize_fp32(case.model, fp32_path)
        outs = {}
        for tool in tools:
            out = Path(tmp) / f"{tool}.onnx"
            case.tools[tool] = run_in_child(tool, case, out)
            if case.tools[tool]["status"] == "ok":
                outs[tool] = out
        evaluate(case, fp32_path, outs, threads, runs)


# ---- report ---------------------------------------------------------------------------------------

STATUS = {"ok": "ok", "FAILED": "FAIL", "RUN FAILED": "NORUN"}  # NORUN: quantized, but will not load or run


def row(case: Case, tools: list[str]) -> list[str]:
    def cell(key, spec):
        return "/".join(fmt(case.tools[t].get(key), spec) for t in tools)
    status = "/".join(STATUS[case.tools[t]["status"]] for t in tools)
    top1 = f"{fmt(case.fp32.get('top1'), '.1f')}|{cell('top1', '.1f')}" if case.labels else "-"
    return [case.name, status, top1, cell("cosine", ".4f"), cell("sqnr_db", ".1f"), cell("size_ratio", ".2f"),
            cell("latency_ratio", ".2f"), cell("wall_s", ".2f"), cell("rss_mb", ".0f")]


def table(cases: list[Case], tools: list[str]) -> str:
    who = "/".join({"qconv": "q", "ort": "ort", "ort+pre": "pre"}[t] for t in tools)
    head = ["model", f"status {who}", f"top-1 % fp32|{who}", f"cosine {who}", f"SQNR dB {who}", f"size x {who}",
            f"latency x {who}", f"calib s {who}", f"RSS MB {who}"]
    rows = [head] + [row(c, tools) for c in cases]
    widths = [max(len(r[k]) for r in rows) for k in range(len(head))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join([lines[0], "-" * len(lines[0])] + lines[1:])


def weights_quantized(case: Case, tool: str) -> bool:
    """At least half the fp32 weight bytes became int8 (an int8 weight is a quarter of a float one)."""
    return 4 * case.tools[tool].get("int8_weight_bytes", 0) >= 0.5 * case.fp32["weight_bytes"]


def notes(cases: list[Case]) -> list[str]:
    out = []
    for c in cases:
        for tool, r in c.tools.items():
            if r["status"] != "ok":
                out.append(f"{c.name} {tool}: {r['status']}: {r['error']}")
            elif not weights_quantized(c, tool):
                out.append(f"{c.name} {tool}: most weights left in float ({r['int8_weight_bytes']:,} B int8 "
                           f"for {c.fp32['weight_bytes']:,} B of fp32 weights)")
    for key, what in (("wall_s", "calibrate+quantize wall time"), ("rss_mb", "peak RSS above baseline")):
        both = [c for c in cases if "ort" in c.tools and all(weights_quantized(c, t) and c.tools[t].get(key)
                                                             for t in ("qconv", "ort"))]
        if both:
            ratio = statistics.median(c.tools["qconv"][key] / c.tools["ort"][key] for c in both)
            out.append(f"{what}, qconv/ort: median {ratio:.2f}x over {len(both)} models where both quantized the weights")
    return out


def targets(cases: list[Case]) -> list[str]:
    ran = [c for c in cases if "latency_ms" in c.tools["qconv"]]  # quantized, evaluated and timed
    q = {c.name: c.tools["qconv"] for c in ran}

    drops = {c.name: c.fp32["top1"] - q[c.name]["top1"] for c in ran if c.name.startswith("digits")}
    digits = ", ".join(f"{n} drop {d:+.2f} points" for n, d in drops.items())
    cosines = {n: r["cosine"] for n, r in q.items() if "transformer" in n}
    transformer = ", ".join(f"{n} {v:.4f}" for n, v in cosines.items())
    light = [c for c in cases if c.light]
    failed = [c.name for c in light if c.name not in q]
    light_ok = False if failed else (True if len(light) == 9 else None)  # None: not all nine selected
    light_detail = f"{len(light) - len(failed)}/{len(light)} selected ran" + (f"; failed: {', '.join(failed)}" if failed else "")
    heavy = [c for c in ran if c.fp32["weight_bytes"] >= max(2**20, 0.9 * c.fp32["bytes"])]
    sizes = ", ".join(f"{c.name} {q[c.name]['size_ratio']:.2f}x" for c in heavy)
    slow = [c.name for c in ran if q[c.name]["latency_ratio"] >= 1.0]
    speed = f"{len(ran) - len(slow)}/{len(ran)} faster" + (
        "; slower: " + ", ".join(f"{n} {q[n]['latency_ratio']:.2f}x" for n in slow) if slow else "")
    return [
        check("digits CNN top-1 within 0.5 points of fp32", all(d <= 0.5 for d in drops.values()) if drops else None, digits or "not run"),
        check("transformer cosine >= 0.99", all(v >= 0.99 for v in cosines.values()) if cosines else None, transformer or "not run"),
        check("all nine light models quantize and run", light_ok, light_detail),
        check("size ratio >= 3.8x where weights dominate (>= 1 MiB, >= 90% of the fp32 file)",
              all(q[c.name]["size_ratio"] >= 3.8 for c in heavy) if heavy else None, sizes or "no such model"),
        check("int8 faster than fp32 (latency ratio < 1)", not slow if ran else None, speed),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="*", help="fnmatch pattern on model names, e.g. 'digits*' or 'light_*'")
    ap.add_argument("--skip-light", action="store_true", help="skip onnx's backend/test/data/light models")
    ap.add_argument("--light-samples", type=int, nargs=2, default=(8, 4), metavar=("CALIB", "EVAL"),
                    help="random feeds for the light models (default 8 4)")
    ap.add_argument("--no-ort-pre", action="store_true", help="skip the ort+pre column")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads for evaluation and latency (default 2)")
    ap.add_argument("--runs", type=int, default=30, help="latency runs per model (default 30, 60 s budget)")
    ap.add_argument("--json", type=Path, help="write every number to this JSON file")
    args = ap.parse_args()
    tools = ["qconv", "ort"] + ([] if args.no_ort_pre else ["ort+pre"])
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_quality.data.", dir="/tmp") as scratch:
        cases = [c for c in sample_cases() if fnmatch.fnmatch(c.name, args.models)]
        if not args.skip_light:
            cases += light_cases(Path(scratch), *args.light_samples, args.models)
        for c in cases:
            t0 = time.perf_counter()
            bench(c, tools, args.threads, args.runs)
            print(f"  {c.name}: {time.perf_counter() - t0:.0f} s", flush=True)
    print()
    print(table(cases, tools))
    print("\n".join(["", "notes:"] + [f"  {n}" for n in notes(cases)]))
    print("\n".join(["", "targets (qconv):"] + [f"  {t}" for t in targets(cases)]))
    print(f"\ntotal wall time {time.perf_counter() - start:.0f} s; threads {args.threads}; latency = median of interleaved runs")
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "tools": tools, "models": [
            {"name": c.name, "light": c.light, "fp32": c.fp32, "tools": c.tools} for c in cases]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
