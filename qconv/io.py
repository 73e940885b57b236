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
from google.protobuf.message import DecodeError

from qconv.errors import QconvError
from qconv.graph import copy_with_placeholders

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
            onnx.external_data_helper.load_external_data_for_model(model, str(p.parent))
        except Exception as exc:  # noqa: BLE001 - onnx raises OSError, ValueError or ValidationError here
            raise QconvError(
                f"cannot read the model's external data next to {p}: {_first_line(exc)}; keep the .data file beside the model"
            ) from None
        model.ir_version = max(model.ir_version, 4)
    return model, external


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
    if external_data is None:
        external_data = model.ByteSize() > _PROTO_LIMIT
    tmpdir = Path(tempfile.mkdtemp(prefix=".qconv-", dir=o.parent))
    try:
        tmp_model = tmpdir / o.name
        if external_data:
            data_name = o.name + ".data"
            onnx.save_model(
                model, str(tmp_model), save_as_external_data=True, all_tensors_to_one_file=True,
                location=data_name, size_threshold=1024,
            )
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
    if model.graph.ByteSize() < _PROTO_LIMIT:
        h.update(model.graph.SerializeToString(deterministic=True))
        return h.hexdigest()
    # past 2 GB one message cannot be serialized: the graph without its weights, then each weight in turn
    bare = copy_with_placeholders(model, {t.name for t in model.graph.initializer}).graph
    del bare.initializer[:]
    h.update(bare.SerializeToString(deterministic=True))
    for t in model.graph.initializer:
        h.update(t.SerializeToString(deterministic=True))
    return h.hexdigest()
