"""int4 for language models: decoder feeds, HQQ, AWQ, mixed int4/int8, accuracy_level; the sample decoder
(sample_models/tiny_decoder, a torch.onnx export with a KV cache) through the real CLI and onnxruntime."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from onnx import TensorProto, helper, numpy_helper

from qconv.cli.main import cli as main
from qconv.data import FeedSource, InputSpec
from qconv.errors import QconvError
from qconv.numeric import awq, hqq, qmath
from qconv.rewrite import weight_only as wo
from qconv.runtime import run, session
from tests.conftest import SAMPLES, make_model

DECODER = SAMPLES / "tiny_decoder"
LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 16


def _past(batch=1, length=0):
    z = np.zeros((batch, KV_HEADS, length, HEAD_DIM), np.float32)
    return {f"past_key_values.{i}.{kv}": z for i in range(LAYERS) for kv in ("key", "value")}


def _specs(model_path):
    m = onnx.load(str(model_path))
    return [InputSpec.from_value_info(i) for i in m.graph.input]


# ---------------------------------------------------------------- feeds for a decoder

def test_token_ids_alone_feed_a_decoder_with_an_empty_cache():
    feeds = list(FeedSource(DECODER / "prompts.npz", _specs(DECODER / "model.onnx"), batch_size=8))
    assert len(feeds) == 4
    for feed in feeds:
        assert feed["input_ids"].shape == (8, 64)
        for i in range(LAYERS):
            assert feed[f"past_key_values.{i}.key"].shape == (8, KV_HEADS, 0, HEAD_DIM)
    sess = session(str(DECODER / "model.onnx"))
    out = run(sess, feeds[0])
    assert out[0].shape == (8, 64, 256) and out[1].shape == (8, KV_HEADS, 64, HEAD_DIM)


def test_mask_and_positions_are_derived_and_an_unreadable_cache_is_an_error(tmp_path):
    specs = [InputSpec("input_ids", np.dtype(np.int64), ("b", "s")), InputSpec("attention_mask", np.dtype(np.int64), ("b", "t")),
             InputSpec("position_ids", np.dtype(np.int64), ("b", "s")), InputSpec("past.0", np.dtype(np.float32), ("b", 4, "p", 8))]
    np.savez(tmp_path / "ids.npz", input_ids=np.arange(12).reshape(2, 6))
    feed = next(iter(FeedSource(tmp_path / "ids.npz", specs, batch_size=2)))
    np.testing.assert_array_equal(feed["attention_mask"], np.ones((2, 6)))
    np.testing.assert_array_equal(feed["position_ids"], np.tile(np.arange(6), (2, 1)))
    assert feed["past.0"].shape == (2, 4, 0, 8)
    two_free = specs[:1] + [InputSpec("cache_x", np.dtype(np.float32), ("b", "p", "q"))]
    with pytest.raises(QconvError, match="cannot tell its cache axis"):
        next(iter(FeedSource(tmp_path / "ids.npz", two_free, batch_size=2)))
    other = specs[:1] + [InputSpec("pixel_values", np.dtype(np.float32), ("b", 3))]
    with pytest.raises(QconvError, match="missing pixel_values"):
        next(iter(FeedSource(tmp_path / "ids.npz", other, batch_size=2)))


# ---------------------------------------------------------------- HQQ and AWQ arithmetic

def test_hqq_zero_points_are_integers_and_its_error_beats_min_max_on_heavy_tails():
    rng = np.random.default_rng(0)
    x = (rng.standard_t(4, size=(4000, 32)) * 0.02).astype(np.float32)
    qp = hqq.fit(x, wo.UINT4)
    assert qp.zero_point.dtype == np.uint8 and qp.zero_point.max() <= 15 and np.all(qp.scale > 0)

    def mean_abs(p):
        return float(np.abs(x - qmath.dequantize(qmath.quantize(x, p), p)).mean())

    assert mean_abs(qp) < 0.99 * mean_abs(wo.fit_blocks(x, symmetric=False))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), k_dim=st.sampled_from([32, 48, 64]))
def test_awq_search_is_never_worse_than_plain_rounding_by_its_own_measure(seed, k_dim):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(256, k_dim)) * rng.uniform(0.1, 10, size=k_dim)  # channels of very different size
    h = x.T @ x / len(x)
    w = rng.normal(size=(k_dim, 16)).astype(np.float32)
    s, alpha, errors = awq.search_scale([w], h, lambda a: wo.rtn(a, 16, True).dequantize())
    assert errors[alpha] <= errors[0.0] and s.shape == (k_dim,) and np.all(s > 0)
    chosen = wo.rtn((w * s[:, None]).astype(np.float32), 16, True).dequantize() / s[:, None]
    assert awq.output_error(w, chosen, h) == pytest.approx(errors[alpha], rel=1e-6)


@settings(max_examples=60, deadline=None)
@given(blocks=arrays(np.float32, st.tuples(st.integers(1, 5), st.just(16)), elements=st.floats(-10, 10, width=32)),
       seed=st.integers(0, 1000))
def test_clip_search_never_raises_a_blocks_weighted_error(blocks, seed):
    weights = np.random.default_rng(seed).uniform(0.01, 5, size=blocks.shape).astype(np.float32)
    fit = lambda b: wo.fit_blocks(b, symmetric=True)  # noqa: E731

    def err(p):
        return np.sum(weights * (blocks - qmath.dequantize(qmath.quantize(blocks, p), p)) ** 2, axis=1)

    assert np.all(err(awq.clip_fit(blocks, weights, fit)) <= err(fit(blocks)) * (1 + 1e-6) + 1e-12)


def _norm_model(residual: bool, seed: int = 0):
    """x -> x * gamma (an RMSNorm's weight) -> MatMul(W); with ``residual`` the scaled tensor is also an output."""
    rng = np.random.default_rng(seed)
    k_dim, n_dim = 64, 32
    gamma = rng.uniform(0.5, 2, k_dim).astype(np.float32)
    w = rng.normal(size=(k_dim, n_dim)).astype(np.float32)
    nodes = [helper.make_node("Mul", ["x", "gamma"], ["h"], name="norm_mul"),
             helper.make_node("MatMul", ["h", "w"], ["y"], name="proj")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", n_dim])]
    if residual:
        outputs.append(helper.make_tensor_value_info("h", TensorProto.FLOAT, ["n", k_dim]))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", k_dim])
    model = make_model(nodes, [x], outputs, [numpy_helper.from_array(gamma, "gamma"), numpy_helper.from_array(w, "w")])
    feeds = [{"x": (rng.normal(size=(64, k_dim)) * np.where(np.arange(k_dim) < 4, 20.0, 1.0)).astype(np.float32)}
             for _ in range(4)]  # four outlier channels, as language models have
    return model, feeds


@pytest.mark.parametrize("residual", [False, True])
def test_awq_folds_into_the_norm_or_inserts_a_mul_and_lowers_the_output_error(residual):
    model, feeds = _norm_model(residual)
    ref = session(model)
    errors = {}
    for method in ("rtn", "awq"):
        r = wo.quantize_int4(model, block_size=16, method=method, calib_feeds=feeds if method == "awq" else None)
        onnx.checker.check_model(r.model)
        sess = session(r.model)
        errors[method] = sum(float(np.sum((run(ref, f)[0] - run(sess, f)[0]) ** 2)) for f in feeds)
        if method == "awq":
            (scaling,) = r.scalings
            assert scaling["alpha"] > 0
            muls = [n for n in r.model.graph.node if n.op_type == "Mul"]
            if residual:  # h is also an output: gamma cannot change, a Mul carries 1 / s
                assert scaling["folded_into"] is None and len(muls) == 2
                h = run(sess, feeds[0])[1]
                np.testing.assert_allclose(h, run(ref, feeds[0])[1], rtol=1e-6)
            else:
                assert scaling["folded_into"] == "gamma" and len(muls) == 1
    assert errors["awq"] < 0.9 * errors["rtn"]


# ---------------------------------------------------------------- mixed int4 / int8

def test_a_size_budget_stores_the_worst_layers_in_8_bits_that_onnxruntime_runs():
    rng = np.random.default_rng(1)
    ws = [rng.normal(size=(64, 64)).astype(np.float32) for i in range(4)]
    ws[2][::16] *= 30  # one layer much harder for 4 bits: an outlier row in every block
    nodes = [helper.make_node("MatMul", [f"a{i}", f"w{i}"], [f"a{i + 1}"], name=f"mm{i}") for i in range(4)]
    model = make_model(nodes, [helper.make_tensor_value_info("a0", TensorProto.FLOAT, ["n", 64])],
                       [helper.make_tensor_value_info("a4", TensorProto.FLOAT, ["n", 64])],
                       [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(ws)])
    all4 = wo.quantize_int4(model, block_size=32)
    size4 = all4.model.ByteSize()
    budget = size4 + 64 * 64 // 2 + 100  # room for one layer
    mixed = wo.quantize_int4(model, block_size=32, max_bytes=budget)
    bits = {q["weight"]: q["bits"] for q in mixed.quantized}
    assert [w for w, b in bits.items() if b == 8] == ["w2"]
    assert size4 < mixed.model.ByteSize() <= budget
    node = next(n for n in mixed.model.graph.node if n.name.startswith("mm2"))
    a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
    inits = {t.name: numpy_helper.to_array(t) for t in mixed.model.graph.initializer}
    assert a["bits"] == 8 and inits[node.input[1]].shape == (64, 2, 32) and len(node.input) == 3
    assert a["accuracy_level"] == 4  # the only fast CPU kernel for 8-bit weights
    assert wo.with_accuracy_level(mixed.model, None).graph.node[2] == node
    # decode 8-bit values independently: zero point 128, scales [N, n_blocks]
    q = inits[node.input[1]].astype(np.float32).reshape(64, 64) - 128.0
    decoded = (q.reshape(64, 2, 32) * inits[node.input[2]][:, :, None]).reshape(64, 64).T
    x = rng.normal(size=(5, 64)).astype(np.float32)
    single = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 64])],
                        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 64])], [numpy_helper.from_array(ws[2], "w")])
    one = wo.quantize_int4(single, block_size=32, max_bytes=10**6)
    assert one.quantized[0]["bits"] == 8
    exact = onnx.ModelProto()
    exact.CopyFrom(one.model)
    for n in exact.graph.node:  # float activations, to check the layout alone
        kept = [a for a in n.attribute if a.name != "accuracy_level"]
        del n.attribute[:]
        n.attribute.extend(kept)
    np.testing.assert_allclose(run(session(exact), {"x": x})[0], x @ decoded, rtol=1e-4, atol=1e-3)
    fast = run(session(one.model), {"x": x})[0]  # int8 activations (accuracy_level 4)
    assert np.linalg.norm(fast - x @ decoded) < 0.02 * np.linalg.norm(x @ decoded)
    assert np.abs(decoded - ws[2]).max() <= np.abs(ws[2]).max() / 127


# ---------------------------------------------------------------- accuracy_level

def test_accuracy_level_is_set_or_removed_on_every_matmul_nbits():
    rng = np.random.default_rng(2)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])],
                       [numpy_helper.from_array(rng.normal(size=(64, 8)).astype(np.float32), "w")])
    q = wo.quantize_int4(model).model
    four = wo.with_accuracy_level(q, 4)
    assert [a.i for n in four.graph.node for a in n.attribute if a.name == "accuracy_level"] == [4]
    assert not [a for n in wo.with_accuracy_level(four, None).graph.node for a in n.attribute if a.name == "accuracy_level"]
    feeds = [{"x": rng.normal(size=(16, 64)).astype(np.float32)} for _ in range(2)]
    chosen, record = wo.choose_accuracy_level(model, q, feeds, "test rows")
    assert set(record) >= {"chosen", "rows", "default", "level4"}
    assert record["level4"]["argmax_agreement"] is not None and 0.9 < record["level4"]["min_cosine"] <= 1.0


# ---------------------------------------------------------------- the sample decoder through the CLI

def _generate(sess, prompts, steps, forced=None):
    out = run(sess, {"input_ids": prompts, **_past(len(prompts))})
    logits, past = out[0], out[1:]
    names = list(_past())
    picked = []
    for k in range(steps):
        token = logits[:, -1].argmax(-1)
        picked.append(token)
        nxt = token if forced is None else forced[:, k]
        out = run(sess, {"input_ids": nxt[:, None].astype(np.int64), **dict(zip(names, past))})
        logits, past = out[0], out[1:]
    return np.stack(picked, axis=1)


@pytest.mark.parametrize("args, floor", [(["--mode", "int4", "--data", "prompts.npz", "--int4-method", "awq"], 0.8),
                                         (["--mode", "int4", "--data", "prompts.npz", "--int4-method", "awq_gptq"], 0.8),
                                         (["--mode", "int4", "--int4-method", "hqq"], 0.8),
                                         (["--mode", "int4", "--data", "prompts.npz"], 0.8),
                                         (["--mode", "dynamic"], 0.9), (["--mode", "fp16"], 0.99)])
def test_the_sample_decoder_keeps_its_interface_and_generates_through_its_cache(tmp_path, args, floor, monkeypatch):
    monkeypatch.chdir(DECODER)
    out = tmp_path / "q.onnx"
    r = CliRunner().invoke(main, ["quantize", "model.onnx", "-o", str(out), "--no-latency", "--json", *args])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    original, quantized = onnx.load(str(DECODER / "model.onnx")), onnx.load(str(out))
    onnx.checker.check_model(quantized)
    assert [(i.name, str(i.type)) for i in quantized.graph.input] == [(i.name, str(i.type)) for i in original.graph.input]
    assert [(o.name, str(o.type)) for o in quantized.graph.output] == [(o.name, str(o.type)) for o in original.graph.output]
    if "int4" in args:
        assert report["int4"]["accuracy_level"]["chosen"] in (None, 4)
        assert report["int4"]["method"] == (args[args.index("--int4-method") + 1] if "--int4-method" in args else "gptq")
    prompts = np.load(DECODER / "eval.npz")["input_ids"][:, :32]
    ref = _generate(session(str(DECODER / "model.onnx")), prompts, 16)
    got = _generate(session(str(out)), prompts, 16, forced=ref)
    assert np.mean(got == ref) >= floor  # teacher-forced greedy steps (256) that pick fp32's byte


def test_a_model_without_a_cache_keeps_the_default_level(tmp_path):
    out = tmp_path / "q.onnx"
    r = CliRunner().invoke(main, ["quantize", str(SAMPLES / "tiny_transformer" / "model.onnx"), "-o", str(out), "--mode", "int4",
                                  "--block-size", "16", "--no-latency", "--json"])
    assert r.exit_code == 0, r.output
    level = json.loads(r.stdout)["int4"]["accuracy_level"]
    assert level["chosen"] is None and "no KV cache" in level["why"]
    assert not [a for n in onnx.load(str(out)).graph.node for a in n.attribute if a.name == "accuracy_level"]


def test_accuracy_level_0_leaves_onnxruntimes_default_and_a_bad_level_is_a_usage_error(tmp_path, monkeypatch):
    monkeypatch.chdir(DECODER)
    out = tmp_path / "q.onnx"
    r = CliRunner().invoke(main, ["quantize", "model.onnx", "-o", str(out), "--mode", "int4", "--accuracy-level", "0", "--no-latency"])
    assert r.exit_code == 0, r.output
    assert not [a for n in onnx.load(str(out)).graph.node for a in n.attribute if a.name == "accuracy_level"]
    bad = CliRunner().invoke(main, ["quantize", "model.onnx", "-o", str(tmp_path / "b.onnx"), "--mode", "int4", "--accuracy-level", "5"])
    assert bad.exit_code == 2 and not (tmp_path / "b.onnx").exists()


# ---------------------------------------------------------------- past 2 GB, in small

def test_a_model_written_with_streamed_external_weights_runs_like_the_original(tmp_path, monkeypatch):
    from qconv import runtime

    model, feeds = _norm_model(residual=True)
    path = runtime.write_external(model, tmp_path / "m.onnx", threshold=64)
    stored = onnx.load(str(path), load_external_data=False)
    assert {t.name for t in stored.graph.initializer if t.data_location == TensorProto.EXTERNAL} == {"gamma", "w"}
    expected = run(session(model), feeds[0])
    for a, b in zip(run(session(str(path)), feeds[0]), expected):
        np.testing.assert_array_equal(a, b)
    monkeypatch.setattr(runtime, "FILE_SESSION_BYTES", 64)  # every model now reaches onnxruntime through a file
    for a, b in zip(run(runtime.session(model), feeds[0]), expected):
        np.testing.assert_array_equal(a, b)
    assert len(model.graph.initializer[1].raw_data) == 64 * 32 * 4  # the caller's model keeps its weights


def test_the_identity_of_a_model_past_2gb_still_sees_every_weight(monkeypatch):
    from qconv import io

    model, _ = _norm_model(residual=False)
    monkeypatch.setattr(io, "_PROTO_LIMIT", 64)
    first = io.model_identity(model)
    assert io.model_identity(model) == first
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    w = numpy_helper.to_array(changed.graph.initializer[1]).copy()
    w[0, 0] += 1
    changed.graph.initializer[1].CopyFrom(numpy_helper.from_array(w, "w"))
    assert io.model_identity(changed) != first


def test_int4_reads_the_weights_it_replaces_from_the_source_and_leaves_it_unchanged():
    model, _ = _norm_model(residual=False)
    before = model.SerializeToString()
    r = wo.quantize_int4(model, block_size=16)
    assert model.SerializeToString() == before
    names = {t.name for t in r.model.graph.initializer}
    assert "w" not in names and "gamma" in names  # the float weight replaced, the norm's weight kept with its data
    assert all(t.raw_data or t.float_data or t.int32_data for t in r.model.graph.initializer)


def test_a_budget_can_buy_an_8_bit_embedding_table_that_onnxruntime_gathers():
    rng = np.random.default_rng(3)
    table = rng.normal(size=(40, 64)).astype(np.float32)
    table[:, ::16] *= 25  # an outlier column in every block: 4 bits are poor here
    model = make_model([helper.make_node("Gather", ["table", "ids"], ["y"], name="embed")],
                       [helper.make_tensor_value_info("ids", TensorProto.INT64, [5])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 64])], [numpy_helper.from_array(table, "table")])
    r = wo.quantize_int4(model, block_size=32, max_bytes=10**6)
    assert r.quantized[0]["bits"] == 8
    node = next(n for n in r.model.graph.node if n.op_type == "GatherBlockQuantized")
    assert {a.name: helper.get_attribute_value(a) for a in node.attribute}["bits"] == 8
    inits = {t.name: numpy_helper.to_array(t) for t in r.model.graph.initializer}
    data, scales = inits[node.input[0]], inits[node.input[2]]
    assert data.shape == (40, 64) and scales.shape == (40, 2)
    ids = np.array([0, 3, 39, 3, 7])
    decoded = ((data[ids].astype(np.float32) - 128).reshape(5, 2, 32) * scales[ids][:, :, None]).reshape(5, 64)
    got = run(session(r.model), {"ids": ids})[0]
    np.testing.assert_allclose(got, decoded, rtol=1e-6)
    assert np.abs(got - table[ids]).max() <= np.abs(table).max() / 127


def test_awq_folds_into_a_layer_normalizations_scale_and_bias():
    rng = np.random.default_rng(5)
    k_dim = 64
    inits = [numpy_helper.from_array(rng.uniform(0.5, 2, k_dim).astype(np.float32), "ln_scale"),
             numpy_helper.from_array(rng.normal(0, 0.5, k_dim).astype(np.float32), "ln_bias"),
             numpy_helper.from_array(rng.normal(size=(k_dim, 32)).astype(np.float32), "w")]
    nodes = [helper.make_node("LayerNormalization", ["x", "ln_scale", "ln_bias"], ["h"], axis=-1, name="ln"),
             helper.make_node("MatMul", ["h", "w"], ["y"], name="proj")]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", k_dim])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 32])], inits)
    feeds = [{"x": (rng.normal(size=(64, k_dim)) * np.where(np.arange(k_dim) < 4, 30.0, 1.0)).astype(np.float32)} for _ in range(4)]
    r = wo.quantize_int4(model, block_size=16, method="awq", calib_feeds=feeds)
    (scaling,) = r.scalings
    assert scaling["folded_into"] == "ln_scale" and not [n for n in r.model.graph.node if n.op_type == "Mul"]
    stored = {t.name: numpy_helper.to_array(t) for t in r.model.graph.initializer}
    ratio = numpy_helper.to_array(inits[0]) / stored["ln_scale"]
    np.testing.assert_allclose(numpy_helper.to_array(inits[1]) / stored["ln_bias"], ratio, rtol=1e-5)  # one s for both
    ref, rtn_model = session(model), session(wo.quantize_int4(model, block_size=16).model)
    awq_err = sum(float(np.sum((run(ref, f)[0] - run(session(r.model), f)[0]) ** 2)) for f in feeds)
    rtn_err = sum(float(np.sum((run(ref, f)[0] - run(rtn_model, f)[0]) ** 2)) for f in feeds)
    assert awq_err < rtn_err


def test_fp16s_kept_float_nodes_are_grouped_by_what_kept_them(tmp_path):
    r = CliRunner().invoke(main, ["quantize", str(DECODER / "model.onnx"), "-o", str(tmp_path / "h.onnx"), "--mode", "fp16",
                                  "--no-latency", "--json"])
    assert r.exit_code == 0, r.output
    groups = {g["reason"]: g for g in json.loads(r.stdout)["node_summary"]["kept_float_groups"]}
    overflow = next(g for reason, g in groups.items() if reason.startswith("powers exceed"))
    assert overflow["ops"] == {"Pow": LAYERS * 2 + 1}  # each RMSNorm's x**2 (two per layer and the final one)
    assert not any("cast from integers" in reason and "Pow" in g["ops"] for reason, g in groups.items())


def test_hessians_past_their_budget_are_taken_a_group_at_a_time_with_the_same_result(monkeypatch):
    """GPTQ on a decoder whose Hessians exceed HESSIAN_BYTES: one float pass per group of inputs, each group's weights
    rounded before the next; the Hessians, hence the model, are those of the single pass."""
    model = onnx.load(str(SAMPLES / "tiny_decoder" / "model.onnx"))
    specs = [InputSpec.from_value_info(i) for i in model.graph.input]
    feeds = FeedSource(SAMPLES / "tiny_decoder" / "prompts.npz", specs, batch_size=4)
    single = wo.quantize_int4(model, method="gptq", calib_feeds=feeds)
    budget = 12 * 64 * 64 + 1  # about one 64-wide input per group
    monkeypatch.setattr(wo, "HESSIAN_BYTES", budget)
    passes = []
    real = wo.input_hessians
    monkeypatch.setattr(wo, "input_hessians", lambda m, w, f, sess=None: passes.append(sorted(w)) or real(m, w, f, sess))
    grouped = wo.quantize_int4(model, method="gptq", calib_feeds=feeds)
    assert len(passes) > 3 and sum(len(p) for p in passes) == len({x for p in passes for x in p})  # each input once
    assert grouped.model.SerializeToString() == single.model.SerializeToString()
    assert {q["method"] for q in grouped.quantized if q["op_type"] == "MatMul"} == {"gptq"}


@pytest.mark.parametrize("method", ["gptq", "awq", "awq_gptq"])
def test_a_size_budget_takes_its_hessians_a_group_at_a_time_and_chooses_the_same_layers(monkeypatch, method):
    """Mixed int4/int8 (--max-size-mb): each weight's int4 error is measured as it is encoded, with its group's
    Hessian, so the Hessians are taken a group at a time and no dequantized weight is kept; AWQ's 8-bit candidate is
    encoded from the scaled weight then too, so no scaled float copy waits for the budget. The layers chosen for 8
    bits, and the model, are those of a single pass."""
    model = onnx.load(str(SAMPLES / "tiny_decoder" / "model.onnx"))
    specs = [InputSpec.from_value_info(i) for i in model.graph.input]
    feeds = FeedSource(SAMPLES / "tiny_decoder" / "prompts.npz", specs, batch_size=4)
    size4 = wo.quantize_int4(model, method=method, calib_feeds=feeds).model.ByteSize()
    budget = size4 + 10 * 64 * 64 // 2  # room for some layers in 8 bits, not all
    single = wo.quantize_int4(model, method=method, calib_feeds=feeds, max_bytes=budget)
    eight = [q["weight"] for q in single.quantized if q["bits"] == 8]
    assert 1 <= len(eight) < len(single.quantized) and single.model.ByteSize() <= budget
    monkeypatch.setattr(wo, "HESSIAN_BYTES", 12 * 64 * 64 + 1)
    passes = []
    real = wo.input_hessians
    monkeypatch.setattr(wo, "input_hessians", lambda m, w, f, sess=None: passes.append(sorted(w)) or real(m, w, f, sess))
    grouped = wo.quantize_int4(model, method=method, calib_feeds=feeds, max_bytes=budget)
    assert len(passes) > 3
    assert [q["weight"] for q in grouped.quantized if q["bits"] == 8] == eight
    assert grouped.model.SerializeToString() == single.model.SerializeToString()


@pytest.mark.parametrize("method", ["awq", "awq_gptq"])
def test_awq_takes_its_hessians_a_group_at_a_time_and_writes_what_one_pass_writes(monkeypatch, method):
    """AWQ past HESSIAN_BYTES: one float pass per group, inputs searched in graph order, each weight encoded once it is
    final (an up projection waits for the down projection's input, whose 1/s folds into its columns); the scalings
    and the bytes are those of the single pass."""
    model = onnx.load(str(SAMPLES / "tiny_decoder" / "model.onnx"))
    specs = [InputSpec.from_value_info(i) for i in model.graph.input]
    feeds = FeedSource(SAMPLES / "tiny_decoder" / "prompts.npz", specs, batch_size=4)
    single = wo.quantize_int4(model, method=method, calib_feeds=feeds)
    assert any(sc["folded_into"] for sc in single.scalings)
    monkeypatch.setattr(wo, "HESSIAN_BYTES", 12 * 64 * 64 + 1)
    passes, encoded = [], []
    real_hessians, real_encode = wo.input_hessians, wo._encode
    monkeypatch.setattr(wo, "input_hessians", lambda m, w, f, sess=None: passes.append(sorted(w)) or real_hessians(m, w, f, sess))
    monkeypatch.setattr(wo, "_encode", lambda g, node, *a, **k: encoded.append((len(passes), node.input[1])) or real_encode(g, node, *a, **k))
    grouped = wo.quantize_int4(model, method=method, calib_feeds=feeds)
    assert len(passes) > 3 and sum(len(p) for p in passes) == len({x for p in passes for x in p})
    assert encoded[0][0] < len(passes)  # weights are encoded between passes, not all after the last
    assert grouped.scalings == single.scalings
    assert grouped.model.SerializeToString() == single.model.SerializeToString()


def test_a_decoders_report_times_one_more_token_through_the_cache_the_first_feed_leaves(tmp_path):
    """The report of a decoder with a KV cache times the first feed and one generated token (measure.evaluate.token_step);
    the token step is wired right: its logits are those of the last position of the prompt run one token longer."""
    from qconv.measure.evaluate import token_step

    specs = [InputSpec.from_value_info(i) for i in onnx.load(str(DECODER / "model.onnx")).graph.input]
    feed = next(iter(FeedSource(DECODER / "prompts.npz", specs, batch_size=2)))
    sess = session(str(DECODER / "model.onnx"))
    step, past = token_step(sess, feed)
    ids = feed["input_ids"]
    assert past == ids.shape[1] and step["input_ids"].shape == (2, 1)
    assert all(step[f"past_key_values.{i}.{kv}"].shape[2] == past for i in range(2) for kv in ("key", "value"))
    longer = {"input_ids": np.concatenate([ids, ids[:, -1:]], axis=1),  # the prompt one token longer, from an empty cache
              **{k: np.zeros(v.shape[:2] + (0,) + v.shape[3:], v.dtype) for k, v in feed.items() if k != "input_ids"}}
    np.testing.assert_allclose(run(sess, step)[0][:, -1], run(sess, longer)[0][:, -1], atol=1e-4)
    cnn = session(str(SAMPLES / "digits_cnn" / "model.onnx"))
    assert token_step(cnn, {cnn.get_inputs()[0].name: np.load(SAMPLES / "digits_cnn" / "eval.npy")[:1]}) is None

    r = CliRunner().invoke(main, ["quantize", str(DECODER / "model.onnx"), "--mode", "int4", "--data", str(DECODER / "prompts.npz"),
                                  "-o", str(tmp_path / "q.onnx"), "--report", str(tmp_path / "r.json"), "-q"])
    assert r.exit_code == 0, r.output
    token = json.loads((tmp_path / "r.json").read_text())["latency_ms"]["token"]
    assert token["past"] == 64 and token["original"] > 0 and token["quantized"] > 0 and token["verdict"] in ("faster", "slower", "same within noise")
