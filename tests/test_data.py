"""Feed rules: stacks, batches, scalars, fixed batch dims, casts, and the errors for data that cannot feed."""

import numpy as np
import pytest

from qconv.data import FeedSource, InputSpec
from qconv.errors import QconvError

IMG = InputSpec("x", np.dtype(np.float32), ("N", 3, 4))
SR = InputSpec("rate", np.dtype(np.float32), ())


def feeds(path, specs, **kw):
    return list(FeedSource(path, specs, **kw))


def test_batch_split_along_axis0(tmp_path):
    np.save(tmp_path / "d.npy", np.zeros((10, 3, 4), np.float32))
    got = feeds(tmp_path / "d.npy", [IMG], batch_size=4)
    assert [f["x"].shape[0] for f in got] == [4, 4, 2]
    assert FeedSource(tmp_path / "d.npy", [IMG], batch_size=4).count() == 3


def test_stack_of_feeds(tmp_path):
    np.save(tmp_path / "d.npy", np.zeros((5, 2, 3, 4), np.float32))
    got = feeds(tmp_path / "d.npy", [IMG], batch_size=4)
    assert len(got) == 5 and all(f["x"].shape == (2, 3, 4) for f in got)


def test_scalar_goes_to_every_feed_and_npz_keys(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.ones((3, 3, 4)), rate=np.float32(16000))
    got = feeds(tmp_path / "d.npz", [IMG, SR])
    assert len(got) == 3
    assert all(f["rate"] == 16000 and f["x"].dtype == np.float32 for f in got)  # float64 cast to float32


def test_fixed_batch_dimension_wins(tmp_path):
    spec = InputSpec("x", np.dtype(np.float32), (2, 3, 4))
    np.save(tmp_path / "d.npy", np.zeros((6, 3, 4), np.float32))
    assert [f["x"].shape[0] for f in feeds(tmp_path / "d.npy", [spec], batch_size=5)] == [2, 2, 2]


def test_samples_limit_rows(tmp_path):
    np.save(tmp_path / "d.npy", np.zeros((10, 3, 4), np.float32))
    got = feeds(tmp_path / "d.npy", [IMG], batch_size=4, samples=6)
    assert sum(f["x"].shape[0] for f in got) == 6


def test_folder_reads_files_in_name_order(tmp_path):
    for k in range(3):
        np.save(tmp_path / f"b{k}.npy", np.full((1, 3, 4), k, np.float32))
    got = feeds(tmp_path, [IMG])
    assert [float(f["x"][0, 0, 0]) for f in got] == [0.0, 1.0, 2.0]


@pytest.mark.parametrize("array,specs,message", [
    (np.zeros((2, 3, 5), np.float32), [IMG], "needs size 4 on axis 2"),
    (np.zeros((2, 2, 2, 3, 4), np.float32), [IMG], "neither a stack of feeds"),
    (np.zeros((2, 3, 4), np.complex64), [IMG], "expects float32 but the data is complex64"),
    (np.full((2, 3, 4), np.nan, np.float32), [IMG], "contains NaN or Inf"),
])
def test_bad_data_is_named(tmp_path, array, specs, message):
    np.save(tmp_path / "d.npy", array)
    with pytest.raises(QconvError, match=message):
        feeds(tmp_path / "d.npy", specs)


def test_npz_key_mismatch_names_the_keys(tmp_path):
    np.savez(tmp_path / "d.npz", y=np.zeros((2, 3, 4), np.float32))
    with pytest.raises(QconvError, match=r"missing x; unknown y"):
        feeds(tmp_path / "d.npz", [IMG])


def test_npy_for_a_two_input_model_is_refused(tmp_path):
    np.save(tmp_path / "d.npy", np.zeros((2, 3, 4), np.float32))
    with pytest.raises(QconvError, match="feeds a single-input model"):
        feeds(tmp_path / "d.npy", [IMG, SR])


def test_truncated_npy(tmp_path):
    np.save(tmp_path / "d.npy", np.zeros((100, 3, 4), np.float32))
    raw = (tmp_path / "d.npy").read_bytes()
    (tmp_path / "d.npy").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(QconvError, match="cannot read data file"):
        feeds(tmp_path / "d.npy", [IMG])


def test_different_feed_counts_across_inputs(tmp_path):
    other = InputSpec("m", np.dtype(np.float32), ("N", 3, 4))
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 3, 4)), m=np.zeros((3, 3, 4)))
    with pytest.raises(QconvError, match="different numbers of feeds"):
        feeds(tmp_path / "d.npz", [IMG, other])


def test_npz_members_stream_in_row_blocks(tmp_path):
    from qconv.data import NpzRows

    rng = np.random.default_rng(0)
    a = rng.normal(size=(37, 3, 4)).astype(np.float32)
    for save in (np.savez, np.savez_compressed):
        p = tmp_path / f"{save.__name__}.npz"
        save(p, x=a, s=np.float32(2.0))
        rows = NpzRows(p, "x.npy")
        assert rows.shape == a.shape and rows.dtype == a.dtype
        got = [rows[k:k + 5] for k in range(0, 37, 5)]  # forward, as feeds are read
        np.testing.assert_array_equal(np.concatenate(got), a)
        np.testing.assert_array_equal(rows[3:4], a[3:4])  # backward: the stream restarts
        np.testing.assert_array_equal(np.asarray(rows), a)
        specs = [InputSpec("x", np.dtype(np.float32), ("N", 3, 4)), InputSpec("s", np.dtype(np.float32), ())]
        feeds = list(FeedSource(p, specs, batch_size=8))
        np.testing.assert_array_equal(np.concatenate([f["x"] for f in feeds]), a)
        assert all(float(f["s"]) == 2.0 for f in feeds)


def test_identity_is_kept_while_the_files_are_unchanged_and_follows_them_when_they_change(tmp_path):
    """A job and its calibration both ask for the data's identity: the files are hashed once, but a file rewritten
    (other bytes, other size or time) is hashed again, the selection options always count, and a source with a kept
    hash still pickles (Dask ships sources to workers)."""
    import os
    import pickle

    path = tmp_path / "d.npy"
    np.save(path, np.zeros((4, 3, 4), np.float32))
    src = FeedSource(path, [IMG], batch_size=2)
    first = src.identity()
    assert src.identity() == first == FeedSource(path, [IMG], batch_size=2).identity()
    assert pickle.loads(pickle.dumps(src)).identity() == first
    src.batch_size = 1
    assert src.identity() != first
    src.batch_size = 2
    np.save(path, np.ones((4, 3, 4), np.float32))  # same size: the modification time tells
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 1_000_000))
    assert src.identity() == FeedSource(path, [IMG], batch_size=2).identity() != first
