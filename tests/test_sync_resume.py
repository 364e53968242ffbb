"""Nothing lost, nothing paid twice: kill -9 the sync job at random instants, resume each time.

The job (``examples/contact_sync.py``, a subprocess) records its progress in a
``PostgresLedger`` in its own database, with the ``analyze`` stage checkpointed. The fake servers
run in this process, so the fake OpenAI server's per-contact counts (the calls that cost) are
read directly after each kill and compared with the analyses the ledger had recorded by then.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.errors
import psycopg2.extensions
import pytest
from sync_helpers import API_KEY, counts, env_of, query, run_main

from examples.contact_sync import PIPELINE_NAME, PostgresLedger, SyncConfig
from simulators.servers import MessagesServer, OpenAIServer

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(120)]

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "contact_sync.py"
N = 360
KILLS = 5
ANALYZE_LIMIT = 50  # the job's default analyze concurrency: the most calls in flight at a kill
LATENCY = {"dist": "uniform", "low": 0.05, "high": 0.2}
#: each killed run is killed once it recorded a random number (0..STEP) of new analyses, plus
#: a random 0-50 ms: instants spread over the whole job, whatever the machine's speed, with
#: room left for the overshoot (the analyses that end while the kill comes)
STEP = N // 8


def _recorded(ledger: PostgresLedger) -> set[int]:
    """The contacts whose analysis the ledger holds."""
    found = ledger.lookup(PIPELINE_NAME, [str(c) for c in range(1, N + 1)])
    return {int(k) for k, e in found.items() if "analyze" in e.outputs}


def _count_recorded(conn: psycopg2.extensions.connection) -> int:
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM conveyor_ledger WHERE pipeline = %s AND "
                        "stage = 'analyze'", (PIPELINE_NAME,))
            row = cur.fetchone()
    except psycopg2.errors.UndefinedTable:  # the first run has not created it yet
        return 0
    return int(row[0]) if row else 0


def _kill_at_a_random_instant(proc: subprocess.Popen[bytes], conn: Any,
                              rng: random.Random) -> tuple[int, float]:
    """SIGKILL the job once the ledger holds ``0..STEP`` more analyses (drawn at random) and
    a random 0-50 ms more have passed; (the draw, the delay)."""
    more, delay = rng.randint(0, STEP), rng.uniform(0.0, 0.05)
    target = _count_recorded(conn) + more
    deadline = time.monotonic() + 60
    while _count_recorded(conn) < target:
        assert proc.poll() is None, "the job ended before it could be killed"
        assert time.monotonic() < deadline, "the job made no progress"
        time.sleep(0.005)
    time.sleep(delay)
    assert proc.poll() is None, "the job ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    return more, delay


def test_kill_9_at_five_random_instants_loses_nothing_and_pays_no_analysis_twice(
        pg_dsn: str) -> None:
    rng = random.Random(2013)
    with MessagesServer(latency=LATENCY, seed=1) as msgs, \
            OpenAIServer(latency=LATENCY, seed=2) as llm:
        cfg = SyncConfig(pg_dsn, msgs.url, llm.url + "/v1", API_KEY, "gpt-4o-mini")
        ledger = PostgresLedger(pg_dsn)  # read only here: lookups take no lock
        conn = psycopg2.connect(pg_dsn)
        conn.autocommit = True
        #: contact -> its LLM calls when the ledger was first seen holding its analysis
        frozen: dict[int, int] = {}
        progress: list[tuple[Any, ...]] = []
        try:
            for k in range(KILLS):
                argv = [sys.executable, str(SCRIPT), "--contacts", str(N), "--quiet"]
                if k:
                    argv.append("--resume")
                proc = subprocess.Popen(argv, env={**os.environ, **env_of(cfg)},
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                try:
                    more, delay = _kill_at_a_random_instant(proc, conn, rng)
                finally:
                    if proc.poll() is None:
                        proc.kill()
                    _, stderr = proc.communicate(timeout=10)
                assert proc.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
                recorded = _recorded(ledger)
                calls = {c: llm.calls(str(c)) for c in range(1, N + 1)}
                again = {c: (n, calls[c]) for c, n in frozen.items() if calls[c] != n}
                assert not again, f"run {k + 1}: analysed again after it was recorded: {again}"
                assert all(calls[c] >= 1 for c in recorded)  # recorded means it was paid for
                for c in recorded:
                    frozen.setdefault(c, calls[c])
                progress.append((more, round(delay, 3), len(recorded),
                                 ledger.counts(PIPELINE_NAME)["done"]))
            assert progress[-1][3] < N, f"nothing left to resume: {progress}"

            done_before = ledger.counts(PIPELINE_NAME)["done"]
            t0 = time.monotonic()
            code, out, err = run_main(cfg, "--contacts", str(N), "--resume")
            progress.append(("final run", round(time.monotonic() - t0, 2)))
            assert code == 0, out + err
            calls = {c: llm.calls(str(c)) for c in range(1, N + 1)}
            final = ledger.counts(PIPELINE_NAME)
        finally:
            ledger.close()
            conn.close()
    print(f"\n(draw, delay s, analyses recorded, done) at each kill: {progress}")
    again = {c: (n, calls[c]) for c, n in frozen.items() if calls[c] != n}
    assert not again, f"the final run analysed recorded contacts again: {again}"
    # every contact analysed; a repeat only for a call in flight at a kill (at most the stage's
    # limit per kill), never for one the ledger had recorded
    assert all(n >= 1 for n in calls.values())
    repeats = sum(calls.values()) - N
    assert repeats <= KILLS * ANALYZE_LIMIT, repeats
    assert all(n <= 1 + KILLS for n in calls.values())
    assert f"({done_before} skipped: already done" in out, out
    # saved and assigned exactly once: one row per contact in every table
    assert counts(pg_dsn) == {t: (N, N) for t in ("contacts", "analyses",
                                                  "pipeline_assignments")}
    assert query(pg_dsn, "SELECT min(contact_id), max(contact_id) FROM pipeline_assignments") \
        == [(1, N)]
    # the ledger has every contact done with its analysis, nothing failed or half-done
    assert final == {"done": N, "failed": 0, "in_progress": 0, "outputs": {"analyze": N},
                     "failed_at": {}}
    # the killed runs never finished their bookkeeping: their sync_runs rows say so
    assert query(pg_dsn, "SELECT status, count(*) FROM sync_runs GROUP BY 1 ORDER BY 1") == [
        ("ok", 1), ("running", KILLS)]
