"""processes=N and Dask, measured (figures, not asserts; issue 14).

    .venv/bin/python -m pytest tests/benchmarks/test_processes.py --benchmark-enable -s

* the IPC: a round trip of a small message to a child and back through
  ``multiprocessing.connection`` pipes with framed bulk writes (what engine/_procs.py uses) and
  through a pair of ``multiprocessing.Queue`` (a pickle and a feeder-thread hand-off per item);
* per-call overhead on a no-op stage: threads vs ``processes=2`` (run time per call, excluding
  the children's start-up, and the calling process's CPU per call);
* a stage burning ~4 ms of Python CPU around a 4 ms sleep: ``processes=2`` vs threads (the
  target is >= 1.7x on 2 cores);
* per-call overhead of a Dask executor (``pure=False``) on a 2-worker ``LocalCluster``.

Each figure is printed and kept in the benchmark's ``extra_info``. The machine is shared: figures
move with the load.
"""
from __future__ import annotations

import multiprocessing
import os
import struct
import time
from typing import Any

import pytest

from engine import CancelToken, Continuous, Pipeline, Stage
from engine._procs import ProcessBackend

N_NOOP = 20_000
N_CPU = 200
WINDOW = 64


def noop(x: Any) -> Any:
    return x


def burn(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def cpu_and_wait(x: int) -> int:
    """~4 ms of Python CPU around a 4 ms wait (a client parsing a response, say)."""
    burn(0.002)
    time.sleep(0.004)
    burn(0.002)
    return x


def run_time(report: Any) -> float:
    """From the run's clock start (the children are up) to the last result."""
    return max(r.visible_at for r in report.items)


def measure(stages: list[Stage], n: int, processes: int | None) -> dict[str, float]:
    c0 = time.process_time()
    report = Pipeline(stages).run(range(n), Continuous(max_in_flight=WINDOW),
                                  processes=processes)
    cpu = time.process_time() - c0
    assert report.ok == n
    t = run_time(report)
    return {"run_s": t, "us_per_call": t / n * 1e6, "parent_cpu_us_per_call": cpu / n * 1e6,
            "wall_s": report.wall_time}


# -- the IPC ----------------------------------------------------------------------------------

_HEAD = struct.Struct("<Iq")


def _echo_pipe(calls: Any, replies: Any) -> None:
    while True:
        data = calls.recv_bytes()
        if not data:
            return
        replies.send_bytes(data)  # the frames back as they came


def _echo_queue(inq: Any, outq: Any) -> None:
    while True:
        msg = inq.get()
        if msg is None:
            return
        outq.put(msg)


def ipc_pipe(n: int, batch: int) -> float:
    import pickle

    ctx = multiprocessing.get_context("spawn")
    calls_r, calls_w = ctx.Pipe(duplex=False)
    replies_r, replies_w = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_echo_pipe, args=(calls_r, replies_w), daemon=True)
    p.start()
    calls_r.close()
    replies_w.close()
    try:
        t = time.perf_counter()
        for start in range(0, n, batch):
            frames = []
            for i in range(start, start + batch):
                payload = pickle.dumps((0, 1, False, i, i, i), pickle.HIGHEST_PROTOCOL)
                frames.append(_HEAD.pack(len(payload), i) + payload)
            calls_w.send_bytes(b"".join(frames))
            data = replies_r.recv_bytes()
            view, pos = memoryview(data), 0
            while pos < len(data):
                size, _ = _HEAD.unpack_from(view, pos)
                pickle.loads(view[pos + _HEAD.size:pos + _HEAD.size + size])
                pos += _HEAD.size + size
        return (time.perf_counter() - t) / n * 1e6
    finally:
        calls_w.send_bytes(b"")
        p.join()


def ipc_queue(n: int, batch: int) -> float:
    ctx = multiprocessing.get_context("spawn")
    inq, outq = ctx.Queue(), ctx.Queue()
    p = ctx.Process(target=_echo_queue, args=(inq, outq), daemon=True)
    p.start()
    try:
        inq.put((0, 1, False, 0, 0, 0))
        outq.get()  # the child is up
        t = time.perf_counter()
        for start in range(0, n, batch):
            for i in range(start, start + batch):
                inq.put((0, 1, False, i, i, i))
            for _ in range(batch):
                outq.get()
        return (time.perf_counter() - t) / n * 1e6
    finally:
        inq.put(None)
        p.join()


@pytest.mark.timeout(300)
def test_ipc_round_trip(benchmark: Any) -> None:
    figures: dict[str, float] = {}

    def run() -> None:
        for batch in (1, 8, 64):
            figures[f"pipe_bulk_us_per_msg_batch{batch}"] = ipc_pipe(20_000, batch)
            figures[f"mp_queue_us_per_msg_batch{batch}"] = ipc_queue(20_000, batch)

    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(figures)
    print("\nIPC round trip:", {k: round(v, 1) for k, v in figures.items()})


# -- the process backend -------------------------------------------------------------------------

@pytest.mark.timeout(300)
def test_start_up(benchmark: Any) -> None:
    figures: dict[str, float] = {}

    def run() -> None:
        for n in (1, 2):
            t = time.perf_counter()
            b = ProcessBackend((Stage("s", noop, concurrency=8),), CancelToken(), n)
            figures[f"start_s_processes{n}"] = time.perf_counter() - t
            t = time.perf_counter()
            b.close()
            figures[f"close_s_processes{n}"] = time.perf_counter() - t

    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(figures)
    print("\nstart-up:", {k: round(v, 3) for k, v in figures.items()})


@pytest.mark.timeout(600)
@pytest.mark.parametrize("concurrency", [8, 64])
def test_noop_overhead(benchmark: Any, concurrency: int) -> None:
    figures: dict[str, Any] = {}

    def run() -> None:
        stages = [Stage("noop", noop, concurrency=concurrency)]
        figures["threads"] = measure(stages, N_NOOP, None)
        figures["processes2"] = measure(stages, N_NOOP, 2)

    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(figures)
    print(f"\nno-op, concurrency {concurrency}:",
          {k: {m: round(v, 2) for m, v in d.items()} for k, d in figures.items()})


@pytest.mark.timeout(600)
def test_cpu_bound_stage(benchmark: Any) -> None:
    figures: dict[str, Any] = {}

    def run() -> None:
        stages = [Stage("cpu", cpu_and_wait, concurrency=8)]
        figures["threads"] = measure(stages, N_CPU, None)
        figures["processes2"] = measure(stages, N_CPU, 2)
        figures["speedup"] = figures["threads"]["run_s"] / figures["processes2"]["run_s"]

    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(figures)
    print(f"\n4 ms CPU + 4 ms wait, {N_CPU} items, concurrency 8: threads "
          f"{figures['threads']['run_s']:.3f} s, processes=2 {figures['processes2']['run_s']:.3f}"
          f" s: {figures['speedup']:.2f}x (target >= 1.7x); load {os.getloadavg()[0]:.1f}")


# -- Dask ------------------------------------------------------------------------------------------

@pytest.mark.timeout(600)
def test_dask_overhead(benchmark: Any) -> None:
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=4, processes=True,
                                       dashboard_address=":0", silence_logs=40)
    client = distributed.Client(cluster)
    figures: dict[str, Any] = {}
    try:
        ex = client.get_executor(pure=False)

        def run() -> None:
            n = 1000
            for conc in (1, 8):
                stages = [Stage("noop", noop, concurrency=conc, executor=ex)]
                figures[f"concurrency{conc}"] = measure(stages, n, None)

        benchmark.pedantic(run, rounds=1, iterations=1)
    finally:
        client.close()
        cluster.close()
    benchmark.extra_info.update(figures)
    print("\nDask no-op:", {k: {m: round(v, 2) for m, v in d.items()}
                            for k, d in figures.items()})
