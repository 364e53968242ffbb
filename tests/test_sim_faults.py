"""Faults: validation, the exception hierarchy, and outcomes that depend on (seed, name, index,
attempt) only."""

from __future__ import annotations

import pickle
from typing import Any

import pytest

from engine import CallInfo
from simulators import (
    Faults,
    OutageError,
    RateLimitError,
    ServiceTimeout,
    SimulatedFault,
    SimulatedService,
    TransientError,
    parse_faults,
)
from simulators._faults import TokenBucket


def test_exception_hierarchy() -> None:
    for cls in (TransientError, ServiceTimeout, RateLimitError, OutageError):
        assert issubclass(cls, SimulatedFault)
        assert issubclass(cls, Exception)
    assert issubclass(ServiceTimeout, TimeoutError)
    err = RateLimitError("slow down", retry_after=1.5)
    assert err.retry_after == 1.5
    clone = pickle.loads(pickle.dumps(err))
    assert (
        isinstance(clone, RateLimitError) and clone.retry_after == 1.5 and str(clone) == "slow down"
    )
    out = pickle.loads(pickle.dumps(OutageError("down", until=9.0)))
    assert out.until == 9.0


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"error_rate": -0.1}, r"^faults\.error_rate: expected a number >= 0"),
        ({"error_rate": 1.5}, r"^faults\.error_rate: expected a number in \[0, 1\]"),
        ({"error_rate": float("nan")}, r"^faults\.error_rate: expected a finite number"),
        ({"error_rate": "0.1"}, r"^faults\.error_rate: expected a number"),
        ({"timeout": 0}, r"^faults\.timeout: expected a number > 0"),
        ({"timeout": float("inf")}, r"^faults\.timeout: expected a finite number"),
        ({"rate_limit": 0}, r"^faults\.rate_limit: expected a number > 0"),
        ({"rate_limit": 10, "burst": 0}, r"^faults\.burst: expected an integer >= 1"),
        ({"burst": 3}, r"^faults\.burst: only meaningful with faults\.rate_limit"),
        ({"outages": [(5, 3)]}, r"^faults\.outages\[0\]\[1\]: expected a number > t0 \(5\.0\)"),
        ({"outages": [(1,)]}, r"^faults\.outages\[0\]: expected a pair"),
        ({"outages": [(-1, 2)]}, r"^faults\.outages\[0\]\[0\]: expected a number >= 0"),
        ({"outages": "0-5"}, r"^faults\.outages: expected a list"),
    ],
)
def test_faults_validation(kwargs: dict[str, Any], pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        Faults(**kwargs)


def test_faults_normalised() -> None:
    f = Faults(error_rate=0, timeout=2, rate_limit=4, outages=[[10, 20], (1, 2)])  # type: ignore[list-item]
    assert f.outages == ((1.0, 2.0), (10.0, 20.0))
    assert f.effective_burst == 4
    assert f.time_dependent
    assert (
        f.outage_at(1.5) == (1.0, 2.0)
        and f.outage_at(2.0) is None
        and f.outage_at(19.9) == (10.0, 20.0)
    )
    assert not Faults(error_rate=0.5, timeout=1).time_dependent
    assert Faults(rate_limit=0.5).effective_burst == 1


def test_parse_faults() -> None:
    assert parse_faults(None) == Faults()
    assert parse_faults({"rate": 0.01}) == Faults(error_rate=0.01)
    f = parse_faults(
        {"error_rate": 0.1, "timeout": 5, "rate_limit": 40, "burst": 5, "outages": [[1, 2]]}
    )
    assert f == Faults(error_rate=0.1, timeout=5, rate_limit=40, burst=5, outages=((1, 2),))
    with pytest.raises(
        ValueError, match=r"^stages\[0\]\.errors\.rate: expected a number in \[0, 1\]"
    ):
        parse_faults({"rate": 2}, where="stages[0].errors")
    with pytest.raises(ValueError, match=r"^errors\.bogus: unexpected key"):
        parse_faults({"bogus": 1})
    with pytest.raises(ValueError, match=r"^errors\.error_rate: given twice"):
        parse_faults({"rate": 0.1, "error_rate": 0.1})
    with pytest.raises(ValueError, match=r"^errors\.timeout: expected a number > 0"):
        parse_faults({"timeout": -1})


def test_token_bucket() -> None:
    b = TokenBucket(rate=2.0, burst=2)
    assert b.acquire(0.0) == 0.0
    assert b.acquire(0.0) == 0.0
    assert b.acquire(0.0) == pytest.approx(0.5)  # refused: next token in 1/rate
    assert b.acquire(0.5) == 0.0
    assert b.acquire(0.5) == pytest.approx(0.5)
    assert b.acquire(10.0) == 0.0 and b.acquire(10.0) == 0.0  # refills to burst only
    assert b.acquire(10.0) > 0
    b.reset()
    assert b.acquire(0.0) == 0.0


def _outcomes(svc: SimulatedService, n: int, attempt: int = 1) -> list[tuple[float, str]]:
    return [svc.outcome_of(i, attempt) for i in range(n)]


def test_fault_outcomes_are_deterministic_per_seed_name_index_attempt() -> None:
    spec = {"dist": "lognormal", "median": 1.0, "p99": 4.0}
    faults = Faults(error_rate=0.1, timeout=3.0)
    a = SimulatedService("fetch", spec, faults, seed=7)
    b = SimulatedService("fetch", spec, faults, seed=7)
    # b asks for blocks in another order and from more threads' worth of positions
    late = [b.outcome_of(i) for i in range(9000, 8000, -1)]
    assert late == [a.outcome_of(i) for i in range(9000, 8000, -1)]
    assert _outcomes(a, 5000) == _outcomes(b, 5000)
    assert _outcomes(a, 5000, attempt=2) == _outcomes(b, 5000, attempt=2)
    assert _outcomes(a, 5000) != _outcomes(a, 5000, attempt=2)
    assert _outcomes(a, 5000) != _outcomes(SimulatedService("fetch", spec, faults, seed=8), 5000)
    assert _outcomes(a, 5000) != _outcomes(SimulatedService("analyze", spec, faults, seed=7), 5000)


def test_error_and_timeout_rates() -> None:
    spec = {"dist": "lognormal", "median": 1.0, "p99": 4.0}
    svc = SimulatedService("s", spec, Faults(error_rate=0.05, timeout=3.0), seed=1)
    kinds = [k for _, k in _outcomes(svc, 40_000)]
    p_late = 1 - svc.latency.cdf(3.0)  # type: ignore[operator]
    assert kinds.count("timeout") / len(kinds) == pytest.approx(p_late, abs=0.005)
    assert kinds.count("error") / len(kinds) == pytest.approx(0.05 * (1 - p_late), abs=0.005)
    assert all(d <= 3.0 for d, _ in _outcomes(svc, 40_000))
    assert all(d == 3.0 for d, k in _outcomes(svc, 40_000) if k == "timeout")


def test_error_pattern_independent_of_latency_spec() -> None:
    f = Faults(error_rate=0.2)
    a = SimulatedService("s", {"dist": "constant", "value": 1}, f, seed=3)
    b = SimulatedService(
        "s",
        {
            "dist": "mixture",
            "parts": [
                {"weight": 0.5, "dist": "exponential", "mean": 1},
                {"weight": 0.5, "dist": "uniform", "low": 0, "high": 2},
            ],
        },
        f,
        seed=3,
    )
    assert [k for _, k in _outcomes(a, 3000)] == [k for _, k in _outcomes(b, 3000)]


def test_simulated_errors_are_fresh_exceptions() -> None:
    svc = SimulatedService("s", 0.5, Faults(error_rate=1.0), seed=0)
    call = CallInfo(3, 3, "s", 0, 1)
    e1 = svc.simulate(call, "v").error
    e2 = svc.simulate(call, "v").error
    assert isinstance(e1, TransientError) and isinstance(e2, TransientError)
    assert e1 is not e2
    assert "item 3, attempt 1" in str(e1)
