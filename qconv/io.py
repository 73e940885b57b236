"""The only module that reads and writes model and JSON files. Writes are atomic: temp file, then rename."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError, Message

from qconv.errors import QconvError
from qconv.graph import (copy_with_placeholders, external_info, graph_size, hash_loaded, has_lazy, is_lazy, lazy_chunks, lazy_span,
                         tensor_size, varint)

# Models whose protobuf would pass 2 GB must keep weights outside the .onnx file.
_PROTO_LIMIT = 2**31 - 2**26


def has_external_data(model: onnx.ModelProto) -> bool:
    return any(
        t.data_location == onnx.TensorProto.EXTERNAL for t in onnx.external_data_helper._get_all_tensors(model)
    )


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load an ONNX model with its external data, or fail with a one-line reason."""
    return load_model_and_layout(path)[0]


def load_model_and_layout(path: str | os.PathLike) -> tuple[onnx.ModelProto, bool]:
    """The model (external data loaded) and whether its weights were stored as external data."""
    p = Path(path)
    if not p.exists():
        raise QconvError(f"model file not found: {p}")
    if p.is_dir():
        raise QconvError(f"model path is a folder, not an .onnx file: {p}")
    if p.stat().st_size == 0:
        raise QconvError(f"model file is empty: {p}")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise QconvError(f"not a readable ONNX model (truncated or not ONNX?): {p} ({_first_line(exc)})") from None
    if not model.graph.node and not model.graph.output:
        raise QconvError(f"not an ONNX model (no graph found): {p}")
    external = has_external_data(model)
    if external:
        try:
            if _external_bytes(model, p.parent) > LAZY_BYTES:
                _point_to_files(model, p.parent)
            else:
                onnx.external_data_helper.load_external_data_for_model(model, str(p.parent))
        except Exception as exc:  # noqa: BLE001 - onnx raises OSError, ValueError or ValidationError here
            raise QconvError(
                f"cannot read the model's external data next to {p}: {_first_line(exc)}; keep the .data file beside the model"
            ) from None
        model.ir_version = max(model.ir_version, 4)
    return model, external


# Past protobuf's limit a model cannot be held as one message anyway: its weights stay in their files, read one at a
# time where they are used (qconv.graph.tensor_array), so qconv holds about one weight and what it writes, not the
# model (a 2.09 GiB decoder to int4: 9.2 GB peak when loaded, see tests/test_large_models.py).
LAZY_BYTES = _PROTO_LIMIT


def _external_bytes(model: onnx.ModelProto, base: Path) -> int:
    total = 0
    for t in onnx.external_data_helper._get_all_tensors(model):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = external_info(t)
            total += int(info["length"]) if "length" in info else (base / info["location"]).stat().st_size
    return total


def _point_to_files(model: onnx.ModelProto, base: Path) -> None:
    """Leave the main graph's weights in their files, their locations made absolute (qconv.graph.is_lazy); weights of
    subgraphs and attributes are loaded (they are small, and read where a lazy one is not looked for)."""
    for t in model.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        for e in t.external_data:
            if e.key == "location":
                e.value = str((base / e.value).resolve())
        path, offset, length = lazy_span(t)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{Path(path).name} (weight '{t.name}') not found")
        if offset + length > os.path.getsize(path):
            raise ValueError(f"weight '{t.name}' runs past the end of {Path(path).name}")
    for t in onnx.external_data_helper._get_all_tensors(model):
        if t.data_location == onnx.TensorProto.EXTERNAL and not is_lazy(t):
            onnx.external_data_helper.load_external_data_for_tensor(t, str(base))
            t.data_location = onnx.TensorProto.DEFAULT
            del t.external_data[:]


def op_counts(path: str | os.PathLike) -> dict[str, int]:
    """{op type: count} of a model's main graph, read without its weights (for checks before any work)."""
    import collections

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - the real load reports a broken file properly
        return {}
    return dict(collections.Counter(n.op_type for n in model.graph.node))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def check_output_path(out: str | os.PathLike, *inputs: str | os.PathLike) -> Path:
    """Reject an output path that would overwrite an input or lands in a missing folder."""
    o = Path(out)
    if not o.parent.exists():
        raise QconvError(f"output folder does not exist: {o.parent} (create it first)")
    if o.is_dir():
        raise QconvError(f"output path is a folder: {o} (give a file name)")
    for i in inputs:
        if i is not None and Path(i).exists() and o.exists() and os.path.samefile(o, i):
            raise QconvError(f"output path is the same as the input {i}: choose another file name")
    return o


def model_size_bytes(path: str | os.PathLike) -> int:
    """Bytes on disk of a model file plus any external data files it references."""
    p = Path(path)
    total = p.stat().st_size
    m = onnx.load(str(p), load_external_data=False)
    seen = set()
    for t in onnx.external_data_helper._get_all_tensors(m):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = next((e.value for e in t.external_data if e.key == "location"), None)
            if loc and loc not in seen:
                seen.add(loc)
                f = p.parent / loc
                if f.exists():
                    total += f.stat().st_size
    return total


def save_model(model: onnx.ModelProto, out: str | os.PathLike, external_data: bool | None = None) -> Path:
    """Write ``model`` to ``out`` atomically; weights go to ``<out>.data`` beside it when asked or needed."""
    o = Path(out)
    streamed = has_lazy(model) or model.ByteSize() > _PROTO_LIMIT  # never a second copy of the weights
    tmpdir = Path(tempfile.mkdtemp(prefix=".qconv-", dir=o.parent))
    try:
        tmp_model = tmpdir / o.name
        if streamed:
            data_name = o.name + ".data"
            write_external(model, tmp_model, threshold=SPILL_BYTES)
            os.replace(tmpdir / data_name, o.parent / data_name)
        elif external_data:
            data_name = o.name + ".data"
            onnx.save_model(
                model, str(tmp_model), save_as_external_data=True, all_tensors_to_one_file=True,
                location=data_name, size_threshold=1024,
            )
            if (tmpdir / data_name).exists():  # no weight of 1 KB or more (a small model quantized): none written
                os.replace(tmpdir / data_name, o.parent / data_name)
        else:
            with open(tmp_model, "wb") as f:
                f.write(model.SerializeToString(deterministic=True))
        os.replace(tmp_model, o)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return o


def write_json(obj, out: str | os.PathLike) -> Path:
    """Write JSON atomically with sorted keys, so identical inputs give identical bytes."""
    o = Path(out)
    text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=True) + "\n"
    with atomic_path(o) as tmp:
        tmp.write_text(text)
    return o


def write_text(text: str, out: str | os.PathLike) -> Path:
    o = Path(out)
    with atomic_path(o) as tmp:
        tmp.write_text(text)
    return o


def write_bytes(data: bytes, out: str | os.PathLike) -> Path:
    o = Path(out)
    with atomic_path(o) as tmp:
        tmp.write_bytes(data)
    return o


def read_json(path: str | os.PathLike, what: str) -> dict:
    p = Path(path)
    if not p.exists():
        raise QconvError(f"{what} not found: {p}")
    try:
        obj = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise QconvError(f"{what} is not valid JSON (truncated or corrupt?): {p} ({_first_line(exc)})") from None
    if not isinstance(obj, dict):
        raise QconvError(f"{what} does not hold a JSON object: {p}")
    return obj


@contextlib.contextmanager
def atomic_path(out: Path):
    """Yield a temp path next to ``out``; rename it over ``out`` only if the block succeeds."""
    fd, name = tempfile.mkstemp(prefix=".qconv-", suffix=out.suffix, dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the result should look like any other file
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()




def model_identity(model: onnx.ModelProto) -> str:
    """A hash of the graph and weights (with external data loaded): the same model gives the same id."""
    h = hashlib.sha256()
    for op in model.opset_import:
        h.update(f"{op.domain}:{op.version};".encode())
    if not has_lazy(model) and graph_size(model.graph) < _PROTO_LIMIT:
        _hash_graph_bytes(model.graph, h)
        return h.hexdigest()
    # past 2 GB one message cannot be serialized: the graph without its weights, then each weight in turn (a lazy
    # one as if loaded: the same model gives the same id however it was read)
    bare = copy_with_placeholders(model, {t.name for t in model.graph.initializer}).graph
    del bare.initializer[:]
    h.update(bare.SerializeToString(deterministic=True))
    for t in model.graph.initializer:
        hash_loaded(t, h)
    return h.hexdigest()


def _hash_graph_bytes(graph: onnx.GraphProto, h, whole_below: int = 1 << 24) -> None:
    """Hash exactly ``graph.SerializeToString(deterministic=True)`` without making it: the message without its
    initializers (field 5), cut where the fields after 5 begin, with each initializer's record hashed in between, one
    at a time (the whole message was a copy of every weight, and the hash's input another: MiniLM's 90 MB model peaked
    180 MB higher while its identity was taken). Graphs below ``whole_below`` bytes are serialized whole."""
    if graph_size(graph) < whole_below:
        h.update(graph.SerializeToString(deterministic=True))
        return
    bare = onnx.GraphProto()
    for field, value in graph.ListFields():
        if field.name == "initializer":
            continue
        if hasattr(value, "extend"):  # repeated
            getattr(bare, field.name).extend(value)
        elif isinstance(value, Message):
            getattr(bare, field.name).CopyFrom(value)
        else:
            setattr(bare, field.name, value)
    raw = bare.SerializeToString(deterministic=True)
    cut = _first_field_after(raw, 5)
    h.update(raw[:cut])
    for t in graph.initializer:
        record = t.SerializeToString(deterministic=True)
        h.update(b"\x2a" + varint(len(record)))  # field 5, length-delimited
        h.update(record)
        del record
    h.update(raw[cut:])


def _read_varint(buf: bytes, k: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = buf[k]
        value |= (byte & 0x7F) << shift
        k += 1
        if not byte & 0x80:
            return value, k
        shift += 7


def _first_field_after(buf: bytes, number: int) -> int:
    """Offset of the first top-level field of a serialized message whose number is above ``number`` (fields are
    written in number order), or the end."""
    k = 0
    while k < len(buf):
        tag, after = _read_varint(buf, k)
        if tag >> 3 > number:
            return k
        wire = tag & 7
        if wire == 0:
            _, after = _read_varint(buf, after)
        elif wire == 1:
            after += 8
        elif wire == 2:
            length, after = _read_varint(buf, after)
            after += length
        elif wire == 5:
            after += 4
        else:
            raise ValueError(f"unexpected wire type {wire} in a GraphProto")
        k = after
    return k


def write_external(model: onnx.ModelProto, path: Path, threshold: int = 1 << 20, link: bool = False) -> Path:
    """Write ``model`` with every initializer of ``threshold`` bytes or more in ``<path>.data``, without copying the
    model first (onnx.save_model's external-data route rewrites the proto it is given, so callers would need a
    second copy of every weight): a copy with placeholders for the big tensors, whose bytes are streamed to the
    data file one at a time. Lazy weights (qconv.graph.is_lazy) are copied from their file in chunks; with ``link``
    (a session's temporary folder) their file is hard-linked beside ``path`` instead, where the file system allows."""
    tensors = model.graph.initializer
    big = [t for t in tensors if is_lazy(t) or (tensor_size(t) >= threshold and t.data_location != onnx.TensorProto.EXTERNAL)]
    m = copy_with_placeholders(model, {t.name for t in big})
    refs = {t.name: t for t in m.graph.initializer}
    data = path.with_name(path.name + ".data")
    linked: dict[str, str] = {}
    with open(data, "wb") as f:
        for t in big:
            ref = refs[t.name]
            if t.HasField("doc_string"):
                ref.doc_string = t.doc_string
            if is_lazy(t):
                source, start, length = lazy_span(t)
                if link and source not in linked and _hard_link(source, path.parent / f"linked{len(linked)}.data"):
                    linked[source] = f"linked{len(linked)}.data"
                if source in linked:
                    _reference(ref, linked[source], start, length)
                    continue
                offset = _align(f)
                for block in lazy_chunks(t):
                    f.write(block)
            else:
                raw = t.raw_data if t.HasField("raw_data") else onnx.numpy_helper.to_array(t).tobytes()
                offset, length = _align(f), len(raw)
                f.write(raw)
            _reference(ref, data.name, offset, length)
    path.write_bytes(m.SerializeToString())
    return path


ALIGN = 1 << 16  # onnxruntime maps a weight from the file, instead of copying it, only at an aligned offset


def _align(f) -> int:
    """Pad ``f`` to the next ALIGN boundary; returns the offset the next weight starts at."""
    offset = f.tell()
    if offset % ALIGN:
        f.write(b"\0" * (ALIGN - offset % ALIGN))
    return f.tell()


SPILL_BYTES = 1 << 10  # save_model's threshold for a model past 2 GB: a spilled model is written as a held one would be


class Spill:
    """A scratch file where a rewrite of a model past 2 GB puts each new weight as it makes it, keeping in the model only
    a lazy reference to it (qconv.graph.is_lazy): the new weights are never all held at once (an int4 decoder of 2 GB:
    334 MiB), and sessions map them from the file instead of copying them (runtime.session does not prepack a model
    with lazy weights). Weights under SPILL_BYTES stay in the model, as save_model would leave them. The folder goes at
    exit; a model that refers to it is written (save_model copies the bytes) before then."""

    def __init__(self):
        import atexit

        self.folder = Path(tempfile.mkdtemp(prefix="qconv-spill."))
        self.path = self.folder / "weights.data"
        self._file = open(self.path, "wb")
        atexit.register(self.close)

    def keep(self, t: onnx.TensorProto) -> onnx.TensorProto:
        """``t``, or a lazy reference to its bytes now written to the scratch file."""
        if tensor_size(t) < SPILL_BYTES or not t.HasField("raw_data"):
            return t
        ref = onnx.TensorProto()
        ref.name, ref.data_type = t.name, t.data_type
        ref.dims.extend(t.dims)
        raw = t.raw_data
        offset = _align(self._file)
        self._file.write(raw)
        self._file.flush()
        _reference(ref, str(self.path), offset, len(raw))
        return ref

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def _reference(ref: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    del ref.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = ref.external_data.add()
        entry.key, entry.value = key, value
    ref.data_location = onnx.TensorProto.EXTERNAL


def _hard_link(source: str, target: Path) -> bool:
    try:
        os.link(source, target)
        return True
    except OSError:  # another file system, or links not allowed: the bytes are copied instead
        return False
