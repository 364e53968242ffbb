"""The example job's progress is the engine's (``progress=``): a tqdm bar on a terminal, its plain
lines otherwise, through the job's redacting console when the job writes to a stream of the
caller's; ``--quiet`` shows none; the summary is unchanged."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sync_helpers import API_KEY, env_of, run_main, services

from engine import Progress, StageProgress
from examples import contact_sync
from examples.contact_sync import Console, ProgressLines, engine_progress

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "contact_sync.py"


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _snapshot(visible: int, final: bool = False) -> Progress:
    return Progress(visible, 10, visible, 0, 0, 1.0, (StageProgress("fetch", 1, 2, 5),), final)


@pytest.mark.timeout(10)
def test_engine_progress_picks_the_engines_display(monkeypatch: pytest.MonkeyPatch) -> None:
    assert engine_progress(Console((), io.StringIO(), sys.stderr, quiet=True)) is False
    # this process's stderr: the engine draws there itself (lines off a terminal)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert engine_progress(Console((), io.StringIO(), sys.stderr)) is True
    tty = _Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    assert engine_progress(Console((), io.StringIO(), tty)) is True  # tqdm is installed here
    # a terminal without tqdm: the engine's plain lines, not an ImportError
    real = contact_sync.importlib.util.find_spec
    monkeypatch.setattr(contact_sync.importlib.util, "find_spec",
                        lambda name, *a: None if name == "tqdm" else real(name, *a))
    assert isinstance(engine_progress(Console((), io.StringIO(), tty)), ProgressLines)
    # a caller's stream: the engine's lines through the console
    assert isinstance(engine_progress(Console((), io.StringIO(), io.StringIO())), ProgressLines)


@pytest.mark.timeout(10)
def test_progress_lines_are_the_engines_lines_throttled_and_redacted() -> None:
    err = io.StringIO()
    console = Console(["fetch 1+2"], io.StringIO(), err)  # a "secret" the line contains
    lines = ProgressLines(console.note, every=3600)
    for n in range(1, 10):
        lines(_snapshot(n))
    assert err.getvalue() == ""  # nothing before `every` seconds
    lines(_snapshot(10, final=True))
    assert err.getvalue() == _snapshot(10, final=True).line() + "\n"
    lines = ProgressLines(console.note, every=0)
    lines(_snapshot(3))
    assert err.getvalue().splitlines()[-1] == \
        _snapshot(3).line().replace("fetch 1+2", "***")


@pytest.mark.postgres
@pytest.mark.timeout(120)
def test_the_job_shows_the_engines_progress_and_quiet_shows_none(pg_dsn: str) -> None:
    with services(pg_dsn) as cfg:
        code, out, err = run_main(cfg, "--contacts", "60")
        assert code == 0, out + err
        assert err.splitlines()[-1].startswith("conveyor: 60/60 visible (ok 60, failed 0) in ")
        assert err.splitlines()[-1].endswith("(done)")
        assert "ok 60, failed 0" in out and "throughput" in out  # the summary, as before
        code, out, err = run_main(cfg, "--contacts", "20", "--quiet")
        assert code == 0 and err == "" and "ok 20, failed 0" in out
        # as a user runs it, stderr not a terminal: the engine's plain lines on stderr
        proc = subprocess.run([sys.executable, str(SCRIPT), "--contacts", "30"],
                              env={**os.environ, **env_of(cfg)}, capture_output=True, text=True,
                              timeout=90)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "conveyor: 30/30 visible (ok 30, failed 0) in " in proc.stderr
    assert "\r" not in proc.stderr and API_KEY not in proc.stdout + proc.stderr
