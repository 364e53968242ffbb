"""The virtual clock's speed (figures, not asserts):

* the seed scenario (3,220 items, 4 stages, bench/scenarios/seed.toml) per strategy — target
  <= 0.1 s each;
* side by side with an equivalent SimPy model of the continuous rule (same latencies, same
  retries) — target >= 5x SimPy's speed — and with a bare event loop of the same rule that
  records nothing (the floor for any Python model that calls simulate() once per call);
* 1,000,000 items continuous through stream() — target <= 30 s with bounded memory.
"""
from __future__ import annotations

import heapq
import itertools
import json
import os
import subprocess
import sys
import textwrap
import tomllib
from collections import deque

import pytest

from contract import ROOT
from engine import Batched, Continuous, ParallelBatches, Pipeline, RetryPolicy, Stage
from engine._retry import unit_random
from simulators import Faults, SimulatedService, parse_latency

# CONVEYOR_BENCH_QUICK=1 (CI): 200,000 items instead of 1,000,000, to keep CI short
QUICK = os.environ.get("CONVEYOR_BENCH_QUICK", "") not in ("", "0")

SEED = ROOT / "bench" / "scenarios" / "seed.toml"


def seed_stages() -> tuple[int, list[Stage]]:
    sc = tomllib.loads(SEED.read_text())
    stages = []
    for s in sc["stages"]:
        faults = Faults(error_rate=s["errors"]["rate"]) if "errors" in s else None
        retry = (RetryPolicy(attempts=s["retry"]["attempts"], backoff=s["retry"]["backoff"])
                 if "retry" in s else None)
        svc = SimulatedService(s["name"], parse_latency(s["latency"]), faults=faults,
                               seed=sc["seed"])
        stages.append(Stage(s["name"], svc, s["concurrency"], retry=retry))
    return sc["items"], stages


STRATEGIES = {"continuous": Continuous(), "batched": Batched(size=50),
              "parallel-batches": ParallelBatches(lanes=3, size=50)}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_seed_scenario_virtual(benchmark, strategy: str) -> None:
    n, stages = seed_stages()
    pipeline = Pipeline(stages)
    benchmark.group = "virtual clock: seed scenario (3,220 items x 4 stages)"
    report = benchmark.pedantic(pipeline.run, args=(range(n), STRATEGIES[strategy]),
                                kwargs={"clock": "virtual"}, rounds=5, warmup_rounds=1)
    assert len(report.items) == n
    benchmark.extra_info["makespan_s"] = round(report.wall_time, 2)


def simpy_continuous(n: int, stages: list[Stage]) -> float:
    """The continuous rule in SimPy: one process per item, a Resource per stage."""
    import simpy

    from engine import CallInfo

    env = simpy.Environment()
    resources = [simpy.Resource(env, capacity=s.concurrency) for s in stages]
    finished = [0.0]

    def item(i: int):
        for k, st in enumerate(stages):
            attempt = 1
            while True:
                with resources[k].request() as req:
                    yield req
                    sim = st.fn.simulate(CallInfo(i, i, st.name, k, attempt), i, now=env.now)
                    yield env.timeout(sim.duration)
                if sim.error is None:
                    break
                if st.retry is None or not st.retry.should_retry(sim.error, attempt):
                    return
                yield env.timeout(st.retry.delay(sim.error, attempt, unit_random(i, k, attempt)))
                attempt += 1
        finished[0] = max(finished[0], env.now)

    for i in range(n):
        env.process(item(i))
    env.run()
    return finished[0]


def bare_loop_continuous(n: int, stages: list[Stage]) -> float:
    """The floor: the continuous rule as a bare event loop (a heap, a FIFO per stage, the same
    simulate() calls and retries), recording nothing but the makespan. No scheduler, no policy,
    no per-call records: what any Python model of this scenario costs at the least."""
    from engine import CallInfo

    heap: list = []
    seq = itertools.count()
    limits = [s.concurrency for s in stages]
    sims = [s.fn.simulate for s in stages]
    running = [0] * len(stages)
    waiting: list[deque] = [deque() for _ in stages]
    last = len(stages) - 1
    now = 0.0

    def submit(k: int, i: int, attempt: int, t: float) -> None:
        if running[k] >= limits[k]:
            waiting[k].append((i, attempt))
            return
        running[k] += 1
        sim = sims[k](CallInfo(i, i, stages[k].name, k, attempt), i, now=t)
        heapq.heappush(heap, (t + sim.duration, next(seq), k, i, attempt, sim.error))

    for i in range(n):
        submit(0, i, 1, 0.0)
    while heap:
        now, _, k, i, attempt, error = heapq.heappop(heap)
        if attempt < 0:  # a retry's backoff elapsed
            submit(k, i, -attempt, now)
            continue
        running[k] -= 1
        if waiting[k]:
            submit(k, *waiting[k].popleft(), now)
        if error is None:
            if k < last:
                submit(k + 1, i, 1, now)
        else:
            st = stages[k]
            if st.retry is not None and st.retry.should_retry(error, attempt):
                delay = st.retry.delay(error, attempt, unit_random(i, k, attempt))
                heapq.heappush(heap, (now + delay, next(seq), k, i, -(attempt + 1), None))
    return now


@pytest.mark.timeout(120)
@pytest.mark.parametrize("impl", ["engine", "simpy", "bare-loop"])
def test_continuous_vs_simpy(benchmark, impl: str) -> None:
    pytest.importorskip("simpy")
    n, stages = seed_stages()
    benchmark.group = "virtual clock vs SimPy: continuous rule, seed scenario"
    if impl == "engine":
        p = Pipeline(stages)
        makespan = benchmark.pedantic(
            lambda: p.run(range(n), Continuous(max_in_flight=None), clock="virtual").wall_time,
            rounds=9, warmup_rounds=1)
    else:
        model = simpy_continuous if impl == "simpy" else bare_loop_continuous
        makespan = benchmark.pedantic(model, args=(n, stages), rounds=9, warmup_rounds=1)
    benchmark.extra_info["makespan_s"] = round(makespan, 2)
    assert 80 < makespan < 120  # both models agree on the seed's ~94 s


MILLION = textwrap.dedent("""
    import json, sys, time
    sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
    from benchmarks.test_virtual import seed_stages
    from engine import Continuous, Pipeline

    def rss_kb():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])

    _, stages = seed_stages()
    p = Pipeline(stages)
    for _ in p.stream(range(20_000), clock="virtual"):
        pass
    base = rss_kb(); peak = base
    t = time.perf_counter(); n = 0
    for r in p.stream(range({n}), Continuous(), clock="virtual"):
        n += 1
        if n % 50_000 == 0:
            peak = max(peak, rss_kb())
    wall = time.perf_counter() - t
    print(json.dumps({{"items": n, "wall_s": wall, "growth_mb": (peak - base) / 1024,
                      "makespan_s": r.visible_at}}))
""")


@pytest.mark.timeout(600)
def test_million_items_virtual(benchmark) -> None:
    n = 200_000 if QUICK else 1_000_000

    def run() -> dict:
        out = subprocess.run(
            [sys.executable, "-c", MILLION.format(root=str(ROOT), tests=str(ROOT / "tests"),
                                                  n=n)],
            capture_output=True, text=True, check=True, timeout=580)
        return json.loads(out.stdout)

    res = benchmark.pedantic(run, rounds=1, warmup_rounds=0)
    assert res["items"] == n
    benchmark.extra_info.update(wall_s=round(res["wall_s"], 2),
                                rss_growth_mb=round(res["growth_mb"], 2),
                                virtual_makespan_s=round(res["makespan_s"], 1))
