"""onnxruntime sessions, made one way everywhere: CPU provider, fixed thread count, errors as one line."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from qconv.errors import QconvError
from qconv.graph import copy_with_placeholders


def default_threads() -> int:
    return max(1, os.cpu_count() or 1)


def session(model: onnx.ModelProto | str, threads: int | None = None, optimize: bool = True,
            spinning: bool = True, profile_prefix: str | None = None, prepack: bool = True,
            by_priority: bool = False) -> ort.InferenceSession:
    """A CPU session. ``spinning=False`` stops idle worker threads from busy-waiting: timings of two models
    measured in turn then do not steal each other's cores. ``profile_prefix`` records every kernel's time
    (``end_profiling()`` returns the trace file's path). ``prepack=False``: weights are not copied into the
    kernels' packed layouts, for a session run a few times (a check), which then holds its weights once.
    ``by_priority``: onnxruntime's priority-based node order, which runs a node soon after its inputs are made (a
    calibration graph's statistics nodes then read their tensor while it is in cache and free it at once; the
    default order runs them last, holding every observed tensor)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or default_threads()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 4  # failures come back as exceptions, turned into one-line errors below
    if profile_prefix is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not prepack:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    if by_priority:
        opts.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        if isinstance(model, str):
            return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])
        if model.ByteSize() < PROTO_LIMIT:
            return ort.InferenceSession(model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])
        with tempfile.TemporaryDirectory(prefix="qconv-session-") as tmp:
            path = write_external(model, Path(tmp) / "model.onnx")
            return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QconvError(f"onnxruntime cannot load the model: {first}") from None


PROTO_LIMIT = 2**31 - 2**26  # a protobuf message cannot pass 2 GB; keep a margin for the graph itself


def write_external(model: onnx.ModelProto, path: Path, threshold: int = 1 << 20) -> Path:
    """Write ``model`` with every initializer of ``threshold`` bytes or more in ``<path>.data``, without copying the
    model first (onnx.save_model's external-data route rewrites the proto it is given, so callers would need a
    second copy of every weight): a copy with placeholders for the big tensors, whose bytes are streamed to the
    data file one at a time."""
    big = [t for t in model.graph.initializer if t.ByteSize() >= threshold and t.data_location != onnx.TensorProto.EXTERNAL]
    m = copy_with_placeholders(model, {t.name for t in big})
    refs = {t.name: t for t in m.graph.initializer}
    data = path.with_name(path.name + ".data")
    with open(data, "wb") as f:
        for t in big:
            raw = t.raw_data if t.HasField("raw_data") else onnx.numpy_helper.to_array(t).tobytes()
            offset = f.tell()
            f.write(raw)
            ref = refs[t.name]
            for key, value in (("location", data.name), ("offset", str(offset)), ("length", str(len(raw)))):
                entry = ref.external_data.add()
                entry.key, entry.value = key, value
            ref.data_location = onnx.TensorProto.EXTERNAL
    path.write_bytes(m.SerializeToString())
    return path


def run(sess: ort.InferenceSession, feed: dict, outputs: list[str] | None = None) -> list:
    """Run on ``feed``; float32 arrays for float16 inputs (an fp16 model without --keep-io-types) are cast."""
    halves = getattr(sess, "_qconv_half_inputs", None)
    if halves is None:
        halves = {i.name for i in sess.get_inputs() if i.type == "tensor(float16)"}
        try:
            sess._qconv_half_inputs = halves
        except AttributeError:
            pass
    if halves:
        feed = {k: (v.astype(np.float16) if k in halves and isinstance(v, np.ndarray) and v.dtype == np.float32 else v)
                for k, v in feed.items()}
    try:
        return sess.run(outputs, feed)
    except Exception as exc:  # noqa: BLE001
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QconvError(f"onnxruntime failed to run the model on the data: {first}") from None
