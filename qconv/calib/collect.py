"""Run the (normalized) float model over feeds and stream each observed tensor's statistics into observers.

By default the statistics are computed inside onnxruntime (qconv.calib.ingraph) for the tensors that do not follow
exactly from another (qconv.calib.derive): one pass, memory about what inference holds. With every value counted
(``samples`` 0) the tensors are exposed as outputs instead, a batch's activations at a time, in as many passes as
``--max-memory`` needs. Either way the statistics are folded batch by batch and never grow with the number of samples.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable

import numpy as np
import onnx

from qconv.calib import derive, ingraph
from qconv.calib.ingraph import DEFAULT_SAMPLES
from qconv.calib.observers import DEFAULT_BINS, DEFAULT_MOMENTUM, Batch, TensorObserver
from qconv.errors import QconvError
from qconv.graph import Graph, without_weights
from qconv.runtime import default_threads, exposed_session, run, session


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
    m = without_weights(model)
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
    samples: int = DEFAULT_SAMPLES,
    cache: dict | None = None,
) -> tuple[dict[str, TensorObserver], int]:
    """Observers for ``names`` (default: every float activation), and the number of feeds seen.

    With ``samples`` > 0 (the default) the statistics are computed inside onnxruntime (qconv.calib.ingraph) on the
    tensors that do not follow exactly from another one (qconv.calib.derive), in one pass, and the histograms count
    a strided sample of at most about ``samples`` values per tensor and batch. With ``samples`` 0 every value of every
    tensor leaves onnxruntime and is counted: ``groups`` (from ``memory_groups``) then observes the tensors a group
    per pass over the data, so the exposed activations stay within a memory budget (observers see the same batches
    in the same order either way, so the statistics are identical). ``cache``: a dict kept by the caller for one model
    (a Dask worker's), in which the calibration graph and its session are kept for the next call with the same
    tensors: a worker builds them once, not once per shard."""
    names = activation_tensors(model) if names is None else names
    model, renamed = _promoted(model, names)
    lifted = [renamed.get(n, n) for n in names]
    if samples > 0 and ingraph.supported(model):
        observers, seen = _collect_reduced(model, feeds, threads, progress, bins, momentum, lifted, samples,
                                           {} if cache is None else cache)
    else:
        observers, seen = {}, 0
        for group in groups or [names]:
            group = [renamed.get(n, n) for n in group]
            got, seen = _collect_group(model, feeds, threads, progress, bins, momentum, group, samples)
            observers.update(got)
    for o in observers.values():
        o.canonicalize()  # the grid a file records, whatever the batch order: shards merge into the same bytes
    return {n: observers[renamed.get(n, n)] for n in names}, seen


class _Unstacked(Exception):
    """The stacked statistics run did not give each one-row feed's own statistics: run the feeds one at a time."""


class _Held(Exception):
    """Tensors whose batch held inf or NaN: observed in full on the next attempt."""

    def __init__(self, tensors: set[str]):
        super().__init__(f"{len(tensors)} tensors held inf/NaN")
        self.tensors = tensors


def _collect_reduced(model, feeds, threads, progress, bins, momentum, names, samples, cache) -> tuple[dict[str, TensorObserver], int]:
    """One pass with the statistics in the graph. A tensor whose values were not all finite in some batch (attention
    masks: -inf), and the tensors derived from it, are then observed in full, from the first batch again, so every
    tensor's statistics are those of all its batches, made one way."""
    key = (tuple(names), samples, threads)
    if ("chains", key) not in cache:
        cache[("chains", key)] = (derive.chains(model, names), set())
    chains, full = cache[("chains", key)]  # a worker's later shards start from the tensors known to hold inf/NaN
    while True:
        try:
            return _reduced_pass(model, feeds, threads, progress, bins, momentum, names, chains, full, samples, cache, key)
        except _Held as held:
            full |= held.tensors
        except _Unstacked:
            cache[("rows", key)] = False


# One-row feeds (the default --batch-size 1) run STACK_ROWS at a time, each row's statistics read apart in the graph
# (ingraph.StatsGraph ``rows``): at batch 1 a run's own cost (its nodes' dispatch, its outputs, folding each tensor in
# Python) was most of what the statistics cost past a float pass. PP-OCRv4 rec, 160 lines, the whole statistics pass in
# interleaved rounds: 0.72x the time of one row a run with 4 rows a run, 0.74x with 8, 0.82x with 2; 8 held 5 MB more.
# Rows stack while the stacked inputs hold at most STACK_VALUES values (a 480x480 page runs alone: its run's own cost is
# nothing beside its convolutions). The first stack is checked row by row against each row run alone: the statistics
# must be the same bits (a tensor that mixes rows, a kernel that rounds differently with more rows: the feeds then run
# one at a time, as before).
STACK_ROWS = 4
STACK_VALUES = 1 << 19


def stack_rows(model: onnx.ModelProto, first: dict | None) -> tuple[str | None, int]:
    """(the input a stacked feed's rows are counted on, how many one-row feeds a statistics run takes), or (None, 1)
    where feeds cannot stack: a feed of more than one row, a scalar input, an input whose first axis is fixed."""
    if not first:
        return None, 1
    declared = {i.name: i for i in model.graph.input if i.name in first}
    arrays = [np.asarray(v) for v in first.values()]
    if len(declared) != len(first) or any(a.ndim == 0 or a.shape[0] != 1 for a in arrays):
        return None, 1
    for vi in declared.values():
        dims = vi.type.tensor_type.shape.dim
        if not dims or dims[0].dim_value > 0:  # fixed (Paddle writes -1 for a free axis)
            return None, 1
    rows = max(1, min(STACK_ROWS, STACK_VALUES // max(1, sum(a.size for a in arrays))))
    return (next(iter(declared)), rows) if rows > 1 else (None, 1)


def _reduced_pass(model, feeds, threads, progress, bins, momentum, names, chains, full, samples, cache, key):
    inputs = {i.name for i in model.graph.input}
    derived = {t: c for t, c in chains.items() if t not in full and c[0] not in full}
    roots = [n for n in names if n not in derived]
    given = [n for n in roots if n in inputs]
    reduced = [n for n in roots if n not in inputs and n not in full]
    rows_input, stack = (None, 1) if full or not reduced or cache.get(("rows", key)) is False else \
        stack_rows(model, next(iter(feeds), None))
    made = (key, frozenset(full), rows_input)
    if made not in cache:
        for stale in [k for k in cache if isinstance(k, tuple) and len(k) == 3 and k[0] == key and k != made]:
            del cache[stale]  # one session alive: a restart frees the last
        graph = ingraph.StatsGraph(model, reduced, [n for n in roots if n not in inputs and n in full], samples, rows=rows_input)
        with graph.applied() as applied:  # the model itself, for as long as onnxruntime reads it: no copy of the weights
            sess = session(applied, threads or default_threads(), by_priority=True)
        cache[made] = (graph, sess)
    graph, sess = cache[made]
    fetch = graph.outputs()
    observers = {n: TensorObserver(bins=bins, momentum=momentum) for n in names}
    followers = derive.followers(derived)

    def observe(index: int, feed: dict, fetched: list) -> None:
        batches = graph.read(fetched)
        for name in given:
            batches[name] = ingraph.batch_of(feed[name], samples)
        held = set()
        for root, b in batches.items():
            if b is None:
                held |= {root} | {t for t, *_ in followers.get(root, [])}
                continue
            observers[root].add(b, index)
            got = {None: (b.lo, b.hi, b.values)}  # each follower's from its parent's (derive.followers)
            for t, parent, steps in followers.get(root, []):
                lo, hi, values = got[parent]
                lo, hi = derive.extremes(steps, lo, hi) if b.count else (0.0, 0.0)
                got[t] = lo, hi, derive.values(steps, values)
                if b.nonfinite or not (np.isfinite(lo) and np.isfinite(hi)):
                    held.add(t)
                    continue
                observers[t].add(Batch(b.count, 0, lo, hi, got[t][2]), index)
        if held:
            raise _Held(held)

    def observe_rows(indices: list[int], group: list[dict], fetched: list) -> None:
        """``observe`` for a stack of one-row feeds: each tensor's rows folded in at once (TensorObserver.add_rows)."""
        for index, feed in zip(indices, group):  # graph inputs, from each feed
            for name in given:
                observers[name].add(ingraph.batch_of(feed[name], samples), index)
        held = set()
        for root, r in graph.read_rows(fetched).items():
            if r is None:
                held |= {root} | {t for t, *_ in followers.get(root, [])}
                continue
            if r.count == 0:  # an empty tensor: nothing to fold, for it or its followers
                continue
            observers[root].add_rows(r.count, r.lo, r.hi, r.values, indices)
            got = {None: (r.lo, r.hi, r.values)}
            for t, parent, steps in followers.get(root, []):
                lo, hi, values = got[parent]
                lo, hi = derive.extremes_rows(steps, lo, hi)
                values = derive.values(steps, values)
                got[t] = lo, hi, values
                if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
                    held.add(t)
                    continue
                observers[t].add_rows(r.count, lo, hi, values, indices)
        if held:
            raise _Held(held)

    if rows_input is not None:
        checked = bool(cache.get(("rows", key)))
        sums = frozenset(p.total for p in graph.probes.values())
        check = None if checked else (lambda *a: _same_rows(*a, sums=sums))
        seen = _stream_stacked(sess, feeds, fetch, stack, observe_rows, progress, check)
        cache[("rows", key)] = True
        return observers, seen
    # Inline, not on a second thread: onnxruntime's threads use every core here and spin between kernels, and the
    # statistics left to fold are a few per cent of a batch's time (on 2 cores a second thread made the pass slower).
    return observers, _stream(sess, feeds, fetch, observe, progress, overlap=False)


def _same_rows(sess, fetch: list[str], group: list[dict], fetched: list, sums: frozenset = frozenset()) -> bool:
    """Whether a stacked run's statistics (``fetched``) are, row by row, the bits each one-row feed of ``group`` gives
    alone: extremes and samples equal, sizes equal per row; of the ``sums`` (there to see inf and NaN, and summed in
    another order over more rows) whether each is finite."""
    alone = [run(sess, feed, fetch) for feed in group]
    for k, name in enumerate(fetch):
        got = np.asarray(fetched[k])
        parts = [np.asarray(a[k]) for a in alone]
        if got.dtype == np.int64:  # a size: [rows, n] against [1, n]
            if any(p.shape != (2,) or int(p[0]) != 1 or int(p[1]) != int(got[1]) for p in parts) or int(got[0]) != len(group):
                return False
            continue
        want = np.concatenate(parts)
        if got.shape != want.shape:
            return False
        if name in sums:
            if not np.array_equal(np.isfinite(got), np.isfinite(want)):
                return False
        elif got.tobytes() != want.tobytes():
            return False
    return True


def _same_feed(a: dict, b: dict) -> bool:
    return all(np.array_equal(a[k], b[k]) for k in a)


def _stream_stacked(sess, feeds, fetch: list[str], stack: int, observe_rows, progress, check=None) -> int:
    """``_stream`` for one-row feeds run ``stack`` at a time: consecutive feeds of the same shapes and types are
    concatenated along axis 0, and each stack's statistics handed to ``observe_rows`` with the feeds' indices, in
    order. ``check`` (the first stack of two or more rows not all alike): whether the stack gives each row's own
    statistics; if it does not (or the stacked run fails, or a feed holds more than one row) the pass stops with
    _Unstacked."""
    seen = 0
    group: list[dict] = []
    indices: list[int] = []

    def flush():
        nonlocal check
        if check is not None and len(group) > 1 and all(_same_feed(f, group[0]) for f in group[1:]):
            for k in range(len(group)):  # rows all alike cannot show a tensor mixing them: alone, and check a later stack
                observe_rows(indices[k:k + 1], group[k:k + 1], run(sess, group[k], fetch))
            return done(len(group))
        stacked = group[0] if len(group) == 1 else {k: np.concatenate([f[k] for f in group]) for k in group[0]}
        if check is not None and len(group) > 1:
            try:
                values = run(sess, stacked, fetch)
                same = check(sess, fetch, group, values)
            except QconvError:
                same = False
            if not same:
                raise _Unstacked()
            check = None
        else:
            values = run(sess, stacked, fetch)
        observe_rows(list(indices), list(group), values)
        done(len(group))

    def done(rows: int):
        nonlocal seen
        seen += rows
        if progress:
            progress(rows)
        group.clear()
        indices.clear()

    stacked_as = None  # the shapes and types of the stack being filled
    for index, feed in (feeds.indexed() if hasattr(feeds, "indexed") else enumerate(feeds)):
        if not all(np.ndim(v) >= 1 and np.shape(v)[0] == 1 for v in feed.values()):
            raise _Unstacked()  # a feed of several rows is one batch: the graph would read it as several
        signature = tuple((k, np.shape(v), np.asarray(v).dtype.str) for k, v in feed.items())
        if group and (len(group) == stack or signature != stacked_as):
            flush()
        stacked_as = signature
        group.append(feed)
        indices.append(index)
    if group:
        flush()
    if seen == 0:
        raise QconvError("no calibration samples: the data set is empty")
    return seen


def _stream(sess, feeds, fetch: list[str], observe, progress, overlap: bool = True) -> int:
    """Run every feed, handing each batch's outputs to ``observe``, in order. With ``overlap``, on a second thread while
    onnxruntime runs the next batch (numpy and onnxruntime both release the GIL): at most two batches are alive."""
    seen = 0
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        # Each batch's index in the whole data set orders the moving averages, so shards merge exactly.
        for index, feed in (feeds.indexed() if hasattr(feeds, "indexed") else enumerate(feeds)):
            values = run(sess, feed, fetch)
            if pending is not None:
                pending.result()
            if overlap:
                pending = pool.submit(observe, index, feed, values)
            else:
                observe(index, feed, values)
            seen += 1
            if progress:
                progress(1)
        if pending is not None:
            pending.result()
    if seen == 0:
        raise QconvError("no calibration samples: the data set is empty")
    return seen


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


def memory_groups(model: onnx.ModelProto, feeds: Iterable[dict], names: list[str], max_memory: int,
                  samples: int = DEFAULT_SAMPLES) -> list[list[str]]:
    """``names`` cut so one pass holds at most ``max_memory`` bytes of exposed activations (two feeds alive). Statistics
    computed in the graph (``samples`` > 0) expose almost nothing: one pass."""
    first = next(iter(feeds), None)
    if first is None:
        raise QconvError("no calibration samples: the data set is empty")
    if samples > 0 and ingraph.supported(model):
        return [list(names)]
    return groups_within(names, tensor_bytes(model, first, names), max(1, max_memory // 2))


def _collect_group(model, feeds, threads, progress, bins, momentum, names, samples) -> tuple[dict[str, TensorObserver], int]:
    # One core is left to the statistics thread unless the caller says otherwise.
    sess = exposed_session(model, {n: onnx.TensorProto.FLOAT for n in names}, threads or max(1, (os.cpu_count() or 2) - 1))
    outputs = [o.name for o in sess.get_outputs()]
    inputs = [n for n in names if n in {i.name for i in sess.get_inputs()}]
    wanted = [n for n in outputs if n in set(names) and n not in inputs]  # an input is observed from the feed, once
    observers = {n: TensorObserver(bins=bins, momentum=momentum) for n in names}

    def observe(index: int, feed: dict, values: list) -> None:  # inputs from the feed, the rest as fetched; one rule
        for name, value in [(n, feed[n]) for n in inputs] + list(zip(wanted, values)):
            observers[name].add(ingraph.batch_of(value, samples), index)

    return observers, _stream(sess, feeds, wanted, observe, progress)
