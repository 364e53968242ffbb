"""The example job's progress is the engine's (``progress=`` the console's stderr): a tqdm bar on
a terminal, its plain lines otherwise; ``--quiet`` shows none; the summary is unchanged."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sync_helpers import API_KEY, env_of, run_main, services

from examples.contact_sync import Console, engine_progress

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "contact_sync.py"


@pytest.mark.timeout(10)
def test_engine_progress_draws_on_the_consoles_stderr() -> None:
    assert engine_progress(Console((), io.StringIO(), sys.stderr, quiet=True)) is False
    err = io.StringIO()  # a caller's stream: the engine draws there (plain lines)
    assert engine_progress(Console((), io.StringIO(), err)) is err


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
