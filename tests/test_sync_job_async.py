"""examples/contact_sync_async.py (the example job on async adapters) and examples/asyncio_peer.py
(the hand-written asyncio job) end to end against the fake servers and a real PostgreSQL: all
three jobs -- the sync example too -- leave the same rows."""
from __future__ import annotations

import asyncio
import dataclasses
import io
import re
from typing import Any

import pytest
from sync_helpers import API_KEY, counts, env_of, query, run_main, services

from examples import asyncio_peer
from examples.contact_sync_async import main as async_main
from simulators.servers import ServerFaults

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(120)]

ROWS = {
    "contacts": "contact_id, name, email, attributes, message_count",
    "analyses": "contact_id, stage, score, summary, model",
    "pipeline_assignments": "contact_id, stage, score",
}


def rows_of(dsn: str) -> dict[str, list[tuple[Any, ...]]]:
    return {t: query(dsn, f"SELECT {cols} FROM {t} ORDER BY contact_id")
            for t, cols in ROWS.items()}


def run_async(cfg: Any, *args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = async_main(list(args), env=env_of(cfg), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_the_three_jobs_write_the_same_rows(pg_cluster: Any) -> None:
    dsns = {job: pg_cluster.create_database(f"same_rows_{job}")
            for job in ("sync", "async", "peer")}
    for job, dsn in dsns.items():
        with services(dsn) as cfg:
            if job == "sync":
                code, out, err = run_main(cfg, "--contacts", "60", "--ledger", "none")
            elif job == "async":
                code, out, err = run_async(cfg, "--contacts", "60", "--ledger", "none")
            else:
                result = asyncio.run(asyncio_peer.run_peer(env_of(cfg), range(1, 61)))
                code, out, err = (0 if result["failed"] == 0 else 1), str(result), ""
        assert code == 0, out + err
        assert API_KEY not in out + err
        assert counts(dsn) == {t: (60, 60) for t in ROWS}
        # every row tagged with its run, and the run's row has the counts
        assert query(dsn, "SELECT count(*) FROM analyses a JOIN sync_runs r USING (run_id) "
                          "WHERE r.ok = 60 AND r.status = 'ok'") == [(60,)]
    sync_rows = rows_of(dsns["sync"])
    assert len({r[1] for r in sync_rows["pipeline_assignments"]}) > 2  # real classifications
    assert rows_of(dsns["async"]) == sync_rows
    assert rows_of(dsns["peer"]) == sync_rows


def test_the_async_job_retries_faults_and_reports_like_the_sync_one(pg_dsn: str) -> None:
    faults = ServerFaults(error_rate=0.05, throttle_rate=0.03, drop_rate=0.02, retry_after=0.01)
    with services(pg_dsn, faults=faults) as cfg:
        code, out, err = run_async(cfg, "--contacts", "150", "--ledger", "none")
    assert code == 0, out + err
    assert "contact sync ok: 150 contacts with strategy continuous" in out
    assert "ok 150, failed 0" in out and "slowest stage" in out
    assert counts(pg_dsn)["pipeline_assignments"] == (150, 150)
    assert API_KEY not in out + err


def test_the_async_job_resumes_from_its_ledger(pg_dsn: str) -> None:
    with services(pg_dsn) as cfg:
        assert run_async(cfg, "--contacts", "40")[0] == 0  # the default ledger: the database
        code, out, err = run_async(cfg, "--contacts", "60", "--resume")
    assert code == 0, out + err
    assert "(40 skipped: already done)" in out
    assert counts(pg_dsn)["pipeline_assignments"] == (60, 60)


def test_the_async_job_refuses_processes_and_reports_a_dead_database(pg_dsn: str) -> None:
    with services(pg_dsn) as cfg:
        with pytest.raises(SystemExit) as refused:  # a usage error, as argparse reports one
            run_async(cfg, "--contacts", "5", "--processes", "2")
        assert refused.value.code == 2
        bad = dataclasses.replace(cfg, database_url=re.sub(r"port=\d+", "port=1",
                                                           cfg.database_url))
        code, _, err = run_async(bad, "--contacts", "5", "--ledger", "none")
    assert code == 2 and "cannot start" in err
