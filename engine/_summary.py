"""The summary of a results document (DESIGN.md §6 and §6.1), computed from its item
documents only: makespan, throughput, the lower bound (and the budget bound), efficiency and
the visibility percentiles. The harness (``bench._metrics``) recomputes it independently, with
numpy, to verify what the engine wrote."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["budget_bound", "percentile", "summarize"]


def percentile(sorted_xs: Sequence[float], q: float) -> float:
    """``numpy.percentile``'s default (linear) method, on an already sorted sequence."""
    if not sorted_xs:
        raise ValueError("percentile of an empty sequence")
    h = (len(sorted_xs) - 1) * q / 100.0
    lo = math.floor(h)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (h - lo) * (sorted_xs[hi] - sorted_xs[lo])


def budget_bound(items: Sequence[Mapping[str, Any]],
                 budgets: Sequence[Mapping[str, Any]]) -> float:
    """DESIGN §6.1: the largest, over budgets and dimensions, of (cost of the calls that
    succeeded - burst) / (per_minute / 60). A call's cost is its ``cost`` extra (``requests``
    1 when missing); a stage restored from a ledger or failed costs nothing."""
    if not budgets:
        return 0.0
    used: dict[tuple[int, str], float] = {}
    for it in items:
        error = it.get("error") or {}
        failed_stage = error.get("stage") if it["status"] == "failed" else None
        for st in it["stages"]:
            if st.get("resumed") or st["name"] == failed_stage:
                continue
            kept = [c for c in st["calls"] if len(c) < 3 or not c[2].get("lost")]
            if not kept:
                continue
            cost = (kept[-1][2].get("cost") if len(kept[-1]) > 2 else None) or {}
            for b, bud in enumerate(budgets):
                if st["name"] in bud.get("stages", ()):
                    for dim in bud["per_minute"]:
                        default = 1.0 if dim == "requests" else 0.0
                        used[(b, dim)] = used.get((b, dim), 0.0) + float(cost.get(dim, default))
    bound = 0.0
    for (b, dim), total in used.items():
        rate = float(budgets[b]["per_minute"][dim]) / 60.0
        burst = float((budgets[b].get("burst") or {}).get(dim, 0.0))
        if rate > 0:
            bound = max(bound, max(0.0, total - burst) / rate)
    return bound


def summarize(items: Sequence[Mapping[str, Any]], limits: Mapping[str, int],
              budgets: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """The §6 summary, computed from item documents only (``to_json()["items"]``); with
    ``budgets`` (``metadata.budgets``) it adds ``budget_bound_s`` and counts it in the lower
    bound (§6.1).

    Undefined values (nothing visible, no ok item) are 0, so every field is a number. The
    harness (``bench._metrics``) recomputes the same summary independently, with numpy, to
    verify what the engine wrote.
    """
    counts = {"ok": 0, "failed": 0, "cancelled": 0}
    visible_ok: list[float] = []
    visible_any: list[float] = []
    busy: dict[str, float] = dict.fromkeys(limits, 0.0)
    chain_max = 0.0
    for it in items:
        counts[it["status"]] += 1
        total = 0.0
        for st in it["stages"]:
            b = sum(c[1] - c[0] for c in st["calls"] if len(c) < 3 or not c[2].get("lost"))
            busy[st["name"]] += b
            total += b
        chain_max = max(chain_max, total)
        v = it["visible_at"]
        if v is not None:
            visible_any.append(v)
            if it["status"] == "ok":
                visible_ok.append(v)
    makespan = max(visible_any) if visible_any else 0.0
    bb = budget_bound(items, budgets or ())
    lower = max([busy[n] / limits[n] for n in busy] + [chain_max, bb, 0.0])
    xs = sorted(visible_ok)

    def pct(q: float) -> float:
        return percentile(xs, q) if xs else 0.0

    return {
        "makespan_s": makespan,
        "throughput_per_s": counts["ok"] / makespan if makespan > 0 else 0.0,
        "lower_bound_s": lower,
        "efficiency": lower / makespan if makespan > 0 else 0.0,
        "first_visible_s": xs[0] if xs else 0.0,
        "visible_p50_s": pct(50),
        "visible_p90_s": pct(90),
        "visible_p99_s": pct(99),
        "visible_max_s": xs[-1] if xs else 0.0,
        **counts,
        **({"budget_bound_s": bb} if budgets else {}),
    }
