"""Trials that run from a cut: the same numbers as a full run of the candidate, and the graph order they rely on."""

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from qconv import runtime
from qconv.graph import constant_tensors, subgraph_inputs, topo_sort
from qconv.measure import cuts
from qconv.measure.reference import Reference
from tests.conftest import make_model


def passes_sort(model: onnx.ModelProto) -> list[str]:
    """The order topo_sort had before it was one walk: repeated passes emitting every node whose inputs are known."""
    g = model.graph
    known = {i.name for i in g.input} | {t.name for t in g.initializer} | {""}
    remaining, ordered = list(g.node), []
    while remaining:
        rest, progress = [], False
        for node in remaining:
            if (set(node.input) | subgraph_inputs(node)) <= known:
                ordered.append(node)
                known.update(node.output)
                progress = True
            else:
                rest.append(node)
        if not progress:
            ordered.extend(rest)
            break
        remaining = rest
    return [n.name for n in ordered]


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_topo_sort_orders_as_the_repeated_passes_did(data):
    n = data.draw(st.integers(1, 14))
    nodes = []
    for k in range(n):  # node k reads the input, earlier nodes' outputs, sometimes a missing tensor or a later one
        pool = ["x"] + [f"t{j}" for j in range(k)]
        ins = data.draw(st.lists(st.sampled_from(pool), min_size=1, max_size=3))
        if data.draw(st.integers(0, 9)) == 0:
            ins.append(data.draw(st.sampled_from(["missing", f"t{data.draw(st.integers(0, n - 1))}"])))
        nodes.append(helper.make_node("Sum", ins, [f"t{k}"], name=f"n{k}"))
    order = data.draw(st.permutations(range(n)))
    m = make_model([nodes[k] for k in order], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                   [helper.make_tensor_value_info(f"t{n - 1}", TensorProto.FLOAT, [2])])
    want = passes_sort(m)
    topo_sort(m)
    assert [x.name for x in m.graph.node] == want


def chain_model():
    """x -> Conv -> Relu -> Conv -> Add(residual) -> Conv -> y, with shape math on the side."""
    rng = np.random.default_rng(0)
    w = [numpy_helper.from_array(rng.normal(0, 0.3, (4, 4, 3, 3)).astype(np.float32), f"w{k}") for k in range(3)]
    nodes = [helper.make_node("Conv", ["x", "w0"], ["a"], pads=[1, 1, 1, 1], name="c0"),
             helper.make_node("Relu", ["a"], ["b"], name="r0"),
             helper.make_node("Conv", ["b", "w1"], ["c"], pads=[1, 1, 1, 1], name="c1"),
             helper.make_node("Add", ["c", "b"], ["d"], name="add"),
             helper.make_node("Conv", ["d", "w2"], ["y0"], pads=[1, 1, 1, 1], name="c2"),
             helper.make_node("Shape", ["x"], ["s"], name="shape"),
             helper.make_node("Reshape", ["y0", "s"], ["y"], name="reshape")]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6, 6])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 6, 6])], w)


def with_weight(model, name, scale):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in m.graph.initializer:
        if t.name == name:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * scale, name))
    return m


def feeds(count=4):
    rng = np.random.default_rng(1)
    return [{"x": rng.normal(0, 1, (2, 4, 6, 6)).astype(np.float32)} for _ in range(count)]


def reference(model, fs):
    sess = runtime.session(model, 1)
    ref = Reference([o.name for o in model.graph.output])
    for f in fs:
        ref.feeds.append(f)
        ref.outputs.append(runtime.run(sess, f, ref.names))
    return ref


def test_a_change_downstream_runs_from_the_cut_with_the_full_run_s_numbers():
    base, fs = chain_model(), feeds()
    ref = reference(base, fs)
    anchor = cuts.Anchor(base, fs, 1, ["c2"])
    assert anchor.available
    cand = with_weight(base, "w2", 1.01)
    cut = anchor.cut(cand)
    assert cut is not None
    kept = {n.name for n in cut.model.graph.node}
    assert "c0" not in kept and "c1" not in kept and "c2" in kept  # only what follows the cut runs
    assert cut.feeds == ["x"]  # the Shape still reads the model's input
    onnx.checker.check_model(cut.model)
    got = ref.compare(runtime.session(cut.model, 1), anchor.feeds(cut, fs)).metrics()
    full = ref.compare(runtime.session(cand, 1)).metrics()
    assert got.cosine == full.cosine and got.sqnr_db == full.sqnr_db


def test_a_change_upstream_of_every_cut_runs_whole():
    base, fs = chain_model(), feeds()
    anchor = cuts.Anchor(base, fs, 1, ["c2"])
    assert anchor.cut(with_weight(base, "w0", 1.01)) is None
    assert anchor.cut(base) is not None  # the anchor itself: everything after the cut reads kept values


def test_cut_points_avoid_tensors_a_full_run_fuses_away():
    """A DequantizeLinear output and a tensor read only by a QuantizeLinear are never cut: onnxruntime computes the
    int8 result of DQ -> Conv -> Q in one kernel, which a cut there would compute in float."""
    base = chain_model()
    q = [numpy_helper.from_array(np.array(0.05, np.float32), "s"), numpy_helper.from_array(np.array(0, np.int8), "z")]
    m = onnx.ModelProto()
    m.CopyFrom(base)
    nodes = list(m.graph.node)
    del m.graph.node[:]
    for node in nodes:  # quantize b: Relu -> b -> Q -> DQ -> (c1, add)
        if node.name in ("c1", "add"):
            node.input[list(node.input).index("b")] = "b_dq"
        m.graph.node.append(node)
        if node.name == "r0":
            m.graph.node.extend([helper.make_node("QuantizeLinear", ["b", "s", "z"], ["b_q"], name="q"),
                                 helper.make_node("DequantizeLinear", ["b_q", "s", "z"], ["b_dq"], name="dq")])
    m.graph.initializer.extend(q)
    unsafe = cuts.unsafe_tensors(m)
    assert {"b", "b_dq"} <= unsafe and "b_q" not in unsafe
    const = constant_tensors(m)
    # a change to c1 that keeps b's quantization runs from b_q (after the QuantizeLinear); one that changes b's range
    # from the Conv output before the Relu, as b itself is only read by the QuantizeLinear
    assert cuts.cut_points(m, cuts.starts_of(m, ["c1"], const), const) == [["a"], ["b_q"]]


def test_models_with_subgraphs_are_never_cut():
    then = helper.make_graph([helper.make_node("Identity", ["x"], ["o1"])], "then", [],
                             [helper.make_tensor_value_info("o1", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0, name="sum"),
             helper.make_node("Greater", ["s", "zero"], ["c"], name="gt"),
             helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=then, name="if")]
    m = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                   [numpy_helper.from_array(np.array(0, np.float32), "zero")])
    assert cuts.signatures(m) is None
    assert not cuts.Anchor(m, [{"x": np.ones(2, np.float32)}], 1, ["if"]).available


def test_models_that_draw_random_numbers_are_never_cut():
    nodes = [helper.make_node("RandomNormalLike", ["x"], ["r"], name="noise"), helper.make_node("Add", ["x", "r"], ["y"], name="add")]
    m = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    assert cuts.signatures(m) is None


@pytest.mark.parametrize("budget", [0, 1])
def test_no_cut_fits_a_tiny_budget(budget):
    base, fs = chain_model(), feeds()
    assert not cuts.Anchor(base, fs, 1, ["c2"], budget=budget).available
