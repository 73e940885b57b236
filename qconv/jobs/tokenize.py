"""``qconv tokenize``: a text file as windows of token ids (a .npz that ``--data`` reads), with the model's tokenizer."""

from __future__ import annotations

import io as _bytes
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qconv import io
from qconv.data import load_tokenizer, token_windows
from qconv.errors import QconvError, UsageError

DEFAULT_SEQ_LEN = 128


@dataclass(kw_only=True)
class TokenizeJob:
    text: Path
    tokenizer: Path
    out: Path
    seq_len: int = DEFAULT_SEQ_LEN
    windows: int | None = None  # at most this many windows (default: as many as the text fills)
    input_name: str = "input_ids"

    def check(self) -> None:
        if self.seq_len < 2:
            raise UsageError(f"--seq-len must be at least 2 (got {self.seq_len})")
        if self.windows is not None and self.windows < 1:
            raise UsageError(f"--windows must be at least 1 (got {self.windows})")
        if self.out.suffix != ".npz":
            raise UsageError(f"-o {self.out}: the token ids are written as a .npz (keyed by input name): name it .npz")
        if not self.text.is_file():
            raise QconvError(f"text file not found: {self.text}")
        io.check_output_path(self.out, self.text, self.tokenizer)


def run_tokenize(job: TokenizeJob) -> dict:
    """Write ``job.out`` (``{input_name: int64 [windows, seq_len]}``); returns what was written."""
    job.check()
    tokenizer = load_tokenizer(job.tokenizer)
    try:
        text = job.text.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise QconvError(f"{job.text} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    ids = token_windows(text, tokenizer, job.seq_len, job.windows)
    buffer = _bytes.BytesIO()
    np.savez(buffer, **{job.input_name: ids})
    io.write_bytes(buffer.getvalue(), job.out)
    return {"output": str(job.out), "input": job.input_name, "windows": int(ids.shape[0]), "seq_len": int(ids.shape[1]),
            "tokens": int(ids.size), "vocabulary": int(tokenizer.get_vocab_size())}
