"""Weight-only tables: a large float table read only by Gathers that stay float (an embedding) is stored as int8 rows
with one scale a row, and the written model reads exactly the rows DequantizeLinear would give (planner.weight_only_tables,
rewrite.qdq._table)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from qconv.cli.main import cli
from qconv.numeric import qmath
from qconv.plan.planner import TABLE_BYTES
from tests.conftest import make_model, run_model

V, D, T = 8192, 64, 16  # a 2 MiB table


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def table_model(rows: int = V, tied: bool = False, seed: int = 0) -> onnx.ModelProto:
    """ids -> Gather(table) -> the graph output (data movement on its way out: the Gather stays float), and a second
    output through an int8 MatMul so that the model has something int8; ``tied``: the table is also a MatMul's weight."""
    rng = np.random.default_rng(seed)
    table = (rng.standard_normal((rows, D)) * rng.uniform(0.01, 0.2, (rows, 1))).astype(np.float32)
    table[3] = 0.0  # an all-zero row has a usable scale
    inits = [numpy_helper.from_array(table, "table"),
             numpy_helper.from_array((rng.standard_normal((D, 32)) * 0.2).astype(np.float32), "w")]
    nodes = [helper.make_node("Gather", ["table", "ids"], ["rows"], name="embed"),
             helper.make_node("MatMul", ["rows", "w"], ["proj"], name="proj")]
    outputs = [helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["B", T, D]),
               helper.make_tensor_value_info("proj", TensorProto.FLOAT, ["B", T, 32])]
    if tied:  # the output layer reads the same table (Gemm with transB), as tied embeddings do
        inits.append(numpy_helper.from_array(np.array([-1, D], np.int64), "flat"))
        nodes += [helper.make_node("Reshape", ["rows", "flat"], ["rows2d"], name="flatten"),
                  helper.make_node("Gemm", ["rows2d", "table"], ["logits"], name="lm_head", transB=1)]
        outputs.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", rows]))
    return make_model(nodes, [helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", T])], outputs, inits)


@pytest.fixture
def table_files(tmp_path):
    m, d = tmp_path / "emb.onnx", tmp_path / "ids.npz"
    onnx.save(table_model(), m)
    np.savez(d, ids=np.random.default_rng(1).integers(0, V, (32, T)).astype(np.int64))
    return m, d


def initializers(path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


@pytest.mark.parametrize("args", [["--format", "qdq"], ["--format", "qoperator"], ["--mode", "dynamic"]])
def test_a_large_table_read_by_float_gathers_keeps_8_bit_rows_and_reads_exactly_their_dequantized_values(table_files, tmp_path, args):
    m, d = table_files
    out, plan_path = tmp_path / "q.onnx", tmp_path / "p.json"
    src = [] if "dynamic" in args else ["--data", d, "--kernels", "none"]
    r = invoke("quantize", m, *src, *args, "-o", out, "--write-plan", plan_path, "--report", tmp_path / "r.json", "-q", "--no-latency")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "r.json").read_text())["node_summary"]["tables"] == [{"tensor": "table", "rows": V, "gathers": ["embed"]}]
    plan = json.loads(plan_path.read_text())
    t = plan["tensors"]["table"]
    assert t["role"] == "table" and t["type"] == "int8" and t["axis"] == 0 and t["consumers"] == ["embed"]
    embed = next(n for n in plan["nodes"] if n["name"] == "embed")
    assert embed["status"] == "float" and "its table is stored in 8 bits, one scale a row" in embed["reason"]

    inits = initializers(out)
    assert "table" not in inits  # the float table is gone
    (q,) = [a for a in inits.values() if a.dtype == np.int8 and a.shape == (V, D)]
    (s,) = [a for a in inits.values() if a.dtype == np.float32 and a.shape == (V, 1)]
    assert out.stat().st_size < 0.3 * m.stat().st_size

    original = numpy_helper.to_array(onnx.load(str(m)).graph.initializer[0])
    qp = qmath.weight_qparams(original, qmath.qtype("int8"), True, 0)
    assert np.array_equal(q, qmath.quantize(original, qp)) and np.array_equal(s.reshape(-1), qp.scale)
    assert s[3, 0] > 0 and not q[3].any()
    ids = np.random.default_rng(2).integers(0, V, (3, T)).astype(np.int64)
    got = run_model(out, {"ids": ids})[0]
    want = qmath.dequantize(q, qp)[ids]
    assert got.dtype == np.float32 and np.array_equal(got, want)  # bit for bit what DequantizeLinear gives
    rows = original[ids]
    assert np.abs(got - rows).max() <= 0.5 * qp.scale[ids].max() * (1 + 1e-6)  # half a step of its own row at most


def test_a_gather_excluded_by_the_user_keeps_its_float_table(table_files, tmp_path):
    m, d = table_files
    out = tmp_path / "q.onnx"
    r = invoke("quantize", m, "--data", d, "--kernels", "none", "--exclude-nodes", "embed", "-o", out, "-q", "--no-latency")
    assert r.exit_code == 0, r.output
    inits = initializers(out)
    assert inits["table"].dtype == np.float32 and inits["table"].shape == (V, D)
    ids = np.random.default_rng(2).integers(0, V, (2, T)).astype(np.int64)
    assert np.array_equal(run_model(out, {"ids": ids})[0], run_model(m, {"ids": ids})[0])


def test_tied_and_small_tables_stay_as_they_were(tmp_path):
    d = tmp_path / "ids.npz"
    small = TABLE_BYTES // (4 * D) - 1
    for name, model, rows in (("tied", table_model(rows=4096, tied=True), 4096), ("small", table_model(rows=small), small)):
        m, out, p = tmp_path / f"{name}.onnx", tmp_path / f"{name}.q.onnx", tmp_path / f"{name}.json"
        onnx.save(model, m)
        np.savez(d, ids=np.random.default_rng(1).integers(0, rows, (8, T)).astype(np.int64))
        r = invoke("quantize", m, "--data", d, "--kernels", "none", "-o", out, "--write-plan", p, "-q", "--no-latency")
        assert r.exit_code == 0, r.output
        assert all(t["role"] != "table" for t in json.loads(p.read_text())["tensors"].values()), name
        assert not any(a.shape == (rows, 1) for a in initializers(out).values()), name  # no row scales
        assert "Cast" not in {n.op_type for n in onnx.load(str(out)).graph.node}, name


def test_plan_then_quantize_writes_the_same_table_bytes(table_files, tmp_path):
    m, d = table_files
    assert invoke("plan", m, "--data", d, "--kernels", "none", "-o", tmp_path / "p.json", "-q").exit_code == 0
    assert invoke("quantize", m, "--data", d, "--kernels", "none", "-o", tmp_path / "a.onnx", "-q", "--no-latency").exit_code == 0
    assert invoke("quantize", m, "--plan", tmp_path / "p.json", "-o", tmp_path / "b.onnx", "-q", "--no-latency").exit_code == 0
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_a_table_left_in_its_file_is_rounded_as_a_loaded_one(tmp_path, monkeypatch):
    """A model past 2 GB keeps its weights in their file (qconv.io lazy loading): the table is read and rounded a block
    of rows at a time from the mapped file, and the written model is the loaded one's."""
    from qconv import io

    src = tmp_path / "e.onnx"
    onnx.save_model(table_model(), str(src), save_as_external_data=True, location="e.onnx.data", size_threshold=0)
    written = {}
    for name, threshold in (("loaded", io.LAZY_BYTES), ("lazy", 0)):
        monkeypatch.setattr(io, "LAZY_BYTES", threshold)
        out = tmp_path / name / "q.onnx"
        out.parent.mkdir()
        r = invoke("quantize", src, "--mode", "dynamic", "-o", out, "-q", "--no-latency")
        assert r.exit_code == 0, r.output
        written[name] = onnx.load(str(out))
        assert any(t.data_type == TensorProto.INT8 and list(t.dims) == [V, D] for t in written[name].graph.initializer)
    assert written["loaded"].graph.SerializeToString(deterministic=True) == written["lazy"].graph.SerializeToString(deterministic=True)
