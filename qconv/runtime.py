"""onnxruntime sessions, made one way everywhere: CPU provider, fixed thread count, errors as one line."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort

from qconv.errors import QconvError


def default_threads() -> int:
    return max(1, os.cpu_count() or 1)


def session(model: onnx.ModelProto | str, threads: int | None = None, optimize: bool = True,
            spinning: bool = True, profile_prefix: str | None = None) -> ort.InferenceSession:
    """A CPU session. ``spinning=False`` stops idle worker threads from busy-waiting: timings of two models
    measured in turn then do not steal each other's cores. ``profile_prefix`` records every kernel's time
    (``end_profiling()`` returns the trace file's path)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or default_threads()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 4  # failures come back as exceptions, turned into one-line errors below
    if profile_prefix is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    src = model if isinstance(model, str) else model.SerializeToString()
    try:
        return ort.InferenceSession(src, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QconvError(f"onnxruntime cannot load the model: {first}") from None


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
