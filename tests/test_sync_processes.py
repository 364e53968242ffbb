"""examples/contact_sync.py with ``--processes 2``: the stages' calls run in two worker
processes, each with its own clients built by the stages' ``init``; the rows, the run's record,
the ledger, ``--resume`` and ``--retry-failed`` behave as on threads."""
from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path
from typing import Any

import psutil
import pytest
from sync_helpers import API_KEY, counts, execute, query, run_main, services

from engine import Continuous
from examples.contact_sync import Console, build_pipeline, run_sync
from simulators.servers import OpenAIServer

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(240)]

TABLES = ("contacts", "analyses", "pipeline_assignments")


def _worker_processes() -> int:
    """This process's children that multiprocessing spawned (the engine's workers)."""
    n = 0
    for child in psutil.Process().children():
        try:
            if "spawn_main" in " ".join(child.cmdline()):
                n += 1
        except psutil.Error:
            continue
    return n


def test_processes_2_from_a_contacts_file_end_to_end(pg_dsn: str, tmp_path: Path) -> None:
    """A lazily read file (good contacts with attributes, a bad line): every good contact
    saved and assigned once, tagged with the run's id; the bad line a recorded failure."""
    lines = [json.dumps({"id": i, "name": f"n{i}", "tier": "gold"}) for i in range(1, 121)]
    lines.insert(50, '{"id": "seven"}')
    f = tmp_path / "contacts.jsonl"
    f.write_text("\n".join(lines) + "\n")
    with services(pg_dsn) as cfg:
        code, out, err = run_main(cfg, "--contacts-file", str(f), "--processes", "2")
    assert code == 1, out + err
    assert "ok 120, failed 1" in out and "throughput" in out and "slowest stage" in out
    assert "2 worker processes" in err
    assert counts(pg_dsn) == {t: (120, 120) for t in TABLES}
    ((run_id, strategy, status, ok, failed),) = query(
        pg_dsn, "SELECT run_id, strategy, status, ok, failed FROM sync_runs")
    assert (strategy, status, ok, failed) == ("continuous", "failed", 120, 1)
    for t in TABLES:  # the worker processes' stores got the run id before they started
        assert query(pg_dsn, f"SELECT DISTINCT run_id FROM {t}") == [(run_id,)], t
    assert query(pg_dsn, "SELECT attributes FROM contacts WHERE contact_id = 7") == [
        ({"tier": "gold"},)]
    assert query(pg_dsn, "SELECT item_key, stage FROM sync_failures") == [("line 51", "fetch")]
    password = pg_dsn.split("password=")[1].split()[0]
    assert API_KEY not in out + err and password not in out + err


def test_processes_2_runs_in_two_worker_processes_and_closes_them(pg_dsn: str) -> None:
    seen: list[int] = []

    def on_result(_: Any) -> None:
        if not seen:
            seen.append(_worker_processes())

    with services(pg_dsn, latency=0.01) as cfg, build_pipeline(cfg, processes=2) as job:
        assert job.fetch is None and job.llm is None  # built in the workers, not here
        report = job.run(range(1, 101), Continuous(), on_result=on_result)
    assert (report.ok, report.failed) == (100, 0)
    assert seen == [2]
    assert _worker_processes() == 0  # the run ended them
    assert counts(pg_dsn) == {t: (100, 100) for t in TABLES}
    # each worker process's pool is its share (5 + 5) of the save/assign slots, plus one; this
    # process keeps one for the bookkeeping: fewer connections than one pool of 10 + 10 each
    assert job.store.maxconn == 2


def test_resume_and_retry_failed_with_processes_2(pg_dsn: str) -> None:
    """The ledger stays in this process: --resume skips what is done and never asks the LLM
    again; a dead letter is replayed by --retry-failed from its recorded analysis."""
    with services(pg_dsn) as cfg, OpenAIServer(seed=2) as llm:
        cfg = dataclasses.replace(cfg, openai_base_url=llm.url + "/v1")
        assert run_main(cfg, "--contacts", "40", "--processes", "2")[0] == 0
        code, out, _ = run_main(cfg, "--contacts", "60", "--resume", "--processes", "2")
        assert code == 0 and "(40 skipped: already done)" in out, out
        assert llm.calls("7") == 1 and llm.calls("60") == 1
        execute(pg_dsn, "ALTER TABLE pipeline_assignments ADD CONSTRAINT not4 CHECK "
                         "(contact_id <> 4) NOT VALID")
        execute(pg_dsn, "DELETE FROM pipeline_assignments WHERE contact_id = 4")
        code, out, _ = run_main(cfg, "--contacts", "10", "--processes", "2")
        assert code == 1 and "ok 9, failed 1" in out, out
        assert llm.calls("4") == 2
        execute(pg_dsn, "ALTER TABLE pipeline_assignments DROP CONSTRAINT not4")
        code, out, _ = run_main(cfg, "--contacts", "10", "--retry-failed", "--processes", "2")
        assert code == 0, out
        assert "(9 skipped: already done; 1 analyses restored from the ledger)" in out
        assert llm.calls("4") == 2  # replayed from its recorded analysis
    assert counts(pg_dsn)["pipeline_assignments"] == (60, 60)


def test_run_sync_on_a_job_with_processes_2_records_failures(pg_dsn: str) -> None:
    """A permanent error raised in a worker process crosses back with its type and message."""
    from simulators.servers import ServerFaults

    out = io.StringIO()
    with services(pg_dsn, llm_faults=ServerFaults(malformed_rate=0.2)) as cfg, \
            build_pipeline(cfg, processes=2, attempts=2) as job:
        code = run_sync(job, range(1, 81), strategy=Continuous(), resume=False,
                        console=Console(cfg.secrets, out, io.StringIO()))
    assert code == 1
    ((ok, failed),) = query(pg_dsn, "SELECT ok, failed FROM sync_runs")
    assert ok + failed == 80 and failed > 0
    kinds = {k for (k,) in query(pg_dsn, "SELECT DISTINCT error_type FROM sync_failures")}
    assert "MalformedOutputError" in kinds  # its type, across the process boundary
    assert counts(pg_dsn)["pipeline_assignments"] == (ok, ok)


