"""Speed of int8 models: fp32 vs onnxruntime's static QDQ int8 vs qconv's int8, side by side in one run.

Run from the repository root (third-party cases download rapidocr-onnxruntime's wheel into ~/.cache/qconv-bench
once and render their inputs with Pillow: pip install -e '.[bench]'):

    .venv/bin/python scripts/bench_speed.py [--models 'ppocr*'] [--no-light] [--rounds 25] [--batch 8] [--json out.json]

Cases: the sample models (their own data); PP-OCRv4's text detector (DB, 480x480 pages of rendered text),
recognizer (SVTR-style, 48x320 text lines) and the mobile text-orientation classifier (48x192 lines) from the
rapidocr-onnxruntime wheel; and the classic networks in onnx's light zoo (random inputs: structure only).

For each model, in this one run:
  ort    onnxruntime.quantization.quantize_static: QDQ, per-channel int8 weights, uint8 activations, MinMax,
         on the same calibration rows, after onnx's version converter raised the model to opset 13 (onnxruntime
         rejects per-channel DequantizeLinear below 13)
  qconv  qconv's default int8 (`qconv quantize MODEL --data CALIB -o Q`)
  +fb    with --fallback: the same with --speed-fallback (profile, keep slower int8 nodes float if that measures faster)
Latency: one session per model (1 intra-op thread unless --threads, idle threads not spinning), timed in
interleaved rounds on one eval batch (the order rotates each round); medians of >= --rounds rounds and the
ratio to fp32 with the 95% interval of the per-round ratios. Fidelity: cosine of the first output against
fp32 over the eval rows. Ops: the graph onnxruntime runs (SessionOptions.optimized_model_filepath): fused int8
ops (QLinear*, QGemm, MatMulIntegerToFloat, ...), QuantizeLinear/DequantizeLinear left, and float compute ops.
Targets (the issue's): qconv int8 time <= onnxruntime int8 time on every model, never above fp32 without a
reason in its report, and output cosine no worse than onnxruntime's.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import fnmatch
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnxruntime as ort

from qconv.jobs import CalibOptions, EvalOptions, PlanJob, QuantizeJob, run_quantize
from qconv.measure.latency import ratio_interval
from qconv.measure.stats import ErrorStats
from scripts.benchlib import (
    Case,
    aligned,
    check,
    first_line,
    graph_specs,
    light_cases,
    ort_int8,
    page_images,
    sample_cases,
    session,
    text_lines,
    wheel_models,
)

FUSED = ("QLinear", "QGemm", "MatMulInteger", "DynamicQuantize", "ConvInteger", "MatMulNBits", "QAttention")
MOVEMENT = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Slice", "Gather", "Concat", "Split", "Shape",
            "Cast", "Identity", "Expand", "Tile", "Constant", "ConstantOfShape", "Range", "MaxPool", "Resize"}



def ppocr_cases(work: Path, n_calib: int, n_eval: int, batch: int) -> list[Case]:
    models = {p.name: p for p in wheel_models("rapidocr-onnxruntime", "1.4.4", "*/models/*.onnx")}
    made = {
        "ppocrv4_det": ("ch_PP-OCRv4_det_infer.onnx", lambda n, s: page_images(n, 480, s), min(batch, 2)),
        "ppocrv4_rec": ("ch_PP-OCRv4_rec_infer.onnx", lambda n, s: text_lines(n, 48, 320, s), batch),
        "ppocr_cls": ("ch_ppocr_mobile_v2.0_cls_infer.onnx", lambda n, s: text_lines(n, 48, 192, s), batch),
    }
    cases = []
    for name, (file, make, b) in made.items():
        calib, evald = work / f"{name}.calib.npy", work / f"{name}.eval.npy"
        np.save(calib, make(n_calib, 1))
        np.save(evald, make(n_eval, 2))
        cases.append(Case(name, models[file], calib, evald, None, batch=b, source="rapidocr-onnxruntime 1.4.4 (PyPI)"))
    return cases


def batched(case: Case):
    """Feeds of case.batch rows (the light models' fixed batch: one stacked feed each)."""
    from qconv.data import FeedSource

    return FeedSource(case.eval, graph_specs(case.model), batch_size=case.batch)


def qconv_int8(case: Case, out: Path, fallback: bool = False) -> dict:
    job = QuantizeJob(out=out, planning=PlanJob(model=case.model, data=case.calib, calib_options=CalibOptions(batch_size=case.batch)),
                      evaluation=EvalOptions(data=case.eval, layer_samples=0, threads=1), speed_fallback=fallback)
    report, _ = run_quantize(job)
    return report


def optimized_ops(path: Path, work: Path) -> dict:
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(work / "optimized.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(str(work / "optimized.onnx")).graph.node)
    fused = sum(c for op, c in ops.items() if op.startswith(FUSED))
    qdq = ops.get("QuantizeLinear", 0) + ops.get("DequantizeLinear", 0)
    float_ops = sum(c for op, c in ops.items() if not op.startswith(FUSED) and op not in ("QuantizeLinear", "DequantizeLinear")
                    and op not in MOVEMENT)
    return {"ops": dict(ops), "fused": fused, "q": ops.get("QuantizeLinear", 0), "dq": ops.get("DequantizeLinear", 0),
            "qdq": qdq, "float": float_ops}


def cosine(case: Case, paths: dict[str, Path], threads: int) -> dict[str, float]:
    sessions = {k: session(p, threads) for k, p in paths.items()}
    name = sessions["fp32"].get_outputs()[0].name
    stats = {k: ErrorStats() for k in paths if k != "fp32"}
    for feed in batched(case):
        ref = sessions["fp32"].run([name], feed)[0]
        for k in stats:
            stats[k].update(ref, sessions[k].run([name], feed)[0])
    return {k: s.cosine for k, s in stats.items()}


def latency(paths: dict[str, Path], feed: dict, threads: int, rounds: int, budget_s: float) -> dict:
    sessions = {k: session(p, threads, spinning=False) for k, p in paths.items()}
    names = list(sessions)
    for _ in range(2):
        for s in sessions.values():
            s.run(None, feed)
    times = {k: [] for k in names}
    start = time.perf_counter()
    for r in range(max(rounds, 5) * 4):
        for k in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            sessions[k].run(None, feed)
            times[k].append(1000.0 * (time.perf_counter() - t0))
        if r + 1 >= rounds or (r + 1 >= 5 and time.perf_counter() - start > budget_s):
            break
    out = {k: {"ms": float(np.median(v))} for k, v in times.items()}
    base = np.array(times["fp32"])
    for k in names:
        if k != "fp32":
            ratios = np.array(times[k]) / base
            lo, hi = ratio_interval(ratios)
            out[k].update(ratio=float(np.median(ratios)), low=lo, high=hi)
    if "ort" in times and "qconv" in times:
        r = np.array(times["qconv"]) / np.array(times["ort"])
        lo, hi = ratio_interval(r)
        out["qconv_over_ort"] = {"ratio": float(np.median(r)), "low": lo, "high": hi}
    out["rounds"] = len(base)
    return out


def bench(case: Case, work: Path, threads: int, rounds: int, budget_s: float, fallback: bool = False) -> dict:
    paths = {"fp32": case.model}
    res: dict = {"source": case.source, "batch": case.batch}
    tools = [("ort", ort_int8), ("qconv", qconv_int8)]
    if fallback:
        tools.append(("qconv+fb", lambda c, o: qconv_int8(c, o, fallback=True)))
    for tool, fn in tools:
        out = work / f"{case.name}.{tool}.onnx"
        t0 = time.perf_counter()
        try:
            rep = fn(case, out)
            session(out, 1).run(None, next(iter(batched(case))))
        except Exception as exc:  # noqa: BLE001 - a tool's failure is a result
            res[tool] = {"error": f"{type(exc).__name__}: {first_line(exc)}"}
            continue
        res[tool] = {"wall_s": time.perf_counter() - t0, **optimized_ops(out, work)}
        if tool.startswith("qconv"):
            res[tool]["warnings"] = rep.get("warnings", [])
            res[tool]["speed_fallback"] = rep.get("speed_fallback")
            res[tool]["verdict"] = rep.get("latency_ms", {}).get("verdict")
        paths[tool] = out
    res["fp32"] = optimized_ops(case.model, work)
    res["cosine"] = cosine(case, paths, 2)
    res["latency"] = latency(paths, next(iter(batched(case))), threads, rounds, budget_s)
    return res


def table(results: dict) -> str:
    head = ["model", "batch", "fp32 ms", "ort/fp32", "qconv/fp32", "+fb/fp32", "qconv/ort (95%)", "cos ort", "cos qconv",
            "fused ort/qconv", "Q+DQ ort/qconv", "float ops fp32/ort/qconv"]
    rows = [head]
    for name, r in results.items():
        lat = r["latency"]

        def ratio(k):
            return f"{lat[k]['ratio']:.2f}" if k in lat else "FAIL"

        def get(tool, key):
            return str(r[tool][key]) if key in r.get(tool, {}) else "-"

        q_o = lat.get("qconv_over_ort")
        rows.append([name, str(r["batch"]), f"{lat['fp32']['ms']:.1f}", ratio("ort"), ratio("qconv"),
                     ratio("qconv+fb") if "qconv+fb" in lat else "-",
                     f"{q_o['ratio']:.2f} ({q_o['low']:.2f}-{q_o['high']:.2f})" if q_o else "-",
                     f"{r['cosine'].get('ort', float('nan')):.4f}", f"{r['cosine'].get('qconv', float('nan')):.4f}",
                     f"{get('ort', 'fused')}/{get('qconv', 'fused')}", f"{get('ort', 'qdq')}/{get('qconv', 'qdq')}",
                     f"{r['fp32']['float']}/{get('ort', 'float')}/{get('qconv', 'float')}"])
    return aligned(rows)


def targets(results: dict) -> list[str]:
    out = []
    for name, r in results.items():
        lat = r["latency"]
        q_o = lat.get("qconv_over_ort")
        if q_o:
            out.append(check(f"{name}: qconv int8 time <= onnxruntime int8 time", q_o["low"] <= 1.0,
                             f"qconv/ort {q_o['ratio']:.2f} (95% {q_o['low']:.2f}-{q_o['high']:.2f})"))
        if "qconv" in lat:
            slower = lat["qconv"]["low"] > 1.0
            reason = any("slower than the original" in w for w in r["qconv"].get("warnings", []))
            out.append(check(f"{name}: qconv int8 never slower than fp32 without a reason", not slower or reason,
                             f"qconv/fp32 {lat['qconv']['ratio']:.2f} (95% {lat['qconv']['low']:.2f}-{lat['qconv']['high']:.2f})"
                             + ("; the report says why" if slower and reason else "")))
        if "ort" in r["cosine"] and "qconv" in r["cosine"]:
            c_o, c_q = r["cosine"]["ort"], r["cosine"]["qconv"]
            out.append(check(f"{name}: qconv output cosine >= onnxruntime's", c_q >= c_o - 1e-4, f"qconv {c_q:.5f}, ort {c_o:.5f}"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="*", help="fnmatch pattern on case names")
    ap.add_argument("--no-light", action="store_true", help="skip the onnx light zoo")
    ap.add_argument("--no-ppocr", action="store_true", help="skip the third-party PP-OCR models")
    ap.add_argument("--rounds", type=int, default=25, help="latency rounds (default 25)")
    ap.add_argument("--budget", type=float, default=120.0, help="seconds of latency rounds per model at most (>= 5 rounds)")
    ap.add_argument("--batch", type=int, default=8, help="rows per batch (the detector uses min(batch, 2))")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads of the timed sessions (default 1)")
    ap.add_argument("--fallback", action="store_true", help="also time qconv with --speed-fallback (column +fb)")
    ap.add_argument("--json", type=Path, help="write every number to this JSON file")
    args = ap.parse_args()
    ort.set_default_logger_severity(3)
    start = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_speed.", dir="/tmp") as tmp:
        work = Path(tmp)
        cases = [dataclasses.replace(c, batch=32, source="sample_models") for c in sample_cases()]
        if not args.no_ppocr:
            cases += ppocr_cases(work, 32, 32, args.batch)
        if not args.no_light:
            cases += light_cases(work, 8, 4, "light_*")
        for case in cases:
            if not fnmatch.fnmatch(case.name, args.models):
                continue
            t0 = time.perf_counter()
            results[case.name] = bench(case, work, args.threads, args.rounds, args.budget, args.fallback)
            print(f"  {case.name}: {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"\nlatency: medians of interleaved rounds, {args.threads} thread(s), no spinning; ratios are medians of per-round"
          " ratios (95% interval in brackets); cosine of the first output vs fp32 over the eval rows;"
          "\nops in onnxruntime's optimized graph: fused int8 ops, Q+DQ left, float compute ops (data movement not counted)")
    print(table(results))
    print("\n".join(["", "targets:"] + [f"  {t}" for t in targets(results)]))
    print(f"\ntotal wall time {time.perf_counter() - start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
