"""Backends: process pools for CPU-bound stages and any concurrent.futures.Executor."""
from __future__ import annotations

import concurrent.futures
import os
import threading

import pytest

from engine import Pipeline, Stage, current_call
from engine_helpers import check_report

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
