"""Evaluation as the jobs use it: fidelity of a written model against its original, latency, the per-node
profile, per-layer error on a sample, the output comparison as shard tasks on Dask, and the warning a damaged
model gets (with the range method that measures better)."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from qconv import clock, distributed, io, pipeline, runtime
from qconv.calib.ranges import METHODS
from qconv.data import FeedSource, feed_rows, is_cache_name
from qconv.errors import QconvError
from qconv.graph import Graph
from qconv.measure import compare, usermetric
from qconv.measure.latency import latency
from qconv.measure.layers import probe_pairs, probe_sizes
from qconv.measure.reference import Reference
from qconv.measure.tally import Tally

DAMAGE_COSINE = 0.9  # below this output cosine (or top-1 agreement) the model is damaged: say so loudly


ALTERNATIVE_ROWS = 16  # rows on which other range methods are measured when a model is damaged


@dataclass(frozen=True, kw_only=True)
class EvalOptions:
    """What the report measures."""

    data: Path | None = None
    labels: Path | None = None
    latency: bool = True
    layer_samples: int = compare.DEFAULT_LAYER_SAMPLES  # 0: no per-layer analysis
    threads: int | None = None
    profile: bool = True  # with latency: per-node kernel times of both models
    executor: str | None = None  # the output comparison as shard tasks on Dask (see qconv.distributed)
    shards: int | None = None
    metric: str | None = None  # --metric MODULE:FUNCTION (qconv.measure.usermetric)


def evaluate(prepared: pipeline.Prepared, result: pipeline.Result, source: FeedSource, labels, opts: EvalOptions,
             progress=pipeline.no_progress) -> tuple[dict, Reference]:
    """Fidelity of the written model against the original file, latency, and per-layer error on a sample."""
    qtypes = None
    if result.plan.config.needs_calibration:  # the QDQ analysis model: known types, no shape inference
        ftypes = Graph(prepared.model).types
        qtypes = {**ftypes, **{dq: onnx.TensorProto.FLOAT for dq in result.dequantized.values()}}
    io = result.findings.quantized_io
    out, reference = evaluate_models(str(prepared.path), result.model, prepared.model, result.analysis_model,
                                      result.dequantized, source, labels, opts, progress, qtypes, io)
    if opts.latency and opts.profile and not io:
        out["profile"] = node_profile(prepared, result, next(iter(source)), opts.threads or runtime.default_threads())
    return out, reference


def _sharded_outputs(float_src, quant_src, source: FeedSource, labels, opts: EvalOptions, io_params, progress) -> dict:
    """compare_outputs as shard tasks: error sums merged in shard order, predictions scored in feed order."""
    import tempfile

    executor = distributed.parse_executor(opts.executor)
    shards = opts.shards or distributed.DEFAULT_SHARDS
    with tempfile.TemporaryDirectory(prefix="qconv-eval.") as tmp:
        paths = []
        for k, src in enumerate((float_src, quant_src)):  # workers load models from paths, never from shipped bytes
            if isinstance(src, onnx.ModelProto):
                p = Path(tmp) / f"model{k}.onnx"
                io.save_model(src, p)
                src = str(p)
            paths.append(str(src))
        tasks = [(paths[0], paths[1], str(source.path), source.specs, source.batch_size, (k, shards), source.cast, io_params,
                  labels is not None, opts.metric) for k in range(shards)]
        parts = distributed.run_tasks(executor, evaluate_shard, tasks, "evaluating shards", progress)
    tally = Tally(parts[0]["tally"].names, metric=usermetric.load(opts.metric))
    for p in parts:
        tally.merge(p["tally"])
    if tally.batches == 0:
        raise QconvError("evaluation data set is empty")
    if labels is not None:
        preds = sorted((x for p in parts for x in p["preds"]), key=lambda x: x[0])
        tally.score_labels(np.concatenate([x[1] for x in preds]), np.concatenate([x[2] for x in preds]), labels)
    return {**tally.summary(labels), "rows": tally.rows}


@clock.timed("profile")
def node_profile(prepared: pipeline.Prepared, result: pipeline.Result, feed: dict, threads: int) -> dict:
    """Per-node kernel times of the float and the written model (onnxruntime's profiler) on one feed."""
    from qconv.measure import profile as prof

    plan = result.plan
    ft = prof.attribute(prof.profile(prepared.model, feed, threads), prepared.model)
    qt = prof.attribute(prof.profile(result.model, feed, threads), prepared.model)
    for t in ft + qt:  # onnxruntime fuses Conv+Relu under the Relu's output name; qconv folded that Relu into the Conv
        t.node = plan.folded.get(t.node, t.node)
    quantized = {n.name for n in plan.nodes if n.quantized and n.name not in plan.folded}
    ops = {n.name: n.op_type for n in prepared.model.graph.node}
    return prof.compare(ft, qt, quantized, ops)


@clock.timed("evaluation")
def evaluate_models(float_src, quant_src, float_layers, quant_layers, dequantized, source: FeedSource, labels,
                     opts: EvalOptions, progress, qtypes=None, io: dict | None = None) -> tuple[dict, Reference]:
    """``io``: integer-I/O parameters of the quantized model; its inputs are quantized and outputs dequantized here."""
    threads = opts.threads or runtime.default_threads()
    timed = True if opts.latency else None  # a model past 2 GB is prepacked only when it is timed
    fsess = runtime.session(float_src, threads, spinning=False, prepack=timed)
    qsess = runtime.session(quant_src, threads, spinning=False, prepack=timed)
    if io:
        from qconv.rewrite.quantized_io import IntegerIO

        qsess = IntegerIO(qsess, io)
    metric = usermetric.load(opts.metric)
    reference = Reference([o.name for o in fsess.get_outputs()], metric=metric)
    if distributed.parse_executor(opts.executor).distributed or opts.shards:
        out = _sharded_outputs(float_src, quant_src, source, labels, opts, io, progress)
        for feed in compare.limited(source, source.specs, ALTERNATIVE_ROWS):  # the rows other candidates are measured on
            reference.keep(feed, runtime.run(fsess, feed, reference.names), 1, ALTERNATIVE_ROWS)
    else:
        out = compare.compare_outputs(fsess, qsess, source, labels, progress("evaluating", source.count()), reference,
                                 ALTERNATIVE_ROWS, source.specs, metric)
    if opts.latency:
        first = next(iter(source))
        out["latency_ms"] = latency(fsess, qsess, first, threads)
        step = token_step(fsess, first)
        if step is not None:  # a decoder: what generation pays, one token at a time through the cache
            feed, past = step
            out["latency_ms"]["token"] = {**latency(fsess, qsess, feed, threads), "past": past}
    del fsess, qsess  # free their weights before the analysis sessions load theirs
    out["layer_rows"] = 0
    if opts.layer_samples > 0:
        ftypes = Graph(float_layers).types if qtypes is not None else None
        pairs = probe_pairs(float_layers, quant_layers, dequantized, ftypes, qtypes)
        if pairs:
            out["layers"], out["layer_rows"] = _layers(float_layers, quant_layers, pairs, source, opts.layer_samples, threads, progress)
    return out, reference


def token_step(fsess, feed: dict) -> tuple[dict, int] | None:
    """A decoder's next step after ``feed``: one new token (the last id again) with the KV cache ``feed`` leaves, the
    mask one longer, the position next, and the cache length; None for a model without a cache. Cache inputs (float,
    ``past``/``cache`` in the name) take the cache outputs (``present``...) in order, each the same rank and one axis
    longer than it was fed."""
    inputs = {i.name: i for i in fsess.get_inputs()}
    past = [n for n, i in inputs.items() if is_cache_name(n) and "float" in i.type and n in feed]
    present = [o.name for o in fsess.get_outputs() if is_cache_name(o.name) and "float" in o.type]
    ids = feed.get("input_ids")
    if not past or len(past) != len(present) or ids is None or np.ndim(ids) != 2 or ids.shape[1] < 1:
        return None
    made = runtime.run(fsess, feed, present)
    axes = set()
    for name, new in zip(past, made):
        old = np.asarray(feed[name])
        grown = [k for k in range(old.ndim) if new.shape[k] != old.shape[k]] if new.ndim == old.ndim else []
        if len(grown) != 1 or new.shape[grown[0]] != old.shape[grown[0]] + ids.shape[1]:
            return None
        axes.add(new.shape[grown[0]])
    if len(axes) != 1:
        return None
    length = axes.pop()
    step = dict(feed)
    step.update(zip(past, made))
    step["input_ids"] = np.ascontiguousarray(ids[:, -1:])
    rows = ids.shape[0]
    for name, value in (("attention_mask", np.ones((rows, length + 1))), ("position_ids", np.full((rows, 1), length)),
                        ("token_type_ids", np.zeros((rows, 1)))):
        if name in inputs and name in feed:
            step[name] = value.astype(np.asarray(feed[name]).dtype)
    try:
        runtime.run(fsess, step)
    except QconvError:
        return None
    return step, int(length)


def _layers(float_layers, quant_layers, pairs: dict, source: FeedSource, samples: int, threads: int, progress) -> tuple[dict, int]:
    """Per-layer statistics over the first rows of ``source`` and the rows they cover, in bounded time and memory
    (``compare.layer_plan``: fewer rows and several runs a row where the activations are large)."""
    rows = compare.limited(source, source.specs, samples)
    first = next(rows, None)
    if first is None:
        return {}, 0
    use, chunks = compare.layer_plan(probe_sizes(float_layers, first, pairs), samples)
    feeds = [first] + list(itertools.islice(rows, use - 1))  # held for every chunk: ``use`` is small where rows are big
    advance = progress("per-layer analysis", len(feeds) * len(chunks))
    stats: dict = {}
    for chunk in chunks:
        fl = runtime.exposed_session(float_layers, {t: onnx.TensorProto.FLOAT for t in chunk}, threads)
        ql = runtime.exposed_session(quant_layers, dict(pairs[t] for t in chunk), threads)
        stats.update(compare.compare_layers(fl, ql, feeds, {t: pairs[t][0] for t in chunk}, advance))
        del fl, ql
    return {t: stats[t] for t in pairs if t in stats}, sum(feed_rows(f, source.specs) for f in feeds)


def damage_warnings(evaluation: dict, prepared, result: pipeline.Result, calib, reference: Reference,
                    threads: int | None) -> list[str]:
    """A loud warning when the written model is damaged (output cosine or top-1 agreement below 0.9):
    the outputs hurt, the worst layers, and, for calibrated modes, which range method measures better."""
    outs = evaluation.get("outputs", {})
    bad = [(k, v["cosine"]) for k, v in outs.items() if v["cosine"] < DAMAGE_COSINE]
    agreement = evaluation.get("top1_agreement")
    classifier = bool(outs) and (evaluation.get("task") is not None or _rank(prepared.model) == 2 or _scores(prepared.model)) \
        and not _normalized(prepared.model)
    low_agreement = classifier and agreement is not None and agreement < DAMAGE_COSINE
    if not bad and not low_agreement:
        return []
    what = [f"output '{k}' cosine {c:.3f}" for k, c in bad]
    if low_agreement:
        what.append(f"top-1 agreement with the original {agreement:.3f}")
    msg = f"the quantized model is damaged: {', '.join(what)} (below {DAMAGE_COSINE})"
    layers = sorted(((t, v["sqnr_db"]) for t, v in evaluation.get("layers", {}).items() if isinstance(v["sqnr_db"], float)),
                    key=lambda kv: kv[1])[:3]
    if layers:
        msg += "; worst layers: " + ", ".join(f"{t} ({db:.1f} dB)" for t, db in layers)
    if result.plan.config.needs_calibration and calib is not None and reference.feeds:
        msg += "; " + _better_method(prepared, result, calib, reference, threads)
    return [msg]


def _first_output_maker(model: onnx.ModelProto) -> tuple[onnx.NodeProto | None, dict]:
    """The node that computes the first output, past data movement (onnx's opset converter wraps Softmax-12 in two
    Reshapes), and the graph's {tensor: producer}."""
    producers = {o: n for n in model.graph.node for o in n.output}
    node = producers.get(model.graph.output[0].name) if model.graph.output else None
    while node is not None and node.op_type in ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity"):
        node = producers.get(node.input[0])
    return node, producers


def _scores(model: onnx.ModelProto) -> bool:
    """The first output is class scores per position (a Softmax/LogSoftmax result, e.g. an OCR recognizer's)."""
    node, _ = _first_output_maker(model)
    return node is not None and node.op_type in ("Softmax", "LogSoftmax")


NORM_PATH = ("Expand", "Clip", "Max", "Add", "Sqrt", "Reshape", "Unsqueeze", "Identity", "Cast")


def _normalized(model: onnx.ModelProto) -> bool:
    """The first output is divided by its own L2 norm (a sentence embedding: ``F.normalize``, LpNormalization): its
    argmax means nothing, so top-1 agreement does not judge it (MiniLM was called damaged at cosine 0.984)."""
    node, producers = _first_output_maker(model)
    if node is None or node.op_type == "LpNormalization":
        return node is not None
    if node.op_type != "Div" or len(node.input) < 2:
        return False
    divisor = producers.get(node.input[1])
    for _ in range(8):
        if divisor is None:
            return False
        if divisor.op_type in ("ReduceL2", "ReduceSumSquare"):
            return True
        if divisor.op_type not in NORM_PATH:
            return False
        divisor = producers.get(divisor.input[0])
    return False


def _rank(model: onnx.ModelProto) -> int:
    t = model.graph.output[0].type.tensor_type if model.graph.output else None
    return len(t.shape.dim) if t is not None and t.HasField("shape") else 0


def _better_method(prepared, result: pipeline.Result, calib, reference: Reference, threads) -> str:
    """Measure the other range methods on the reference rows; name the best if it beats the one used."""
    config = result.plan.config
    scores = {config.method: reference.compare(runtime.session(result.model, threads)).metrics().cosine}
    for method in METHODS:
        if method == config.method:
            continue
        try:
            other = pipeline.quantize(prepared, calib, dataclasses.replace(config, method=method), overrides=result.plan.overrides)
        except QconvError:
            continue
        scores[method] = reference.compare(runtime.session(other.model, threads)).metrics().cosine
    best = max(scores, key=lambda m: (scores[m], m == config.method))
    measured = ", ".join(f"{m} {c:.3f}" for m, c in sorted(scores.items(), key=lambda kv: -kv[1]))
    rows = reference.rows
    if best != config.method:
        return f"--method {best} measured better on {rows} rows (worst-output cosine: {measured})"
    return f"no other range method measured better on {rows} rows ({measured}): keep the worst layers float with --exclude-nodes"


def evaluate_shard(float_model: str, quant_model: str, data: str, specs: list, batch_size: int, shard: tuple[int, int],
                   cast: bool, io: dict | None, predictions: bool, metric: str | None = None) -> dict:
    """One shard's output comparison: error sums per output, top-1 agreement counts, and (for labels) the first
    output's argmax of both models per feed index, so the driver can score them against the labels in order."""
    from qconv.measure.stats import top1

    fsess, qsess = runtime.session(float_model, 1), runtime.session(quant_model, 1)
    if io:
        from qconv.rewrite.quantized_io import IntegerIO

        qsess = IntegerIO(qsess, io)
    names = [o.name for o in fsess.get_outputs()]
    tally = Tally(names, metric=usermetric.load(metric))
    preds = []
    for index, feed in FeedSource(data, specs, batch_size=batch_size, shard=shard, cast=cast).indexed():
        ref, got = runtime.run(fsess, feed, names), runtime.run(qsess, feed, names)
        tally.add(ref, got, None, feed_rows(feed, specs))
        if predictions:
            preds.append((index, top1(ref[0]), top1(got[0])))
    return {"tally": tally, "preds": preds}
