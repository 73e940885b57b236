"""Node-name patterns (fnmatch globs, case-sensitive), as --exclude-nodes, overrides and the modes read them."""

from __future__ import annotations

import fnmatch
from typing import Iterable


def first_match(name: str, patterns: Iterable[str]) -> str | None:
    """The first of ``patterns`` that ``name`` matches (in the order given), or None."""
    for pattern in patterns:
        if fnmatch.fnmatchcase(name, pattern):
            return pattern
    return None


def matches_any(pattern: str, names: Iterable[str]) -> bool:
    """``pattern`` names at least one of ``names`` (exactly or as a glob)."""
    names = names if isinstance(names, (set, frozenset, dict)) else set(names)
    return pattern in names or any(fnmatch.fnmatchcase(n, pattern) for n in names)
