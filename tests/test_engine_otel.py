"""OpenTelemetry (DESIGN §13): a span per item with a child per call, per-stage counters and a
call-duration histogram, checked with the SDK's in-memory exporters."""
from __future__ import annotations

import sys
import time
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace import StatusCode
from test_engine_progress import run_observed

from engine import (
    Attempt,
    ErrorInfo,
    ItemResult,
    Pipeline,
    RetryPolicy,
    Stage,
    StageSpan,
)
from engine._observe import RunInfo, observers
from engine._otel import Otel, OtelObserver, otel


class Setup:
    def __init__(self) -> None:
        self.spans = InMemorySpanExporter()
        self.tp = TracerProvider()
        self.tp.add_span_processor(SimpleSpanProcessor(self.spans))
        self.reader = InMemoryMetricReader()
        self.mp = MeterProvider(metric_readers=[self.reader])
        self.otel = otel(self.tp, self.mp)

    def finished(self) -> list[Any]:
        return list(self.spans.get_finished_spans())

    def metrics(self) -> dict[str, list[Any]]:
        """metric name -> its data points."""
        out: dict[str, list[Any]] = {}
        data = self.reader.get_metrics_data()
        for rm in data.resource_metrics if data else ():
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    out.setdefault(m.name, []).extend(m.data.data_points)
        return out


@pytest.fixture
def setup() -> Setup:
    return Setup()


class Boom(Exception):
    pass


def flaky(x: int) -> int:
    """Fails the first call of every third item, and every call of items 5 and 10."""
    time.sleep(0.001)
    if x in (5, 10):
        raise Boom(f"password-{x}")
    if x % 3 == 0 and x not in flaky.seen:  # type: ignore[attr-defined]
        flaky.seen.add(x)  # type: ignore[attr-defined]
        raise KeyError(f"password-{x}")
    return x


flaky.seen = set()  # type: ignore[attr-defined]


@pytest.mark.timeout(30)
def test_a_span_per_item_and_a_child_per_call(setup: Setup) -> None:
    flaky.seen.clear()  # type: ignore[attr-defined]
    p = Pipeline([Stage("fetch", lambda x: x, concurrency=2),
                  Stage("save", flaky, concurrency=2,
                        retry=RetryPolicy(attempts=2, backoff=0.001, jitter=False))])
    obs = observers(False, ["fetch", "save"], 12, [setup.otel])
    report = run_observed(p, range(12), obs)
    assert report.failed == 2
    spans = setup.finished()
    items = {s.attributes["conveyor.item.index"]: s for s in spans if s.name == "conveyor.item"}
    assert sorted(items) == list(range(12))
    children: dict[int, list[Any]] = {}
    for s in spans:
        if s.name != "conveyor.item":
            children.setdefault(s.parent.span_id, []).append(s)
    assert isinstance(obs[0], OtelObserver)
    t0 = obs[0].t0_ns  # RunInfo.t0_epoch_ns, from start()
    assert abs(t0 - time.time_ns()) < 60e9
    for r in report.items:
        item = items[r.index]
        assert item.parent is None  # no span was current: each item is its own trace
        assert r.visible_at is not None
        assert item.end_time == t0 + round(r.visible_at * 1e9)
        assert item.start_time == t0 + round(r.stages[0].start * 1e9)
        assert item.attributes["conveyor.item.status"] == r.status
        kids = sorted(children[item.context.span_id], key=lambda s: s.start_time)
        calls = [(sp.name, a) for sp in r.stages for a in sp.attempts]
        assert [k.name for k in kids] == [n for n, _ in calls]
        for k, (_, a) in zip(kids, calls, strict=True):
            assert k.context.trace_id == item.context.trace_id
            assert (k.start_time, k.end_time) == (t0 + round(a.start * 1e9),
                                                  t0 + round(a.end * 1e9))
            if a.error is None:
                assert "error.type" not in k.attributes and k.status.status_code == StatusCode.UNSET
            else:
                assert k.attributes["error.type"] == a.error.type
                assert k.status.status_code == StatusCode.ERROR
        save = [k for k in kids if k.name == "save"]
        assert [k.attributes["conveyor.attempt"] for k in save] == list(range(1, len(save) + 1))
        if r.index in (5, 10):
            assert item.status.status_code == StatusCode.ERROR
            assert item.status.description == "save: Boom"
            assert item.attributes["error.type"] == "Boom"
            assert item.attributes["conveyor.error.stage"] == "save"
            assert len(save) == 2
        elif r.index % 3 == 0:
            assert len(save) == 2 and save[0].attributes["error.type"] == "KeyError"
            assert item.status.status_code == StatusCode.UNSET
        else:
            assert len(save) == 1
    for s in spans:  # never a value, a key or a message
        assert "password" not in repr(dict(s.attributes or {})) + str(s.status.description)
        assert "conveyor.item.key" not in (s.attributes or {})


@pytest.mark.timeout(30)
def test_metrics_per_stage(setup: Setup) -> None:
    flaky.seen.clear()  # type: ignore[attr-defined]
    p = Pipeline([Stage("fetch", lambda x: x, concurrency=2),
                  Stage("save", flaky, concurrency=2,
                        retry=RetryPolicy(attempts=2, backoff=0.001, jitter=False))])
    report = run_observed(p, range(12), observers(False, [], None, [setup.otel]))
    m = setup.metrics()
    calls = {d.attributes["conveyor.stage"]: d.value for d in m["conveyor.stage.calls"]}
    assert calls == {s.name: s.calls for s in report.stages} == {"fetch": 12, "save": 18}
    errors = {(d.attributes["conveyor.stage"], d.attributes["error.type"]): d.value
              for d in m["conveyor.stage.errors"]}
    assert errors == {("save", "Boom"): 4, ("save", "KeyError"): 4}  # 5, 10 twice; 0, 3, 6, 9
    hist = {d.attributes["conveyor.stage"]: d for d in m["conveyor.stage.call.duration"]}
    for s in report.stages:
        assert hist[s.name].count == s.calls
        assert hist[s.name].sum == pytest.approx(s.busy_s, rel=1e-6, abs=1e-9)
    assert tuple(hist["save"].explicit_bounds)[:3] == (0.005, 0.01, 0.025)
    items = {d.attributes["conveyor.item.status"]: d.value for d in m["conveyor.items"]}
    assert items == {"ok": 10, "failed": 2}


@pytest.mark.timeout(30)
def test_item_spans_are_children_of_the_callers_span(setup: Setup) -> None:
    tracer = setup.tp.get_tracer("job")
    p = Pipeline([Stage("a", lambda x: x, concurrency=2)])
    with tracer.start_as_current_span("nightly sync") as job:
        run_observed(p, range(5), observers(False, ["a"], 5, [setup.otel]))
    items = [s for s in setup.finished() if s.name == "conveyor.item"]
    assert len(items) == 5
    assert all(s.parent.span_id == job.get_span_context().span_id for s in items)
    assert all(s.context.trace_id == job.get_span_context().trace_id for s in items)


@pytest.mark.timeout(30)
def test_virtual_clock_times_from_the_run_start(setup: Setup) -> None:
    from engine import Simulated

    class Half:
        def simulate(self, call: Any, value: Any, *, now: float = 0.0) -> Any:
            return Simulated(0.5, value)

        def __call__(self, value: Any) -> Any:
            return value

    p = Pipeline([Stage("a", Half(), concurrency=1)])
    before = time.time_ns()
    run_observed(p, range(3), observers(False, ["a"], 3, [setup.otel]), clock="virtual")
    items = sorted((s for s in setup.finished() if s.name == "conveyor.item"),
                   key=lambda s: s.start_time)
    assert [round((s.end_time - s.start_time) / 1e9, 6) for s in items] == [0.5, 0.5, 0.5]
    assert before <= items[0].start_time <= time.time_ns()
    assert round((items[2].end_time - items[0].start_time) / 1e9, 6) == 1.5


def _obs(setup: Setup, **kw: Any) -> OtelObserver:
    o = (Otel(setup.tp, setup.mp, **kw) if kw else setup.otel).observer()
    o.start(RunInfo(1_000_000_000_000))
    return o


def test_hedged_lost_resumed_and_cancelled(setup: Setup) -> None:
    o = _obs(setup)
    err = ErrorInfo("b", "TimeoutError", "secret message")
    hedged = ItemResult(0, "k0", "ok", 1, None, (
        StageSpan("a", 0.0, 0.0, (), resumed=True),
        StageSpan("b", 0.1, 0.5, (Attempt(0.1, 0.3, err), Attempt(0.3, 0.9, None, False, True),
                                  Attempt(0.35, 0.5, None, True)))), 0.6)
    never_ran = ItemResult(1, "k1", "cancelled", None, None, (), None)
    cut = ItemResult(2, "k2", "cancelled", None, None,
                     (StageSpan("a", 0.2, 0.4, (Attempt(0.2, 0.4),)),), None)
    o.update([hedged, never_ran, cut], object())
    o.update([], object())
    o.close(None)
    spans = setup.finished()
    items = {s.attributes["conveyor.item.index"]: s for s in spans if s.name == "conveyor.item"}
    assert sorted(items) == [0, 2]  # nothing happened to item 1: no span
    assert items[2].attributes["conveyor.item.status"] == "cancelled"
    assert items[2].end_time == 1_000_000_000_000 + 400_000_000
    assert items[2].status.status_code == StatusCode.UNSET
    kids = sorted((s for s in spans if s.parent is not None
                   and s.parent.span_id == items[0].context.span_id), key=lambda s: s.start_time)
    assert [(k.name, dict(k.attributes)) for k in kids] == [
        ("a", {"conveyor.resumed": True}),
        ("b", {"conveyor.attempt": 1, "error.type": "TimeoutError"}),
        ("b", {"conveyor.attempt": 2, "conveyor.lost": True}),
        ("b", {"conveyor.attempt": 2, "conveyor.hedge": True}),
    ]
    assert "secret" not in repr([dict(s.attributes) for s in spans])
    m = setup.metrics()
    assert {d.attributes["conveyor.stage"]: d.value for d in m["conveyor.stage.calls"]} == \
        {"a": 1, "b": 3}
    assert {d.attributes["conveyor.item.status"]: d.value for d in m["conveyor.items"]} == \
        {"ok": 1, "cancelled": 2}


def test_options(setup: Setup) -> None:
    r = ItemResult(0, "user@example.com", "ok", 1, None,
                   (StageSpan("a", 0.0, 0.1, (Attempt(0.0, 0.1),)),), 0.1)
    o = _obs(setup, record_key=True, metrics=False)
    o.update([r], None)
    [item] = [s for s in setup.finished() if s.name == "conveyor.item"]
    assert item.attributes["conveyor.item.key"] == "user@example.com"
    assert "conveyor.stage.calls" not in setup.metrics()
    o = _obs(setup, spans=False)
    o.update([r], None)
    assert len(setup.finished()) == 2  # no more spans
    m = setup.metrics()
    assert [d.count for d in m["conveyor.stage.call.duration"]] == [1]  # at once
    assert "conveyor.stage.calls" not in m  # counts: once a second, and at the end
    o.close(None)
    assert [d.value for d in setup.metrics()["conveyor.stage.calls"]] == [1]


def test_sampled_out_items_get_no_call_spans(setup: Setup) -> None:
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    tp = TracerProvider(sampler=ALWAYS_OFF)
    tp.add_span_processor(SimpleSpanProcessor(setup.spans))
    o = otel(tp, setup.mp).observer()
    o.start(RunInfo(0))
    r = ItemResult(0, 0, "ok", 1, None, (StageSpan("a", 0.0, 0.1, (Attempt(0.0, 0.1),)),), 0.1)
    o.update([r], None)
    o.close(None)
    assert setup.finished() == []
    assert [d.value for d in setup.metrics()["conveyor.stage.calls"]] == [1]  # metrics still


def test_one_otel_many_runs(setup: Setup) -> None:
    a, b = observers(False, [], None, [setup.otel]), observers(False, [], None, [setup.otel])
    assert a[0] is not b[0] and a[0].otel is b[0].otel is setup.otel  # type: ignore[attr-defined]


def test_global_providers_by_default() -> None:
    o = otel()  # the API's no-op providers until the application sets its own
    ob = o.observer()
    ob.start(RunInfo(0))
    ob.update([ItemResult(0, 0, "ok", 0, None, (StageSpan("a", 0.0, 0.1, (Attempt(0.0, 0.1),)),),
                          0.1)], None)
    assert isinstance(o.tracer, trace.Tracer | trace.ProxyTracer)


def test_missing_opentelemetry_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    with pytest.raises(ImportError, match=r"conveyor\[otel\]"):
        otel()
