"""report.md, summary.csv and the plots are built from saved files only, and say what the
files say."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from test_bench_synthetic import synthetic_doc

from bench._plots import plot_dir
from bench._report import group_runs, headline_table, write_report
from bench._results import load_runs, result_path, write_doc, write_summary_csv

PNG = b"\x89PNG\r\n\x1a\n"


def _write_set(root: Path) -> None:
    for st in ("continuous", "batched", "parallel-batches"):
        write_doc(synthetic_doc(st, 200, size=20, lanes=2, error_rate=0.02),
                  result_path(root, "synthetic", st))
        for r in (1, 2, 3):
            write_doc(synthetic_doc(st, 200, seed=10 + r, size=20, lanes=2, clock="live",
                                    repeat=r, time_scale=0.02),
                      result_path(root, "synthetic", st, r))
    # other JSON under results/ (pytest-benchmark's) is not a results file: skipped
    (root / "benchmarks").mkdir()
    (root / "benchmarks" / "bench.json").write_text(json.dumps({"benchmarks": []}))


@pytest.mark.timeout(120)
def test_report_csv_and_plots_from_saved_files(tmp_path: Path) -> None:
    _write_set(tmp_path)
    runs = load_runs(tmp_path)
    assert len(runs) == 12 and all(not r.problems for r in runs)
    groups = group_runs(runs)
    assert [(g.clock, g.strategy, len(g.runs)) for g in groups] == [
        ("virtual", "continuous", 1), ("virtual", "parallel-batches", 1),
        ("virtual", "batched", 1), ("live", "continuous", 3), ("live", "parallel-batches", 3),
        ("live", "batched", 3)]

    plots = plot_dir(runs, tmp_path)
    files = [p for ps in plots.values() for p in ps]
    assert {p.name for p in files} == {"visible.png", "ecdf.png", "bars.png", "gantt.png",
                                       "speedup.png"}
    for p in files:
        assert p.read_bytes()[:8] == PNG and p.stat().st_size > 10_000

    write_summary_csv(runs, tmp_path, tmp_path / "summary.csv")
    with (tmp_path / "summary.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 12
    virt = next(r for r in rows if r["clock"] == "virtual" and r["strategy"] == "batched")
    doc = json.loads((tmp_path / "synthetic" / "batched.json").read_text())
    assert float(virt["makespan_s"]) == pytest.approx(doc["summary"]["makespan_s"], abs=1e-6)

    write_report(runs, tmp_path, tmp_path / "report.md", plots)
    md = (tmp_path / "report.md").read_text()
    cont = next(g for g in groups if g.clock == "virtual" and g.strategy == "continuous")
    batch = next(g for g in groups if g.clock == "virtual" and g.strategy == "batched")
    speedup = batch.mean("makespan_s") / cont.mean("makespan_s")
    assert f"{speedup:.2f}x" in md
    assert f"{cont.mean('visible_p99_s'):.1f}" in md
    assert "Live vs virtual" in md and "± " in md   # repeats shown with their spread
    assert "![gantt](synthetic/gantt.png)" in md
    assert "All 12 results files pass" in md

    table = headline_table(runs)
    assert table.splitlines()[0].split()[:3] == ["scenario", "clock", "strategy"]
    assert len(table.splitlines()) == 2 + 6


@pytest.mark.timeout(60)
def test_report_lists_invalid_files(tmp_path: Path) -> None:
    doc = synthetic_doc("continuous", 50)
    doc["summary"]["makespan_s"] *= 2
    write_doc(doc, result_path(tmp_path, "synthetic", "continuous"))
    runs = load_runs(tmp_path)
    assert runs[0].problems
    write_report(runs, tmp_path, tmp_path / "report.md")
    assert "1 of 1 results files fail" in (tmp_path / "report.md").read_text()
