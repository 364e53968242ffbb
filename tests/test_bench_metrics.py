"""The summary is computed from item records only, exactly as DESIGN.md section 6 defines it, and
bench's own validation agrees with ../shared/tools/check_results.py on good and broken files."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_bench_synthetic import synthetic_doc

from bench._metrics import max_overlap, summarize, validate
from contract import CHECKER, load_checker, run_checker


def _item(index: int, status: str, stages: list[tuple[str, list[list[float]]]],
          visible: float | None, error: dict[str, str] | None = None) -> dict[str, Any]:
    return {"index": index, "key": str(index), "status": status, "visible_at": visible,
            "error": error,
            "stages": [{"name": n, "start": calls[0][0], "end": calls[-1][1],
                        "attempts": len(calls), "calls": calls} for n, calls in stages]}


def hand_doc() -> dict[str, Any]:
    """Five items through a (limit 2) -> b (limit 1); worked out by hand below."""
    stages = [{"name": "a", "concurrency": 2}, {"name": "b", "concurrency": 1}]
    items = [
        _item(0, "ok", [("a", [[0, 1]]), ("b", [[1, 3]])], 3),
        _item(1, "ok", [("a", [[0, 2]]), ("b", [[3, 4]])], 4),
        _item(2, "failed", [("a", [[1, 1.5], [2, 2.5]])], 2.5,
              {"stage": "a", "type": "TransientError", "message": "boom"}),
        _item(3, "ok", [("a", [[2.5, 3]]), ("b", [[4, 6]])], 6),
        _item(4, "cancelled", [], None),
    ]
    meta = {"scenario": "hand", "strategy": "continuous", "params": {"max_in_flight": None},
            "clock": "virtual", "seed": 0, "time_scale": 1.0, "items": 5, "stages": stages}
    return {"version": 1, "metadata": meta, "summary": summarize(items, stages), "items": items}


# busy(a) = 1 + 2 + 0.5 + 0.5 + 0.5 = 4.5 over 2 slots = 2.25; busy(b) = 2 + 1 + 2 = 5 over
# 1 slot = 5; longest item = 3 (items 0 and 1): lower bound 5. Visible ok: 3, 4, 6 -> p90 is
# 4 + 0.8 * (6 - 4) = 5.6 and p99 is 4 + 0.98 * 2 = 5.96 (linear interpolation).
EXPECTED = {"makespan_s": 6.0, "throughput_per_s": 0.5, "lower_bound_s": 5.0,
            "efficiency": 5 / 6, "first_visible_s": 3.0, "visible_p50_s": 4.0,
            "visible_p90_s": 5.6, "visible_p99_s": 5.96, "visible_max_s": 6.0, "ok": 3,
            "failed": 1, "cancelled": 1}


@pytest.mark.timeout(30)
def test_summary_matches_the_hand_computed_example() -> None:
    got = hand_doc()["summary"]
    assert got.keys() == EXPECTED.keys()
    for k, v in EXPECTED.items():
        assert got[k] == pytest.approx(v, abs=1e-12), k


@pytest.mark.timeout(30)
def test_undefined_values_are_zero_when_nothing_is_ok() -> None:
    stages = [{"name": "a", "concurrency": 1}]
    items = [_item(0, "failed", [("a", [[0, 1]])], 1.0, {"stage": "a", "type": "E",
                                                          "message": "x"})]
    s = summarize(items, stages)
    assert s["makespan_s"] == 1.0 and s["throughput_per_s"] == 0.0 and s["ok"] == 0
    assert s["visible_p99_s"] == 0.0 and s["first_visible_s"] == 0.0


def _checker_accepts(tmp_path: Path, doc: dict[str, Any]) -> bool | None:
    if not CHECKER.exists():
        return None
    p = tmp_path / "doc.json"
    p.write_text(json.dumps(doc))
    return run_checker(p).returncode == 0


@pytest.mark.timeout(60)
def test_hand_example_passes_both_checks(tmp_path: Path) -> None:
    doc = hand_doc()
    assert validate(doc) == []
    assert _checker_accepts(tmp_path, doc) in (True, None)


def _break(doc: dict[str, Any], how: str) -> dict[str, Any]:
    d = copy.deepcopy(doc)
    items = d["items"]
    if how == "summary":
        d["summary"]["visible_p99_s"] += 1.0
    elif how == "limit":  # a third call of stage a while two run
        items[3]["stages"][0]["calls"] = [[0.5, 3]]
        items[3]["stages"][0]["start"] = 0.5
        d["summary"] = summarize(items, d["metadata"]["stages"])
    elif how == "order":
        items[0]["stages"].reverse()
    elif how == "visible-early":
        items[0]["visible_at"] = 2.0
        d["summary"] = summarize(items, d["metadata"]["stages"])
    elif how == "ok-with-error":
        items[0]["error"] = {"stage": "a", "type": "E", "message": "x"}
    elif how == "attempts":
        items[2]["stages"][0]["attempts"] = 1
    elif how == "count":
        d["metadata"]["items"] = 7
    elif how == "version":
        d["version"] = 2
    return d


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["summary", "limit", "order", "visible-early", "ok-with-error",
                                 "attempts", "count", "version"])
def test_broken_documents_are_rejected_by_both_checks(tmp_path: Path, how: str) -> None:
    doc = _break(hand_doc(), how)
    assert validate(doc), how
    assert _checker_accepts(tmp_path, doc) in (False, None)


@pytest.mark.timeout(60)
def test_broken_barrier_is_rejected_by_both_checks(tmp_path: Path) -> None:
    doc = synthetic_doc("batched", 40, size=10)
    assert validate(doc) == []
    it = doc["items"][5]  # start its second stage before its batch finished the first
    first_end = max(d["stages"][0]["end"] for d in doc["items"][:10])
    second = it["stages"][1]
    shift = second["start"] - (first_end - 0.01)
    second["calls"] = [[s - shift, e - shift] for s, e in second["calls"]]
    second["start"], second["end"] = second["calls"][0][0], second["calls"][-1][1]
    for later in it["stages"][2:]:  # keep its own stages in order
        assert later["start"] >= second["end"]
    doc["summary"] = summarize(doc["items"], doc["metadata"]["stages"])
    problems = validate(doc)
    assert any("batch 0" in p for p in problems), problems
    assert _checker_accepts(tmp_path, doc) in (False, None)


@pytest.mark.timeout(120)
@settings(max_examples=200, deadline=None)
@given(xs=st.lists(st.floats(0, 1e5, allow_nan=False), min_size=1, max_size=60))
def test_percentiles_are_numpys_linear_and_the_checkers(xs: list[float]) -> None:
    stages = [{"name": "a", "concurrency": 1}]
    items = [_item(i, "ok", [("a", [[0.0, 0.0]])], x) for i, x in enumerate(xs)]
    s = summarize(items, stages)
    for q in (50, 90, 99):
        assert s[f"visible_p{q}_s"] == pytest.approx(float(np.percentile(xs, q)), rel=1e-12,
                                                     abs=1e-9)
    chk = load_checker()
    if chk is not None:
        for q in (50, 90, 99):
            assert s[f"visible_p{q}_s"] == pytest.approx(chk.percentile(sorted(xs), q),
                                                         rel=1e-12, abs=1e-9)


@pytest.mark.timeout(30)
def test_max_overlap_frees_a_slot_at_the_instant_it_ends() -> None:
    assert max_overlap([]) == 0
    assert max_overlap([(0, 1), (1, 2)]) == 1
    assert max_overlap([(0, 2), (1, 3), (2, 4)]) == 2
    assert max_overlap([(0, 5), (1, 2), (1, 2), (3, 4)]) == 3
