"""AsyncPostgresStore (issue 15) against a real PostgreSQL 15 (throwaway cluster, a fresh database
per test): the same rows, upserts, errors and scrubbing as PostgresStore, one pool per event
loop (closed with its loop), and the store as the engine's async save/assign stages."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import psycopg2
import pytest
from test_adapter_postgres import NASTY, analyzed, rows

from engine import Pipeline, RetryPolicy, Stage
from engine.adapters import (
    RETRYABLE,
    Analysis,
    Analyzed,
    Assignment,
    AsyncPostgresStore,
    Contact,
    PermanentError,
    PostgresStore,
    TransientError,
)
from engine.adapters._async_postgres import connect_args

pytestmark = pytest.mark.postgres

T = TypeVar("T")


def run(dsn: str, fn: Callable[[AsyncPostgresStore], Awaitable[T]], **kw: Any) -> T:
    """``fn(store)`` on a fresh event loop, the store closed at the end."""
    async def go() -> T:
        async with AsyncPostgresStore(dsn, **{"concurrency": 4, **kw}) as store:
            return await fn(store)

    return asyncio.run(go())


TABLES = {
    "contacts": "contact_id, name, email, attributes, message_count, run_id",
    "analyses": "contact_id, stage, score, summary, model, run_id",
    "pipeline_assignments": "contact_id, stage, score, run_id",
}


def table_rows(dsn: str) -> dict[str, list[tuple]]:
    return {t: rows(dsn, f"SELECT {cols} FROM {t} ORDER BY contact_id")
            for t, cols in TABLES.items()}


@pytest.mark.timeout(60)
def test_the_same_rows_as_the_sync_store(pg_cluster: Any) -> None:
    items = [analyzed(1), analyzed(2, name=NASTY[0], stage="won", score=0.9),
             Analyzed(Contact(3), Analysis("lead", 0.0, ""), 0)]
    sync_dsn = pg_cluster.create_database("sync_rows")
    async_dsn = pg_cluster.create_database("async_rows")
    with PostgresStore(sync_dsn, concurrency=2) as sync:
        sync.run_id = 7
        results = [(sync.save(a), sync.assign(a)) for a in items]

    async def go(store: AsyncPostgresStore) -> list[tuple[Analyzed, Assignment]]:
        store.run_id = 7
        return [(await store.save(a), await store.assign(a)) for a in items]

    assert run(async_dsn, go) == results
    assert table_rows(async_dsn) == table_rows(sync_dsn)
    assert rows(async_dsn, "SELECT count(*) FROM contacts WHERE saved_at IS NULL") == [(0,)]


@pytest.mark.timeout(60)
def test_schema_is_created_once_and_creation_races_are_safe(pg_dsn: str) -> None:
    async def go() -> None:
        stores = [AsyncPostgresStore(pg_dsn, concurrency=1) for _ in range(4)]
        # each store's first call creates the schema, all at once; then more calls per store
        await asyncio.gather(*(s.save(analyzed(i + 1)) for i, s in enumerate(stores)))
        await asyncio.gather(*(s.assign(analyzed(i + 1)) for i, s in enumerate(stores)))
        for s in stores:
            await s.aclose()

    asyncio.run(go())
    assert rows(pg_dsn, "SELECT count(*) FROM pipeline_assignments") == [(4,)]
    tables = {r[0] for r in rows(pg_dsn, "SELECT tablename FROM pg_tables "
                                         "WHERE schemaname = 'public'")}
    assert {"contacts", "analyses", "pipeline_assignments", "sync_runs", "sync_failures"} <= tables


@pytest.mark.timeout(60)
def test_save_and_assign_are_idempotent_upserts(pg_dsn: str) -> None:
    async def go(store: AsyncPostgresStore) -> None:
        for _ in range(3):
            assert await store.save(analyzed(1)) == analyzed(1)
            assert await store.assign(analyzed(1)) == Assignment(1, "qualified", 0.4)
        await store.save(analyzed(1, stage="won", score=0.9))  # a rerun overwrites
        await store.assign(analyzed(1, stage="won", score=0.9))

    run(pg_dsn, go)
    assert rows(pg_dsn, "SELECT count(*) FROM contacts") == [(1,)]
    assert rows(pg_dsn, "SELECT stage, score FROM analyses") == [("won", 0.9)]
    assert rows(pg_dsn, "SELECT contact_id, stage FROM pipeline_assignments") == [(1, "won")]


@pytest.mark.timeout(60)
def test_names_with_quotes_and_sql_metacharacters_are_stored_verbatim(pg_dsn: str) -> None:
    async def go(store: AsyncPostgresStore) -> None:
        for i, name in enumerate(NASTY):
            await store.save(analyzed(i + 1, name=name))

    run(pg_dsn, go)
    got = rows(pg_dsn, "SELECT name FROM contacts ORDER BY contact_id")
    assert got == [(name,) for name in NASTY]


@pytest.mark.timeout(60)
def test_rejected_values_are_permanent_errors_and_the_pool_goes_on(pg_dsn: str) -> None:
    async def go(store: AsyncPostgresStore) -> list[Any]:
        errors = []
        for bad in (analyzed(6, name="bad\x00name"),  # NUL: the server rejects the text
                    analyzed(7, score=1.5)):  # the CHECK constraint on score
            with pytest.raises(PermanentError) as ei:
                await store.save(bad)
            errors.append(ei.value)
        await store.save(analyzed(8))  # the connections are still usable
        return errors

    nul, check = run(pg_dsn, go)
    assert "0x00" in str(nul) and "rejected" in str(nul)
    assert "CheckViolationError" in str(check) and "analyses_score_check" in str(check)
    assert rows(pg_dsn, "SELECT contact_id FROM contacts") == [(8,)]  # all or nothing


@pytest.mark.timeout(60)
def test_a_value_asyncpg_cannot_encode_is_permanent(pg_dsn: str) -> None:
    async def go(store: AsyncPostgresStore) -> None:
        await store.save(Analyzed(Contact("x"), Analysis("lead", 0.1, ""), 0))  # type: ignore

    with pytest.raises(PermanentError, match="invalid input for query argument"):
        run(pg_dsn, go)


@pytest.mark.timeout(60)
def test_missing_fields_are_stored_as_null(pg_dsn: str) -> None:
    async def go(store: AsyncPostgresStore) -> None:
        await store.save(Analyzed(Contact(8), Analysis("lead", 0.0, ""), 0))

    run(pg_dsn, go)
    assert rows(pg_dsn, "SELECT name, email, attributes FROM contacts") == [(None, None, {})]


@pytest.mark.timeout(60)
def test_callers_past_the_limit_wait_and_the_pool_stays_bounded(pg_dsn: str) -> None:
    peak: list[int] = []

    async def go(store: AsyncPostgresStore) -> None:
        async def work(base: int) -> None:
            for i in range(20):
                await store.save(analyzed(base * 100 + i))

        async def watch() -> None:
            while True:
                (n,), = rows(pg_dsn, "SELECT count(*) FROM pg_stat_activity WHERE "
                                     "datname = current_database() AND pid <> pg_backend_pid()")
                peak.append(n)
                await asyncio.sleep(0.01)

        watcher = asyncio.ensure_future(watch())
        await asyncio.gather(*(work(n) for n in range(12)))  # 12 callers > 4 connections
        watcher.cancel()
        (pool,) = store.pools()
        assert pool.get_size() <= store.maxconn == 4

    run(pg_dsn, go, concurrency=3)
    assert rows(pg_dsn, "SELECT count(*) FROM contacts") == [(240,)]
    assert max(peak) <= 4


@pytest.mark.timeout(60)
def test_broken_connections_are_replaced(pg_dsn: str) -> None:
    async def go(store: AsyncPostgresStore) -> None:
        await asyncio.gather(*(store.save(analyzed(i)) for i in (1, 2, 3)))
        # kill every connection of the store behind its back (what a server restart does)
        rows(pg_dsn, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                     "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        await asyncio.sleep(0.2)
        try:
            await store.save(analyzed(4))
        except TransientError as exc:  # or the pool noticed the closed socket first
            assert "connection" in str(exc)
            await store.save(analyzed(4))
        await store.save(analyzed(5))  # fresh connections

    run(pg_dsn, go)
    assert rows(pg_dsn, "SELECT count(*) FROM contacts") == [(5,)]


@pytest.mark.timeout(60)
def test_a_terminated_connection_mid_statement_is_transient(pg_dsn: str) -> None:
    async def go(store: AsyncPostgresStore) -> str:
        pool = await store.pool()
        async with pool.acquire() as conn:
            pid = await conn.fetchval("SELECT pg_backend_pid()")

        async def kill_soon() -> None:
            await asyncio.sleep(0.3)
            rows(pg_dsn, f"SELECT pg_terminate_backend({int(pid)})")

        killer = asyncio.ensure_future(kill_soon())
        with pytest.raises(TransientError) as ei:
            await store.execute("SELECT pg_sleep(5)")
        await killer
        await store.save(analyzed(1))  # the pool opened a fresh connection
        return str(ei.value)

    message = run(pg_dsn, go, concurrency=1)
    assert "connection" in message


@pytest.mark.timeout(60)
def test_connect_failures_are_transient_and_never_show_the_password(pg_dsn: str) -> None:
    bad = pg_dsn.replace("password=", "password=WRONG")
    password = psycopg2.extensions.parse_dsn(bad)["password"]
    with pytest.raises(TransientError) as ei:
        run(bad, lambda store: store.save(analyzed(1)))
    assert password not in str(ei.value) and password not in repr(ei.value)
    assert "password authentication failed" in str(ei.value)
    params = psycopg2.extensions.parse_dsn(pg_dsn)
    closed_port = pg_dsn.replace(f"port={params['port']}", "port=1")
    with pytest.raises(TransientError, match="connection failed"):
        run(closed_port, lambda store: store.save(analyzed(1)))


@pytest.mark.timeout(60)
def test_one_pool_per_event_loop_closed_with_its_loop(pg_dsn: str) -> None:
    store = AsyncPostgresStore(pg_dsn, concurrency=2)
    seen: list[Any] = []

    async def use(cid: int) -> None:
        await store.save(analyzed(cid))
        seen.append(await store.pool())

    asyncio.run(use(1))
    asyncio.run(use(2))  # a second loop: a second pool (the first one's loop is gone)
    assert seen[0] is not seen[1]
    assert all(p.is_closing() for p in seen)  # each closed as its loop shut down
    for _ in range(50):  # the server ends a backend a moment after its client hung up
        if rows(pg_dsn, "SELECT count(*) FROM pg_stat_activity WHERE datname = "
                        "current_database() AND pid <> pg_backend_pid()") == [(0,)]:
            break
        time.sleep(0.05)
    else:
        pytest.fail("a pool left connections open")
    store.close()
    with pytest.raises(RuntimeError, match="closed"):
        asyncio.run(use(3))


@pytest.mark.timeout(120)
def test_the_store_as_the_engines_async_stages(pg_dsn: str) -> None:
    store = AsyncPostgresStore(pg_dsn, concurrency=6)
    store.run_id = 42
    killed = []

    async def save(a: Analyzed) -> Analyzed:
        if a.contact.id == 50 and not killed:  # a server restart mid-run: retried
            killed.append(1)
            rows(pg_dsn, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        return await store.save(a)

    db = RetryPolicy(attempts=6, backoff=0.01, retry_on=RETRYABLE)
    pipeline = Pipeline([Stage("save", save, concurrency=3, retry=db),
                         Stage("assign", store.assign, concurrency=3, retry=db)])
    report = pipeline.run([analyzed(i) for i in range(1, 201)])
    assert report.ok == 200, [r.error for r in report.results if r.error][:3]
    assert rows(pg_dsn, "SELECT count(*), min(a.run_id), max(n.run_id) FROM pipeline_assignments "
                        "a JOIN analyses n USING (contact_id)") == [(200, 42, 42)]
    assert all(p.is_closing() for p in store.pools())  # the run's loop closed its pool
    store.close()


@pytest.mark.timeout(10)
def test_connect_args_read_libpq_dsns() -> None:
    kv = connect_args("host=db.example port=6543 dbname=crm user=sync password=s3cr=t "
                      "connect_timeout=5 application_name=job options='-c statement_timeout=5s "
                      "-csearch_path=crm --lock_timeout=1s' sslmode=require keepalives=1")
    assert kv == {"host": "db.example", "port": 6543, "database": "crm", "user": "sync",
                  "password": "s3cr=t", "timeout": 5.0,
                  "server_settings": {"application_name": "job", "statement_timeout": "5s",
                                      "search_path": "crm", "lock_timeout": "1s"},
                  "dsn": "postgresql://?sslmode=require"}
    url = connect_args("postgresql://sync:p%40ss@db.example:6543/crm?connect_timeout=1")
    assert url == {"host": "db.example", "port": 6543, "database": "crm", "user": "sync",
                   "password": "p@ss", "timeout": 2.0}  # libpq's minimum of 2 s
    with pytest.raises(ValueError, match="invalid PostgreSQL DSN") as ei:
        connect_args("host=x password=hunter2 nonsense_key=1")
    assert "hunter2" not in str(ei.value)


@pytest.mark.timeout(10)
def test_bad_concurrency_is_rejected() -> None:
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="concurrency"):
            AsyncPostgresStore("host=x", concurrency=bad)  # type: ignore[arg-type]
