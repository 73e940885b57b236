"""What a comparison adds up to when one output holds several kinds of values: the parts of a concatenated output are
scored on their own, and scores in [0, 1] by which entries pass 0.25 (a detector's decisions)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from qconv.measure.slices import concat_parts, output_slices
from qconv.measure.tally import Metrics, Tally
from tests.conftest import make_model


def head(parts_shape=("N",)):
    """boxes [1, 4, N] (pixels) ++ sigmoid scores [1, 3, N] -> [1, 7, N], as a YOLOv8 head ends."""
    n = parts_shape[0]
    nodes = [helper.make_node("Sigmoid", ["logits"], ["scores"], name="sig"),
             helper.make_node("Concat", ["boxes", "scores"], ["out"], axis=-2, name="cat")]
    return make_model(nodes, [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, 4, n]),
                              helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3, n])],
                      [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 7, n])])


def test_output_slices_from_the_graph_and_from_measured_sizes():
    from qconv.graph.intake import infer_types

    m = head()
    infer_types(m)
    assert output_slices(m) == {"out": (1, [(0, 4), (4, 7)])}
    assert concat_parts(m) == {"boxes": ("out", -2), "scores": ("out", -2)}
    bare = head()
    del bare.graph.input[:]  # the parts' shapes unknown: only measured sizes say where they are
    assert output_slices(bare) == {}
    assert output_slices(bare, {"boxes": 4, "scores": 3}) == {"out": (1, [(0, 4), (4, 7)])}
    del bare.graph.output[0].type.tensor_type.shape.dim[:]  # nor the rank: a negative axis cannot be placed
    assert output_slices(bare, {"boxes": 4, "scores": 3}) == {}


def test_clipping_small_scores_shows_in_the_parts_and_the_decisions_not_in_the_whole():
    rng = np.random.default_rng(0)
    boxes = rng.uniform(0, 640, (1, 4, 500)).astype(np.float32)
    scores = (rng.uniform(0, 1, (1, 3, 500)) ** 6).astype(np.float32)  # mostly small, a few confident
    ref = np.concatenate([boxes, scores], axis=1)
    got = ref.copy()
    got[:, 4:] = np.where(scores < 0.3, 0.0, scores)  # a range that clips the small scores
    whole = Tally(["out"])
    whole.add([ref], [got])
    assert whole.metrics().passing is None and not whole.decisions  # a report's pass over the eval data does no more
    parts = Tally(["out"], slices={"out": (1, [(0, 4), (4, 7)])}, objective=True)
    parts.add([ref], [got])
    m0, m1 = whole.metrics(), parts.metrics()
    assert m0.cosine == pytest.approx(m1.cosine) and m0.cosine > 0.9999
    assert m1.slice_cosine < 0.99 and m1.worst_cosine == m1.slice_cosine
    # Entries between 0.25 and 0.3 no longer pass: the decisions differ; the boxes (pixels) are not scores.
    assert m1.passing < 1.0 and set(parts.decisions) == {"out", "out[0:4]", "out[4:7]"}
    assert not parts.decisions["out[0:4]"][2] and parts.decisions["out[4:7]"][2]


def test_per_feed_decisions_are_each_feeds_own_and_add_up_to_the_totals():
    rng = np.random.default_rng(1)
    refs = [rng.uniform(0, 1, (2, 5)).astype(np.float32) for _ in range(4)]  # scores, and a top-1 per row
    gots = [np.clip(r + rng.normal(0, 0.15, r.shape), 0, 1).astype(np.float32) for r in refs]
    t = Tally(["out"], objective=True)
    alone = []
    for r, q in zip(refs, gots):
        t.add([r], [q], rows=2)
        one = Tally(["out"], objective=True)
        one.add([r], [q], rows=2)
        alone.append(one.metrics())
    m = t.metrics()
    per = dict(m.per_feed)
    assert list(per) == ["scores passing 0.25 in out", "top-1 agreement"]
    assert per["top-1 agreement"] == tuple(a.agreement for a in alone) and np.mean(per["top-1 agreement"]) == m.agreement
    assert per["scores passing 0.25 in out"] == tuple(a.passing for a in alone)
    both, either = t.decisions["out"][:2]
    assert m.passing == both / either
    plain = Tally(["out"])
    plain.add([refs[0]], [gots[0]])
    assert plain.metrics().per_feed is None  # a report's tally keeps no per-feed values


def test_the_users_metric_is_kept_per_feed_for_the_noise_rule():
    """A group move that lifts the user's task metric must lift it beyond the noise of the feeds, as the built-in
    decisions must: each feed's total / count (a feed that counts nothing: 1, the same for every candidate)."""
    from qconv.measure.tally import decisions_resolved
    from qconv.measure.usermetric import UserMetric

    kept = UserMetric("boxes:kept", lambda ref, got: (float((got["out"] > 0.5).sum()), float((ref["out"] > 0.5).sum())))
    ref = [np.array([[0.9, 0.8, 0.1]], np.float32), np.array([[0.1, 0.2, 0.3]], np.float32), np.array([[0.9, 0.9, 0.9]], np.float32)]

    def tally(gots):
        t = Tally(["out"], objective=True, metric=kept)
        for r, q in zip(ref, gots):
            t.add([r], [np.asarray(q, np.float32)])
        return t.metrics()

    old = tally([[[0.9, 0.4, 0.1]], [[0.1, 0.2, 0.3]], [[0.9, 0.9, 0.4]]])
    assert dict(old.per_feed)["your --metric"] == (0.5, 1.0, 2 / 3) and old.metric == pytest.approx(3 / 5)
    one_page = tally([[[0.9, 0.8, 0.1]], [[0.1, 0.2, 0.3]], [[0.9, 0.9, 0.4]]])  # one page better, the rest the same
    ok, why = decisions_resolved(one_page, old)
    assert not ok and why.startswith("your --metric moved +0.1667 a feed on average")
    plain = Tally(["out"], metric=kept)
    plain.add([ref[0]], [ref[0]])
    assert plain.metrics().per_feed is None


def test_metrics_round_trip_and_the_worst_cosine():
    m = Metrics(0.999, float("inf"), 0.9, None, 0.95, 0.8)
    assert Metrics.from_dict(m.to_dict()) == m and m.to_dict()["sqnr_db"] == "inf"
    assert m.worst_cosine == 0.95 and Metrics(0.99, 20.0).worst_cosine == 0.99
