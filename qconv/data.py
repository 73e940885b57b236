"""Feeds for a model from .npy, .npz or a folder of them, streamed one batch at a time.

Rules (also in the README):
- ``.npy``: for a model with exactly one input. ``.npz``: arrays keyed by input name. A folder: every
  ``.npy``/``.npz`` file in it, in name order, each read by the same rules.
- An array whose rank is the input's rank + 1 is a stack of feeds: ``a[k]`` is feed ``k``.
- An array whose rank equals the input's is split along axis 0 into batches of ``--batch-size`` (a fixed
  batch dimension in the model wins).
- A 0-d array (say, a sample rate) goes unchanged to every feed.
- Decoders: a file of token ids alone feeds a model with a KV cache. A missing float input whose name has
  ``past`` or ``cache`` in it is fed empty (length 0 on its one dynamic axis that no given input shares: the
  prompt step), a missing ``attention_mask`` as ones, a missing ``position_ids`` as 0..seq-1 and a missing
  ``token_type_ids`` as zeros (one segment, as BERT-style encoders default to), all shaped like ``input_ids``.
- Text: ``token_windows`` turns a text file into windows of token ids with a tokenizer the user names (``qconv
  tokenize``); a .txt given as data is refused with that command in the message.
Arrays are cast to the input's type when that loses nothing (float64 -> float32, int32 -> int64); NaN or
Inf in a float feed is an error.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from qconv.errors import QconvError, UsageError

_ONNX_TO_NP = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(uint16)": np.uint16, "tensor(bool)": np.bool_,
}


@dataclass(frozen=True)
class InputSpec:
    """A model input as onnxruntime reports it: name, numpy dtype, shape (None or a str for dynamic)."""

    name: str
    dtype: np.dtype
    shape: tuple

    @property
    def rank(self) -> int:
        return len(self.shape)

    @classmethod
    def from_value_info(cls, vi) -> "InputSpec":
        """From a graph input: dims are ints, dim_param strings, or None when unknown."""
        import onnx

        t = vi.type.tensor_type
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type))
        except (KeyError, TypeError):
            raise QconvError(f"input '{vi.name}' has an element type qconv cannot feed from numpy files") from None
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim)
        return cls(vi.name, dtype, dims)

    @classmethod
    def from_ort(cls, arg) -> "InputSpec":
        if arg.type not in _ONNX_TO_NP:
            raise QconvError(f"input '{arg.name}' has type {arg.type}, which qconv cannot feed from numpy files")
        return cls(arg.name, np.dtype(_ONNX_TO_NP[arg.type]), tuple(arg.shape))


def _files(path: Path) -> list[Path]:
    if not path.exists():
        raise QconvError(f"data not found: {path}")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".npy", ".npz"))
        if not files:
            raise QconvError(f"data folder has no .npy or .npz files: {path}")
        return files
    if path.suffix in (".txt", ".text", ".md", ".jsonl"):
        raise QconvError(f"{path} is text: turn it into token ids first with the model's tokenizer, e.g. qconv tokenize "
                         f"{path} --tokenizer tokenizer.json -o {path.with_suffix('.npz').name}, then --data that file")
    if path.suffix not in (".npy", ".npz"):
        raise QconvError(f"data must be a .npy file, a .npz file or a folder of them: {path}")
    return [path]


class NpyRows:
    """A .npy file read row block by row block (axis 0) with plain reads: unlike a memory map, the
    pages read do not stay resident, so memory stays flat however large the file is."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            self._read_header(f)

    def _read_header(self, f) -> None:
        """Shape, dtype and data offset from an open .npy stream; refuses what cannot be streamed."""
        major, _ = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        self.shape, fortran, self.dtype = read(f)
        self.offset = f.tell()
        if fortran or self.dtype.hasobject:
            raise ValueError("Fortran-ordered or object arrays are not streamed")
        self.ndim = len(self.shape)
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize if self.ndim else self.dtype.itemsize

    def _rows(self, start: int, stop: int) -> np.ndarray:
        stop = min(stop, self.shape[0])
        count = max(stop - start, 0)
        with open(self.path, "rb") as f:
            f.seek(self.offset + start * self.row_bytes)
            raw = f.read(count * self.row_bytes)
        if len(raw) != count * self.row_bytes:
            raise QconvError(f"cannot read data file {self.path}: it is shorter than its header says (truncated?)")
        return np.frombuffer(raw, dtype=self.dtype).reshape((count, *self.shape[1:]))

    def __getitem__(self, key):
        if isinstance(key, slice) and key.step in (None, 1):
            return self._rows(key.start or 0, self.shape[0] if key.stop is None else key.stop)
        if isinstance(key, (int, np.integer)):
            return self._rows(int(key), int(key) + 1)[0]
        raise TypeError("NpyRows supports an index or a contiguous slice along axis 0")

    def __array__(self, dtype=None, copy=None):
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            a = np.frombuffer(f.read(), dtype=self.dtype).reshape(self.shape)
        return a.astype(dtype) if dtype is not None else a


class NpzRows(NpyRows):
    """One array of a .npz (stored or deflated) read row block by row block: the member is decompressed as a
    stream, forward from where the last read stopped, so memory stays flat however large the array is."""

    def __init__(self, path: Path, member: str):
        self.path, self.member = path, member
        self._zip = zipfile.ZipFile(path)
        self._fh = None
        with self._zip.open(member) as f:
            self._read_header(f)
        self._pos = None

    def _rows(self, start: int, stop: int) -> np.ndarray:
        stop = min(stop, self.shape[0])
        count = max(stop - start, 0)
        at = self.offset + start * self.row_bytes
        if self._fh is None or self._pos is None or at < self._pos:
            if self._fh is not None:
                self._fh.close()
            self._fh, self._pos = self._zip.open(self.member), 0
        while self._pos < at:  # skip forward (a deflated stream cannot seek)
            skipped = len(self._fh.read(min(at - self._pos, 1 << 22)))
            if not skipped:
                break
            self._pos += skipped
        raw = self._fh.read(count * self.row_bytes)
        self._pos += len(raw)
        if len(raw) != count * self.row_bytes:
            raise QconvError(f"cannot read data file {self.path}: '{self.member}' is shorter than its header says (truncated?)")
        return np.frombuffer(raw, dtype=self.dtype).reshape((count, *self.shape[1:]))

    def __array__(self, dtype=None, copy=None):
        with self._zip.open(self.member) as f:
            f.read(self.offset)
            a = np.frombuffer(f.read(), dtype=self.dtype).reshape(self.shape)
        return a.astype(dtype) if dtype is not None else a


def _npz_arrays(path: Path) -> dict:
    """The arrays of a .npz: streamed row blocks where possible (rank >= 1), else loaded (scalars, objects)."""
    out = {}
    with zipfile.ZipFile(path) as z:
        members = [n for n in z.namelist() if n.endswith(".npy")]
    loaded = None
    for member in members:
        name = member[:-4]
        try:
            rows = NpzRows(path, member)
            if rows.ndim:
                out[name] = rows
                continue
        except ValueError:
            pass
        if loaded is None:
            loaded = np.load(path, allow_pickle=False)
        out[name] = loaded[name]
    return out


def _open(path: Path, specs: list[InputSpec]) -> dict[str, np.ndarray]:
    try:
        if path.suffix == ".npy":
            if len(specs) != 1:
                names = ", ".join(s.name for s in specs)
                raise QconvError(f"{path.name}: a .npy file feeds a single-input model; this model has inputs {names}: use a .npz keyed by input name")
            try:
                rows = NpyRows(path)
                return {specs[0].name: rows if rows.ndim else np.load(path, allow_pickle=False)}
            except ValueError:
                return {specs[0].name: np.load(path, mmap_mode="r", allow_pickle=False)}
        arrays = _npz_arrays(path)
    except QconvError:
        raise
    except Exception as exc:  # noqa: BLE001 - numpy raises many types for broken files
        raise QconvError(f"cannot read data file {path} (truncated or not numpy?): {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    wanted = {s.name for s in specs}
    missing = sorted(wanted - set(arrays) - {s.name for s in derivable(specs, set(arrays))})
    extra = sorted(set(arrays) - wanted)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing)}")
        if extra:
            parts.append(f"unknown {', '.join(extra)}")
        raise QconvError(f"{path.name}: keys do not match the model inputs ({'; '.join(parts)}); model inputs are {', '.join(sorted(wanted))}")
    return arrays


_DERIVED_NAMES = ("attention_mask", "position_ids", "token_type_ids")


def is_cache_name(name: str) -> bool:
    """A KV-cache tensor by its name (``past_key_values.0.key``, ``present.3.value``, ``cache_k``...)."""
    lowered = name.lower()
    return any(word in lowered for word in ("past", "present", "cache"))


def derivable(specs: list[InputSpec], given: set[str]) -> list[InputSpec]:
    """The inputs a decoder's prompt step can do without (see the module docstring), when not in ``given``."""
    names = {s.name for s in specs}
    out = []
    for s in specs:
        if s.name in given:
            continue
        if s.name in _DERIVED_NAMES and "input_ids" in given and "input_ids" in names and s.dtype.kind in "iu":
            out.append(s)
        elif s.dtype.kind == "f" and s.rank >= 2 and is_cache_name(s.name):
            out.append(s)
    return out


def _derived(spec: InputSpec, feed: dict[str, np.ndarray], specs: list[InputSpec], where: str) -> np.ndarray:
    """The value of a derivable input for this feed of the given inputs."""
    if spec.name in _DERIVED_NAMES:
        ids = feed["input_ids"]
        if spec.name == "attention_mask":
            return np.ones(ids.shape, dtype=spec.dtype)
        if spec.name == "token_type_ids":
            return np.zeros(ids.shape, dtype=spec.dtype)
        return np.broadcast_to(np.arange(ids.shape[-1], dtype=spec.dtype), ids.shape).copy()
    sizes = {}  # dim symbol -> size, from the inputs this feed gives
    for s in specs:
        if s.name in feed:
            for want, got in zip(s.shape, feed[s.name].shape):
                if isinstance(want, str):
                    sizes.setdefault(want, got)
    rows = _rows(feed, [s for s in specs if s.name in feed])
    dims, free = [], []
    for axis, want in enumerate(spec.shape):
        if isinstance(want, int) and want > 0:
            dims.append(want)
        elif isinstance(want, str) and want in sizes:
            dims.append(sizes[want])
        elif axis == 0:
            dims.append(rows)
        else:
            dims.append(0)
            free.append(axis)
    if len(free) != 1:
        raise QconvError(f"{where}: input '{spec.name}' (shape {list(spec.shape)}) is not in the data and qconv cannot "
                         "tell its cache axis: add it to the data file")
    return np.zeros(dims, dtype=spec.dtype)


def complete(feed: dict[str, np.ndarray], specs: list[InputSpec], where: str) -> dict[str, np.ndarray]:
    """``feed`` with the derivable inputs it lacks added (a decoder's empty cache, mask and positions)."""
    given = dict(feed)
    for spec in derivable(specs, set(given)):
        feed[spec.name] = _derived(spec, given, specs, where)
    return feed


def _cast(a: np.ndarray, spec: InputSpec, where: str, cast: bool = False) -> np.ndarray:
    """The array in the input's dtype when that loses nothing (float64 -> float32, int32 -> int64). Integer or
    bool data for a float input is refused (un-normalized uint8 pixels are the classic calibration mistake)
    unless ``cast`` (``--cast-data``) says the values are meant as they are."""
    if a.dtype == spec.dtype:
        return a
    same_kind = (a.dtype.kind == spec.dtype.kind) or (a.dtype.kind in "iu" and spec.dtype.kind in "iu")
    if a.dtype.kind in "iub" and spec.dtype.kind == "f" and not cast:
        raise QconvError(f"{where}: input '{spec.name}' expects {spec.dtype} but the data is {a.dtype} (integer pixels "
                         f"not yet normalized?): convert and scale it the way the model was trained, or pass --cast-data "
                         "to use the values as they are")
    if not same_kind and not (cast and a.dtype.kind in "iub" and spec.dtype.kind == "f"):
        raise QconvError(f"{where}: input '{spec.name}' expects {spec.dtype} but the data is {a.dtype}; convert it with astype")
    return a.astype(spec.dtype)


def _check_shape(a: np.ndarray, spec: InputSpec, where: str) -> None:
    if a.ndim != spec.rank:
        raise QconvError(f"{where}: input '{spec.name}' has rank {spec.rank} but a feed has rank {a.ndim} (shape {a.shape})")
    for k, (d, want) in enumerate(zip(a.shape, spec.shape)):
        if isinstance(want, int) and want > 0 and d != want:
            raise QconvError(f"{where}: input '{spec.name}' needs size {want} on axis {k} but the data has {d} (shape {a.shape}, model {list(spec.shape)})")


def _check_finite(a: np.ndarray, spec: InputSpec, where: str) -> None:
    if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
        raise QconvError(f"{where}: input '{spec.name}' contains NaN or Inf; clean the data first")


def _plan(shapes: dict[str, tuple], specs: list[InputSpec], batch_size: int, where: str):
    """How each array splits into feeds (scalar, stack or batch with its step), and the feed count."""
    by_name = {s.name: s for s in specs}
    counts, kinds = {}, {}
    for name, shape in shapes.items():
        spec = by_name[name]
        ndim = len(shape)
        if ndim == 0:
            kinds[name] = ("scalar", 0)
        elif ndim == spec.rank + 1:
            kinds[name] = ("stack", 0)
            counts[name] = shape[0]
        elif ndim == spec.rank:
            fixed = spec.shape[0] if isinstance(spec.shape[0], int) and spec.shape[0] > 0 else None
            step = fixed or batch_size
            if fixed and shape[0] % fixed:
                raise QconvError(f"{where}: input '{name}' has a fixed batch of {fixed} but the data has {shape[0]} rows")
            kinds[name] = ("batch", step)
            counts[name] = -(-shape[0] // step)
        else:
            raise QconvError(f"{where}: input '{name}' has rank {spec.rank} (shape {list(spec.shape)}); data of shape {tuple(shape)} is neither a stack of feeds (rank {spec.rank + 1}) nor a batch (rank {spec.rank})")
    sizes = set(counts.values())
    if len(sizes) > 1:
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
        raise QconvError(f"{where}: inputs give different numbers of feeds ({detail}); every input needs the same count")
    return kinds, (sizes.pop() if sizes else 1)


def _split(arrays: dict[str, np.ndarray], specs: list[InputSpec], batch_size: int, where: str, cast: bool = False,
           first: int = 0, shard: tuple[int, int] = (0, 1), skip: tuple[int, int] | None = None):
    """Yield (index, feed) from one file's arrays, by the rules in the module docstring; ``first`` is the index of
    this file's first feed in the whole data set. Feeds of other shards are skipped before any row is read."""
    by_name = {s.name: s for s in specs}
    kinds, n = _plan({k: a.shape for k, a in arrays.items()}, specs, batch_size, where)
    for k in range(n):
        if (first + k) % shard[1] != shard[0] or (skip is not None and (first + k) % skip[1] == skip[0]):
            continue
        feed = {}
        for name, a in arrays.items():
            spec = by_name[name]
            kind, step = kinds[name]
            if kind == "scalar":
                piece = np.asarray(a)
            elif kind == "stack":
                piece = np.asarray(a[k])
            else:
                piece = np.asarray(a[k * step:(k + 1) * step])
            piece = np.asarray(_cast(piece, spec, where, cast), order="C")
            _check_shape(piece, spec, where)
            _check_finite(piece, spec, where)
            feed[name] = piece
        yield first + k, complete(feed, specs, where)


class FeedSource:
    """A re-iterable stream of feeds from DATA, limited to ``samples`` rows when given."""

    def __init__(self, path: str | os.PathLike, specs: list[InputSpec], batch_size: int = 1, samples: int | None = None,
                 shard: tuple[int, int] = (0, 1), cast: bool = False, skip: tuple[int, int] | None = None):
        """``shard`` (K, N): only feeds whose index is K mod N; ``skip`` (K, N): all feeds but those (a held-out part)."""
        if batch_size < 1:
            raise QconvError(f"--batch-size must be at least 1 (got {batch_size})")
        if samples is not None and samples < 1:
            raise QconvError(f"--samples must be at least 1 (got {samples})")
        if not (shard[1] >= 1 and 0 <= shard[0] < shard[1]):
            raise QconvError(f"shard {shard[0]}/{shard[1]} is not valid: K/N needs 0 <= K < N")
        self.path = Path(path)
        self.specs = specs
        self.batch_size = batch_size
        self.samples = samples
        self.shard = shard
        self.cast = cast
        self.skip = skip
        self.files = _files(self.path)

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_files_hash"}  # a hash object does not pickle

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for _, feed in self.indexed():
            yield feed

    def indexed(self) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """(index of the feed in the whole data set, feed): shards of one data set interleave by this index."""
        seen = 0
        first = 0
        for f in self.files:
            arrays = _open(f, self.specs)
            _, count = _plan({k: a.shape for k, a in arrays.items()}, self.specs, self.batch_size, f.name)
            for index, feed in _split(arrays, self.specs, self.batch_size, f.name, self.cast, first, self.shard, self.skip):
                rows = _rows(feed, self.specs)
                if self.samples is not None and seen + rows > self.samples:
                    feed = _truncate(feed, self.specs, self.samples - seen)
                    rows = self.samples - seen
                if rows <= 0:
                    return
                seen += rows
                yield index, feed
                if self.samples is not None and seen >= self.samples:
                    return
            first += count

    def row_shapes(self) -> dict[str, list[int]]:
        """The shape of each input in the first row (batch 1): what a model is timed on when only statistics are at hand."""
        one = FeedSource(self.path, self.specs, batch_size=1, samples=1, cast=self.cast)
        first = next(iter(one), None) or {}
        return {k: [int(d) for d in np.shape(v)] for k, v in sorted(first.items())}

    def count(self) -> int:
        """Number of feeds, from the arrays' headers only (no data is read)."""
        total = 0
        for f in self.files:
            shapes = _header_shapes(f, self.specs)
            kinds, n = _plan(shapes, self.specs, self.batch_size, f.name)
            total += n
        k, n = self.shard
        indices = range(k, total, n)
        total = len(indices) if self.skip is None else sum(1 for i in indices if i % self.skip[1] != self.skip[0])
        if self.samples is not None:
            total = min(total, self.samples)  # an upper bound when feeds hold several rows
        return total

    def identity(self) -> str:
        """Hash of the data files' bytes and the options that select feeds from them. The files' hash is kept while
        their sizes and times are unchanged: a job and the calibration it runs ask for it once each (a 133 MB file
        hashes in 0.1 s)."""
        stamp = [(str(f), st.st_size, st.st_mtime_ns) for f in self.files for st in [f.stat()]]
        known = getattr(self, "_files_hash", None)
        if known is None or known[0] != stamp:
            h = hashlib.sha256()
            for f in self.files:
                h.update(f.name.encode())
                with open(f, "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        h.update(chunk)
            known = self._files_hash = (stamp, h)
        h = known[1].copy()
        h.update(f"batch={self.batch_size};samples={self.samples};shard={self.shard[0]}/{self.shard[1]}".encode())
        if self.skip is not None:
            h.update(f";skip={self.skip[0]}/{self.skip[1]}".encode())
        return h.hexdigest()


def _header_shapes(path: Path, specs: list[InputSpec]) -> dict[str, tuple]:
    if path.suffix == ".npy":
        return {specs[0].name: np.load(path, mmap_mode="r", allow_pickle=False).shape} if len(specs) == 1 else {}
    shapes = {}
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if info.filename.endswith(".npy"):
                with zf.open(info) as fh:
                    major, _ = np.lib.format.read_magic(fh)
                    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                    shape = read(fh)[0]
                shapes[info.filename[:-4]] = shape
    return {k: v for k, v in shapes.items() if k in {s.name for s in specs}}


def _rows(feed: dict[str, np.ndarray], specs: list[InputSpec]) -> int:
    for s in specs:
        a = feed[s.name]
        if a.ndim >= 1 and s.rank >= 1:
            return int(a.shape[0])
    return 1


feed_rows = _rows  # rows in one feed (the batch dimension of the first batched input)


def single_rows(feed: dict[str, np.ndarray], specs: list[InputSpec]):
    """The feed one row at a time (inputs with a free batch dimension are sliced; the rest pass unchanged);
    the feed itself when a fixed batch dimension forbids it."""
    batched = [s for s in specs if s.rank >= 1 and feed[s.name].ndim >= 1]
    if not batched or any(isinstance(s.shape[0], int) and s.shape[0] > 0 for s in batched):
        yield feed
        return
    for k in range(_rows(feed, specs)):
        yield {n: (a[k:k + 1] if any(s.name == n for s in batched) else a) for n, a in feed.items()}


def _truncate(feed, specs, rows: int):
    out = {}
    for s in specs:
        a = feed[s.name]
        fixed = isinstance(s.shape[0], int) and s.shape[0] > 0 if s.rank else True
        out[s.name] = a[:rows] if (a.ndim >= 1 and s.rank >= 1 and not fixed) else a
    return out


TEXT_INSTALL = "pip install 'qconv[text]'"


def load_tokenizer(path: str | os.PathLike):
    """A Hugging Face ``tokenizers`` tokenizer from tokenizer.json (or a folder holding one), or a one-line error."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise UsageError(f"tokenizing text needs the tokenizers package: {TEXT_INSTALL}") from None
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise QconvError(f"tokenizer not found: {p} (give a tokenizer.json, or the folder of a Hugging Face model that has one)")
    try:
        return Tokenizer.from_file(str(p))
    except Exception as exc:  # noqa: BLE001 - the Rust side raises plain Exceptions
        raise QconvError(f"not a tokenizers tokenizer.json: {p} ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


def token_windows(text: str, tokenizer, length: int, windows: int | None = None) -> np.ndarray:
    """int64 [n, length]: the text's token ids cut into consecutive windows (GPTQ's and AWQ's calibration rows), each
    framed by the special tokens the tokenizer adds around a sequence (a BOS, or BERT's [CLS] ... [SEP]); the last
    partial window is dropped unless it is the only one (then it is the whole text, shorter than ``length``)."""
    probe, bare = tokenizer.encode("a"), tokenizer.encode("a", add_special_tokens=False)
    start = next((k for k in range(len(probe.ids) - len(bare.ids) + 1) if probe.ids[k:k + len(bare.ids)] == bare.ids), 0)
    head, tail = probe.ids[:start], probe.ids[start + len(bare.ids):]
    body = length - len(head) - len(tail)
    if body < 1:
        raise UsageError(f"--seq-len {length} leaves no room for text between the tokenizer's {len(head) + len(tail)} special tokens")
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    if not ids:
        raise QconvError("the text has no tokens (empty file?)")
    count = max(1, len(ids) // body)
    if windows is not None:
        count = min(count, windows)
    rows = [head + ids[k * body:(k + 1) * body] + tail for k in range(count)]
    return np.asarray(rows, dtype=np.int64)
