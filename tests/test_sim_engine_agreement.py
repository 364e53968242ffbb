"""SimulatedService inside the engine: a live run and a virtual run of the same pipeline see the
same per-item latencies and the same failures and retries."""

from __future__ import annotations

import statistics
from typing import Any

import pytest

from engine import Batched, Continuous, Pipeline, RetryPolicy, Stage
from simulators import Faults, SimulatedService

SPEC = {"dist": "lognormal", "median": 1.0, "p99": 3.0}
TS = 0.05  # live: 1 scenario second = 50 ms
ITEMS = 60


def build(time_scale: float) -> Pipeline:
    retry = RetryPolicy(attempts=3, backoff=0.001, max_backoff=0.001, jitter=False)
    return Pipeline(
        [
            Stage(
                "fetch",
                SimulatedService(
                    "fetch", SPEC, Faults(error_rate=0.1), seed=1, time_scale=time_scale
                ),
                8,
                retry=retry,
            ),
            Stage(
                "analyze",
                SimulatedService(
                    "analyze", SPEC, Faults(error_rate=0.05), seed=1, time_scale=time_scale
                ),
                8,
            ),
        ]
    )


def calls(doc: dict[str, Any]) -> list[list[list[float]]]:
    return [[[c[1] - c[0] for c in st["calls"]] for st in item["stages"]] for item in doc["items"]]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("strategy", [Continuous(), Batched(size=20)], ids=lambda s: s.name)
def test_live_and_virtual_runs_agree(strategy: Any) -> None:
    virtual = build(1.0).run(range(ITEMS), strategy, clock="virtual").to_json()
    live = build(TS).run(range(ITEMS), strategy, clock="live").to_json(time_scale=TS)
    assert [i["status"] for i in live["items"]] == [i["status"] for i in virtual["items"]]
    assert any(i["status"] == "failed" for i in virtual["items"])  # the analyze stage fails some
    dv, dl = calls(virtual), calls(live)
    assert [[len(s) for s in item] for item in dl] == [[len(s) for s in item] for item in dv]
    retried = 0
    overshoot: list[float] = []  # real seconds a live call took beyond its sampled latency
    for item_v, item_l in zip(dv, dl, strict=True):
        for stage_v, stage_l in zip(item_v, item_l, strict=True):
            retried += len(stage_v) > 1
            for v, lv in zip(stage_v, stage_l, strict=True):
                overshoot.append((lv - v) * TS)
    assert retried > 0
    # a live call sleeps its sampled latency and a little more, never less; the median keeps
    # the check meaningful on a loaded machine where a few sleeps overshoot a lot
    assert min(overshoot) >= -1e-4
    assert statistics.median(overshoot) < 0.01
    mv, ml = virtual["summary"]["makespan_s"], live["summary"]["makespan_s"]
    # live scheduling overhead is real time, magnified 1/TS times in scenario seconds; the tight
    # (3%) agreement is the virtual clock's own test at a realistic scale
    assert ml == pytest.approx(mv, rel=0.3)
