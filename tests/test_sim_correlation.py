"""SimulatedService(correlation=c): how much of an item's slowness a hedge or a retry repeats."""

from __future__ import annotations

import math
import pickle
from typing import Any

import numpy as np
import pytest

from engine import CallInfo
from simulators import Faults, SimulatedService
from simulators._sampling import BLOCK_SIZE, draw_block

SPEC = {"dist": "lognormal", "median": 1.0, "p99": 4.0}
N = 2 * BLOCK_SIZE  # two blocks of items

pytestmark = pytest.mark.timeout(60)


def call(index: int, attempt: int = 1, hedge: bool = False) -> CallInfo:
    """A CallInfo with the ``hedge`` field (built as the engine's virtual clock builds it, so it
    also works with an engine whose CallInfo does not have the field yet)."""
    info: CallInfo = tuple.__new__(CallInfo, (index, index, "s", 0, attempt, hedge))
    return info


def lat(svc: SimulatedService, attempt: int = 1, hedge: bool = False) -> np.ndarray[Any, Any]:
    return np.array([svc.latency_of(i, attempt, hedge=hedge) for i in range(N)])


def test_zero_correlation_keeps_the_uncorrelated_numbers() -> None:
    """correlation=0 (the default) draws every attempt as before: reference results stand."""
    svc = SimulatedService("s", SPEC, seed=3)
    assert svc.correlation == 0.0
    for attempt in (1, 2, 3):
        ref = draw_block(svc.latency, 3, "s", attempt, 0)[0]
        assert [svc.latency_of(i, attempt) for i in range(BLOCK_SIZE)] == ref.tolist()


def test_a_hedge_is_a_fresh_draw_at_zero() -> None:
    svc = SimulatedService("s", SPEC, seed=3)
    first, hedge = lat(svc), lat(svc, hedge=True)
    assert np.count_nonzero(first == hedge) == 0  # its own stream
    assert not np.array_equal(hedge, lat(svc, attempt=2))  # not the retry's stream either
    # the same distribution: medians within a few percent on 8192 draws
    assert np.median(hedge) == pytest.approx(np.median(first), rel=0.05)


def test_full_correlation_repeats_the_latency() -> None:
    svc = SimulatedService("s", SPEC, seed=3, correlation=1.0)
    first = lat(svc)
    assert np.array_equal(lat(svc, hedge=True), first)
    assert np.array_equal(lat(svc, attempt=2), first)
    assert np.array_equal(lat(svc, attempt=3, hedge=True), first)


@pytest.mark.parametrize("c", [0.3, 0.7])
def test_partial_correlation_repeats_a_share_and_keeps_the_distribution(c: float) -> None:
    svc = SimulatedService("s", SPEC, seed=5, correlation=c)
    first = lat(svc)
    for other in (lat(svc, hedge=True), lat(svc, attempt=2)):
        share = np.count_nonzero(other == first) / N
        assert share == pytest.approx(c, abs=0.03)  # binomial sd ~0.005
        # a mixture keeps the marginal: the tail of repeated calls is the tail of first calls
        for q in (0.5, 0.9, 0.99):
            assert np.quantile(other, q) == pytest.approx(np.quantile(first, q), rel=0.12)
    # the retry's hedge repeats the retry (its attempt), not attempt 1 only
    retry, retry_hedge = lat(svc, attempt=2), lat(svc, attempt=2, hedge=True)
    assert np.count_nonzero(retry_hedge == retry) / N == pytest.approx(c, abs=0.03)


def test_simulate_reads_the_hedge_field() -> None:
    svc = SimulatedService("s", SPEC, seed=3, correlation=0.5)
    for i in (0, 1, 4097):
        assert svc.simulate(call(i), i, now=0.0).duration == svc.latency_of(i)
        hedged = svc.simulate(call(i, hedge=True), i, now=0.0)
        assert hedged.duration == svc.latency_of(i, hedge=True) and hedged.value == i
        assert svc.simulate(call(i, 2, True), i).duration == svc.latency_of(i, 2, hedge=True)
    # a 5-field call (an engine without the hedge field) is attempt 1 itself
    five: CallInfo = tuple.__new__(CallInfo, (7, 7, "s", 0, 1))
    assert svc.simulate(five, 7, now=None).duration == svc.latency_of(7)


def test_timeouts_follow_the_repeated_latency() -> None:
    svc = SimulatedService("s", SPEC, Faults(timeout=2.0), seed=3, correlation=1.0)
    timed_out = [i for i in range(500) if svc.outcome_of(i)[1] == "timeout"]
    assert timed_out
    for i in timed_out:
        assert svc.outcome_of(i, hedge=True)[1] == "timeout"
        assert svc.outcome_of(i, 2)[1] == "timeout"
        err = svc.simulate(call(i, hedge=True), i).error
        assert err is not None and "hedge" in str(err)


def test_transient_errors_stay_independent() -> None:
    svc = SimulatedService("s", 0.1, Faults(error_rate=0.5), seed=3, correlation=1.0)
    first = [svc.outcome_of(i)[1] for i in range(2000)]
    hedge = [svc.outcome_of(i, hedge=True)[1] for i in range(2000)]
    both = sum(a == b == "error" for a, b in zip(first, hedge, strict=True)) / 2000
    assert both == pytest.approx(0.25, abs=0.04)


def test_deterministic_and_picklable() -> None:
    a = SimulatedService("s", SPEC, seed=9, correlation=0.4, max_blocks=1)
    b = pickle.loads(pickle.dumps(SimulatedService("s", SPEC, seed=9, correlation=0.4)))
    assert b.correlation == 0.4
    # b asks for blocks in another order, a evicts: the numbers do not change
    want = [b.latency_of(i, 2, hedge=True) for i in range(N - 1, -1, -97)]
    assert [a.latency_of(i, 2, hedge=True) for i in range(N - 1, -1, -97)] == want
    assert "correlation=0.4" in repr(a)


@pytest.mark.parametrize(
    ("value", "exc"),
    [("0.5", TypeError), (True, TypeError), (None, TypeError), (-0.1, ValueError),
     (1.5, ValueError), (math.nan, ValueError)],
)
def test_correlation_is_validated(value: Any, exc: type[Exception]) -> None:
    with pytest.raises(exc, match=r"^correlation: expected a number in \[0, 1\]"):
        SimulatedService("s", 1.0, correlation=value)


def test_live_hedge_sleeps_the_hedge_latency() -> None:
    from test_sim_service import FakeClock, engine_call

    clock = FakeClock()
    svc = SimulatedService("s", SPEC, seed=3, correlation=0.5, time_scale=0.1,
                           sleep=clock.sleep)
    for i in range(50):
        with engine_call(i, 2, "s", hedge=True):
            svc(i)
        assert clock.slept[-1] == pytest.approx(svc.latency_of(i, 2, hedge=True) * 0.1)
