"""Stages on Dask (issue 14): ``executor=client.get_executor(pure=False)`` on a 2-worker
``LocalCluster`` (processes), a ``pure=True`` executor refused, per-worker resources through a
WorkerPlugin, and a worker killed mid-run (its calls retried). No timed assertions."""
from __future__ import annotations

import functools
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

distributed = pytest.importorskip("distributed")

from engine import Continuous, Pipeline, Stage  # noqa: E402
from engine._dask import check_executor, is_dask_executor, is_worker_lost  # noqa: E402
from engine.adapters.dask import WorkerResource, worker_resource  # noqa: E402

pytestmark = pytest.mark.timeout(180)


def new_cluster(**config: Any) -> tuple[Any, Any]:
    import dask

    with dask.config.set(config):
        cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=2, processes=True,
                                           dashboard_address=":0", silence_logs=40)
    return cluster, distributed.Client(cluster)


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    cluster, c = new_cluster()
    try:
        yield c
    finally:
        c.close()
        cluster.close()


def stamp(x: Any) -> tuple[Any, int, int]:
    """A call that says it ran: its own clock reading and its process."""
    time.sleep(0.01)
    return x, time.perf_counter_ns(), os.getpid()


def slow(x: int) -> tuple[int, int]:
    time.sleep(0.05)
    return x, os.getpid()


def make_resource(log: str) -> dict[str, Any]:
    res = {"pid": os.getpid(), "id": os.urandom(4).hex(), "log": log}
    with open(log, "a") as f:
        f.write(f"init {res['id']}\n")
    return res


class Closing(dict[str, Any]):
    def close(self) -> None:
        with open(self["log"], "a") as f:
            f.write(f"close {self['id']}\n")


def make_closing(log: str) -> Closing:
    return Closing(make_resource(log))


def use(x: int, res: dict[str, Any]) -> tuple[int, int, str]:
    time.sleep(0.005)
    return x, res["pid"], res["id"]


# -- pure=True is refused ------------------------------------------------------------------------

def test_a_pure_executor_is_refused(client: Any) -> None:
    for ex in (client.get_executor(), client.get_executor(pure=True)):
        assert is_dask_executor(ex)
        with pytest.raises(ValueError, match=r"Stage 'd'.*pure=False"):
            check_executor("Stage 'd'", ex)
    check_executor("Stage 'd'", client.get_executor(pure=False))  # fine


def test_stage_refuses_a_pure_executor(client: Any) -> None:
    with pytest.raises(ValueError, match="pure=False"):
        Stage("d", stamp, executor=client.get_executor())


def test_worker_lost_errors_are_recognised() -> None:
    from distributed.comm.core import CommClosedError
    from distributed.scheduler import KilledWorker

    assert is_worker_lost(KilledWorker("task", cast(Any, "worker"), 1))
    assert is_worker_lost(CommClosedError("closed"))
    assert not is_worker_lost(OSError("other"))


# -- calls on Dask ---------------------------------------------------------------------------------

def test_every_call_runs_on_the_workers(client: Any) -> None:
    """pure=False: ten identical values are ten calls, on the workers' processes."""
    ex = client.get_executor(pure=False)
    report = Pipeline([Stage("d", stamp, concurrency=4, executor=ex)]).run([7] * 10)
    assert report.ok == 10
    assert len({r.value[1] for r in report.items}) == 10  # each call ran
    pids = {r.value[2] for r in report.items}
    assert os.getpid() not in pids and pids <= set(client.run(os.getpid).values())
    (stats,) = report.stages
    assert stats.peak_in_flight <= 4


def test_a_resource_per_worker(client: Any, tmp_path: Path) -> None:
    log = tmp_path / "res.log"
    res = worker_resource(client, functools.partial(make_closing, str(log)), name="session")
    try:
        ex = client.get_executor(pure=False)
        report = Pipeline([Stage("u", res.bind(use), concurrency=4, executor=ex)]).run(
            range(30))
        assert report.ok == 30
        used = {(r.value[1], r.value[2]) for r in report.items}
        workers = set(client.run(os.getpid).values())
        assert {pid for pid, _ in used} <= workers
        assert len(used) == len({pid for pid, _ in used})  # one resource per worker
        inits = [line.split()[1] for line in log.read_text().splitlines()
                 if line.startswith("init")]
        assert len(inits) == len(workers)  # built once per worker, not per call
    finally:
        res.close()
    closes = [line.split()[1] for line in log.read_text().splitlines()
              if line.startswith("close")]
    assert sorted(closes) == sorted(inits)


def test_a_resource_outside_a_task_says_so() -> None:
    with pytest.raises(RuntimeError, match="inside a Dask task"):
        WorkerResource("nothing").get()


# -- killed workers -----------------------------------------------------------------------------

def _kill_one_worker_midrun(client: Any, n: int) -> Any:
    pids = sorted(set(client.run(os.getpid).values()))
    killed: list[int] = []

    def on_result(r: Any) -> None:
        if not killed:
            killed.append(pids[0])
            os.kill(pids[0], signal.SIGKILL)

    ex = client.get_executor(pure=False)
    report = Pipeline([Stage("k", slow, concurrency=4, executor=ex)]).run(
        range(n), Continuous(), on_result=on_result)
    assert killed
    return report


def test_a_worker_killed_mid_run() -> None:
    """Dask reschedules the killed worker's tasks; every item ends ok."""
    cluster, c = new_cluster()
    try:
        report = _kill_one_worker_midrun(c, 40)
        assert report.ok == 40
    finally:
        c.close()
        cluster.close()


def test_a_worker_killed_with_no_dask_retries_is_retried_by_the_engine() -> None:
    """``allowed-failures: 0``: the killed worker's tasks end ``KilledWorker`` at once; the
    engine retries them as ``WorkerLost``."""
    cluster, c = new_cluster(**{"distributed.scheduler.allowed-failures": 0})
    try:
        report = _kill_one_worker_midrun(c, 40)
        lost = [a for r in report.items for a in r.stages[0].attempts
                if a.error is not None and a.error.type == "WorkerLost"]
        assert report.ok == 40 and lost
    finally:
        c.close()
        cluster.close()
