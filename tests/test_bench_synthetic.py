"""Synthetic results documents for the bench tests, and checks that they keep the contract.

``synthetic_doc`` schedules items on per-stage slot pools in plain Python (no engine), so the
metrics, report and plot tests do not depend on the engine. Its schedules are valid, not optimal:
parallel-batches splits each stage's slots between lanes.
"""
from __future__ import annotations

import heapq
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench._metrics import summarize, validate
from contract import assert_checker_accepts

STAGES = [{"name": "fetch", "concurrency": 5}, {"name": "analyze", "concurrency": 4},
          {"name": "save", "concurrency": 2}]


def _calls(rng: np.random.Generator, t: float, mean: float, error_rate: float,
           attempts: int) -> tuple[list[list[float]], bool]:
    calls = []
    for _ in range(attempts):
        d = float(rng.lognormal(np.log(mean), 0.6))
        calls.append([t, t + d])
        t += d
        if rng.random() >= error_rate:
            return calls, True
        t += 0.05  # backoff
    return calls, False


def _run_stage(rng: np.random.Generator, arrivals: list[tuple[float, int]], slots: int,
               mean: float, error_rate: float, attempts: int
               ) -> dict[int, tuple[list[list[float]], bool]]:
    """FIFO by arrival on `slots` servers; a call's retries keep its slot."""
    free = [0.0] * slots
    out = {}
    for t, i in sorted(arrivals):
        f = heapq.heappop(free)
        calls, ok = _calls(rng, max(t, f), mean, error_rate, attempts)
        heapq.heappush(free, calls[-1][1])
        out[i] = (calls, ok)
    return out


def synthetic_doc(strategy: str = "continuous", items: int = 120, *, seed: int = 1,
                  stages: list[dict[str, Any]] | None = None, size: int = 10, lanes: int = 2,
                  error_rate: float = 0.0, cancel_from: int | None = None,
                  clock: str = "virtual", scenario: str = "synthetic", repeat: int | None = None,
                  time_scale: float = 1.0) -> dict[str, Any]:
    stages = stages or STAGES
    rng = np.random.default_rng(seed)
    means = [1.0 / (k + 1) for k in range(len(stages))]
    n_run = items if cancel_from is None else min(cancel_from, items)
    recs: dict[int, dict[str, Any]] = {
        i: {"index": i, "key": str(i), "status": "ok", "visible_at": None, "error": None,
            "stages": []} for i in range(items)}

    def run_group(idx: list[int], t0: float, div: int, barrier: bool) -> float:
        ready = dict.fromkeys(idx, t0)
        alive = list(idx)
        end = t0
        for s, st in enumerate(stages):
            slots = max(1, st["concurrency"] // div)
            if barrier:
                start = max(ready[i] for i in idx)  # failed items count at the barrier too
                arrivals = [(start, i) for i in alive]
            else:
                arrivals = [(ready[i], i) for i in alive]
            res = _run_stage(rng, arrivals, slots, means[s], error_rate if s == 0 else 0.0, 3)
            nxt = []
            for i in alive:
                calls, ok = res[i]
                recs[i]["stages"].append({"name": st["name"], "start": calls[0][0],
                                          "end": calls[-1][1], "attempts": len(calls),
                                          "calls": calls})
                ready[i] = calls[-1][1]
                end = max(end, ready[i])
                if ok:
                    nxt.append(i)
                else:
                    recs[i]["status"] = "failed"
                    recs[i]["error"] = {"stage": st["name"], "type": "TransientError",
                                        "message": "injected"}
                    recs[i]["visible_at"] = ready[i]
            alive = nxt
        for i in alive:
            recs[i]["visible_at"] = ready[i]
        if barrier:
            for i in idx:
                recs[i]["visible_at"] = end
        return end

    idx = list(range(n_run))
    params: dict[str, Any]
    if strategy == "continuous":
        params = {"max_in_flight": None}
        run_group(idx, 0.0, 1, barrier=False)
    elif strategy == "batched":
        params = {"size": size}
        t = 0.0
        for b in range(0, n_run, size):
            t = run_group(idx[b:b + size], t, 1, barrier=True)
    else:
        params = {"size": size, "lanes": lanes, "lockstep": False}
        lane_free = [0.0] * lanes
        for b in range(0, n_run, size):
            k = int(np.argmin(lane_free))
            lane_free[k] = run_group(idx[b:b + size], lane_free[k], lanes, barrier=True)
    for i in range(n_run, items):
        recs[i]["status"] = "cancelled"
    item_list = [recs[i] for i in range(items)]
    meta = {"scenario": scenario, "strategy": strategy, "params": params, "clock": clock,
            "seed": seed, "time_scale": time_scale, "items": items, "stages": stages,
            "python": "3.11", "cpus": 2, "git_commit": "test", "started_at": "2024-01-01T00:00:00"}
    if repeat is not None:
        meta["repeat"] = repeat
    return {"version": 1, "metadata": meta, "summary": summarize(item_list, stages),
            "items": item_list}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("strategy", ["continuous", "batched", "parallel-batches"])
@pytest.mark.parametrize("error_rate,cancel_from", [(0.0, None), (0.3, None), (0.1, 77)])
def test_synthetic_docs_keep_the_contract(tmp_path: Path, strategy: str, error_rate: float,
                                          cancel_from: int | None) -> None:
    import json

    doc = synthetic_doc(strategy, error_rate=error_rate, cancel_from=cancel_from)
    assert validate(doc) == []
    p = tmp_path / "doc.json"
    p.write_text(json.dumps(doc))
    assert_checker_accepts(p)


#: a small scenario with every kind of fault, for tests that run the engine (virtual ~0.05 s)
SMALL_SCENARIO = """\
# small: every fault kind, a few hundred items
name = "small"
description = "a small test scenario"
items = 150
seed = 3
time_scale = 0.004

[[stages]]
name = "fetch"
concurrency = 8
latency = { dist = "mixture", parts = [
  { weight = 0.95, dist = "lognormal", median = 1.0, p99 = 3.0 },
  { weight = 0.05, dist = "constant", value = 6.0 } ] }
errors = { rate = 0.05 }
retry = { attempts = 3, backoff = 0.5 }

[[stages]]
name = "analyze"
concurrency = 6
latency = { dist = "lognormal", median = 1.0, p99 = 4.0 }
rate_limit = { per_s = 5, burst = 2 }
retry = { attempts = 4, backoff = 0.5 }

[[stages]]
name = "save"
concurrency = 2
latency = { dist = "uniform", low = 0.05, high = 0.15 }
outages = [[5.0, 8.0]]
timeout = 0.14
retry = { attempts = 5, backoff = 1.0 }

[strategies]
continuous = {}
batched = { size = 20 }
parallel-batches = { lanes = 2, size = 20 }
"""


def small_scenario(tmp_path: Path) -> Path:
    p = tmp_path / "small.toml"
    p.write_text(SMALL_SCENARIO)
    return p
