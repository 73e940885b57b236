"""The quality ledger's small variant: the default `qconv calibrate` + `qconv quantize --calib` on the sample models,
scored on their 500 labelled eval rows and paired row by row with the default recorded in scripts/ledger_baseline.json
(written by `scripts/bench_ledger.py --write-baseline`). A default that loses top-1 beyond noise fails: the whole
95% interval of the paired difference below zero."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from qconv.cli.main import cli
from qconv.data import FeedSource, InputSpec
from tests.conftest import ROOT, SAMPLES

BASELINE = json.loads((ROOT / "scripts" / "ledger_baseline.json").read_text())["models"]


def paired_interval(base: np.ndarray, new: np.ndarray, resamples: int = 2000) -> tuple[float, float]:
    """95% bootstrap interval of mean(new) - mean(base) over the same resampled rows."""
    idx = np.random.default_rng(0).integers(0, len(base), (resamples, len(base)))
    d = new[idx].mean(1) - base[idx].mean(1)
    return float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))


def test_paired_interval_resolves_a_loss_and_not_noise():
    rng = np.random.default_rng(1)
    base = (rng.random(500) < 0.9).astype(float)
    worse = base.copy()
    worse[np.flatnonzero(base)[:15]] = 0  # 3 points lost
    assert paired_interval(base, worse)[1] < 0
    noisy = base.copy()
    noisy[np.flatnonzero(base == 1)[:3]] = 0  # three rows read worse, three better: no change in the mean
    noisy[np.flatnonzero(base == 0)[:3]] = 1
    lo, hi = paired_interval(base, noisy)
    assert lo < 0 < hi


@pytest.mark.parametrize("kernels", ["auto", "none"])
@pytest.mark.parametrize("name", ["digits_cnn", "tiny_transformer"])
def test_default_keeps_its_accuracy_on_the_sample_models(name, kernels, tmp_path, monkeypatch):
    """With the default kernel table (timed on this machine: regions where int8 is slower stay float) and without."""
    monkeypatch.setenv("QCONV_CACHE_DIR", str(tmp_path / "cache"))
    d = SAMPLES / name
    calib_data = d / ("calib.npy" if (d / "calib.npy").exists() else "calib.npz")
    eval_data = d / ("eval.npy" if (d / "eval.npy").exists() else "eval.npz")
    calib, out = tmp_path / "c.json", tmp_path / "q.onnx"
    runner = CliRunner()
    r = runner.invoke(cli, ["calibrate", str(d / "model.onnx"), "--data", str(calib_data), "-o", str(calib), "-q"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli, ["quantize", str(d / "model.onnx"), "--calib", str(calib), "-o", str(out), "-q", "--kernels", kernels])
    assert r.exit_code == 0, r.output
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    specs = [InputSpec(i.name, np.dtype(np.float32 if "float" in i.type else np.int64), tuple(i.shape)) for i in sess.get_inputs()]
    pred = np.concatenate([sess.run(None, feed)[0].argmax(-1) for feed in FeedSource(eval_data, specs, batch_size=100)])
    correct = (pred == np.load(d / "eval_labels.npy")).astype(float)
    base = BASELINE[name]
    assert base["rows"] == len(correct)
    before = np.array(base["num"]) / np.array(base["den"])
    lo, hi = paired_interval(before, correct)
    assert hi >= 0, (f"{name}: the default lost top-1 beyond noise: {100 * correct.mean():.1f}% vs {100 * before.mean():.1f}% "
                     f"in the ledger baseline (95% paired interval {100 * lo:+.1f} .. {100 * hi:+.1f} points)")


def test_detection_metric_counts_boxes_after_nms_and_false_ones_in_the_jaccard():
    from scripts.bench_ledger import yolo_jaccard_rows, yolo_rows

    def yolo_out(boxes):  # [1, 4 + 2 classes, anchors]: (cx, cy, w, h, score class 0, score class 1)
        return np.array(boxes, np.float32).T[None]

    ref = yolo_out([[100, 100, 50, 50, 0.9, 0], [102, 101, 50, 50, 0.8, 0],  # one object, two anchors: NMS keeps one
                    [300, 300, 80, 40, 0, 0.7], [500, 500, 20, 20, 0.1, 0]])  # a second object; a score below 0.25
    same = yolo_rows([ref], [ref], None)
    assert same[0].tolist() == [2] and same[1].tolist() == [2]
    got = yolo_out([[101, 100, 50, 50, 0.6, 0],  # kept (IoU > 0.5, same class)
                    [300, 300, 80, 40, 0.7, 0.1],  # the second object, wrong class: not kept
                    [700, 700, 30, 30, 0.5, 0]])  # a false detection
    kept, total = yolo_rows([ref], [got], None)
    assert kept.tolist() == [1] and total.tolist() == [2]
    kept, union = yolo_jaccard_rows([ref], [got], None)
    assert kept.tolist() == [1] and union.tolist() == [2 + 3 - 1]


def test_clear_neighbours_count_only_sentences_whose_nearest_is_not_a_near_tie():
    """Three pairs of embeddings; sentence 0's runner-up is within 0.01 cosine of its nearest, so a change that swaps
    the two counts against the all-rows metric and not against the clear one, while a swap on a clear sentence counts
    against both."""
    from scripts.bench_ledger import clear_neighbour_rows, neighbour_rows

    def unit(*v):
        v = np.array(v, np.float64)
        return v / np.linalg.norm(v)

    ref = np.stack([unit(1, 0, 0, 0), unit(1, 0.100, 0, 0.3), unit(1, 0.101, 0, -0.3),  # 0: a near-tie between 1 and 2
                    unit(0, 0, 1, 0), unit(0, 0.2, 1, 0), unit(0, 1, 0.3, 0)])
    tie = ref.copy()
    tie[0] = unit(1, 0, 0, -0.01)  # 0's nearest becomes 2, its runner-up
    agree, den = neighbour_rows([ref], [tie], None)
    assert den.sum() == 6 and agree[0] == 0
    clear_agree, clear = clear_neighbour_rows([ref], [tie], None)
    assert clear[0] == 0 and clear[3] == 1  # the tie is left out, the clear ones are counted
    assert clear_agree.sum() / clear.sum() == 1.0
    swap = ref.copy()
    swap[3] = unit(0, 1, 0.2, 0)  # 3's nearest was 4 (clear), now 5
    clear_agree, clear = clear_neighbour_rows([ref], [swap], None)
    assert clear[3] == 1 and clear_agree[3] == 0
