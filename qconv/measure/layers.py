"""Which tensors to compare layer by layer, and models instrumented to expose them.

A float tensor T of the (normalized) float model is compared with the tensor the quantized model feeds
onward in its place: T's DequantizeLinear output where the plan quantized T (so the error includes T's
own rounding), else T itself when the quantized model still computes a tensor of that name (dynamic,
fp16 and int4 keep node output names). Any two models can be compared this way, including ones made by
other tools, as long as they keep the original tensor names.
"""

from __future__ import annotations

import numpy as np
import onnx

from qconv.graph import FLOAT_TYPES, Graph, without_weights


def tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element types of the main graph's tensors (after onnx shape inference, where it succeeds).

    Inference reads a copy without the large initializers' data (``without_weights``): the weights are not copied.
    """
    try:
        inferred = onnx.shape_inference.infer_shapes(without_weights(model), strict_mode=False)
    except Exception:  # noqa: BLE001 - inference is best effort: contrib ops may defeat it
        inferred = model
    types = Graph(inferred).types
    types.update({t.name: t.data_type for t in model.graph.initializer})
    return types


def probe_pairs(float_model: onnx.ModelProto, quant_model: onnx.ModelProto,
                dequantized: dict[str, str] | None = None, ftypes: dict[str, int] | None = None,
                qtypes: dict[str, int] | None = None) -> dict[str, tuple[str, int]]:
    """{float tensor: (tensor in the quantized model, its element type)} for every comparable activation.

    Types that the caller already knows (a normalized model carries them) are not inferred again."""
    dequantized = dequantized or {}
    ftypes = tensor_types(float_model) if ftypes is None else ftypes
    qtypes = tensor_types(quant_model) if qtypes is None else qtypes
    produced = {o for n in quant_model.graph.node for o in n.output}
    graph_outputs = {o.name for o in float_model.graph.output}
    pairs = {}
    for node in float_model.graph.node:
        for t in node.output:
            if not t or t in graph_outputs or ftypes.get(t) != onnx.TensorProto.FLOAT:
                continue
            q = dequantized.get(t, t)
            if q in produced and qtypes.get(q) in FLOAT_TYPES:
                pairs[t] = (q, qtypes[q])
    return pairs


def dequantized_of(model: onnx.ModelProto) -> dict[str, str]:
    """{tensor: output of the DequantizeLinear its QuantizeLinear feeds} in any QDQ model (any tool's)."""
    g = Graph(model)
    out = {}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input and node.output:
            dq = [c for c in g.consumers.get(node.output[0], []) if c.op_type == "DequantizeLinear"]
            if dq:
                out.setdefault(node.input[0], dq[0].output[0])
    return out


def probe_sizes(model: onnx.ModelProto, feed: dict, names) -> dict[str, int]:
    """{tensor: elements on ``feed``} of ``names``, from onnx shape inference with the graph inputs fixed to the
    feed's shapes; a tensor whose shape it cannot settle (shapes computed at run time, as a transformer's Reshape
    targets) counts as the median of those it settled. On MiniLM 32 of 251 probes are unsettled: counted as the
    largest (a vocabulary-sized tensor) they made the estimate 55x the real values."""
    m = without_weights(model)  # the copy and the inference never see the big initializers
    for i in m.graph.input:
        if i.name in feed and i.type.HasField("tensor_type"):
            shape = i.type.tensor_type.shape
            shape.ClearField("dim")
            for d in np.shape(feed[i.name]):
                shape.dim.add().dim_value = int(d)
    try:
        m = onnx.shape_inference.infer_shapes(m, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - best effort: contrib ops may defeat it
        pass
    known = {}
    for vi in list(m.graph.value_info) + list(m.graph.output):
        dims = vi.type.tensor_type.shape.dim if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape") else None
        if dims is not None and all(d.HasField("dim_value") for d in dims):
            known[vi.name] = int(np.prod([d.dim_value for d in dims], dtype=np.int64))
    fallback = int(np.median([known[t] for t in names if t in known])) if any(t in known for t in names) else 1
    return {t: known.get(t, fallback) for t in names}
