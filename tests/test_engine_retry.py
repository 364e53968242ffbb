"""Retry timing and backoff, on the virtual clock (exact) and live (ordering only)."""
from __future__ import annotations

import email.utils
import threading
import time

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
    """A retried item takes the stage's next free slot ahead of first attempts waiting there
    (it is the item's second chance, not new work, as a hedge is), never exceeding the
    limit."""
    policy = RetryPolicy(attempts=2, backoff=0, jitter=False)

    class FirstFails(Flaky):
        def simulate(self, call, value, *, now=0.0):
            if value == 0 and call.attempt == 1:
                return Simulated(1.0, error=ConnectionError("x"))
            return Simulated(1.0, value)

    report = Pipeline([Stage("s", FirstFails(0), concurrency=1, retry=policy)]).run(
        range(3), clock="virtual")
    starts = {r.index: [a.start for a in r.stages[0].attempts] for r in report.items}
    assert starts == {0: [0.0, 2.0], 1: [1.0], 2: [3.0]}


def test_live_retry_succeeds() -> None:
    policy = RetryPolicy(attempts=3, backoff=0.001)
    report = Pipeline([Stage("s", Flaky(2), concurrency=3, retry=policy)]).run(range(10))
    assert report.ok == 10
    assert all(len(r.stages[0].attempts) == 3 for r in report.items)


def test_unit_random_is_uniform_enough() -> None:
    xs = [unit_random(i, 1, 2) for i in range(2000)]
    assert min(xs) >= 0 and max(xs) < 1
    assert abs(sum(xs) / len(xs) - 0.5) < 0.03


# -- retry_after hints of every shape (issue 10) -------------------------------------------------
def _http_date(seconds_from_now: float) -> str:
    return email.utils.formatdate(time.time() + seconds_from_now, usegmt=True)


@pytest.mark.parametrize(
    ("hint", "wait"),
    [
        (float("inf"), 5.0),  # capped by max_backoff, never an OverflowError
        (1e300, 5.0),
        pytest.param(10**400, 5.0, id="10**400"),  # an int too large for a float: capped
        ("0.2", 0.2),  # the raw text of a Retry-After header
        (" 3 ", 3.0),
        (b"0.2", 0.2),
        ("1e300", 5.0),
        ("inf", 5.0),
        (2.5, 2.5),
        (-5.0, 0.1),  # says nothing usable: the policy's own backoff
        (float("nan"), 0.1),
        ("nan", 0.1),
        ("soon", 0.1),
        ("", 0.1),
        (True, 0.1),
        (object(), 0.1),
        (None, 0.1),
    ],
    ids=lambda v: repr(v)[:20],
)
def test_retry_after_of_any_shape_is_capped_or_honoured_exactly(hint, wait) -> None:
    policy = RetryPolicy(attempts=2, backoff=0.1, max_backoff=5.0, jitter=False)
    fn = Flaky(1)
    fn.retry_after = hint  # type: ignore[assignment]
    report = Pipeline([Stage("s", fn, retry=policy)]).run([0], clock="virtual")
    (r,) = report.items
    assert r.status == "ok"
    at = r.stages[0].attempts
    assert at[0].end == 1.0
    assert at[1].start == pytest.approx(1.0 + wait, abs=1e-12)


def test_retry_after_http_date_is_honoured() -> None:
    policy = RetryPolicy(attempts=2, backoff=0.1, max_backoff=60.0, jitter=False)
    fn = Flaky(1)
    fn.retry_after = _http_date(4)  # type: ignore[assignment]  # whole seconds: 3 < wait <= 4
    report = Pipeline([Stage("s", fn, retry=policy)]).run([0], clock="virtual")
    at = report.items[0].stages[0].attempts
    assert 2.0 < at[1].start - at[0].end <= 4.0


@pytest.mark.parametrize(("offset", "wait"), [(86_400.0, 5.0), (-3600.0, 0.1)],
                         ids=["tomorrow-capped", "past-ignored"])
def test_retry_after_http_date_far_away(offset, wait) -> None:
    policy = RetryPolicy(attempts=2, backoff=0.1, max_backoff=5.0, jitter=False)
    fn = Flaky(1)
    fn.retry_after = _http_date(offset)  # type: ignore[assignment]
    report = Pipeline([Stage("s", fn, retry=policy)]).run([0], clock="virtual")
    at = report.items[0].stages[0].attempts
    assert at[1].start - at[0].end == pytest.approx(wait)


def test_max_backoff_caps_retry_after_with_jitter() -> None:
    policy = RetryPolicy(attempts=3, backoff=1.0, max_backoff=2.0, jitter=True)
    fn = Flaky(2, retry_after=float("inf"))
    report = Pipeline([Stage("s", fn, 10, retry=policy)]).run(range(10), clock="virtual")
    for r in report.items:
        at = r.stages[0].attempts
        assert [at[k + 1].start - at[k].end for k in range(2)] == [pytest.approx(2.0)] * 2


def test_many_attempts_never_overflow() -> None:
    """2.0 ** 1100 overflows: the exponential is capped long before it is computed."""
    policy = RetryPolicy(attempts=1100, backoff=0.0, max_backoff=0.0, jitter=False)
    report = Pipeline([Stage("s", Flaky(1099, duration=0.0), retry=policy)]).run(
        [0], clock="virtual")
    assert report.items[0].status == "ok"
    assert len(report.items[0].stages[0].attempts) == 1100
    capped = RetryPolicy(attempts=2000, backoff=1.0, max_backoff=3.0, jitter=False)
    assert capped.delay(ConnectionError(), 1500) == 3.0


@pytest.mark.timeout(20, method="thread")
@pytest.mark.parametrize("hint", [float("inf"), 1e300, "0.02", "inf"], ids=repr)
def test_live_retry_after_capped_by_max_backoff(hint) -> None:
    policy = RetryPolicy(attempts=2, backoff=0.0, max_backoff=0.05, jitter=False)
    t = time.perf_counter()
    report = Pipeline([Stage("s", Flaky(1, retry_after=hint), 2, retry=policy)]).run(range(4))
    assert time.perf_counter() - t < 10
    assert report.ok == 4
    for r in report.items:
        at = r.stages[0].attempts
        assert at[1].start - at[0].end >= 0.02 - 1e-3


@pytest.mark.timeout(20, method="thread")
def test_live_absurd_but_finite_max_backoff_never_overflows() -> None:
    """``max_backoff=1e10`` (317 years) is finite, so accepted; an absurd hint then asks for a
    1e10 s wait. The dispatcher must not die of an OverflowError waiting for it (a lock's
    timeout is at most threading.TIMEOUT_MAX): a cancel ends the run with the item cancelled."""
    from engine import CancelToken

    token = CancelToken()
    policy = RetryPolicy(attempts=2, backoff=0.0, max_backoff=1e10, jitter=False)
    threading.Timer(0.3, token.cancel).start()
    report = Pipeline([Stage("s", Flaky(1, retry_after=1e300), retry=policy)]).run(
        [0], cancel=token)
    assert [r.status for r in report.items] == ["cancelled"]


def test_unit_random_and_delay_never_raise_on_odd_errors() -> None:
    class Odd(Exception):
        @property
        def retry_after(self):
            raise RuntimeError("header missing")

    policy = RetryPolicy(attempts=3, backoff=0.5, max_backoff=4.0, jitter=False)
    assert policy.delay(Odd(), 1) == 0.5
    assert policy.delay(Odd(), 10) == 4.0
