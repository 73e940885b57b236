"""Calibration shards on a real local Dask cluster (worker processes on this machine): identical results on any
number of workers, a killed worker's shard retried, a failing shard named, nothing half-written."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from qconv.cli.main import cli
from tests.conftest import SAMPLES

pytest.importorskip("dask.distributed")
D = SAMPLES / "digits_cnn"


def calibrate(out, *extra, env=None, batch=8):
    return CliRunner(env=env).invoke(cli, ["calibrate", str(D / "model.onnx"), "--data", str(D / "calib.npy"), "--batch-size", str(batch),
                                           "-o", str(out), "-q", *map(str, extra)], catch_exceptions=False)


@pytest.fixture(scope="module")
def in_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "local.json"
    assert calibrate(out, "--shards", "4").exit_code == 0
    return out


def test_cluster_gives_the_same_file_as_one_process(in_process, tmp_path):
    out = tmp_path / "cluster.json"
    r = calibrate(out, "--executor", "local:2", "--shards", "4")
    assert r.exit_code == 0, r.output
    assert out.read_bytes() == in_process.read_bytes()
    plain = tmp_path / "plain.json"
    assert calibrate(plain).exit_code == 0
    a, b = json.loads(plain.read_text()), json.loads(out.read_text())
    assert b["options"]["shards"] == 4 and b["samples"] == a["samples"] and b["data_id"] == a["data_id"]
    for name, t in a["tensors"].items():  # statistics that merge exactly are the unsharded run's, bit for bit
        u = b["tensors"][name]
        assert (u["min"], u["max"], u["count"], u["nonfinite"], u["hist"]) == (t["min"], t["max"], t["count"], t["nonfinite"], t["hist"])
        assert (u["ema_min"], u["ema_max"], u["extremes"]) == (t["ema_min"], t["ema_max"], t["extremes"])


def test_one_row_feeds_stacked_on_workers_give_the_single_runs_statistics(tmp_path, monkeypatch):
    from qconv.calib import collect

    out, local, plain = tmp_path / "cluster.json", tmp_path / "local.json", tmp_path / "plain.json"
    assert calibrate(out, "--executor", "local:2", "--shards", "4", batch=1).exit_code == 0  # each worker's shards stacked
    assert calibrate(local, "--shards", "4", batch=1).exit_code == 0
    assert out.read_bytes() == local.read_bytes()
    monkeypatch.setattr(collect, "STACK_ROWS", 1)  # one row a run: what the stacks must equal
    assert calibrate(plain, batch=1).exit_code == 0
    a, b = json.loads(plain.read_text())["tensors"], json.loads(out.read_text())["tensors"]
    assert a.keys() == b.keys() and all(b[n][k] == t[k] for n, t in a.items() for k in ("min", "max", "count", "hist", "ema_min", "ema_max", "extremes"))


def test_a_killed_worker_is_retried(in_process, tmp_path):
    out, marker = tmp_path / "killed.json", tmp_path / "killed.marker"
    r = calibrate(out, "--executor", "local:2", "--shards", "4", env={"QCONV_FAULT": f"kill:1:{marker}"})
    assert r.exit_code == 0, r.output
    assert marker.exists() and out.read_bytes() == in_process.read_bytes()


def test_a_failing_shard_fails_the_run_and_writes_nothing(tmp_path):
    out = tmp_path / "failed.json"
    r = calibrate(out, "--executor", "local:2", "--shards", "4", env={"QCONV_FAULT": "fail:2"})
    assert r.exit_code == 1 and "shard 2/4 failed twice: injected failure in shard 2" in r.output
    assert not out.exists()


@pytest.mark.parametrize("args,message", [
    (["--executor", "local:0"], "local:N needs a worker count N >= 1"),
    (["--executor", "yarn://x"], "is not one of local, local:N, dask://HOST:PORT"),
    (["--executor", "local:2", "--samples", "10"], "--samples cannot be combined with --executor"),
    (["--executor", "local:2", "--shard", "0/2"], "--shard K/N runs one shard by hand"),
])
def test_executor_usage_errors(args, message, tmp_path):
    r = calibrate(tmp_path / "x.json", *args)
    assert r.exit_code == 2 and message in r.output


def test_quantize_calibrates_on_the_cluster(tmp_path):
    r = CliRunner().invoke(cli, ["quantize", str(D / "model.onnx"), "--data", str(D / "calib.npy"), "--batch-size", "8",
                                 "--executor", "local:2", "-o", str(tmp_path / "q.onnx"), "--json", "--no-latency"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["calibration"]["recorded_with"]["shards"] == 16 and report["outputs"]["logits"]["cosine"] > 0.999


def test_evaluation_on_the_cluster_matches_the_local_one(tmp_path):
    args = ["quantize", str(D / "model.onnx"), "--data", str(D / "calib.npy"), "--eval-data", str(D / "eval.npy"), "--eval-labels",
            str(D / "eval_labels.npy"), "--batch-size", "50", "--json", "--no-latency", "--layer-samples", "0"]
    local = CliRunner().invoke(cli, [*args, "-o", str(tmp_path / "a.onnx")])
    remote = CliRunner().invoke(cli, [*args, "-o", str(tmp_path / "b.onnx"), "--executor", "local:2", "--shards", "4"])
    assert local.exit_code == 0 and remote.exit_code == 0, remote.output
    a, b = json.loads(local.stdout), json.loads(remote.stdout)
    assert b["task"] == a["task"] and b["fidelity"]["rows"] == a["fidelity"]["rows"] == 500
    assert b["outputs"]["logits"]["cosine"] == pytest.approx(a["outputs"]["logits"]["cosine"], abs=1e-9)
    assert b["outputs"]["logits"]["sqnr_db"] == pytest.approx(a["outputs"]["logits"]["sqnr_db"], abs=1e-6)
    assert b["fidelity"]["top1_agreement"] == a["fidelity"]["top1_agreement"]
    r = CliRunner().invoke(cli, ["report", str(D / "model.onnx"), str(tmp_path / "b.onnx"), "--data", str(D / "eval.npy"),
                                 "--eval-labels", str(D / "eval_labels.npy"), "--batch-size", "50", "--executor", "local:2",
                                 "--json", "--no-latency", "--layer-samples", "0"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["task"] == a["task"]


def test_a_cluster_started_early_is_used_or_closed(tmp_path):
    """local:N starts its cluster while the driver prepares (distributed.start_early): the run takes it, and a run that
    never needs it (its file is up to date) exits cleanly, leaving no worker behind (a start still under way when the
    interpreter shuts down is abandoned by Dask itself)."""
    import subprocess
    import sys

    import psutil

    out = tmp_path / "c.json"
    args = [sys.executable, "-m", "qconv", "calibrate", str(D / "model.onnx"), "--data", str(D / "calib.npy"), "--batch-size", "8",
            "-o", str(out), "--executor", "local:2", "--shards", "4"]
    first = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    stamp = out.stat().st_mtime_ns
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    workers = set()
    while proc.poll() is None:  # the workers the unused cluster starts
        try:
            workers |= {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
        except psutil.Error:
            pass
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "up to date" in err and out.stat().st_mtime_ns == stamp and "Traceback" not in err
    assert not [p for p in workers if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


def test_local_workers_keep_the_default_allocator_threshold():
    """Dask's nanny sets MALLOC_TRIM_THRESHOLD_ in its workers, which pins glibc's mmap threshold at 128 KB: a shard then
    ran 1.46x slower per batch than in a plain process. local:N's workers start without it; the rest of Dask's worker
    environment (one BLAS thread) is kept."""
    import os

    from qconv import distributed

    before = os.environ.get("MALLOC_TRIM_THRESHOLD_")  # the nanny sets its variables in the starting process too
    client, cluster = distributed._client(distributed.parse_executor("local:1"))
    try:
        env = client.run(lambda: {k: os.environ.get(k) for k in ("MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS")})
    finally:
        client.close()
        cluster.close()
    assert [e["MALLOC_TRIM_THRESHOLD_"] for e in env.values()] == [before] and os.environ.get("MALLOC_TRIM_THRESHOLD_") == before
    assert [e["OMP_NUM_THREADS"] for e in env.values()] == [os.environ.get("OMP_NUM_THREADS", "1")]
