"""From a scenario to an engine pipeline, and one run of it to a results document.

Scenario files speak in scenario seconds. The virtual clock runs in scenario seconds too; a live
run sleeps ``latency * time_scale``, so every duration the engine sees must be scaled the same
way: retry backoff times ``time_scale``, rate limits divided by it (the services scale their own
latencies, outages and ``retry_after``). ``report.to_json(time_scale=...)`` converts the
recorded times back, so live and virtual documents compare directly.
"""
from __future__ import annotations

import contextlib
import gc
import os
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

from bench._results import git_commit
from bench._scenario import Scenario, StageSpec, StrategySpec
from engine import (
    Batched,
    Continuous,
    ItemResult,
    ParallelBatches,
    Pipeline,
    RateLimit,
    RetryPolicy,
    Stage,
)
from simulators import Faults, SimulatedService

__all__ = ["Clock", "build_pipeline", "build_strategy", "run_once"]

Strategy = Continuous | Batched | ParallelBatches
Clock = Literal["live", "virtual"]


def build_strategy(spec: StrategySpec) -> Strategy:
    p = dict(spec.params)
    if spec.name == "continuous":
        return Continuous(**p)
    if spec.name == "batched":
        return Batched(**p)
    return ParallelBatches(**p)


def _service(sc: Scenario, st: StageSpec, time_scale: float) -> SimulatedService:
    rl = st.rate_limit
    faults = Faults(error_rate=st.error_rate, timeout=st.timeout,
                    rate_limit=rl.per_s if rl else None, outages=st.outages,
                    burst=rl.burst if rl else None)
    return SimulatedService(st.name, st.latency, faults, seed=sc.seed, time_scale=time_scale)


def build_pipeline(sc: Scenario, *, clock: Clock, time_scale: float | None = None
                   ) -> tuple[Pipeline, list[SimulatedService]]:
    """The scenario's pipeline of simulated services; ``time_scale`` (default: the scenario's)
    matters for live runs only."""
    ts = (time_scale or sc.time_scale) if clock == "live" else 1.0
    stages, services = [], []
    for st in sc.stages:
        svc = _service(sc, st, ts)
        retry = None
        if st.retry is not None:
            r = st.retry
            retry = RetryPolicy(attempts=r.attempts, backoff=r.backoff * ts,
                                max_backoff=r.max_backoff * ts, jitter=r.jitter)
        rate_limit = None
        if st.rate_limit is not None and st.rate_limit.pace:
            # the client paces itself at the service's limit (burst 1: evenly spaced calls)
            rate_limit = RateLimit(st.rate_limit.per_s / ts, burst=1)
        stages.append(Stage(st.name, svc, st.concurrency, retry=retry, rate_limit=rate_limit))
        services.append(svc)
    return Pipeline(stages), services


@contextlib.contextmanager
def gc_paused(pause: bool = True) -> Iterator[None]:
    """Automatic garbage collection off for a timed live run, one collection after (as timeit
    does). A full collection of a benchmark process's heap (numpy, matplotlib, the results so
    far) stops every thread for 30-70 ms, which shows up as items handed over late: measured on
    the seed scenario, max visibility lag 67 ms with GC on vs 1.2 ms with it paused."""
    enabled = pause and gc.isenabled()
    if enabled:
        gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
            gc.collect()


def run_once(sc: Scenario, strategy: str, *, clock: Clock, time_scale: float | None = None,
             repeat: int | None = None, on_result: Callable[[ItemResult], Any] | None = None,
             extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Run one strategy of the scenario and return its results document (DESIGN.md section 6)."""
    spec = sc.strategy(strategy)
    ts = (time_scale or sc.time_scale) if clock == "live" else 1.0
    pipeline, services = build_pipeline(sc, clock=clock, time_scale=ts)
    strat = build_strategy(spec)
    load = os.getloadavg()[0]  # other work on the machine skews live runs: record it
    if clock == "live":
        for svc in services:  # outages and rate limits count from the start of the run
            svc.start()
    t0 = time.perf_counter()
    with gc_paused(clock == "live"):
        report = pipeline.run(range(sc.items), strat, on_result=on_result, clock=clock)
    wall = time.perf_counter() - t0
    meta: dict[str, Any] = {
        "scenario": sc.name, "seed": sc.seed, "time_scale": ts, "git_commit": git_commit(),
        "description": sc.description, "source": sc.source, "wall_s": round(wall, 4),
        "load_avg_1m": round(load, 2),
    }
    if clock == "live":
        meta["gc"] = "automatic collection paused during the run"
    if repeat is not None:
        meta["repeat"] = repeat
    meta.update(extra or {})
    return report.to_json(metadata=meta, time_scale=ts)
