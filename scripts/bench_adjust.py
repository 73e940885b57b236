#!/usr/bin/env python3
"""The tool's own cost of bias correction and cross-layer equalization, in one run per model.

For each bench model (the quality ledger's models and calibration rows), times and peak memory of:

  fp32 pass       one pass of the float model over the calibration rows (onnxruntime, 2 threads): the unit
  ort static      onnxruntime's quantize_static (MinMax, QDQ, per-channel) on the same rows
  qconv           `qconv quantize M --data ROWS --bias-correction off` (calibration, plan, rewrite, check)
  + variants      the same with --bias-correction (full), --bias-correction fast, --equalize --bias-correction,
                  --rounding gptq (learned rounding alone), --ranges output (output-aware ranges alone), all of them,
                  and the default of quantize --data (checked bias correction and output-aware ranges)

Each qconv run is a fresh process; its peak RSS is the process's VmHWM. With --repeat N every column runs N times, the
rounds interleaved, and the table shows medians (the JSON keeps every run). The targets (issue: accuracy that costs no
speed): calibration with every adjustment on within 3x the plain run's wall time, and within its memory budget.

    .venv/bin/python scripts/bench_adjust.py [--only NAME] [--json adjust.json] [--quick] [--repeat 3]
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qconv.data import FeedSource  # noqa: E402
from scripts.bench_ledger import tasks  # noqa: E402  (the ledger's models and rows)
from scripts.benchlib import aligned, graph_specs, measured, ort_int8, session  # noqa: E402

CAL = ["--ranges", "calibrated"]  # each step alone: the default's output-aware ranges off unless the column names them
VARIANTS = {"qconv": ["--bias-correction", "off", *CAL], "+bc full": ["--bias-correction", "full", *CAL],
            "+bc fast": ["--bias-correction", "fast", *CAL], "+eq +bc": ["--equalize", "--bias-correction", *CAL],
            "+rounding": ["--rounding", "gptq", "--bias-correction", "off", *CAL],
            "+ranges": ["--ranges", "output", "--bias-correction", "off"],
            "+eq +rounding +bc": ["--equalize", "--rounding", "gptq", "--bias-correction", *CAL],
            "+ranges +eq +rounding +bc": ["--ranges", "output", "--equalize", "--rounding", "gptq", "--bias-correction"],
            "default (--data)": []}


def qconv_run(args: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS MB) of one qconv command in a fresh process."""
    r = measured([sys.executable, "-m", "qconv", *args])
    if "error" in r:
        raise RuntimeError(r["error"])
    return r["wall_s"], r["peak_mb"]


def fp32_pass(model: Path, calib: Path, batch: int) -> float:
    sess = session(str(model), 2)
    names = [o.name for o in sess.get_outputs()]
    feeds = list(FeedSource(calib, graph_specs(model), batch_size=batch))
    t0 = time.perf_counter()
    for feed in feeds:
        sess.run(names, feed)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", action="append", help="run only these models")
    ap.add_argument("--json", type=Path, help="write every number here")
    ap.add_argument("--quick", action="store_true", help="fewer rows")
    ap.add_argument("--repeat", type=int, default=1, help="rounds of every column, interleaved; the table shows medians")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated columns (qconv and +bc full always run)")
    args = ap.parse_args()
    wanted = {"qconv", "+bc full", *[v.strip() for v in args.variants.split(",")]}
    for k in [k for k in VARIANTS if k not in wanted]:
        del VARIANTS[k]
    if "QCONV_CACHE_DIR" not in os.environ:  # a fresh kernel cache: every table timed in this run
        os.environ["QCONV_CACHE_DIR"] = tempfile.mkdtemp(prefix="qconv-cache.")
        atexit.register(shutil.rmtree, os.environ["QCONV_CACHE_DIR"], True)
    work = Path(tempfile.mkdtemp(prefix="qconv-adjust."))
    atexit.register(shutil.rmtree, work, True)  # its data and models: about 2 GB a run
    record: dict = {}
    table = [["model", "rows", "fp32 pass s", "ort static s", *[f"{v} s" for v in VARIANTS], "x plain: " + " / ".join(list(VARIANTS)[1:]),
              "x fp32 pass: qconv / +bc full", "x ort: qconv / +bc full", "peak MB: " + " / ".join(VARIANTS)]]
    for task in tasks(work, args.quick):
        if args.only and task.name not in args.only:
            continue
        c = task.case
        rows = int(sum(np.shape(next(iter(f.values())))[0] for f in FeedSource(c.calib, graph_specs(c.model), batch_size=c.batch)))
        fp32 = fp32_pass(c.model, c.calib, c.batch)
        t0 = time.perf_counter()
        ort_int8(c, work / f"{task.name}.ort.onnx")
        ort_s = time.perf_counter() - t0
        runs: dict[str, list[tuple[float, float]]] = {label: [] for label in VARIANTS}
        for round_ in range(args.repeat):  # rounds interleave the columns: the machine's drift falls on all of them
            for label, flags in VARIANTS.items():
                out = work / f"{task.name}.{label.replace(' ', '_').replace('+', '')}.onnx"
                runs[label].append(qconv_run(["quantize", str(c.model), "--data", str(c.calib), "--batch-size", str(c.batch), "-o",
                                              str(out), "-q", "--no-latency", *flags]))  # the latency A/B: not the steps' cost
                print(f"{task.name:18s} {label:10s} {runs[label][-1][0]:7.1f} s  {runs[label][-1][1]:7.0f} MB  (round {round_ + 1})", flush=True)
        got = {k: (float(np.median([r[0] for r in v])), float(np.median([r[1] for r in v]))) for k, v in runs.items()}
        plain = got["qconv"][0]
        record[task.name] = {"rows": rows, "fp32_pass_s": fp32, "ort_static_s": ort_s,
                             "qconv": {k: {"seconds": s, "peak_mb": m, "runs_s": [r[0] for r in runs[k]]} for k, (s, m) in got.items()}}
        table.append([task.name, str(rows), f"{fp32:.1f}", f"{ort_s:.1f}", *[f"{got[v][0]:.1f}" for v in VARIANTS],
                      " / ".join(f"{got[v][0] / plain:.2f}" for v in list(VARIANTS)[1:]),
                      f"{plain / fp32:.1f} / {got['+bc full'][0] / fp32:.1f}", f"{plain / ort_s:.2f} / {got['+bc full'][0] / ort_s:.2f}",
                      " / ".join(f"{got[v][1]:.0f}" for v in VARIANTS)])
    print()
    print(aligned(table))
    worst = max((r["qconv"][k]["seconds"] / r["qconv"]["qconv"]["seconds"] for r in record.values() for k in VARIANTS), default=0)
    mem = max((r["qconv"][k]["peak_mb"] / r["qconv"]["qconv"]["peak_mb"] for r in record.values() for k in VARIANTS), default=0)
    print(f"\ntargets: every adjustment within 3x the plain run's wall time: {'PASS' if worst <= 3 else 'MISS'} (worst {worst:.2f}x); "
          f"peak memory {mem:.2f}x the plain run's")
    if args.json:
        args.json.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
