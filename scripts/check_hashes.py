"""Hashes of the models qconv writes on a fixed command set: the check that a refactor changed no behaviour.

    python scripts/check_hashes.py                     # run the command set in this tree, print the hashes
    python scripts/check_hashes.py --ref main~3        # the same in a worktree of another commit: compare
    python scripts/check_hashes.py --json h.json       # keep them; --against h.json compares with a kept set
    python scripts/check_hashes.py --bench             # also the PP-OCRv4 recognizer and detector (downloaded)
    python scripts/check_hashes.py --contents          # what a file decides, not its records (see content_hash)

Every mode, calibration files and --data, --plan, the QOperator conversion, bias correction, equalization, floors
and tuning with a budget in trials (deterministic; its trial cache in a fresh directory). Exit 1 when any hash
differs from the reference (or a command fails in one tree only).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
S = "sample_models"
CNN, QAT, TT = f"{S}/digits_cnn", f"{S}/digits_cnn_qat", f"{S}/tiny_transformer"
TUNE = ["--tune", "--budget", "24trials", "--min-cosine", "0.99999", "--no-latency", "--layer-samples", "0"]

# (name, arguments after `python -m qconv`); {out} is the scratch directory, files named there are shared by later steps.
COMMANDS: list[tuple[str, list[str]]] = [
    ("cnn.calib", ["calibrate", f"{CNN}/model.onnx", "--data", f"{CNN}/calib.npy", "--batch-size", "32", "-o", "{out}/cnn.calib.json"]),
    ("cnn.calib-eq", ["calibrate", f"{CNN}/model.onnx", "--data", f"{CNN}/calib.npy", "--equalize", "-o", "{out}/cnn.eq.calib.json"]),
    ("cnn.int8-calib", ["quantize", f"{CNN}/model.onnx", "--calib", "{out}/cnn.calib.json", "-o", "{out}/cnn.int8-calib.onnx"]),
    ("cnn.int8-data", ["quantize", f"{CNN}/model.onnx", "--data", f"{CNN}/calib.npy", "-o", "{out}/cnn.int8-data.onnx", "--no-latency"]),
    ("cnn.bc-fast", ["quantize", f"{CNN}/model.onnx", "--data", f"{CNN}/calib.npy", "--bias-correction", "fast",
                     "-o", "{out}/cnn.bc-fast.onnx", "--no-latency"]),
    ("cnn.per-tensor-eq", ["quantize", f"{CNN}/model.onnx", "--calib", "{out}/cnn.eq.calib.json", "--equalize", "--per-tensor",
                           "-o", "{out}/cnn.per-tensor-eq.onnx"]),
    ("cnn.floors", ["quantize", f"{CNN}/model.onnx", "--calib", "{out}/cnn.calib.json", "--floor-ranges", "-o", "{out}/cnn.floors.onnx"]),
    ("cnn.percentile-sym", ["quantize", f"{CNN}/model.onnx", "--calib", "{out}/cnn.calib.json", "--method", "percentile",
                            "--symmetric-activations", "--activation-type", "int8", "-o", "{out}/cnn.percentile-sym.onnx"]),
    ("cnn.qoperator", ["quantize", f"{CNN}/model.onnx", "--calib", "{out}/cnn.calib.json", "--format", "qoperator",
                       "-o", "{out}/cnn.qoperator.onnx"]),
    ("cnn.quantized-io", ["quantize", f"{CNN}/model.onnx", "--calib", "{out}/cnn.calib.json", "--quantized-io", "uint8",
                          "-o", "{out}/cnn.quantized-io.onnx"]),
    ("cnn.a16w8", ["quantize", f"{CNN}/model.onnx", "--calib", "{out}/cnn.calib.json", "--mode", "a16w8", "-o", "{out}/cnn.a16w8.onnx"]),
    ("cnn.dynamic", ["quantize", f"{CNN}/model.onnx", "--mode", "dynamic", "-o", "{out}/cnn.dynamic.onnx"]),
    ("cnn.fp16", ["quantize", f"{CNN}/model.onnx", "--mode", "fp16", "-o", "{out}/cnn.fp16.onnx"]),
    ("cnn.plan", ["plan", f"{CNN}/model.onnx", "--calib", "{out}/cnn.calib.json", "--exclude-ops", "Gemm", "-o", "{out}/cnn.plan.json"]),
    ("cnn.from-plan", ["quantize", f"{CNN}/model.onnx", "--plan", "{out}/cnn.plan.json", "-o", "{out}/cnn.from-plan.onnx"]),
    ("cnn.excluded", ["quantize", f"{CNN}/model.onnx", "--calib", "{out}/cnn.calib.json", "--exclude-nodes", "*conv2*",
                                "-o", "{out}/cnn.excluded.onnx"]),
    ("cnn.tune", ["quantize", f"{CNN}/model.onnx", "--data", f"{CNN}/calib.npy", "--eval-data", f"{CNN}/eval.npy", *TUNE,
                  "--write-plan", "{out}/cnn.tuned.plan.json", "-o", "{out}/cnn.tune.onnx"]),
    ("cnn.tune-holdout", ["quantize", f"{CNN}/model.onnx", "--data", f"{CNN}/calib.npy", *TUNE, "-o", "{out}/cnn.tune-holdout.onnx"]),
    ("cnn.tuned-plan", ["quantize", f"{CNN}/model.onnx", "--plan", "{out}/cnn.tuned.plan.json", "-o", "{out}/cnn.tuned-plan.onnx"]),
    ("qat.qoperator", ["quantize", f"{QAT}/model.onnx", "--format", "qoperator", "-o", "{out}/qat.qoperator.onnx"]),
    ("tt.int8-data", ["quantize", f"{TT}/model.onnx", "--data", f"{TT}/calib.npz", "-o", "{out}/tt.int8-data.onnx", "--no-latency"]),
    ("tt.calib", ["calibrate", f"{TT}/model.onnx", "--data", f"{TT}/calib.npz", "-o", "{out}/tt.calib.json"]),
    ("tt.int8-calib", ["quantize", f"{TT}/model.onnx", "--calib", "{out}/tt.calib.json", "-o", "{out}/tt.int8-calib.onnx"]),
    ("tt.a16w8", ["quantize", f"{TT}/model.onnx", "--calib", "{out}/tt.calib.json", "--mode", "a16w8", "-o", "{out}/tt.a16w8.onnx"]),
    ("tt.dynamic", ["quantize", f"{TT}/model.onnx", "--mode", "dynamic", "-o", "{out}/tt.dynamic.onnx"]),
    ("tt.fp16", ["quantize", f"{TT}/model.onnx", "--mode", "fp16", "-o", "{out}/tt.fp16.onnx"]),
    ("tt.int4-rtn", ["quantize", f"{TT}/model.onnx", "--mode", "int4", "--block-size", "16", "-o", "{out}/tt.int4-rtn.onnx"]),
    ("tt.int4-gptq", ["quantize", f"{TT}/model.onnx", "--mode", "int4", "--block-size", "16", "--data", f"{TT}/calib.npz",
                      "-o", "{out}/tt.int4-gptq.onnx", "--no-latency"]),
    ("tt.tune", ["quantize", f"{TT}/model.onnx", "--data", f"{TT}/calib.npz", "--eval-data", f"{TT}/eval.npz", *TUNE,
                 "-o", "{out}/tt.tune.onnx"]),
]


def bench_commands(scratch: Path) -> list[tuple[str, list[str]]]:
    """The PP-OCRv4 recognizer and detector (rapidocr wheel, cached) on rendered lines and pages."""
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from scripts.benchlib import ocr_recognizer, page_images, text_lines, wheel_models

    rec = ocr_recognizer()
    det = next(p for p in wheel_models("rapidocr-onnxruntime", "1.4.4", "*det*.onnx"))
    np.save(scratch / "lines.npy", text_lines(24, seed=3))
    np.save(scratch / "pages.npy", page_images(6, size=320, seed=3))
    lines, pages = str(scratch / "lines.npy"), str(scratch / "pages.npy")
    return [
        ("rec.int8-data", ["quantize", str(rec), "--data", lines, "-o", "{out}/rec.int8-data.onnx", "--no-latency", "--layer-samples", "0"]),
        ("rec.calib", ["calibrate", str(rec), "--data", lines, "-o", "{out}/rec.calib.json"]),
        ("rec.int8-calib", ["quantize", str(rec), "--calib", "{out}/rec.calib.json", "-o", "{out}/rec.int8-calib.onnx"]),
        ("rec.fp16", ["quantize", str(rec), "--mode", "fp16", "-o", "{out}/rec.fp16.onnx"]),
        ("rec.tune", ["quantize", str(rec), "--data", lines, "--tune", "--budget", "5trials", "--min-cosine", "0.99999",
                      "--no-latency", "--layer-samples", "0", "-o", "{out}/rec.tune.onnx"]),
        ("rec.rounding", ["quantize", str(rec), "--data", lines, "--rounding", "gptq", "--equalize", "--ranges", "output",
                          "-o", "{out}/rec.rounding.onnx", "--no-latency", "--layer-samples", "0"]),
        ("det.int8-data", ["quantize", str(det), "--data", pages, "-o", "{out}/det.int8-data.onnx", "--no-latency", "--layer-samples", "0"]),
        ("det.qoperator", ["quantize", str(det), "--data", pages, "--bias-correction", "off", "--format", "qoperator",
                           "-o", "{out}/det.qoperator.onnx", "--no-latency", "--layer-samples", "0"]),
    ]


CONTENTS = False  # --contents: hash what each file decides (see content_hash)


def content_hash(path: Path) -> str:
    """A model's graph without its metadata (which records the calibration file's identity), a plan without its
    "source", a calibration file's exact statistics (extremes, counts, moving averages) without its histograms and
    options: equal when a change altered how a file is made or recorded but nothing a quantized model depends on."""
    import onnx

    if path.suffix == ".onnx":
        m = onnx.load(str(path))
        del m.metadata_props[:]
        m.doc_string = ""
        return hashlib.sha256(m.SerializeToString(deterministic=True)).hexdigest()
    d = json.loads(path.read_text())
    if d.get("schema") == "qconv.calibration":
        keep = ("min", "max", "count", "nonfinite", "batches", "ema_min", "ema_max")
        d = {k: {f: t.get(f) for f in keep} for k, t in d["tensors"].items()}
    elif isinstance(d, dict):
        d = {k: v for k, v in d.items() if k != "source"}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def run_set(tree: Path, commands, label: str) -> dict[str, str]:
    """Run ``commands`` with ``tree``'s qconv; {name: sha256 of the model written, or "failed (exit N)"}."""
    out: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="qconv-hashes.") as tmp:
        # QCONV_KERNELS=none: a timed kernel table is this machine's measurement, not a function of the code (a fresh cache
        # would time each model again, and noise could choose other regions); the check compares what the code decides
        env = dict(os.environ, QCONV_CACHE_DIR=str(Path(tmp) / "cache"), PYTHONHASHSEED="0", QCONV_KERNELS="none")
        for name, args in commands:
            args = [a.replace("{out}", tmp) for a in args]
            if "--tune" in args:
                args += ["--report", f"{tmp}/{name}.report.json"]
            t0 = time.perf_counter()
            p = subprocess.run([sys.executable, "-m", "qconv", *args], cwd=tree, env=env, capture_output=True, text=True)
            written = next((Path(args[i + 1]) for i, a in enumerate(args) if a == "-o"), None)
            if p.returncode not in (0, 3):  # 3: a gate (tuning's targets) missed, the model is written
                out[name] = f"failed (exit {p.returncode}): {(p.stderr.strip().splitlines() or [''])[-1][:160]}"
            elif written is not None and written.suffix in (".onnx", ".json"):  # models, calibration files, plans
                out[name] = content_hash(written) if CONTENTS else hashlib.sha256(written.read_bytes()).hexdigest()
            else:
                out[name] = "ok"
            report = Path(tmp) / f"{name}.report.json"
            if "--tune" in args and report.exists():  # the search itself: every trial's label, scores and verdict
                t = json.loads(report.read_text())["tuning"]
                keep = [{k: x[k] for k in ("n", "step", "change", "cosine", "sqnr_db", "agreement", "accepted")} for x in t["trials"]]
                out[name + ":trials"] = hashlib.sha256(json.dumps([keep, t["changes"], t["method"]], sort_keys=True).encode()).hexdigest()
            print(f"  [{label}] {name:24s} {out[name][:16]}  {time.perf_counter() - t0:5.1f} s", file=sys.stderr, flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref", help="a commit to compare with (run in a temporary worktree)")
    ap.add_argument("--against", type=Path, help="a JSON of hashes kept by an earlier run")
    ap.add_argument("--json", type=Path, help="write this tree's hashes here")
    ap.add_argument("--bench", action="store_true", help="also the OCR bench models (downloaded into the bench cache)")
    ap.add_argument("--contents", action="store_true", help="hash what files decide, not how they are recorded (content_hash)")
    args = ap.parse_args()
    global CONTENTS
    CONTENTS = args.contents
    scratch = Path(tempfile.mkdtemp(prefix="qconv-hash-data."))
    commands = COMMANDS + (bench_commands(scratch) if args.bench else [])
    here = run_set(ROOT, commands, "this tree")
    if args.json:
        args.json.write_text(json.dumps(here, indent=1, sort_keys=True) + "\n")
    ref = None
    if args.ref:
        wt = Path(tempfile.mkdtemp(prefix="qconv-ref.")) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", str(wt), args.ref], cwd=ROOT, check=True, capture_output=True)
        try:
            ref = run_set(wt, commands, args.ref)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(wt)], cwd=ROOT, capture_output=True)
    elif args.against:
        ref = json.loads(args.against.read_text())
    if ref is None:
        print(json.dumps(here, indent=1, sort_keys=True))
        return 1 if any(v.startswith("failed") for v in here.values()) else 0
    differ = [n for n in here if n in ref and here[n] != ref[n]]
    for n in here:
        mark = "same" if n not in differ else "DIFFERS"
        print(f"{n:24s} {mark:8s} {here[n][:16]}  {ref.get(n, '-')[:16]}")
    print(f"{len(here) - len(differ)} of {len(here)} identical" + (f"; differ: {', '.join(differ)}" if differ else ""))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
