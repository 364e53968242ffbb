"""Secrets never leak: the API key and the DSN password appear in no output of the sync job --
stdout, stderr, log records (at DEBUG), database rows or a results file -- even when the
services echo the key back in their error messages."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import psycopg2.extensions
import pytest
from http_script import Reply, Request, ScriptedServer
from sync_helpers import API_KEY, env_of, query, run_main

from engine import Continuous
from examples.contact_sync import SyncConfig, build_pipeline
from simulators.servers import MessagesServer, OpenAIServer, ServerFaults

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(120)]

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "contact_sync.py"


def leaky_llm(good_url: str):  # type: ignore[no-untyped-def]
    """Every 3rd call answers 401 quoting the key it got, the rest are proxied to the fake."""
    import requests

    session = requests.Session()
    n = {"calls": 0}

    def reply(req: Request) -> Reply:
        n["calls"] += 1
        if n["calls"] % 3 == 0:
            return Reply.json({"error": {"message": f"Incorrect API key provided: "
                                                    f"{req.headers.get('authorization')}"}}, 401)
        r = session.post(good_url + "/v1/chat/completions", data=req.body,
                         headers={"Content-Type": "application/json"})
        return Reply(r.status_code, r.content, {"Content-Type": "application/json"})

    return reply


def test_no_output_contains_a_secret(pg_dsn: str, tmp_path: Path,
                                     caplog: pytest.LogCaptureFixture) -> None:
    password = psycopg2.extensions.parse_dsn(pg_dsn)["password"]
    faults = ServerFaults(error_rate=0.1, malformed_rate=0.1)
    caplog.set_level(logging.DEBUG)
    with MessagesServer(seed=1, faults=faults) as msgs, OpenAIServer(seed=2) as fake, \
            ScriptedServer(leaky_llm(fake.url)) as llm:
        cfg = SyncConfig(pg_dsn, msgs.url, llm.url + "/v1", API_KEY)
        code, out, err = run_main(cfg, "--contacts", "60")
        # the same job as a subprocess, as a user runs it
        proc = subprocess.run([sys.executable, str(SCRIPT), "--contacts", "30"],
                              env={**os.environ, **env_of(cfg)}, capture_output=True, text=True,
                              timeout=90)
        # and a results file written from the engine's report
        with build_pipeline(cfg, attempts=2) as job:
            report = job.pipeline.run(range(1, 31), strategy=Continuous())
        results = tmp_path / "results.json"
        results.write_text(json.dumps(report.to_json(), default=str))
    assert code == 1 and proc.returncode == 1  # the 401s failed some contacts
    assert report.failed > 0
    rows = query(pg_dsn, "SELECT message FROM sync_failures")
    assert any("Incorrect API key" in m for (m,) in rows)  # the echo happened...
    db_text = "\n".join(str(r) for t in ("sync_failures", "sync_runs", "contacts", "analyses",
                                         "pipeline_assignments")
                        for r in query(pg_dsn, f"SELECT * FROM {t}"))
    logs = "\n".join(r.getMessage() + str(r.args) for r in caplog.records)
    outputs = {"stdout": out, "stderr": err, "subprocess stdout": proc.stdout,
               "subprocess stderr": proc.stderr, "database": db_text,
               "results file": results.read_text(), "logs": logs}
    for name, text in outputs.items():
        for secret in (API_KEY, password):
            assert secret not in text, f"a secret leaked into {name}"
    assert "***" in db_text  # ...and was redacted


def test_config_repr_hides_secrets(pg_dsn: str) -> None:
    cfg = SyncConfig(pg_dsn, "http://m", "http://o/v1", API_KEY)
    password = psycopg2.extensions.parse_dsn(pg_dsn)["password"]
    assert API_KEY not in repr(cfg) and password not in repr(cfg)
