"""Calibration on a Dask cluster: wall time and peak memory for 1, 2 and 4 local workers, and what that means for
8-64 machines.

Run from the repository root (needs the dask and bench extras: pip install -e '.[dask,bench]'; the model is
downloaded from its PyPI wheel into ~/.cache/qconv-bench):

    .venv/bin/python scripts/bench_scale.py [--model cls|rec] [--rows 2048] [--workers 1 2 4] [--shards 16] [--json out.json]

Model (from the rapidocr-onnxruntime wheel): ``cls``, PP-OCR's mobile text-orientation classifier (a small CNN: the
driver's own start is a large part of its run), or ``rec``, the PP-OCRv4 recognizer (about 8x the work a line), on
--rows rendered text lines (48x192 / 48x320), batches of 8, every planned tensor observed. For each worker count the same
`qconv calibrate --executor local:N --shards S` runs in a child process; a sampler records the summed RSS of the
driver and every worker process (peak), and the per-worker peak. Also measured: one fp32 pass over the rows, the
in-process run without shards, and the merge of S shard results alone. The files of every worker count must be
identical. The estimate for M machines: startup + ceil(S / M) x (per-shard time at 1 worker) + merge time,
with S = max(--shards, M) (a shard per machine at least); it assumes the data is readable from every machine.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.benchlib import aligned, check, session, text_lines, wheel_models

QCONV = [sys.executable, "-m", "qconv"]


def tree_rss(pid: int) -> tuple[int, int]:
    """(summed RSS of the process and all its descendants, largest single RSS) in bytes."""
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p] + p.children(recursive=True)
    except psutil.Error:
        return 0, 0
    sizes = []
    for q in procs:
        try:
            sizes.append(q.memory_info().rss)
        except psutil.Error:
            pass
    return sum(sizes), max(sizes, default=0)


def timed_run(args: list[str]) -> dict:
    """Run a qconv command; wall time, peak summed RSS of its process tree, peak single-process RSS."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(QCONV + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0, 0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            total, one = tree_rss(proc.pid)
            peak[0], peak[1] = max(peak[0], total), max(peak[1], one)
            time.sleep(0.05)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, err = proc.communicate()
    done.set()
    t.join()
    if proc.returncode:
        raise SystemExit(f"qconv {' '.join(args)} failed: {err.strip().splitlines()[-1] if err.strip() else proc.returncode}")
    return {"wall_s": time.perf_counter() - t0, "peak_total_mb": peak[0] / 2**20, "peak_process_mb": peak[1] / 2**20}


def merge_seconds(calib: Path, shards: int) -> float:
    """The driver's merge of ``shards`` shard results of this calibration, alone."""
    from qconv.calib.observers import TensorObserver
    from qconv.calib.store import merge_tensors

    d = json.loads(calib.read_text())
    parts = [{k: TensorObserver.from_dict(v) for k, v in d["tensors"].items()} for _ in range(shards)]
    t0 = time.perf_counter()
    merge_tensors(parts)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("cls", "rec"), default="cls")
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    wanted = "ch_ppocr_mobile_v2.0_cls_infer.onnx" if args.model == "cls" else "ch_PP-OCRv4_rec_infer.onnx"
    model = next(p for p in wheel_models("rapidocr-onnxruntime", "1.4.4", "*/models/*.onnx") if p.name == wanted)
    width = 192 if args.model == "cls" else 320
    with tempfile.TemporaryDirectory(prefix="bench_scale.") as tmp:
        work = Path(tmp)
        data = work / "lines.npy"
        np.save(data, text_lines(args.rows, 48, width, seed=5))
        s = session(model, 2)
        x = np.load(data)
        t0 = time.perf_counter()
        for k in range(0, len(x), 8):
            s.run(None, {s.get_inputs()[0].name: x[k:k + 8]})
        fp32_s = time.perf_counter() - t0
        base = ["calibrate", str(model), "--data", str(data), "--batch-size", "8", "-q"]
        plain = timed_run(base + ["-o", str(work / "plain.json")])
        single = timed_run(base + ["-o", str(work / "single.json"), "--threads", "1"])
        plain_tensors = json.loads((work / "plain.json").read_text())["tensors"]
        rows, files, tensors_same = {}, {}, {}
        for n in args.workers:
            out = work / f"w{n}.json"
            rows[n] = timed_run(base + ["-o", str(out), "--executor", f"local:{n}", "--shards", str(args.shards)])
            files[n] = out.read_bytes()
            tensors_same[n] = json.loads(files[n])["tensors"] == plain_tensors
        merge_s = merge_seconds(work / f"w{args.workers[0]}.json", args.shards)
    one = rows[args.workers[0]]
    table = [["run", "wall s", "x fp32 pass", "peak RSS all processes MB", "peak RSS one process MB"],
             ["fp32 pass (2 threads)", f"{fp32_s:.2f}", "1.00", "-", "-"],
             ["in process, no shards", f"{plain['wall_s']:.2f}", f"{plain['wall_s'] / fp32_s:.2f}", f"{plain['peak_total_mb']:.0f}",
              f"{plain['peak_process_mb']:.0f}"],
             ["in process, --threads 1", f"{single['wall_s']:.2f}", f"{single['wall_s'] / fp32_s:.2f}", f"{single['peak_total_mb']:.0f}",
              f"{single['peak_process_mb']:.0f}"]]
    for n, r in rows.items():
        table.append([f"local:{n}, {args.shards} shards", f"{r['wall_s']:.2f}", f"{r['wall_s'] / fp32_s:.2f}",
                      f"{r['peak_total_mb']:.0f}", f"{r['peak_process_mb']:.0f}"])
    print(f"model: {model.name}; {args.rows} rows of 48x{width} text lines, batches of 8; this machine has 2 cores")
    print(aligned(table))
    print(f"merge of {args.shards} shard results: {1000 * merge_s:.1f} ms")
    startup = 3.0  # a Dask scheduler/worker start, seconds (observed 2-4 s on this machine)
    work = max(one["wall_s"] - startup, 0.0)  # all rows on one worker, without the start
    print(f"\nestimate for M machines (one worker each): {startup:.0f} s start + ceil(S/M) x {work:.1f} s / S per shard + merge:")
    est = []
    for m in (8, 16, 32, 64):
        shards = max(args.shards, m)
        est.append([str(m), str(shards), f"{startup + math.ceil(shards / m) * work / shards + merge_s * shards / args.shards:.1f}"])
    print(aligned([["machines", "shards", "wall s (est.)"]] + est))
    same = len(set(files.values())) == 1
    print("\ntargets:")
    print("  " + check("every worker count writes the same calibration file", same, f"{len(files)} runs"))
    print("  " + check("the sharded statistics equal the single process's, tensor for tensor", all(tensors_same.values()),
                       ", ".join(f"local:{n} {'same' if v else 'DIFFERENT'}" for n, v in tensors_same.items())))
    if 2 in rows:
        speedup = single["wall_s"] / rows[2]["wall_s"]
        print("  " + check("local:2 at least 1.4x faster than one single-threaded process", speedup >= 1.4,
                           f"{single['wall_s']:.2f} s -> {rows[2]['wall_s']:.2f} s ({speedup:.2f}x)"))
    w = sorted(rows)
    if len(w) > 1:
        print("  " + check(f"{w[1]} workers are faster than {w[0]} on 2 cores", rows[w[1]]["wall_s"] < rows[w[0]]["wall_s"],
                           f"{rows[w[0]]['wall_s']:.2f} s -> {rows[w[1]]['wall_s']:.2f} s"))
    print("  " + check("the largest worker process stays within the 1 GB calibration budget (+ weights and runtime)",
                       max(r["peak_process_mb"] for r in rows.values()) < 1536, f"{max(r['peak_process_mb'] for r in rows.values()):.0f} MB"))
    if args.json:
        args.json.write_text(json.dumps({"fp32_s": fp32_s, "plain": plain, "workers": rows, "merge_s": merge_s}, indent=2) + "\n")


if __name__ == "__main__":
    main()
