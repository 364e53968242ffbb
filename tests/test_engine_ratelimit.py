"""Per-stage rate limits: a token bucket consulted before each call, live and virtual."""
from __future__ import annotations

import itertools
import threading
import time

import pytest

from engine import (
    Batched,
    CancelToken,
    Continuous,
    ParallelBatches,
    Pipeline,
    RateLimit,
    Simulated,
    Stage,
)
from engine._ratelimit import TokenBucket

pytestmark = pytest.mark.timeout(20)


class Instant:
    def __call__(self, v):
        return v

    def simulate(self, call, value, *, now=0.0):
        return Simulated(0.0, value)


def test_bucket_takes_a_token_or_says_how_long_to_wait() -> None:
    b = TokenBucket(rate=2.0, burst=2, now=0.0)
    assert [b.take(0.0) for _ in range(3)] == [0.0, 0.0, pytest.approx(0.5)]
    assert b.take(0.5) == 0.0  # one token refilled
    assert b.take(0.5) == pytest.approx(0.5)  # a refusal takes nothing
    assert [b.take(10.0) for _ in range(3)] == [0.0, 0.0, pytest.approx(0.5)]  # capped at burst


def test_virtual_rate_limit_spaces_calls() -> None:
    report = Pipeline([Stage("s", Instant(), concurrency=50,
                             rate_limit=RateLimit(rate=10, burst=1))]).run(
        range(21), clock="virtual")
    starts = sorted(r.stages[0].start for r in report.items)
    assert starts[-1] == pytest.approx(2.0)
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert min(gaps) == pytest.approx(0.1)


def test_per_minute() -> None:
    assert RateLimit.per_minute(600).rate == pytest.approx(10.0)


def test_live_rate_limit() -> None:
    t = time.perf_counter()
    report = Pipeline([Stage("s", str, concurrency=8, rate_limit=RateLimit(rate=100))]).run(
        range(31))
    elapsed = time.perf_counter() - t
    assert report.ok == 31
    starts = sorted(r.stages[0].start for r in report.items)
    assert starts[-1] - starts[0] >= 0.3 - 0.02  # 30 gaps of 10 ms
    assert elapsed >= 0.28


# -- a cancel while calls wait for a token (issue 10) --------------------------------------------
class Recorder:
    """Records the start time (perf_counter) of every call that runs."""

    def __init__(self, duration: float = 0.02) -> None:
        self.duration = duration
        self.starts: list[float] = []
        self.lock = threading.Lock()

    def __call__(self, v):
        t = time.perf_counter()
        with self.lock:
            self.starts.append(t)
        time.sleep(self.duration)
        return v


def _counting(n: int, pulled: list[int]):
    for i in range(n):
        pulled.append(i)
        yield i


@pytest.mark.timeout(20, method="thread")
@pytest.mark.parametrize("source", ["list", "generator"])
@pytest.mark.parametrize("consume", ["run", "stream"])
@pytest.mark.parametrize("strategy", [Continuous(), Batched(size=20),
                                      ParallelBatches(lanes=2, size=10)], ids=lambda s: s.name)
def test_cancel_while_calls_wait_for_a_token(strategy, consume, source) -> None:
    """RateLimit(rate=2) with 10 slots: 49 of 50 calls wait for a token (24.5 s). A cancel at
    0.3 s: no call starts after it, run() returns at once, every item read ends once."""
    token = CancelToken()
    fn = Recorder()
    pulled: list[int] = []
    items = list(range(50)) if source == "list" else _counting(500, pulled)
    stages = [Stage("llm", fn, concurrency=10, rate_limit=RateLimit(rate=2)), Stage("t", str, 2)]
    cancelled_at: list[float] = []

    def cancel_later():
        time.sleep(0.3)
        token.cancel()
        cancelled_at.append(time.perf_counter())

    threading.Thread(target=cancel_later).start()
    t0 = time.perf_counter()
    p = Pipeline(stages)
    if consume == "run":
        results = list(p.run(items, strategy, cancel=token).items)
    else:
        results = list(p.stream(items, strategy, cancel=token))
    returned = time.perf_counter()
    time.sleep(0.6)  # a call still queued somewhere would start now (one token per 0.5 s)
    assert cancelled_at, "the cancel did not happen"
    assert all(s <= cancelled_at[0] for s in fn.starts), "a call started after the cancel"
    assert 1 <= len(fn.starts) <= 2  # t=0 (and maybe one at 0.5 s on a stalled machine)
    assert returned - t0 < 5.0  # not the ~24 s the queued calls would take
    # a list is read on demand (nothing read ahead), a generator on the feeder thread: every
    # item taken from it is reported
    n = len(results) if source == "list" else len(pulled)
    assert sorted(r.index for r in results) == list(range(n)), "every item read, once"
    if source == "list" and strategy.name == "continuous":
        assert n == 50  # all admitted at once (the window is 64)
    assert {r.status for r in results} <= {"ok", "cancelled"}
    ran = [r for r in results if r.stages]  # the calls that ran are in the report
    assert len(ran) == len(fn.starts) and all(r.stages[0].name == "llm" for r in ran)
    if strategy.name == "continuous":
        assert all(r.status == "ok" for r in ran)  # it had finished both stages at 0.02 s


@pytest.mark.timeout(20, method="thread")
@pytest.mark.parametrize("strategy", [Continuous(), Batched(size=20)], ids=lambda s: s.name)
def test_virtual_cancel_while_calls_wait_for_a_token(strategy) -> None:
    token = CancelToken()
    cancelled_at: list[float] = []

    def on_result(r):
        if not cancelled_at:
            cancelled_at.append(r.visible_at)
            token.cancel()

    stages = [Stage("llm", Instant(), concurrency=10, rate_limit=RateLimit(rate=2))]
    report = Pipeline(stages).run(range(50), strategy, on_result=on_result, cancel=token,
                                  clock="virtual")
    starts = [a.start for r in report.items for sp in r.stages for a in sp.attempts]
    assert starts and max(starts) <= cancelled_at[0]
    assert sorted(r.index for r in report.items) == list(range(50))
    assert report.cancelled == 50 - len(starts)


@pytest.mark.timeout(20, method="thread")
def test_absurdly_slow_rate_limit_never_overflows() -> None:
    token = CancelToken()
    threading.Timer(0.3, token.cancel).start()
    report = Pipeline([Stage("s", str, 2, rate_limit=RateLimit(rate=1e-12))]).run(
        range(3), cancel=token)
    assert [r.status for r in report.items] == ["ok", "cancelled", "cancelled"]


def test_virtual_absurdly_slow_rate_limit() -> None:
    report = Pipeline([Stage("s", Instant(), 2, rate_limit=RateLimit(rate=1e-12))]).run(
        range(2), clock="virtual")
    assert [r.stages[0].start for r in report.items] == [0.0, pytest.approx(1e12)]


@pytest.mark.timeout(20, method="thread")
def test_stream_closed_while_calls_wait_for_a_token() -> None:
    fn = Recorder(duration=0.0)
    gen = Pipeline([Stage("llm", fn, 10, rate_limit=RateLimit(rate=2))]).stream(range(50))
    assert next(gen).ok
    t = time.perf_counter()
    gen.close()
    closed = time.perf_counter()
    assert closed - t < 2.0
    time.sleep(0.6)
    assert all(s <= closed for s in fn.starts) and len(fn.starts) <= 2
