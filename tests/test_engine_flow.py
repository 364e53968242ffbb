"""Flow control in the scheduler (DESIGN §9), as properties over random budgets, costs and
limits on the virtual clock: a budget's spend over any window never exceeds rate x window +
burst; an adaptive stage never runs more than its limit in force, and a decrease never
interrupts a call; a pause stops every stage on the budget; ordered output."""
from __future__ import annotations

import bisect

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from engine import Adaptive, Budget, Continuous, Pipeline, Simulated, Stage

pytestmark = pytest.mark.timeout(120)


class Priced:
    """Virtual: item i takes 0.2 + (i % 5) * 0.1 s and costs ``tokens(i)``."""

    def __init__(self, tokens: list[int]) -> None:
        self.tokens = tokens

    def simulate(self, call, value, *, now):
        t = self.tokens[call.index % len(self.tokens)]
        return Simulated(0.2 + (call.index % 5) * 0.1, value, None, {"tokens": float(t)})

    def __call__(self, value):  # pragma: no cover - virtual only
        return value


@settings(max_examples=40, deadline=None)
@given(rpm=hs.integers(60, 6000), tpm=hs.integers(1000, 200_000),
       tokens=hs.lists(hs.integers(1, 400), min_size=1, max_size=12),
       limit=hs.integers(1, 30), n=hs.integers(5, 120))
def test_budget_spend_over_any_window_stays_within_rate_times_window_plus_burst(
        rpm, tpm, tokens, limit, n) -> None:
    burst = {"requests": max(1.0, rpm / 60), "tokens": float(max(max(tokens), tpm / 60))}
    budget = Budget("acct", per_minute={"requests": rpm, "tokens": tpm}, burst=burst)
    svc = Priced(tokens)
    st = Stage("s", svc, limit, budget=budget,
               cost=lambda v: {"tokens": float(tokens[v % len(tokens)])})  # exact estimate
    report = Pipeline([st]).run(range(n), Continuous(max_in_flight=None), clock="virtual")
    assert report.ok == n
    starts = sorted(((r.stages[0].attempts[0].start, r.stages[0].attempts[0].cost)
                     for r in report.items), key=lambda x: x[0])
    times = [t for t, _ in starts]
    for dim, per_minute in (("requests", rpm), ("tokens", tpm)):
        rate = per_minute / 60.0
        for i, t0 in enumerate(times):  # every window starting at a call's start
            for j in range(i, len(times)):
                spent = sum(c[dim] for _, c in starts[i:j + 1])
                assert spent <= rate * (times[j] - t0) + burst[dim] + 1e-6


class Loaded:
    """Virtual: a service of ``capacity`` that answers an overload (retry_after) past it."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.ends: list[float] = []

    def simulate(self, call, value, *, now):
        self.ends = [e for e in self.ends if e > now]
        if len(self.ends) >= self.capacity:
            err = RuntimeError("overloaded")
            err.retry_after = 0.05  # type: ignore[attr-defined]
            return Simulated(0.01, None, err)
        d = 0.5 + (call.index % 7) * 0.05
        self.ends.append(now + d)
        return Simulated(d, value)

    def __call__(self, value):  # pragma: no cover - virtual only
        return value


def _limit_at(timeline: tuple[tuple[float, int], ...], t: float) -> int:
    k = bisect.bisect_right([x for x, _ in timeline], t) - 1
    return timeline[max(k, 0)][1]


@settings(max_examples=30, deadline=None)
@given(capacity=hs.integers(2, 40), initial=hs.integers(1, 20), n=hs.integers(20, 300))
def test_an_adaptive_stage_never_runs_more_than_its_limit_in_force(capacity, initial,
                                                                  n) -> None:
    from engine import RetryPolicy

    st = Stage("s", Loaded(capacity), Adaptive(initial, max=60),
               retry=RetryPolicy(attempts=50, backoff=0.01, max_backoff=0.1))
    report = Pipeline([st]).run(range(n), Continuous(max_in_flight=None), clock="virtual")
    assert report.ok == n
    timeline = report.stages[0].limit_timeline
    assert timeline and all(1 <= lim <= 60 for _, lim in timeline)
    calls = sorted((a.start, a.end) for r in report.items for a in r.stages[0].attempts)
    ends: list[float] = []
    for start, end in calls:  # at each start, the calls running then fit the limit in force
        ends = [e for e in ends if e > start]
        ends.append(end)
        assert len(ends) <= max(_limit_at(timeline, start),
                                # a decrease never interrupts a call: those started under a
                                # higher limit run on
                                max(lim for t, lim in timeline if t <= start))
    assert report.stages[0].overloaded >= 0


def test_a_pause_stops_every_stage_on_the_budget() -> None:
    class Refuses:
        def __init__(self, refuse: bool) -> None:
            self.refuse = refuse

        def simulate(self, call, value, *, now):
            if self.refuse and call.index == 3 and call.attempt == 1:
                err = RuntimeError("429")
                err.retry_after = 5.0  # type: ignore[attr-defined]
                return Simulated(0.1, None, err)
            return Simulated(0.1, value)

        def __call__(self, value):  # pragma: no cover
            return value

    from engine import RetryPolicy

    budget = Budget("acct", per_minute={"requests": 60_000})
    stages = [Stage("a", Refuses(True), 2, budget=budget,
                    retry=RetryPolicy(attempts=3, backoff=0, max_backoff=10)),
              Stage("b", Refuses(False), 2, budget=budget)]
    report = Pipeline(stages).run(range(20), clock="virtual")
    assert report.ok == 20
    t_err = report.items[3].stages[0].attempts[0].end
    starts = [a.start for r in report.items for sp in r.stages for a in sp.attempts]
    assert not [s for s in starts if t_err < s < t_err + 5.0 - 1e-9]  # no stage started
    assert report.stages[0].budget_wait_s > 0


@pytest.mark.parametrize("clock", ["live", "virtual"])
def test_ordered_stream_yields_input_order_with_bounded_memory(clock: str) -> None:
    class Jitter:
        def simulate(self, call, value, *, now):
            return Simulated(((call.index * 7919) % 13) * 0.01, value)

        def __call__(self, value):
            import time
            time.sleep(((value * 7919) % 13) * 0.001)
            return value

    pulled = []

    def items():
        for i in range(300):
            pulled.append(i)
            yield i

    seen = []
    for r in Pipeline([Stage("s", Jitter(), 8)]).stream(items(), Continuous(max_in_flight=16),
                                                       clock=clock, ordered=True):
        seen.append(r.index)
        assert len(pulled) - len(seen) <= 16 + 64 + 16  # window + reorder bound + read-ahead
    assert seen == list(range(300))
