"""Shared helpers for the engine's behaviour tests: stage functions (module level, so they
pickle for the process backend) and an independent check of a report's scheduling rules."""
from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench._metrics import max_overlap  # the one implementation (tests use the harness's)
from contract import assert_checker_accepts, keep_for_ci
from engine import Batched, Continuous, ParallelBatches, RunReport, Stage

STRATEGIES = {
    "continuous": lambda: Continuous(),
    "continuous-window": lambda: Continuous(max_in_flight=3),
    "batched": lambda: Batched(size=4),
    "parallel-batches": lambda: ParallelBatches(lanes=2, size=3),
    "lockstep": lambda: ParallelBatches(lanes=2, size=3, lockstep=True),
}


def sleepy(x: Any) -> Any:
    """Sleep a few ms that depend on the value, return it."""
    time.sleep(0.001 * (hash(str(x)) % 5))
    return x


def double(x: int) -> int:
    return x * 2


def fail_on_multiples_of_5(x: int) -> int:
    if x % 5 == 0:
        raise ValueError(f"{x} is a multiple of 5")
    return x


def stages_for(backend: str, n: int = 3) -> list[Stage]:
    ex = "process" if backend == "process" else None
    fns = [sleepy, double, fail_on_multiples_of_5]
    return [Stage(f"s{i}", fns[i % len(fns)], concurrency=2 + i, executor=ex) for i in range(n)]


def check_report(report: RunReport, stages: list[Stage], n_items: int) -> None:
    """Every item ends exactly once; limits never exceeded; stages in order; strategy rules."""
    indices = [r.index for r in report.items]
    assert sorted(indices) == list(range(n_items)), "every item ends exactly once"
    names = [s.name for s in stages]
    limits = {s.name: s.concurrency for s in stages}
    calls: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in report.items:
        got = [sp.name for sp in r.stages]
        assert got == names[: len(got)], f"item {r.index}: stages {got} out of order"
        prev = float("-inf")
        for sp in r.stages:
            for a in sp.attempts:
                assert a.start >= prev - 1e-9 and a.end >= a.start
                prev = a.end
                calls[sp.name].append((a.start, a.end))
        if r.status == "ok":
            assert got == names and r.error is None and r.visible_at is not None
            assert r.visible_at >= prev - 1e-9
        elif r.status == "failed":
            assert r.error is not None and r.visible_at is not None
        else:
            assert r.visible_at is None
    for name, iv in calls.items():
        assert max_overlap(iv) <= limits[name], f"stage {name} exceeded its limit"
    params = report.params
    if report.strategy in ("batched", "parallel-batches"):
        size = params["size"]
        lanes = params.get("lanes", 1)
        batches: dict[int, list[Any]] = defaultdict(list)
        for r in report.items:
            batches[r.index // size].append(r)
        spans = []
        for members in batches.values():
            started = [r for r in members if r.stages]
            if not started:
                continue
            for k in range(1, len(names)):
                before = [sp.end for r in members for sp in r.stages if sp.name == names[k - 1]]
                after = [sp.start for r in members for sp in r.stages if sp.name == names[k]]
                if before and after:
                    assert min(after) >= max(before) - 1e-9, "barrier broken"
            done = max(sp.end for r in started for sp in r.stages)
            vis = {r.visible_at for r in members if r.status != "cancelled"}
            assert all(v >= done - 1e-9 for v in vis), "visible before its batch completed"
            assert len(vis) <= 1, "a batch's items become visible together"
            spans.append((min(sp.start for r in started for sp in r.stages), done))
        assert max_overlap(spans) <= lanes, "more batches at once than lanes"
    else:
        window = params.get("max_in_flight")
        if window is not None:
            live = [(r.stages[0].start, r.visible_at) for r in report.items
                    if r.stages and r.visible_at is not None]
            assert max_overlap(live) <= window


def shared_check(report: RunReport, tmp_path: Path, name: str = "report") -> None:
    """Run ../shared/tools/check_results.py on the report's JSON when that checker exists."""
    path = report.save(tmp_path / f"{name}.json")
    json.loads(path.read_text())
    keep_for_ci("engine-tests", [(path, f"{tmp_path.name}-{name}.json")])
    assert_checker_accepts(path)
