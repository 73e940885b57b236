"""``qconv kernels``: the kernel cost tables int8 plans weigh (show one, time a model's, measure an op-kind one)."""

from __future__ import annotations

import json
from pathlib import Path

from qconv import io
from qconv.errors import UsageError
from qconv.jobs.plan import PlanJob, run_kernels
from qconv.plan import kernels


def shown(spec: str) -> kernels.Table:
    """The table ``--kernels spec`` names (shipped or a file)."""
    if spec in ("auto", "none"):
        raise UsageError(f"--kernels {spec} names no one table: give shipped or a file (or MODEL to time)")
    return kernels.load(spec)


def timed(job: PlanJob, progress) -> tuple[kernels.Table, Path]:
    """MODEL's own table, timed again and cached (what --kernels auto plans with), and where it is cached."""
    path = run_kernels(job, progress)
    return kernels.Table.of(json.loads(path.read_text()), str(path)), path


def measured() -> kernels.Table:
    """This CPU's op-kind table, by the micro-benchmark (about 10 s, one thread)."""
    from qconv.measure.kernels import measure

    return kernels.Table.of(measure(), "measured table")


def write(table: kernels.Table, out: Path) -> None:
    io.write_json(table.data, out)
