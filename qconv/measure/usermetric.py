"""``--metric MODULE:FUNCTION``: a user's own task metric, scored on the float model's outputs and the quantized one's.

The function is called once per feed with two dicts of output name -> array (the float model's, then the other
model's) and returns either a number (the feed's score, weighted by its rows) or a pair ``(total, count)`` summed
over feeds (characters right and characters, boxes kept and boxes), so the run's value is ``sum(total) / sum(count)``.
Higher is better. Evaluation reports it, ``--min-metric`` gates on it, and tuning never takes a candidate that scores
it lower than the plan as given and ranks by it before cosine. MODULE is an importable module (the current folder is
searched first) or a path to a ``.py`` file.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from qconv.errors import QconvError, UsageError


@dataclass(frozen=True)
class UserMetric:
    spec: str
    fn: Callable

    def score(self, names: list[str], ref: list, got: list, rows: int) -> tuple[float, float]:
        """(total, count) of one feed."""
        try:
            value = self.fn(dict(zip(names, ref)), dict(zip(names, got)))
        except Exception as exc:  # noqa: BLE001 - the user's code: its failure is one line naming it
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise QconvError(f"--metric {self.spec} failed: {type(exc).__name__}: {first}") from None
        if isinstance(value, (tuple, list)) and len(value) == 2:
            total, count = float(value[0]), float(value[1])
        elif isinstance(value, (int, float, np.floating, np.integer)):
            total, count = float(value) * rows, float(rows)
        else:
            raise QconvError(f"--metric {self.spec} returned {type(value).__name__}: return a number or a (total, count) pair")
        if not (math.isfinite(total) and math.isfinite(count)) or count < 0:
            raise QconvError(f"--metric {self.spec} returned a non-finite or negative value ({total}, {count})")
        return total, count


@functools.lru_cache(maxsize=8)
def load(spec: str | None) -> UserMetric | None:
    """The metric ``spec`` names (``module:function`` or ``path/to/file.py:function``), or None. Loaded once per process
    (the job's check, evaluation and tuning all ask): a file module's top level runs once."""
    if not spec:
        return None
    module_name, sep, func = spec.rpartition(":")
    if not sep or not module_name or not func:
        raise UsageError(f"--metric {spec}: give MODULE:FUNCTION (e.g. mymetrics:chars_right or ./metrics.py:score)")
    try:
        if module_name.endswith(".py") or "/" in module_name:
            path = Path(module_name)
            if not path.is_file():
                raise UsageError(f"--metric {spec}: no such file {path}")
            loader = importlib.util.spec_from_file_location(f"qconv_user_metric_{path.stem}", path)
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            if "" not in sys.path and str(Path.cwd()) not in sys.path:
                sys.path.insert(0, str(Path.cwd()))
            module = importlib.import_module(module_name)
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001 - importing user code
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"--metric {spec}: cannot import {module_name} ({type(exc).__name__}: {first})") from None
    fn = getattr(module, func, None)
    if not callable(fn):
        raise UsageError(f"--metric {spec}: {module_name} has no function {func}")
    return UserMetric(spec, fn)
