"""Sweeps: one scenario parameter over a range, every strategy at every point.

``--param PATH=START:STOP:STEP`` (STOP included when on the grid) or ``PATH=V1,V2,...``. PATH is
a dotted path into the scenario document, with stages named by name (or number):

* ``stages.analyze.concurrency``, ``stages.fetch.errors.rate``, ``items``, ...
* ``stages.fetch.slow_share`` -- the weight of the *last* part of the stage's latency mixture
  (the seed's slow API), the other parts rescaled to keep their proportions;
* ``strategies.batched.size``, ``strategies.parallel-batches.lanes``,
  ``strategies.continuous.max_in_flight``; ``strategies.*.size`` sets every strategy that has
  the parameter.

Each point is re-validated like a scenario file, so an impossible value is reported as a
ScenarioError naming the field. Points run as ordinary jobs into ``<dir>/points/`` and are read
back from those files; ``sweep.csv`` and ``sweep.png`` are written to ``<dir>``; the point files
are removed afterwards unless ``keep_runs``.
"""
from __future__ import annotations

import copy
import csv
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from bench._build import Clock
from bench._harness import Job, Outcome, execute
from bench._metrics import SUMMARY_KEYS
from bench._plots import plot_sweep
from bench._progress import Progress
from bench._results import read_doc, result_path, run_data
from bench._scenario import Scenario, ScenarioError, parse_scenario

__all__ = ["SweepParam", "apply_param", "parse_param", "run_sweep"]

_STRATEGY_PARAMS = {"continuous": ("max_in_flight",), "batched": ("size",),
                    "parallel-batches": ("size", "lanes", "lockstep")}


@dataclass(frozen=True)
class SweepParam:
    path: str
    values: tuple[int | float, ...]

    @property
    def slug(self) -> str:
        return self.path.replace("*", "all").replace("/", "_")


def _number(text: str) -> int | float:
    try:
        d = Decimal(text.strip())
    except InvalidOperation:
        raise ValueError(f"expected a number, got {text.strip()!r}") from None
    if not d.is_finite():
        raise ValueError(f"expected a finite number, got {text.strip()!r}")
    return int(d) if d == d.to_integral_value() and "." not in text and "e" not in text.lower() \
        else float(d)


def parse_param(text: str) -> SweepParam:
    """``PATH=START:STOP:STEP`` or ``PATH=V1,V2,...``; raises ValueError with what was wrong."""
    path, sep, spec = text.partition("=")
    path = path.strip()
    if not sep or not path or not spec.strip():
        raise ValueError(f"--param {text!r}: expected PATH=START:STOP:STEP or PATH=V1,V2,...")
    values: list[int | float]
    if ":" in spec:
        parts = spec.split(":")
        if len(parts) != 3:
            raise ValueError(f"--param {text!r}: expected START:STOP:STEP")
        start, stop, step = (Decimal(str(_number(p))) for p in parts)
        if step <= 0 or stop < start:
            raise ValueError(f"--param {text!r}: expected STEP > 0 and STOP >= START")
        n = int((stop - start) / step) + 1
        if n > 1000:
            raise ValueError(f"--param {text!r}: {n} points, expected at most 1000")
        is_int = all(isinstance(_number(p), int) for p in parts)
        values = [int(start + k * step) if is_int else float(start + k * step) for k in range(n)]
    else:
        values = [_number(v) for v in spec.split(",") if v.strip()]
    if not values:
        raise ValueError(f"--param {text!r}: no values")
    return SweepParam(path, tuple(values))


def _stage(raw: dict[str, Any], ref: str) -> dict[str, Any]:
    stages = raw.get("stages")
    if isinstance(stages, list):
        for k, st in enumerate(stages):
            if isinstance(st, dict) and (st.get("name") == ref or ref == str(k)):
                return st
    names = [st.get("name") for st in stages or [] if isinstance(st, dict)]
    raise ValueError(f"stages.{ref}: no such stage (stages: {', '.join(map(str, names))})")


def _set_slow_share(stage: dict[str, Any], value: float, where: str) -> None:
    lat = stage.get("latency")
    if not isinstance(lat, dict) or lat.get("dist") != "mixture" or len(lat.get("parts", [])) < 2:
        raise ValueError(f"{where}: slow_share needs a mixture latency of two or more parts")
    if not 0 <= value <= 1:
        raise ValueError(f"{where}: expected a share in [0, 1], got {value}")
    parts = [dict(p) for p in lat["parts"]]
    rest = sum(float(p["weight"]) for p in parts[:-1])
    for p in parts[:-1]:
        p["weight"] = float(p["weight"]) / rest * (1 - value) if rest else (1 - value) / (
            len(parts) - 1)
    parts[-1]["weight"] = float(value)
    stage["latency"] = dict(lat, parts=parts)


def apply_param(raw: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of the scenario document with ``path`` set to ``value``."""
    doc = copy.deepcopy(raw)
    keys = path.split(".")
    if keys[0] == "stages" and len(keys) >= 3:
        target = _stage(doc, keys[1])
        if keys[2:] == ["slow_share"]:
            _set_slow_share(target, float(value), path)
            return doc
        keys = keys[2:]
    elif keys[0] == "strategies" and len(keys) == 3 and keys[1] == "*":
        strategies = doc.get("strategies", {})
        hit = [n for n in strategies if keys[2] in _STRATEGY_PARAMS.get(n, ())]
        if not hit:
            raise ValueError(f"{path}: no strategy of the scenario has a parameter {keys[2]!r}")
        for n in hit:
            strategies[n] = dict(strategies[n], **{keys[2]: value})
        return doc
    else:
        target = doc
    for k in keys[:-1]:
        nxt = target.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise ValueError(f"{path}: {k!r} is not a table")
        target = nxt
    target[keys[-1]] = value
    return doc


def variant(sc: Scenario, param: SweepParam, value: Any) -> Scenario:
    try:
        raw = apply_param(dict(sc.raw), param.path, value)
    except ValueError as exc:
        raise ScenarioError(sc.source, param.path, str(exc)) from None
    return parse_scenario(raw, source=f"{sc.source} with {param.path}={value}")


# a sweep of a variant edits the variant's own (self-contained) document


def run_sweep(sc: Scenario, param: SweepParam, *, strategies: Sequence[str] | None,
              clock: Clock, time_scale: float | None, out: Path, keep_runs: bool = False,
              progress: Progress | None = None) -> tuple[list[dict[str, Any]], list[Outcome]]:
    """Run every point; write ``sweep.csv`` and ``sweep.png`` to ``out``; return the rows."""
    variants = [(v, variant(sc, param, v)) for v in param.values]  # validate all before running
    names = list(strategies) if strategies else [s.name for s in sc.strategies]
    points = out / "points"
    jobs = []
    for v, vsc in variants:
        for name in names:
            path = result_path(points / f"{param.slug}={v}", sc.name, name,
                               1 if clock == "live" else None)
            jobs.append(Job(vsc, name, clock, path, time_scale, 1 if clock == "live" else None,
                            {"sweep": {"param": param.path, "value": v}}))
    outcomes = execute(jobs, progress or Progress(len(jobs)))
    rows = []
    for o in outcomes:
        if not o.job.path.exists():
            continue
        data = run_data(read_doc(o.job.path), o.job.path)
        row: dict[str, Any] = {"param": param.path, "value": data.metadata["sweep"]["value"],
                               "strategy": data.strategy, "clock": data.clock}
        row.update({k: data.summary[k] for k in SUMMARY_KEYS})
        row["budget_bound_s"] = data.summary.get("budget_bound_s", "")
        row["overloaded"] = data.overloaded
        row["overload_share"] = round(data.overload_share, 6)
        row["valid"] = "yes" if not data.problems else "NO: " + data.problems[0]
        rows.append(row)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "sweep.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["param", "value", "strategy", "clock", *SUMMARY_KEYS,
                                          "budget_bound_s", "overloaded", "overload_share",
                                          "valid"])
        w.writeheader()
        w.writerows(rows)
    if not keep_runs:
        shutil.rmtree(points, ignore_errors=True)
    plot_sweep_csv(out / "sweep.csv", out / "sweep.png", sc.name)
    return rows, outcomes


def plot_sweep_csv(csv_path: Path, png: Path, scenario: str) -> Path:
    """The sweep curves, from the saved CSV."""
    with csv_path.open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    param = rows[0]["param"] if rows else "value"
    clock = rows[0]["clock"] if rows else "virtual"
    return plot_sweep(rows, param, png, f"{scenario}: sweep of {param} ({clock} clock)")
