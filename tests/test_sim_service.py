"""SimulatedService: live calls and simulate() agree on every item's duration and outcome."""

from __future__ import annotations

import pickle
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import pytest

from engine import CallInfo, Simulated, _context
from simulators import (
    Faults,
    OutageError,
    RateLimitError,
    ServiceTimeout,
    SimulatedService,
    TransientError,
)

SPEC = {
    "dist": "mixture",
    "parts": [
        {"weight": 0.98, "dist": "lognormal", "median": 1.0, "p99": 3.0},
        {"weight": 0.02, "dist": "constant", "value": 10.0},
    ],
}


@contextmanager
def engine_call(
    index: int, attempt: int = 1, stage: str = "fetch", hedge: bool = False
) -> Iterator[Any]:
    """Pretend to be the engine's worker thread running (index, attempt[, hedge]); yields the
    record ``current_call()`` reads (``.charged`` holds what the call charged, where the engine
    supports ``charge``)."""
    if hasattr(_context, "CurrentCall"):  # the engine's worker stores its own call record
        info: Any = SimpleNamespace(
            item=SimpleNamespace(index=index, key=index),
            name=stage,
            stage=0,
            attempt=attempt,
            hedge=hedge,
            charged=None,
            lost=False,
            event=None,
        )
    else:  # an engine whose current_call() returns the stored CallInfo as it is
        info = tuple.__new__(CallInfo, (index, index, stage, 0, attempt, hedge))
    _context._local.call = info
    try:
        yield info
    finally:
        _context._local.call = None


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.t += seconds


def run_live(
    svc: SimulatedService, index: int, attempt: int = 1
) -> tuple[Any, BaseException | None]:
    with engine_call(index, attempt):
        try:
            return svc(f"v{index}"), None
        except Exception as exc:
            return None, exc


def test_live_and_simulate_agree() -> None:
    clock = FakeClock()
    faults = Faults(error_rate=0.05, timeout=4.0)
    live = SimulatedService("fetch", SPEC, faults, seed=7, time_scale=0.01, sleep=clock.sleep)
    virtual = SimulatedService("fetch", SPEC, faults, seed=7, time_scale=0.01)
    kinds = set()
    for attempt in (1, 2, 3):
        for index in range(0, 9000, 7):
            clock.slept.clear()
            value, err = run_live(live, index, attempt)
            sim = virtual.simulate(CallInfo(index, index, "fetch", 0, attempt), f"v{index}")
            assert isinstance(sim, Simulated)
            assert clock.slept == [pytest.approx(sim.duration * 0.01)]
            assert type(err) is type(sim.error)
            if err is None:
                assert value == sim.value == f"v{index}"
                kinds.add("ok")
            else:
                assert str(err) == str(sim.error)
                kinds.add(type(err).__name__)
    assert kinds == {"ok", "TransientError", "ServiceTimeout"}


def test_timeout_sleeps_the_timeout_then_raises() -> None:
    clock = FakeClock()
    svc = SimulatedService("s", 10.0, Faults(timeout=2.0), time_scale=0.5, sleep=clock.sleep)
    _, err = run_live(svc, 0)
    assert isinstance(err, ServiceTimeout) and isinstance(err, TimeoutError)
    assert clock.slept == [1.0]  # timeout * time_scale
    sim = svc.simulate(CallInfo(0, 0, "s", 0, 1), "x")
    assert sim.duration == 2.0 and isinstance(sim.error, ServiceTimeout)


@pytest.mark.timeout(10)
def test_live_really_sleeps_scaled_latency() -> None:
    svc = SimulatedService("s", {"dist": "constant", "value": 2.0}, time_scale=0.05)
    t0 = time.perf_counter()
    with engine_call(0):
        assert svc("x") == "x"
    assert 0.09 <= time.perf_counter() - t0 < 0.5


def test_without_engine_calls_number_themselves() -> None:
    clock = FakeClock()
    svc = SimulatedService("s", {"dist": "exponential", "mean": 1}, sleep=clock.sleep)
    for _ in range(3):
        svc(None)
    assert clock.slept == [svc.latency_of(i) for i in range(3)]
    svc.reset()
    svc(None)
    assert clock.slept[-1] == svc.latency_of(0)


def test_value_passes_through_unchanged() -> None:
    obj = object()
    svc = SimulatedService("s", 0.0)
    with engine_call(5):
        assert svc(obj) is obj
    assert svc.simulate(CallInfo(5, 5, "s", 0, 1), obj).value is obj


def test_outages_virtual_and_live() -> None:
    faults = Faults(outages=[(10.0, 20.0)])
    svc = SimulatedService("s", 1.0, faults)
    call = CallInfo(0, 0, "s", 0, 1)
    assert svc.simulate(call, "x", now=9.99).error is None
    sim = svc.simulate(call, "x", now=10.0)
    assert isinstance(sim.error, OutageError) and sim.error.until == 20.0 and sim.duration == 0.0
    assert svc.simulate(call, "x", now=20.0).error is None
    assert svc.simulate(call, "x").error is None  # no clock given: time-dependent faults are off

    clock = FakeClock()
    live = SimulatedService("s", 1.0, faults, time_scale=0.1, sleep=clock.sleep, clock=clock)
    assert run_live(live, 0)[1] is None  # first call at scenario t=0 starts the clock
    clock.t += 1.05  # 1.05 real s = 10.5 scenario s
    _, err = run_live(live, 1)
    assert isinstance(err, OutageError)
    clock.t += 1.0
    assert run_live(live, 2)[1] is None


def test_rate_limit_virtual() -> None:
    svc = SimulatedService("s", 0.5, Faults(rate_limit=2.0, burst=2))
    results = [svc.simulate(CallInfo(i, i, "s", 0, 1), i, now=0.0) for i in range(3)]
    assert [r.error is None for r in results] == [True, True, False]
    err = results[2].error
    assert isinstance(err, RateLimitError) and err.retry_after == pytest.approx(0.5)
    assert results[2].duration == 0.0
    assert svc.simulate(CallInfo(2, 2, "s", 0, 2), 2, now=0.5).error is None
    # time going back means a new run on the same object: the bucket is full again
    again = [svc.simulate(CallInfo(i, i, "s", 0, 1), i, now=0.0) for i in range(3)]
    assert [r.error is None for r in again] == [True, True, False]


def test_rate_limit_live_retry_after_is_scaled() -> None:
    clock = FakeClock()
    svc = SimulatedService(
        "s", 0.0, Faults(rate_limit=1.0), time_scale=0.1, sleep=clock.sleep, clock=clock
    )
    assert run_live(svc, 0)[1] is None
    _, err = run_live(svc, 1)
    assert isinstance(err, RateLimitError)
    assert err.retry_after == pytest.approx(0.1)  # 1 scenario second * time_scale
    clock.t += 0.1
    assert run_live(svc, 1, attempt=2)[1] is None


def test_simulate_accepts_now_keyword_for_the_engine() -> None:
    import inspect

    params = inspect.signature(SimulatedService("s", 0.0).simulate).parameters
    assert params["now"].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert params["now"].default is None


@pytest.mark.timeout(30)
def test_threads_see_the_same_numbers() -> None:
    faults = Faults(error_rate=0.1)
    svc = SimulatedService("s", SPEC, faults, seed=11, sleep=lambda s: None, max_blocks=2)
    ref = SimulatedService("s", SPEC, faults, seed=11)
    got: dict[int, bool] = {}

    def worker(start: int) -> None:
        for i in range(start, 20_000, 8):
            with engine_call(i):
                try:
                    svc(i)
                    got[i] = True
                except TransientError:
                    got[i] = False

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 20_000
    for i in range(20_000):
        assert got[i] == (ref.outcome_of(i)[1] == "ok")
    assert len(svc._cache) <= 2  # bounded memory


def test_pickle_round_trip() -> None:
    svc = SimulatedService("s", SPEC, Faults(error_rate=0.1), seed=3, time_scale=0.5)
    clone = pickle.loads(pickle.dumps(svc))
    assert clone.name == "s" and clone.seed == 3 and clone.time_scale == 0.5
    assert [clone.outcome_of(i) for i in range(100)] == [svc.outcome_of(i) for i in range(100)]


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"name": ""}, r"^name:"),
        ({"seed": -1}, r"^seed: expected an integer >= 0"),
        ({"seed": 1.5}, r"^seed:"),
        ({"time_scale": -1}, r"^time_scale:"),
        ({"time_scale": 0, "faults": Faults(rate_limit=1)}, r"^time_scale: must be > 0"),
        ({"latency": {"dist": "lognormal", "median": 1, "p99": 1}}, r"^latency\.p99"),
        ({"faults": {"rate": 0.1}}, r"^faults: expected a Faults"),
    ],
)
def test_constructor_validation(kwargs: dict[str, Any], pattern: str) -> None:
    args: dict[str, Any] = {"name": "s", "latency": 1.0, **kwargs}
    with pytest.raises(ValueError, match=pattern):
        SimulatedService(**args)


def test_negative_index_rejected() -> None:
    with pytest.raises(ValueError, match="index >= 0"):
        SimulatedService("s", 1.0).latency_of(-1)


@pytest.mark.timeout(30)
def test_simulate_costs_about_a_microsecond() -> None:
    services = [
        SimulatedService(n, SPEC, Faults(error_rate=0.01), seed=7)
        for n in ("fetch", "analyze", "save", "assign")
    ]
    calls = [CallInfo(i, i, "x", 0, 1) for i in range(3220)]
    for svc in services:  # build the blocks once
        for c in calls[::1000]:
            svc.simulate(c, None)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for svc in services:
            sim = svc.simulate
            for c in calls:
                sim(c, None, now=1.0)
        best = min(best, time.perf_counter() - t0)
    # 12,880 calls; ~0.9 us each on this machine. Generous bound against noisy CI.
    assert best < 0.05, f"{best / len(calls) / 4 * 1e6:.2f} us per simulate() call"
    # a cold run, building every block, stays cheap too
    fresh = [
        SimulatedService(n, SPEC, Faults(error_rate=0.01), seed=8) for n in ("a", "b", "c", "d")
    ]
    t0 = time.perf_counter()
    for svc in fresh:
        for c in calls:
            svc.simulate(c, None)
    assert time.perf_counter() - t0 < 0.1  # ~7 ms here; slack for a loaded machine
