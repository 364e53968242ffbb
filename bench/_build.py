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
from bench._scenario import BudgetSpec, Scenario, StageSpec, StrategySpec
from engine import (
    Adaptive,
    Batched,
    Budget,
    Continuous,
    Hedge,
    ItemResult,
    ParallelBatches,
    Pipeline,
    RateLimit,
    RetryPolicy,
    Stage,
    strategy_from_name,
)
from simulators import Faults, Provider, SimulatedService

__all__ = ["Clock", "PauseOnRateLimit", "build_pipeline", "build_strategy", "run_once"]

Strategy = Continuous | Batched | ParallelBatches
Clock = Literal["live", "virtual"]


def build_strategy(spec: StrategySpec) -> Strategy:
    return strategy_from_name(spec.name, **dict(spec.params))  # the engine's one factory


def _service(sc: Scenario, st: StageSpec, time_scale: float) -> SimulatedService | Provider:
    if st.provider is not None:
        pv = st.provider
        return Provider(st.name, st.latency, capacity=pv.capacity, per_minute=pv.per_minute,
                        tokens=pv.tokens, seed=sc.seed, time_scale=time_scale,
                        correlation=st.correlation)
    rl = st.rate_limit
    faults = Faults(error_rate=st.error_rate, timeout=st.timeout,
                    rate_limit=rl.per_s if rl else None, outages=st.outages,
                    burst=rl.burst if rl else None)
    return SimulatedService(st.name, st.latency, faults, seed=sc.seed, time_scale=time_scale,
                            correlation=st.correlation)


def _hedge(st: StageSpec, ts: float) -> Hedge | None:
    """The stage's ``engine.Hedge``: a delay in seconds is scenario seconds (x ts live); a
    percentile is of the calls the engine sees, already in the run's own time."""
    h = st.hedge
    if h is None:
        return None
    after = h.after if isinstance(h.after, str) else h.after * ts
    return Hedge(after=after, max_extra=h.max_extra)


class PauseOnRateLimit:
    """The OpenAI cookbook's rule as a user writes it: a stage function whose every rate-limit
    error says "retry after at least ``pause_s``" (``retry_after = max(pause_s, its own)``), on
    a stage with a budget, so the engine pauses the whole budget (every stage on it) that long
    on any 429 (DESIGN.md section 9). Live and virtual; ``pause_s`` in scenario seconds."""

    def __init__(self, fn: Any, pause_s: float, time_scale: float = 1.0) -> None:
        self.fn, self.pause_s, self.time_scale = fn, float(pause_s), float(time_scale)

    def _widen(self, exc: BaseException, scale: float) -> None:
        hint = getattr(exc, "retry_after", None)
        if hint is not None:
            try:
                own = float(hint)
            except (TypeError, ValueError):
                own = 0.0
            exc.retry_after = max(self.pause_s * scale, own)  # type: ignore[attr-defined]

    def __call__(self, value: Any) -> Any:
        try:
            return self.fn(value)
        except Exception as exc:
            self._widen(exc, self.time_scale)
            raise

    def simulate(self, call: Any, value: Any, *, now: float) -> Any:
        sim = self.fn.simulate(call, value, now=now)
        if sim.error is not None:
            self._widen(sim.error, 1.0)  # virtual: scenario seconds
        return sim

    def estimate(self, value: Any, call: Any = None) -> Any:
        return self.fn.estimate(value, call)

    def start(self) -> None:
        self.fn.start()


def _budget(b: BudgetSpec, ts: float) -> Budget:
    """The client's ``engine.Budget``: live rates are per real minute (scenario minute x ts);
    the burst stays in units (default: one scenario second's worth)."""
    burst = dict(b.burst) if b.burst else {k: v / 60.0 for k, v in b.per_minute.items()}
    return Budget(b.name, {k: v / ts for k, v in b.per_minute.items()}, burst=burst)


def build_pipeline(sc: Scenario, *, clock: Clock, time_scale: float | None = None
                   ) -> tuple[Pipeline, list[Any]]:
    """The scenario's pipeline of simulated services (live, a provider stage with
    ``client = "openai"`` is ``LLMAnalyze`` against a fake OpenAI server started here: close
    the services after the run); ``time_scale`` (default: the scenario's) matters for live
    runs only."""
    ts = (time_scale or sc.time_scale) if clock == "live" else 1.0
    budgets = {b.name: _budget(b, ts) for b in sc.budgets
               if any(st.budget == b.name for st in sc.stages)}
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
        call: Any = svc
        kw: dict[str, Any] = {}
        if clock == "live" and st.provider is not None and st.provider.client == "openai" \
                and isinstance(svc, Provider):
            from bench._llm_live import ServerBackedLLM, start_server

            call = ServerBackedLLM(svc, start_server(svc, seed=sc.seed, time_scale=ts),
                                   concurrency=st.concurrency,
                                   budget=budgets.get(st.budget or ""), timeout=60.0)
        fn: Any = call if st.pause_s is None else PauseOnRateLimit(call, st.pause_s, ts)
        concurrency: Any = st.concurrency
        if st.adaptive is not None:
            a = st.adaptive
            concurrency = Adaptive(a.initial, min=a.min, max=a.max)
        if st.budget is not None:
            kw["budget"] = budgets[st.budget]
            if hasattr(call, "cost"):  # the real client: the adapter's own estimate
                kw["cost"] = call.cost()
            elif isinstance(svc, Provider):
                # reserve the estimate (a tokenizer's count); the engine settles with the usage
                kw["cost"] = _estimator(svc)
        if st.idempotent:
            kw["idempotent"] = True
            kw["hedge"] = _hedge(st, ts)
        stages.append(Stage(st.name, fn, concurrency, retry=retry, rate_limit=rate_limit, **kw))
        services.append(call)
    return Pipeline(stages), services


def _estimator(provider: Provider) -> Callable[[Any], dict[str, float]]:
    def cost(value: Any) -> dict[str, float]:
        return {"tokens": float(provider.estimate(value))}
    return cost


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
             extra: Mapping[str, Any] | None = None, progress: Any = False) -> dict[str, Any]:
    """Run one strategy of the scenario and return its results document (DESIGN.md section 6);
    ``progress`` is the engine's (``pipeline.run(progress=...)``)."""
    spec = sc.strategy(strategy)
    ts = (time_scale or sc.time_scale) if clock == "live" else 1.0
    pipeline, services = build_pipeline(sc, clock=clock, time_scale=ts)
    strat = build_strategy(spec)
    load = os.getloadavg()[0]  # other work on the machine skews live runs: record it
    if clock == "live":
        for svc in services:  # outages and rate limits count from the start of the run
            svc.start()
    t0 = time.perf_counter()
    try:
        with gc_paused(clock == "live"):
            report = pipeline.run(range(sc.items), strat, on_result=on_result, clock=clock,
                                  progress=progress)
    finally:
        for svc in services:
            close = getattr(svc, "close", None)
            if close is not None:
                close()
    wall = time.perf_counter() - t0
    meta: dict[str, Any] = {
        "scenario": sc.name, "seed": sc.seed, "time_scale": ts, "git_commit": git_commit(),
        "description": sc.description, "source": sc.source, "wall_s": round(wall, 4),
        "load_avg_1m": round(load, 2),
    }
    if clock == "live":
        meta["gc"] = "automatic collection paused during the run"
        clients = {st.name: "LLMAnalyze (openai client) -> fake OpenAI server"
                   for st in sc.stages if st.provider is not None
                   and st.provider.client == "openai"}
        if clients:
            meta["live_clients"] = clients
    if repeat is not None:
        meta["repeat"] = repeat
    if sc.variant is not None:
        meta["variant"] = sc.variant
    accounts = sc.accounts()
    if accounts:  # every variant is measured against the same accounts (DESIGN.md 6.1)
        meta["budgets"] = accounts
    meta.update(extra or {})
    return report.to_json(metadata=meta, time_scale=ts)
