"""``python -m bench`` (``./run.sh``) leaves the checkout clean: the default suite writes to
``results/latest/``, which it marks git-ignored, and rewrites the committed reference results in
``results/`` only with ``--out results``. Rows that come from results files the command did not
write -- committed reference files, earlier runs -- are labelled as such in the printed table and
in report.md.

The tests run the default suite's own machinery in process, in a throwaway git checkout, on one
tiny built-in scenario (virtual clock, no live runs), so they take seconds."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from test_bench_synthetic import SMALL_SCENARIO, synthetic_doc

import bench._cli as cli
from bench._results import load_runs, result_path, write_doc

TINY = SMALL_SCENARIO.replace("items = 150", "items = 40")


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t",
                           *args], check=True, capture_output=True, text=True).stdout


def _strategy(row: str) -> str:
    return next(s for s in ("continuous", "parallel-batches", "batched") if f" {s} " in row)


@pytest.fixture
def checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A git checkout like ours: committed reference results (a live-services run, a report)
    under results/, and one built-in scenario, 'small'."""
    repo = tmp_path / "checkout"
    repo.mkdir()
    git(repo, "init", "-q")
    write_doc(synthetic_doc("continuous", 30, clock="live", scenario="live-services",
                            time_scale=0.4), result_path(repo / "results", "live-services",
                                                         "continuous"))
    (repo / "results" / "report.md").write_text("# the committed reference report\n")
    (repo / "results" / "peers").mkdir()
    (repo / "results" / "peers" / "peers.md").write_text("# peers\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "reference results")
    scenarios = tmp_path / "scenarios"
    scenarios.mkdir()
    (scenarios / "small.toml").write_text(TINY)
    monkeypatch.setattr(cli, "builtin_names", lambda: ["small"])
    monkeypatch.setattr(cli, "builtin_path", lambda name: scenarios / f"{name}.toml")
    monkeypatch.chdir(repo)
    return repo


@pytest.mark.timeout(120)
def test_default_suite_leaves_the_checkout_clean(checkout: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    before = (checkout / "results" / "report.md").read_text()
    assert cli.main(["--live-repeats", "0"]) == 0
    out = capsys.readouterr().out
    latest = checkout / "results" / "latest"
    for f in ("report.md", "summary.csv", "small/continuous.json", "small/batched.json",
              "small/visible.png"):
        assert (latest / f).is_file(), f
    assert git(checkout, "status", "--porcelain", "--untracked-files=all") == ""
    assert (checkout / "results" / "report.md").read_text() == before
    # the table is this run's: no committed rows mixed in, nothing labelled
    assert "small" in out and "live-services" not in out and "(reference" not in out
    report = (latest / "report.md").read_text()
    assert "live-services" not in report
    # what it did not run, it links from the reference, saying so
    assert "[../peers/peers.md](../peers/peers.md)" in report
    assert "(the committed reference results, not run by this command)" in report
    assert f"wrote {Path('results/latest/report.md')}" in out

    # a second command into the same directory labels the rows it did not run
    small = checkout.parent / "scenarios" / "small.toml"
    assert cli.main(["run", "--scenario", str(small), "--strategies", "continuous"]) == 0
    out = capsys.readouterr().out
    rows = [ln for ln in out.splitlines() if ln.startswith("small ")]
    assert len(rows) == 3
    labelled = {_strategy(ln) for ln in rows if "(earlier run, 20" in ln}
    assert labelled == {"parallel-batches", "batched"}, rows
    assert "were not run by this command" in out
    assert git(checkout, "status", "--porcelain", "--untracked-files=all") == ""


@pytest.mark.timeout(120)
def test_out_results_rewrites_the_reference_and_labels_committed_rows(
        checkout: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--live-repeats", "0"]) == 0          # a fresh run in results/latest first
    capsys.readouterr()
    assert cli.main(["--out", "results", "--live-repeats", "0"]) == 0
    out = capsys.readouterr().out
    date, commit = git(checkout, "log", "-1", "--format=%cs %h").split()
    label = f"(reference, committed {date} {commit})"
    ls_rows = [ln for ln in out.splitlines() if ln.startswith("live-services")]
    assert len(ls_rows) == 1 and label in ls_rows[0], out
    small_rows = [ln for ln in out.splitlines() if ln.startswith("small ")]
    assert len(small_rows) == 3 and not any("(" in ln.split("  ")[1] for ln in small_rows)
    report = (checkout / "results" / "report.md").read_text()
    assert report != "# the committed reference report\n"   # the reference was rewritten
    assert re.search(r"\| live-services \| live x0\.4 " + re.escape(label), report), report
    assert "not run by this command" in report
    # results/latest is another output directory: its runs are not read into the reference
    assert all(r.path.parent.parent.name != "latest" for r in load_runs(checkout / "results"))
    assert "| 6 |" not in report and report.count("| small | virtual |") == 3
    # what changed in git is the reference: report.md (tracked) and new files, nothing under
    # results/latest, and the committed live-services run is read, not rewritten
    status = git(checkout, "status", "--porcelain", "--untracked-files=all")
    assert " M results/report.md" in status.splitlines()
    assert "latest" not in status and "live-services/continuous.json" not in status


@pytest.mark.timeout(60)
def test_plot_labels_committed_files_only(checkout: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    write_doc(synthetic_doc("batched", 30, clock="live", scenario="live-services",
                            time_scale=0.4), result_path(checkout / "results", "live-services",
                                                         "batched"))
    assert cli.main(["plot", "results"]) == 0
    out = capsys.readouterr().out
    rows = {_strategy(ln): ln for ln in out.splitlines() if ln.startswith("live-services")}
    assert "(reference, committed" in rows["continuous"]
    assert "(" not in rows["batched"].split("  ")[1]  # not committed: no label
