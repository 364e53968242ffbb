"""Metrics from item records only (DESIGN.md section 6), and the project's own results check.

``summarize`` is the one place the summary is computed: the harness uses it to verify what the
engine wrote, reports and plots use it on saved files. ``validate`` checks a results document
against the contract -- shape, summary, per-stage limits, stage order, barriers, visibility --
independently of ``../shared/tools/check_results.py`` (which tests run as a second opinion).
"""
from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "SUMMARY_KEYS",
    "budget_bound",
    "close",
    "max_overlap",
    "summarize",
    "validate",
    "visible_ok",
]

SUMMARY_KEYS = ("makespan_s", "throughput_per_s", "lower_bound_s", "efficiency",
                "first_visible_s", "visible_p50_s", "visible_p90_s", "visible_p99_s",
                "visible_max_s", "ok", "failed", "cancelled")
METADATA_KEYS = ("scenario", "strategy", "params", "clock", "seed", "time_scale", "items",
                 "stages")
STATUSES = ("ok", "failed", "cancelled")
EPS = 1e-6

Doc = Mapping[str, Any]


def close(a: float, b: float) -> bool:
    """Equal up to float noise and the rounding of times written to JSON."""
    return abs(a - b) <= 1e-6 + 1e-4 * max(abs(a), abs(b))


def visible_ok(items: Iterable[Mapping[str, Any]]) -> np.ndarray:
    """``visible_at`` of the ok items, sorted: the time-to-visible sample."""
    return np.sort(np.array([it["visible_at"] for it in items if it["status"] == "ok"],
                            dtype=float))


def _calls(st: Mapping[str, Any]) -> list[tuple[float, float, Mapping[str, Any]]]:
    """A stage's calls as (start, end, extras): a call is [start, end] or [start, end, extras]
    (DESIGN.md section 6.1: hedge, lost, cost)."""
    return [(float(c[0]), float(c[1]), c[2] if len(c) > 2 else {}) for c in st["calls"]]


def budget_bound(items: Sequence[Mapping[str, Any]],
                 budgets: Sequence[Mapping[str, Any]]) -> float:
    """DESIGN.md section 6.1's ``budget_bound_s``: the largest, over budgets and dimensions, of
    (cost of the calls that succeeded - burst) / (per_minute / 60).

    The calls that succeeded are the last call not ``lost`` of each stage an item completed
    (the stage its failed item failed at and stages restored from a ledger are not counted):
    the work any schedule must pay for. A call without a ``cost`` counts 1 request.
    """
    if not budgets:
        return 0.0
    on = [(set(b.get("stages") or ()), b) for b in budgets]
    used = np.zeros((len(budgets), max(len(b["per_minute"]) for b in budgets)))
    dims = [list(b["per_minute"]) for b in budgets]
    for it in items:
        err = it.get("error") or {}
        failed_at = err.get("stage") if it["status"] == "failed" else None
        for st in it["stages"]:
            if st.get("resumed") or st["name"] == failed_at:
                continue
            kept = [c for c in _calls(st) if not c[2].get("lost")]
            if not kept:
                continue
            cost = kept[-1][2].get("cost") or {}
            for k, (names, _) in enumerate(on):
                if st["name"] in names:
                    for d, dim in enumerate(dims[k]):
                        used[k, d] += float(cost.get(dim, 1.0 if dim == "requests" else 0.0))
    bound = 0.0
    for k, b in enumerate(budgets):
        burst = b.get("burst") or {}
        for d, dim in enumerate(dims[k]):
            rate = float(b["per_minute"][dim]) / 60.0
            if rate > 0:
                bound = max(bound, max(0.0, used[k, d] - float(burst.get(dim, 0.0))) / rate)
    return bound


def summarize(items: Sequence[Mapping[str, Any]], stages: Sequence[Mapping[str, Any]],
              budgets: Sequence[Mapping[str, Any]] | None = None) -> dict[str, float | int]:
    """The summary of DESIGN.md section 6, from the item records and the stage limits; with
    ``budgets`` (``metadata.budgets``, section 6.1) also ``budget_bound_s``, which then counts
    in ``lower_bound_s``.

    Values that are undefined (no item visible, no ok item) are 0. Lost calls (a hedge's
    discarded twin) count for concurrency, not for the bound.
    """
    limits = {s["name"]: int(s["concurrency"]) for s in stages}
    counts = dict.fromkeys(STATUSES, 0)
    busy: dict[str, float] = defaultdict(float)
    chain_max = 0.0
    visible_any: list[float] = []
    for it in items:
        counts[it["status"]] += 1
        chain = 0.0
        for st in it["stages"]:
            b = sum(e - s for s, e, x in _calls(st) if not x.get("lost"))
            busy[st["name"]] += b
            chain += b
        chain_max = max(chain_max, chain)
        if it["status"] != "cancelled" and it["visible_at"] is not None:
            visible_any.append(float(it["visible_at"]))
    makespan = max(visible_any, default=0.0)
    lower_bound = max([busy[n] / limits[n] for n in busy] + [chain_max])
    bb = budget_bound(items, budgets) if budgets else None
    if bb is not None:
        lower_bound = max(lower_bound, bb)
    out: dict[str, float | int] = {
        "makespan_s": makespan,
        "throughput_per_s": counts["ok"] / makespan if makespan > 0 else 0.0,
        "lower_bound_s": lower_bound,
        "efficiency": lower_bound / makespan if makespan > 0 else 0.0,
    }
    xs = visible_ok(items)
    if xs.size:
        p50, p90, p99 = np.percentile(xs, [50, 90, 99])  # numpy's default: linear
        out.update(first_visible_s=float(xs[0]), visible_p50_s=float(p50),
                   visible_p90_s=float(p90), visible_p99_s=float(p99),
                   visible_max_s=float(xs[-1]))
    else:
        out.update(first_visible_s=0.0, visible_p50_s=0.0, visible_p90_s=0.0,
                   visible_p99_s=0.0, visible_max_s=0.0)
    out.update(counts)
    if bb is not None:
        out["budget_bound_s"] = bb
    return out


def max_overlap(intervals: Iterable[tuple[float, float]]) -> int:
    """Most intervals open at one instant; an interval ending at t frees its slot for one
    starting at t."""
    iv = np.asarray(list(intervals), dtype=float).reshape(-1, 2)
    if not iv.size:
        return 0
    times = np.concatenate([iv[:, 0], iv[:, 1]])
    deltas = np.concatenate([np.ones(len(iv), dtype=int), -np.ones(len(iv), dtype=int)])
    order = np.lexsort((deltas, times))  # by time, then ends (-1) before starts (+1)
    return int(np.cumsum(deltas[order]).max())


# --------------------------------------------------------------------------- validation


def validate(doc: Doc) -> list[str]:
    """Problems with a results document; an empty list means it keeps the contract."""
    try:
        return _validate(doc)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        return [f"malformed: {type(exc).__name__}: {exc}"]


def _validate(doc: Doc) -> list[str]:
    if not isinstance(doc, Mapping) or doc.get("version") != 1:
        return [f"version is {doc.get('version') if isinstance(doc, Mapping) else doc!r}, "
                "expected 1"]
    meta, summary, items = doc.get("metadata"), doc.get("summary"), doc.get("items")
    if not isinstance(meta, Mapping) or not isinstance(summary, Mapping) \
            or not isinstance(items, list):
        return ["metadata and summary must be objects and items a list"]
    errs = [f"metadata lacks {k!r}" for k in METADATA_KEYS if k not in meta]
    errs += [f"summary lacks {k!r}" for k in SUMMARY_KEYS if k not in summary]
    if errs:
        return errs
    if meta["clock"] not in ("live", "virtual"):
        errs.append(f"metadata.clock is {meta['clock']!r}")
    if meta["items"] != len(items):
        errs.append(f"metadata.items is {meta['items']} but {len(items)} items are listed")
    names = [s["name"] for s in meta["stages"]]
    limits = {s["name"]: s["concurrency"] for s in meta["stages"]}
    indices = [it["index"] for it in items]
    if sorted(indices) != list(range(len(items))):
        errs.append("item indices are not 0..items-1, each once")
    errs += _check_items(items, names)
    if errs:
        return errs

    budgets = meta.get("budgets") or None
    want = summarize(items, meta["stages"], budgets)
    # with no ok item (or nothing visible) these are undefined: 0 or null are both accepted
    undefined = set()
    if not want["ok"]:
        undefined |= {"first_visible_s", "visible_p50_s", "visible_p90_s", "visible_p99_s",
                      "visible_max_s"}
    if not want["makespan_s"]:
        undefined |= {"makespan_s", "throughput_per_s", "efficiency"}
    keys = list(SUMMARY_KEYS)
    if budgets or "budget_bound_s" in summary:
        want.setdefault("budget_bound_s", 0.0)
        keys.append("budget_bound_s")
    for k in keys:
        got = summary.get(k)
        if got is None and k in undefined:
            continue
        if not isinstance(got, int | float) or not close(float(got), float(want[k])):
            errs.append(f"summary.{k} is {got!r}, recomputed from items: {want[k]:.6g}")

    by_stage: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for it in items:
        for st in it["stages"]:
            by_stage[st["name"]].extend((c[0], c[1]) for c in st["calls"])  # lost ones too
    for name, calls in by_stage.items():
        peak = max_overlap(calls)
        if peak > limits[name]:
            errs.append(f"stage {name}: {peak} calls at once, limit {limits[name]}")

    strategy, params = meta["strategy"], meta["params"] or {}
    if strategy == "continuous":
        errs += _check_continuous(items, params, float(want["makespan_s"]))
    elif strategy in ("batched", "parallel-batches"):
        errs += _check_batches(items, names, params,
                               params.get("lanes", 1) if strategy == "parallel-batches" else 1)
    else:
        errs.append(f"strategy {strategy!r} is not continuous, batched or parallel-batches")
    return errs


def _check_items(items: Sequence[Mapping[str, Any]], names: list[str]) -> list[str]:
    errs: list[str] = []
    for it in items:
        where = f"item {it['index']}"
        status = it["status"]
        reached = [st["name"] for st in it["stages"]]
        if status not in STATUSES:
            errs.append(f"{where}: status {status!r}")
        elif reached != names[:len(reached)]:
            errs.append(f"{where}: stages {reached} are not in pipeline order {names}")
        elif status == "ok" and (reached != names or it.get("error") is not None):
            errs.append(f"{where}: ok but reached {reached} or carries an error")
        elif status == "failed" and not it.get("error"):
            errs.append(f"{where}: failed without an error")
        prev = -math.inf
        for st in it["stages"]:
            calls = _calls(st)
            if st.get("resumed"):  # restored from a ledger: no call in this run
                if calls or st["attempts"] != 0:
                    errs.append(f"{where}/{st['name']}: resumed but lists calls")
                prev = max(prev, float(st["end"]))
                continue
            primary = [c for c in calls if not c[2].get("hedge")]
            if not calls or st["attempts"] != len(primary):
                errs.append(f"{where}/{st['name']}: attempts {st['attempts']}, {len(primary)} "
                            "calls (not counting hedges)")
                break
            kept = [c for c in calls if not c[2].get("lost")] or calls
            if not close(st["start"], min(c[0] for c in calls)) \
                    or not close(st["end"], kept[-1][1]):
                errs.append(f"{where}/{st['name']}: start/end are not its first/last call's")
            last = -math.inf
            for s, e, x in calls:
                if e < s - EPS or s < prev - EPS:
                    errs.append(f"{where}/{st['name']}: call [{s}, {e}] starts before the "
                                "previous stage ended")
                if not x.get("hedge"):
                    if s < last - EPS:
                        errs.append(f"{where}/{st['name']}: call [{s}, {e}] overlaps the one "
                                    "before")
                    last = e
            prev = kept[-1][1]
        v = it["visible_at"]
        if (v is None) != (status == "cancelled"):
            errs.append(f"{where}: {status} with visible_at {v}")
        elif v is not None and v < prev - EPS:
            errs.append(f"{where}: visible at {v} before its last call ended at {prev}")
        if len(errs) >= 20:
            break
    return errs


def _check_continuous(items: Sequence[Mapping[str, Any]], params: Mapping[str, Any],
                      makespan: float) -> list[str]:
    errs = []
    bound = params.get("max_in_flight")
    if bound is not None:
        spans = [(it["stages"][0]["start"], it["visible_at"]) for it in items
                 if it["stages"] and it["visible_at"] is not None]
        peak = max_overlap(spans)
        if peak > bound:
            errs.append(f"continuous: {peak} items in flight at once, max_in_flight {bound}")
    lag_allowed = max(0.005 * makespan, 0.1)
    late = [it["index"] for it in items
            if it["status"] == "ok" and it["visible_at"] - it["stages"][-1]["end"] > lag_allowed]
    if late:
        errs.append(f"continuous: {len(late)} items visible over {lag_allowed:.3g}s after they "
                    f"were done (first {late[:5]})")
    return errs


def _check_batches(items: Sequence[Mapping[str, Any]], names: list[str],
                   params: Mapping[str, Any], lanes: int) -> list[str]:
    size = params.get("size")
    if not isinstance(size, int) or size < 1:
        return [f"params.size is {size!r}"]
    errs: list[str] = []
    batches: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
    for it in items:
        batches[it["index"] // size].append(it)
    spans = []
    for b, members in sorted(batches.items()):
        per_stage: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for it in members:
            for st in it["stages"]:
                per_stage[st["name"]].append((st["start"], st["end"]))
        if not per_stage:
            continue
        for prev, nxt in itertools.pairwise(names):
            if per_stage[prev] and per_stage[nxt]:
                barrier = max(e for _, e in per_stage[prev])
                first = min(s for s, _ in per_stage[nxt])
                if first < barrier - EPS:
                    errs.append(f"batch {b}: {nxt} started at {first:.6g} before {prev} of the "
                                f"batch ended at {barrier:.6g}")
        done = max(e for spans_ in per_stage.values() for _, e in spans_)
        early = [it["index"] for it in members
                 if it["visible_at"] is not None and it["visible_at"] < done - EPS]
        if early:
            errs.append(f"batch {b}: items {early[:5]} visible before the batch completed")
        spans.append((min(s for spans_ in per_stage.values() for s, _ in spans_), done))
    peak = max_overlap(spans)
    if peak > lanes:
        errs.append(f"{peak} batches ran at once, lanes {lanes}")
    return errs
