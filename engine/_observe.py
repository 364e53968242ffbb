"""Watching a run: a progress bar or plain progress lines, OpenTelemetry spans and metrics, and
a capture of the ``engine`` logger for tests (DESIGN.md §13).

The run loop drives every observer on the dispatcher thread::

    obs = observers(progress, stage_names, total, observe)   # [] when nothing watches
    for o in obs: o.start(RunInfo.at(backend.now(), clock, strategy))
    ...after every dispatcher step, with the results that became visible (maybe none):
    for o in obs: o.update(batch, sched)
    ...at the end (the report, or None for stream() and on errors):
    for o in obs: o.close(report)

``update`` must stay cheap: counting is O(len(results)); what reads the scheduler (in flight
per stage) and draws runs at most ~10 times a second. The engine imports with the standard
library only: tqdm (``conveyor[progress]``) and opentelemetry-api (``conveyor[otel]``) are
imported when asked for, with an ImportError naming the extra when missing.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TextIO, runtime_checkable

from ._records import ItemResult

__all__ = [
    "LogCapture",
    "Observer",
    "Otel",
    "OtelObserver",
    "Progress",
    "ProgressObserver",
    "RunInfo",
    "StageProgress",
    "capture_logs",
    "observers",
    "otel",
]

PROGRESS_EXTRA = "pip install 'conveyor[progress]'"
OTEL_EXTRA = "pip install 'conveyor[otel]'"


# -- the contract ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RunInfo:
    """What an observer learns when the run starts. Record times are seconds since the run's
    zero; ``t0_epoch_ns`` is that zero on the wall clock (``time.time_ns()``), so a record time
    ``t`` happened at ``t0_epoch_ns + t * 1e9`` (on the virtual clock: as if the simulated run
    had started when it really did)."""

    t0_epoch_ns: int
    clock: str = "live"
    strategy: str = ""

    @classmethod
    def at(cls, now_s: float, clock: str = "live", strategy: str = "") -> RunInfo:
        """The run's info from its clock's reading now (``backend.now()``)."""
        return cls(time.time_ns() - round(now_s * 1e9), clock, strategy)


@runtime_checkable
class Observer(Protocol):
    """Something that watches a run. All three methods run on the dispatcher thread."""

    def start(self, info: RunInfo) -> None: ...

    def update(self, results: list[ItemResult], sched: Any) -> None: ...

    def close(self, report: Any) -> None: ...


def observers(progress: Any = False, stages: Sequence[str] = (), total: int | None = None,
              observe: Sequence[Any] | None = None, *,
              stream: TextIO | None = None) -> list[Observer]:
    """The observers of one run.

    ``progress``: ``False``/``None`` (none); ``True`` (a tqdm bar on stderr when it is a
    terminal, an ImportError naming ``conveyor[progress]`` if tqdm is missing; otherwise a
    plain line to stderr every few seconds and every 10% of ``total``); a tqdm-like bar of the
    caller's (anything with ``update`` and ``set_postfix_str``: counts go to it, it is not
    closed); or a callable, called with a :class:`Progress` snapshot ~10 times a second and
    once at the end (``final=True``).

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


# -- progress ----------------------------------------------------------------------------------
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
        if progress is True:
            out = stream if stream is not None else sys.stderr
            is_tty = _isatty(out) if tty is None else tty
            if is_tty:
                _tqdm_class()  # fail now, before the run starts
                self.mode = "bar"
                self._own_bar = True
            else:
                self.mode = "lines"
        elif callable(getattr(progress, "update", None)) and \
                callable(getattr(progress, "set_postfix_str", None)):
            self.mode = "bar"
            self.bar = progress
        elif callable(progress):
            self.mode = "callback"
            self.callback = progress
        else:
            raise TypeError(f"progress: expected True, False, a tqdm bar or a callable "
                            f"taking a Progress, got {progress!r}")

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
            elif final or now >= self._next_line or (self._mark and
                                                     self.visible >= self._next_mark):
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


def _tqdm_class() -> Any:
    try:
        from tqdm import tqdm
    except ImportError as exc:
        raise ImportError(f"progress=True on a terminal draws a tqdm bar, and tqdm is not "
                          f"installed: {PROGRESS_EXTRA}") from exc
    return tqdm


# -- OpenTelemetry -----------------------------------------------------------------------------
#: the call-duration histogram's bucket bounds (seconds; OpenTelemetry's HTTP duration advice)
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0)
SCOPE = "conveyor.engine"


class Otel:
    """OpenTelemetry for runs (``Pipeline.run(..., observe=[engine.otel()])``); see
    :func:`otel`. Holds the tracer, the meter and its instruments; each run gets its own
    :class:`OtelObserver` from :meth:`observer`."""

    def __init__(self, tracer_provider: Any = None, meter_provider: Any = None, *,
                 spans: bool = True, metrics: bool = True, record_key: bool = False) -> None:
        try:
            import opentelemetry.metrics as otel_metrics
            import opentelemetry.trace as otel_trace
        except ImportError as exc:
            raise ImportError(f"engine.otel() needs opentelemetry-api, which is not "
                              f"installed: {OTEL_EXTRA}") from exc
        self.record_key = record_key
        self.tracer: Any = None
        if spans:
            self.tracer = otel_trace.get_tracer(SCOPE, tracer_provider=tracer_provider)
        self.calls: Any = None
        if metrics:
            meter = otel_metrics.get_meter(SCOPE, meter_provider=meter_provider)
            self.calls = meter.create_counter(
                "conveyor.stage.calls", unit="{call}",
                description="Stage calls (retries and hedges included), counted when the "
                            "item becomes visible")
            self.errors = meter.create_counter(
                "conveyor.stage.errors", unit="{call}", description="Stage calls that raised")
            hist: Any = meter.create_histogram
            try:
                self.duration = hist("conveyor.stage.call.duration", unit="s",
                                     description="Stage call durations",
                                     explicit_bucket_boundaries_advisory=DURATION_BUCKETS)
            except TypeError:  # an API before 1.23 takes no advice on buckets
                self.duration = hist("conveyor.stage.call.duration", unit="s",
                                     description="Stage call durations")
            self.items = meter.create_counter(
                "conveyor.items", unit="{item}", description="Items that ended, by status")

    def observer(self) -> OtelObserver:
        return OtelObserver(self)


def otel(tracer_provider: Any = None, meter_provider: Any = None, *, spans: bool = True,
         metrics: bool = True, record_key: bool = False) -> Otel:
    """OpenTelemetry for a run: ``pipeline.run(items, observe=[engine.otel()])``.

    When an item ends: a span ``conveyor.item`` (from its first call's start to when it became
    visible; a child of the span current where the run started, if any) with a child span per
    call, named after the stage (attributes ``conveyor.attempt``, ``conveyor.hedge``,
    ``conveyor.lost``, ``error.type``; status ERROR when the call raised); and the counters
    ``conveyor.stage.calls`` / ``conveyor.stage.errors`` and the histogram
    ``conveyor.stage.call.duration`` (s) per ``conveyor.stage``, and ``conveyor.items`` per
    ``conveyor.item.status`` (the counters are added to once a second and when the run ends;
    every call counts, retries, hedges and lost calls included). An item whose span is not
    recording (sampled out by the application's sampler, or no SDK) gets no call spans: a
    sampler is how to make tracing cheap on a large run. Never values or error messages: the
    error's type only; the item's key only with ``record_key=True``. Providers default to the
    global ones (``opentelemetry.trace.set_tracer_provider``). Needs ``opentelemetry-api``
    (``conveyor[otel]``); an SDK and an exporter are the application's to set up."""
    return Otel(tracer_provider, meter_provider, spans=spans, metrics=metrics,
                record_key=record_key)


class OtelObserver:
    """One run's spans and metrics (made by :meth:`Otel.observer`)."""

    FLUSH_S = 1.0  #: seconds between additions to the counters (and one at the end)

    def __init__(self, otel: Otel) -> None:
        import opentelemetry.context as otel_context
        import opentelemetry.trace as otel_trace

        self.otel = otel
        self._trace = otel_trace
        self._context = otel_context
        self.t0_ns = time.time_ns()
        self.parent: Any = None
        self._stage_attrs: dict[str, Mapping[str, str]] = {}
        self._error = otel_trace.Status(otel_trace.StatusCode.ERROR)
        self._calls: dict[str, int] = {}
        self._errors: dict[tuple[str, str], int] = {}
        self._statuses: dict[str, int] = {}
        self._flush_at = time.monotonic() + self.FLUSH_S

    def start(self, info: RunInfo) -> None:
        self.t0_ns = info.t0_epoch_ns
        self.parent = self._context.get_current()  # the caller's span, if any, is the parent

    def update(self, results: list[ItemResult], sched: Any) -> None:
        if not results:
            return
        if self.otel.tracer is not None:
            for r in results:
                self._spans(r)
        if self.otel.calls is not None:
            self._metrics(results)
            now = time.monotonic()
            if now >= self._flush_at:
                self._flush_at = now + self.FLUSH_S
                self._flush()

    def close(self, report: Any = None) -> None:
        if self.otel.calls is not None:
            self._flush()

    def _ns(self, t: float) -> int:
        return self.t0_ns + round(t * 1e9)

    def _attrs(self, stage: str) -> Mapping[str, str]:
        a = self._stage_attrs.get(stage)
        if a is None:
            a = self._stage_attrs[stage] = {"conveyor.stage": stage}
        return a

    def _spans(self, r: ItemResult) -> None:
        stages = r.stages
        if r.visible_at is not None:
            end = r.visible_at
        elif stages:  # cancelled after some calls: it ended with its last call
            end = max(sp.end for sp in stages)
        else:
            return  # cancelled before any call: nothing happened to trace
        start = stages[0].start if stages else end
        trace = self._trace
        attrs: dict[str, Any] = {"conveyor.item.index": r.index,
                                 "conveyor.item.status": r.status}
        if self.otel.record_key:
            attrs["conveyor.item.key"] = str(r.key)
        err = r.error
        if err is not None:
            attrs["error.type"] = err.type
            attrs["conveyor.error.stage"] = err.stage
        tracer = self.otel.tracer
        item = tracer.start_span("conveyor.item", context=self.parent, attributes=attrs,
                                 start_time=self._ns(start))
        if not item.is_recording():  # sampled out, or no SDK: its calls would not be either
            item.end(end_time=self._ns(end))
            return
        if err is not None and r.status == "failed":
            item.set_status(trace.Status(trace.StatusCode.ERROR, f"{err.stage}: {err.type}"))
        ctx = trace.set_span_in_context(item, self.parent)
        for sp in stages:
            if sp.resumed:
                child = tracer.start_span(sp.name, context=ctx, start_time=self._ns(sp.start),
                                          attributes={"conveyor.resumed": True})
                child.end(end_time=self._ns(sp.end))
                continue
            attempt = 0
            for a in sp.attempts:
                if not a.hedge:
                    attempt += 1
                ca: dict[str, Any] = {"conveyor.attempt": max(attempt, 1)}
                if a.hedge:
                    ca["conveyor.hedge"] = True
                if a.lost:
                    ca["conveyor.lost"] = True
                child = tracer.start_span(sp.name, context=ctx, attributes=ca,
                                          start_time=self._ns(a.start))
                if a.error is not None:
                    child.set_attribute("error.type", a.error.type)
                    child.set_status(self._error)
                child.end(end_time=self._ns(a.end))
        item.end(end_time=self._ns(end))

    def _metrics(self, results: list[ItemResult]) -> None:
        """Every call's duration into the histogram now; the counts into local sums, added to
        the counters by :meth:`_flush` (every ``FLUSH_S`` and at the end: one SDK call per
        stage and second, not per item)."""
        record = self.otel.duration.record
        calls, errors, statuses = self._calls, self._errors, self._statuses
        for r in results:
            statuses[r.status] = statuses.get(r.status, 0) + 1
            for sp in r.stages:
                attempts = sp.attempts
                if not attempts:
                    continue
                name = sp.name
                attrs = self._attrs(name)
                calls[name] = calls.get(name, 0) + len(attempts)
                for a in attempts:
                    record(a.end - a.start, attrs)
                    if a.error is not None:
                        k = (name, a.error.type)
                        errors[k] = errors.get(k, 0) + 1

    def _flush(self) -> None:
        o = self.otel
        for name, n in self._calls.items():
            o.calls.add(n, self._attrs(name))
        for (name, etype), n in self._errors.items():
            o.errors.add(n, {"conveyor.stage": name, "error.type": etype})
        for status, n in self._statuses.items():
            o.items.add(n, {"conveyor.item.status": status})
        self._calls.clear()
        self._errors.clear()
        self._statuses.clear()


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
