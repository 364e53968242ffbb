"""Nothing lost: SIGKILL the sync job mid-run, run it again with --resume."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sync_helpers import counts, env_of, query, run_main, services

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(180)]

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "contact_sync.py"
N = 400


def test_resume_after_sigkill_saves_and_assigns_every_contact_exactly_once(pg_dsn: str) -> None:
    with services(pg_dsn, latency={"dist": "uniform", "low": 0.1, "high": 0.3}) as cfg:
        proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), "--contacts", str(N), "--quiet"],
            env={**os.environ, **env_of(cfg)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 60
            done = 0
            while time.monotonic() < deadline and proc.poll() is None:
                done = _assigned(pg_dsn)
                if done >= 60:
                    break
                time.sleep(0.02)
            assert proc.poll() is None, "the job ended before it could be killed"
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
        at_kill = _assigned(pg_dsn)
        assert 60 <= at_kill < N, at_kill
        # the killed run never finished its bookkeeping: its sync_runs row says so
        assert query(pg_dsn, "SELECT status FROM sync_runs") == [("running",)]

        code, out, err = run_main(cfg, "--contacts", str(N), "--resume")
    assert code == 0, out + err
    assert f"({at_kill} skipped: already done)" in out
    assert counts(pg_dsn) == {t: (N, N) for t in ("contacts", "analyses",
                                                  "pipeline_assignments")}
    assert query(pg_dsn, "SELECT min(contact_id), max(contact_id) FROM pipeline_assignments") \
        == [(1, N)]


def _assigned(dsn: str) -> int:
    try:
        return int(query(dsn, "SELECT count(*) FROM pipeline_assignments")[0][0])
    except Exception:  # the schema may not exist yet
        return 0
