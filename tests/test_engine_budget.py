"""Budget: a token bucket per dimension, shared by stages and runs, never blocking."""
from __future__ import annotations

import math
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine._budget import Budget, parse_duration

pytestmark = pytest.mark.timeout(60)

EPS = 1e-6


def openai() -> Budget:
    return Budget("openai", per_minute={"requests": 600, "tokens": 60_000})


# -- construction and validation ------------------------------------------------------------


def test_defaults_and_describe() -> None:
    b = openai()
    assert b.name == "openai"
    assert b.per_minute == {"requests": 600, "tokens": 60_000}
    assert b.burst == {"requests": 10.0, "tokens": 1000.0}
    assert b.describe() == {"name": "openai", "per_minute": {"requests": 600, "tokens": 60_000},
                            "burst": {"requests": 10.0, "tokens": 1000.0}}
    assert repr(b).startswith("Budget('openai', per_minute={'requests': 600")
    b.per_minute["requests"] = 1  # a copy
    assert b.per_minute["requests"] == 600
    assert b.paused_until == -math.inf
    part = Budget("x", {"requests": 60, "tokens": 600}, burst={"tokens": 50})
    assert part.burst == {"requests": 1.0, "tokens": 50}


@pytest.mark.parametrize(("kwargs", "exc", "message"), [
    ({"name": 3, "per_minute": {"r": 1}}, TypeError, "Budget.name: expected a non-empty str"),
    ({"name": "", "per_minute": {"r": 1}}, ValueError, "Budget.name"),
    ({"name": "a", "per_minute": [("r", 1)]}, TypeError, "Budget.per_minute: expected a mapping"),
    ({"name": "a", "per_minute": {}}, ValueError, "Budget.per_minute: expected at least one"),
    ({"name": "a", "per_minute": {1: 5}}, TypeError, "Budget.per_minute: expected str"),
    ({"name": "a", "per_minute": {"tokens": -1}}, ValueError,
     "Budget.per_minute['tokens']: expected a number > 0, got -1"),
    ({"name": "a", "per_minute": {"tokens": math.nan}}, ValueError, "Budget.per_minute['tokens']"),
    ({"name": "a", "per_minute": {"tokens": math.inf}}, ValueError, "Budget.per_minute['tokens']"),
    ({"name": "a", "per_minute": {"tokens": "5"}}, TypeError, "Budget.per_minute['tokens']"),
    ({"name": "a", "per_minute": {"tokens": True}}, TypeError, "Budget.per_minute['tokens']"),
    ({"name": "a", "per_minute": {"tokens": 5}, "burst": {"tokens": 0}}, ValueError,
     "Budget.burst['tokens']: expected a number > 0, got 0"),
    ({"name": "a", "per_minute": {"tokens": 5}, "burst": {"requests": 1}}, ValueError,
     "Budget.burst['requests']: expected a dimension of per_minute"),
    ({"name": "a", "per_minute": {"tokens": 5}, "burst": 3}, TypeError, "Budget.burst"),
])
def test_validation(kwargs: dict, exc: type[Exception], message: str) -> None:
    with pytest.raises(exc) as info:
        Budget(**kwargs)
    assert message in str(info.value)


def test_cost_validation_takes_nothing() -> None:
    b = openai()
    with pytest.raises(ValueError, match=r"Budget.reserve: cost\['tokens'\]: expected a number"):
        b.reserve({"tokens": -5}, 0.0)
    with pytest.raises(ValueError, match="cost"):
        b.reserve({"tokens": math.nan}, 0.0)
    with pytest.raises(TypeError, match=r"cost\['tokens'\]"):
        b.reserve({"tokens": "5"}, 0.0)
    with pytest.raises(TypeError, match=r"Budget\.reserve: cost: expected a mapping"):
        b.reserve(5, 0.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"Budget.settle: actual\['tokens'\]"):
        b.settle({"tokens": 5}, {"tokens": -1}, 0.0)
    with pytest.raises(TypeError, match=r"Budget\.pause"):
        b.pause("soon")  # type: ignore[arg-type]
    assert b.available(0.0) == {"requests": 10.0, "tokens": 1000.0}


# -- reserve / settle -----------------------------------------------------------------------


def test_reserve_takes_or_waits() -> None:
    b = openai()  # 10 requests/s, 1000 tokens/s, bursts 10 and 1000
    assert b.reserve({"tokens": 600}, 0.0) == 0.0
    assert b.available(0.0) == pytest.approx({"requests": 9.0, "tokens": 400.0})
    wait = b.reserve({"tokens": 600}, 0.0)
    assert wait == pytest.approx(0.2)  # 200 tokens short at 1000/s
    assert b.available(0.0) == pytest.approx({"requests": 9.0, "tokens": 400.0})  # took nothing
    assert b.reserve({"tokens": 600}, 0.1) == pytest.approx(0.1)
    assert b.reserve({"tokens": 600}, wait) == 0.0  # exactly at the promised time
    assert b.reserve({"unknown": 1e12}, 10.0) == 0.0  # unknown dimensions are ignored


def test_requests_count_one_per_call_unless_given() -> None:
    b = Budget("r", {"requests": 60})  # 1/s, burst 1
    assert b.reserve({}, 0.0) == 0.0
    assert b.reserve({}, 0.0) == pytest.approx(1.0)
    assert b.reserve({"requests": 0}, 0.0) == 0.0  # an explicit value wins
    only_tokens = Budget("t", {"tokens": 60})
    assert only_tokens.reserve({}, 0.0) == 0.0  # no requests dimension: nothing to take
    assert only_tokens.available(0.0) == {"tokens": 1.0}


def test_oversize_cost_goes_through_when_full_and_leaves_debt() -> None:
    b = Budget("t", {"tokens": 600})  # 10/s, burst 10
    assert b.reserve({"tokens": 5}, 0.0) == 0.0
    assert b.reserve({"tokens": 25}, 0.0) == pytest.approx(0.5)  # waits for a full bucket
    assert b.reserve({"tokens": 25}, 0.5) == 0.0
    assert b.available(0.5) == pytest.approx({"tokens": -15.0})
    assert b.reserve({"tokens": 1}, 0.5) == pytest.approx(1.6)  # the debt is repaid first


def test_settle_refunds_and_charges() -> None:
    b = Budget("t", {"tokens": 600})
    assert b.reserve({"tokens": 8}, 0.0) == 0.0
    b.settle({"tokens": 8}, {"tokens": 3}, 0.0)
    assert b.available(0.0) == pytest.approx({"tokens": 7.0})
    assert b.reserve({"tokens": 7}, 0.0) == 0.0
    b.settle({"tokens": 7}, {"tokens": 27}, 0.0)  # charged 20 more: debt
    assert b.available(0.0) == pytest.approx({"tokens": -20.0})
    assert b.reserve({"tokens": 1}, 0.0) == pytest.approx(2.1)
    b.settle({"tokens": 1}, {}, 0.0)  # missing from actual: the estimate stands
    assert b.available(0.0) == pytest.approx({"tokens": -20.0})
    b2 = Budget("t", {"tokens": 600})
    b2.reserve({"tokens": 2}, 0.0)
    b2.settle({"tokens": 2}, {"tokens": 0}, 5.0)  # a refund never overfills
    assert b2.available(5.0) == {"tokens": 10.0}
    r = Budget("r", {"requests": 60, "tokens": 60})
    r.reserve({"tokens": 1}, 0.0)
    r.settle({"tokens": 1}, {"tokens": 1}, 0.0)  # requests: 1 reserved, 1 kept
    assert r.available(0.0) == pytest.approx({"requests": 0.0, "tokens": 0.0})


def test_late_refund_is_credited_when_the_call_ends() -> None:
    # Documented behaviour: a refund is credited when the call ends, capped at the burst, even
    # if the bucket refilled meanwhile; the ledger bound (estimates at start, corrections at
    # end) holds, a count of actual costs at reservation times can exceed it.
    b = Budget("t", {"tokens": 60})  # 1/s, burst 1
    assert b.reserve({"tokens": 1}, 0.0) == 0.0  # actual 0, known at t=10
    assert b.reserve({"tokens": 1}, 10.0) == 0.0
    b.settle({"tokens": 1}, {"tokens": 0}, 10.0)
    assert b.available(10.0) == {"tokens": 1.0}


def test_clock_going_back_refills_nothing() -> None:
    b = Budget("t", {"tokens": 600})
    assert b.reserve({"tokens": 10}, 5.0) == 0.0
    assert b.reserve({"tokens": 10}, 4.0) == pytest.approx(1.0)  # read as t = 5
    assert b.reserve({"tokens": 10}, 6.0) == 0.0


def test_waits_are_never_too_small_to_add() -> None:
    b = Budget("t", {"tokens": 6e9}, burst={"tokens": 1.0})
    now = 1e6
    assert b.reserve({"tokens": 1.0}, now) == 0.0
    wait = b.reserve({"tokens": 1.0}, now)
    assert now + wait > now
    assert b.reserve({"tokens": 1.0}, now + wait) == 0.0


# -- pause ----------------------------------------------------------------------------------


def test_pause_extends_never_shortens() -> None:
    b = openai()
    b.pause(5.0)
    assert b.paused_until == 5.0
    b.pause(3.0)
    assert b.paused_until == 5.0
    assert b.reserve({"tokens": 1}, 1.0) == pytest.approx(4.0)
    b.pause(8.0)
    assert b.reserve({"tokens": 1}, 1.0) == pytest.approx(7.0)
    assert b.reserve({"tokens": 1}, 8.0) == 0.0


def test_pause_and_empty_bucket_wait_for_both() -> None:
    b = Budget("t", {"tokens": 60})  # 1/s
    assert b.reserve({"tokens": 1}, 0.0) == 0.0
    b.pause(0.5)
    assert b.reserve({"tokens": 1}, 0.0) == pytest.approx(1.0)


# -- update ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "seconds"), [
    ("6m0s", 360.0), ("1s", 1.0), ("12ms", 0.012), ("1h2m3.5s", 3723.5), ("0.5s", 0.5),
    (".5s", 0.5), ("2", 2.0), ("1.5", 1.5), (3, 3.0), (0.25, 0.25), ("0s", 0.0),
    ("10us", 1e-5), ("7ns", 7e-9), (" 1s ", 1.0),
    ("", None), ("s", None), ("1x", None), ("-1s", None), ("1m-2s", None), (-1, None),
    ("nan", None), (math.nan, None), (math.inf, None), ("inf", None), (None, None),
    (True, None), ([1], None), ("1s2", None), ("1 s", None),
])
def test_parse_duration(text: object, seconds: float | None) -> None:
    got = parse_duration(text)
    if seconds is None:
        assert got is None
    else:
        assert got == pytest.approx(seconds)


def test_update_lowers_to_remaining_never_raises() -> None:
    b = openai()
    b.update(remaining={"tokens": "400", "requests": 12}, now=0.0)
    assert b.available(0.0) == pytest.approx({"requests": 10.0, "tokens": 400.0})
    for junk in ({"tokens": -1}, {"tokens": "lots"}, {"tokens": math.nan}, {"tokens": None},
                 {"tokens": True}, {"other": 0}, {"tokens": math.inf}):
        b.update(remaining=junk, reset_s={"tokens": "garbage"}, now=0.0)
    b.update(remaining=None, reset_s=None, now=0.0)
    b.update(remaining=[1, 2], now=0.0)  # type: ignore[arg-type]
    b.update(remaining={"tokens": 1}, now=math.nan)
    assert b.available(0.0) == pytest.approx({"requests": 10.0, "tokens": 400.0})
    b.update(remaining={"tokens": 0})  # now defaults to the latest time seen
    assert b.reserve({"tokens": 100}, 0.0) == pytest.approx(0.1)


def test_update_reset_matching_the_rate_is_an_ordinary_empty_bucket() -> None:
    b = openai()  # 60k tokens/min: empty to full takes 60 s at 1000/s
    b.update(remaining={"tokens": 0}, reset_s={"tokens": "1m0s"}, now=0.0)
    assert b.available(0.0) == pytest.approx({"requests": 10.0, "tokens": 0.0})
    b.update(remaining={"tokens": 0}, reset_s={"tokens": "6m0s"}, now=0.0)  # 6x slower
    # full (1000) when the provider holds 1000 = in 6 s: 1000 - 1000 * 6 = -5000
    assert b.available(0.0)["tokens"] == pytest.approx(-5000.0)
    assert b.reserve({"tokens": 1000}, 0.0) == pytest.approx(6.0)
    b.update(remaining={"tokens": 0}, reset_s={"tokens": -3}, now=0.0)  # ignored reset
    assert b.available(0.0)["tokens"] == pytest.approx(-5000.0)


# -- fresh ----------------------------------------------------------------------------------


def test_fresh_is_independent() -> None:
    b = Budget("t", {"tokens": 600, "requests": 60}, burst={"tokens": 20})
    b.reserve({"tokens": 20}, 0.0)
    b.pause(100.0)
    f = b.fresh()
    assert f is not b
    assert f.describe() == b.describe()
    assert f.paused_until == -math.inf
    assert f.reserve({"tokens": 20}, 0.0) == 0.0
    assert b.reserve({"tokens": 1}, 0.0) == pytest.approx(100.0)
    assert b.available(0.0) == pytest.approx({"tokens": 0.0, "requests": 0.0})


# -- properties -----------------------------------------------------------------------------


@st.composite
def budgets(draw: st.DrawFn) -> Budget:
    dims = draw(st.lists(st.sampled_from(["requests", "tokens", "images"]), min_size=1,
                         max_size=3, unique=True))
    per_minute = {d: draw(st.floats(1.0, 1e6)) for d in dims}
    burst = {d: draw(st.floats(1.0, 1e4)) for d in dims if draw(st.booleans())}
    return Budget("b", per_minute, burst or None)


# an op: (dt, kind, cost fractions of burst, actual/estimate factor, which pending to settle)
ops = st.lists(st.tuples(st.floats(0.0, 2.0), st.sampled_from(["reserve", "settle", "both"]),
                         st.floats(0.0, 1.0), st.floats(0.0, 2.0), st.integers(0, 50)),
               max_size=80)


def _run(b: Budget, seq: list, overrun: bool) -> tuple[list, list, float]:
    """Drive ``b``; return the ledger [(time, dim, amount, is_grant)], the calls, the end."""
    dims = list(b.per_minute)
    burst = b.burst
    now = 0.0
    pending: list[dict] = []
    ledger: list[tuple[float, str, float, bool]] = []
    calls: list[dict] = []
    for dt, kind, frac, factor, pick in seq:
        now += dt
        if kind in ("reserve", "both"):
            cost = {d: frac * burst[d] for d in dims}
            if b.reserve(cost, now) == 0.0:
                call = {"at": now, "est": cost, "act": None}
                calls.append(call)
                pending.append(call)
                for d in dims:
                    ledger.append((now, d, cost[d], True))
        if kind in ("settle", "both") and pending:
            call = pending.pop(pick % len(pending))
            f = factor if overrun else min(factor, 1.0)
            actual = {d: v * f for d, v in call["est"].items()}
            b.settle(call["est"], actual, now)
            call["act"] = actual
            for d in dims:
                ledger.append((now, d, actual[d] - call["est"][d], False))
    return ledger, calls, now


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(budgets(), ops, st.booleans())
def test_ledger_never_exceeds_rate_plus_burst(b: Budget, seq: list, overrun: bool) -> None:
    # The bucket's own accounting (estimates charged at reservation, the correction +/- at
    # settlement): over any window ending at a granted reservation, the net charge is at most
    # rate * w + burst. Overruns (actual > estimate) are charged when the call ends: they delay
    # later reservations instead of breaking the bound.
    ledger, _, _ = _run(b, seq, overrun)
    rate = {d: v / 60.0 for d, v in b.per_minute.items()}
    burst = b.burst
    for j, (tj, dj, _, grant) in enumerate(ledger):
        if not grant:
            continue
        total = 0.0
        for i in range(j, -1, -1):
            ti, di, amount, _ = ledger[i]
            if di != dj:
                continue
            total += amount
            assert total <= rate[dj] * (tj - ti) + burst[dj] * (1 + EPS) + EPS


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(budgets(), ops, st.booleans())
def test_actual_spend_long_run_within_bound(b: Budget, seq: list, overrun: bool) -> None:
    # With actual costs (the estimate for calls not settled yet), everything spent since the
    # budget was full fits rate * T + burst by the time the next call may start: debt from
    # overruns is repaid before it can (and refunds only return what was taken).
    _, calls, end = _run(b, seq, overrun)
    zero = dict.fromkeys(b.per_minute, 0.0)
    for _ in range(1000):
        wait = b.reserve(zero, end)
        if wait == 0.0:
            break
        end += wait
    else:
        raise AssertionError("the debt is never repaid")
    rate = {d: v / 60.0 for d, v in b.per_minute.items()}
    for d, r in rate.items():
        spent = sum((c["act"] or c["est"])[d] for c in calls)
        assert spent <= r * end + b.burst[d] * (1 + EPS) + EPS


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(budgets(), st.lists(st.tuples(st.floats(0.0, 2.0), st.floats(0.0, 1.0)), max_size=80))
def test_exact_costs_any_window(b: Budget, seq: list) -> None:
    # Actual == estimate: the classic token bucket bound over ANY window of reservations.
    dims = list(b.per_minute)
    rate = {d: v / 60.0 for d, v in b.per_minute.items()}
    burst = b.burst
    now = 0.0
    grants: list[tuple[float, dict[str, float]]] = []
    for dt, frac in seq:
        now += dt
        cost = {d: frac * burst[d] for d in dims}
        if b.reserve(cost, now) == 0.0:
            b.settle(cost, cost, now)
            grants.append((now, cost))
    for j in range(len(grants)):
        total = dict.fromkeys(dims, 0.0)
        for i in range(j, len(grants)):
            for d in dims:
                total[d] += grants[i][1][d]
                w = grants[i][0] - grants[j][0]
                assert total[d] <= rate[d] * w + burst[d] * (1 + EPS) + EPS


@settings(max_examples=100, deadline=None)
@given(budgets(), st.floats(0.0, 1000.0), st.lists(st.tuples(st.floats(0.0, 5.0),
                                                             st.floats(0.0, 1.0)), max_size=40))
def test_never_grants_while_paused(b: Budget, until: float, seq: list) -> None:
    b.pause(until)
    now = 0.0
    for dt, frac in seq:
        now += dt
        wait = b.reserve({d: frac * v for d, v in b.burst.items()}, now)
        if now < until:
            assert wait >= until - now > 0
        else:
            assert wait >= 0.0


@settings(max_examples=60, deadline=None)
@given(budgets(), st.lists(st.tuples(st.floats(0.0, 2.0), st.floats(0.0, 1.0)), max_size=30))
def test_fresh_budgets_do_not_share_state(b: Budget, seq: list) -> None:
    f = b.fresh()
    before = f.available(0.0)
    now = 0.0
    for dt, frac in seq:
        now += dt
        b.reserve({d: frac * v for d, v in b.burst.items()}, now)
        b.pause(now + 10)
    assert f.available(0.0) == before
    assert f.paused_until == -math.inf
    assert f.describe() == b.describe()


@pytest.mark.timeout(60)
def test_threads_never_over_grant() -> None:
    b = Budget("t", {"requests": 6000, "tokens": 60_000}, burst={"requests": 1000,
                                                                 "tokens": 1000})
    granted: list[int] = []
    start = threading.Barrier(4)

    def hammer() -> None:
        start.wait()
        n = 0
        for _ in range(20_000):
            if b.reserve({"tokens": 7}, 0.0) == 0.0:  # the clock stands still: no refill
                n += 1
        granted.append(n)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(granted) == 1000 // 7  # tokens bind first (requests allow 1000)
    assert b.available(0.0)["tokens"] == pytest.approx(1000 - 7 * (1000 // 7))
