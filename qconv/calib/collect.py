"""Run the (normalized) float model over feeds with every float activation exposed; stream into observers.

Memory is one batch's activations at a time: statistics are folded into the observers and the arrays
dropped before the next batch runs, so it does not grow with the number of samples.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable

import numpy as np
import onnx

from qconv.calib.observers import DEFAULT_BINS, DEFAULT_MOMENTUM, TensorObserver
from qconv.errors import QconvError
from qconv.graph import Graph, expose, weights_held
from qconv.runtime import run, session


def activation_tensors(model: onnx.ModelProto, bodies: bool = True) -> list[str]:
    """Float tensors computed at run time (graph inputs and node outputs), in graph order; then those of every
    If/Loop/Scan body under scoped names (``bodies``)."""
    g = Graph(model)
    names = [n for n in g.graph_inputs if g.is_float(n)]
    for node in model.graph.node:
        names += [o for o in node.output if o and g.is_float(o)]
    if bodies:
        from qconv.graph import subgraphs

        for body in subgraphs.bodies(model) if subgraphs.has_bodies(model) else []:
            wrapped, added = subgraphs.body_model(model, body)
            names += [body.name(n) for n in activation_tensors(wrapped, bodies=False) if n not in set(added)]
    return list(dict.fromkeys(names))


DEFAULT_MAX_MEMORY = 1 << 30  # bytes of exposed activations per pass (two feeds' worth are alive at once)


def tensor_bytes(model: onnx.ModelProto, feed: dict[str, np.ndarray], names: list[str]) -> dict[str, int]:
    """Bytes of each named float tensor for ``feed``, from onnx shape inference with the feed's shapes; a tensor
    whose shape stays unknown counts as the largest known one (a safe overestimate)."""
    m = onnx.ModelProto()
    with weights_held(model):
        m.CopyFrom(model)
    del m.graph.value_info[:]
    for vi in m.graph.input:
        if vi.name in feed:
            dims = vi.type.tensor_type.shape.dim
            for d, n in zip(dims, np.shape(feed[vi.name])):
                d.ClearField("dim_param")
                d.dim_value = int(n)
    try:
        m = onnx.shape_inference.infer_shapes(m, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - best effort: unknown sizes count as the largest known
        pass
    sizes = {}
    for vi in list(m.graph.value_info) + list(m.graph.output) + list(m.graph.input):
        dims = vi.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            sizes[vi.name] = int(np.prod([d.dim_value for d in dims], dtype=np.int64)) * 4
    for name in feed:
        sizes[name] = int(np.asarray(feed[name]).size) * 4
    largest = max(sizes.values(), default=4)
    return {n: sizes.get(n, largest) for n in names}


def groups_within(names: list[str], sizes: dict[str, int], budget: int) -> list[list[str]]:
    """``names`` in graph order, cut into consecutive groups of at most ``budget`` bytes (one tensor at least)."""
    out, current, used = [], [], 0
    for n in names:
        if current and used + sizes[n] > budget:
            out.append(current)
            current, used = [], 0
        current.append(n)
        used += sizes[n]
    if current:
        out.append(current)
    return out


def collect(
    model: onnx.ModelProto,
    feeds: Iterable[dict[str, np.ndarray]],
    threads: int | None = None,
    progress: Callable[[int], None] | None = None,
    bins: int = DEFAULT_BINS,
    momentum: float = DEFAULT_MOMENTUM,
    names: list[str] | None = None,
    groups: list[list[str]] | None = None,
) -> tuple[dict[str, TensorObserver], int]:
    """Observers for ``names`` (default: every float activation), and the number of feeds seen.

    ``groups`` (from ``memory_groups``) observes the tensors a group per pass over the data, so the exposed
    activations stay within a memory budget; observers see the same batches in the same order either way, so
    the statistics are identical."""
    names = activation_tensors(model) if names is None else names
    model, renamed = _promoted(model, names)
    observers: dict[str, TensorObserver] = {}
    seen = 0
    for group in groups or [names]:
        group = [renamed.get(n, n) for n in group]
        got, seen = _collect_group(model, feeds, threads, progress, bins, momentum, group)
        observers.update(got)
    return {n: observers[renamed.get(n, n)] for n in names}, seen


def _promoted(model: onnx.ModelProto, names: list[str]) -> tuple[onnx.ModelProto, dict[str, str]]:
    """Body tensors (scoped names, see qconv.graph.subgraphs) lifted to main-graph tensors: (model, {scoped: lifted})."""
    from qconv.graph.subgraphs import promote, split_scoped

    wanted: dict[str, list[str]] = {}
    for n in names:
        scope, local = split_scoped(n)
        if scope:
            wanted.setdefault(scope, []).append(local)
    if not wanted:
        return model, {}
    m, lifted = promote(model, wanted)
    return m, {full: out for out, full in lifted.items()}


def memory_groups(model: onnx.ModelProto, feeds: Iterable[dict], names: list[str], max_memory: int) -> list[list[str]]:
    """``names`` cut so one pass holds at most ``max_memory`` bytes of exposed activations (two feeds alive)."""
    first = next(iter(feeds), None)
    if first is None:
        raise QconvError("no calibration samples: the data set is empty")
    return groups_within(names, tensor_bytes(model, first, names), max(1, max_memory // 2))


def _collect_group(model, feeds, threads, progress, bins, momentum, names) -> tuple[dict[str, TensorObserver], int]:
    # One core is left to the statistics thread unless the caller says otherwise.
    sess = session(expose(model, {n: onnx.TensorProto.FLOAT for n in names}), threads or max(1, (os.cpu_count() or 2) - 1))
    outputs = [o.name for o in sess.get_outputs()]
    wanted = [n for n in outputs if n in set(names)]
    inputs = [n for n in names if n in {i.name for i in sess.get_inputs()}]
    observers = {n: TensorObserver(bins=bins, momentum=momentum) for n in names}

    def observe(index: int, feed: dict, values: list) -> None:
        for name in inputs:
            observers[name].update(np.asarray(feed[name], dtype=np.float32), index)
        for name, value in zip(wanted, values):
            observers[name].update(np.asarray(value), index)

    # Statistics of batch k are computed while onnxruntime runs batch k + 1 (numpy and onnxruntime both
    # release the GIL): at most two batches of activations are alive, and observers see batches in order.
    seen = 0
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        # Each batch's index in the whole data set orders the moving averages, so shards merge exactly.
        for index, feed in (feeds.indexed() if hasattr(feeds, "indexed") else enumerate(feeds)):
            values = run(sess, feed, wanted)
            if pending is not None:
                pending.result()
            pending = pool.submit(observe, index, feed, values)
            seen += 1
            if progress:
                progress(1)
        if pending is not None:
            pending.result()
    if seen == 0:
        raise QconvError("no calibration samples: the data set is empty")
    return observers, seen
