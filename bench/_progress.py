"""Progress for the CLI: a one-line bar on a terminal, plain lines otherwise.

Each finished job prints one line to stdout in both modes (so logs and CI keep a record); on a
terminal a bar on stderr shows the current job's items as they become visible.
"""
from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress"]


class Progress:
    def __init__(self, total_jobs: int, *, stream: TextIO | None = None,
                 out: TextIO | None = None, tty: bool | None = None) -> None:
        self.total = total_jobs
        self.stream = stream or sys.stderr
        self.out = out or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.job = 0
        self.label = ""
        self.items = 0
        self.t0 = time.monotonic()
        self._job_t0 = self.t0
        self._drawn = 0.0

    def start(self, label: str, items: int) -> None:
        self.job += 1
        self.label, self.items = label, items
        self._job_t0 = time.monotonic()
        self.update(0, force=True)

    def update(self, done: int, *, force: bool = False) -> None:
        if not self.tty:
            return
        now = time.monotonic()
        if not force and now - self._drawn < 0.1:
            return
        self._drawn = now
        width = 24
        frac = (self.job - 1 + (done / self.items if self.items else 0)) / max(self.total, 1)
        fill = round(frac * width)
        bar = "#" * fill + "." * (width - fill)
        line = (f"[{bar}] {self.job}/{self.total} {self.label}: {done}/{self.items} items, "
                f"{now - self._job_t0:.1f}s (total {now - self.t0:.0f}s)")
        self.stream.write("\r\x1b[2K" + line[:160])
        self.stream.flush()

    def done(self, line: str) -> None:
        if self.tty:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()
        self.out.write(f"[{self.job}/{self.total}] {line}\n")
        self.out.flush()
