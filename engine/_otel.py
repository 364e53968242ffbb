"""OpenTelemetry for runs (DESIGN.md §13): ``pipeline.run(items, observe=[engine.otel()])``.

``otel()`` makes an ``Otel`` (the tracer, the meter and its instruments), a factory that gives
each run its own ``OtelObserver``: a span per item with a child span per call, and counters and
a call-duration histogram per stage. opentelemetry-api (``conveyor[otel]``) is imported only
when ``otel()`` is called; an SDK and an exporter are the application's to set up.
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ._records import ItemResult

if TYPE_CHECKING:
    from ._records import RunInfo

__all__ = ["Otel", "OtelObserver", "otel"]

OTEL_EXTRA = "pip install 'conveyor[otel]'"

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
