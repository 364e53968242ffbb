"""simulators.Provider: capacity slowdown, per-minute buckets, token usage, live and virtual."""

from __future__ import annotations

import pickle
import statistics
from typing import Any

import pytest
from test_sim_service import FakeClock, engine_call

from engine import CallInfo, Pipeline, RetryPolicy, Simulated, Stage
from simulators import Provider, ProviderResult, RateLimitError, Usage

LAT = {"dist": "lognormal", "median": 1.0, "p99": 3.0}
TOKENS = {"dist": "lognormal", "median": 1500, "p99": 4800}
HAS_COST = "cost" in Simulated._fields

pytestmark = pytest.mark.timeout(60)


def call(index: int, attempt: int = 1, hedge: bool = False) -> CallInfo:
    info: CallInfo = tuple.__new__(CallInfo, (index, index, "analyze", 0, attempt, hedge))
    return info


def test_deterministic_per_seed() -> None:
    a, b = (Provider("analyze", LAT, 4, {"requests": 600}, TOKENS, seed=3) for _ in range(2))
    c = Provider("analyze", LAT, 4, {"requests": 600}, TOKENS, seed=4)
    sims_a = [a.simulate(call(i), i, now=i * 0.5) for i in range(200)]
    sims_b = [b.simulate(call(i), i, now=i * 0.5) for i in range(200)]
    assert [(s.duration, s.value) for s in sims_a] == [(s.duration, s.value) for s in sims_b]
    assert [a.usage_of(i) for i in range(200)] != [c.usage_of(i) for i in range(200)]
    assert [a.latency_of(i) for i in range(200)] != [c.latency_of(i) for i in range(200)]


def test_usage_is_per_item_and_returned_with_the_value() -> None:
    p = Provider("analyze", LAT, tokens=TOKENS, seed=1)
    for i in range(300):
        u = p.usage_of(i)
        assert isinstance(u, Usage) and u.prompt_tokens + u.completion_tokens == u.total_tokens
        assert 0.09 * u.total_tokens <= u.completion_tokens <= 0.41 * u.total_tokens + 1
        for attempt, hedge in ((1, False), (2, False), (1, True)):
            sim = p.simulate(call(i, attempt, hedge), f"v{i}", now=0.0)
            assert sim.error is None and isinstance(sim.value, ProviderResult)
            assert sim.value.value == f"v{i}" and sim.value.usage == u
            assert sim.duration == p.latency_of(i, attempt, hedge=hedge)
            if HAS_COST:
                assert sim[3] == {"tokens": u.total_tokens, "requests": 1}
    totals = sorted(p.usage_of(i).total_tokens for i in range(2000))
    assert statistics.median(totals) == pytest.approx(1500, rel=0.1)
    assert Provider("x", 1.0).usage_of(5) == Usage(0, 0, 0)  # no tokens spec: no tokens


def test_capacity_slows_calls_beyond_it() -> None:
    p = Provider("analyze", 1.0, capacity=2)
    durations = [p.simulate(call(i), i, now=0.0).duration for i in range(5)]
    assert durations == [1.0, 1.0, 1.5, 2.0, 2.5]  # latency * in_flight / capacity
    # at t=1 the first two have ended; three are in flight, so this one is the fourth
    assert p.simulate(call(5), 5, now=1.0).duration == 2.0
    # a call ending exactly at now (2.5) is not in flight any more: only item 5's (3.0) is
    assert p.simulate(call(6), 6, now=2.5).duration == 1.0
    assert p.simulate(call(7), 7, now=2.5).duration == 1.5
    # without now, no clock: the base latency
    assert p.simulate(call(8), 8).duration == 1.0


def test_requests_bucket_refuses_a_burst_with_retry_after() -> None:
    p = Provider("analyze", 0.5, per_minute={"requests": 60}, reject_latency=0.02)
    sims = [p.simulate(call(i), i, now=0.0) for i in range(70)]
    assert all(s.error is None for s in sims[:60])  # one minute's worth at once
    assert sims[59].value.remaining == {"requests": 0.0}
    assert sims[59].value.reset == {"requests": pytest.approx(60.0)}
    for s in sims[60:]:
        err = s.error
        assert isinstance(err, RateLimitError) and s.duration == 0.02 and s.value is None
        assert err.retry_after == pytest.approx(1.0)  # 1 request per second refills
        assert err.remaining == {"requests": 0.0} and err.reset == {"requests": pytest.approx(60)}
        if HAS_COST:
            assert s[3] == {"tokens": 0, "requests": 0}
    later = p.simulate(call(60, 2), 60, now=0.5).error
    assert isinstance(later, RateLimitError) and later.retry_after == pytest.approx(0.5)
    assert p.simulate(call(60, 3), 60, now=1.0).error is None
    assert p.simulate(call(61, 2), 61, now=1.0).error is not None  # that token is taken
    # time going back: a new run, full buckets
    assert p.simulate(call(0), 0, now=0.0).error is None


def test_tokens_bucket_and_refusals_take_nothing() -> None:
    p = Provider("analyze", 0.1, per_minute={"requests": 100, "tokens": 10_000}, tokens=1000)
    sims = [p.simulate(call(i), i, now=0.0) for i in range(11)]
    assert [s.error is None for s in sims] == [True] * 10 + [False]
    err = sims[10].error
    assert isinstance(err, RateLimitError)
    assert err.retry_after == pytest.approx(6.0)  # 1000 tokens at 10000/60 per second
    # the refused call took no request: 90 remain, as after the tenth call
    assert err.remaining == {"requests": 90.0, "tokens": 0.0}
    assert sims[9].value.remaining == {"requests": 90.0, "tokens": 0.0}
    assert err.reset["tokens"] == pytest.approx(60.0) and err.reset["requests"] == pytest.approx(6)
    ok = p.simulate(call(10, 2), 10, now=6.0)
    assert ok.error is None and ok.value.remaining["tokens"] == 0.0


def test_a_call_larger_than_a_bucket_never_fits() -> None:
    p = Provider("analyze", 0.1, per_minute={"tokens": 500}, tokens=1000)
    err = p.simulate(call(0), 0, now=0.0).error
    assert isinstance(err, RateLimitError) and "exceeds the limit" in str(err)
    assert err.retry_after > 0
    assert p.simulate(call(0, 2), 0, now=1000.0).error is not None


def test_live_limits_are_in_real_seconds_and_charged() -> None:
    clock = FakeClock()
    # sleeping does not move this clock: only the test does
    p = Provider("analyze", 1.0, per_minute={"requests": 2}, tokens=100, time_scale=0.1,
                 sleep=clock.slept.append, clock=clock, reject_latency=0.0)
    with engine_call(0, stage="analyze") as rec:
        res = p(0)
    assert res.value == 0 and res.usage.total_tokens == 100 and clock.slept == [0.1]
    assert res.remaining == {"requests": 1.0} and res.reset == {"requests": pytest.approx(3.0)}
    if getattr(rec, "charged", False) is not False:  # an engine whose calls can be charged
        assert rec.charged == {"tokens": 100.0, "requests": 1.0}
    p(1)
    with pytest.raises(RateLimitError) as info:
        p(2)
    # 1 request per 30 scenario seconds = 3 real seconds
    assert info.value.retry_after == pytest.approx(3.0)
    assert info.value.reset == {"requests": pytest.approx(6.0)}
    clock.t += 3.0
    assert p(3).value == 3


def test_estimate_is_noisy_and_deterministic_per_item() -> None:
    p = Provider("analyze", 1.0, tokens=TOKENS, seed=2)
    ratios = []
    for i in range(500):
        est = p.estimate(f"contact {i}", call(i))
        assert est == p.estimate(i) == p.estimate(None, call(i))
        total = p.usage_of(i).total_tokens
        assert 0.79 * total - 1 <= est <= 1.21 * total + 1
        ratios.append(est / total)
    assert min(ratios) < 0.9 and max(ratios) > 1.1  # noisy, not the truth
    with engine_call(7, stage="analyze"):
        assert p.estimate({"id": "x"}) == p.estimate(7)
    with pytest.raises(TypeError, match="estimate"):
        p.estimate({"id": "x"})


def test_pickle_round_trip() -> None:
    p = Provider("analyze", LAT, 8, {"requests": 60, "tokens": 9000}, TOKENS, seed=5,
                 time_scale=0.5, correlation=0.3)
    q = pickle.loads(pickle.dumps(p))
    assert (q.capacity, q.per_minute, q.seed, q.time_scale, q.correlation) == (
        8, {"requests": 60.0, "tokens": 9000.0}, 5, 0.5, 0.3)
    assert [q.usage_of(i) for i in range(50)] == [p.usage_of(i) for i in range(50)]
    assert [q.latency_of(i, 2) for i in range(50)] == [p.latency_of(i, 2) for i in range(50)]


@pytest.mark.parametrize(
    ("kwargs", "exc", "pattern"),
    [
        ({"name": 3}, TypeError, r"^name:"),
        ({"name": ""}, ValueError, r"^name:"),
        ({"capacity": 2.5}, TypeError, r"^capacity:"),
        ({"capacity": True}, TypeError, r"^capacity:"),
        ({"capacity": 0}, ValueError, r"^capacity:"),
        ({"per_minute": [5000]}, TypeError, r"^per_minute:"),
        ({"per_minute": {"calls": 5}}, ValueError, r"^per_minute\.calls: unexpected key"),
        ({"per_minute": {"requests": "5"}}, TypeError, r"^per_minute\.requests:"),
        ({"per_minute": {"tokens": 0}}, ValueError, r"^per_minute\.tokens:"),
        ({"per_minute": {"tokens": float("inf")}}, ValueError, r"^per_minute\.tokens:"),
        ({"tokens": "many"}, TypeError, r"^tokens:"),
        ({"tokens": {"dist": "lognormal", "median": 10, "p99": 5}}, ValueError, r"^tokens\.p99"),
        ({"latency": {"dist": "nope"}}, ValueError, r"^latency"),
        ({"seed": 1.5}, TypeError, r"^seed:"),
        ({"seed": -1}, ValueError, r"^seed:"),
        ({"time_scale": "1"}, TypeError, r"^time_scale:"),
        ({"time_scale": -1}, ValueError, r"^time_scale:"),
        ({"time_scale": 0, "per_minute": {"requests": 5}}, ValueError, r"^time_scale: must be"),
        ({"correlation": 2}, ValueError, r"^correlation:"),
        ({"reject_latency": -0.1}, ValueError, r"^reject_latency:"),
    ],
)
def test_arguments_are_validated(kwargs: dict[str, Any], exc: type[Exception],
                                 pattern: str) -> None:
    args: dict[str, Any] = {"name": "analyze", "latency": 1.0, **kwargs}
    with pytest.raises(exc, match=pattern):
        Provider(**args)


# ---------------------------------------------------------------------- through the engine
TS = 0.02  # live: 1 scenario second = 20 ms


def durations(doc: dict[str, Any]) -> list[list[float]]:
    return [[c[1] - c[0] for c in item["stages"][0]["calls"]] for item in doc["items"]]


def run_both(provider: Any, items: int, concurrency: int) -> tuple[Any, Any, Any, Any]:
    def pipeline(time_scale: float) -> Pipeline:
        kwargs = {k: getattr(provider, k) for k in
                  ("capacity", "per_minute", "tokens", "seed", "correlation")}
        p = Provider("analyze", provider.latency, time_scale=time_scale, **kwargs)
        return Pipeline([Stage("analyze", p, concurrency)])

    v = pipeline(1.0).run(range(items), clock="virtual")
    lv = pipeline(TS).run(range(items), clock="live")
    return v, lv, v.to_json(), lv.to_json(time_scale=TS)


@pytest.mark.timeout(60)
def test_live_and_virtual_agree_through_the_engine() -> None:
    provider = Provider("analyze", LAT, capacity=8, tokens=TOKENS, seed=4)
    v, lv, dv, dl = run_both(provider, 40, 4)
    assert [r.status for r in lv.items] == [r.status for r in v.items] == ["ok"] * 40
    assert [r.value for r in lv.items] == [r.value for r in v.items]  # value and usage
    assert [r.value.usage for r in v.items] == [provider.usage_of(i) for i in range(40)]
    overshoot = [(lvd - vd) * TS for a, b in zip(durations(dv), durations(dl), strict=True)
                 for vd, lvd in zip(a, b, strict=True)]
    assert min(overshoot) >= -1e-4  # a live call sleeps its duration, never less
    assert statistics.median(overshoot) < 0.01


@pytest.mark.timeout(60)
def test_capacity_slowdown_live_and_virtual() -> None:
    provider = Provider("analyze", 5.0, capacity=2)
    _, _, dv, dl = run_both(provider, 6, 6)
    virtual = sorted(d[0] for d in durations(dv))
    assert virtual == [5.0, 5.0, 7.5, 10.0, 12.5, 15.0]
    live = sorted(d[0] for d in durations(dl))  # which item started third is a thread race
    for lvd, vd in zip(live, virtual, strict=True):
        assert lvd >= vd - 1e-3 / TS and lvd - vd < 0.5 / TS  # slept at least, generous slack


@pytest.mark.timeout(60)
def test_a_virtual_burst_is_refused_and_retried_after() -> None:
    provider = Provider("analyze", 0.5, per_minute={"requests": 30}, tokens=100, seed=1)
    # retry_after (at most 2 s here) is honoured up to max_backoff
    retry = RetryPolicy(attempts=20, backoff=0.01, max_backoff=5.0, jitter=False)
    report = Pipeline([Stage("analyze", provider, 10, retry=retry)]).run(
        range(40), clock="virtual")
    assert all(r.status == "ok" for r in report.items)
    doc = report.to_json()
    calls = [c for it in doc["items"] for c in it["stages"][0]["calls"]]
    ok_starts = sorted(c[0] for it in doc["items"] for c in it["stages"][0]["calls"][-1:])
    assert len(calls) > 40  # refusals, retried
    # never more than the bucket allows: 30 at once, then one per 2 s
    for k, t in enumerate(ok_starts):
        assert k + 1 <= 30 + t / 2.0 + 1e-6
