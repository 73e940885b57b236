"""How much search (wall seconds or a number of trials), the clock that enforces it, and tuning's options."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qconv.errors import UsageError


class BudgetSpent(Exception):
    """Raised by a trial asked for past the budget: the search stops with the best model so far."""


@dataclass(frozen=True)
class Budget:
    """Wall seconds, or a number of trials (deterministic: cached trials count too)."""

    seconds: float | None = 600.0
    trials: int | None = None

    @classmethod
    def parse(cls, text: str) -> Budget:
        t = text.strip().lower().replace(" ", "")
        m = re.fullmatch(r"(\d+)(trials?)", t)
        if m:
            if int(m.group(1)) < 1:
                raise UsageError("--budget in trials must be at least 1")
            return cls(None, int(m.group(1)))
        m = re.fullmatch(r"(\d+(?:\.\d+)?)(s|m|min|h)?", t)
        if not m:
            raise UsageError(f"--budget '{text}' is not a time like 10m, 90s, 1h or a trial count like 40trials")
        scale = {"s": 1, None: 1, "m": 60, "min": 60, "h": 3600}[m.group(2)]
        seconds = float(m.group(1)) * scale
        if seconds <= 0:
            raise UsageError("--budget must be positive")
        return cls(seconds, None)

    def describe(self) -> str:
        return f"{self.trials} trials" if self.trials is not None else f"{self.seconds:g} s"


class Clock:
    """The budget against the trials made and the time since the search started."""

    def __init__(self, budget: Budget, reserve: float = 0.0, after_trials: float = 0.0):
        self.budget = budget
        self.reserve = reserve  # seconds kept for what follows the search (a time budget is a hard limit)
        # and what follows it in trial-sized steps (the unseen rows' two models, the final rewrite), at the search's own
        # median trial time: PicoDet's 6 s trials ended 8-26 s past 180
        self.after_trials = after_trials
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def left(self, trials: int, next_seconds: float = 0.0, per_trial: float = 0.0) -> bool:
        """Room for one more trial: under a trial budget, its count; under a time budget, the trial's expected
        ``next_seconds`` too, so that a trial is not started that would end past the limit (PicoDet's 9 s trials
        took a 180 s budget to 212 s when only the start was checked), and what follows the search (``per_trial``:
        the search's median trial seconds)."""
        if self.budget.trials is not None:
            return trials < self.budget.trials
        return self.seconds() + next_seconds + self.after_trials * per_trial < self.budget.seconds - self.reserve

    def fits(self, seconds: float) -> bool:
        """``seconds`` more end within a time budget (a trial budget never stops what follows the search)."""
        return self.budget.trials is not None or self.seconds() + seconds <= self.budget.seconds

    def affordable(self, trials: list, wanted: int) -> int:
        """How many of ``wanted`` trials to spend on one sensitivity round (at least 1): a third of the trials left,
        or what 35% of the time left buys at the median trial's time so far."""
        b = self.budget
        if b.trials is not None:
            return max(1, min(wanted, (b.trials - len(trials)) // 3))
        per = max(0.05, np.median([t.seconds for t in trials if not t.cached] or [1.0]))
        return max(1, min(wanted, int(0.35 * (b.seconds - self.reserve - self.seconds()) / per)))


DEFAULT_ROWS = 64


@dataclass(frozen=True, kw_only=True)
class TuneOptions:
    budget: Budget = Budget()
    rows: int = DEFAULT_ROWS  # held rows every trial is measured on (fewer if one float pass would take long)
    cache_dir: Path | None = None  # default: $QCONV_CACHE_DIR/tuning or ~/.cache/qconv/tuning
