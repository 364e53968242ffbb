"""``python -m bench live-services``: the sync job on real clients, fake servers and a throwaway
PostgreSQL, one process per strategy; its results files keep the contract and its report exists.

A small run (60 contacts, time_scale 0.2: 60/100 ms medians) so the three strategies take
seconds; the benchmark figures themselves come from the full run, not from this test.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench._metrics import validate
from bench._results import read_doc
from contract import assert_checker_accepts, keep_for_ci

REPO = Path(__file__).resolve().parents[1]
ITEMS = 60
STRATEGIES = ("continuous", "batched", "parallel-batches")

pytestmark = [pytest.mark.postgres]

LiveRun = tuple[Path, subprocess.CompletedProcess[str]]


@pytest.fixture(scope="module")
def live_out(tmp_path_factory: pytest.TempPathFactory) -> LiveRun:
    out = tmp_path_factory.mktemp("live-services")
    res = subprocess.run(
        [sys.executable, "-m", "bench", "live-services", "--items", str(ITEMS),
         "--time-scale", "0.2", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL)
    return out, res


@pytest.mark.timeout(300)
def test_every_strategy_writes_a_valid_results_file(live_out: LiveRun) -> None:
    out, res = live_out
    assert res.returncode == 0, res.stdout + res.stderr
    files = [out / "live-services" / f"{s}.json" for s in STRATEGIES]
    for f in files:
        doc = read_doc(f)
        assert validate(doc) == [], f
        m = doc["metadata"]
        assert (m["scenario"], m["clock"], m["time_scale"], m["items"]) == \
            ("live-services", "live", 0.2, ITEMS)
        assert doc["summary"]["ok"] == ITEMS
        assert [s["name"] for s in m["stages"]] == ["fetch", "analyze", "save", "assign"]
        assert set(m["cpu_s"]) == {"pipeline", "servers", "postgres", "total"}
        assert m["cpu_s"]["pipeline"] > 0 and m["cpu_s"]["total"] >= m["cpu_s"]["pipeline"]
    assert_checker_accepts(*files)  # the shared checker, as a second opinion
    keep_for_ci("bench-tests", [(f, f"live-services-{f.name}") for f in files])


@pytest.mark.timeout(300)
def test_every_contact_reaches_postgres_once(live_out: LiveRun) -> None:
    out, res = live_out
    assert res.returncode == 0, res.stdout + res.stderr
    for s in STRATEGIES:
        # counted in the child right after the run, before its throwaway cluster is removed
        rows = read_doc(out / "live-services" / f"{s}.json")["metadata"]["rows"]
        assert rows == {"contacts": ITEMS, "analyses": ITEMS, "pipeline_assignments": ITEMS}, s


@pytest.mark.timeout(300)
def test_report_and_plot_exist(live_out: LiveRun) -> None:
    out, res = live_out
    assert res.returncode == 0, res.stdout + res.stderr
    d = out / "live-services"
    report = (d / "report.md").read_text()
    for s in STRATEGIES:
        assert f"| {s} |" in report
    assert "vs parallel-batches" in report and "CPU s" in report
    assert (d / "visible.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert "![visible](visible.png)" in report
    assert "continuous" in res.stdout and "wrote" in res.stdout
    json.loads((d / "continuous.json").read_text())  # plain JSON, no NaN


@pytest.mark.timeout(300)
def test_processes_2_runs_the_job_in_worker_processes(tmp_path: Path) -> None:
    """``--processes 2``: the same job with its stages in two worker processes; the file keeps
    the contract, records ``processes`` and the CPU of the workers (in "pipeline"); the
    progress shown is the engine's (plain lines: stderr is not a terminal)."""
    res = subprocess.run(
        [sys.executable, "-m", "bench", "live-services", "--items", "40", "--time-scale", "0.2",
         "--strategies", "continuous", "--processes", "2", "--no-plots", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stdout + res.stderr
    f = tmp_path / "live-services" / "continuous.json"
    doc = read_doc(f)
    assert validate(doc) == []
    m = doc["metadata"]
    assert (m["processes"], m["items"], doc["summary"]["ok"]) == (2, 40, 40)
    assert m["rows"] == {"contacts": 40, "analyses": 40, "pipeline_assignments": 40}
    assert m["cpu_s"]["pipeline"] > 0
    assert_checker_accepts(f)
    assert "[1/1] live-services live x0.2 processes=2 continuous: 40 items" in res.stderr
    assert "conveyor: 40/40 visible (ok 40, failed 0) in " in res.stderr  # the engine's line
    assert "\r" not in res.stderr
    assert "[1/1] live-services live x0.2 processes=2 continuous: makespan" in res.stdout
    assert "| 2 |" in (tmp_path / "live-services" / "report.md").read_text()


@pytest.mark.timeout(60)
def test_bench_imports_without_examples() -> None:
    code = ("import sys; sys.modules['examples'] = None; "
            "import bench, bench._cli, bench._live_services, bench._live_report; "
            "print('ok')")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


@pytest.mark.timeout(60)
def test_list_mentions_live_services() -> None:
    res = subprocess.run([sys.executable, "-m", "bench", "list"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0 and "live-services" in res.stdout
