"""Adaptive concurrency (AIMD): validation, the rule, and a simulated closed loop."""
from __future__ import annotations

import heapq
import itertools
import math
import random
from dataclasses import FrozenInstanceError

import pytest

from engine._adaptive import Adaptive, AdaptiveLimit, is_overload

pytestmark = pytest.mark.timeout(60)


# -- validation -----------------------------------------------------------------------------


def test_defaults() -> None:
    a = Adaptive(8, max=200)
    assert (a.initial, a.min, a.max, a.decrease, a.overload_on) == (8, 1, 200, 0.75, ())
    with pytest.raises(FrozenInstanceError):
        a.initial = 3  # type: ignore[misc]
    assert Adaptive(2, max=3, overload_on=KeyError).overload_on == (KeyError,)
    with pytest.raises(TypeError):
        Adaptive(8)  # type: ignore[call-arg]  # max is required
    with pytest.raises(TypeError):
        Adaptive(8, 1, 200)  # type: ignore[misc]  # min and max are keyword-only


@pytest.mark.parametrize(("kwargs", "exc", "message"), [
    ({"initial": 0, "max": 5}, ValueError, "Adaptive.initial: expected an int in [1, 5], got 0"),
    ({"initial": 6, "max": 5}, ValueError, "Adaptive.initial: expected an int in [1, 5], got 6"),
    ({"initial": 2, "min": 3, "max": 5}, ValueError, "Adaptive.initial: expected an int in [3, 5]"),
    ({"initial": 2.0, "max": 5}, TypeError, "Adaptive.initial"),
    ({"initial": True, "max": 5}, TypeError, "Adaptive.initial"),
    ({"initial": 2, "min": 0, "max": 5}, ValueError, "Adaptive.min: expected an int >= 1, got 0"),
    ({"initial": 2, "min": "1", "max": 5}, TypeError, "Adaptive.min"),
    ({"initial": 2, "min": 4, "max": 3}, ValueError, "Adaptive.max: expected an int >= min (4)"),
    ({"initial": 2, "max": 5.5}, TypeError, "Adaptive.max"),
    ({"initial": 2, "max": 5, "decrease": 1.0}, ValueError,
     "Adaptive.decrease: expected a number in (0, 1), got 1.0"),
    ({"initial": 2, "max": 5, "decrease": 0}, ValueError, "Adaptive.decrease"),
    ({"initial": 2, "max": 5, "decrease": math.nan}, ValueError, "Adaptive.decrease"),
    ({"initial": 2, "max": 5, "decrease": "0.5"}, TypeError, "Adaptive.decrease"),
    ({"initial": 2, "max": 5, "overload_on": (KeyError, 3)}, TypeError, "Adaptive.overload_on"),
    ({"initial": 2, "max": 5, "overload_on": [KeyError]}, TypeError, "Adaptive.overload_on"),
    ({"initial": 2, "max": 5, "overload_on": (int,)}, TypeError, "Adaptive.overload_on"),
])
def test_validation(kwargs: dict, exc: type[Exception], message: str) -> None:
    with pytest.raises(exc) as info:
        Adaptive(**kwargs)
    assert message in str(info.value)


# -- is_overload ----------------------------------------------------------------------------


class RateLimited(Exception):
    def __init__(self, retry_after: object) -> None:
        super().__init__("429")
        self.retry_after = retry_after


class Broken(Exception):
    @property
    def retry_after(self) -> float:
        raise RuntimeError("no header")


class ReadTimeout(OSError):
    pass


class APITimeoutError(Exception):
    pass


class Custom(Exception):
    pass


def test_is_overload() -> None:
    assert is_overload(RateLimited(1.5), ())
    assert is_overload(RateLimited(0), ())
    assert not is_overload(RateLimited(None), ())
    assert not is_overload(Broken("x"), ())
    assert is_overload(TimeoutError(), ())
    assert is_overload(ReadTimeout(), ())
    assert is_overload(APITimeoutError(), ())
    assert not is_overload(ValueError("bad"), ())
    assert not is_overload(Custom(), ())
    assert is_overload(Custom(), (Custom,))
    assert Adaptive(1, max=2, overload_on=(Custom,)).is_overload(Custom())
    assert not Adaptive(1, max=2).is_overload(KeyError())


# -- the rule -------------------------------------------------------------------------------


def test_controller_starts_at_initial() -> None:
    c = Adaptive(4, max=10).controller(3.0)
    assert isinstance(c, AdaptiveLimit)
    assert c.limit == 4
    assert c.timeline == [(3.0, 4)]


def test_slow_start_until_the_first_overload() -> None:
    c = Adaptive(4, max=50).controller(0.0)
    t = 0.0
    for _ in range(10):  # +1 per saturated completion: doubling per round trip
        t += 0.1
        assert c.on_end(t, t - 1.0, overloaded=False, saturated=True)
    assert c.limit == 14
    assert c.on_end(t + 0.1, t, overloaded=True, saturated=True)  # cut, and slow start ends
    assert c.limit == 10


def test_additive_increase_one_per_window_while_saturated() -> None:
    c = Adaptive(4, max=6).controller(0.0)
    c.on_end(0.0, -1.0, overloaded=True, saturated=True)  # out of slow start: 4 -> 3
    c = Adaptive(4, max=6).controller(0.0)
    c._slow_start = False  # the congestion-avoidance phase, from the start
    t = 0.0
    changes = []
    for _ in range(100):
        t += 0.1
        changes.append(c.on_end(t, t - 1.0, overloaded=False, saturated=True))
    assert c.limit == 6  # capped at max
    assert [lim for _, lim in c.timeline] == [4, 5, 6]
    assert changes.index(True) == 3  # after 4 completions (one window at limit 4)
    assert changes[4:].index(True) + 4 == 8  # then 5 more at limit 5
    assert sum(changes) == 2


def test_no_increase_when_not_saturated() -> None:
    c = Adaptive(4, max=100).controller(0.0)
    for i in range(100):
        assert not c.on_end(float(i), i - 1.0, overloaded=False, saturated=False)
    assert c.limit == 4
    assert c.timeline == [(0.0, 4)]


def test_burst_of_overloads_cuts_once() -> None:
    c = Adaptive(100, max=200).controller(0.0)
    # 100 calls started at t=0 under limit 100; all answered 429 at t=1
    results = [c.on_end(1.0 + i * 1e-3, 0.0, overloaded=True, saturated=True)
               for i in range(100)]
    assert results.count(True) == 1
    assert c.limit == 75
    assert c.timeline == [(0.0, 100), (1.0, 75)]
    # a call started after the cut and overloaded cuts again
    assert c.on_end(2.0, 1.5, overloaded=True, saturated=True)
    assert c.limit == 56  # floor(75 * 0.75)


def test_overload_in_window_blocks_growth() -> None:
    c = Adaptive(4, max=100).controller(0.0)
    assert c.on_end(1.0, 0.5, overloaded=True, saturated=True)  # 4 -> 3, window reset
    assert c.limit == 3
    c.on_end(1.1, 0.0, overloaded=True, saturated=True)  # stale: ignored, but seen
    for i in range(3):
        assert not c.on_end(2.0 + i, 1.5, overloaded=False, saturated=True)
    assert c.limit == 3  # the window saw an overload
    for i in range(3):
        c.on_end(6.0 + i, 5.5, overloaded=False, saturated=True)
    assert c.limit == 4


def test_never_below_min() -> None:
    c = Adaptive(3, min=2, max=10).controller(0.0)
    t = 0.0
    for _ in range(20):
        t += 1.0
        c.on_end(t, t - 0.5, overloaded=True, saturated=True)
    assert c.limit == 2
    assert [lim for _, lim in c.timeline] == [3, 2]
    assert not c.on_end(t + 1, t + 0.5, overloaded=True, saturated=True)  # at min: no change
    one = Adaptive(1, max=5).controller(0.0)
    assert not one.on_end(1.0, 0.5, overloaded=True, saturated=True)
    assert one.limit == 1


def test_controllers_are_independent() -> None:
    a = Adaptive(4, max=10)
    c1, c2 = a.controller(0.0), a.controller(0.0)
    c1.on_end(1.0, 0.5, overloaded=True, saturated=True)
    assert (c1.limit, c2.limit) == (3, 4)
    assert c2.timeline == [(0.0, 4)]


# -- a simulated closed loop ----------------------------------------------------------------


def closed_loop(policy: Adaptive, capacity: int, duration: float, *, seed: int = 1,
                latency: float = 1.0, fail_latency: float = 0.05,
                backlog: float = math.inf) -> tuple[AdaptiveLimit, dict[str, float]]:
    """A service that answers overload (fast) to any call beyond ``capacity`` in flight,
    driven by a discrete-event loop: the stage always has work (saturated) up to ``backlog``
    seconds, then only its own retries."""
    rng = random.Random(seed)
    ctl = policy.controller(0.0)
    heap: list[tuple[float, int, float, bool]] = []
    seq = 0
    in_flight = 0
    now = 0.0
    overloads = ok = 0
    peak = 0

    def fill() -> None:
        nonlocal in_flight, seq, peak
        while in_flight < ctl.limit and now < backlog:
            in_flight += 1
            peak = max(peak, in_flight)
            over = in_flight > capacity
            lat = fail_latency if over else latency * (0.8 + 0.4 * rng.random())
            seq += 1
            heapq.heappush(heap, (now + lat, seq, now, over))

    fill()
    while heap and now < duration:
        end, _, start, over = heapq.heappop(heap)
        now = end
        in_flight -= 1
        if now >= duration / 2:  # counted once converged
            if over:
                overloads += 1
            else:
                ok += 1
        saturated = now < backlog
        ctl.on_end(now, start, over, saturated)
        assert policy.min <= ctl.limit <= policy.max
        fill()
    return ctl, {"overloads": overloads, "ok": ok, "peak": peak, "end": now}


def time_average(timeline: list[tuple[float, int]], t0: float, t1: float) -> float:
    total = 0.0
    for (t, lim), (t_next, _) in zip(timeline, [*timeline[1:], (math.inf, 0)], strict=True):
        a, b = max(t, t0), min(t_next, t1)
        if b > a:
            total += lim * (b - a)
    return total / (t1 - t0)


@pytest.mark.parametrize("initial", [4, 200])
@pytest.mark.parametrize("capacity", [20, 60])
def test_converges_near_capacity(initial: int, capacity: int) -> None:
    policy = Adaptive(initial, min=1, max=250)
    ctl, stats = closed_loop(policy, capacity, duration=400.0)
    late = [lim for t, lim in ctl.timeline if t >= 200.0]
    avg = time_average(ctl.timeline, 200.0, 400.0)
    assert 0.7 * capacity <= avg <= 1.1 * capacity, (avg, ctl.timeline[-20:])
    assert late and max(late) <= capacity + 2
    assert min(late) >= math.floor(0.75 * capacity) - 2
    # the overloads are a small share of the calls once converged (AIMD probes: one round of
    # overloads per cycle)
    assert stats["overloads"] < 0.05 * stats["ok"], stats
    # the timeline is a record of every change, starting at (0, initial)
    assert ctl.timeline[0] == (0.0, initial)
    assert all(a[0] <= b[0] and a[1] != b[1]
               for a, b in itertools.pairwise(ctl.timeline))
    assert ctl.timeline[-1][1] == ctl.limit


def test_from_above_cuts_once_per_round_trip() -> None:
    # initial 200, capacity 20: each cut needs a call sent under the new limit to fail, so the
    # limit steps down 200 -> 150 -> 112 -> ... rather than collapsing on the first burst
    ctl, _ = closed_loop(Adaptive(200, max=250), 20, duration=5.0)
    limits = [lim for _, lim in ctl.timeline]
    cuts = [b for a, b in itertools.pairwise(limits) if b < a]
    assert cuts[:4] == [150, 112, 84, 63]
    assert min(limits) >= 14


def test_max_binds_when_the_service_is_large() -> None:
    ctl, stats = closed_loop(Adaptive(4, max=30), 1000, duration=200.0)
    assert ctl.limit == 30
    assert stats["overloads"] == 0
    assert stats["peak"] == 30


def test_idle_stage_keeps_its_limit() -> None:
    # the work runs out at t=20: no more saturated completions, so no more growth
    ctl, _ = closed_loop(Adaptive(4, max=250), 60, duration=200.0, backlog=20.0)
    assert ctl.timeline[-1][0] <= 22.0
