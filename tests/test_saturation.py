"""The floor of a tensor's useful range (qconv.rewrite.rules.saturation) and the planner's use of it."""

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from hypothesis import example, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from qconv.cli.main import cli
from qconv.graph import Graph
from qconv.rewrite.rules.saturation import floor_of, floored
from tests.conftest import make_model, run_model


def c(name, v):
    return numpy_helper.from_array(np.array(v, np.float32), name)


def graph_of(nodes, inits, outputs=("y",)) -> Graph:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, [4]) for o in outputs]
    return Graph(make_model(nodes, [x], outs, inits, opset=13))


HARDSWISH_PADDLE = ([helper.make_node("Add", ["x", "three"], ["a"]), helper.make_node("Clip", ["a", "zero", "six"], ["g"]),
                     helper.make_node("Div", ["g", "six"], ["gd"]), helper.make_node("Mul", ["x", "gd"], ["y"])],
                    [c("three", 3.0), c("zero", 0.0), c("six", 6.0)])
HARDSWISH_EXPANDED = ([helper.make_node("Mul", ["x", "alpha"], ["s"]), helper.make_node("Add", ["s", "half"], ["a"]),
                       helper.make_node("Clip", ["a", "zero", "one"], ["g"]), helper.make_node("Mul", ["x", "g"], ["y"])],
                      [c("alpha", 1 / 6), c("half", 0.5), c("zero", 0.0), c("one", 1.0)])


@pytest.mark.parametrize("nodes,inits,want", [
    (*HARDSWISH_PADDLE, -3.0),
    (*HARDSWISH_EXPANDED, -3.0),
    ([helper.make_node("HardSigmoid", ["x"], ["y"], alpha=0.25, beta=0.5)], [], -2.0),
    ([helper.make_node("Relu", ["x"], ["y"])], [], 0.0),
    ([helper.make_node("Sub", ["x", "one"], ["a"]), helper.make_node("Relu", ["a"], ["y"])], [c("one", 1.0)], 1.0),
    ([helper.make_node("Mul", ["x", "two"], ["a"]), helper.make_node("Clip", ["a", "m"], ["y"])], [c("two", 2.0), c("m", -4.0)], -2.0),
    # two readers: the binding floor is the lower one
    ([helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Clip", ["x", "m"], ["z"])], [c("m", -1.0)], -1.0),
])
def test_floor_of_known_patterns(nodes, inits, want):
    outs = ("y", "z") if any("z" in n.output for n in nodes) else ("y",)
    assert floor_of("x", graph_of(nodes, inits, outs)) == pytest.approx(want)


@pytest.mark.parametrize("nodes,inits,outputs", [
    ([helper.make_node("Relu", ["x"], ["y"])], [], ("y", "x")),  # x is itself an output
    ([helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Sigmoid", ["x"], ["z"])], [], ("y", "z")),  # a reader that never flattens
    ([helper.make_node("Mul", ["x", "neg"], ["a"]), helper.make_node("Relu", ["a"], ["y"])], [c("neg", -1.0)], ("y",)),  # decreasing
    ([helper.make_node("Sub", ["one", "x"], ["a"]), helper.make_node("Relu", ["a"], ["y"])], [c("one", 1.0)], ("y",)),
    ([helper.make_node("Mul", ["x", "x"], ["y"])], [], ("y",)),  # x * x: not a gate
])
def test_no_floor_when_a_reader_still_tells_values_apart(nodes, inits, outputs):
    assert floor_of("x", graph_of(nodes, inits, outputs)) is None


@settings(max_examples=60, deadline=None)
@given(lo=st.floats(-200, -0.5), hi=st.floats(0.5, 200), t=st.floats(-50, 10))
@example(lo=-2.00001, hi=1.0, t=-2.0)  # lo not a float32: its float32 lies below it
def test_floored_low_end_never_cuts_a_value_above_the_floor(lo, hi, t):
    low = floored(lo, hi, t, 256)
    assert low >= lo
    if lo < t < hi:
        assert low <= t and t - low <= (hi - t) / 255 + 1e-5 * (abs(t) + abs(hi))
    else:
        assert low == lo


def hardswish_net(tmp_path):
    """x -> Conv (outputs down to about -40) -> hard-swish -> Conv: the first Conv's output range is floored."""
    rng = np.random.default_rng(0)
    inits = [c("w1", rng.normal(0, 1.0, (8, 3, 3, 3))), c("b1", np.linspace(-12, 2, 8)), c("w2", rng.normal(0, 0.3, (4, 8, 1, 1))),
             c("b2", np.zeros(4)), *HARDSWISH_PADDLE[1]]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Add", ["h", "three"], ["a"], name="hs_add"), helper.make_node("Clip", ["a", "zero", "six"], ["g"], name="hs_clip"),
             helper.make_node("Div", ["g", "six"], ["gd"], name="hs_div"), helper.make_node("Mul", ["h", "gd"], ["s"], name="hs_mul"),
             helper.make_node("Conv", ["s", "w2", "b2"], ["y"], name="conv2")]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])
    p = tmp_path / "hs.onnx"
    onnx.save(make_model(nodes, [x], [y], inits, opset=13), p)
    data = tmp_path / "x.npy"
    np.save(data, (rng.normal(0, 1.5, (32, 3, 8, 8))).astype(np.float32))
    return p, data


def test_planner_floors_a_hardswish_input_and_the_output_gets_closer(tmp_path):
    src, data = hardswish_net(tmp_path)
    run = lambda *a: CliRunner().invoke(cli, [str(v) for v in a], catch_exceptions=False)  # noqa: E731
    assert run("quantize", src, "--data", data, "-o", tmp_path / "f.onnx", "--floor-ranges", "--write-plan", tmp_path / "p.json", "-q").exit_code == 0
    plan = json.loads((tmp_path / "p.json").read_text())
    h = plan["tensors"]["h"]
    observed = plan["source"]["ranges"]["h"]
    assert observed[0] < -20 and -3.2 < h["range"][0] <= -3.0 and h["range"][1] == observed[1]
    assert "floored at -3" in h["origin"]
    # The same plan with h's observed range given outright (an explicit range is never floored): the unfloored model.
    plan["overrides"]["tensors"]["h"] = {"range": observed}
    (tmp_path / "u.json").write_text(json.dumps(plan))
    assert run("quantize", src, "--plan", tmp_path / "u.json", "-o", tmp_path / "u.onnx", "-q").exit_code == 0
    feed = {"x": np.load(data)}
    ref = run_model(src, feed)[0]
    err_floor = np.abs(run_model(tmp_path / "f.onnx", feed)[0] - ref).mean()
    err_plain = np.abs(run_model(tmp_path / "u.onnx", feed)[0] - ref).mean()
    assert err_floor < 0.9 * err_plain, (err_floor, err_plain)


def test_floors_by_default_where_the_check_says_they_pay(tmp_path):
    """Floors are exact but move where a constant background lands on the grid (PicoDet kept fewer boxes with them), so
    the default checks them: `quantize --data` on its rows, `calibrate` on the calibration rows, recorded in the file
    for `quantize --calib`. On this net they lower the output error (the test above), so both flows keep them."""
    src, data = hardswish_net(tmp_path)
    run = lambda *a: CliRunner().invoke(cli, [str(v) for v in a], catch_exceptions=False)  # noqa: E731
    assert run("quantize", src, "--data", data, "-o", tmp_path / "q.onnx", "--write-plan", tmp_path / "p.json", "-q").exit_code == 0
    plan = json.loads((tmp_path / "p.json").read_text())
    check = plan["source"]["floor_ranges_check"]
    assert check["kept"] is True and check["tensors"] >= 1 and "calibration rows" in check["check"]
    assert plan["config"]["floor_ranges"] is True and "floored at -3" in plan["tensors"]["h"]["origin"]

    assert run("calibrate", src, "--data", data, "-o", tmp_path / "c.json", "-q").exit_code == 0
    floors = json.loads((tmp_path / "c.json").read_text())["floors"]
    assert floors["kept"] is True and floors["tensors"] >= 1 and floors["scheme"]["method"] == "minmax"
    assert run("quantize", src, "--calib", tmp_path / "c.json", "-o", tmp_path / "f.onnx", "--write-plan", tmp_path / "pf.json", "-q").exit_code == 0
    pf = json.loads((tmp_path / "pf.json").read_text())
    assert pf["config"]["floor_ranges"] is True and pf["tensors"]["h"]["range"] == plan["tensors"]["h"]["range"]

    # --no-floor-ranges, or a scheme the file's check was not made for: the observed range
    for extra in (["--no-floor-ranges"], ["--symmetric-activations"]):
        assert run("quantize", src, "--calib", tmp_path / "c.json", "-o", tmp_path / "u.onnx", "--write-plan", tmp_path / "pu.json",
                   "-q", *extra).exit_code == 0
        pu = json.loads((tmp_path / "pu.json").read_text())
        assert pu["config"]["floor_ranges"] is False and "floored" not in pu["tensors"]["h"]["origin"], extra

    # calibrate --no-floor-ranges checks nothing (and is not the same file: a re-run with the default checks again)
    assert run("calibrate", src, "--data", data, "-o", tmp_path / "c.json", "-q", "--no-floor-ranges").exit_code == 0
    d = json.loads((tmp_path / "c.json").read_text())
    assert "floors" not in d and d["options"]["floor_ranges"] == "off"


def test_floors_left_out_when_the_check_says_no(tmp_path, monkeypatch):
    """The verdict is the check's (a fake one here): refused, the plan keeps the observed ranges and says why."""
    from qconv import pipeline

    monkeypatch.setattr(pipeline, "changes_pay", lambda *a, **k: (False, "fewer scores agree with fp32's"))
    src, data = hardswish_net(tmp_path)
    r = CliRunner().invoke(cli, ["quantize", str(src), "--data", str(data), "-o", str(tmp_path / "q.onnx"),
                                 "--write-plan", str(tmp_path / "p.json"), "-q"], catch_exceptions=False)
    assert r.exit_code == 0
    plan = json.loads((tmp_path / "p.json").read_text())
    assert plan["source"]["floor_ranges_check"] == {"tensors": 1, "kept": False, "check": "fewer scores agree with fp32's"}
    assert plan["config"]["floor_ranges"] is False
    assert plan["tensors"]["h"]["range"] == plan["source"]["ranges"]["h"] and "floored" not in plan["tensors"]["h"]["origin"]
