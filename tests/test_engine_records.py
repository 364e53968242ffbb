"""Records: one format. The scheduler builds an item's StageSpan when it leaves a stage and its
ItemResult when it becomes visible; they compare, hash, pickle and serialise as frozen records,
and the one serializer writes DESIGN §6/§6.1 from them."""
from __future__ import annotations

import copy
import pickle
from dataclasses import FrozenInstanceError

import pytest

from engine import (
    Attempt,
    ErrorInfo,
    ItemResult,
    Pipeline,
    RetryPolicy,
    Stage,
    StageSpan,
)

pytestmark = pytest.mark.timeout(60)


class TransientError(Exception):
    pass


def flaky_second_stage(fails: int):
    seen: dict[int, int] = {}

    def fn(x: int) -> int:
        seen[x] = seen.get(x, 0) + 1
        if x % 2 == 0 and seen[x] <= fails:
            raise TransientError(f"try {seen[x]}")
        return x

    return fn


def run_report():
    stages = [
        Stage("a", lambda x: x + 0, 2),
        Stage("b", flaky_second_stage(1), 2, retry=RetryPolicy(attempts=3, backoff=0)),
        Stage("c", lambda x: 1 // (x - 3), 1),  # item 3 fails here, for good
    ]
    return Pipeline(stages).run(range(6))


def eager_copy(r: ItemResult) -> ItemResult:
    return ItemResult(r.index, r.key, r.status, r.value, r.error, r.stages, r.visible_at)


def test_stages_match_the_calls() -> None:
    report = run_report()
    for r in report.items:
        names = [sp.name for sp in r.stages]
        assert names == ["a", "b", "c"]
        for sp in r.stages:
            assert isinstance(sp, StageSpan)
            assert all(isinstance(a, Attempt) for a in sp.attempts)
            assert sp.start == sp.attempts[0].start and sp.end == sp.attempts[-1].end
            assert all(a.start <= a.end for a in sp.attempts)
        retried = r.stages[1].attempts
        assert len(retried) == (2 if r.index % 2 == 0 else 1)
        if r.index % 2 == 0:
            assert retried[0].error == ErrorInfo("b", "TransientError", "try 1")
    bad = report.items[3]
    assert bad.status == "failed" and bad.error is not None and bad.error.stage == "c"
    assert bad.stages[2].attempts[0].error == bad.error


def test_equal_hash_repr_and_pickle_like_a_frozen_dataclass() -> None:
    report = run_report()
    for r in report.items:
        twin = eager_copy(r)
        assert twin == r and hash(twin) == hash(r)
        assert repr(twin) == repr(r)
        assert repr(r).startswith(f"ItemResult(index={r.index}, key={r.index}, status=")
        assert pickle.loads(pickle.dumps(r)) == r
        assert copy.deepcopy(r) == r
    a, b = report.items[0], report.items[1]
    assert a != b and (a == "x") is False
    match a:
        case ItemResult(index, key, status, value, error, stages, visible_at):
            assert (index, key, status, value, error, len(stages)) == (0, 0, "ok", -1, None, 3)
            assert visible_at == a.visible_at
        case _:
            pytest.fail("ItemResult does not match positionally")


def test_fields_cannot_be_set_or_deleted() -> None:
    r = run_report().items[0]
    for field in ("index", "status", "value", "stages", "visible_at"):
        with pytest.raises(FrozenInstanceError, match=field):
            setattr(r, field, None)
        with pytest.raises(FrozenInstanceError, match=field):
            delattr(r, field)


def test_results_document_lists_every_call_and_the_error_in_full() -> None:
    report = run_report()
    doc = report.to_json()
    item = doc["items"][0]["stages"][1]
    assert item["name"] == "b" and item["attempts"] == 2 and len(item["calls"]) == 2
    assert all(len(c) == 2 for c in item["calls"])  # no extras: plain [start, end]
    bad = doc["items"][3]
    err = bad["error"]
    assert (err["stage"], err["type"]) == ("c", "ZeroDivisionError")
    assert err["exc_type"] == "ZeroDivisionError"
    assert "Traceback" in err["traceback"] and "1 // (x - 3)" in err["traceback"]


def test_error_info_keeps_the_qualified_type_and_a_bounded_traceback() -> None:
    class Deep(Exception):
        pass

    def recurse(n: int) -> None:
        if n == 0:
            raise Deep("x" * 20_000)
        recurse(n - 1)

    try:
        recurse(200)
    except Deep as exc:
        info = ErrorInfo.from_exception("s", exc)
    assert info.type == "Deep"
    assert info.exc_type.endswith("test_error_info_keeps_the_qualified_type_and_a_bounded_"
                                  "traceback.<locals>.Deep")
    assert info.exc_type.startswith("test_engine_records.")
    assert len(info.traceback) <= 8192 + 10 and info.traceback.startswith("...")
    assert info == ErrorInfo("s", "Deep", "x" * 20_000)  # extras take no part in equality


def test_call_extras_are_serialised_per_design_6_1() -> None:
    from engine._records import item_doc

    hedge = Attempt(1.0, 2.0, None, hedge=True)
    lost = Attempt(0.5, 3.0, None, lost=True, cost={"tokens": 12.0, "requests": 1.0})
    r = ItemResult(0, "k", "ok", 1, None,
                   (StageSpan("a", 0.5, 2.0, (lost, hedge)),
                    StageSpan("b", 2.5, 2.5, (), resumed=True)), 3.0)
    doc = item_doc(r, 0.5)
    a, b = doc["stages"]
    assert a["attempts"] == 1  # hedges are not attempts
    assert a["calls"] == [[1.0, 6.0, {"lost": True, "cost": {"tokens": 12.0, "requests": 1.0}}],
                          [2.0, 4.0, {"hedge": True}]]
    assert b == {"name": "b", "start": 5.0, "end": 5.0, "attempts": 0, "calls": [],
                 "resumed": True}


# -- report.bottleneck: the stage that held items back longest (issue 10) ------------------------
class Fixed:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __call__(self, x):
        import time

        time.sleep(self.seconds)
        return x

    def simulate(self, call, value, *, now):
        from engine import Simulated

        return Simulated(self.seconds, value)


def _limited_pipeline(scale: float):
    """``analyze`` has short calls but a rate limit of 1 call per ``scale`` s; ``assign`` is the
    busiest stage (its slots busy most of the time) but holds nothing back."""
    from engine import RateLimit

    return Pipeline([
        Stage("fetch", Fixed(0.3 * scale), 10),
        Stage("analyze", Fixed(0.01 * scale), 10, rate_limit=RateLimit(rate=1 / scale)),
        Stage("assign", Fixed(0.8 * scale), 1),
    ])


@pytest.mark.timeout(30, method="thread")
@pytest.mark.parametrize("clock", ["virtual", "live"])
def test_bottleneck_is_the_rate_limited_stage_not_the_busiest(clock) -> None:
    scale = 1.0 if clock == "virtual" else 0.05
    report = _limited_pipeline(scale).run(range(10), clock=clock)
    assert report.ok == 10
    by = {s.name: s for s in report.stages}
    assert by["assign"].busy_share > by["analyze"].busy_share  # the old rule's pick
    assert report.bottleneck is not None and report.bottleneck.name == "analyze"
    assert by["analyze"].limit_wait_s > 0.5 * by["analyze"].held_s
    line = report.text().splitlines()[-1]
    assert line.startswith("bottleneck: analyze") and "waiting for its rate limit" in line


def test_bottleneck_held_time_counts_queue_waits() -> None:
    """Without limits, the stage items queued at longest is named: a 1-slot stage with short
    calls that everyone waits for beats a wide stage with long calls."""
    report = Pipeline([Stage("wide", Fixed(2.0), 20), Stage("narrow", Fixed(0.5), 1)]).run(
        range(20), clock="virtual")
    by = {s.name: s for s in report.stages}
    assert by["narrow"].held_s == pytest.approx(by["narrow"].queue_wait_s + by["narrow"].busy_s)
    assert by["narrow"].held_s > by["wide"].held_s
    assert report.bottleneck.name == "narrow"
    assert "bottleneck: narrow" in report.text()


class Staggered:
    """Call ``i`` takes ``0.1 * i`` s: items reach the next stage one by one."""

    def __call__(self, x):
        return x

    def simulate(self, call, value, *, now):
        from engine import Simulated

        return Simulated(0.1 * call.index, value)


def test_limit_wait_is_part_of_queue_wait_when_items_arrive_one_by_one() -> None:
    from engine import RateLimit

    report = Pipeline([Stage("f", Staggered(), 50),
                       Stage("g", Fixed(0.01), 10, rate_limit=RateLimit(rate=1))]).run(
        range(30), clock="virtual")
    g = report.stages[1]
    waited = sum(r.stages[1].start - r.stages[0].end for r in report.items)
    assert g.queue_wait_s == pytest.approx(waited)
    assert g.limit_wait_s <= g.queue_wait_s + 1e-9
    assert g.limit_wait_s == pytest.approx(waited)  # every wait here is for the limit
    assert "-0." not in report.text()
