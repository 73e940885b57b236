"""Every qconv mode against its onnxruntime counterpart on the sample models (a benchmark, not a test).

Run from the repository root:

    /tmp/ci-venv/bin/python scripts/bench_modes.py [--models 'tiny*'] [--rows int8 fp16] [--json out.json]

Models: every sample_models/*/ folder with model.onnx, calib.np[yz], eval.np[yz] and eval_labels.npy.
Rows (qconv, through qconv.jobs.run_quantize with --batch-size 32, vs onnxruntime 1.31's own tool):
  int8        --mode int8 (QDQ)            vs quantize_static(QDQ, per_channel, QUInt8 act., QInt8 weights, MinMax)
  int8-qop    --mode int8 --format qoperator vs the same quantize_static with QuantFormat.QOperator
  dynamic     --mode dynamic               vs quantize_dynamic() with its default options
  dynamic-pc  --mode dynamic               vs quantize_dynamic(per_channel=True)
  fp16        --mode fp16                  vs onnxruntime.transformers.float16.convert_float_to_float16(keep_io_types=True)
  a16w8       --mode a16w8                 vs quantize_static(QDQ, per_channel, QUInt16 act., QInt8 weights); onnxruntime
              raises the model to opset 21 for 16-bit types (native Q/DQ), so UseQDQContribOps is only tried as a fallback
  int4-rtn    --mode int4 (no data: RTN)   vs MatMulNBitsQuantizer(block_size=32, is_symmetric=True), default algorithm (RTN)
  int4-gptq   --mode int4 --data calib (GPTQ) vs the same MatMulNBitsQuantizer
  int4-*/mm   the same, with every Gather node named in exclude_nodes: qconv's int4 also quantizes embedding
              tables (Gather), MatMulNBitsQuantizer by default only MatMuls; /mm compares the same scope
Calibrated tools get the calibration data in batches of 32. Any failure of a tool is a result (status FAIL), as
is a model that will not load or run (NORUN). onnxruntime's MatMulNBitsQuantizer imports onnx_ir (which needs
sympy); neither is a qconv dependency, so without them the int4 ort column reads FAIL with the import error.

Measured in this process with the same code for every output (bench_quality's): the original fp32 model and
each output run through onnxruntime CPU (--threads intra-op threads) on the eval data in batches of 32: cosine
and SQNR of the first output vs fp32 over all rows, top-1 vs eval_labels, size on disk (original file /
output file), and latency vs fp32 as the median over interleaved runs on one eval batch (all of one model's
outputs and its fp32 reference in one loop, the order rotating each round, on sessions whose idle threads do
not spin: with a dozen sessions on two cores, spinning threads made every timing 3-4x slower and noisy).
For int4, also the bytes of MatMul weights before and after: float initializers read as a MatMul's B, plus a
MatMulNBits' B, scales and zero points, plus a DequantizeLinear's inputs where a MatMul reads B through one.
For fp16, also float initializer bytes before / after. qconv's own report numbers (from run_quantize) are
cross-checked against this evaluation; disagreements are printed as notes.
Then a "targets" section marks each goal from the issue PASS/FAIL; the exit code is 0 either way.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxruntime.quantization import (
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)

from qconv.data import FeedSource
from qconv.jobs import CalibOptions, EvalOptions, PlanJob, QuantizeJob, run_quantize
from qconv.plan.config import QuantConfig
from scripts.benchlib import (
    Reader,
    check,
    fidelity,
    first_line,
    fmt,
    graph_specs,
    latencies,
    sample_cases,
    session,
)

BATCH = 32


# ---- the tools --------------------------------------------------------------------------------

def batches(model: Path, data: Path) -> FeedSource:
    return FeedSource(data, graph_specs(model), batch_size=BATCH)


def qconv_tool(settings: dict, calibrated: bool, matmul_only: bool = False):
    """A qconv run: returns the report run_quantize builds (evaluated on the eval data, no latency).
    ``matmul_only`` keeps every Gather float by naming its nodes in exclude_nodes (--exclude-ops is ignored
    by --mode int4), which makes int4 the same scope as MatMulNBitsQuantizer's default."""
    def run(case, out: Path) -> dict:
        extra = {}
        if matmul_only:
            gathers = [n.name for n in onnx.load(str(case.model), load_external_data=False).graph.node if n.op_type == "Gather"]
            extra["exclude_nodes"] = tuple(gathers)
        config = QuantConfig(**{**settings, **extra})
        plan = PlanJob(model=case.model, config=config, data=case.calib if calibrated else None,
                       calib_options=CalibOptions(batch_size=BATCH))
        job = QuantizeJob(out=out, planning=plan, evaluation=EvalOptions(data=case.eval, labels=case.labels, latency=False))
        report, _ = run_quantize(job)
        return report
    return run


def ort_static(fmt_: QuantFormat, activation: QuantType):
    def run(case, out: Path) -> dict:
        def go(extra):
            quantize_static(str(case.model), str(out), Reader(batches(case.model, case.calib)), quant_format=fmt_,
                            per_channel=True, activation_type=activation, weight_type=QuantType.QInt8, extra_options=extra)
        try:
            go({})
            return {}
        except Exception as exc:
            if activation != QuantType.QUInt16:
                raise
            go({"UseQDQContribOps": True})
            return {"note": f"needed UseQDQContribOps (plain: {first_line(exc)})"}
    return run


def ort_dynamic(per_channel: bool):
    def run(case, out: Path) -> dict:
        quantize_dynamic(str(case.model), str(out), per_channel=per_channel)
        return {}
    return run


def ort_fp16(case, out: Path) -> dict:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    onnx.save(convert_float_to_float16(onnx.load(str(case.model)), keep_io_types=True), str(out))
    return {}


def ort_int4(case, out: Path) -> dict:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(onnx.load(str(case.model)), block_size=32, is_symmetric=True)
    q.process()
    q.model.save_model_to_file(str(out), False)
    return {}


# tool key -> (function, description); rows pair a qconv tool with an onnxruntime one
TOOLS = {
    "q:int8": qconv_tool({"mode": "int8"}, True),
    "q:int8-qop": qconv_tool({"mode": "int8", "format": "qoperator"}, True),
    "q:dynamic": qconv_tool({"mode": "dynamic"}, False),
    "q:fp16": qconv_tool({"mode": "fp16"}, False),
    "q:a16w8": qconv_tool({"mode": "a16w8"}, True),
    "q:int4-rtn": qconv_tool({"mode": "int4", "int4_method": "rtn", "block_size": 32}, False),
    "q:int4-gptq": qconv_tool({"mode": "int4", "int4_method": "gptq", "block_size": 32}, True),
    "q:int4-rtn/mm": qconv_tool({"mode": "int4", "int4_method": "rtn", "block_size": 32}, False, matmul_only=True),
    "q:int4-gptq/mm": qconv_tool({"mode": "int4", "int4_method": "gptq", "block_size": 32}, True, matmul_only=True),
    "o:static-qdq": ort_static(QuantFormat.QDQ, QuantType.QUInt8),
    "o:static-qop": ort_static(QuantFormat.QOperator, QuantType.QUInt8),
    "o:dynamic": ort_dynamic(False),
    "o:dynamic-pc": ort_dynamic(True),
    "o:fp16": ort_fp16,
    "o:a16w8": ort_static(QuantFormat.QDQ, QuantType.QUInt16),
    "o:int4": ort_int4,
}
ROWS = {  # row -> (qconv tool, onnxruntime tool)
    "int8": ("q:int8", "o:static-qdq"),
    "int8-qop": ("q:int8-qop", "o:static-qop"),
    "dynamic": ("q:dynamic", "o:dynamic"),
    "dynamic-pc": ("q:dynamic", "o:dynamic-pc"),
    "fp16": ("q:fp16", "o:fp16"),
    "a16w8": ("q:a16w8", "o:a16w8"),
    "int4-rtn": ("q:int4-rtn", "o:int4"),
    "int4-gptq": ("q:int4-gptq", "o:int4"),
    "int4-rtn/mm": ("q:int4-rtn/mm", "o:int4"),
    "int4-gptq/mm": ("q:int4-gptq/mm", "o:int4"),
}


# ---- measurements ---------------------------------------------------------------------------------

def latency_session(path: Path, threads: int) -> ort.InferenceSession:
    """As bench_quality.session, but idle intra-op threads do not spin: with one session per output interleaved
    on a 2-core machine, the threads of the session that just ran would spin on the cores the next one needs
    (measured: the fp32 transformer batch took 10-11 ms interleaved with 5 spinning sessions, 2.9 ms without)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def matmul_weight_bytes(path: Path) -> dict:
    """Bytes holding MatMul weights (see the module docstring), and how many MatMuls have a constant weight."""
    m = onnx.load(str(path))
    inits = {t.name: t for t in m.graph.initializer}
    producer = {o: n for n in m.graph.node for o in n.output}

    def nbytes(name: str) -> int:
        return numpy_helper.to_array(inits[name]).nbytes if name in inits else 0

    total = count = nbits = 0
    for n in m.graph.node:
        if n.op_type == "MatMul" and len(n.input) > 1:
            b = n.input[1]
            if b in inits:
                total, count = total + nbytes(b), count + 1
            elif b in producer and producer[b].op_type == "DequantizeLinear" and producer[b].input[0] in inits:
                total, count = total + sum(nbytes(i) for i in producer[b].input), count + 1
        elif n.op_type == "MatMulNBits":
            total, count, nbits = total + sum(nbytes(i) for i in n.input[1:4]), count + 1, nbits + 1
    return {"bytes": total, "matmuls": count, "matmulnbits": nbits}


@dataclass
class Result:
    status: str = "ok"  # ok | FAIL (the tool raised) | NORUN (its model will not load or run)
    error: str = ""
    wall_s: float | None = None
    info: dict = field(default_factory=dict)  # what the tool returned (qconv: its report)
    metrics: dict = field(default_factory=dict)


def bench(case, rows: list[str], threads: int, runs: int) -> dict:
    tools = sorted({t for r in rows for t in ROWS[r]})
    results = {t: Result() for t in tools}
    with tempfile.TemporaryDirectory(prefix="bench_modes.", dir="/tmp") as tmp:
        outs = {}
        for t in tools:
            out = Path(tmp) / f"{t.replace(':', '_').replace('/', '_')}.onnx"
            t0 = time.perf_counter()
            try:
                results[t].info = TOOLS[t](case, out) or {}
            except Exception as exc:  # noqa: BLE001 - any failure of a tool is a result
                results[t].status, results[t].error = "FAIL", f"{type(exc).__name__}: {first_line(exc)}"
                continue
            results[t].wall_s = time.perf_counter() - t0
            outs[t] = out
        fp32 = evaluate(case, outs, results, threads, runs)
    return {"fp32": fp32, "tools": results}


def evaluate(case, outs: dict[str, Path], results: dict[str, Result], threads: int, runs: int) -> dict:
    """The same code for every model: fidelity and top-1 on the eval data, size on disk, interleaved latency."""
    labels = np.load(case.labels).reshape(-1)
    source = batches(case.model, case.eval)
    ref = session(case.model, threads)
    names = [o.name for o in ref.get_outputs()]
    reference = [ref.run(names, feed) for feed in source]
    size = case.model.stat().st_size
    fp32 = {"bytes": size, "top1": fidelity(ref, names, reference, source, labels)["top1"],
            "weight_bytes": float_weight_bytes(case.model), "matmul_weights": matmul_weight_bytes(case.model)}
    timed = {"fp32": case.model}
    for t, out in outs.items():
        r = results[t]
        try:
            r.metrics.update(fidelity(session(out, threads), names, reference, source, labels))
        except Exception as exc:  # noqa: BLE001 - a model that will not load or run is a result
            r.status, r.error = "NORUN", f"{type(exc).__name__}: {first_line(exc)}"
            continue
        timed[t] = out
        r.metrics.update(bytes=out.stat().st_size, size_ratio=size / out.stat().st_size)
        if "fp16" in t:
            r.metrics["float_weight_shrink"] = fp32["weight_bytes"] / max(1, float_weight_bytes(out))
        if "int4" in t:
            mw = matmul_weight_bytes(out)
            r.metrics["matmul_weights"] = {**mw, "shrink": fp32["matmul_weights"]["bytes"] / mw["bytes"] if mw["bytes"] else None}
    del ref
    ms = latencies({t: latency_session(p, threads) for t, p in timed.items()}, next(iter(source)), runs)
    fp32["latency_ms"] = ms["fp32"]
    for t in timed.keys() - {"fp32"}:
        results[t].metrics.update(latency_ms=ms[t], latency_ratio=ms[t] / ms["fp32"])
    return fp32


# ---- report -------------------------------------------------------------------------------------

def table(done: dict, rows: list[str]) -> str:
    head = ["model", "mode", "status q/ort", "cosine q/ort", "SQNR dB q/ort", "top-1 % fp32|q/ort", "size x q/ort",
            "latency x q/ort"]
    lines = [head]
    for name, b in done.items():
        for row in rows:
            q, o = (b["tools"][t] for t in ROWS[row])

            def cell(key, spec, pair=(q, o)):
                return "/".join(fmt(r.metrics.get(key), spec) for r in pair)
            lines.append([name, row, f"{q.status}/{o.status}", cell("cosine", ".5f"), cell("sqnr_db", ".1f"),
                          f"{b['fp32']['top1']:.1f}|{cell('top1', '.1f')}", cell("size_ratio", ".2f"), cell("latency_ratio", ".2f")])
    widths = [max(len(r[k]) for r in lines) for k in range(len(head))]
    out = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in lines]
    return "\n".join([out[0], "-" * len(out[0])] + out[1:])


def int4_table(done: dict) -> str:
    head = ["model", "tool", "MatMuls with const weight", "MatMulNBits", "weight bytes fp32 -> after", "shrink x",
            "qconv report: int4 weights (MatMul)"]
    lines = [head]
    for name, b in done.items():
        before = b["fp32"]["matmul_weights"]
        for t in ("q:int4-rtn", "q:int4-gptq", "q:int4-rtn/mm", "q:int4-gptq/mm", "o:int4"):
            r = b["tools"].get(t)
            if r is None:
                continue
            mw = r.metrics.get("matmul_weights")
            listed = ""
            if t.startswith("q:") and r.status == "ok":
                w = r.info.get("int4", {}).get("weights", [])
                listed = f"{len(w)} ({sum(1 for x in w if x.get('op_type') == 'MatMul')})"
            if mw is None:
                lines.append([name, t, str(before["matmuls"]), "-", f"{before['bytes']:,} -> -", "-", r.status])
                continue
            lines.append([name, t, f"{before['matmuls']} -> {mw['matmuls']}", str(mw["matmulnbits"]),
                          f"{before['bytes']:,} -> {mw['bytes']:,}", fmt(mw["shrink"], ".2f"), listed])
    widths = [max(len(r[k]) for r in lines) for k in range(len(head))]
    out = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in lines]
    return "\n".join([out[0], "-" * len(out[0])] + out[1:])


def notes(done: dict) -> list[str]:
    out = []
    for name, b in done.items():
        for t, r in sorted(b["tools"].items()):
            if r.status != "ok":
                out.append(f"{name} {t}: {r.status}: {r.error}")
            if r.info.get("note"):
                out.append(f"{name} {t}: {r.info['note']}")
            rep = r.info if t.startswith("q:") and r.status == "ok" else None
            if rep:  # qconv's own numbers vs this script's evaluation of the file it wrote
                own = next(iter(rep.get("outputs", {}).values()), {}).get("cosine")
                mine = r.metrics.get("cosine")
                if own is not None and mine is not None and abs(own - mine) > 1e-4:
                    out.append(f"{name} {t}: qconv's report says cosine {own:.5f}, this evaluation {mine:.5f}")
                task = rep.get("task", {})
                if "quantized" in task and r.metrics.get("top1") is not None and abs(100 * task["quantized"] - r.metrics["top1"]) > 1e-6:
                    out.append(f"{name} {t}: qconv's report says top-1 {100 * task['quantized']:.2f}%, this evaluation {r.metrics['top1']:.2f}%")
                if "int4" in t and rep.get("int4", {}).get("method") != t.split("-")[-1].split("/")[0]:
                    out.append(f"{name} {t}: qconv used int4 method {rep.get('int4', {}).get('method')}")
    return out


def targets(done: dict) -> list[str]:
    def get(model_glob, tool):
        return [(n, b["tools"][tool], b["fp32"]) for n, b in done.items() if fnmatch.fnmatch(n, model_glob) and tool in b["tools"]]

    def ok(r):
        return r.status == "ok" and "latency_ratio" in r.metrics

    out = []
    fp16 = get("*", "q:fp16")
    if fp16:
        parts = []
        for n, r, f in fp16:
            if ok(r):
                floor = f["bytes"] / (f["bytes"] - f["weight_bytes"] / 2) if "weight_bytes" in f else None
                parts.append(f"{n} {r.metrics['size_ratio']:.2f}x cosine {r.metrics['cosine']:.6f}"
                             + (f" (halving only the original's float initializers gives {floor:.2f}x)" if floor else ""))
            else:
                parts.append(f"{n} {r.status}")
        passed = all(ok(r) and r.metrics["size_ratio"] >= 2.0 and r.metrics["cosine"] >= 0.9999 for _, r, _ in fp16)
        out.append(check("fp16 2.0x smaller on disk with cosine >= 0.9999", passed, "; ".join(parts)))
        parts, passes = [], []
        for n, r, f in fp16:
            if ok(r):
                w = r.metrics["float_weight_shrink"]
                passes.append(w >= 1.99 and r.metrics["cosine"] >= 0.9999)
                parts.append(f"{n} {w:.3f}x")
        out.append(check("fp16 float weight bytes 2.0x smaller (>= 1.99x) with cosine >= 0.9999",
                         all(passes) if passes and len(passes) == len(fp16) else (None if not fp16 else False), "; ".join(parts)))
    for tool in ("q:int4-rtn", "q:int4-gptq"):
        rows = get("*transformer*", tool)
        if not rows:
            out.append(check(f"int4 ({tool[7:]}) >= 6x smaller MatMul weights, cosine >= 0.98 on the transformer", None, "not run"))
            continue
        n, r, _ = rows[0]
        if ok(r):
            s, c = r.metrics["matmul_weights"]["shrink"], r.metrics["cosine"]
            out.append(check(f"int4 ({tool[7:]}) >= 6x smaller MatMul weights, cosine >= 0.98 on the transformer",
                             s >= 6.0 and c >= 0.98, f"{n} {s:.2f}x, cosine {c:.5f}"))
        else:
            out.append(check(f"int4 ({tool[7:]}) >= 6x smaller MatMul weights, cosine >= 0.98 on the transformer", False, f"{n} {r.status}"))
    rows = get("*transformer*", "q:dynamic")
    if rows:
        n, r, f = rows[0]
        detail = (f"{n} latency {r.metrics['latency_ratio']:.2f}x fp32 ({r.metrics['latency_ms']:.3f} vs {f['latency_ms']:.3f} ms)"
                  if ok(r) else f"{n} {r.status}")
        out.append(check("dynamic faster than fp32 on the transformer (latency ratio < 1)", ok(r) and r.metrics["latency_ratio"] < 1.0, detail))
    else:
        out.append(check("dynamic faster than fp32 on the transformer (latency ratio < 1)", None, "not run"))
    rows = get("digits*", "q:a16w8")
    if rows:
        n, r, f = rows[0]
        drop = f["top1"] - r.metrics["top1"] if ok(r) else None
        out.append(check("a16w8 within 0.1 point of fp32 top-1 on the CNN", ok(r) and drop <= 0.1,
                         f"{n} fp32 {f['top1']:.2f}% a16w8 {r.metrics['top1']:.2f}% (drop {drop:+.2f})" if ok(r) else f"{n} {r.status}"))
    else:
        out.append(check("a16w8 within 0.1 point of fp32 top-1 on the CNN", None, "not run"))
    return out


def float_weight_bytes(path: Path) -> int:
    """Bytes of floating-point initializers (float32, float16, ...)."""
    m = onnx.load(str(path))
    return sum(numpy_helper.to_array(t).nbytes for t in m.graph.initializer
               if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="*", help="fnmatch pattern on sample model names, e.g. 'tiny*'")
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS), help="rows to run (default: all)")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads for evaluation and latency (default 2)")
    ap.add_argument("--runs", type=int, default=300, help="interleaved latency rounds per model (default 300, 60 s budget)")
    ap.add_argument("--json", type=Path, help="write every number to this JSON file")
    args = ap.parse_args()
    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime.quantization warns through the root logger
    start = time.perf_counter()
    done = {}
    for case in sample_cases():
        if not fnmatch.fnmatch(case.name, args.models):
            continue
        t0 = time.perf_counter()
        done[case.name] = bench(case, args.rows, args.threads, args.runs)
        print(f"  {case.name}: {time.perf_counter() - t0:.0f} s", flush=True)
    print()
    print(table(done, args.rows))
    print("\nq = qconv, ort = onnxruntime (see the module docstring for each row's pair); size x = original file / output file;"
          "\nlatency x = median ms / fp32 median ms on one eval batch of 32, interleaved; FAIL = tool raised, NORUN = output will not run")
    if any("int4" in r for r in args.rows):
        print("\nint4 MatMul weights (bytes holding MatMul B operands, before -> after):")
        print(int4_table(done))
    print("\n".join(["", "notes:"] + [f"  {n}" for n in notes(done)]))
    print("\n".join(["", "targets (qconv):"] + [f"  {t}" for t in targets(done)]))
    print(f"\ntotal wall time {time.perf_counter() - start:.0f} s; threads {args.threads}; latency = median of interleaved runs")
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "batch_size": BATCH, "rows": {r: ROWS[r] for r in args.rows}, "models": {
            n: {"fp32": b["fp32"], "tools": {t: {"status": r.status, "error": r.error, "wall_s": r.wall_s, "metrics": r.metrics,
                                                 "qconv_report": {k: r.info.get(k) for k in ("size_bytes", "outputs", "task", "int4", "fp16")}
                                                 if t.startswith("q:") else r.info}
                                             for t, r in b["tools"].items()}}
            for n, b in done.items()}}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
