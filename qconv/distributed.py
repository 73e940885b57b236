"""Calibration shards as tasks on Dask (``pip install 'qconv[dask]'``): qconv schedules nothing itself.

``--executor local`` runs in this process as always. ``local:N`` starts a Dask ``LocalCluster`` of N worker
processes (one thread each) on this machine; ``dask://HOST:PORT`` connects to a running scheduler. The data set
is cut into ``shards`` interleaved shards (feed k goes to shard k mod S, whatever the executor), each a task
that loads the model from its shared path (no model bytes are shipped), reads only its own feeds, streams them
through onnxruntime within the memory budget and returns its serialized statistics (O(bins) per tensor). The
driver merges them in shard order, so the file is the same on 1 worker or 64, and the same as
``--executor local:1``. A task that raises, or whose worker dies, is run once more; a second failure fails the
run with the shard named, and nothing is written.
"""

from __future__ import annotations

import atexit
import json
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from qconv.errors import QconvError, UsageError

DEFAULT_SHARDS = 16
INSTALL = "pip install 'qconv[dask]'"


@dataclass(frozen=True)
class Executor:
    kind: str  # local | cluster | dask
    workers: int = 1
    address: str = ""

    @property
    def distributed(self) -> bool:
        return self.kind != "local"


def require_dask(spec: str) -> None:
    """A usage error (exit 2, before any work) naming the install command when the optional extra is missing."""
    import importlib.util

    try:
        found = importlib.util.find_spec("dask") is not None and importlib.util.find_spec("distributed") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise UsageError(f"--executor {spec} needs Dask, an optional extra that is not installed: {INSTALL}")


def parse_executor(spec: str | None) -> Executor:
    """``local``, ``local:N`` or ``dask://HOST:PORT``; a distributed one only where Dask is installed."""
    if spec in (None, "", "local"):
        return Executor("local")
    if spec.startswith(("local:", "dask://")):
        require_dask(spec)
    if spec.startswith("local:"):
        try:
            n = int(spec.split(":", 1)[1])
        except ValueError:
            n = 0
        if n < 1:
            raise UsageError(f"--executor {spec}: local:N needs a worker count N >= 1 (e.g. local:4)")
        return Executor("cluster", workers=n)
    if spec.startswith("dask://"):
        address = spec[len("dask://"):]
        if ":" not in address:
            raise UsageError(f"--executor {spec}: give the scheduler as dask://HOST:PORT (e.g. dask://10.0.0.5:8786)")
        return Executor("dask", address=f"tcp://{address}")
    raise UsageError(f"--executor '{spec}' is not one of local, local:N, dask://HOST:PORT")


def _client(executor: Executor):
    import dask
    from dask.distributed import Client, LocalCluster

    if executor.kind == "cluster":
        # Dask's nanny sets MALLOC_TRIM_THRESHOLD_=65536 in its workers, and setting it also fixes glibc's mmap threshold
        # at 128 KB: every larger array (onnxruntime's outputs, numpy's temporaries) is then a fresh mmap, zeroed page
        # by page. A shard ran 1.46x slower per batch in a worker than in a plain process (PP-OCR cls, 128 batches:
        # 4.24 s with the variable, 2.90 s without); our workers live for one run, so trimming buys nothing.
        with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
            cluster = LocalCluster(n_workers=executor.workers, threads_per_worker=1, processes=True, dashboard_address=None,
                                   host="127.0.0.1", silence_logs=50)
        return Client(cluster), cluster
    try:
        return Client(executor.address, timeout=30), None
    except OSError as exc:
        raise QconvError(f"cannot reach the Dask scheduler at {executor.address} ({exc}); start one with `dask scheduler`") from None


_EARLY: dict[Executor, Future] = {}  # local clusters started while the driver prepares: run_tasks takes them


def start_early(spec: str | None) -> None:
    """For ``local:N``: start the cluster, and the workers' imports, on a background thread now, so that they overlap the
    driver's own start (model load, checks, data hashing; measured: 2.8 s of cluster start and 2 s of worker imports
    after 3-5 s of driver work on a small model). run_tasks takes the cluster; one never used is closed at exit."""
    executor = parse_executor(spec)
    if executor.kind != "cluster" or executor in _EARLY:
        return
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qconv-cluster")
    _EARLY[executor] = pool.submit(_started, executor)
    pool.shutdown(wait=False)
    if len(_EARLY) == 1:
        atexit.register(_close_unused)


def _started(executor: Executor):
    client, cluster = _client(executor)
    client.run(_warm)
    return client, cluster


def _warm() -> None:
    """On each worker: the imports a shard task needs, before the first task arrives."""
    import importlib

    for module in ("qconv.pipeline", "qconv.calib.collect"):
        importlib.import_module(module)


def _close_unused() -> None:
    for future in list(_EARLY.values()):
        try:
            client, cluster = future.result()
        except Exception:  # noqa: BLE001 - a cluster that failed to start has nothing to close
            continue
        client.close()
        cluster.close()
    _EARLY.clear()


def run_tasks(executor: Executor, fn: Callable, tasks: list[tuple], label: str,
              progress: Callable[[str, int | None], Callable[[int], None]]) -> list:
    """``fn(*task)`` for every task on the engine, results in task order; one retry, then fail naming the task."""
    where = {"local": "in this process", "cluster": f"{executor.workers} local workers", "dask": executor.address}[executor.kind]
    advance = progress(f"{label} ({where})", len(tasks))
    if not executor.distributed:
        out = []
        for t in tasks:
            out.append(fn(*t))
            advance(1)
        return out
    from dask.distributed import as_completed

    early = _EARLY.pop(executor, None)
    client, cluster = early.result() if early is not None else _client(executor)
    try:
        futures = [client.submit(fn, *t, retries=1, pure=False, key=f"qconv-shard-{k}-{os.getpid()}")
                   for k, t in enumerate(tasks)]
        index = {f.key: k for k, f in enumerate(futures)}
        results: list = [None] * len(tasks)
        for future in as_completed(futures):
            k = index[future.key]
            try:
                results[k] = future.result()
            except QconvError as exc:
                raise QconvError(f"shard {k}/{len(tasks)} failed twice: {exc}") from None
            except Exception as exc:  # noqa: BLE001 - a killed worker or an error the task raised, after its retry
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise QconvError(f"shard {k}/{len(tasks)} failed twice ({type(exc).__name__}: {first})") from None
            advance(1)
        return results
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def calibrate_shard(model: str, data: str, per_channel: bool, batch_size: int, shard: tuple[int, int], bins: int,
                    momentum: float, names: list[str], max_memory: int, cast: bool, equalize: bool = False,
                    hist_samples: int = 0, scales: dict | None = None, smoothing: dict | None = None) -> dict:
    """One shard's statistics: what a worker runs. Returns {"seen": feeds, "tensors": {name: TensorObserver}} (the
    observers travel pickled, their histograms as plain arrays: O(bins) per tensor)."""
    from qconv import pipeline
    from qconv.calib.collect import collect, memory_groups

    _fault_injection(shard)
    prepared = _prepared(model, per_channel, equalize, scales, smoothing)
    source = pipeline.feeds_for(prepared, data, batch_size, None, shard, cast)
    if next(iter(source), None) is None:
        return {"seen": 0, "tensors": {}}
    groups = memory_groups(prepared.model, source, names, max_memory, hist_samples)
    observers, seen = collect(prepared.model, source, threads=1, bins=bins, momentum=momentum, names=names, groups=groups,
                              samples=hist_samples, cache=_SESSIONS)
    return {"seen": seen, "tensors": observers}


_PREPARED: dict = {}  # per worker process: the model of the last job, keyed by path, size, mtime and scheme
_SESSIONS: dict = {}  # per worker process: that model's calibration graph and session (qconv.calib.collect's cache)


def _prepared(model: str, per_channel: bool, equalize: bool = False, scales: dict | None = None, smoothing: dict | None = None):
    from qconv import pipeline
    from qconv.plan.config import QuantConfig

    st = os.stat(model)
    key = (model, st.st_size, st.st_mtime_ns, per_channel, equalize, json.dumps(scales or {}, sort_keys=True),
           json.dumps(smoothing or {}, sort_keys=True))
    if key not in _PREPARED:
        _PREPARED.clear()  # one model at a time: a worker's memory holds one set of weights
        _SESSIONS.clear()
        prepared = pipeline.load(Path(model), QuantConfig(per_channel=per_channel, equalize="off"))
        if equalize:  # as the main process equalized before calibrating (the same steps as quantize --calib replays)
            pipeline.equalize_recorded(prepared, scales or {}, plain_pairs=True)
        pipeline.smooth_recorded(prepared, smoothing or {})  # then SmoothQuant, as the main process did
        _PREPARED[key] = prepared
    return _PREPARED[key]


def _fault_injection(shard: tuple[int, int]) -> None:
    """For the fault tests only: QCONV_FAULT=kill:K:MARKER kills the worker running shard K once (the marker file
    records that it happened), QCONV_FAULT=fail:K makes shard K raise every time."""
    spec = os.environ.get("QCONV_FAULT", "")
    if not spec:
        return
    kind, _, rest = spec.partition(":")
    k, _, marker = rest.partition(":")
    if not k.isdigit() or int(k) != shard[0]:
        return
    if kind == "kill" and marker and not os.path.exists(marker):
        Path(marker).write_text("killed once")
        os._exit(17)
    if kind == "fail":
        raise QconvError(f"injected failure in shard {shard[0]}")
