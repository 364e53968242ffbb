"""PostgresStore against a real PostgreSQL 15 (throwaway cluster, a fresh database per test)."""
from __future__ import annotations

import threading
from collections.abc import Iterator

import psycopg2
import pytest

from engine.adapters import (
    Analysis,
    Analyzed,
    Assignment,
    Contact,
    PermanentError,
    PostgresStore,
    TransientError,
    redact_dsn,
)

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(60)]


def analyzed(cid: int, name: str | None = None, stage: str = "qualified",
             score: float = 0.4) -> Analyzed:
    return Analyzed(Contact(cid, name=name, email=f"c{cid}@example.com", attributes={"k": cid}),
                    Analysis(stage, score, f"summary {cid}"), 3, "m")  # type: ignore[arg-type]


@pytest.fixture
def store(pg_dsn: str) -> Iterator[PostgresStore]:
    with PostgresStore(pg_dsn, concurrency=4) as s:
        yield s


def rows(dsn: str, sql: str, args: tuple = ()) -> list[tuple]:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(sql, args)
        result = cur.fetchall()
    conn.close()
    return result


def test_schema_is_created_and_creation_is_idempotent(pg_dsn: str) -> None:
    stores = []
    errors: list[BaseException] = []

    def make() -> None:
        try:
            stores.append(PostgresStore(pg_dsn, concurrency=1))
        except BaseException as exc:
            errors.append(exc)

    ts = [threading.Thread(target=make) for _ in range(4)]  # racing creators
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors
    for s in stores:
        s.close()
    tables = {r[0] for r in rows(pg_dsn, "SELECT tablename FROM pg_tables "
                                         "WHERE schemaname = 'public'")}
    assert {"contacts", "analyses", "pipeline_assignments", "sync_runs"} <= tables
    keys = rows(pg_dsn, """
        SELECT c.relname, a.attname FROM pg_index i
        JOIN pg_class c ON c.oid = i.indrelid
        JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = ANY(i.indkey)
        WHERE i.indisprimary AND c.relname IN ('contacts', 'analyses', 'pipeline_assignments')""")
    assert sorted(keys) == [("analyses", "contact_id"), ("contacts", "contact_id"),
                            ("pipeline_assignments", "contact_id")]


def test_save_and_assign_are_idempotent_upserts(store: PostgresStore, pg_dsn: str) -> None:
    for _ in range(3):
        assert store.save(analyzed(1)) == analyzed(1)
        assert store.assign(analyzed(1)) == Assignment(1, "qualified", 0.4)
    store.save(analyzed(1, stage="won", score=0.9))  # a rerun with a new verdict overwrites
    store.assign(analyzed(1, stage="won", score=0.9))
    assert rows(pg_dsn, "SELECT count(*) FROM contacts") == [(1,)]
    assert rows(pg_dsn, "SELECT stage, score FROM analyses") == [("won", 0.9)]
    assert rows(pg_dsn, "SELECT contact_id, stage FROM pipeline_assignments") == [(1, "won")]


NASTY = [
    "Robert'); DROP TABLE contacts;--",
    'O\'Brien "the \\ quoter" `tick`',
    "%s %(name)s $1 ?; -- /* */",
    "Zoë 李 🚀 \u200b",
    "' OR '1'='1",
    "x" * 10_000,
]


@pytest.mark.parametrize("name", NASTY)
def test_names_with_quotes_and_sql_metacharacters_are_stored_verbatim(
        store: PostgresStore, pg_dsn: str, name: str) -> None:
    store.save(analyzed(5, name=name))
    store.assign(analyzed(5, name=name))
    assert rows(pg_dsn, "SELECT name FROM contacts WHERE contact_id = %s", (5,)) == [(name,)]
    assert rows(pg_dsn, "SELECT count(*) FROM contacts") == [(1,)]  # the table is still there


def test_a_nul_character_is_a_permanent_error_not_a_crash(store: PostgresStore) -> None:
    with pytest.raises(PermanentError, match="NUL"):
        store.save(analyzed(6, name="bad\x00name"))
    store.save(analyzed(7))  # the connection is still usable


def test_missing_fields_are_stored_as_null(store: PostgresStore, pg_dsn: str) -> None:
    store.save(Analyzed(Contact(8), Analysis("lead", 0.0, ""), 0))
    assert rows(pg_dsn, "SELECT name, email, attributes FROM contacts") == [(None, None, {})]


def test_pool_never_exhausts_when_callers_exceed_the_limit(pg_dsn: str) -> None:
    errors: list[BaseException] = []
    with PostgresStore(pg_dsn, concurrency=3) as store:
        def work(base: int) -> None:
            try:
                for i in range(20):
                    store.save(analyzed(base * 100 + i))
            except BaseException as exc:
                errors.append(exc)

        ts = [threading.Thread(target=work, args=(n,)) for n in range(12)]  # 12 > maxconn 4
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    assert not errors
    assert rows(pg_dsn, "SELECT count(*) FROM contacts") == [(240,)]


def test_broken_connections_are_replaced(store: PostgresStore, pg_dsn: str) -> None:
    store.save(analyzed(1))
    # kill every connection of the store behind its back (what a server restart does)
    rows(pg_dsn, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                 "WHERE datname = current_database() AND pid <> pg_backend_pid()")
    with pytest.raises(TransientError, match="connection"):
        store.save(analyzed(2))
    store.save(analyzed(2))  # a fresh connection
    assert rows(pg_dsn, "SELECT count(*) FROM contacts") == [(2,)]


def test_connect_failure_never_shows_the_password(pg_dsn: str) -> None:
    bad = pg_dsn.replace("password=", "password=WRONG")
    with pytest.raises(TransientError) as ei:
        PostgresStore(bad, concurrency=1)
    password = psycopg2.extensions.parse_dsn(bad)["password"]
    assert password not in str(ei.value)
    assert "password authentication failed" in str(ei.value)
    assert password not in redact_dsn(bad) and "***" in redact_dsn(bad)


def test_runs_failures_and_resume_filter(store: PostgresStore, pg_dsn: str) -> None:
    run = store.start_run("continuous", {"max_in_flight": None})
    for cid in (1, 2, 3):
        store.save(analyzed(cid))
    for cid in (1, 3):
        store.assign(analyzed(cid))
    store.record_failure("2", 2, "failed", "assign", "TransientError", "boom \x00 nul")
    store.record_failure("line 9", None, "failed", "fetch", "PermanentError", "bad \xff")
    store.finish_run(status="failed", total=3, ok=2, failed=1, cancelled=0)
    assert rows(pg_dsn, "SELECT status, ok, failed FROM sync_runs WHERE run_id = %s",
                (run,)) == [("failed", 2, 1)]
    assert rows(pg_dsn, "SELECT item_key, contact_id, stage, message FROM sync_failures "
                        "ORDER BY item_key") == [("2", 2, "assign", "boom \\x00 nul"),
                                                 ("line 9", None, "fetch", "bad \xff")]
    assert rows(pg_dsn, "SELECT DISTINCT run_id FROM contacts") == [(run,)]
    skipped: list[int] = []
    assert list(store.pending(range(1, 6), key=int, chunk=2, on_skip=skipped.append)) == [2, 4, 5]
    assert skipped == [1, 3]


def test_bad_concurrency_is_rejected(pg_dsn: str) -> None:
    with pytest.raises(ValueError, match="concurrency"):
        PostgresStore(pg_dsn, concurrency=0)
