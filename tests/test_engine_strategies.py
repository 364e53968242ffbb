"""The three strategies, on the thread and process backends: every item ends once, limits and
barriers hold, and the JSON passes the contract checker."""
from __future__ import annotations

import time
from dataclasses import dataclass

import pytest

from engine import Admission, Pipeline, Policy, Simulated, Stage
from engine_helpers import STRATEGIES, check_report, shared_check, stages_for

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("backend", ["thread", "process"])
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_every_item_once_under_limits(strategy: str, backend: str, tmp_path) -> None:
    stages = stages_for(backend)
    n = 23 if backend == "thread" else 11
    report = Pipeline(stages).run(range(n), STRATEGIES[strategy]())
    check_report(report, stages, n)
    assert report.failed == len([i for i in range(n) if (i * 2) % 5 == 0])
    assert report.ok + report.failed == n
    ok = [r for r in report.items if r.ok]
    assert all(r.value == r.index * 2 for r in ok)
    shared_check(report, tmp_path)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_stream_yields_every_result_once(strategy: str) -> None:
    stages = stages_for("thread", 2)
    seen = [r.index for r in Pipeline(stages).stream(range(17), STRATEGIES[strategy]())]
    assert sorted(seen) == list(range(17))


def test_continuous_is_visible_before_later_items_finish() -> None:
    """Continuous: a fast item is handed over while a slow earlier one is still running."""
    import time

    from engine import Continuous, Stage

    def work(x: int) -> int:
        time.sleep(0.3 if x == 0 else 0.001)
        return x

    order = [r.index for r in Pipeline([Stage("w", work, 4)]).stream(range(6), Continuous())]
    assert order[-1] == 0


def test_batched_items_visible_together() -> None:
    import time

    from engine import Batched, Stage

    def work(x: int) -> int:
        time.sleep(0.05 if x == 0 else 0.001)
        return x

    report = Pipeline([Stage("w", work, 4)]).run(range(8), Batched(size=4))
    first = {r.visible_at for r in report.items[:4]}
    second = {r.visible_at for r in report.items[4:]}
    assert len(first) == 1 and len(second) == 1
    assert min(second) > max(first)
    assert min(s.start for r in report.items[4:] for s in r.stages) >= max(first) - 0.01


def test_key_function() -> None:
    from engine import Stage

    report = Pipeline([Stage("s", str.upper, 2)], key=lambda v: f"id-{v}").run(["a", "b"])
    assert [(r.key, r.value) for r in report.items] == [("id-a", "A"), ("id-b", "B")]


class Instant:
    """A stage that takes ``d`` seconds, live (sleeping) and virtual."""

    def __init__(self, d: float) -> None:
        self.d = d

    def __call__(self, value):
        time.sleep(self.d)
        return value

    def simulate(self, call, value, *, now):
        return Simulated(self.d, value)


class _PairsPolicy(Policy):
    """A user's strategy: items move in pairs -- a pair enters each next stage only when both
    have finished the one before (a barrier of two), and is visible together."""

    lookahead = 2

    def __init__(self, sched: Admission) -> None:
        self.sched = sched
        self.waiting: list = []
        self.ended: list = []
        self.running = 0

    def params(self) -> dict:
        return {"pair": 2}

    def fill(self) -> None:
        sched = self.sched
        while self.running < 2 and sched.ready(2):
            items = [it for it in (sched.admit_one(), sched.admit_one()) if it is not None]
            if not items:
                return
            self.running += len(items)
            self.group = items
            for it in items:
                sched.advance(it)

    def stage_done(self, item) -> None:
        self.waiting.append(item)
        self._check()

    def item_done(self, item) -> None:
        self.ended.append(item)
        self._check()

    def _check(self) -> None:
        if len(self.waiting) + len(self.ended) < len(self.group):
            return
        released, self.waiting = self.waiting, []
        if self.sched.cancelled:
            for it in released:
                self.sched.drop(it)
            self.ended += released
            released = []
        for it in released:
            self.sched.advance(it)
        if not released:
            done, self.ended = self.ended, []
            self.running -= len(done)
            self.sched.emit(done)
            self.fill()


@dataclass(frozen=True)
class Pairs:
    name: str = "pairs"

    @property
    def params(self) -> dict:
        return {}

    def policy(self, sched: Admission) -> Policy:
        return _PairsPolicy(sched)


@pytest.mark.parametrize("clock", ["live", "virtual"])
def test_a_user_written_strategy_runs_under_the_same_scheduler(clock: str) -> None:
    stages = [Stage("a", Instant(0.01), 2), Stage("b", Instant(0.02), 1)]
    report = Pipeline(stages).run(range(9), Pairs(), clock=clock)
    assert report.ok == 9 and report.strategy == "pairs" and report.params == {"pair": 2}
    by_pair: dict[int, list] = {}
    for r in report.items:
        by_pair.setdefault(r.index // 2, []).append(r)
    for members in by_pair.values():  # a pair is visible together, after both ended
        assert len({r.visible_at for r in members}) == 1
        a_end = max(r.stages[0].end for r in members)
        assert all(r.stages[1].start >= a_end - 1e-9 for r in members)  # the barrier held


def test_a_strategy_whose_policy_is_not_a_policy_is_refused() -> None:
    @dataclass(frozen=True)
    class Bad:
        name: str = "bad"
        params: dict = None  # type: ignore[assignment]

        def policy(self, sched):
            return object()

    with pytest.raises(TypeError, match=r"must return an engine\.Policy"):
        Pipeline([Stage("a", str)]).run([1], Bad())
