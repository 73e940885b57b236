"""Every operator test case of onnx's own suite (onnx.backend.test.case.node) through qconv, per mode.

Run from the repository root:

    .venv/bin/python scripts/sweep_onnx_cases.py [--modes int8 dynamic fp16 a16w8] [--pattern 'test_conv*'] [--json out.json]

For each case whose float model onnxruntime itself runs on the case's inputs, qconv quantizes it (the inputs as
calibration and evaluation data) and the result is classified:
  ok        exit 0: a model that passes onnx.checker, keeps the interface and ran in onnxruntime
  refused   a one-line QconvError naming the problem (not a failure: some models cannot be quantized)
  INTERNAL  any other exception, or "internal error" in a message: a defect to fix
Cases onnxruntime cannot run, or that have no float input, are skipped and counted. The exit code is 0 either way;
the summary lists every INTERNAL case with its first message line.
"""

from __future__ import annotations

import argparse
import collections
import fnmatch
import json
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qconv.errors import QconvError
from qconv.jobs import EvalOptions, PlanJob, QuantizeJob, run_quantize
from qconv.plan.config import QuantConfig
from scripts.benchlib import first_line, session


def cases(pattern: str):
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for case in collect_testcases(None):
            if fnmatch.fnmatch(case.name, pattern) and case.data_sets:
                yield case


def runnable(model: onnx.ModelProto, feed: dict) -> bool:
    try:
        session(model.SerializeToString(), 1).run(None, feed)
        return True
    except Exception:  # noqa: BLE001 - onnxruntime cannot run it: not qconv's to quantize
        return False


def one(case, mode: str, work: Path) -> tuple[str, str]:
    model = case.model
    names = [i.name for i in model.graph.input]
    feed = dict(zip(names, case.data_sets[0][0]))
    if not any(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in feed.values()):
        return "skipped", "no float32 input"
    if not all(isinstance(v, np.ndarray) for v in feed.values()) or not runnable(model, feed):
        return "skipped", "onnxruntime cannot run the float model (or a non-tensor input)"
    path, data = work / f"{case.name}.onnx", work / f"{case.name}.npz"
    onnx.save(model, path)
    np.savez(data, **{k: v[None] for k, v in feed.items()})  # one stacked feed each
    config = QuantConfig(mode=mode)
    plan = PlanJob(model=path, config=config, data=data if config.needs_calibration else None)
    job = QuantizeJob(out=work / f"{case.name}.{mode}.q.onnx", planning=plan, evaluation=EvalOptions(data=data, latency=False, layer_samples=0, threads=1))
    try:
        run_quantize(job)
    except QconvError as exc:
        return ("INTERNAL" if "internal error" in str(exc) else "refused"), first_line(exc)
    except Exception as exc:  # noqa: BLE001 - what the sweep is for
        return "INTERNAL", f"{type(exc).__name__}: {first_line(exc)}"
    return "ok", ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", nargs="*", default=["int8", "dynamic", "fp16", "a16w8"])
    ap.add_argument("--pattern", default="test_*")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import onnxruntime as ort

    ort.set_default_logger_severity(4)
    results: dict = {m: {} for m in args.modes}
    with tempfile.TemporaryDirectory(prefix="sweep.") as tmp:
        work = Path(tmp)
        for case in cases(args.pattern):
            for mode in args.modes:
                results[mode][case.name] = one(case, mode, work)
            for f in work.iterdir():
                f.unlink()
    for mode, res in results.items():
        counts = collections.Counter(status for status, _ in res.values())
        print(f"{mode}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        for name, (status, msg) in sorted(res.items()):
            if status == "INTERNAL":
                print(f"  INTERNAL {name}: {msg}")
        reasons = collections.Counter(msg.split(":")[0][:90] for status, msg in res.values() if status == "refused")
        for msg, n in reasons.most_common(8):
            print(f"  refused x{n}: {msg}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
