"""What watching a run costs (figures, not asserts): the no-op overhead benchmark (20,000 items,
one no-op stage of concurrency 2, as in test_overhead.py) with the observers off, a progress
display on, and OpenTelemetry on. The observers are driven as the run loop drives them
(``tests/test_engine_progress.run_observed``: ``update`` after every dispatcher step).

    ./bench.sh tests/benchmarks/test_observe.py

* ``stream``: the engine as it is, no driver (the reference);
* ``off``: the driver, no observer;
* ``lines``: progress=True off a terminal (a plain line every 10% and every 5 s, to memory);
* ``bar``: progress=True on a terminal (a tqdm bar, drawn to memory);
* ``callable``: progress=<a callable>, through ``Pipeline.stream(progress=...)`` (the wiring);
* ``otel-noop``: engine.otel() with the API's default no-op providers (no SDK set up);
* ``otel-metrics``: the SDK's metrics only (spans=False), read by an InMemoryMetricReader;
* ``otel-1%``: spans and metrics, the SDK sampling 1% of the items (``TraceIdRatioBased``);
* ``otel``: the SDK's spans (SimpleSpanProcessor into an exporter that counts them) and
  metrics.
"""
from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import pytest
from test_engine_progress import run_observed

from engine import Continuous, Pipeline, Stage
from engine._observe import Observer, observers
from engine._otel import otel
from engine._progress import ProgressObserver

N = 20_000


def noop(x: Any) -> Any:
    return x


def pipeline() -> Pipeline:
    return Pipeline([Stage("s0", noop, concurrency=2)])


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _otel(spans: bool, sdk: bool, ratio: float = 1.0
          ) -> tuple[list[Observer], Callable[[], int]]:
    if not sdk:
        return observers(False, ["s0"], N, [otel()]), lambda: N
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        SimpleSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    class Counting(SpanExporter):
        """Counts the spans and lets them go, as an exporter that ships them would (an
        in-memory exporter keeps 40,000 spans alive: the garbage collector's cost, not ours)."""

        def __init__(self) -> None:
            self.items = 0

        def export(self, spans: Any) -> SpanExportResult:
            self.items += sum(1 for s in spans if s.name == "conveyor.item")
            return SpanExportResult.SUCCESS

    exporter = Counting()
    tp = TracerProvider(sampler=ParentBased(TraceIdRatioBased(ratio)))
    tp.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    mp = MeterProvider(metric_readers=[reader])
    obs = observers(False, ["s0"], N, [otel(tp, mp, spans=spans)])

    def check() -> int:
        if spans and ratio == 1.0:
            return exporter.items
        data = reader.get_metrics_data()
        assert data is not None
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    if m.name == "conveyor.items":
                        return int(sum(getattr(d, "value", 0) for d in m.data.data_points))
        return 0
    return obs, check


def one_run(mode: str) -> int:
    p = pipeline()
    if mode == "stream":
        return sum(1 for _ in p.stream(range(N), Continuous()))
    if mode == "callable":
        seen: list[int] = []
        n = sum(1 for _ in p.stream(range(N), Continuous(),
                                    progress=lambda s: seen.append(s.visible)))
        assert seen[-1] == N
        return n
    check: Callable[[], int] = lambda: N  # noqa: E731
    obs: list[Observer]
    if mode == "off":
        obs = []
    elif mode == "lines":
        obs = [ProgressObserver(True, ["s0"], N, stream=io.StringIO())]
    elif mode == "bar":
        pytest.importorskip("tqdm")
        obs = [ProgressObserver(True, ["s0"], N, stream=_Tty())]
    elif mode == "otel-noop":
        obs, check = _otel(True, sdk=False)
    elif mode == "otel-metrics":
        obs, check = _otel(False, sdk=True)
    elif mode == "otel-1%":
        obs, check = _otel(True, sdk=True, ratio=0.01)
    else:
        obs, check = _otel(True, sdk=True)
    report = run_observed(p, range(N), obs, strategy=Continuous())
    assert check() == N
    return len(report.items)


MODES = ["stream", "off", "lines", "bar", "callable", "otel-noop", "otel-metrics", "otel-1%",
         "otel"]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("mode", MODES)
def test_observer_overhead(benchmark: Any, mode: str) -> None:
    benchmark.group = f"observers on the no-op stage, {N} items"
    done = benchmark.pedantic(one_run, args=(mode,), rounds=5, warmup_rounds=1)
    assert done == N
    benchmark.extra_info["items_per_s"] = N / benchmark.stats.stats.median
