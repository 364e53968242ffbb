"""The virtual clock runs the same scheduler: it predicts the live engine's schedule."""
from __future__ import annotations

import time

import pytest

from engine import Batched, Continuous, ParallelBatches, Pipeline, Simulated, Stage, current_call

pytestmark = pytest.mark.timeout(60)
SCALE = 0.004  # live seconds per virtual second


class Table:
    """Per-item durations known in advance; live calls sleep them, scaled."""

    def __init__(self, durations: list[float]) -> None:
        self.durations = durations

    def simulate(self, call, value):
        return Simulated(self.durations[call.index], value)

    def __call__(self, value):
        time.sleep(self.durations[current_call().index] * SCALE)
        return value


def _stages():
    import random

    rng = random.Random(4)
    n = 120
    slow = [rng.lognormvariate(0, 0.6) * (8 if rng.random() < 0.05 else 1) for _ in range(n)]
    mid = [rng.uniform(0.5, 1.5) for _ in range(n)]
    fast = [rng.uniform(0.05, 0.2) for _ in range(n)]
    return n, [Stage("fetch", Table(slow), 8), Stage("analyze", Table(mid), 6),
               Stage("save", Table(fast), 2)]


@pytest.mark.parametrize("strategy", [Continuous(), Batched(size=20),
                                      ParallelBatches(lanes=3, size=10)],
                         ids=lambda s: s.name)
def test_live_makespan_matches_virtual(strategy) -> None:
    n, stages = _stages()
    virtual = Pipeline(stages).run(range(n), strategy, clock="virtual")
    live = Pipeline(stages).run(range(n), strategy)
    v = max(r.visible_at for r in virtual.items)
    lv = max(r.visible_at for r in live.items) / SCALE
    assert lv == pytest.approx(v, rel=0.06), (lv, v)


def test_virtual_is_instant_and_needs_no_threads() -> None:
    import threading

    n, stages = _stages()
    before = threading.active_count()
    t = time.perf_counter()
    report = Pipeline(stages).run(range(n), Continuous(), clock="virtual")
    assert time.perf_counter() - t < 2.0
    assert threading.active_count() == before
    assert report.clock == "virtual" and report.ok == n


def test_virtual_wall_time_is_virtual_makespan() -> None:
    n, stages = _stages()
    report = Pipeline(stages).run(range(n), Batched(size=30), clock="virtual")
    assert report.wall_time == pytest.approx(max(r.visible_at for r in report.items))
