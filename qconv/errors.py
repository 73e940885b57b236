"""Errors a user can act on. Each carries the exit code the CLI returns."""

from __future__ import annotations


class QconvError(Exception):
    """A problem with the user's input or environment: one line naming the problem and the fix."""

    exit_code = 1


class UsageError(QconvError):
    """Options that contradict each other or cannot be honoured (exit 2, like click's usage errors)."""

    exit_code = 2


class GateFailed(QconvError):
    """A quality gate failed: the outputs were written, the pipeline should stop (exit 3)."""

    exit_code = 3
