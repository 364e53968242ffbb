"""Errors never dropped: stage exceptions end the item; input, key and callback exceptions end
the run cleanly, re-raised after in-flight work settles."""
from __future__ import annotations

import threading
import time

import pytest

from engine import (
    Batched,
    Continuous,
    ParallelBatches,
    Pipeline,
    RetryPolicy,
    Stage,
    StageInitError,
)

pytestmark = pytest.mark.timeout(30)

STRATS = [Continuous(), Batched(size=3), ParallelBatches(lanes=2, size=2)]


def boom_on_3(x: int) -> int:
    if x == 3:
        raise KeyError("three")
    return x


@pytest.mark.parametrize("strategy", STRATS, ids=lambda s: s.name)
def test_stage_exception_isolated(strategy) -> None:
    report = Pipeline([Stage("a", boom_on_3, 2), Stage("b", str, 2)]).run(range(8), strategy)
    bad = report.items[3]
    assert bad.status == "failed" and bad.error is not None
    assert bad.error.stage == "a" and bad.error.type == "KeyError" and "three" in bad.error.message
    assert [sp.name for sp in bad.stages] == ["a"]
    assert report.ok == 7


def test_base_exception_in_stage_is_recorded_not_lost() -> None:
    def stop(x):
        raise SystemExit(3)

    report = Pipeline([Stage("s", stop)]).run([1])
    assert report.items[0].status == "failed"
    assert report.items[0].error.type == "SystemExit"


def _gen_failing_after(n: int):
    yield from range(n)
    raise RuntimeError("input broke")


@pytest.mark.parametrize("strategy", STRATS, ids=lambda s: s.name)
def test_input_iterator_exception_reraised_after_settling(strategy) -> None:
    done = []

    def slow(x):
        time.sleep(0.02)
        done.append(x)
        return x

    before = threading.active_count()
    with pytest.raises(RuntimeError, match="input broke"):
        Pipeline([Stage("s", slow, 4)]).run(_gen_failing_after(5), strategy)
    assert threading.active_count() == before


def test_stream_input_exception_after_results() -> None:
    got = []
    with pytest.raises(RuntimeError, match="input broke"):
        for r in Pipeline([Stage("s", str, 2)]).stream(_gen_failing_after(4)):
            got.append(r)
    assert {r.index for r in got} <= {0, 1, 2, 3}
    assert len(got) == 4


def test_key_exception_ends_run() -> None:
    def key(v):
        if v == 2:
            raise ValueError("no key")
        return v

    with pytest.raises(ValueError, match="no key"):
        Pipeline([Stage("s", str)], key=key).run(range(5))


@pytest.mark.parametrize("strategy", STRATS, ids=lambda s: s.name)
def test_callback_exception_reraised_and_threads_joined(strategy) -> None:
    seen = []

    def on_result(r):
        seen.append(r.index)
        if len(seen) == 2:
            raise OSError("callback failed")

    before = threading.active_count()
    with pytest.raises(OSError, match="callback failed"):
        Pipeline([Stage("s", str, 2)]).run(range(50), strategy, on_result=on_result)
    assert threading.active_count() == before


def test_init_failure_raises() -> None:
    def bad_init():
        raise ConnectionRefusedError("no db")

    with pytest.raises(StageInitError, match="Stage 's': init raised ConnectionRefusedError: "
                       "no db") as info:
        Pipeline([Stage("s", lambda v, r: v, 2, init=bad_init)]).run(range(5))
    assert info.value.stage == "s" and isinstance(info.value.__cause__, ConnectionRefusedError)


# -- exceptions that are unsafe to read (issue 10: "Hangs and crashes") -------------------------
class BadStr(Exception):
    """An API error whose message formats a JSON body that turned out to be HTML."""

    def __str__(self) -> str:
        raise ValueError("not json")


class BadRetryAfter(Exception):
    """An HTTP error whose ``retry_after`` property reads a header that is missing."""

    @property
    def retry_after(self) -> float:
        raise KeyError("retry-after")


class BadBoth(BadRetryAfter):
    def __str__(self) -> str:
        raise RuntimeError("no body")


def raise_bad_on_3(x: int) -> int:
    """Module level, so it pickles for the process backend."""
    if x == 3:
        raise BadStr("<html>")
    if x == 5:
        raise BadRetryAfter("429 too many requests")
    if x == 6:
        raise BadBoth()
    return x


class BadSim:
    """The same failures on the virtual clock."""

    def __call__(self, x):
        return raise_bad_on_3(x)

    def simulate(self, call, value, *, now):
        from engine import Simulated

        try:
            return Simulated(1.0, raise_bad_on_3(value))
        except Exception as exc:
            return Simulated(1.0, error=exc)


def _check_bad_items(results, n: int) -> None:
    by = {r.index: r for r in results}
    assert sorted(by) == list(range(n)), "every item ends exactly once"
    assert (by[3].status, by[3].error.type) == ("failed", "BadStr")
    assert by[3].error.message == "<str() of this BadStr raised ValueError>"
    assert (by[5].status, by[5].error.type) == ("failed", "BadRetryAfter")
    assert by[5].error.message == "429 too many requests"
    assert (by[6].status, by[6].error.type) == ("failed", "BadBoth")
    assert by[6].error.message == "<str() of this BadBoth raised RuntimeError>"
    assert all(by[i].status == "ok" for i in range(n) if i not in (3, 5, 6))


BAD_CASES = [
    pytest.param(None, "live", id="threads"),
    pytest.param("process", "live", id="process"),
    pytest.param(None, "virtual", id="virtual"),
]


def _bad_stages(executor, clock, retry):
    fn = BadSim() if clock == "virtual" else raise_bad_on_3
    return [Stage("a", fn, 2, executor=executor, retry=retry), Stage("b", BadSim(), 2)]


@pytest.mark.timeout(20, method="thread")
@pytest.mark.parametrize("retry", [None, RetryPolicy(attempts=2, backoff=0.0)],
                         ids=["no-retry", "retry"])
@pytest.mark.parametrize(("executor", "clock"), BAD_CASES)
@pytest.mark.parametrize("strategy", STRATS, ids=lambda s: s.name)
def test_unreadable_exceptions_fail_the_item_and_run_returns(strategy, executor, clock,
                                                            retry) -> None:
    """``str()`` or ``retry_after`` that raise: the item ends failed with its type and a
    placeholder message, the others go on, and ``run()`` returns."""
    report = Pipeline(_bad_stages(executor, clock, retry)).run(range(10), strategy, clock=clock)
    _check_bad_items(report.items, 10)
    if retry is not None:  # retried like any error (the hint says nothing), then failed
        assert len(report.items[5].stages[0].attempts) == 2
        assert len(report.items[3].stages[0].attempts) == 2


@pytest.mark.timeout(20, method="thread")
@pytest.mark.parametrize(("executor", "clock"), BAD_CASES)
def test_unreadable_exceptions_stream_returns(executor, clock) -> None:
    retry = RetryPolicy(attempts=2, backoff=0.0)
    got = list(Pipeline(_bad_stages(executor, clock, retry)).stream(range(10), clock=clock))
    _check_bad_items(got, 10)


@pytest.mark.timeout(20, method="thread")
def test_unreadable_exception_in_json() -> None:
    report = Pipeline([Stage("a", raise_bad_on_3)]).run(range(7))
    err = report.to_json()["items"][3]["error"]
    assert err["type"] == "BadStr" and err["message"].startswith("<str() of this BadStr")
    assert err["exc_type"] == "test_engine_errors.BadStr"
    assert "raise_bad_on_3" in err["traceback"]


# -- ErrorInfo keeps the module-qualified type and the traceback -------------------------------
def parse_json(x: int):
    import json

    return json.loads("{" * (x + 1))


@pytest.mark.parametrize("executor", [None, "process"], ids=["threads", "process"])
def test_error_info_has_qualified_type_and_traceback(executor) -> None:
    report = Pipeline([Stage("parse", parse_json, 2, executor=executor)]).run(range(3))
    for r in report.items:
        assert r.status == "failed"
        assert r.error.type == "JSONDecodeError"
        assert r.error.exc_type == "json.decoder.JSONDecodeError"
        assert "Traceback" in r.error.traceback and "parse_json" in r.error.traceback
    doc = report.to_json()
    for i, r in enumerate(report.items):
        err = doc["items"][i]["error"]
        assert err["exc_type"] == "json.decoder.JSONDecodeError"
        assert err["traceback"] == r.error.traceback


def test_error_info_of_each_attempt_keeps_its_traceback() -> None:
    report = Pipeline([Stage("parse", parse_json, retry=RetryPolicy(attempts=2, backoff=0))]).run(
        [0])
    attempts = report.items[0].stages[0].attempts
    assert len(attempts) == 2
    assert all("parse_json" in a.error.traceback for a in attempts)


# -- on_result that raises: never called again ---------------------------------------------------
class Sleepy:
    def __call__(self, x):
        time.sleep(0.002)
        return x

    def simulate(self, call, value, *, now):
        from engine import Simulated

        return Simulated(0.01 * (1 + value % 3), value)


@pytest.mark.timeout(20, method="thread")
@pytest.mark.parametrize("clock", ["live", "virtual"])
@pytest.mark.parametrize("strategy", [*STRATS, Continuous(max_in_flight=None)],
                         ids=lambda s: f"{s.name}-{s.params}")
def test_on_result_never_called_after_it_raised(strategy, clock) -> None:
    calls = []

    class CallbackError(Exception):
        pass

    raised = CallbackError("stop")

    def on_result(r):
        calls.append(r.index)
        raise raised

    with pytest.raises(CallbackError) as info:
        Pipeline([Stage("s", Sleepy(), 3), Stage("t", Sleepy(), 2)]).run(
            range(40), strategy, on_result=on_result, clock=clock)
    assert info.value is raised  # that very exception
    assert len(calls) == 1


# -- StageInitError ------------------------------------------------------------------------------
def use_resource(value, resource):
    return value


def test_init_failure_stream_raises_stage_init_error() -> None:
    cause = ConnectionRefusedError("no db")

    def bad_init():
        raise cause

    before = threading.active_count()
    with pytest.raises(StageInitError) as info:
        list(Pipeline([Stage("a", str), Stage("db", use_resource, 3, init=bad_init)]).stream(
            range(20)))
    assert info.value.stage == "db" and info.value.__cause__ is cause
    assert isinstance(info.value, RuntimeError)
    assert threading.active_count() == before


def test_init_failure_on_one_worker_only_still_raises() -> None:
    lock = threading.Lock()
    made = []

    def init_fails_second():
        with lock:
            made.append(1)
            if len(made) == 2:
                raise OSError("second worker cannot connect")
        return object()

    with pytest.raises(StageInitError) as info:
        Pipeline([Stage("db", use_resource, 3, init=init_fails_second)]).run(range(20))
    assert info.value.stage == "db" and isinstance(info.value.__cause__, OSError)


def test_init_raising_an_unreadable_exception() -> None:
    cause = BadStr("<html>")

    def bad_init():
        raise cause

    with pytest.raises(StageInitError, match=r"init raised BadStr: <str\(\) of this BadStr") \
            as info:
        Pipeline([Stage("db", use_resource, 2, init=bad_init)]).run(range(4))
    assert info.value.__cause__ is cause
