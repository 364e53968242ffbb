"""Backends: process pools for CPU-bound stages and any concurrent.futures.Executor."""
from __future__ import annotations

import concurrent.futures
import os
import threading
import time

import pytest

from engine import Pipeline, Stage, current_call
from engine_helpers import check_report, max_overlap

pytestmark = pytest.mark.timeout(60)


def pid_of(x: int) -> tuple[int, int]:
    return x, os.getpid()


def cpu(x: int) -> int:
    return sum(i * i for i in range(20_000)) + x


def test_process_stage_runs_in_other_processes() -> None:
    stages = [Stage("cpu", pid_of, concurrency=2, executor="process"), Stage("t", str)]
    report = Pipeline(stages).run(range(8))
    assert report.ok == 8
    pids = {eval(r.value)[1] for r in report.items}
    assert os.getpid() not in pids


def test_caller_executor_is_used_and_left_open() -> None:
    class CountingExecutor(concurrent.futures.ThreadPoolExecutor):
        submitted = 0

        def submit(self, fn, /, *args, **kwargs):
            CountingExecutor.submitted += 1
            return super().submit(fn, *args, **kwargs)

    with CountingExecutor(max_workers=8) as ex:
        stages = [Stage("x", cpu, concurrency=3, executor=ex)]
        report = Pipeline(stages).run(range(12))
        check_report(report, stages, 12)
        assert CountingExecutor.submitted == 12
        assert ex.submit(int, "5").result() == 5  # still open: the caller owns it


def test_current_call_inside_thread_stage() -> None:
    seen = []

    def look(x):
        c = current_call()
        seen.append((c.index, c.stage, c.stage_index, c.attempt, threading.current_thread().name))
        return x

    Pipeline([Stage("a", str), Stage("look", look, 2)]).run(range(3))
    assert sorted(s[:4] for s in seen) == [(0, "look", 1, 1), (1, "look", 1, 1),
                                           (2, "look", 1, 1)]
    assert all(s[4].startswith("conveyor-look") for s in seen)
    with pytest.raises(RuntimeError):
        current_call()


# -- a caller's executor smaller than the stage's limit (issue 10) -------------------------------
def call_of(x: int) -> tuple[int, int, str, int]:
    c = current_call()
    return (c.index, c.key, c.stage, c.attempt)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["process", "thread-pool"])
def test_current_call_inside_an_executor_stage(where: str) -> None:
    """A call relayed to a process pool or a caller's executor (a Dask worker) still sees
    which call it is: a simulated service reads the item's index and attempt from it."""
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        ex: object = "process" if where == "process" else pool
        report = Pipeline([Stage("s", call_of, concurrency=2, executor=ex)],  # type: ignore[arg-type]
                          key=lambda x: x * 10).run(range(6))
    assert report.ok == 6
    assert sorted(r.value for r in report.items) == [(i, i * 10, "s", 1) for i in range(6)]


def fifty_ms(x: int) -> int:
    time.sleep(0.05)
    return x


@pytest.mark.timeout(30, method="thread")
def test_small_caller_executor_limits_the_stage_and_says_so() -> None:
    """A 3-worker pool under a limit of 5: the stats claim no more than ran (peak 3), say
    the executor limits it, and time calls where they ran (50 ms, not 50 ms + the pool's
    queue)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as ex:
        stages = [Stage("a", str, 2), Stage("slow", fifty_ms, concurrency=5, executor=ex)]
        report = Pipeline(stages).run(range(30))
    assert report.ok == 30
    st = report.stages[1]
    assert st.peak_in_flight <= 3 and st.executor_workers == 3
    assert report.stages[0].executor_workers is None
    assert "executor has 3 workers" in report.text() and "slow" in report.text()
    durations = sorted(a.end - a.start for r in report.items for a in r.stages[1].attempts)
    median = durations[len(durations) // 2]
    # queueing in the pool would make 2 of every 5 calls ~83 ms: the median ~50 ms says not
    assert 0.045 <= median < 0.07, durations
    calls = [(a.start, a.end) for r in report.items for a in r.stages[1].attempts]
    assert max_overlap(calls) <= 3  # what the record shows is what ran
    check_report(report, stages, 30)


@pytest.mark.timeout(30, method="thread")
def test_large_caller_executor_is_not_flagged() -> None:
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as ex:
        report = Pipeline([Stage("s", fifty_ms, concurrency=3, executor=ex)]).run(range(9))
    assert report.stages[0].executor_workers == 8
    assert "executor has" not in report.text()
    assert report.stages[0].peak_in_flight <= 3


# -- process stages: picklability at the door, a dying worker ------------------------------------
def test_process_stage_with_a_lambda_is_rejected_naming_the_stage() -> None:
    with pytest.raises(ValueError, match=r"Stage 'cpu'.*pickle"):
        Stage("cpu", lambda x: x, executor="process")


def test_process_stage_with_a_local_function_is_rejected() -> None:
    def local(x):
        return x

    with pytest.raises(ValueError, match="Stage 'cpu'"):
        Stage("cpu", local, concurrency=2, executor="process")


def test_process_stage_with_an_unpicklable_callable_is_rejected() -> None:
    class Holder:
        def __init__(self) -> None:
            self.lock = threading.Lock()

        def __call__(self, x):
            return x

    with pytest.raises(ValueError, match="Stage 'cpu'"):
        Stage("cpu", Holder(), executor="process")


def die_once(arg: tuple[int, str]) -> int:
    """Kills its worker process for item 5 on the first attempt (a marker file remembers)."""
    x, marker = arg
    time.sleep(0.01)
    if x == 5 and not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write("died")
        os._exit(1)
    return x


def die_always(arg: tuple[int, str]) -> int:
    x, _ = arg
    time.sleep(0.01)
    if x == 5:
        os._exit(1)
    return x


@pytest.mark.timeout(60, method="thread")
def test_a_dying_process_loses_only_its_calls_which_are_retried(tmp_path) -> None:
    from engine import WorkerLost

    marker = str(tmp_path / "died")
    items = [(i, marker) for i in range(20)]
    stages = [Stage("cpu", die_once, concurrency=2, executor="process"), Stage("t", str)]
    report = Pipeline(stages).run(items)
    assert os.path.exists(marker)  # the worker did die
    assert [r.status for r in report.items] == ["ok"] * 20, [
        (r.index, r.error) for r in report.items if not r.ok]
    lost = [a for r in report.items for a in r.stages[0].attempts if a.error is not None]
    assert lost and all(a.error.type == "WorkerLost" for a in lost)
    assert issubclass(WorkerLost, Exception)
    assert len(report.items[5].stages[0].attempts) == 2  # retried without a RetryPolicy
    assert report.stages[0].retries == len(lost)


@pytest.mark.timeout(60, method="thread")
def test_a_call_that_always_kills_its_worker_fails_alone(tmp_path) -> None:
    # one worker: no other call shares the pool when it breaks (with 2, a call that happens to
    # run beside the killer on each of its attempts is lost as often, and may fail with it)
    items = [(i, "") for i in range(20)]
    report = Pipeline([Stage("cpu", die_always, concurrency=1, executor="process")]).run(items)
    bad = report.items[5]
    assert bad.status == "failed" and bad.error.type == "WorkerLost"
    assert bad.error.exc_type == "engine._errors.WorkerLost"
    assert len(bad.stages[0].attempts) >= 2  # retried before giving up
    others = [r for r in report.items if r.index != 5]
    assert all(r.ok for r in others), [(r.index, r.error) for r in others if not r.ok]


@pytest.mark.timeout(60, method="thread")
def test_a_dying_process_with_a_retry_policy(tmp_path) -> None:
    from engine import RetryPolicy

    marker = str(tmp_path / "died")
    items = [(i, marker) for i in range(12)]
    policy = RetryPolicy(attempts=2, backoff=0.0, retry_on=(KeyError,))  # not WorkerLost
    report = Pipeline([Stage("cpu", die_once, 2, executor="process", retry=policy)]).run(items)
    assert report.ok == 12  # a lost call is retried whatever retry_on says


class NeedsTwo(Exception):
    """Like many client libraries' errors: ``__init__`` takes two arguments, so the exception
    pickles (as ``(cls, args)`` with one arg) but does not unpickle."""

    def __init__(self, code: int, body: str) -> None:
        super().__init__(f"{code}: {body}")
        self.code, self.body = code, body


def raise_needs_two(x: int) -> int:
    time.sleep(0.01)
    if x == 3:
        raise NeedsTwo(500, "upstream broke")
    return x


@pytest.mark.timeout(60, method="thread")
def test_process_stage_exception_that_does_not_unpickle_fails_only_its_item() -> None:
    report = Pipeline([Stage("p", raise_needs_two, 2, executor="process")]).run(range(12))
    bad = report.items[3]
    assert bad.status == "failed"
    assert "NeedsTwo" in bad.error.type + bad.error.exc_type, bad.error
    assert "upstream broke" in bad.error.message
    assert len(bad.stages[0].attempts) == 1  # not retried: no RetryPolicy, no lost worker
    assert report.ok == 11
