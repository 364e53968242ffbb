"""Progress of a run (DESIGN.md §13): a tqdm bar on a terminal, plain lines elsewhere, or the
caller's bar or callable, fed ``Progress`` snapshots.

``ProgressObserver`` is the observer ``progress=`` makes (see ``observers`` in
engine/_observe.py): it counts results as they become visible and, at most every ``interval``
seconds, reads the scheduler (calls running and items queued per stage) and draws. tqdm
(``conveyor[progress]``) is imported only when a bar is drawn.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO

from ._records import ItemResult

if TYPE_CHECKING:
    from ._records import RunInfo

__all__ = ["Progress", "ProgressObserver", "StageProgress"]

PROGRESS_EXTRA = "pip install 'conveyor[progress]'"
log = logging.getLogger("engine")


@dataclass(frozen=True, slots=True)
class StageProgress:
    """One stage right now: calls running, items queued for it, the limit in force."""

    name: str
    running: int
    queued: int
    limit: int

    @property
    def held(self) -> int:
        return self.running + self.queued


@dataclass(frozen=True, slots=True)
class Progress:
    """A snapshot of a run's progress, what a ``progress=`` callable receives."""

    visible: int  #: results handed over so far (ok + failed + cancelled)
    total: int | None
    ok: int
    failed: int
    cancelled: int
    elapsed_s: float
    stages: tuple[StageProgress, ...]
    final: bool = False

    @property
    def holding(self) -> str | None:
        """The stage holding most items back (queued + running), if any holds one."""
        best = max(self.stages, key=lambda s: s.held, default=None)
        return best.name if best is not None and best.held > 0 else None

    @property
    def rate(self) -> float:
        return self.visible / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def counts(self) -> str:
        return (f"ok {self.ok}, failed {self.failed}"
                + (f", cancelled {self.cancelled}" if self.cancelled else ""))

    def in_flight(self) -> list[str]:
        """``["fetch 4+12, save 1+0", "held by fetch"]`` (per stage: running + queued), or
        nothing once the run is over."""
        parts: list[str] = []
        if self.stages and not self.final:
            parts.append(", ".join(f"{s.name} {s.running}+{s.queued}" for s in self.stages))
            hold = self.holding
            if hold is not None:
                parts.append(f"held by {hold}")
        return parts

    def postfix(self) -> str:
        """The bar's postfix: ``ok 90, failed 2 | fetch 4+12, save 1+0 | held by fetch``."""
        return " | ".join([self.counts(), *self.in_flight()])

    def line(self) -> str:
        """The plain line: ``conveyor: 120/500 visible (ok 118, failed 2) in 5.0 s, 24.0/s |
        fetch 4+12, save 1+0 | held by fetch``."""
        of = f"/{self.total}" if self.total is not None else ""
        head = (f"conveyor: {self.visible}{of} visible ({self.counts()}) "
                f"in {self.elapsed_s:.1f} s, {self.rate:.1f}/s")
        return " | ".join([head, *self.in_flight()]) + (" (done)" if self.final else "")


class ProgressObserver:
    """Counts results and shows them: a tqdm bar, plain lines, or the caller's bar/callable.

    ``interval``: seconds between draws (and between reads of the scheduler); ``line_every``:
    seconds between plain lines (one also at every 10% of ``total``); ``tty``: whether
    ``stream`` is a terminal (asked of the stream by default)."""

    def __init__(self, progress: Any, stages: Sequence[str] = (), total: int | None = None, *,
                 stream: TextIO | None = None, tty: bool | None = None,
                 interval: float = 0.1, line_every: float = 5.0) -> None:
        self.names = tuple(stages)
        self.total = total
        self.stream = stream
        self.interval = interval
        self.line_every = line_every
        self.visible = self.failed = self.cancelled = 0
        self._shown = 0  # visible count the bar was last told
        self._t0 = time.monotonic()
        self._next = 0.0  # monotonic time of the next draw
        self._next_line = 0.0
        self._next_mark = 0
        self._mark = max(1, total // 10) if total else 0
        self._sched: Any = None
        self._own_bar = False
        self._started = False
        self._broken = False
        self.bar: Any = None
        self.callback: Callable[[Progress], Any] | None = None
        self.mode: str
        named = progress if isinstance(progress, str) else None  # "bar" / "lines"
        if progress is True or named in ("bar", "lines") or _is_stream(progress):
            if _is_stream(progress):
                self.stream = stream = progress
            out = stream if stream is not None else sys.stderr
            is_tty = _isatty(out) if tty is None else tty
            if named == "lines" or not is_tty:
                self.mode = "lines"
            else:
                try:
                    _tqdm_class()  # fail now, before the run starts
                    self.mode = "bar"
                    self._own_bar = True
                except ImportError:
                    if named == "bar":
                        raise
                    # True on a terminal without tqdm: plain lines, and how to get the bar
                    log.warning("progress: plain lines (no tqdm for a bar: %s)", PROGRESS_EXTRA)
                    self.mode = "lines"
        elif callable(getattr(progress, "update", None)) and \
                callable(getattr(progress, "set_postfix_str", None)):
            self.mode = "bar"
            self.bar = progress
        elif callable(progress) and not isinstance(progress, str):
            self.mode = "callback"
            self.callback = progress
        else:
            raise TypeError(f"progress: expected True, 'bar', 'lines', a text stream, a tqdm "
                            f"bar or a callable taking a Progress, got {progress!r}")

    # -- the observer --------------------------------------------------------------------------
    def start(self, info: RunInfo | None = None) -> None:
        self._started = True
        self._t0 = time.monotonic()
        self._next = self._t0 + self.interval
        self._next_line = self._t0 + self.line_every
        self._next_mark = self._mark
        if self.mode == "bar":
            if self._own_bar:
                tqdm = _tqdm_class()
                self.bar = tqdm(total=self.total, desc="conveyor", unit="item",
                                file=self.stream if self.stream is not None else sys.stderr,
                                dynamic_ncols=True)
            elif self.total is not None and getattr(self.bar, "total", 0) is None:
                self.bar.total = self.total

    def update(self, results: list[ItemResult], sched: Any) -> None:
        if not self._started:  # a loop that does not call start(): start with the first step
            self.start()
        if results:
            self.visible += len(results)
            for r in results:
                if r.status != "ok":
                    if r.status == "failed":
                        self.failed += 1
                    else:
                        self.cancelled += 1
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self.interval
        self._sched = sched
        self._draw(now, False)

    def close(self, report: Any = None) -> None:
        self._draw(time.monotonic(), True)
        if self._own_bar and self.bar is not None:
            with contextlib.suppress(Exception):
                self.bar.close()
            self.bar = None

    # -- drawing ---------------------------------------------------------------------------------
    def _complete(self) -> bool:
        """Every item is visible: the next line is the final one (close() draws it)."""
        return self.total is not None and self.visible >= self.total

    def snapshot(self, final: bool = False) -> Progress:
        stages: tuple[StageProgress, ...] = ()
        sched = self._sched
        if sched is not None and not final:
            # a plain stage's calls beyond its limit wait in the backend: queued, not running
            stages = tuple(StageProgress(st.name, min(st.running, st.limit),
                                         len(st.waiting) + max(0, st.running - st.limit),
                                         st.limit)
                           for st in sched.stages)
        elif self.names:
            stages = tuple(StageProgress(n, 0, 0, 0) for n in self.names)
        ok = self.visible - self.failed - self.cancelled
        return Progress(self.visible, self.total, ok, self.failed, self.cancelled,
                        time.monotonic() - self._t0, stages, final)

    def _draw(self, now: float, final: bool) -> None:
        if self.mode == "callback":
            assert self.callback is not None
            self.callback(self.snapshot(final))  # the caller's code: its errors are its own
            return
        if self._broken:
            return
        try:
            if self.mode == "bar":
                bar = self.bar
                if bar is None:
                    return
                bar.set_postfix_str(self.snapshot(final).postfix(), refresh=False)
                delta, self._shown = self.visible - self._shown, self.visible
                if delta:
                    bar.update(delta)  # redraws when tqdm's own mininterval allows
                if final or not delta:  # the last draw; or only the postfix (in flight) moved
                    bar.refresh()
            elif final or (not self._complete() and (
                    now >= self._next_line or (self._mark and self.visible >= self._next_mark))):
                self._next_line = now + self.line_every
                while self._mark and self._next_mark <= self.visible:
                    self._next_mark += self._mark
                out = self.stream if self.stream is not None else sys.stderr
                out.write(self.snapshot(final).line() + "\n")
                out.flush()
        except (OSError, ValueError):  # stderr closed or gone: stop drawing, not the run
            self._broken = True


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except Exception:
        return False


def _is_stream(obj: Any) -> bool:
    """A text stream to draw on (``sys.stdout``, a file): ``write`` and no bar's ``update``."""
    return (not isinstance(obj, str | bool) and callable(getattr(obj, "write", None))
            and not callable(getattr(obj, "update", None)))


def _tqdm_class() -> Any:
    try:
        from tqdm import tqdm
    except ImportError as exc:
        raise ImportError(f"progress=True on a terminal draws a tqdm bar, and tqdm is not "
                          f"installed: {PROGRESS_EXTRA}") from exc
    return tqdm

