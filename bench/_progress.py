"""Progress for the CLI: the engine's own display, and one line per finished job.

A run's progress is the engine's (``pipeline.run(..., progress=True)``, DESIGN.md
section 13): a tqdm bar on a terminal, a plain line now and then otherwise, drawn by the process
that runs the pipeline -- for a live run its own spawned process, which writes to this one's
stderr. :class:`Progress` only says which job starts (for a run that draws its own progress)
and prints one line per finished job to stdout in every mode, so logs and CI keep a record.
"""
from __future__ import annotations

import sys
from typing import TextIO

__all__ = ["Progress"]


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
