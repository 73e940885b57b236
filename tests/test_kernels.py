"""The kernel cost table and the region choice it drives (qconv.plan.kernels, qconv.plan.regions, qconv kernels)."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from qconv.errors import QconvError
from qconv.plan import kernels, regions
from tests.conftest import make_model, run_model


def qconv(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "qconv", *map(str, args)], capture_output=True, text=True, cwd=cwd)


# ---- the table -------------------------------------------------------------------------------------------------

def test_the_shipped_table_loads_and_names_itself():
    t = kernels.load("shipped")
    assert t.name.startswith("shipped")
    assert len(t.digest) == 16
    assert kernels.load("shipped").digest == t.digest
    assert kernels.load("none") is None
    # auto is a model's own table, timed on this machine: none is cached in the tests' empty QCONV_CACHE_DIR
    assert kernels.load("auto", "some-model-id") is None
    assert kernels.load("auto") is None
    # onnxruntime's uint8 MaxPool is far slower than its float one on every CPU we know: the table must say so
    assert t.cost("MaxPool", "int8", 64, 1e5) > 5 * t.cost("MaxPool", "float", 64, 1e5)


def test_auto_reads_the_models_cached_table(tmp_path, monkeypatch):
    monkeypatch.setenv("QCONV_CACHE_DIR", str(tmp_path))
    data = json.loads(json.dumps(kernels.shipped().data))
    data.update(name="timed here", model_id="abc123", nodes={"n": [2.0, 1.0]})
    path = kernels.model_cache_path("abc123")
    assert path.parent.parent == tmp_path / "kernels"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(data))
    t = kernels.load("auto", "abc123")
    assert t.name == "timed here" and t.node("n") == (2.0, 1.0) and t.node("other") is None
    assert kernels.load("auto", "another-model") is None
    assert kernels.load("shipped").name != "timed here"
    path.write_text("{broken")
    assert kernels.load("auto", "abc123") is None  # a broken cache is no table, never a failed run


@pytest.mark.parametrize("content, message", [
    ("not json", "not JSON"),
    ('{"schema": "other"}', "is not a kernel cost table"),
    ('{"schema": "qconv.kernels", "version": 99}', "kernel table version 99"),
    ('{"schema": "qconv.kernels", "version": 1, "ops": {}}', "missing or has malformed fields"),
])
def test_a_bad_table_file_is_one_line_naming_the_fix(tmp_path, content, message):
    f = tmp_path / "t.json"
    f.write_text(content)
    with pytest.raises(QconvError, match=message):
        kernels.load(str(f))
    with pytest.raises(QconvError, match="no such file"):
        kernels.load(str(tmp_path / "missing.json"))


@given(st.lists(st.tuples(st.integers(1, 12), st.floats(0.01, 100)), min_size=1, max_size=6, unique_by=lambda p: p[0]),
       st.floats(0.5, 10000))
def test_interpolation_stays_between_its_neighbours(points, x):
    pts = sorted([2.0 ** k, y] for k, y in points)
    got = kernels._interpolate(pts, x)
    ys = [p[1] for p in pts]
    assert min(ys) - 1e-9 <= got <= max(ys) + 1e-9
    for px, py in pts:
        assert kernels._interpolate(pts, px) == pytest.approx(py)
    if x <= pts[0][0]:
        assert got == pytest.approx(pts[0][1])
    if x >= pts[-1][0]:
        assert got == pytest.approx(pts[-1][1])


# ---- the cut ---------------------------------------------------------------------------------------------------

def brute(unary8, unaryf, pairs):
    n = len(unary8)
    best = None
    for bits in itertools.product([False, True], repeat=n):
        lab = np.array(bits)
        c = regions.cost(unary8, unaryf, pairs, lab)
        if best is None or c < best[0] - 1e-9 or (abs(c - best[0]) <= 1e-9 and lab.sum() < best[1].sum()):
            best = (c, lab)
    return best


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 7).flatmap(lambda n: st.tuples(
    st.lists(st.floats(0, 100), min_size=n, max_size=n),
    st.lists(st.floats(0, 100), min_size=n, max_size=n),
    st.dictionaries(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)).filter(lambda e: e[0] != e[1]), st.floats(0, 50), max_size=12))))
def test_the_cut_finds_the_least_labelling(case):
    unary8, unaryf, pairs = np.array(case[0]), np.array(case[1]), case[2]
    label = regions.solve(unary8, unaryf, pairs)
    best_cost, _ = brute(unary8, unaryf, pairs)
    assert regions.cost(unary8, unaryf, pairs, label) == pytest.approx(best_cost, rel=1e-9, abs=1e-6)


def test_a_lone_slow_node_stays_int8_when_its_borders_cost_more_than_it_saves():
    # a chain a -> b -> c: b is 10 ns slower in int8, but each border costs 8
    unary8, unaryf = np.array([10.0, 20.0, 10.0]), np.array([20.0, 10.0, 20.0])
    pairs = {(0, 1): 8.0, (1, 0): 8.0, (1, 2): 8.0, (2, 1): 8.0}
    assert regions.solve(unary8, unaryf, pairs).tolist() == [False, False, False]
    # cheap borders: b alone goes float
    cheap = {k: 2.0 for k in pairs}
    assert regions.solve(unary8, unaryf, cheap).tolist() == [False, True, False]


def test_a_region_moves_together():
    # b and c are each 10 ns slower in int8: one of them alone does not pay its two borders of 8 (66 > 60 all int8),
    # both together do (56)
    unary8 = np.array([10.0, 20.0, 20.0, 10.0])
    unaryf = np.array([20.0, 10.0, 10.0, 20.0])
    pairs = {}
    for u, v in ((0, 1), (1, 2), (2, 3)):
        pairs[(u, v)] = pairs[(v, u)] = 8.0
    assert regions.solve(unary8, unaryf, pairs).tolist() == [False, True, True, False]
    assert regions.cost(unary8, unaryf, pairs, np.array([False, True, True, False])) < regions.cost(
        unary8, unaryf, pairs, np.zeros(4, bool))


# ---- the plan --------------------------------------------------------------------------------------------------

def pool_model():
    """x[1,64,32,32] -> Conv 1x1 (128) -> Relu -> MaxPool 3x3/2 -> Conv 1x1 (128) -> y."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.2, (128, 64, 1, 1)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.1, 128).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.normal(0, 0.1, (128, 128, 1, 1)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.normal(0, 0.1, 128).astype(np.float32), "b2")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("MaxPool", ["r1"], ["p"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], name="pool"),
             helper.make_node("Conv", ["p", "w2", "b2"], ["y"], name="conv2")]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64, 32, 32])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 128, 16, 16])], inits, opset=13)


@pytest.fixture
def pool(tmp_path):
    m = tmp_path / "pool.onnx"
    onnx.save(pool_model(), m)
    d = tmp_path / "x.npy"
    np.save(d, np.random.default_rng(1).normal(0, 1, (8, 64, 32, 32)).astype(np.float32))
    return m, d


def nodes_of(plan_path):
    return {n["name"]: n for n in json.loads(plan_path.read_text())["nodes"]}


@pytest.fixture
def slow_pool_table(pool, tmp_path):
    """A table of the pool model, as `qconv kernels` writes one, in which its MaxPool is far slower in int8."""
    m, d = pool
    assert qconv("plan", m, "--data", d, "-o", tmp_path / "probe.json", "-q").returncode == 0
    model_id = json.loads((tmp_path / "probe.json").read_text())["source"]["model_id"]
    data = json.loads(json.dumps(kernels.shipped().data))
    data.update(name="pinned for the test", model_id=model_id, measured=True,
                nodes={"conv1": [40000.0, 110000.0], "pool": [900000.0, 12000.0], "conv2": [20000.0, 50000.0]})
    f = tmp_path / "table.json"
    f.write_text(json.dumps(data))
    return f


def test_a_pinned_table_keeps_a_slow_region_float_and_the_plan_says_why(pool, slow_pool_table, tmp_path):
    m, d = pool
    r = qconv("plan", m, "--data", d, "--kernels", slow_pool_table, "-o", tmp_path / "p.json", "-q")
    assert r.returncode == 0, r.stderr
    plan = json.loads((tmp_path / "p.json").read_text())
    nodes = nodes_of(tmp_path / "p.json")
    assert nodes["pool"]["status"] == "float" and nodes["pool"]["code"] == "speed"
    assert "int8 is slower here on this CPU" in nodes["pool"]["reason"] and "--kernels none" in nodes["pool"]["reason"]
    assert nodes["conv2"]["status"] == "quantized"
    speed = plan["source"]["speed"]
    assert "pool" in speed["float_nodes"] and "conv2" not in speed["float_nodes"]
    assert speed["table"]["digest"] == kernels.load(str(slow_pool_table)).digest and speed["table"]["nodes"] == 3
    assert speed["estimate_us"]["chosen"] < speed["estimate_us"]["int8"]

    r = qconv("plan", m, "--data", d, "--kernels", "none", "-o", tmp_path / "all.json", "-q")
    assert r.returncode == 0, r.stderr
    assert nodes_of(tmp_path / "all.json")["pool"]["status"] == "quantized"
    assert "speed" not in json.loads((tmp_path / "all.json").read_text())["source"]


def test_the_float_region_runs_and_keeps_the_interface(pool, slow_pool_table, tmp_path):
    m, d = pool
    for name, extra in (("speed", ["--kernels", slow_pool_table]), ("all", ["--kernels", "none"])):
        r = qconv("quantize", m, "--data", d, "-o", tmp_path / f"{name}.onnx", "-q", *extra)
        assert r.returncode == 0, r.stderr
    speed, every = onnx.load(tmp_path / "speed.onnx"), onnx.load(tmp_path / "all.onnx")
    onnx.checker.check_model(speed)
    producer = {o: n for n in speed.graph.node for o in n.output}
    pools = [n for n in speed.graph.node if n.op_type == "MaxPool"]
    assert producer[pools[0].input[0]].op_type != "QuantizeLinear"
    assert [i.name for i in speed.graph.input] == [i.name for i in every.graph.input] == ["x"]
    x = np.load(d)[:2]
    ref = run_model(pool_model(), {"x": x})[0]
    a, b = run_model(speed, {"x": x})[0], run_model(every, {"x": x})[0]
    assert np.abs(a - ref).max() <= np.abs(b - ref).max() + 1e-6  # float where int8 was: never further from fp32
    assert np.abs(a - ref).max() < 0.1 * np.abs(ref).max()


def test_auto_times_the_model_once_and_plans_the_same_bytes(pool, tmp_path, monkeypatch):
    monkeypatch.setenv("QCONV_CACHE_DIR", str(tmp_path / "cache"))
    m, d = pool
    r = qconv("quantize", m, "--data", d, "--kernels", "auto", "-o", tmp_path / "q1.onnx", "--report", tmp_path / "r.json", "-q")
    assert r.returncode == 0, r.stderr
    cached = list((tmp_path / "cache" / "kernels" / "models").glob("*.json"))
    assert len(cached) == 1
    table = kernels.Table.of(json.loads(cached[0].read_text()), "cache")
    assert {"conv1", "pool", "conv2"} <= set(table.data["nodes"]) and table.data["feed"] == {"x": [1, 64, 32, 32]}
    stamp = cached[0].stat().st_mtime_ns
    assert qconv("quantize", m, "--data", d, "--kernels", "auto", "-o", tmp_path / "q2.onnx", "-q").returncode == 0
    assert cached[0].stat().st_mtime_ns == stamp  # timed once
    assert (tmp_path / "q1.onnx").read_bytes() == (tmp_path / "q2.onnx").read_bytes()
    # qconv kernels MODEL times it again, and writes a file to pin
    r = qconv("kernels", m, "--data", d, "-o", tmp_path / "pin.json", "-q")
    assert r.returncode == 0, r.stderr
    assert set(kernels.load(str(tmp_path / "pin.json")).data["nodes"]) == set(table.data["nodes"])
    # the calibration file alone gives the input's size: the Makefile flow times too
    monkeypatch.setenv("QCONV_CACHE_DIR", str(tmp_path / "cache2"))
    assert qconv("calibrate", m, "--data", d, "-o", tmp_path / "c.json", "-q").returncode == 0
    r = qconv("quantize", m, "--calib", tmp_path / "c.json", "--kernels", "auto", "-o", tmp_path / "q3.onnx", "-q")
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "cache2" / "kernels" / "models").glob("*.json"))) == 1


def test_a_stored_plan_replans_without_the_table(pool, slow_pool_table, tmp_path):
    """An edited plan is planned again from what it recorded, the kernel table's verdict included."""
    m, d = pool
    assert qconv("plan", m, "--data", d, "--kernels", slow_pool_table, "-o", tmp_path / "p.json", "-q").returncode == 0
    plan = json.loads((tmp_path / "p.json").read_text())
    slow_pool_table.unlink()
    plan["overrides"]["nodes"]["conv2"] = {"precision": "float"}
    (tmp_path / "edited.json").write_text(json.dumps(plan))
    r = qconv("quantize", m, "--plan", tmp_path / "edited.json", "-o", tmp_path / "q.onnx", "--report", tmp_path / "r.json", "-q")
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "r.json").read_text())
    status = {n["name"]: n for n in rep["node_summary"]["kept_float"]}
    assert status["pool"]["code"] == "speed" and status["conv2"]["code"] == "override"


def test_an_override_wins_over_the_table(pool, slow_pool_table, tmp_path):
    m, d = pool
    (tmp_path / "ov.json").write_text(json.dumps({"nodes": {"pool": {"precision": "int8"}}, "tensors": {}}))
    r = qconv("plan", m, "--data", d, "--kernels", slow_pool_table, "--overrides", tmp_path / "ov.json", "-o", tmp_path / "p.json", "-q")
    assert r.returncode == 0, r.stderr
    assert nodes_of(tmp_path / "p.json")["pool"]["status"] == "quantized"


def test_a_table_of_another_model_prices_by_op_kind(pool, slow_pool_table, tmp_path):
    """Node times belong to the model they were timed on: another model's table is read by op kind only."""
    m, d = pool
    data = json.loads(slow_pool_table.read_text())
    data["model_id"] = "another model"
    data["nodes"] = {"pool": [10.0, 1e9]}  # would keep pool int8 if read
    other = tmp_path / "other.json"
    other.write_text(json.dumps(data))
    a = qconv("plan", m, "--data", d, "--kernels", other, "-o", tmp_path / "a.json", "-q")
    b = qconv("plan", m, "--data", d, "--kernels", "shipped", "-o", tmp_path / "b.json", "-q")
    assert a.returncode == 0 and b.returncode == 0
    sa = json.loads((tmp_path / "a.json").read_text())["source"]["speed"]
    sb = json.loads((tmp_path / "b.json").read_text())["source"]["speed"]
    assert sa["float_nodes"] == sb["float_nodes"] and sa["estimate_us"] == sb["estimate_us"]


def test_bad_kernels_option_is_a_one_line_error(pool, tmp_path):
    m, d = pool
    r = qconv("quantize", m, "--data", d, "--kernels", tmp_path / "nope.json", "-o", tmp_path / "q.onnx")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("error: --kernels")
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "q.onnx").exists()


def test_other_modes_do_not_record_a_table(pool, tmp_path):
    m, d = pool
    assert qconv("plan", m, "--data", d, "--mode", "a16w8", "--kernels", "shipped", "-o", tmp_path / "p.json", "-q").returncode == 0
    plan = json.loads((tmp_path / "p.json").read_text())
    assert "kernels" not in plan["config"] and "speed" not in plan["source"]


# ---- qconv kernels -----------------------------------------------------------------------------------------------

def test_kernels_command_shows_and_measures(tmp_path):
    r = qconv("kernels", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["digest"] == kernels.load("shipped").digest
    out = tmp_path / "cpu.json"
    r = qconv("kernels", "--measure", "-o", out, "-q")
    assert r.returncode == 0, r.stderr
    t = kernels.load(str(out))
    assert t.data["measured"] is True
    assert set(t.data["ops"]) == set(kernels.shipped().data["ops"])
    for key, points in t.data["ops"].items():
        assert all(ns > 0 for _, ns in points["int8"] + points["float"]), key
    r = qconv("kernels", "--kernels", "none")
    assert r.returncode == 2 and "names no one table" in r.stderr
    r = qconv("kernels", "--measure")
    assert r.returncode == 2 and "give -o FILE" in r.stderr


def test_elements_per_row_count_each_pass_once():
    class Obs:
        def __init__(self, count, batches):
            self.count, self.batches = count, batches

    # 16 feeds of 8 rows of 46,080 values, observed in two memory passes (twice the count and the batches)
    counts = regions.counts_per_row({"x": Obs(2 * 16 * 8 * 46080, 32), "y": Obs(16 * 8 * 10, 16), "never": Obs(0, 0)},
                                    {"options": {"batch_size": 8}})
    assert counts == {"x": 46080.0, "y": 10.0}


def test_the_estimate_of_a_plan_adds_its_nodes_and_borders(pool, slow_pool_table, tmp_path):
    """regions.estimate: a float plan costs the float times; an int8 one the int8 times plus its input's conversion;
    another model's table estimates nothing."""
    from qconv import pipeline
    from qconv.calib.store import Ranges
    from qconv.plan.config import QuantConfig

    m, d = pool
    table = kernels.load(str(slow_pool_table))
    prepared = pipeline.load(m, QuantConfig())
    calib = pipeline.calibrate(prepared, pipeline.feeds_for(prepared, d, 8), config=QuantConfig())
    stats = Ranges.of(calib)
    counts = regions.counts_per_row(stats.observers, stats.identity)
    every = pipeline.plan(prepared, calib, QuantConfig(kernels="none"))
    planned, fp32 = regions.estimate(prepared.model, every, counts, table, prepared.model_id)
    nodes = table.data["nodes"]
    assert fp32 == pytest.approx(sum(f for _, f in nodes.values()))
    int8_sum = sum(q for q, _ in nodes.values())
    # the input is quantized once; the output of a Conv that is a graph output carries no Q/DQ (nothing to convert)
    assert planned == pytest.approx(int8_sum + table.border(64 * 32 * 32, into_int8=True, blocked=False), rel=1e-6)
    from qconv.plan.overrides import NodeOverride, Overrides

    none = pipeline.plan(prepared, calib, QuantConfig(kernels="none"),
                         Overrides({n: NodeOverride(precision="float") for n in ("conv1", "relu1", "pool", "conv2")}, {}))
    assert regions.estimate(prepared.model, none, counts, table, prepared.model_id) == pytest.approx((fp32, fp32))
    assert regions.estimate(prepared.model, every, counts, table, "another") is None


@pytest.mark.parametrize("ratio, taken", [(0.8, True), (1.05, False), (0.995, False)])
def test_a_choice_timed_slower_when_the_table_was_made_is_not_taken(pool, slow_pool_table, tmp_path, ratio, taken):
    """Taken only when the A/B interval is wholly below 1 (0.995 +- 0.01 is not surely faster)."""
    m, d = pool
    assert qconv("plan", m, "--data", d, "--kernels", slow_pool_table, "-o", tmp_path / "p.json", "-q").returncode == 0
    floats = json.loads((tmp_path / "p.json").read_text())["source"]["speed"]["float_nodes"]
    data = json.loads(slow_pool_table.read_text())
    data["verified"] = {"float_nodes": floats, "ratio": ratio, "ratio_low": ratio - 0.01, "ratio_high": ratio + 0.01, "runs": 15}
    slow_pool_table.write_text(json.dumps(data))
    assert qconv("plan", m, "--data", d, "--kernels", slow_pool_table, "-o", tmp_path / "v.json", "-q").returncode == 0
    plan = json.loads((tmp_path / "v.json").read_text())
    speed = plan["source"]["speed"]
    assert speed["verified"]["ratio"] == ratio
    pool_node = nodes_of(tmp_path / "v.json")["pool"]
    if taken:
        assert speed["float_nodes"] == floats and pool_node["code"] == "speed"
        assert f"timed A/B at {ratio:.3g}x the all-int8 model's time" in pool_node["reason"]
    else:
        assert speed["float_nodes"] == [] and pool_node["status"] == "quantized"
        assert speed["estimate_us"]["chosen"] == speed["estimate_us"]["int8"]


def test_a_models_table_gives_fused_float_time_to_the_conv_and_the_matmul():
    """onnxruntime names a float Conv+Relu after the Relu and a MatMul+bias Add after the Add: the table gives that time
    to the Conv and the MatMul, where the int8 model's kernel has it too."""
    from qconv.measure.kernels import model_table

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.2, (32, 16, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(0, 0.1, 32).astype(np.float32), "b"),
             numpy_helper.from_array(rng.normal(0, 0.1, (16, 64)).astype(np.float32), "wm"),
             numpy_helper.from_array(rng.normal(0, 0.1, 64).astype(np.float32), "bm")]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "wm"], ["m"], name="matmul"),
             helper.make_node("Add", ["m", "bm"], ["y"], name="bias")]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 16, 16])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, 16, 64])], inits, opset=13)
    table = model_table(model, model, {"x": rng.standard_normal((1, 16, 16, 16)).astype(np.float32)}, {"relu": "conv"},
                        "id", repeats=1)
    nodes = table["nodes"]
    assert nodes["conv"][1] > 0 and nodes.get("relu", [0, 0])[1] == 0
    assert nodes["matmul"][1] > 0 and nodes.get("bias", [0, 0])[1] == 0
    assert table["model_id"] == "id" and table["feed"] == {"x": [1, 16, 16, 16]}
    assert kernels.Table.of(table, "t").node("conv") is not None


# ---- accuracy in the cut ----------------------------------------------------------------------------------------

def brute_with(unary8, unaryf, pairs, groups):
    n = len(unary8)
    return min(regions.cost(unary8, unaryf, pairs, np.array(b)) + regions.penalty(groups, np.array(b))
               for b in itertools.product([False, True], repeat=n))


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 6).flatmap(lambda n: st.tuples(
    st.lists(st.floats(0, 100), min_size=n, max_size=n),
    st.lists(st.floats(0, 100), min_size=n, max_size=n),
    st.dictionaries(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)).filter(lambda e: e[0] != e[1]), st.floats(0, 50), max_size=10),
    st.lists(st.tuples(st.sets(st.integers(0, n - 1), min_size=1, max_size=3).map(sorted), st.floats(0, 40)), max_size=6))))
def test_the_cut_with_noise_groups_finds_the_least_time_plus_noise(case):
    """Each group is paid unless all its nodes are float (an activation is quantized while any int8 end reads or writes
    it): the cut's labelling is the least of time + penalty, and its time exceeds the fastest's by at most the weights."""
    unary8, unaryf, pairs, groups = np.array(case[0]), np.array(case[1]), case[2], case[3]
    label = regions.solve(unary8, unaryf, pairs, groups)
    total = regions.cost(unary8, unaryf, pairs, label) + regions.penalty(groups, label)
    assert total == pytest.approx(brute_with(unary8, unaryf, pairs, groups), rel=1e-9, abs=1e-6)
    fastest = regions.cost(unary8, unaryf, pairs, regions.solve(unary8, unaryf, pairs))
    assert regions.cost(unary8, unaryf, pairs, label) <= fastest + sum(w for _, w in groups) + 1e-6


def test_quantization_noise_is_the_rounding_power_over_the_tensors_power():
    from qconv.calib.observers import TensorObserver
    from qconv.numeric import qmath
    from qconv.plan import TensorPlan

    x = np.random.default_rng(0).uniform(-1, 1, 200_000).astype(np.float32)
    o = TensorObserver()
    o.update(x)
    o.canonicalize()
    qp = qmath.choose_qparams(-1.0, 1.0, qmath.qtype("uint8"), symmetric=False)

    class P:
        tensors = {"x": TensorPlan("x", "activation", qp), "w": TensorPlan("w", "weight", qp)}

    got = regions.quantization_noise(P, {"x": o, "w": o})
    step = float(qp.scale)
    assert set(got) == {"x"}  # weights are not activations
    assert got["x"] == pytest.approx(step * step / 12 / np.mean(x.astype(np.float64) ** 2), rel=0.01)
    o0 = TensorObserver()
    o0.update(np.zeros(100, np.float32))
    o0.canonicalize()
    assert regions.quantization_noise(P, {"x": o0})["x"] == 1.0  # a tensor of zeros: capped, not a division by zero


def _choice(pool, tmp_path, table_path):
    m, d = pool
    r = qconv("plan", m, "--data", d, "--kernels", table_path, "-o", tmp_path / "c.json", "-q")
    assert r.returncode == 0, r.stderr
    return json.loads((tmp_path / "c.json").read_text())["source"]["speed"], nodes_of(tmp_path / "c.json")


def _verdict(floats, against, ratio):
    return {"float_nodes": floats, "against": against, "ratio": ratio, "ratio_low": ratio - 0.01, "ratio_high": ratio + 0.01, "runs": 15}


@pytest.fixture
def near_equal_table(slow_pool_table):
    """conv2 costs 20 us in int8 and 34 us float (less its border): the fastest choice (float 10% dearer, the margin
    against timing noise) keeps it int8; the accurate one keeps it float, and its input and output unquantized."""
    data = json.loads(slow_pool_table.read_text())
    data["nodes"]["conv2"] = [20000.0, 34000.0]
    slow_pool_table.write_text(json.dumps(data))
    return slow_pool_table


def test_the_fastest_choice_is_timed_first_then_the_accurate_one_against_it(pool, near_equal_table, tmp_path):
    data = json.loads(near_equal_table.read_text())
    speed, _ = _choice(pool, tmp_path, near_equal_table)  # no verdicts: the fastest stands on its estimate, and is asked about
    fastest = speed["float_nodes"]
    assert "pool" in fastest and "conv2" not in fastest
    assert speed["pending"] == {"float_nodes": fastest, "against": []} and "noise_float" not in speed

    data["verdicts"] = [_verdict(fastest, [], 0.9)]
    near_equal_table.write_text(json.dumps(data))
    speed, _ = _choice(pool, tmp_path, near_equal_table)
    accurate = speed["pending"]["float_nodes"]
    assert speed["float_nodes"] == fastest and speed["pending"]["against"] == fastest
    assert set(accurate) == set(fastest) | {"conv2"} and speed["noise_float"] < 1.0

    data["verdicts"].append(_verdict(accurate, fastest, 1.02))  # within 3% of the fastest: taken
    near_equal_table.write_text(json.dumps(data))
    speed, nodes = _choice(pool, tmp_path, near_equal_table)
    assert speed["float_nodes"] == accurate and speed["noise_float"] == 1.0 and "pending" not in speed
    assert speed["verified"]["ratio"] == 1.02 and speed["choice"] == "accurate"
    reason = nodes["conv2"]["reason"]
    assert "int8 gains too little here" in reason and "timed A/B at 1.02x the fastest choice's time" in reason
    assert "keeping 100% of the estimated rounding noise away" in reason and "--kernels none" in reason

    data["verdicts"][1] = _verdict(accurate, fastest, 1.04)  # its interval reaches past 3%: the fastest stays
    near_equal_table.write_text(json.dumps(data))
    speed, nodes = _choice(pool, tmp_path, near_equal_table)
    assert speed["float_nodes"] == fastest and nodes["conv2"]["status"] == "quantized" and speed["verified"]["ratio"] == 0.9
    assert speed["choice"] == "fastest" and "int8 is slower here" in nodes["pool"]["reason"]

    data["verdicts"] = [_verdict(fastest, [], 1.05)]  # the fastest refused: the accurate one is weighed against all int8
    near_equal_table.write_text(json.dumps(data))
    speed, _ = _choice(pool, tmp_path, near_equal_table)
    assert speed["float_nodes"] == [] and speed["pending"] == {"float_nodes": accurate, "against": []}
    data["verdicts"].append(_verdict(accurate, [], 1.1))
    near_equal_table.write_text(json.dumps(data))
    speed, nodes = _choice(pool, tmp_path, near_equal_table)
    assert speed["float_nodes"] == [] and "pending" not in speed and nodes["pool"]["status"] == "quantized"


@pytest.mark.parametrize("ratios, floats", [((0.9, 1.0), "accurate"), ((0.9, 1.1), "fastest"), ((1.05, 1.1), "none"),
                                            ((1.05, 0.95), "accurate")])
def test_a_new_table_times_the_fastest_choice_then_the_accurate_one(pool, near_equal_table, tmp_path, monkeypatch, ratios, floats):
    """time_kernels answers the plan's pending A/B questions (a fake clock here: the logic, not the timing) and the
    cached table keeps the verdicts, which then decide."""
    from qconv import pipeline
    from qconv.jobs import plan as jobs_plan
    from qconv.measure import kernels as measure_kernels
    from qconv.measure import latency as latency_mod
    from qconv.plan.config import QuantConfig

    monkeypatch.setenv("QCONV_CACHE_DIR", str(tmp_path / "cache"))
    pinned = json.loads(near_equal_table.read_text())
    monkeypatch.setattr(measure_kernels, "model_table", lambda *a, **k: json.loads(json.dumps(pinned)))
    asked = []

    def fake(a, b, feed, threads, **k):
        assert a is not b
        asked.append(1)
        r = ratios[len(asked) - 1]
        return {"ratio": r, "ratio_low": r - 0.01, "ratio_high": r + 0.01, "runs": 20}

    monkeypatch.setattr(latency_mod, "latency", fake)
    m, d = pool
    job = jobs_plan.PlanJob(model=m, config=QuantConfig(kernels="auto"), data=d)
    prepared = pipeline.load(m, job.config)
    calib = pipeline.calibrate(prepared, pipeline.feeds_for(prepared, d, 8), config=QuantConfig())
    path = jobs_plan.time_kernels(job, prepared, calib, job.config)
    verdicts = kernels.verdicts(json.loads(path.read_text()))
    assert [v["ratio"] for v in verdicts] == list(ratios) and len(asked) == 2
    fastest, accurate = verdicts[0]["float_nodes"], verdicts[1]["float_nodes"]
    assert verdicts[0]["against"] == [] and "conv2" not in fastest and "conv2" in accurate
    assert verdicts[1]["against"] == (fastest if ratios[0] < 1 else [])
    speed = pipeline.plan(prepared, calib, QuantConfig(kernels="auto")).source["speed"]
    assert speed["float_nodes"] == {"fastest": fastest, "none": [], "accurate": accurate}[floats] and "pending" not in speed


def test_the_tuners_speed_estimate_reads_the_table_of_the_graph_variant_it_tunes(pool, slow_pool_table, tmp_path, monkeypatch):
    """Kernel tables are cached per graph variant (``Prepared.kernel_id``: --equalize's gated pairs change the graph);
    the tuner's speed guard read them by the bare model id, found none on an equalized model and refused nothing
    (PicoDet tuned to 2.3x fp32's time against a 1.0x target). It reads the variant's table now."""
    import dataclasses

    from qconv import pipeline
    from qconv.measure.reference import Reference
    from qconv.plan.config import QuantConfig
    from qconv.calib.store import Ranges
    from qconv.plan.overrides import NodeOverride, Overrides
    from qconv.tune.lab import Lab
    from qconv.tune.remedies import Context
    from qconv.tune.trial import TrialCache

    monkeypatch.setenv("QCONV_CACHE_DIR", str(tmp_path / "cache"))
    m, d = pool
    config = QuantConfig(kernels="auto")
    prepared = dataclasses.replace(pipeline.load(m, config), variant="eq-test")
    assert prepared.kernel_id != prepared.model_id
    calib = pipeline.calibrate(prepared, pipeline.feeds_for(prepared, d, 8), config=config)
    data = json.loads(slow_pool_table.read_text())
    data["model_id"] = prepared.kernel_id
    path = kernels.model_cache_path(prepared.kernel_id)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(data))
    lab = Lab(prepared, Context(prepared.model, Ranges.of(calib), config, Reference([]), 1), TrialCache(tmp_path / "t.json"), "id")
    every = lab.speed("minmax", Overrides())
    float_pool = lab.speed("minmax", Overrides({"pool": NodeOverride(precision="float")}, {}))
    assert every is not None and float_pool is not None and float_pool < every  # the table's slow int8 MaxPool
