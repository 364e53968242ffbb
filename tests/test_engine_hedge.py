"""Hedged calls (DESIGN §10): the allowance and the limit hold, the first success wins, a
losing call's error does not fail the item, cancellation with a hedge running, validation."""
from __future__ import annotations

import threading
import time
from collections import defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from contract import assert_checker_accepts
from engine import CancelToken, Continuous, Hedge, Pipeline, Simulated, Stage, current_call
from engine_helpers import max_overlap

pytestmark = pytest.mark.timeout(60)


class Tail:
    """Virtual: every ``slow_every``-th item's first attempt takes ``slow`` s, the rest and
    every hedge ``fast`` s; a hedge of item ``fail_hedge_of`` fails."""

    stops_when_cancelled = True

    def __init__(self, slow_every: int = 10, slow: float = 10.0, fast: float = 1.0,
                 fail_hedge_of: int = -1, fail_primary_of: int = -1) -> None:
        self.slow_every, self.slow, self.fast = slow_every, slow, fast
        self.fail_hedge_of, self.fail_primary_of = fail_hedge_of, fail_primary_of
        self.calls: dict[int, list[bool]] = defaultdict(list)

    def simulate(self, call, value, *, now):
        self.calls[call.index].append(call.hedge)
        if call.hedge:
            if call.index == self.fail_hedge_of:
                return Simulated(0.5, None, RuntimeError("the hedge broke"))
            return Simulated(self.fast, ("hedge", value))
        if call.index == self.fail_primary_of:
            return Simulated(3.0, None, RuntimeError("the primary broke"))
        slow = self.slow_every and call.index % self.slow_every == 0
        return Simulated(self.slow if slow else self.fast, ("primary", value))

    def __call__(self, value):  # pragma: no cover - virtual only
        return value


def _run(svc: Tail, n: int, hedge: Hedge, limit: int = 5, **kw):
    st = Stage("fetch", svc, limit, idempotent=True, hedge=hedge)
    return Pipeline([st]).run(range(n), Continuous(max_in_flight=None), clock="virtual", **kw)


def _calls(report):
    return [(a.start, a.end, a.hedge, a.lost) for r in report.items for a in r.stages[0].attempts]


def test_a_slow_attempt_is_hedged_and_the_first_success_wins(tmp_path) -> None:
    svc = Tail(slow_every=10)
    report = _run(svc, 50, Hedge(after=2.0, max_extra=1.0))
    assert report.ok == 50
    st = report.stages[0]
    assert st.hedges == 5 and st.hedges_won == 5  # items 0, 10, ..., 40
    for r in report.items:
        if r.index % 10 == 0:
            assert r.value == ("hedge", r.index)  # the hedge finished first
            kinds = [(a.hedge, a.lost) for a in r.stages[0].attempts]
            assert sorted(kinds) == [(False, True), (True, False)]  # primary lost, hedge won
            assert r.stages[0].end == pytest.approx(r.stages[0].start + 2.0 + 1.0)
        else:
            assert r.value == ("primary", r.index) and len(r.stages[0].attempts) == 1
    doc = report.to_json()
    assert doc["metadata"]["stages"][0]["hedges"] == 5
    assert_checker_accepts(report.save(tmp_path / "hedged.json"))


@settings(max_examples=40, deadline=None)
@given(n=hs.integers(5, 80), limit=hs.integers(1, 8), slow_every=hs.integers(1, 6),
       max_extra=hs.sampled_from([0.0, 0.02, 0.05, 0.2, 1.0]),
       after=hs.sampled_from([0.5, 1.5, "p50", "p90"]))
def test_hedges_never_exceed_the_allowance_or_the_limit(n, limit, slow_every, max_extra,
                                                        after) -> None:
    svc = Tail(slow_every=slow_every)
    report = _run(svc, n, Hedge(after=after, max_extra=max_extra), limit=limit)
    assert report.ok == n
    calls = _calls(report)
    hedges = sum(1 for c in calls if c[2])
    firsts = sum(1 for c in calls if not c[2])
    assert hedges <= max_extra * firsts + 1  # the allowance over the whole run
    assert max_overlap([(s, e) for s, e, _, _ in calls]) <= limit  # hedges hold slots too
    for r in report.items:  # at most one hedge per attempt
        assert sum(1 for a in r.stages[0].attempts if a.hedge) <= 1


def test_a_losing_calls_error_does_not_fail_the_item() -> None:
    svc = Tail(slow_every=10, fail_hedge_of=0)
    report = _run(svc, 20, Hedge(after=2.0, max_extra=1.0))
    assert report.ok == 20  # item 0's hedge failed; its slow primary still succeeded
    r0 = report.items[0]
    assert r0.value == ("primary", 0)
    assert [a.error is not None for a in r0.stages[0].attempts if a.hedge] == [True]


def test_a_hedge_wins_after_its_primary_failed() -> None:
    svc = Tail(slow_every=0, fail_primary_of=3)
    report = _run(svc, 10, Hedge(after=1.5, max_extra=1.0))
    assert report.ok == 10 and report.items[3].value == ("hedge", 3)


def test_hedge_without_idempotent_is_a_value_error_naming_the_stage() -> None:
    with pytest.raises(ValueError, match=r"Stage 'fetch'.*idempotent"):
        Stage("fetch", Tail(), 2, hedge=Hedge(after=1.0))
    with pytest.raises(ValueError, match=r"Hedge\.after"):
        Hedge(after="p100")
    with pytest.raises(ValueError, match=r"Hedge\.max_extra"):
        Hedge(after=1.0, max_extra=-0.1)
    with pytest.raises(TypeError, match=r"Hedge\.after"):
        Hedge(after=None)  # type: ignore[arg-type]


def test_hedging_stops_when_hedges_do_not_win() -> None:
    class Sticky(Tail):  # a hedge is as slow as its primary
        def simulate(self, call, value, *, now):
            slow = call.index % 5 == 0
            return Simulated(self.slow if slow else self.fast, value)

    report = _run(Sticky(), 500, Hedge(after=2.0, max_extra=1.0), limit=20)
    st = report.stages[0]
    assert st.hedges_won == 0 and st.hedges == 20  # judged after 20 hedges, then stopped


def test_live_loser_sees_cancelled_and_its_sleep_ends_early() -> None:
    seen: dict[int, list] = defaultdict(list)

    def fetch(x):
        call = current_call()
        slow = x == 0 and not call.hedge
        cut = call.sleep(5.0 if slow else 0.05)
        seen[x].append((call.hedge, cut, call.cancelled))
        return ("hedge" if call.hedge else "primary", x)

    t0 = time.perf_counter()
    st = Stage("fetch", fetch, 4, idempotent=True, hedge=Hedge(after=0.2, max_extra=1.0))
    report = Pipeline([st]).run(range(6))
    assert time.perf_counter() - t0 < 4.0  # the 5 s loser stopped early
    assert report.ok == 6 and report.items[0].value == ("hedge", 0)
    assert sorted(seen[0]) == [(False, True, True), (True, False, False)]


def test_cancel_with_a_hedge_running() -> None:
    token = CancelToken()
    started = threading.Event()

    def fetch(x):
        call = current_call()
        if call.hedge:
            started.set()
        call.sleep(0.5 if (x == 0 and not call.hedge) else 0.3 if call.hedge else 0.01)
        return x

    def cancel_when_hedged() -> None:
        started.wait(5)
        token.cancel()

    threading.Thread(target=cancel_when_hedged, daemon=True).start()
    st = Stage("fetch", fetch, 3, idempotent=True, hedge=Hedge(after=0.1, max_extra=1.0))
    report = Pipeline([st]).run(iter(range(1000)), cancel=token)
    assert started.is_set()
    assert len(report.items) == len({r.index for r in report.items})  # each item once
    assert report.items[0].status == "ok"  # its running calls finished; the first won
    assert report.cancelled > 0 and threading.active_count() < 10
