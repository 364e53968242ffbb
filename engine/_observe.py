"""Watching a run: the observer contract and plumbing, and a capture of the ``engine`` logger
for tests (DESIGN.md §13).

The run loop drives every observer on the dispatcher thread::

    obs = observers(progress, stage_names, total, observe)   # [] when nothing watches
    for o in obs: o.start(RunInfo.at(backend.now(), clock, strategy))
    ...after every dispatcher step, with the results that became visible (maybe none):
    for o in obs: o.update(batch, sched)
    ...at the end (the report, or None for stream() and on errors):
    for o in obs: o.close(report)

``update`` must stay cheap: counting is O(len(results)); what reads the scheduler (in flight
per stage) and draws runs at most ~10 times a second. The observers the engine ships: the
progress bar or plain progress lines (engine/_progress.py) and OpenTelemetry spans and metrics
(engine/_otel.py). The engine imports with the standard library only: tqdm
(``conveyor[progress]``) and opentelemetry-api (``conveyor[otel]``) are imported when asked
for, with an ImportError naming the extra when missing.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any, TextIO

from ._progress import ProgressObserver
from ._records import Observer, RunInfo

__all__ = [
    "LogCapture",
    "Observer",
    "RunInfo",
    "capture_logs",
    "observers",
]


# -- the contract (RunInfo, Observer) is in engine._records, re-exported here --------------


def observers(progress: Any = False, stages: Sequence[str] = (), total: int | None = None,
              observe: Sequence[Any] | None = None, *,
              stream: TextIO | None = None) -> list[Observer]:
    """The observers of one run.

    ``progress``: ``False``/``None`` (none); ``True`` (a tqdm bar on stderr when it is a
    terminal -- plain lines there, with a warning naming ``conveyor[progress]``, if tqdm is
    missing; otherwise a plain line to stderr every few seconds and every 10% of ``total``);
    a text stream (the same, drawn on it: ``progress=sys.stdout``); ``"bar"`` (the tqdm bar,
    an ImportError naming the extra if tqdm is missing); ``"lines"`` (plain lines, even on a
    terminal); a tqdm-like bar of the caller's (anything with ``update`` and
    ``set_postfix_str``: counts go to it, it is not closed); or a callable, called with a
    :class:`Progress` snapshot ~10 times a second and once at the end (``final=True``).

    ``observe``: more observers, e.g. ``[engine.otel()]``. An entry with an ``observer()``
    method (such as :class:`Otel`) is a factory: it is asked for a fresh observer for this run,
    so one ``otel()`` can serve many runs, even at once. Any other entry must have ``start``,
    ``update`` and ``close``.
    """
    out: list[Observer] = []
    if progress is not None and progress is not False:
        out.append(ProgressObserver(progress, stages, total, stream=stream))
    if observe is not None:
        if isinstance(observe, str | bytes) or not isinstance(observe, Sequence):
            raise TypeError(f"observe: expected a list of observers such as [engine.otel()], "
                            f"got {observe!r}")
        for i, o in enumerate(observe):
            factory = getattr(o, "observer", None)
            if callable(factory):
                o = factory()
            if not all(callable(getattr(o, m, None)) for m in ("start", "update", "close")):
                raise TypeError(f"observe[{i}]: expected an observer (start, update, close) "
                                f"or a factory with observer(), got {o!r}")
            out.append(o)
    return out


# -- the engine's log, for tests ---------------------------------------------------------------
class LogCapture(logging.Handler):
    """The records the ``engine`` logger emitted inside :func:`capture_logs`."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self, level: int | str | None = None) -> list[str]:
        """The rendered messages, of ``level`` only if given (``"INFO"`` or ``logging.INFO``)."""
        return [r.getMessage() for r in self._at(level)]

    def templates(self, level: int | str | None = None) -> list[str]:
        """The messages before formatting (``"stage %r: limit %d -> %d"``): what to compare
        with, since the arguments vary from run to run."""
        return [str(r.msg) for r in self._at(level)]

    def find(self, template: str, level: int | str | None = None) -> list[logging.LogRecord]:
        """The records whose template starts with ``template``."""
        return [r for r in self._at(level) if str(r.msg).startswith(template)]

    def assert_logged(self, template: str, level: int | str | None = None) -> logging.LogRecord:
        """The first record whose template starts with ``template`` (at ``level``); fails
        listing what was logged if there is none."""
        found = self.find(template, level)
        if not found:
            at = f"{_level_name(level)} " if level is not None else ""
            raise AssertionError(f"no {at}record like {template!r}; logged: "
                                 f"{sorted(set(self.templates()))!r}")
        return found[0]

    def assert_clean(self, *secrets: str) -> None:
        """No record mentions any of ``secrets`` (values, keys, messages that may echo them),
        in its message, its arguments or its traceback."""
        for r in self.records:
            text = r.getMessage() + " " + repr(r.args)
            if r.exc_info and r.exc_info[1] is not None:
                text += " " + logging.Formatter().formatException(r.exc_info)
            for s in secrets:
                if s in text:
                    raise AssertionError(f"log record {r.msg!r} mentions {s!r}")

    def _at(self, level: int | str | None) -> list[logging.LogRecord]:
        if level is None:
            return list(self.records)
        n = logging.getLevelName(level) if isinstance(level, str) else level
        return [r for r in self.records if r.levelno == n]


def _level_name(level: int | str) -> str:
    return level if isinstance(level, str) else logging.getLevelName(level)


@contextlib.contextmanager
def capture_logs(level: int = logging.DEBUG, name: str = "engine") -> Iterator[LogCapture]:
    """Capture the ``engine`` logger's records at ``level`` and above::

        with capture_logs() as logs:
            pipeline.run(items)
        logs.assert_logged("budget %r paused", "INFO")
        logs.assert_clean(api_key, *values)
    """
    logger = logging.getLogger(name)
    handler = LogCapture()
    handler.setLevel(level)
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(min(old, level) if old != logging.NOTSET else level)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
