"""onnxruntime sessions, made one way everywhere: CPU provider, fixed thread count, errors as one line."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from qconv.errors import QconvError
from qconv.graph import add_outputs, has_lazy, model_size
from qconv.io import write_external


def default_threads() -> int:
    return max(1, os.cpu_count() or 1)


def session(model: onnx.ModelProto | str, threads: int | None = None, optimize: bool = True,
            spinning: bool = True, profile_prefix: str | None = None, prepack: bool | None = None,
            by_priority: bool = False) -> ort.InferenceSession:
    """A CPU session. ``spinning=False`` stops idle worker threads from busy-waiting: timings of two models
    measured in turn then do not steal each other's cores. ``profile_prefix`` records every kernel's time
    (``end_profiling()`` returns the trace file's path). ``prepack=False``: weights are not copied into the
    kernels' packed layouts, for a session run a few times (a check), which then holds its weights once; None
    (the default): prepacked, unless the model has weights left in their file (qconv.graph.is_lazy: a model past 2 GB,
    whose weights are then mapped, not copied); a timing passes True, so both sides run as a user runs them.
    ``by_priority``: onnxruntime's priority-based node order, which runs a node soon after its inputs are made (a
    calibration graph's statistics nodes then read their tensor while it is in cache and free it at once; the
    default order runs them last, holding every observed tensor). Such a session plans no memory pattern either: the
    pattern's one block for a whole run held 25-43 MB more at the same speed (det, rec, MiniLM calibration graphs)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or default_threads()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 4  # failures come back as exceptions, turned into one-line errors below
    if profile_prefix is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if prepack is None:
        prepack = not (isinstance(model, onnx.ModelProto) and has_lazy(model))
    if not prepack:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    if by_priority:
        opts.execution_order = ort.ExecutionOrder.PRIORITY_BASED
        opts.enable_mem_pattern = False
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        if isinstance(model, str):
            return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])
        if not goes_by_file(model):
            return ort.InferenceSession(model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])
        with as_file(model) as path:
            return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QconvError(f"onnxruntime cannot load the model: {first}") from None


# Models of more than a few MB reach onnxruntime through a temporary file with their weights beside it, not as one
# serialized message: the message and onnxruntime's parse of it were two more copies of the weights at the session's
# start (an int4 decoder of 334 MB held 1.9 GB in its checks), and onnxruntime's Python session keeps the message for
# its whole life (MiniLM, 91 MB of weights: 364 MB after a session from the message, 220 MB from a file, peak 412 -> 243
# MB), where weights in a file are read, or mapped when prepacking is off, once. It is no slower: writing the file
# costs what serializing the message did (PP-OCRv4 rec, 11 MB: 43-50 ms a session either way). From 1 MB up: each
# session of the recognizer held 56 MB from its message, 45 from a file (its calibrate at batch 1: peak 258 -> 228 MB
# with the compacted load).
FILE_SESSION_BYTES = 1 << 20


def goes_by_file(model: onnx.ModelProto) -> bool:
    """Whether onnxruntime (and onnx.checker) should read ``model`` from a file (see FILE_SESSION_BYTES)."""
    return has_lazy(model) or model_size(model) >= FILE_SESSION_BYTES


@contextlib.contextmanager
def as_file(model: onnx.ModelProto, link: bool = True):
    """A temporary .onnx path holding ``model``, its big weights beside it (lazy ones hard-linked where possible;
    ``link=False`` for onnx.checker, which refuses hard-linked files); removed after the block (a session made from
    it keeps what it mapped)."""
    with tempfile.TemporaryDirectory(prefix="qconv-session-") as tmp:
        yield write_external(model, Path(tmp) / "model.onnx", link=link)


def exposed_session(model: onnx.ModelProto, names_types: dict[str, int], threads: int | None = None,
                    nodes=(), initializers=(), **options) -> ort.InferenceSession:
    """A session of ``model`` whose outputs also include the given tensors (name -> element type; those already outputs
    are not added again), computed by ``nodes`` from ``initializers`` where they are not the model's own. All of them are
    added to ``model`` itself while onnxruntime reads it and removed after: a copy of the model (qconv.graph.expose) held
    its weights twice (MiniLM's SmoothQuant capture: 90 MB)."""
    graph = model.graph
    counts = (add_outputs(model, names_types), len(graph.node), len(graph.initializer))
    graph.node.extend(nodes)
    graph.initializer.extend(initializers)
    try:
        return session(model, threads, **options)
    finally:
        del graph.output[counts[0]:]
        del graph.node[counts[1]:]
        del graph.initializer[counts[2]:]


def give_back(collect: bool = True) -> None:
    """Return the heap memory freed since to the system. glibc keeps freed blocks for reuse, and once a big block is
    freed it serves the next ones up to 32 MB from its heap too: after the prepacked sessions of an int4 decoder of
    2 GB were freed, 264 MB stayed held. A no-op where the C library has no malloc_trim."""
    import ctypes
    import ctypes.util
    import gc

    if collect:  # sessions and arrays go with their last reference; a cycle needs the collector
        gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


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
