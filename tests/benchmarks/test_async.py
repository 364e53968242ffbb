"""Async stages vs thread stages (issue 15), figures not asserts.

    ./bench.sh tests/benchmarks/test_async.py

5,000 calls of 50 ms at concurrency 1,000: the same stage as ``async def`` (``await
asyncio.sleep(0.05)``, one event-loop thread) and as threads (``time.sleep(0.05)``, 1,000
worker threads), and, for reference, the hand-written asyncio peer (a semaphore and
``asyncio.gather``). Target: async <= 0.6 s wall and <= 0.6x the CPU of threads. Each row's
``extra_info`` has the median wall time and CPU time (``time.process_time``) of its rounds.
"""
from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from typing import Any

import pytest

from engine import Continuous, Pipeline, Stage

N = 5_000
CONCURRENCY = 1_000
SECONDS = 0.05
ROUNDS = 5


async def async_call(x: Any) -> Any:
    await asyncio.sleep(SECONDS)
    return x


def thread_call(x: Any) -> Any:
    time.sleep(SECONDS)
    return x


def run_engine(fn: Callable[[Any], Any]) -> int:
    report = Pipeline([Stage("call", fn, concurrency=CONCURRENCY)]).run(range(N), Continuous())
    return report.ok


def run_asyncio_peer() -> int:
    async def main() -> int:
        sem = asyncio.Semaphore(CONCURRENCY)

        async def one(x: Any) -> Any:
            async with sem:
                return await async_call(x)

        return len(await asyncio.gather(*(one(i) for i in range(N))))

    return asyncio.run(main())


IMPLS: dict[str, Callable[[], int]] = {
    "engine-async": lambda: run_engine(async_call),
    "engine-threads": lambda: run_engine(thread_call),
    "asyncio-peer": run_asyncio_peer,
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("impl", list(IMPLS))
def test_async_vs_threads(benchmark, impl: str) -> None:
    benchmark.group = (f"{N} calls of {SECONDS * 1000:.0f} ms at concurrency {CONCURRENCY} "
                       "(target: async <= 0.6 s, <= 0.6x the CPU of threads)")
    fn = IMPLS[impl]
    walls: list[float] = []
    cpus: list[float] = []

    def measured() -> int:
        w0, c0 = time.perf_counter(), time.process_time()
        done = fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
        return done

    done = benchmark.pedantic(measured, rounds=ROUNDS, warmup_rounds=1)
    assert done == N
    walls, cpus = walls[1:], cpus[1:]  # the warm-up round
    benchmark.extra_info["wall_s"] = round(statistics.median(walls), 4)
    benchmark.extra_info["cpu_s"] = round(statistics.median(cpus), 4)
    benchmark.extra_info["cpu_per_call_us"] = round(statistics.median(cpus) / N * 1e6, 1)
