"""What `qconv report` costs: its time next to plain onnxruntime passes, and its memory as the eval data grows.

Run from the repository root:

    /tmp/ci-venv/bin/python scripts/bench_report.py [--models 'digits*'] [--mode int8] [--repeat 5] [--scales 1 32] [--json out.json]

For each sample model (sample_models/*/ with model.onnx, calib, eval and eval_labels.npy) the script first makes a
quantized model with qconv.run.run_quantize (--mode MODE, calibrated on calib, latency=False). Then --repeat
rounds (after one warm-up round), each timing these in an order that rotates from round to round:

  fp32 pass    what a plain user does: np.load the eval data, create an onnxruntime session for the original
               from its file (CPU, --threads intra-op threads) and run every row in batches of 32
  quant pass   the same for the quantized model
  report       run_compare(CompareJob(original, quantized, eval, eval_labels, batch_size=32, latency=False,
               reports=(r.html, r.md, r.json))): the library call behind
               `qconv report ORIGINAL QUANTIZED --data EVAL --eval-labels L --batch-size 32 --no-latency
               --report r.html --report r.md --report r.json`. Per-layer analysis is always on in it.
  no layers    the same call with qconv.pipeline.probe_pairs patched to return no pairs: outputs and top-1 only,
               so "report - no layers" is what the per-layer analysis costs
  writing      write_reports alone on the finished report (.html, .md, .json)

  added = report - (fp32 pass + quant pass): the work report generation does beyond running the two models once;
  the issue's target is added <= 1.5 x one fp32 pass. Medians over the rounds; every ratio is of medians.

Memory (must stream): for each --scales factor k, the eval data and labels tiled k times (.npy stays .npy, .npz
stays a compressed .npz; for .npz models also a folder of k .npz files holding one copy each), and one report run
in a spawned child process that samples its own RSS every 5 ms. Reported: peak RSS (VmHWM) and peak anonymous RSS
(RssAnon, sampled; file-backed pages of a memory-mapped .npy are page cache, not allocations), each minus the
child's RSS after imports, next to the bytes of the data. Streaming means the peaks stay flat as k grows (the
target allows max(2 MB, 10% of the data growth) for noise). Each row of data costs report time, so scales stay small.
Then a "targets" section marks each goal PASS/FAIL; the exit code is 0 either way.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from unittest import mock

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qconv import pipeline
from qconv.report.write import write_reports
from qconv.run import CompareJob, QuantizeJob, run_compare, run_quantize
from scripts.bench_calibration import in_child
from scripts.bench_quality import check, sample_cases, session

BATCH = 32


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    """The eval data as a plain user reads it: a .npy is the single input's array, a .npz one array per input."""
    if path.suffix == ".npy":
        return {None: np.load(path)}
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def plain_pass(model: Path, data: Path, threads: int) -> dict:
    """Load the data, make a session from the file and run every row in batches of BATCH; seconds of each part."""
    t0 = time.perf_counter()
    arrays = load_arrays(data)
    t1 = time.perf_counter()
    sess = session(model, threads)
    t2 = time.perf_counter()
    if None in arrays:
        arrays = {sess.get_inputs()[0].name: arrays[None]}
    rows = len(next(iter(arrays.values())))
    for k in range(0, rows, BATCH):
        sess.run(None, {n: a[k:k + BATCH] for n, a in arrays.items()})
    t3 = time.perf_counter()
    return {"total": t3 - t0, "load_data": t1 - t0, "session": t2 - t1, "run": t3 - t2}


def compare_job(case, quantized: Path, data: Path, labels: Path, out: Path, threads: int) -> CompareJob:
    return CompareJob(case.model, quantized, data, labels, batch_size=BATCH, threads=threads, latency=False,
                      reports=(out / "r.html", out / "r.md", out / "r.json"))


def report_time(job: CompareJob, layers: bool) -> tuple[float, dict]:
    t0 = time.perf_counter()
    if layers:
        report = run_compare(job)
    else:
        with mock.patch.object(pipeline, "probe_pairs", return_value={}):
            report = run_compare(job)
    return time.perf_counter() - t0, report


def write_time(report: dict, paths) -> float:
    t0 = time.perf_counter()
    write_reports(report, paths)
    return time.perf_counter() - t0


def time_case(case, quantized: Path, work: Path, threads: int, repeat: int) -> dict:
    job = compare_job(case, quantized, case.eval, case.labels, work, threads)
    report = {}

    def fp32():
        return plain_pass(case.model, case.eval, threads)["total"]

    def quant():
        return plain_pass(quantized, case.eval, threads)["total"]

    def full():
        nonlocal report
        t, report = report_time(job, layers=True)
        return t

    def outputs_only():
        return report_time(job, layers=False)[0]

    tasks = {"fp32 pass": fp32, "quant pass": quant, "report": full, "no layers": outputs_only}
    times = {k: [] for k in tasks}
    names = list(tasks)
    for r in range(repeat + 1):  # round 0 warms up (imports, first sessions) and is not counted
        for name in names[r % len(names):] + names[:r % len(names)]:
            t = tasks[name]()
            if r:
                times[name].append(t)
    times["writing"] = [write_time(report, job.reports) for _ in range(repeat)]
    parts = plain_pass(case.model, case.eval, threads)
    med = {k: statistics.median(v) for k, v in times.items()}
    added = med["report"] - (med["fp32 pass"] + med["quant pass"])
    return {"median_s": med, "runs_s": times, "fp32_parts_s": parts, "added_s": added,
            "added_over_fp32": added / med["fp32 pass"], "report_over_fp32": med["report"] / med["fp32 pass"],
            "layers_s": med["report"] - med["no layers"],
            "report_files": {p.suffix: p.stat().st_size for p in job.reports},
            "layers_compared": len(report.get("layers", [])), "batches": report.get("evaluation", {}).get("batches")}


# ---- memory ------------------------------------------------------------------------------------------

def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def rss_child(original: str, quantized: str, data: str, labels: str, out: str, threads: int, queue) -> None:
    """Runs in a spawned process: one report run, its peak RSS over the RSS after imports."""
    import qconv.report.html
    import qconv.report.markdown  # noqa: F401

    base_rss, base_anon = status_kb("VmRSS"), status_kb("RssAnon")
    peak_anon = [base_anon]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak_anon[0] = max(peak_anon[0], status_kb("RssAnon"))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    outdir = Path(out)
    run_compare(CompareJob(Path(original), Path(quantized), Path(data), Path(labels), batch_size=BATCH, threads=threads,
                           latency=False, reports=(outdir / "r.html", outdir / "r.md", outdir / "r.json")))
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join()
    peak_anon[0] = max(peak_anon[0], status_kb("RssAnon"))
    queue.put({"wall_s": wall, "base_mb": base_rss / 1024, "peak_mb": status_kb("VmHWM") / 1024,
               "peak_above_base_mb": (status_kb("VmHWM") - base_rss) / 1024,
               "anon_peak_above_base_mb": (peak_anon[0] - base_anon) / 1024})


def tiled(case, k: int, work: Path, folder: bool) -> tuple[Path, Path, int]:
    """Eval data and labels repeated k times; returns their paths and the data's bytes in memory."""
    labels = work / f"labels.x{k}.npy"
    np.save(labels, np.tile(np.load(case.labels), k))
    if case.eval.suffix == ".npy":
        a = np.load(case.eval)
        path = work / f"eval.x{k}.npy"
        np.save(path, np.concatenate([a] * k))
        return path, labels, a.nbytes * k
    with np.load(case.eval) as z:
        arrays = {n: z[n] for n in z.files}
    nbytes = sum(a.nbytes for a in arrays.values()) * k
    if folder:
        path = work / f"eval.x{k}.d"
        path.mkdir()
        for i in range(k):
            np.savez_compressed(path / f"part{i:05d}.npz", **arrays)
        return path, labels, nbytes
    path = work / f"eval.x{k}.npz"
    np.savez_compressed(path, **{n: np.concatenate([a] * k) for n, a in arrays.items()})
    return path, labels, nbytes


def memory_case(case, quantized: Path, work: Path, threads: int, scales: list[int]) -> list[dict]:
    layouts = ["file"] + (["folder"] if case.eval.suffix == ".npz" else [])
    rows = []
    for layout in layouts:
        for k in scales:
            d = work / f"mem.{layout}.{k}"
            d.mkdir()
            data, labels, nbytes = tiled(case, k, d, layout == "folder")
            r = in_child(rss_child, str(case.model), str(quantized), str(data), str(labels), str(d), threads)
            rows.append({"layout": layout, "scale": k, "rows": len(np.load(labels)), "data_mb": nbytes / 2**20, **r})
            shutil.rmtree(d)
    return rows


# ---- output -------------------------------------------------------------------------------------------

def aligned(rows: list[list[str]]) -> str:
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join([lines[0], "-" * len(lines[0])] + lines[1:])


def time_table(results: dict) -> str:
    head = ["model", "batches", "layers", "fp32 pass ms", "quant pass ms", "report ms", "no layers ms", "writing ms",
            "added ms", "added/fp32", "report/fp32"]
    rows = [head]
    for name, r in results.items():
        m = {k: 1000 * v for k, v in r["time"]["median_s"].items()}
        rows.append([name, str(r["time"]["batches"]), str(r["time"]["layers_compared"]), f"{m['fp32 pass']:.1f}",
                     f"{m['quant pass']:.1f}", f"{m['report']:.1f}", f"{m['no layers']:.1f}", f"{m['writing']:.1f}",
                     f"{1000 * r['time']['added_s']:.1f}", f"{r['time']['added_over_fp32']:.2f}", f"{r['time']['report_over_fp32']:.2f}"])
    return aligned(rows)


def memory_table(results: dict) -> str:
    head = ["model", "data layout", "scale", "rows", "data MB", "report s", "peak RSS - base MB", "peak anon - base MB"]
    rows = [head]
    for name, r in results.items():
        for m in r.get("memory", []):
            if "error" in m:
                rows.append([name, m["layout"], str(m["scale"]), str(m["rows"]), f"{m['data_mb']:.1f}", "FAIL", m["error"], ""])
                continue
            rows.append([name, m["layout"], str(m["scale"]), str(m["rows"]), f"{m['data_mb']:.1f}", f"{m['wall_s']:.1f}",
                         f"{m['peak_above_base_mb']:.1f}", f"{m['anon_peak_above_base_mb']:.1f}"])
    return aligned(rows)


def targets(results: dict) -> list[str]:
    out = []
    for name, r in results.items():
        t = r["time"]
        out.append(check(f"{name}: report adds <= 1.5x one fp32 pass", t["added_over_fp32"] <= 1.5,
                         f"added {1000 * t['added_s']:.1f} ms = {t['added_over_fp32']:.2f}x the fp32 pass "
                         f"({1000 * t['median_s']['fp32 pass']:.1f} ms); whole report {t['report_over_fp32']:.2f}x"))
    for name, r in results.items():
        mem = [m for m in r.get("memory", []) if "error" not in m]
        for layout in sorted({m["layout"] for m in mem}):
            ms = sorted((m for m in mem if m["layout"] == layout), key=lambda m: m["scale"])
            if len(ms) < 2:
                continue
            lo, hi = ms[0], ms[-1]
            grew = hi["anon_peak_above_base_mb"] - lo["anon_peak_above_base_mb"]
            data = hi["data_mb"] - lo["data_mb"]
            out.append(check(f"{name} ({layout}): report streams (peak anon RSS grows <= max(2 MB, 10% of the data growth))",
                             grew <= max(2.0, 0.1 * data), f"x{lo['scale']} -> x{hi['scale']}: data +{data:.1f} MB, peak anon RSS {grew:+.1f} MB "
                             f"(peak RSS {hi['peak_above_base_mb'] - lo['peak_above_base_mb']:+.1f} MB)"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="*", help="fnmatch pattern on sample model names")
    ap.add_argument("--mode", default="int8", help="qconv mode of the quantized model (default int8)")
    ap.add_argument("--repeat", type=int, default=5, help="timed rounds; medians are reported (default 5)")
    ap.add_argument("--scales", type=int, nargs="*", default=[1, 32], help="eval data repeats for the memory runs (default 1 32; none: skip)")
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads everywhere (default 2)")
    ap.add_argument("--json", type=Path, help="write every number to this JSON file")
    args = ap.parse_args()
    start = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_report.", dir="/tmp") as tmp:
        for case in sample_cases():
            if not fnmatch.fnmatch(case.name, args.models):
                continue
            t0 = time.perf_counter()
            work = Path(tmp) / case.name
            work.mkdir()
            quantized = work / f"model.{args.mode}.onnx"
            run_quantize(QuantizeJob(model=case.model, out=quantized, settings={"mode": args.mode},
                                     data=case.calib if args.mode in ("int8", "a16w8") else None,
                                     eval_data=case.eval, batch_size=BATCH, latency=False))
            results[case.name] = {"time": time_case(case, quantized, work, args.threads, args.repeat)}
            if args.scales:
                results[case.name]["memory"] = memory_case(case, quantized, work, args.threads, args.scales)
            print(f"  {case.name}: {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"\ntime (medians of {args.repeat} interleaved rounds; --mode {args.mode}; batch {BATCH}; {args.threads} threads):")
    print(time_table(results))
    print("\npass = np.load + session from file + run; report = run_compare with .html/.md/.json, no latency;"
          "\nno layers = the same without per-layer probes; writing = rendering + writing the three files;"
          "\nadded = report - (fp32 pass + quant pass)")
    fp = "\n".join(f"  {n}: " + ", ".join(f"{k} {1000 * v:.1f} ms" for k, v in r["time"]["fp32_parts_s"].items())
                   for n, r in results.items())
    print(f"\none fp32 pass, by part:\n{fp}")
    if args.scales:
        print("\nmemory (one report run per row in a spawned child; base = its RSS after imports; report s is slowed by"
              "\nthe child's 5 ms RSS sampler thread, so it is not a timing: see the time table):")
        print(memory_table(results))
    print("\n".join(["", "targets:"] + [f"  {t}" for t in targets(results)]))
    print(f"\ntotal wall time {time.perf_counter() - start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"mode": args.mode, "batch_size": BATCH, "threads": args.threads, "models": results},
                                        indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
