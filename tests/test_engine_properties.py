"""Property tests over random pipelines: 1-5 stages, limits 1-20, 0-300 items, random
latencies and injected failures, every strategy, on the virtual clock and (smaller) live.

For every run: every item ends exactly once; limits never exceeded; barriers kept; stages in
order; and the contract checker (../shared/tools/check_results.py, when present) accepts the
report's JSON."""
from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contract import load_checker
from engine import (
    Batched,
    Continuous,
    ParallelBatches,
    Pipeline,
    RetryPolicy,
    Simulated,
    Stage,
    current_call,
)
from engine_helpers import check_report

CHECKER = load_checker()


class Scripted:
    """A stage whose per-(item, attempt) duration and failure come from drawn tables."""

    def __init__(self, durations: list[float], fail_every: int, scale: float = 1.0) -> None:
        self.durations, self.fail_every, self.scale = durations, fail_every, scale

    def _plan(self, index: int, attempt: int) -> tuple[float, bool]:
        d = self.durations[(index * 7 + attempt) % len(self.durations)]
        fails = self.fail_every > 0 and (index + attempt) % self.fail_every == 0
        return d, fails

    def simulate(self, call, value, *, now=0.0):
        d, fails = self._plan(call.index, call.attempt)
        return Simulated(d, error=RuntimeError("injected")) if fails else Simulated(d, value)

    def __call__(self, value):
        c = current_call()
        d, fails = self._plan(c.index, c.attempt)
        time.sleep(d * self.scale)
        if fails:
            raise RuntimeError("injected")
        return value


strategies = st.one_of(
    st.builds(Continuous, max_in_flight=st.one_of(st.none(), st.integers(1, 40))),
    st.builds(Batched, size=st.integers(1, 60)),
    st.builds(ParallelBatches, lanes=st.integers(1, 4), size=st.integers(1, 40),
              lockstep=st.booleans()),
)


@st.composite
def pipelines(draw, max_items: int = 300, max_limit: int = 20):
    n_stages = draw(st.integers(1, 5))
    stages = []
    for i in range(n_stages):
        durations = draw(st.lists(st.one_of(st.just(0.0), st.floats(1e-3, 5.0)), min_size=1,
                                  max_size=8))
        fail_every = draw(st.sampled_from([0, 0, 3, 7, 50]))
        retry = draw(st.one_of(st.none(), st.builds(RetryPolicy, attempts=st.integers(1, 3),
                                                      backoff=st.floats(0, 2))))
        stages.append(Stage(f"s{i}", Scripted(durations, fail_every), draw(
            st.integers(1, max_limit)), retry=retry))
    n_items = draw(st.integers(0, max_items))
    return stages, n_items


def _contract_check(report) -> None:
    doc = report.to_json(metadata={"scenario": "property", "seed": 0})
    if CHECKER is not None:
        errs, _ = CHECKER.check(doc)
        assert not errs, errs


@pytest.mark.timeout(120)
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pipelines(), strategies)
def test_virtual_runs_keep_every_rule(pipe, strategy) -> None:
    stages, n = pipe
    report = Pipeline(stages).run(range(n), strategy, clock="virtual")
    check_report(report, stages, n)
    assert report.ok + report.failed == n
    _contract_check(report)


@pytest.mark.timeout(180)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pipelines(max_items=60, max_limit=8), strategies)
def test_live_runs_keep_every_rule(pipe, strategy) -> None:
    stages, n = pipe
    live = [Stage(s.name, Scripted(s.fn.durations, s.fn.fail_every, scale=0.0005),
                  s.concurrency, retry=None if s.retry is None else RetryPolicy(
                      s.retry.attempts, s.retry.backoff * 0.0005))
            for s in stages]
    report = Pipeline(live).run(range(n), strategy)
    check_report(report, live, n)
    assert report.ok + report.failed == n
    _contract_check(report)


@pytest.mark.timeout(60)
@settings(max_examples=30, deadline=None)
@given(pipelines(max_items=120), strategies)
def test_virtual_runs_are_deterministic(pipe, strategy) -> None:
    stages, n = pipe
    a = Pipeline(stages).run(range(n), strategy, clock="virtual")
    b = Pipeline(stages).run(range(n), strategy, clock="virtual")
    assert a.items == b.items
