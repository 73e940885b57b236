"""Quantizing inside If/Loop/Scan bodies: body tensors are calibrated (lifted to outputs), planned and rewritten
under scoped names, counted in the report; a branch the data never takes stays float, saying so."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from qconv.cli.main import cli
from qconv.graph import subgraphs
from tests.conftest import make_model, run_model


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _conv_branch(name: str, seed: int, convs: int) -> onnx.GraphProto:
    """x (outer) -> [Conv -> Relu] * convs -> y_<name>; weights in Constant nodes, as exporters write bodies."""
    rng = np.random.default_rng(seed)
    nodes, src = [], "x"
    for k in range(convs):
        w = numpy_helper.from_array(rng.normal(0, 0.08, (32, 32, 3, 3)).astype(np.float32))
        nodes.append(helper.make_node("Constant", [], [f"{name}_w{k}"], value=w))
        nodes.append(helper.make_node("Conv", [src, f"{name}_w{k}"], [f"{name}_c{k}"], pads=[1, 1, 1, 1], name=f"{name}_conv{k}"))
        nodes.append(helper.make_node("Relu", [f"{name}_c{k}"], [f"{name}_r{k}"], name=f"{name}_relu{k}"))
        src = f"{name}_r{k}"
    nodes.append(helper.make_node("Identity", [src], [f"y_{name}"], name=f"{name}_out"))
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(f"y_{name}", TensorProto.FLOAT, None)])


def if_model() -> onnx.ModelProto:
    """x[N,32,8,8], flag (bool scalar) -> If(flag: 3 convs, else: 2 convs) -> y: a whole network inside an If."""
    nodes = [helper.make_node("If", ["flag"], ["y"], then_branch=_conv_branch("then", 1, 3), else_branch=_conv_branch("else", 2, 2),
                              name="branch")]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32, 8, 8])
    flag = helper.make_tensor_value_info("flag", TensorProto.BOOL, [])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32, 8, 8])
    return make_model(nodes, [x, flag], [y])


def loop_model() -> onnx.ModelProto:
    """x[1,16] -> Loop(3 iterations: h = Relu(h @ W + b), W and b outer initializers) -> y, and the states stacked."""
    rng = np.random.default_rng(3)
    body = helper.make_graph(
        [helper.make_node("MatMul", ["h_in", "W"], ["mm"], name="step_mm"),
         helper.make_node("Add", ["mm", "b"], ["pre"], name="step_add"),
         helper.make_node("Relu", ["pre"], ["h_out"], name="step_relu"),
         helper.make_node("Identity", ["cond_in"], ["cond_out"], name="step_cond"),
         helper.make_node("Identity", ["h_out"], ["h_scan"], name="step_scan")],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_in", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [1, 16]),
         helper.make_tensor_value_info("h_scan", TensorProto.FLOAT, [1, 16])])
    inits = [numpy_helper.from_array(rng.normal(0, 0.35, (16, 16)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.normal(0, 0.1, 16).astype(np.float32), "b"),
             numpy_helper.from_array(np.array(3, np.int64), "trips"), numpy_helper.from_array(np.array(True), "go")]
    nodes = [helper.make_node("Loop", ["trips", "go", "x"], ["y", "ys"], body=body, name="loop")]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16]), helper.make_tensor_value_info("ys", TensorProto.FLOAT, [3, 1, 16])]
    return make_model(nodes, [x], outs, inits)


def _write_if_data(tmp_path, flags):
    rng = np.random.default_rng(0)
    folder = tmp_path / "data"
    folder.mkdir()
    for k, f in enumerate(flags):
        np.savez(folder / f"part{k}.npz", x=rng.normal(0, 1, (16, 32, 8, 8)).astype(np.float32), flag=np.array(f))
    return folder


def _report(tmp_path, model, data, *extra):
    path, out, rep = tmp_path / "m.onnx", tmp_path / "q.onnx", tmp_path / "r.json"
    onnx.save(model, path)
    r = invoke("quantize", path, "-o", out, "--data", data, "--no-latency", "--report", rep, "-q", *extra)
    assert r.exit_code == 0, r.output
    return path, out, json.loads(rep.read_text())


def _qtypes(graph: onnx.GraphProto) -> list[str]:
    return [n.op_type for n in graph.node]


def test_the_network_inside_an_if_is_quantized_and_a_branch_never_taken_says_so(tmp_path):
    data = _write_if_data(tmp_path, [True])
    path, out, report = _report(tmp_path, if_model(), data)
    nodes = {n["name"]: n for n in report["nodes"]}
    for k in range(3):
        assert nodes[f"branch.then_branch|then_conv{k}"]["status"] == "quantized"
    # The else branch never ran: its first Conv reads the (observed) outer input, the second a tensor never computed.
    e = nodes["branch.else_branch|else_conv1"]
    assert e["status"] == "float" and "never ran on the calibration data" in e["reason"], e
    assert report["subgraphs"]["bodies_quantized"] == 2 and report["subgraphs"]["bodies"] == 2
    q = onnx.load(out)
    onnx.checker.check_model(q)
    then = subgraphs.graph_at(q, (("branch", "then_branch"),))
    assert _qtypes(then).count("QuantizeLinear") >= 3 and any(t.data_type == TensorProto.INT8 for t in then.initializer)
    x = np.random.default_rng(5).normal(0, 1, (4, 32, 8, 8)).astype(np.float32)
    for flag in (True, False):
        feed = {"x": x, "flag": np.array(flag)}
        ref, got = run_model(path, feed)[0], run_model(out, feed)[0]
        cos = float((ref * got).sum() / np.sqrt((ref * ref).sum() * (got * got).sum()))
        assert cos > 0.995, (flag, cos)


def test_calibrating_on_both_branches_quantizes_both(tmp_path):
    data = _write_if_data(tmp_path, [True, False])
    _, out, report = _report(tmp_path, if_model(), data)
    nodes = {n["name"]: n for n in report["nodes"]}
    assert nodes["branch.else_branch|else_conv1"]["status"] == "quantized"
    assert report["subgraphs"]["bodies_quantized"] == 2
    assert report["size_bytes"]["ratio"] > 1.5  # the body weights are int8, the float copies gone


def test_a_loop_body_is_calibrated_over_its_iterations_and_quantized(tmp_path):
    data = tmp_path / "x.npy"
    np.save(data, np.random.default_rng(1).normal(0, 1, (32, 16)).astype(np.float32))
    path, out, report = _report(tmp_path, loop_model(), data, "--batch-size", 1)
    nodes = {n["name"]: n for n in report["nodes"]}
    assert nodes["loop.body|step_mm"]["status"] == "quantized", nodes["loop.body|step_mm"]
    q = onnx.load(out)
    onnx.checker.check_model(q)
    body = subgraphs.graph_at(q, (("loop", "body"),))
    assert "W" not in {t.name for t in q.graph.initializer}, "the float weight read by the body is gone"
    assert any(t.data_type == TensorProto.INT8 for t in body.initializer)
    x = np.random.default_rng(2).normal(0, 1, (1, 16)).astype(np.float32)
    for ref, got in zip(run_model(path, {"x": x}), run_model(out, {"x": x})):
        cos = float((ref * got).sum() / np.sqrt((ref * ref).sum() * (got * got).sum()))
        assert cos > 0.995


def test_plans_name_body_nodes_by_scope_and_reproduce_the_model(tmp_path):
    data = _write_if_data(tmp_path, [True, False])
    path = tmp_path / "m.onnx"
    onnx.save(if_model(), path)
    plan = tmp_path / "p.json"
    assert invoke("plan", path, "--data", data, "-o", plan, "-q").exit_code == 0
    d = json.loads(plan.read_text())
    assert any(n["name"] == "branch.then_branch|then_conv1" for n in d["nodes"])
    direct, via = tmp_path / "a.onnx", tmp_path / "b.onnx"
    assert invoke("quantize", path, "--data", data, "-o", direct, "--no-latency", "-q").exit_code == 0
    assert invoke("quantize", path, "--plan", plan, "-o", via, "--no-latency", "-q").exit_code == 0
    assert direct.read_bytes() == via.read_bytes()
    # A scoped override keeps one body node float.
    d["overrides"]["nodes"]["branch.then_branch|then_conv1"] = {"precision": "float"}
    plan.write_text(json.dumps(d))
    edited = tmp_path / "c.onnx"
    rep = tmp_path / "c.json"
    assert invoke("quantize", path, "--plan", plan, "-o", edited, "--no-latency", "--report", rep, "-q").exit_code == 0
    nodes = {n["name"]: n for n in json.loads(rep.read_text())["nodes"]}
    assert nodes["branch.then_branch|then_conv1"]["status"] == "float"
    assert nodes["branch.then_branch|then_conv2"]["status"] == "quantized"


@pytest.mark.parametrize("builder", [if_model, loop_model])
def test_promoted_body_tensors_keep_the_outputs(builder):
    model = builder()
    found = subgraphs.bodies(model)
    wanted = {b.scope: [n.output[0] for n in subgraphs.graph_at(model, b.path).node
                        if n.op_type != "Constant" and "cond" not in n.output[0]] for b in found}  # float tensors
    promoted, lifted = subgraphs.promote(model, wanted)
    onnx.checker.check_model(promoted)
    assert len(lifted) == sum(len(v) for v in wanted.values())
    feed = {"x": np.ones((1, 16) if builder is loop_model else (2, 32, 8, 8), np.float32)}
    if builder is if_model:
        feed["flag"] = np.array(True)
    a, b = run_model(model, feed), run_model(promoted, feed)
    for r, p in zip(a, b):
        np.testing.assert_array_equal(r, p)


def test_dynamic_mode_quantizes_a_loop_body_matmul(tmp_path):
    path, out, rep = tmp_path / "m.onnx", tmp_path / "q.onnx", tmp_path / "r.json"
    onnx.save(loop_model(), path)
    data = tmp_path / "x.npy"
    np.save(data, np.random.default_rng(1).normal(0, 1, (8, 16)).astype(np.float32))
    r = invoke("quantize", path, "-o", out, "--mode", "dynamic", "--eval-data", data, "--no-latency", "--report", rep, "-q")
    assert r.exit_code == 0, r.output
    nodes = {n["name"]: n for n in json.loads(rep.read_text())["nodes"]}
    assert nodes["loop.body|step_mm"]["status"] == "quantized"
    body = subgraphs.graph_at(onnx.load(out), (("loop", "body"),))
    assert "MatMulInteger" in _qtypes(body) and "DynamicQuantizeLinear" in _qtypes(body)
    x = np.random.default_rng(2).normal(0, 1, (1, 16)).astype(np.float32)
    ref, got = run_model(path, {"x": x})[0], run_model(out, {"x": x})[0]
    assert float((ref * got).sum() / np.sqrt((ref * ref).sum() * (got * got).sum())) > 0.995
