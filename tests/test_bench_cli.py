"""``python -m bench``: sub-commands write what they say to --out; bad arguments and bad
scenario files exit 2 with one line; nothing is written to results/."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
from test_bench_synthetic import small_scenario

REPO = Path(__file__).resolve().parents[1]


def bench(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.mark.timeout(60)
def test_list_names_every_builtin_scenario() -> None:
    res = bench("list")
    assert res.returncode == 0, res.stderr
    for name in ("seed", "heavy-tail", "rate-limited-llm", "flaky-fetch", "uniform"):
        assert name in res.stdout


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args", [
    ["run"],                                             # --scenario is required
    ["run", "--scenario", "seed", "--clock", "sideways"],
    ["run", "--scenario", "seed", "--repeats", "0"],
    ["run", "--scenario", "seed", "--time-scale", "-1"],
    ["run", "--scenario", "seed", "--strategies", "fastest"],
    ["sweep", "--scenario", "seed"],                     # --param is required
    ["frobnicate"],
    ["compare", "only-one"],
    ["--live-repeats", "many"],
])
def test_bad_arguments_exit_2_with_usage(args: list[str]) -> None:
    res = bench(*args)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "usage:" in res.stderr


@pytest.mark.timeout(60)
def test_bad_scenario_file_exits_2_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(small_scenario(tmp_path).read_text().replace("concurrency = 6",
                                                                 "concurrency = 0"))
    res = bench("run", "--scenario", str(bad), "--out", str(tmp_path / "out"))
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{bad}: stages[1].concurrency: expected an integer >= 1" in \
        lines[0]
    assert not (tmp_path / "out").exists()
    res = bench("run", "--scenario", "no-such-scenario")
    assert res.returncode == 2 and "not a built-in scenario" in res.stderr


@pytest.mark.timeout(60)
def test_sweep_with_a_bad_param_exits_2(tmp_path: Path) -> None:
    sc = str(small_scenario(tmp_path))
    res = bench("sweep", "--scenario", sc, "--param", "stages.analyze.concurrency=5:1:1")
    assert res.returncode == 2 and "STOP >= START" in res.stderr
    res = bench("sweep", "--scenario", sc, "--param", "stages.analyze.concurrency=0,2",
                "--out", str(tmp_path / "sw"))
    assert res.returncode == 2 and "stages[1].concurrency" in res.stderr
    res = bench("sweep", "--scenario", sc, "--param", "stages.nope.concurrency=1,2")
    assert res.returncode == 2 and "no such stage" in res.stderr


@pytest.mark.timeout(120)
def test_a_live_run_shows_the_engines_progress(tmp_path: Path) -> None:
    """The run's own process draws the engine's progress on stderr (plain lines here: not a
    terminal), after the job's announcement; stdout keeps one line per run."""
    res = bench("run", "--scenario", str(small_scenario(tmp_path)), "--clock", "live",
                "--strategies", "continuous", "--time-scale", "0.1", "--out",
                str(tmp_path / "out"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "[1/1] small live x0.1 continuous r1: 150 items" in res.stderr
    assert "visible (ok" in res.stderr and "(done)" in res.stderr  # the engine's line
    assert "\r" not in res.stderr and "small live x0.1 continuous r1: makespan" in res.stdout


@pytest.mark.timeout(180)
def test_run_virtual_then_plot_and_compare(tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = bench("run", "--scenario", str(small_scenario(tmp_path)), "--clock", "virtual",
                "--out", str(out))
    assert res.returncode == 0, res.stdout + res.stderr
    for s in ("continuous", "batched", "parallel-batches"):
        assert (out / "small" / f"{s}.json").is_file()
        assert f"small virtual {s}" in res.stdout  # one plain line per run (not a terminal)
    assert "\r" not in res.stdout + res.stderr      # no progress bar when not a terminal
    for f in ("summary.csv", "report.md", "speedup.png", "small/visible.png", "small/ecdf.png",
              "small/bars.png", "small/gantt.png"):
        assert (out / f).is_file(), f
    with (out / "summary.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert {r["strategy"] for r in rows} == {"continuous", "batched", "parallel-batches"}
    assert all(r["valid"] == "yes" for r in rows)
    assert "makespan s" in res.stdout and "vs batched" in res.stdout   # the headline table

    (out / "report.md").unlink()
    (out / "small" / "gantt.png").unlink()
    res = bench("plot", str(out))
    assert res.returncode == 0, res.stderr
    assert (out / "report.md").is_file() and (out / "small" / "gantt.png").is_file()

    res = bench("compare", str(out), str(out))
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("1.000 [1.000-1.000]") == 3 * 5  # makespan, items/s, p50, p99, eff.


@pytest.mark.timeout(180)
def test_sweep_writes_csv_and_curves(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    res = bench("sweep", "--scenario", str(small_scenario(tmp_path)), "--param",
                "stages.analyze.concurrency=2:6:2", "--out", str(out))
    assert res.returncode == 0, res.stdout + res.stderr
    with (out / "sweep.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 9 and {r["value"] for r in rows} == {"2", "4", "6"}
    assert all(r["valid"] == "yes" for r in rows)
    assert (out / "sweep.png").stat().st_size > 10_000
    assert not (out / "points").exists()   # point files are removed unless --keep-runs
    (out / "sweep.png").unlink()
    assert bench("plot", str(out)).returncode == 0 and (out / "sweep.png").is_file()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", [[], ["run", "--scenario", "seed"], ["live-services"],
                                     ["peers", "--scenario", "seed"],
                                     ["sweep", "--scenario", "seed", "--param",
                                      "stages.analyze.concurrency=10,20"]])
def test_out_naming_a_file_is_a_usage_error(tmp_path: Path, command: list[str]) -> None:
    f = tmp_path / "taken"
    f.write_text("not a directory\n")
    for out in (f, f / "below"):
        res = bench(*command, "--out", str(out))
        assert res.returncode == 2, (res.stdout, res.stderr)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and "--out: expected a directory" in lines[0], lines
        assert str(f) in lines[0] and "Traceback" not in res.stderr
        assert res.stdout == ""   # nothing ran
    assert f.read_text() == "not a directory\n"


@pytest.mark.timeout(60)
def test_a_scenario_too_large_for_memory_exits_2_before_running(tmp_path: Path) -> None:
    huge = tmp_path / "huge.toml"
    huge.write_text(small_scenario(tmp_path).read_text().replace("items = 150",
                                                                 "items = 10000000000"))
    out = tmp_path / "out"
    for args in (["run", "--scenario", str(huge), "--out", str(out)],
                 ["sweep", "--scenario", str(huge), "--param", "stages.save.concurrency=1,2",
                  "--out", str(out)]):
        res = bench(*args)
        assert res.returncode == 2, (res.stdout, res.stderr)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(
            f"python -m bench: error: {huge}: items: expected at most "), lines
        assert "10,000,000,000 items need" in lines[0]
        assert not out.exists()
    # and a sweep that grows items past the machine names the field of its point
    res = bench("sweep", "--scenario", str(small_scenario(tmp_path)), "--param",
                "items=100,10000000000", "--out", str(out))
    assert res.returncode == 2 and ": items: expected at most " in res.stderr, res.stderr
    assert not out.exists()
