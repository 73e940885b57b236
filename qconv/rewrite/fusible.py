"""Float regions of a written model, in the forms onnxruntime's CPU provider runs as one kernel.

Intake writes hard activations as Mul/Add/Clip (qconv.graph.intake.expand_hard_activations) and divisions by a
constant as multiplications (``div_to_mul``), so that int8 can cover them; exporters write GELU in orders onnxruntime's
own fusion does not recognize. Where the plan leaves such a region float, those forms cost time and buy nothing:

- a gate ``clip(x + b, 0, u) * k`` with ``k * u = 1``, or ``clip(x * a + b, 0, 1)``, is ``HardSigmoid(x)`` (one
  elementwise kernel instead of three; PP-OCR's text-line classifier, all float on this CPU: 0.66x the time of its
  four-op hard-swish);
- ``x * ((1 + erf(x / sqrt 2)) * 0.5)`` (torch 2.13's export of nn.GELU), or with ``x * (1 / sqrt 2)`` (div_to_mul's),
  is written ``(x * 0.5) * (1 + erf(x / sqrt 2))``, the order onnxruntime's GeluFusion fuses into one Gelu kernel.

Only chains whose every intermediate tensor is read by the next node alone (not quantized, not an output, not read
by a subgraph) move, and only float32 ones (their constants say so). The results differ from the unfused ops by float
rounding (1e-6 of the classifier's probabilities)."""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qconv.calib.derive import Step, step_of
from qconv.graph import Graph

_ONNX = ("", "ai.onnx")


def fuse(model: onnx.ModelProto) -> dict | None:
    """Rewrite ``model``'s main graph in place; {"hard_sigmoid": n, "gelu": n} of what moved (None: nothing)."""
    gates = hard_sigmoids(model)
    gelus = gelu_order(model)
    return {"hard_sigmoid": gates, "gelu": gelus} if gates or gelus else None


def _step(g: Graph, node: onnx.NodeProto | None) -> tuple[str, Step] | None:
    """The exact elementwise step ``node`` is (qconv.calib.derive: its variable input, the op and its float32 scalar
    constants), where each constant has rank 0 or 1, so the node broadcasts its input to nothing new."""
    if node is None or node.domain not in _ONNX or any(len(g.initializers[i].dims) > 1 for i in node.input if i in g.initializers):
        return None
    return step_of(node, g)


def _scale(g: Graph, node: onnx.NodeProto | None) -> tuple[str, float] | None:
    """(x, k) of ``x * k`` or ``x / (1/k)``."""
    got = _step(g, node)
    if got is None or got[1].op not in ("mul", "div") or (got[1].op == "div" and got[1].a == 0):
        return None
    return got[0], got[1].a if got[1].op == "mul" else 1.0 / got[1].a


def _shift(g: Graph, node: onnx.NodeProto | None) -> tuple[str, float] | None:
    """(x, b) of ``x + b``."""
    got = _step(g, node)
    return (got[0], got[1].a) if got is not None and got[1].op == "add" else None


def _next(g: Graph, name: str, op: str) -> onnx.NodeProto | None:
    """The node that alone reads ``name`` (not an output, not read by a subgraph), if it is an ``op``."""
    n = g.only_consumer(name)
    return n if n is not None and n.op_type == op and n.domain in _ONNX else None


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(1.0, abs(b))


def hard_sigmoids(model: onnx.ModelProto) -> int:
    """Gates ``clip(x + b, 0, u) * k`` (k u = 1) and ``clip(x * a + b, 0, 1)`` (a a scalar, else ``x * a`` stays a Mul)
    as ``HardSigmoid(x; alpha, beta)``."""
    g = Graph(model)
    replace: dict[int, onnx.NodeProto] = {}  # id of the chain's last node -> the HardSigmoid
    drop: set[int] = set()
    for clip in [n for n in model.graph.node if n.op_type == "Clip"]:
        got = _step(g, clip)
        if got is None or got[1].op != "clip" or got[1].a != 0.0:
            continue
        upper = got[1].b
        add = g.producer.get(got[0])
        shifted = _shift(g, add) if add is not None and g.only_consumer(add.output[0]) is clip else None
        if shifted is None:
            continue
        y, b = shifted
        after = _scale(g, g.only_consumer(clip.output[0]))
        before_node = g.producer.get(y)
        before = _scale(g, before_node) if before_node is not None and g.only_consumer(y) is add else None
        if after is not None and _close(after[1] * upper, 1.0):  # clip(x + b, 0, u) * (1/u)
            x, alpha, beta, chain = y, after[1], b * after[1], [add, clip, g.only_consumer(clip.output[0])]
        elif upper == 1.0 and before is not None:  # clip(x * a + b, 0, 1)
            x, alpha, beta, chain = before[0], before[1], b, [before_node, add, clip]
        elif upper == 1.0:  # clip(y + b, 0, 1): y scaled per channel (gated equalization's), or not at all
            x, alpha, beta, chain = y, 1.0, b, [add, clip]
        else:
            continue
        if any(id(n) in drop or id(n) in replace for n in chain):
            continue
        last = chain[-1]
        replace[id(last)] = helper.make_node("HardSigmoid", [x], [last.output[0]], name=g.unique(f"{last.name or 'gate'}/hard_sigmoid"),
                                             alpha=float(np.float32(alpha)), beta=float(np.float32(beta)))
        drop |= {id(n) for n in chain[:-1]}
    if replace:
        nodes = [replace.get(id(n), n) for n in model.graph.node if id(n) not in drop]
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return len(replace)


def gelu_order(model: onnx.ModelProto) -> int:
    """``erf``-GELUs as ``(x * 0.5) * (1 + erf(x / sqrt 2))``: a Div by sqrt 2 (not a Mul by its reciprocal), and the
    0.5 on x, which is the one form onnxruntime's GeluFusion reads (onnxruntime 1.32)."""
    g = Graph(model)
    changed = 0
    consts: dict[str, str] = {}

    def const(key: str, value: float) -> str:
        if key not in consts:
            consts[key] = g.unique(f"qconv_fused/{key}")
            model.graph.initializer.append(numpy_helper.from_array(np.array(value, np.float32), consts[key]))
        return consts[key]

    for erf in [n for n in model.graph.node if n.op_type == "Erf" and n.domain in _ONNX]:
        scaled = g.producer.get(erf.input[0])
        got = _scale(g, scaled) if scaled is not None and g.only_consumer(erf.input[0]) is erf else None
        if got is None or not _close(got[1], 1.0 / math.sqrt(2.0)):
            continue
        x = got[0]
        add = _next(g, erf.output[0], "Add")
        if _shift(g, add) != (erf.output[0], 1.0):
            continue
        m1 = _next(g, add.output[0], "Mul")
        if m1 is None:
            continue
        other = [i for i in m1.input if i != add.output[0]]
        if len(other) != 1:
            continue
        half = g.producer.get(other[0])
        if half is not None and half.op_type == "Mul" and g.only_consumer(other[0]) is m1 and _scale(g, half) == (x, 0.5):
            pass  # (x * 0.5) * (1 + erf): the form already
        else:
            m2 = _next(g, m1.output[0], "Mul")
            outer = [i for i in m2.input if i != m1.output[0]] if m2 is not None else []
            # (1 + erf) * 0.5 * x (torch's) or (1 + erf) * x * 0.5: one of the two Muls by 0.5, the other by x
            if len(outer) != 1 or not ((_scale(g, m1) == (add.output[0], 0.5) and outer[0] == x)
                                       or (other[0] == x and _scale(g, m2) == (m1.output[0], 0.5))):
                continue
            m1.input[:] = [x, const("half", 0.5)]
            m2.input[:] = [m1.output[0], add.output[0]]
        scaled.op_type = "Div"
        scaled.input[:] = [x, const("sqrt2", math.sqrt(2.0))]
        changed += 1
    return changed
