"""Weights left in their file (models past 2 GB): qconv.io loads such a model without its external data and every
reader takes one weight at a time from the file. The threshold is lowered here so that small models take that path;
tests/test_large_models.py runs a real 2.2 GB one (marked large)."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from qconv import io, runtime
from qconv.cli.main import cli
from qconv.graph import copy_with_placeholders, has_lazy, hash_loaded, is_lazy, tensor_array
from tests.conftest import SAMPLES, conv_model, run_model


def _decoder(path, seed=0):
    """An embedding table, two MatMuls (one read twice) and a norm-like Mul, written with external data."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((64, 96), dtype=np.float32), "embed"),
             numpy_helper.from_array(rng.standard_normal((96, 128), dtype=np.float32) / 10, "w_up"),
             numpy_helper.from_array(rng.standard_normal((128, 96), dtype=np.float32) / 11, "w_down"),
             numpy_helper.from_array(rng.uniform(0.5, 1.5, 96).astype(np.float32), "norm")]
    inits[1].doc_string = "a field after raw_data's number in the serialization"
    nodes = [helper.make_node("Gather", ["embed", "ids"], ["x"], name="embedding"),
             helper.make_node("Mul", ["x", "norm"], ["n"], name="norm"),
             helper.make_node("MatMul", ["n", "w_up"], ["h"], name="up"),
             helper.make_node("Relu", ["h"], ["r"], name="act"),
             helper.make_node("MatMul", ["r", "w_down"], ["y"], name="down")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", 96])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save_model(model, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=0)
    return path


@pytest.fixture
def lazy(monkeypatch):
    monkeypatch.setattr(io, "LAZY_BYTES", 0)


def _loaded(path):
    return onnx.load(str(path))


def test_a_lazy_model_holds_no_weight_and_reads_each_as_loaded(tmp_path, monkeypatch):
    src = _decoder(tmp_path / "d.onnx")
    loaded, external = io.load_model_and_layout(src)
    monkeypatch.setattr(io, "LAZY_BYTES", 0)
    lazy, _ = io.load_model_and_layout(src)
    assert external and has_lazy(lazy) and not has_lazy(loaded)
    assert all(not t.raw_data for t in lazy.graph.initializer)
    for a, b in zip(lazy.graph.initializer, loaded.graph.initializer):
        np.testing.assert_array_equal(tensor_array(a), numpy_helper.to_array(b))
        h1, h2 = hashlib.sha256(), hashlib.sha256()
        hash_loaded(a, h1)
        hash_loaded(b, h2)
        assert h1.digest() == h2.digest() == hashlib.sha256(b.SerializeToString(deterministic=True)).digest()
    # the identity of a lazy model is the one a loaded model past 2 GB gets: each weight in turn
    h = hashlib.sha256()
    for op in loaded.opset_import:
        h.update(f"{op.domain}:{op.version};".encode())
    bare = copy_with_placeholders(loaded, {t.name for t in loaded.graph.initializer}).graph
    del bare.initializer[:]
    h.update(bare.SerializeToString(deterministic=True))
    for t in loaded.graph.initializer:
        h.update(t.SerializeToString(deterministic=True))
    assert io.model_identity(lazy) == h.hexdigest()


def test_a_lazy_model_runs_in_onnxruntime_from_its_own_file(tmp_path, lazy):
    src = _decoder(tmp_path / "d.onnx")
    model, _ = io.load_model_and_layout(src)
    feed = {"ids": np.array([[1, 5, 63]], np.int64)}
    got = runtime.run(runtime.session(model, prepack=False), feed)[0]
    np.testing.assert_array_equal(got, run_model(str(src), feed)[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.onnx", "d.onnx.data"]  # nothing left beside the input


def test_a_lazy_weights_past_the_file_end_is_a_one_line_error(tmp_path, lazy):
    src = _decoder(tmp_path / "d.onnx")
    data = tmp_path / "d.onnx.data"
    data.write_bytes(data.read_bytes()[:-100])
    r = CliRunner().invoke(cli, ["quantize", str(src), "-o", str(tmp_path / "q.onnx"), "--mode", "int4"])
    assert r.exit_code == 1
    assert "cannot read the model's external data" in r.output and "runs past the end of d.onnx.data" in r.output
    assert not (tmp_path / "q.onnx").exists()


@pytest.mark.parametrize("args", [["--mode", "int4"], ["--mode", "int4", "--int4-method", "hqq"],
                                  ["--mode", "dynamic"], ["--mode", "fp16"]])
def test_every_weight_only_mode_writes_the_same_model_from_a_lazy_load(tmp_path, monkeypatch, args):
    src = _decoder(tmp_path / "d.onnx")
    outs = {}
    for name, threshold in (("loaded", io.LAZY_BYTES), ("lazy", 0)):
        monkeypatch.setattr(io, "LAZY_BYTES", threshold)
        out = tmp_path / name / "q.onnx"
        out.parent.mkdir()
        r = CliRunner().invoke(cli, ["quantize", str(src), "-o", str(out), "--no-latency", *args])
        assert r.exit_code == 0, r.output
        outs[name] = _loaded(out)
    a, b = outs["loaded"], outs["lazy"]
    assert a.graph.SerializeToString(deterministic=True) == b.graph.SerializeToString(deterministic=True)
    assert not has_lazy(onnx.load(str(tmp_path / "lazy" / "q.onnx"), load_external_data=False))  # self-contained
    feed = {"ids": np.array([[3, 4]], np.int64)}
    np.testing.assert_array_equal(run_model(str(tmp_path / "lazy" / "q.onnx"), feed)[0],
                                  run_model(str(tmp_path / "loaded" / "q.onnx"), feed)[0])


def test_static_int8_with_calibration_reads_a_lazy_model_as_a_loaded_one(tmp_path, monkeypatch):
    src = tmp_path / "c.onnx"
    onnx.save_model(conv_model(), str(src), save_as_external_data=True, location="c.onnx.data", size_threshold=0)
    data = tmp_path / "x.npy"
    np.save(data, np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32))
    graphs = []
    for name, threshold in (("loaded", io.LAZY_BYTES), ("lazy", 0)):
        monkeypatch.setattr(io, "LAZY_BYTES", threshold)
        (tmp_path / name).mkdir()
        calib, out = tmp_path / name / "c.json", tmp_path / name / "q.onnx"
        assert CliRunner().invoke(cli, ["calibrate", str(src), "--data", str(data), "-o", str(calib)]).exit_code == 0
        r = CliRunner().invoke(cli, ["quantize", str(src), "--calib", str(calib), "-o", str(out), "--no-latency"])
        assert r.exit_code == 0, r.output
        graphs.append(_loaded(out).graph.SerializeToString(deterministic=True))
    assert graphs[0] == graphs[1]


def test_the_sample_decoder_through_the_file_path_keeps_its_int4_bytes(tmp_path, monkeypatch):
    """A real export (tiny_decoder): int4 with GPTQ on prompts, loaded lazily, equals the loaded run."""
    src = tmp_path / "m.onnx"
    onnx.save_model(onnx.load(str(SAMPLES / "tiny_decoder" / "model.onnx")), str(src), save_as_external_data=True,
                    location="m.onnx.data", size_threshold=1024)
    graphs = []
    for name, threshold in (("loaded", io.LAZY_BYTES), ("lazy", 0)):
        monkeypatch.setattr(io, "LAZY_BYTES", threshold)
        out = tmp_path / f"{name}.onnx"
        r = CliRunner().invoke(cli, ["quantize", str(src), "-o", str(out), "--mode", "int4", "--no-latency",
                                     "--data", str(SAMPLES / "tiny_decoder" / "prompts.npz")])
        assert r.exit_code == 0, r.output
        graphs.append(_loaded(out).graph.SerializeToString(deterministic=True))
    assert graphs[0] == graphs[1]


def test_a_spilled_weight_reads_back_as_it_was_from_an_aligned_offset(tmp_path):
    """io.Spill: a weight of SPILL_BYTES or more goes to the scratch file at a 64 KiB boundary (onnxruntime maps it
    from there) and comes back lazy, with the same name, type, shape and values; a smaller one stays held."""
    spill = io.Spill()
    try:
        big = numpy_helper.from_array(np.arange(3000, dtype=np.float32).reshape(30, 100), "big")
        other = numpy_helper.from_array(np.linspace(-1, 1, 700).astype(np.float16), "other")
        small = numpy_helper.from_array(np.ones(8, np.float32), "small")
        kept = [spill.keep(t) for t in (big, other, small)]
        assert [is_lazy(t) for t in kept] == [True, True, False]
        assert kept[2] is small
        for held, ref in zip((big, other), kept[:2]):
            np.testing.assert_array_equal(tensor_array(ref), numpy_helper.to_array(held))
            assert (ref.name, ref.data_type, list(ref.dims)) == (held.name, held.data_type, list(held.dims))
            assert int({e.key: e.value for e in ref.external_data}["offset"]) % io.ALIGN == 0
        written = tensor_array(kept[0])
        written[0, 0] = -5.0  # copy-on-write: the file keeps its value
        assert tensor_array(kept[0])[0, 0] == 0.0
    finally:
        spill.close()
    assert not spill.folder.exists()
