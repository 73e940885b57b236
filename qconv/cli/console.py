"""The one place that prints. Messages and progress go to stderr; reports and JSON go to stdout."""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


class Terminal:
    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        # Off a terminal (CI logs, pipes) tables get a fixed, wide layout instead of 80 columns.
        self.err = Console(stderr=True, highlight=False, soft_wrap=True, width=None if sys.stderr.isatty() else 160)
        self.out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)
        self._progress: Progress | None = None

    def info(self, msg: str) -> None:
        if not self.quiet:
            self.err.print(escape(msg))

    def warn(self, msg: str) -> None:
        if not self.quiet:
            self.err.print(f"[yellow]warning:[/yellow] {escape(msg)}")

    def error(self, msg: str) -> None:
        self.err.print(f"[bold red]error:[/bold red] {escape(msg)}", soft_wrap=True)

    def print_json(self, obj) -> None:
        sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")
        sys.stdout.flush()

    def print(self, renderable) -> None:
        if not self.quiet:
            self.out.print(renderable)

    @contextmanager
    def progress(self):
        """Yield a factory ``(label, total) -> advance(n)``: bars on a terminal; off one (CI logs), plain
        ``label: done/total`` lines on stderr at most every PLAIN_EVERY seconds, and one when a stage ends."""
        if self.quiet:
            yield lambda label, total: (lambda n: None)
            return
        if not self.err.is_terminal:
            yield self._plain_progress
            return
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=self.err, transient=True) as bar:
            def factory(label, total):
                task = bar.add_task(label, total=total)
                return lambda n: bar.advance(task, n)
            yield factory


    def _plain_progress(self, label: str, total: int | None):
        state = {"done": 0, "last": time.monotonic()}

        def advance(n: int) -> None:
            state["done"] += n
            now = time.monotonic()
            finished = total is not None and state["done"] >= total
            if finished or now - state["last"] >= PLAIN_EVERY:
                state["last"] = now
                of = f"/{total}" if total else ""
                sys.stderr.write(f"{label}: {state['done']}{of} batches\n")
                sys.stderr.flush()

        return advance


PLAIN_EVERY = 10.0  # seconds between plain progress lines
_PLAIN = not sys.stdout.isatty()


def table(title: str, columns: list[str], rows: list[list]) -> Table:
    """A table; ASCII borders when stdout is not a terminal, so CI logs stay clean."""
    t = Table(title=title, title_justify="left", box=box.ASCII if _PLAIN else box.HEAVY_HEAD)
    for c in columns:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*[str(x) for x in r])
    return t
