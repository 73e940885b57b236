"""Integer model inputs and outputs (TFLite's full-integer mode with uint8/int8 I/O), for accelerators and MCU
runtimes that take integer tensors.

On a QDQ model: each float graph input X that the plan quantized becomes an integer input: its QuantizeLinear
goes away (the caller feeds the quantized values), and a DequantizeLinear gives the float value to any reader
that wants it. Each float graph output Y gets a QuantizeLinear with the range calibration observed for Y, and
the integer tensor is the output. Names stay; only the element types change. ``io_params`` says, per tensor,
the type, scale and zero point a caller uses to quantize its inputs and dequantize its outputs.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qconv.errors import QconvError
from qconv.graph import Graph, topo_sort
from qconv.numeric import qmath


def integer_io(model: onnx.ModelProto, plan, ranges: dict[str, tuple[float, float]]) -> tuple[onnx.ModelProto, dict]:
    """The model with integer inputs and outputs, and {tensor: {"role", "type", "scale", "zero_point"}}."""
    qt = qmath.qtype(plan.config.quantized_io)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = Graph(m)
    params: dict[str, dict] = {}
    for vi in m.graph.input:
        if vi.name in g.initializers or vi.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            continue
        qs = [n for n in g.consumers.get(vi.name, []) if n.op_type == "QuantizeLinear"]
        if not qs:
            raise QconvError(f"--quantized-io: input '{vi.name}' is not quantized by the plan (its readers stay float), so it "
                             "cannot become an integer input; drop --quantized-io or quantize its readers")
        q = qs[0]
        scale, zp = g.array(q.input[1]), g.array(q.input[2])
        if zp.dtype != qt.dtype:
            raise QconvError(f"--quantized-io {qt.name}: input '{vi.name}' is quantized to {zp.dtype}")
        for other in qs[1:]:
            if not (np.array_equal(g.array(other.input[1]), scale) and np.array_equal(g.array(other.input[2]), zp)):
                raise QconvError(f"--quantized-io: input '{vi.name}' is quantized twice with different parameters")
        float_readers = [n for n in g.consumers.get(vi.name, []) if n.op_type != "QuantizeLinear"]
        for qn in qs:  # their readers take the integer input directly
            for reader in g.consumers.get(qn.output[0], []):
                reader.input[:] = [vi.name if i == qn.output[0] else i for i in reader.input]
            m.graph.node.remove(qn)
        if float_readers:
            f = g.unique(vi.name + "_float")
            m.graph.node.append(helper.make_node("DequantizeLinear", [vi.name, q.input[1], q.input[2]], [f],
                                                 name=g.unique(vi.name + "_io_DequantizeLinear")))
            for reader in float_readers:
                reader.input[:] = [f if i == vi.name else i for i in reader.input]
        vi.type.tensor_type.elem_type = qt.onnx_type
        params[vi.name] = {"role": "input", "type": qt.name, "scale": float(scale), "zero_point": int(zp)}
    for vo in m.graph.output:
        if vo.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            continue
        if vo.name not in ranges:
            raise QconvError(f"--quantized-io: output '{vo.name}' has no calibration range: re-run calibrate with --all-tensors")
        qp = qmath.choose_qparams(*ranges[vo.name], qt, plan.config.symmetric_activations)
        inner = g.unique(vo.name + "_float")
        for n in m.graph.node:
            n.output[:] = [inner if o == vo.name else o for o in n.output]
            n.input[:] = [inner if i == vo.name else i for i in n.input]
        s = numpy_helper.from_array(qp.scale.astype(np.float32), g.unique(vo.name + "_io_scale"))
        z = numpy_helper.from_array(qp.zero_point.astype(qt.dtype), g.unique(vo.name + "_io_zero_point"))
        m.graph.initializer.extend([s, z])
        q = helper.make_node("QuantizeLinear", [inner, s.name, z.name], [vo.name], name=g.unique(vo.name + "_io_QuantizeLinear"))
        q.doc_string = f"qconv: integer output, {qt.name} scale={float(qp.scale):.4g} zp={int(qp.zero_point)}"
        m.graph.node.append(q)
        vo.type.tensor_type.elem_type = qt.onnx_type
        params[vo.name] = {"role": "output", "type": qt.name, "scale": float(qp.scale), "zero_point": int(qp.zero_point)}
    topo_sort(m)
    return m, params


META_KEY = "qconv.quantized_io"


def io_params_of(model: onnx.ModelProto) -> dict | None:
    """The integer-I/O parameters qconv recorded in a model's metadata, or None."""
    import json

    return next((json.loads(m.value) for m in model.metadata_props if m.key == META_KEY), None)


class IntegerIO:
    """A session of an integer-I/O model that takes float feeds and returns float outputs: quantizes each
    integer input with its parameters and dequantizes each integer output, so fidelity is measured as usual."""

    def __init__(self, sess, params: dict):
        self.sess, self.params = sess, params

    def get_outputs(self):
        return self.sess.get_outputs()

    def get_inputs(self):
        return self.sess.get_inputs()

    def run(self, names, feed):
        fed = {}
        for k, v in feed.items():
            p = self.params.get(k)
            fed[k] = qmath.quantize(v, _qp(p)) if p and p["role"] == "input" else v
        outs = self.sess.run(names, fed)
        names = names or [o.name for o in self.sess.get_outputs()]
        return [qmath.dequantize(o, _qp(self.params[n])) if self.params.get(n, {}).get("role") == "output" else o
                for n, o in zip(names, outs)]


def _qp(p: dict) -> qmath.QParams:
    qt = qmath.qtype(p["type"])
    return qmath.QParams(np.asarray(p["scale"], np.float32), np.asarray(p["zero_point"]).astype(qt.dtype), qt)
