"""Per-stage rate limits: a token bucket consulted before each call, live and virtual."""
from __future__ import annotations

import itertools
import time

import pytest

from engine import Pipeline, RateLimit, Simulated, Stage
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
