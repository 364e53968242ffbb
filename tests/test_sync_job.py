"""examples/contact_sync.py end to end: real clients -> fake servers -> real PostgreSQL."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from sync_helpers import API_KEY, counts, execute, query, run_main, services

from examples.contact_sync import SyncConfig, main
from simulators.servers import OpenAIServer

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(120)]


@pytest.mark.parametrize("strategy", ["continuous", "batched", "parallel-batches"])
def test_every_contact_is_saved_and_assigned_once(pg_dsn: str, strategy: str) -> None:
    with services(pg_dsn) as cfg:
        code, out, err = run_main(cfg, "--contacts", "120", "--strategy", strategy,
                                  "--batch-size", "25")
    assert code == 0, out + err
    assert counts(pg_dsn) == {t: (120, 120) for t in ("contacts", "analyses",
                                                      "pipeline_assignments")}
    assert "ok 120, failed 0" in out and "throughput" in out and "slowest stage" in out
    assert query(pg_dsn, "SELECT strategy, status, ok, failed FROM sync_runs") == [
        (strategy, "ok", 120, 0)]
    # the fake LLM read the fake messages: stages are the classification, not a constant
    assert len(query(pg_dsn, "SELECT DISTINCT stage FROM pipeline_assignments")) > 2


def test_rerun_overwrites_and_resume_skips(pg_dsn: str) -> None:
    with services(pg_dsn) as cfg, OpenAIServer(seed=2) as llm:
        cfg = dataclasses.replace(cfg, openai_base_url=llm.url + "/v1")
        assert run_main(cfg, "--contacts", "50")[0] == 0
        assert run_main(cfg, "--contacts", "50")[0] == 0  # a plain rerun: starts over, upserts
        assert llm.calls("7") == 2
        code, out, _ = run_main(cfg, "--contacts", "80", "--resume")
        assert llm.calls("7") == 2 and llm.calls("80") == 1  # done: not run, not paid again
    assert code == 0, out
    assert "80 contacts" in out and "(50 skipped: already done)" in out
    assert counts(pg_dsn)["pipeline_assignments"] == (80, 80)
    assert query(pg_dsn, "SELECT count(*) FROM sync_runs WHERE status = 'ok'") == [(3,)]
    assert query(pg_dsn, "SELECT skipped FROM sync_runs ORDER BY run_id") == [(0,), (0,), (50,)]
    # the ledger (the job's database) has every contact done and its analysis recorded
    assert query(pg_dsn, "SELECT stage, status, count(*) FROM conveyor_ledger WHERE pipeline = "
                         "'contact-sync' GROUP BY 1, 2 ORDER BY 1") == [
        ("", "done", 80), ("analyze", "output", 80)]




def test_resume_needs_a_ledger_and_a_sqlite_ledger_works(pg_dsn: str, tmp_path: Path) -> None:
    db = str(tmp_path / "sync-ledger.db")
    with services(pg_dsn) as cfg:
        code, _, err = run_main(cfg, "--contacts", "5", "--resume", "--ledger", "none")
        assert code == 2 and "need a ledger" in err
        assert run_main(cfg, "--contacts", "20", "--ledger", "none")[0] == 0
        assert query(pg_dsn, "SELECT to_regclass('conveyor_ledger')") == [(None,)]
        assert run_main(cfg, "--contacts", "20", "--ledger", db)[0] == 0
        code, out, _ = run_main(cfg, "--contacts", "30", "--ledger", db, "--resume")
    assert code == 0 and "(20 skipped: already done)" in out, out
    import sqlite3

    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM conveyor_ledger WHERE stage = '' AND "
                            "status = 'done'").fetchone() == (30,)


def test_failures_are_dead_letters_replayed_with_retry_failed(pg_dsn: str) -> None:
    """A contact whose save fails permanently is a dead letter with its analysis recorded:
    --resume reports it failed again without any call, --retry-failed replays it from save
    (its analysis restored: the LLM is not asked twice)."""
    with services(pg_dsn) as cfg, OpenAIServer(seed=2) as llm:
        cfg = dataclasses.replace(cfg, openai_base_url=llm.url + "/v1")
        assert run_main(cfg, "--contacts", "10")[0] == 0
        # assignments of contact 4 now violate a constraint: assign fails for it, permanently
        execute(pg_dsn, "ALTER TABLE pipeline_assignments ADD CONSTRAINT not4 CHECK "
                         "(contact_id <> 4) NOT VALID")
        execute(pg_dsn, "DELETE FROM pipeline_assignments WHERE contact_id = 4")
        code, out, _ = run_main(cfg, "--contacts", "10")
        assert code == 1 and "ok 9, failed 1" in out, out
        assert llm.calls("4") == 2
        code, out, _ = run_main(cfg, "--contacts", "10", "--resume")
        assert code == 1 and "ok 9, failed 1" in out and "(9 skipped: already done)" in out
        assert llm.calls("4") == 2  # a dead letter is not run again without --retry-failed
        execute(pg_dsn, "ALTER TABLE pipeline_assignments DROP CONSTRAINT not4")
        code, out, _ = run_main(cfg, "--contacts", "10", "--retry-failed")
        assert code == 0, out
        assert "(9 skipped: already done; 1 analyses restored from the ledger)" in out
        assert llm.calls("4") == 2  # replayed from its recorded analysis
    assert counts(pg_dsn)["pipeline_assignments"] == (10, 10)


def test_bad_input_fails_per_record_and_the_rest_is_stored_verbatim(
        pg_dsn: str, tmp_path: Path) -> None:
    nasty = ["Robert'); DROP TABLE contacts;--", 'O\'Brien "q" \\ %s $1 --', "Zoë 🚀 李"]
    lines = [json.dumps({"id": i + 1, "name": n, "email": f"{i}@x.io", "tier": "gold"}).encode()
             for i, n in enumerate(nasty)]
    lines += [
        b"4",                                   # a bare id: no name, no email
        b'{"id": 5}',                           # missing fields
        b'{"id": 6, "name": "caf\xe9"}',        # not UTF-8
        b'{"name": "no id"}',                   # missing id
        b'{"id": "seven"}',                     # wrong type
        b'{"id": 8, "name": 12}',               # wrong type
        b'{"id": 9, "name": "nul\\u0000"}',     # NUL cannot be stored
        b"not json at all",
        b'{"id": 10, "name": "' + b"n" * (1 << 20) + b'"}',  # a 1 MB name
    ]
    f = tmp_path / "contacts.jsonl"
    f.write_bytes(b"\n".join(lines) + b"\n")
    with services(pg_dsn) as cfg:
        code, out, _ = run_main(cfg, "--contacts-file", str(f))
    assert code == 1
    assert "ok 6, failed 6" in out, out
    stored = dict(query(pg_dsn, "SELECT contact_id, name FROM contacts"))
    assert stored == {1: nasty[0], 2: nasty[1], 3: nasty[2], 4: None, 5: None, 10: "n" * (1 << 20)}
    assert query(pg_dsn, "SELECT attributes FROM contacts WHERE contact_id = 1") == [
        ({"tier": "gold"},)]
    failures = dict(query(pg_dsn, "SELECT item_key, message FROM sync_failures"))
    assert set(failures) == {"line 6", "line 7", "line 8", "line 9", "line 10", "line 11"}
    assert "not valid UTF-8" in failures["line 6"]
    assert "'id' must be a positive integer" in failures["line 7"]
    assert "'name' must be a string" in failures["line 9"]
    assert "NUL" in failures["line 10"]


@pytest.mark.parametrize("argv", [
    ["--contacts", "0"], ["--contacts", "x"], ["--strategy", "fastest", "--contacts", "3"],
    ["--contacts", "3", "--contacts-file", "f"], [], ["--contacts-file", "/nonexistent"],
    ["--bogus"],
])
def test_bad_arguments_are_a_usage_error(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as ei:
        main(argv, env={})
    assert ei.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_missing_configuration_exits_2_naming_the_variable() -> None:
    import io

    err = io.StringIO()
    assert main(["--contacts", "3"], env={"OPENAI_API_KEY": API_KEY}, out=io.StringIO(),
                err=err) == 2
    assert "DATABASE_URL" in err.getvalue() and API_KEY not in err.getvalue()


def test_unreachable_database_exits_2_without_the_password(pg_dsn: str) -> None:
    cfg = SyncConfig(pg_dsn.replace("port=", "port=1"), "http://127.0.0.1:9",
                     "http://127.0.0.1:9/v1", API_KEY)
    code, out, err = run_main(cfg, "--contacts", "3")
    password = pg_dsn.split("password=")[1].split()[0]
    assert code == 2 and "cannot start" in err
    assert password not in out + err


@pytest.mark.timeout(120)
def test_demo_runs_the_whole_job_and_cleans_up() -> None:
    import os
    import shutil
    import subprocess
    import sys
    import tempfile

    script = Path(__file__).resolve().parent.parent / "examples" / "contact_sync.py"
    tmp = Path(tempfile.mkdtemp(prefix="demo-tmp-"))
    tmp.chmod(0o755)  # the cluster's unprivileged user must reach its dir inside
    try:
        proc = subprocess.run([sys.executable, str(script), "--demo", "--contacts", "80"],
                              capture_output=True, text=True, timeout=100,
                              env={**os.environ, "TMPDIR": str(tmp)})
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "ok 80, failed 0" in proc.stdout and "throughput" in proc.stdout
        assert "password=***" in proc.stderr and "demo-" not in proc.stdout + proc.stderr
        assert list(tmp.iterdir()) == []  # the throwaway cluster is gone
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_huge_and_non_utf8_message_bodies_flow_through(pg_dsn: str) -> None:
    from http_script import Reply, Request, ScriptedServer

    from simulators.servers import OpenAIServer

    big = "b" * (1 << 20)

    def messages(req: Request) -> Reply:
        cid = int(req.path.split("/")[2])
        if cid % 3 == 0:  # a 1 MB message body
            return Reply.json([{"body": "We signed the contract. " + big}])
        if cid % 3 == 1:  # bytes that are not UTF-8 inside the JSON
            return Reply(200, b'[{"body": "caf\xe9 \xff please send a quote"}]',
                         {"Content-Type": "application/json"})
        return Reply.json([])  # no messages at all

    with ScriptedServer(messages) as msgs, OpenAIServer(seed=2) as llm:
        cfg = SyncConfig(pg_dsn, msgs.url, llm.url + "/v1", API_KEY)
        code, out, err = run_main(cfg, "--contacts", "30")
    assert code == 0, out + err
    stages = dict(query(pg_dsn, "SELECT contact_id, stage FROM pipeline_assignments"))
    assert len(stages) == 30
    assert stages[3] == "won" and stages[1] == "proposal" and stages[2] == "lead"
    assert query(pg_dsn, "SELECT message_count FROM contacts WHERE contact_id = 2") == [(0,)]
