"""Results files written by the harness -- virtual in-process, live in a spawned process --
keep the contract: they pass bench's own validation and ../shared/tools/check_results.py."""
from __future__ import annotations

from pathlib import Path

import pytest
from test_bench_synthetic import small_scenario

from bench import load_scenario
from bench._harness import execute, plan
from bench._metrics import summarize, validate
from bench._progress import Progress
from bench._results import load_runs, read_doc
from contract import assert_checker_accepts, keep_for_ci

STRATEGIES = ["continuous", "batched", "parallel-batches"]


def _check_files(paths: list[Path]) -> None:
    for p in paths:
        doc = read_doc(p)
        assert validate(doc) == [], p
        assert doc["metadata"]["scenario"] == "small"
        assert doc["metadata"]["git_commit"]
    assert_checker_accepts(*paths)  # the independent checker, when ../shared is there
    keep_for_ci("bench-tests", [(p, f"{p.parent.parent.name}-{p.name}") for p in paths])


@pytest.mark.timeout(120)
def test_virtual_runs_write_valid_files(tmp_path: Path) -> None:
    sc = load_scenario(small_scenario(tmp_path))
    jobs = plan(sc, strategies=None, clock="virtual", repeats=1, time_scale=None,
                out=tmp_path / "out")
    outcomes = execute(jobs, Progress(len(jobs), tty=False))
    assert all(o.ok for o in outcomes), [o.message for o in outcomes]
    paths = [tmp_path / "out" / "small" / f"{s}.json" for s in STRATEGIES]
    _check_files(paths)
    for p in paths:
        doc = read_doc(p)
        assert doc["metadata"]["clock"] == "virtual" and doc["metadata"]["time_scale"] == 1.0
        assert doc["summary"]["ok"] + doc["summary"]["failed"] == 150
        # the summary bench recomputes is the one the engine wrote
        mine = summarize(doc["items"], doc["metadata"]["stages"])
        for k, v in mine.items():
            assert doc["summary"][k] == pytest.approx(v, rel=1e-9, abs=1e-9) or (
                doc["summary"][k] is None and v == 0.0), k


@pytest.mark.timeout(120)
def test_virtual_repeats_vary_the_seed(tmp_path: Path) -> None:
    sc = load_scenario(small_scenario(tmp_path))
    jobs = plan(sc, strategies=["continuous"], clock="virtual", repeats=2, time_scale=None,
                out=tmp_path)
    assert [j.path.name for j in jobs] == ["continuous-r1.json", "continuous-r2.json"]
    assert [j.scenario.seed for j in jobs] == [3, 4]
    execute(jobs, Progress(2, tty=False))
    runs = load_runs(tmp_path)
    assert sorted(r.metadata["seed"] for r in runs) == [3, 4]


@pytest.mark.timeout(180)
def test_live_runs_in_their_own_process_write_valid_files(tmp_path: Path) -> None:
    sc = load_scenario(small_scenario(tmp_path))
    # at 0.05 the contract's visibility lag (0.1 scenario s) is 5 ms real: enough headroom for
    # a 2-core machine that other work shares
    jobs = plan(sc, strategies=None, clock="live", repeats=1, time_scale=0.05,
                out=tmp_path / "out")
    assert [j.path.name for j in jobs] == [f"{s}-r1.json" for s in STRATEGIES]
    outcomes = execute(jobs, Progress(len(jobs), tty=False))
    assert all(o.ok for o in outcomes), [o.message for o in outcomes]
    paths = [j.path for j in jobs]
    _check_files(paths)
    for p in paths:
        meta = read_doc(p)["metadata"]
        assert meta["clock"] == "live" and meta["time_scale"] == 0.05 and meta["repeat"] == 1


@pytest.mark.timeout(120)
def test_a_failing_live_run_is_reported_not_fatal(tmp_path: Path) -> None:
    sc = load_scenario(small_scenario(tmp_path))
    jobs = plan(sc, strategies=["continuous"], clock="live", repeats=1, time_scale=0.02,
                out=tmp_path / "out")
    bad = [type(jobs[0])(sc, "no-such-strategy", "live", jobs[0].path, 0.02, 1)]
    outcomes = execute(bad + jobs, Progress(2, tty=False))
    assert not outcomes[0].ok and "FAILED" in outcomes[0].message
    assert "no-such-strategy" in outcomes[0].message
    assert "FAILED" not in outcomes[1].message and outcomes[1].job.path.exists()
