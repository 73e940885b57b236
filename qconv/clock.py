"""What a run of the tool itself costs: wall seconds per phase and the process's peak memory, for the report's
``cost`` section. A quantizer runs in CI on every model change, so its own time is part of what it reports: where a
``quantize --data`` run spends it (statistics, the default's accuracy checks, evaluation) is in every report, not
only in a profiler.

Phases are marked where the work is (``timed`` on the stages' functions); outside a ``recording()`` (the library used
directly, worker processes) marking costs nothing and records nothing. A phase inside another is reported under it
("bias correction > rewrite"), and the calls of one phase are summed.
"""

from __future__ import annotations

import contextvars
import functools
import sys
import time
from contextlib import contextmanager

_current: contextvars.ContextVar["Recorder | None"] = contextvars.ContextVar("qconv_clock", default=None)


class Recorder:
    """Seconds and calls per phase path, in the order each path was first entered."""

    def __init__(self):
        self.start = time.perf_counter()
        self.stack: list[str] = []
        self.totals: dict[tuple[str, ...], list] = {}

    def summary(self) -> dict:
        return {"seconds": round(time.perf_counter() - self.start, 3), "peak_rss_mb": peak_rss_mb(),
                "phases": [{"phase": " > ".join(path), "seconds": round(s, 3), "calls": n} for path, (s, n) in self.totals.items()]}


@contextmanager
def recording():
    """Record the phases run inside the block (this thread and its context only)."""
    rec = Recorder()
    token = _current.set(rec)
    try:
        yield rec
    finally:
        _current.reset(token)


def summary() -> dict | None:
    """The current recording's cost so far (None outside one)."""
    rec = _current.get()
    return None if rec is None else rec.summary()


@contextmanager
def phase(name: str):
    rec = _current.get()
    if rec is None:
        yield
        return
    rec.stack.append(name)
    path, t0 = tuple(rec.stack), time.perf_counter()
    rec.totals.setdefault(path, [0.0, 0])  # listed in the order first entered
    try:
        yield
    finally:
        entry = rec.totals[path]
        entry[0] += time.perf_counter() - t0
        entry[1] += 1
        rec.stack.pop()


def recorded(fn):
    """Decorator: each call of the function is a recording (its report's ``cost``)."""
    @functools.wraps(fn)
    def inner(*args, **kwargs):
        with recording():
            return fn(*args, **kwargs)
    return inner


def longest(cost: dict, n: int = 3) -> list[dict]:
    """The ``n`` longest outer phases of a cost summary (a report's ``cost``), longest first."""
    outer = [p for p in cost.get("phases") or [] if " > " not in str(p.get("phase"))]
    return sorted(outer, key=lambda p: -float(p.get("seconds") or 0.0))[:n]


def timed(name: str):
    """Decorator: each call of the function is a phase ``name``."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            with phase(name):
                return fn(*args, **kwargs)
        return inner
    return wrap


def peak_rss_mb() -> float | None:
    """This process's peak resident memory so far, in MB (worker processes of --executor not included)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1 << 20) if sys.platform == "darwin" else peak / 1024, 1)
