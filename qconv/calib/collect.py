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
from qconv.graph import Graph, expose
from qconv.runtime import run, session


def activation_tensors(model: onnx.ModelProto) -> list[str]:
    """Float tensors computed at run time (graph inputs and node outputs), in graph order."""
    g = Graph(model)
    names = [n for n in g.graph_inputs if g.is_float(n)]
    for node in model.graph.node:
        names += [o for o in node.output if o and g.is_float(o)]
    return list(dict.fromkeys(names))


def collect(
    model: onnx.ModelProto,
    feeds: Iterable[dict[str, np.ndarray]],
    threads: int | None = None,
    progress: Callable[[int], None] | None = None,
    bins: int = DEFAULT_BINS,
    momentum: float = DEFAULT_MOMENTUM,
    names: list[str] | None = None,
) -> tuple[dict[str, TensorObserver], int]:
    """Observers for ``names`` (default: every float activation), and the number of feeds seen."""
    names = activation_tensors(model) if names is None else names
    # One core is left to the statistics thread unless the caller says otherwise.
    sess = session(expose(model, {n: onnx.TensorProto.FLOAT for n in names}), threads or max(1, (os.cpu_count() or 2) - 1))
    outputs = [o.name for o in sess.get_outputs()]
    wanted = [n for n in outputs if n in set(names)]
    inputs = [n for n in names if n in {i.name for i in sess.get_inputs()}]
    observers = {n: TensorObserver(bins=bins, momentum=momentum) for n in names}

    def observe(feed: dict, values: list) -> None:
        for name in inputs:
            observers[name].update(np.asarray(feed[name], dtype=np.float32))
        for name, value in zip(wanted, values):
            observers[name].update(np.asarray(value))

    # Statistics of batch k are computed while onnxruntime runs batch k + 1 (numpy and onnxruntime both
    # release the GIL): at most two batches of activations are alive, and observers see batches in order.
    seen = 0
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for feed in feeds:
            values = run(sess, feed, wanted)
            if pending is not None:
                pending.result()
            pending = pool.submit(observe, feed, values)
            seen += 1
            if progress:
                progress(1)
        if pending is not None:
            pending.result()
    if seen == 0:
        raise QconvError("no calibration samples: the data set is empty")
    return observers, seen
