"""Retry timing and backoff, on the virtual clock (exact) and live (ordering only)."""
from __future__ import annotations

import pytest

from engine import Pipeline, RetryPolicy, Simulated, Stage
from engine._retry import unit_random

pytestmark = pytest.mark.timeout(20)


class Flaky:
    """Fails the first `fails` attempts of every item, each call taking `duration`."""

    def __init__(self, fails: int, duration: float = 1.0, retry_after: float | None = None):
        self.fails, self.duration, self.retry_after = fails, duration, retry_after

    def __call__(self, value):  # live use
        from engine import current_call

        if current_call().attempt <= self.fails:
            raise self._error()
        return value

    def _error(self) -> Exception:
        exc = ConnectionError("try again")
        if self.retry_after is not None:
            exc.retry_after = self.retry_after  # type: ignore[attr-defined]
        return exc

    def simulate(self, call, value, *, now=0.0):
        if call.attempt <= self.fails:
            return Simulated(self.duration, error=self._error())
        return Simulated(self.duration, value)


def test_exponential_backoff_without_jitter_is_exact() -> None:
    policy = RetryPolicy(attempts=4, backoff=0.5, jitter=False)
    report = Pipeline([Stage("s", Flaky(3), retry=policy)]).run([0], clock="virtual")
    (r,) = report.items
    assert r.status == "ok"
    calls = [(a.start, a.end) for a in r.stages[0].attempts]
    # 1 s calls, waits 0.5, 1.0, 2.0 between them
    assert calls == [(0.0, 1.0), (1.5, 2.5), (3.5, 4.5), (6.5, 7.5)]
    assert [a.error is not None for a in r.stages[0].attempts] == [True, True, True, False]
    assert report.stages[0].retries == 3 and report.stages[0].errors == 3


def test_max_backoff_caps_the_wait() -> None:
    with pytest.raises(ValueError, match="max_backoff: expected a number >= backoff"):
        RetryPolicy(attempts=4, backoff=10, max_backoff=2, jitter=False)
    policy = RetryPolicy(attempts=4, backoff=2, max_backoff=2, jitter=False)
    report = Pipeline([Stage("s", Flaky(3), retry=policy)]).run([0], clock="virtual")
    starts = [a.start for a in report.items[0].stages[0].attempts]
    assert starts == [0.0, 3.0, 6.0, 9.0]


def test_full_jitter_within_bounds_and_deterministic() -> None:
    policy = RetryPolicy(attempts=3, backoff=4, jitter=True)
    p = Pipeline([Stage("s", Flaky(2), concurrency=20, retry=policy)])
    a = p.run(range(20), clock="virtual")
    b = p.run(range(20), clock="virtual")
    assert a.items == b.items  # same items, same jitter: reproducible
    waits = []
    for r in a.items:
        at = r.stages[0].attempts
        waits.append(at[1].start - at[0].end)
        assert 0 <= at[1].start - at[0].end <= 4 + 1e-9
        assert 0 <= at[2].start - at[1].end <= 8 + 1e-9
    assert len({round(w, 6) for w in waits}) > 10  # jitter spreads them


def test_retry_after_is_honoured() -> None:
    policy = RetryPolicy(attempts=2, backoff=0.1, jitter=False)
    report = Pipeline([Stage("s", Flaky(1, retry_after=7.0), retry=policy)]).run(
        [0], clock="virtual")
    at = report.items[0].stages[0].attempts
    assert at[1].start - at[0].end == pytest.approx(7.0)


def test_attempts_exhausted_fails_with_stage_type_message() -> None:
    policy = RetryPolicy(attempts=2, backoff=0, jitter=False)
    report = Pipeline([Stage("a", Flaky(0)), Stage("b", Flaky(5), retry=policy)]).run(
        range(3), clock="virtual")
    for r in report.items:
        assert r.status == "failed"
        assert r.error is not None
        assert (r.error.stage, r.error.type, r.error.message) == ("b", "ConnectionError",
                                                                   "try again")
        assert len(r.stages[1].attempts) == 2


def test_retry_on_filters_exceptions() -> None:
    policy = RetryPolicy(attempts=5, backoff=0, retry_on=(TimeoutError,))
    report = Pipeline([Stage("s", Flaky(1), retry=policy)]).run([0], clock="virtual")
    assert report.items[0].status == "failed"
    assert len(report.items[0].stages[0].attempts) == 1


def test_retry_goes_back_through_the_limit() -> None:
    """A retried item re-queues behind items already waiting (FIFO), never exceeding the limit."""
    policy = RetryPolicy(attempts=2, backoff=0, jitter=False)

    class FirstFails(Flaky):
        def simulate(self, call, value, *, now=0.0):
            if value == 0 and call.attempt == 1:
                return Simulated(1.0, error=ConnectionError("x"))
            return Simulated(1.0, value)

    report = Pipeline([Stage("s", FirstFails(0), concurrency=1, retry=policy)]).run(
        range(3), clock="virtual")
    starts = {r.index: [a.start for a in r.stages[0].attempts] for r in report.items}
    assert starts == {0: [0.0, 3.0], 1: [1.0], 2: [2.0]}


def test_live_retry_succeeds() -> None:
    policy = RetryPolicy(attempts=3, backoff=0.001)
    report = Pipeline([Stage("s", Flaky(2), concurrency=3, retry=policy)]).run(range(10))
    assert report.ok == 10
    assert all(len(r.stages[0].attempts) == 3 for r in report.items)


def test_unit_random_is_uniform_enough() -> None:
    xs = [unit_random(i, 1, 2) for i in range(2000)]
    assert min(xs) >= 0 and max(xs) < 1
    assert abs(sum(xs) / len(xs) - 0.5) < 0.03
