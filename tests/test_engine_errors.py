"""Errors never dropped: stage exceptions end the item; input, key and callback exceptions end
the run cleanly, re-raised after in-flight work settles."""
from __future__ import annotations

import threading
import time

import pytest

from engine import Batched, Continuous, ParallelBatches, Pipeline, Stage, StageInitError

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
