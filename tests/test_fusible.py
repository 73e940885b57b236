"""Float regions written in the forms onnxruntime runs as one kernel (qconv.rewrite.fusible): what moves, what stays,
and that the numbers are the unfused ones to float rounding, through onnxruntime."""

from __future__ import annotations

import collections
import json
import math

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from qconv.cli.main import cli
from qconv.rewrite import fusible
from tests.conftest import make_model, optimized_ops, run_model


def scalar(name: str, value: float) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(value, np.float32), name)


def ops(model: onnx.ModelProto) -> dict[str, int]:
    return dict(collections.Counter(n.op_type for n in model.graph.node))


def io(shape=("N", 8)):
    return ([helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))])


def hard_swish_as_intake_writes_it(b=3.0, u=6.0, extra_reader: bool = False) -> onnx.ModelProto:
    """x * (clip(x + b, 0, u) * (1/u)): intake's form of a hard-swish (div_to_mul, then scale_the_gate)."""
    nodes = [helper.make_node("Add", ["x", "b"], ["s"], name="add"),
             helper.make_node("Clip", ["s", "zero", "u"], ["c"], name="clip"),
             helper.make_node("Mul", ["c", "k"], ["gate"], name="scale"),
             helper.make_node("Mul", ["x", "gate"], ["y"], name="swish")]
    inputs, outputs = io()
    if extra_reader:  # the shifted value is read twice: not a gate alone
        outputs.append(helper.make_tensor_value_info("s", TensorProto.FLOAT, ["N", 8]))
    return make_model(nodes, inputs, outputs, [scalar("b", b), scalar("zero", 0.0), scalar("u", u), scalar("k", np.float32(1.0) / np.float32(u))], opset=13)


def paddle_gate(per_channel: bool = False) -> onnx.ModelProto:
    """y = x * clip(x * a + 0.5, 0, 1): PaddlePaddle's hard-sigmoid gate (a = 0.2); per channel, as gated equalization
    leaves it, a is a [8] vector."""
    a = np.linspace(0.1, 0.3, 8).astype(np.float32) if per_channel else np.array(0.2, np.float32)
    nodes = [helper.make_node("Mul", ["x", "a"], ["t"], name="slope"),
             helper.make_node("Add", ["t", "half"], ["s"], name="offset"),
             helper.make_node("Clip", ["s", "zero", "one"], ["g"], name="clip"),
             helper.make_node("Mul", ["x", "g"], ["y"], name="gated")]
    inputs, outputs = io()
    return make_model(nodes, inputs, outputs, [numpy_helper.from_array(a, "a"), scalar("half", 0.5), scalar("zero", 0.0), scalar("one", 1.0)], opset=13)


def torch_gelu(reciprocal: bool = True, extra_reader: bool = False) -> onnx.ModelProto:
    """x * ((1 + erf(x / sqrt 2)) * 0.5), torch 2.13's export of nn.GELU; ``reciprocal``: the division as intake's
    div_to_mul writes it."""
    first = (helper.make_node("Mul", ["x", "r2"], ["d"], name="scale") if reciprocal
             else helper.make_node("Div", ["x", "s2"], ["d"], name="scale"))
    nodes = [first, helper.make_node("Erf", ["d"], ["e"], name="erf"),
             helper.make_node("Add", ["e", "one"], ["a"], name="add"),
             helper.make_node("Mul", ["a", "half"], ["m"], name="half_mul"),
             helper.make_node("Mul", ["x", "m"], ["y"], name="gelu")]
    inputs, outputs = io()
    if extra_reader:
        outputs.append(helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 8]))
    inits = [scalar("r2", np.float32(1.0) / np.float32(math.sqrt(2.0))), scalar("s2", math.sqrt(2.0)), scalar("one", 1.0), scalar("half", 0.5)]
    return make_model(nodes, inputs, outputs, inits, opset=13)


def feed(seed=0, scale=4.0):
    return {"x": (np.random.default_rng(seed).normal(0, scale, (16, 8))).astype(np.float32)}


def test_a_hard_swish_left_float_runs_as_hardsigmoid_times_x():
    m = hard_swish_as_intake_writes_it()
    want = run_model(m, feed())[0]
    got = fusible.fuse(m)
    assert got == {"hard_sigmoid": 1, "gelu": 0}
    assert ops(m) == {"HardSigmoid": 1, "Mul": 1}
    hs = next(n for n in m.graph.node if n.op_type == "HardSigmoid")
    attrs = {a.name: a.f for a in hs.attribute}
    assert attrs["alpha"] == pytest.approx(1 / 6, rel=1e-6) and attrs["beta"] == pytest.approx(0.5, rel=1e-6)
    onnx.checker.check_model(m)
    np.testing.assert_allclose(run_model(m, feed())[0], want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("per_channel", [False, True])
def test_paddles_gate_becomes_one_hardsigmoid_and_a_per_channel_slope_stays_a_mul(per_channel):
    m = paddle_gate(per_channel)
    want = run_model(m, feed(1))[0]
    assert fusible.fuse(m) == {"hard_sigmoid": 1, "gelu": 0}
    assert ops(m) == ({"Mul": 2, "HardSigmoid": 1} if per_channel else {"Mul": 1, "HardSigmoid": 1})
    hs = next(n for n in m.graph.node if n.op_type == "HardSigmoid")
    attrs = {a.name: a.f for a in hs.attribute}
    assert attrs["alpha"] == pytest.approx(1.0 if per_channel else 0.2, rel=1e-6)
    np.testing.assert_allclose(run_model(m, feed(1))[0], want, rtol=1e-6, atol=1e-6)


def test_a_gate_whose_parts_are_read_elsewhere_or_not_a_unit_gate_stays():
    m = hard_swish_as_intake_writes_it(extra_reader=True)
    before = m.SerializeToString()
    assert fusible.fuse(m) is None and m.SerializeToString() == before
    m = hard_swish_as_intake_writes_it(u=5.0)  # the Mul by 1/5 after clip(., 0, 5): still a unit gate
    assert fusible.fuse(m) == {"hard_sigmoid": 1, "gelu": 0}
    bad = hard_swish_as_intake_writes_it()
    bad.graph.initializer[3].CopyFrom(scalar("k", 0.2))  # clip(x + 3, 0, 6) * 0.2 reaches 1.2: no HardSigmoid
    before = bad.SerializeToString()
    assert fusible.fuse(bad) is None and bad.SerializeToString() == before


@settings(max_examples=40, deadline=None)
@given(b=st.floats(-4, 4, width=32), u=st.floats(0.5, 8, width=32), seed=st.integers(0, 1000))
def test_the_fused_gate_equals_the_unfused_ops_to_float_rounding(b, u, seed):
    m = hard_swish_as_intake_writes_it(b=b, u=u)
    x = feed(seed, scale=2 * (abs(b) + u))
    want = run_model(m, x)[0]
    fusible.fuse(m)
    assert ops(m)["HardSigmoid"] == 1
    np.testing.assert_allclose(run_model(m, x)[0], want, rtol=2e-6, atol=2e-6 * (abs(b) + u) * float(np.abs(x["x"]).max()))


@pytest.mark.parametrize("reciprocal", [True, False])
def test_torchs_gelu_is_put_in_the_order_onnxruntime_fuses(tmp_path, reciprocal):
    m = torch_gelu(reciprocal)
    assert "Gelu" not in optimized_ops(m, tmp_path)  # onnxruntime 1.32 leaves torch's order as five kernels
    want = run_model(m, feed(2))[0]
    assert fusible.fuse(m) == {"hard_sigmoid": 0, "gelu": 1}
    onnx.checker.check_model(m)
    assert optimized_ops(m, tmp_path) == {"Gelu": 1}
    np.testing.assert_allclose(run_model(m, feed(2))[0], want, rtol=1e-5, atol=1e-6)


def test_a_gelu_whose_parts_are_read_elsewhere_stays():
    m = torch_gelu(extra_reader=True)
    before = m.SerializeToString()
    assert fusible.fuse(m) is None and m.SerializeToString() == before


def conv_hard_swish_conv() -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.normal(0, 0.4, (8, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.3, (4, 8, 1, 1)).astype(np.float32), "w2"),
             scalar("three", 3.0), scalar("zero", 0.0), scalar("six", 6.0)]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Add", ["a", "three"], ["s"], name="add"),
             helper.make_node("Clip", ["s", "zero", "six"], ["c"], name="clip"),
             helper.make_node("Mul", ["a", "c"], ["p"], name="mul"),
             helper.make_node("Div", ["p", "six"], ["h"], name="div"),
             helper.make_node("Conv", ["h", "w2"], ["y"], name="conv2")]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])
    return make_model(nodes, [x], [y], inits, opset=13)


@pytest.mark.parametrize("exclude", [None, "Add,Clip,Mul"])
def test_quantize_fuses_a_hard_swish_only_where_the_plan_leaves_it_float(tmp_path, exclude):
    src, data, out, report = tmp_path / "m.onnx", tmp_path / "d.npy", tmp_path / "q.onnx", tmp_path / "r.json"
    onnx.save(conv_hard_swish_conv(), src)
    np.save(data, np.random.default_rng(4).normal(0, 1, (16, 3, 8, 8)).astype(np.float32))
    args = ["quantize", str(src), "--data", str(data), "-o", str(out), "--report", str(report), "-q", "--no-latency"]
    r = CliRunner().invoke(cli, args + (["--exclude-ops", exclude] if exclude else []))
    assert r.exit_code == 0, r.output
    written = onnx.load(out)
    fused = json.loads(report.read_text())["fused"]
    if exclude:  # the hard-swish stays float: one HardSigmoid and the Mul by x; the Convs are still int8
        assert fused == {"hard_sigmoid": 1, "gelu": 0}
        assert ops(written)["HardSigmoid"] == 1 and "Clip" not in ops(written) and ops(written)["QuantizeLinear"] >= 2
    else:  # int8 all through (QLinearAdd/QLinearMul, the Clip folded): nothing float to fuse
        assert fused is None and "HardSigmoid" not in ops(written)
    x = {"x": np.random.default_rng(5).normal(0, 1, (4, 3, 8, 8)).astype(np.float32)}
    ref = run_model(conv_hard_swish_conv(), x)[0]
    got = run_model(written, x)[0]
    assert np.corrcoef(ref.ravel(), got.ravel())[0, 1] > 0.99


def test_exclude_ops_takes_a_comma_separated_list_as_repeated_flags():
    from qconv.cli.common import op_types

    assert op_types(("Add,Clip, Mul", "Conv", "Add")) == ("Add", "Clip", "Mul", "Conv")


def test_an_exclusion_that_names_nothing_is_a_warning(tmp_path):
    src, data, out = tmp_path / "m.onnx", tmp_path / "d.npy", tmp_path / "q.onnx"
    onnx.save(conv_hard_swish_conv(), src)
    np.save(data, np.random.default_rng(4).normal(0, 1, (16, 3, 8, 8)).astype(np.float32))
    r = CliRunner().invoke(cli, ["quantize", str(src), "--data", str(data), "-o", str(out), "--no-latency", "--report", str(tmp_path / "r.json"),
                                 "--exclude-ops", "Add,Clp", "--exclude-nodes", "conv9*", "--exclude-nodes", "conv1"])
    assert r.exit_code == 0, r.output
    warned = json.loads((tmp_path / "r.json").read_text())["warnings"]
    assert "--exclude-ops Clp: no node of this model has that op type (op types are case-sensitive: Conv, MatMul, Mul)" in warned
    assert "--exclude-nodes conv9*: no node of this model has a matching name (the report's nodes and `qconv plan` list them)" in warned
    assert not any("--exclude-ops Add" in w or "--exclude-nodes conv1:" in w for w in warned)
