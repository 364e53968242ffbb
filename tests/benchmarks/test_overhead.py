"""Engine overhead, side by side with peers measured in the same run (figures, not asserts).

    ./bench.sh            # saves results/benchmarks/engine.json

* no-op stages, 20,000 items, 1 and 3 stages of concurrency 2: items/s of the engine
  (Continuous), stagepipe 0.3.0, and a plain ThreadPoolExecutor.map per stage -- the engine
  and stagepipe at the same window of items in flight (64; stagepipe's default is 8);
* stagepipe's README workload: 40 items, stages sleeping 0.02/0.30/0.05 s with concurrency
  4/8/1 (floor 2.32 s).
"""
from __future__ import annotations

import concurrent.futures
import time

import pytest

from engine import Continuous, Pipeline, Stage

stagepipe = pytest.importorskip("stagepipe")

N = 20_000
WINDOW = 64  # items in flight, the same for the engine and stagepipe


def noop(x):
    return x


def noop_sp(x, i):
    return x


def run_engine(n_stages: int) -> int:
    p = Pipeline([Stage(f"s{i}", noop, concurrency=2) for i in range(n_stages)])
    return sum(1 for _ in p.stream(range(N), Continuous(max_in_flight=WINDOW)))


def run_stagepipe(n_stages: int) -> int:
    out = stagepipe.run(range(N), [stagepipe.Stage(f"s{i}", noop_sp, workers=2)
                                   for i in range(n_stages)], max_in_flight=WINDOW)
    return len(list(out))


def run_tpe_map(n_stages: int) -> int:
    values = range(N)
    pools = [concurrent.futures.ThreadPoolExecutor(2) for _ in range(n_stages)]
    try:
        for pool in pools:  # a stage-by-stage pipeline of map()s
            values = list(pool.map(noop, values))
        return len(values)
    finally:
        for pool in pools:
            pool.shutdown()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("n_stages", [1, 3])
@pytest.mark.parametrize("impl", ["engine", "stagepipe", "tpe-map"])
def test_noop_throughput(benchmark, impl: str, n_stages: int) -> None:
    fn = {"engine": run_engine, "stagepipe": run_stagepipe, "tpe-map": run_tpe_map}[impl]
    benchmark.group = f"no-op x {n_stages} stage(s), {N} items"
    done = benchmark.pedantic(fn, args=(n_stages,), rounds=5, warmup_rounds=1)
    assert done == N
    benchmark.extra_info["items_per_s"] = N / benchmark.stats.stats.median


def _sleeper(d: float):
    def f(x):
        time.sleep(d)
        return x
    return f


def _sleeper_sp(d: float):
    def f(x, i):
        time.sleep(d)
        return x
    return f


README = [(0.02, 4), (0.30, 8), (0.05, 1)]


def run_engine_readme() -> int:
    p = Pipeline([Stage(f"s{i}", _sleeper(d), concurrency=c) for i, (d, c) in enumerate(README)])
    return sum(1 for _ in p.stream(range(40)))


def run_stagepipe_readme() -> int:
    return len(list(stagepipe.run(range(40), [stagepipe.Stage(f"s{i}", _sleeper_sp(d), workers=c)
                                              for i, (d, c) in enumerate(README)])))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("impl", ["engine", "stagepipe"])
def test_stagepipe_readme_workload(benchmark, impl: str) -> None:
    fn = {"engine": run_engine_readme, "stagepipe": run_stagepipe_readme}[impl]
    benchmark.group = "stagepipe README workload (floor 2.32 s)"
    assert benchmark.pedantic(fn, rounds=3, warmup_rounds=0) == 40
    benchmark.extra_info["seconds"] = benchmark.stats.stats.median
