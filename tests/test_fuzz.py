"""Random small graphs of the ops qconv quantizes, through every mode: each run ends either with a model that
passes onnx.checker, keeps the interface, runs in onnxruntime and stays within an error floor, or with a clean
one-line refusal and nothing written. Never an internal error."""

from __future__ import annotations

import numpy as np
import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from qconv.errors import QconvError
from qconv.graph.intake import interface_change
from qconv.jobs import EvalOptions, PlanJob, QuantizeJob, run_quantize
from qconv.measure.stats import ErrorStats
from qconv.plan.config import QuantConfig
from tests.conftest import make_model, run_model

LAYERS = ["conv", "conv1x1", "relu", "add_const", "mul_const", "residual", "concat", "maxpool", "avgpool", "sigmoid",
          "leaky", "clip", "transpose", "reshape", "slice", "gather", "split_concat", "resize", "if"]
FLOORS = {"int8": 0.9, "a16w8": 0.98, "dynamic": 0.98, "fp16": 0.99}


class Builder:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.k = [], [], 0
        self.shapes = {"x": 4}  # tensor -> channels (spatial 8x8 everywhere)

    def name(self, base: str) -> str:
        self.k += 1
        return f"{base}_{self.k}"

    def const(self, array) -> str:
        n = self.name("c")
        self.inits.append(numpy_helper.from_array(np.asarray(array), n))
        return n

    def node(self, op, ins, ch, **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, ins, [out], name=out + "_node", **attrs))
        self.shapes[out] = ch
        return out

    def layer(self, kind: str, x: str) -> str:
        c, r = self.shapes[x], self.rng
        if kind == "conv":
            co = int(r.integers(2, 9))
            ins = [x, self.const(r.normal(0, 0.4, (co, c, 3, 3)).astype(np.float32))]
            if r.random() < 0.7:
                ins.append(self.const(r.normal(0, 0.1, co).astype(np.float32)))
            return self.node("Conv", ins, co, pads=[1, 1, 1, 1])
        if kind == "conv1x1":
            co = int(r.integers(2, 9))
            return self.node("Conv", [x, self.const(r.normal(0, 0.4, (co, c, 1, 1)).astype(np.float32))], co)
        if kind == "relu":
            return self.node("Relu", [x], c)
        if kind == "add_const":
            return self.node("Add", [x, self.const(r.normal(0, 0.5, (1, c, 1, 1)).astype(np.float32))], c)
        if kind == "mul_const":
            return self.node("Mul", [x, self.const(r.uniform(0.5, 1.5, (1, c, 1, 1)).astype(np.float32))], c)
        if kind == "residual":
            same = [t for t, ch in self.shapes.items() if ch == c and t != x]
            return self.node("Add", [x, same[int(r.integers(len(same)))]], c) if same else x
        if kind == "concat":
            maps = [t for t, ch in self.shapes.items() if ch is not None]
            other = maps[int(r.integers(len(maps)))]
            return self.node("Concat", [x, other], c + self.shapes[other], axis=1)
        if kind == "maxpool":
            return self.node("MaxPool", [x], c, kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1])
        if kind == "avgpool":
            return self.node("AveragePool", [x], c, kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1])
        if kind == "sigmoid":
            return self.node("Sigmoid", [x], c)
        if kind == "leaky":
            return self.node("LeakyRelu", [x], c, alpha=0.1)
        if kind == "clip":
            return self.node("Clip", [x, self.const(np.float32(-1.0)), self.const(np.float32(2.0))], c)
        if kind == "transpose":
            t = self.node("Transpose", [x], c, perm=[0, 2, 3, 1])
            self.shapes[t] = None  # channels-last: not a feature map until transposed back
            return self.node("Transpose", [t], c, perm=[0, 3, 1, 2])
        if kind == "reshape":
            return self.node("Reshape", [x, self.const(np.array([0, c, 8, 8], np.int64))], c)
        if kind == "slice" and c >= 2:
            return self.node("Slice", [x, self.const(np.array([0], np.int64)), self.const(np.array([c // 2 + 1], np.int64)),
                                       self.const(np.array([1], np.int64))], c // 2 + 1)
        if kind == "gather" and c >= 2:
            idx = np.sort(r.choice(c, size=max(1, c // 2), replace=False)).astype(np.int64)
            return self.node("Gather", [x, self.const(idx)], len(idx), axis=1)
        if kind == "split_concat" and c >= 2 and c % 2 == 0:
            a, b = self.name("split"), self.name("split")
            self.nodes.append(helper.make_node("Split", [x, self.const(np.array([c // 2, c // 2], np.int64))], [a, b], axis=1,
                                               name=a + "_node"))
            self.shapes[a] = self.shapes[b] = c // 2
            return self.node("Concat", [b, a], c, axis=1)
        if kind == "resize":
            return self.node("Resize", [x, "", self.const(np.array([1, 1, 1, 1], np.float32))], c, mode="nearest")
        if kind == "if":
            then_out, else_out = self.name("then"), self.name("else")
            then_g = helper.make_graph([helper.make_node("Relu", [x], [then_out])], "then", [],
                                       [helper.make_tensor_value_info(then_out, TensorProto.FLOAT, None)])
            else_g = helper.make_graph([helper.make_node("Sigmoid", [x], [else_out])], "else", [],
                                       [helper.make_tensor_value_info(else_out, TensorProto.FLOAT, None)])
            return self.node("If", [self.const(np.array(bool(r.random() < 0.5)))], c, then_branch=then_g, else_branch=else_g)
        return x

    def head(self, x: str, kind: str) -> str:
        c = self.shapes[x]
        g = self.node("GlobalAveragePool", [x], c)
        f = self.node("Flatten", [g], c)
        r = self.rng
        if kind == "gemm":
            return self.node("Gemm", [f, self.const(r.normal(0, 0.5, (c, 5)).astype(np.float32)),
                                      self.const(r.normal(0, 0.1, (1, 5) if r.random() < 0.5 else (5,)).astype(np.float32))], 5)
        m = self.node("MatMul", [f, self.const(r.normal(0, 0.5, (c, 5)).astype(np.float32))], 5)
        return self.node("Add", [m, self.const(r.normal(0, 0.1, 5).astype(np.float32))], 5)


def build(seed: int, kinds: list[str], head: str) -> onnx.ModelProto:
    b = Builder(seed)
    x = b.layer("conv", "x")
    for kind in kinds:
        x = b.layer(kind, x)
    y = b.head(x, head)
    b.nodes[-1].output[0] = "y"
    return make_model(b.nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], b.inits, opset=13) if y else None


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, 2**31), st.lists(st.sampled_from(LAYERS), min_size=1, max_size=8), st.sampled_from(["gemm", "matmul"]))
def test_random_graphs_quantize_or_refuse_cleanly(tmp_path_factory, seed, kinds, head):
    tmp = tmp_path_factory.mktemp("fuzz")
    model = build(seed, kinds, head)
    onnx.checker.check_model(model)
    path = tmp / "m.onnx"
    onnx.save(model, path)
    x = np.random.default_rng(seed).normal(0, 1, (16, 4, 8, 8)).astype(np.float32)
    np.save(tmp / "x.npy", x)
    ref = run_model(model, {"x": x})[0]
    for mode, floor in FLOORS.items():
        out = tmp / f"{mode}.onnx"
        config = QuantConfig(mode=mode)
        job = QuantizeJob(out=out, planning=PlanJob(model=path, config=config, data=tmp / "x.npy" if config.needs_calibration else None),
                          evaluation=EvalOptions(data=tmp / "x.npy", latency=False, layer_samples=0, threads=1))
        try:
            run_quantize(job)
        except QconvError as exc:
            assert "internal error" not in str(exc) and "\n" not in str(exc), (mode, kinds, str(exc))
            assert not out.exists()
            continue
        q = onnx.load(out)
        onnx.checker.check_model(q)
        assert interface_change(model, q) is None, (mode, kinds)
        got = run_model(out, {"x": x})[0]
        s = ErrorStats()
        s.update(ref, got)
        assert s.cosine >= floor, (mode, kinds, head, s.cosine)
