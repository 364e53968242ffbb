"""Progress for the CLI: the engine's own display, and one line per finished job.

A run's progress is the engine's (``pipeline.run(..., progress=engine_progress())``, DESIGN.md
section 13): a tqdm bar on a terminal, a plain line now and then otherwise, drawn by the process
that runs the pipeline -- for a live run its own spawned process, which writes to this one's
stderr. :class:`Progress` only says which job starts (for a run that draws its own progress)
and prints one line per finished job to stdout in every mode, so logs and CI keep a record.
"""
from __future__ import annotations

import importlib.util
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

__all__ = ["Progress", "ProgressLines", "engine_progress"]


def engine_progress(stream: TextIO | None = None) -> Any:
    """The ``progress=`` of a run in this process: ``True`` (the engine's display on stderr),
    or, on a terminal without tqdm (``pip install 'conveyor[progress]'``), the engine's plain
    lines (:class:`ProgressLines`) instead of an ImportError."""
    err = stream if stream is not None else sys.stderr
    if _isatty(err) and importlib.util.find_spec("tqdm") is None:
        return ProgressLines(lambda line: print(line, file=err, flush=True))
    return True


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class ProgressLines:
    """A ``progress=`` callable: the engine's plain line (``engine.Progress.line()``) to
    ``write`` every ``every`` seconds and once at the end (the engine calls it ~10 times a
    second)."""

    def __init__(self, write: Callable[[str], Any], every: float = 5.0) -> None:
        self.write, self.every = write, every
        self._next = time.monotonic() + every

    def __call__(self, p: Any) -> None:
        now = time.monotonic()
        if p.final or now >= self._next:
            self._next = now + self.every
            self.write(p.line())


class Progress:
    """The jobs of one command: ``start`` each (announced on ``stream`` when the run draws its
    own progress), ``done`` each with its one-line result (to ``out``).

    ``update`` (what ``bench._harness.run_in_child`` calls with the child's count of visible
    items) draws nothing: the run's progress is the engine's, drawn where the run is. ``tty``
    is accepted for older callers and unused: the engine asks the stream itself."""

    def __init__(self, total_jobs: int, *, stream: TextIO | None = None,
                 out: TextIO | None = None, tty: bool | None = None) -> None:
        self.total = total_jobs
        self.stream = stream or sys.stderr
        self.out = out or sys.stdout
        self.job = 0
        self.label = ""
        self.items = 0

    def start(self, label: str, items: int, *, announce: bool = False) -> None:
        self.job += 1
        self.label, self.items = label, items
        if announce:  # the engine's bar or lines follow, from the run's own process
            self.stream.write(f"[{self.job}/{self.total}] {label}: {items} items\n")
            self.stream.flush()

    def update(self, done: int) -> None:
        pass

    def done(self, line: str) -> None:
        self.out.write(f"[{self.job}/{self.total}] {line}\n")
        self.out.flush()
