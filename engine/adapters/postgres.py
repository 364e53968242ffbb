"""Save and assign stages over ``psycopg2``, with the schema they need.

Connections
-----------
One ``ThreadedConnectionPool`` per store, shared by every stage that calls it. psycopg2's pool
raises "connection pool exhausted" instead of waiting once ``maxconn`` connections are out, so
it is sized to the stage limits: ``concurrency`` is the **sum of the concurrency limits of the
stages that call this store** (save 10 + assign 10 -> 20), plus one connection for the caller's
own bookkeeping (``start_run``, ``record_failure``, ``finish_run``, ``pending``). A semaphore of
the same size sits in front of the pool, so a caller that exceeds the limits waits for a
connection rather than failing.

A broken connection is never handed out twice: on ``OperationalError`` or ``InterfaceError``
(server restarted, network dropped, connection closed) the connection is discarded
(``putconn(close=True)``) and the call raises ``TransientError``; the engine's ``RetryPolicy``
retries it, and the pool opens a fresh connection; the idle pooled connections are dropped
too, since whatever broke one (a server restart) broke them all. Give the save/assign stages a
few attempts.

Writes
------
Every statement is parameterized (values never touch the SQL text). Rows are upserted with
``INSERT ... ON CONFLICT (contact_id) DO UPDATE``, so re-running a contact -- a retry after a
commit whose acknowledgement was lost, or a ``--resume`` -- overwrites its rows and never
duplicates them: calls are at-least-once, rows exactly-once. ``save`` writes the contact and its
analysis in one transaction; ``assign`` writes the pipeline assignment.

Each of them is **one round trip** (``execute``: autocommit, both upserts in one simple query,
which PostgreSQL runs as one implicit transaction) instead of four (BEGIN, two INSERTs, COMMIT).
Under load the client is GIL-bound, and every round trip is a GIL hand-off for a worker thread:
fewer round trips is what keeps the database stages from becoming the bottleneck.

Errors the database rejects (a NUL character in a name, a constraint) raise ``PermanentError``
with the server's message. The DSN's password never appears in an error message.
"""
from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import psycopg2
import psycopg2.extensions
import psycopg2.pool

from ._errors import PermanentError, TransientError, truncate
from ._records import Analysis, Analyzed, Assignment

__all__ = ["SCHEMA", "PostgresStore", "redact_dsn"]

T = TypeVar("T")


class _KeepingPool(psycopg2.pool.ThreadedConnectionPool):
    """A ``ThreadedConnectionPool`` that keeps every healthy connection it is given back.

    psycopg2's pool *closes* a returned connection whenever ``minconn`` idle ones are already
    pooled, so with ``minconn=1`` a busy store reconnected (TCP, SCRAM, a backend fork) for most
    statements: measured 451 connections for 2,000 writes. This one opens connections lazily,
    up to ``maxconn``, and keeps them. ``discard_idle`` closes the idle ones after a connection
    error, since a server restart breaks them all.
    """

    def _putconn(self, conn: Any, key: Any = None, close: bool = False) -> None:
        # called by putconn() under the pool's lock
        minconn, self.minconn = self.minconn, self.maxconn
        try:
            super()._putconn(conn, key, close)  # type: ignore[misc]
        finally:
            self.minconn = minconn

    def discard_idle(self) -> None:
        # psycopg2's private state: ThreadedConnectionPool guards _pool with _lock
        pool: Any = self
        with pool._lock:
            idle, pool._pool = pool._pool, []
        for conn in idle:
            conn.close()

SCHEMA = """
CREATE TABLE IF NOT EXISTS contacts (
    contact_id    bigint PRIMARY KEY,
    name          text,
    email         text,
    attributes    jsonb NOT NULL DEFAULT '{}'::jsonb,
    message_count integer NOT NULL DEFAULT 0,
    run_id        bigint,
    saved_at      timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS analyses (
    contact_id    bigint PRIMARY KEY REFERENCES contacts (contact_id) ON DELETE CASCADE,
    stage         text NOT NULL,
    score         double precision NOT NULL CHECK (score >= 0 AND score <= 1),
    summary       text NOT NULL,
    model         text NOT NULL DEFAULT '',
    run_id        bigint,
    analyzed_at   timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS pipeline_assignments (
    contact_id    bigint PRIMARY KEY REFERENCES contacts (contact_id) ON DELETE CASCADE,
    stage         text NOT NULL,
    score         double precision NOT NULL,
    run_id        bigint,
    assigned_at   timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS sync_runs (
    run_id        bigserial PRIMARY KEY,
    started_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz,
    strategy      text NOT NULL,
    params        jsonb NOT NULL DEFAULT '{}'::jsonb,
    status        text NOT NULL DEFAULT 'running',
    total         integer,
    ok            integer,
    failed        integer,
    cancelled     integer,
    skipped       integer
);
CREATE TABLE IF NOT EXISTS sync_failures (
    run_id        bigint NOT NULL REFERENCES sync_runs (run_id) ON DELETE CASCADE,
    item_key      text NOT NULL,
    contact_id    bigint,
    status        text NOT NULL,
    stage         text,
    error_type    text,
    message       text,
    recorded_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, item_key)
);
"""

_UPSERT_CONTACT = """
INSERT INTO contacts (contact_id, name, email, attributes, message_count, run_id, saved_at)
VALUES (%s, %s, %s, %s::jsonb, %s, %s, now())
ON CONFLICT (contact_id) DO UPDATE SET
    name = EXCLUDED.name, email = EXCLUDED.email, attributes = EXCLUDED.attributes,
    message_count = EXCLUDED.message_count, run_id = EXCLUDED.run_id, saved_at = now()
"""
_UPSERT_ANALYSIS = """
INSERT INTO analyses (contact_id, stage, score, summary, model, run_id, analyzed_at)
VALUES (%s, %s, %s, %s, %s, %s, now())
ON CONFLICT (contact_id) DO UPDATE SET
    stage = EXCLUDED.stage, score = EXCLUDED.score, summary = EXCLUDED.summary,
    model = EXCLUDED.model, run_id = EXCLUDED.run_id, analyzed_at = now()
"""
_UPSERT_ASSIGNMENT = """
INSERT INTO pipeline_assignments (contact_id, stage, score, run_id, assigned_at)
VALUES (%s, %s, %s, %s, now())
ON CONFLICT (contact_id) DO UPDATE SET
    stage = EXCLUDED.stage, score = EXCLUDED.score, run_id = EXCLUDED.run_id, assigned_at = now()
"""
_SAVE = _UPSERT_CONTACT.rstrip() + ";\n" + _UPSERT_ANALYSIS
_DONE = """
SELECT a.contact_id FROM pipeline_assignments a
JOIN analyses USING (contact_id)
WHERE a.contact_id = ANY(%s)
"""


def redact_dsn(dsn: str) -> str:
    """``dsn`` (URL or key/value form) with its password replaced by ``***``, for printing."""
    try:
        params = psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.ProgrammingError:
        return "<unparsable DSN>"
    if "password" in params:
        params["password"] = "***"
    return " ".join(f"{k}={v}" for k, v in params.items())


def default_assignment(analysis: Analysis) -> str:
    """The pipeline stage a contact is assigned to: the one the analysis names."""
    return analysis.stage


class PostgresStore:
    """The sync job's database: ``save`` and ``assign`` stage callables, runs, resume.

    ``concurrency`` is the sum of the concurrency limits of the stages that call ``save`` and
    ``assign`` (see the module docstring); the pool holds at most ``concurrency + 1``
    connections. ``connect_kwargs`` go to ``psycopg2.connect`` (e.g. ``options``).
    ``assign_rule`` maps an ``Analysis`` to a pipeline stage name.
    """

    def __init__(
        self,
        dsn: str,
        *,
        concurrency: int,
        create_schema: bool = True,
        assign_rule: Callable[[Analysis], str] = default_assignment,
        **connect_kwargs: Any,
    ) -> None:
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"PostgresStore.concurrency: expected an int >= 1, got "
                             f"{concurrency!r}")
        self._secret = psycopg2.extensions.parse_dsn(dsn).get("password") or ""
        self.maxconn = concurrency + 1
        self.run_id: int | None = None
        self._assign_rule = assign_rule
        self._slots = threading.BoundedSemaphore(self.maxconn)
        try:
            self._pool = _KeepingPool(1, self.maxconn, dsn, **connect_kwargs)
        except psycopg2.Error as exc:
            raise TransientError(f"cannot connect to PostgreSQL ({redact_dsn(dsn)}): "
                                 f"{self._scrub(str(exc).strip())}") from None
        if create_schema:
            self.create_schema()

    # -- connections ----------------------------------------------------------------------------
    def _scrub(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text

    def transaction(self, fn: Callable[[psycopg2.extensions.cursor], T]) -> T:
        """Run ``fn(cursor)`` in one transaction on a pooled connection and commit.

        Connection failures raise ``TransientError`` (and the connection is discarded); errors
        the database reports about the statement raise ``PermanentError``.
        """
        return self._call(fn, autocommit=False)

    def execute(self, sql: str, params: Sequence[Any]) -> None:
        """Run ``sql`` in **one round trip**. Several statements separated by ``;`` are sent
        as one simple query, which PostgreSQL runs as one implicit transaction: all or nothing,
        without the BEGIN and COMMIT round trips of ``transaction``. Parameters are bound by
        psycopg2 (quoted client-side), never pasted into the SQL text."""

        def run(cur: psycopg2.extensions.cursor) -> None:
            cur.execute(sql, params)

        self._call(run, autocommit=True)

    def _call(self, fn: Callable[[psycopg2.extensions.cursor], T], *, autocommit: bool) -> T:
        with self._slots:
            try:
                conn = self._pool.getconn()
            except psycopg2.Error as exc:  # opening a new connection failed
                raise TransientError(f"PostgreSQL connect failed: "
                                     f"{self._scrub(str(exc).strip())}") from None
            broken = False
            try:
                if conn.autocommit != autocommit:  # local: no round trip
                    conn.autocommit = autocommit
                with conn.cursor() as cur:
                    result = fn(cur)
                if not autocommit:
                    conn.commit()
                return result
            except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
                broken = True
                raise TransientError(
                    f"PostgreSQL connection failed ({type(exc).__name__}): "
                    f"{truncate(self._scrub(str(exc).strip()), 300)}") from None
            except psycopg2.Error as exc:
                raise PermanentError(
                    f"PostgreSQL rejected the write ({type(exc).__name__} {exc.pgcode}): "
                    f"{truncate(self._scrub(str(exc).strip()), 300)}") from None
            except ValueError as exc:  # psycopg2 refuses NUL characters before sending
                raise PermanentError(f"PostgreSQL cannot store this value: {exc}") from None
            finally:
                # putconn rolls back an open transaction; close=True drops a broken connection
                # so the pool opens a fresh one next time.
                self._pool.putconn(conn, close=broken or bool(conn.closed))
                if broken:  # a restart breaks every idle connection too: do not hand them out
                    self._pool.discard_idle()

    def close(self) -> None:
        self._pool.closeall()

    def __enter__(self) -> PostgresStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def create_schema(self) -> None:
        """Create the tables if they are missing (safe to run concurrently and repeatedly)."""

        def ddl(cur: psycopg2.extensions.cursor) -> None:
            # Two processes racing through CREATE TABLE IF NOT EXISTS can still collide on the
            # catalog; a transaction-scoped advisory lock serialises them.
            cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", ("conveyor.schema",))
            cur.execute(SCHEMA)

        self.transaction(ddl)

    # -- stage callables -----------------------------------------------------------------------
    def save(self, analyzed: Analyzed) -> Analyzed:
        """Stage ``Analyzed -> Analyzed``: upsert the contact and its analysis (one transaction)."""
        c, a = analyzed.contact, analyzed.analysis
        attributes = json.dumps(dict(c.attributes), ensure_ascii=False, default=str)
        # contact + analysis: one round trip, one implicit transaction (see ``execute``)
        self.execute(_SAVE, (c.id, c.name, c.email, attributes, analyzed.message_count,
                             self.run_id, c.id, a.stage, a.score, a.summary, analyzed.model,
                             self.run_id))
        return analyzed

    def assign(self, analyzed: Analyzed) -> Assignment:
        """Stage ``Analyzed -> Assignment``: upsert the contact's pipeline assignment."""
        a = analyzed.analysis
        stage = self._assign_rule(a)
        self.execute(_UPSERT_ASSIGNMENT, (analyzed.contact.id, stage, a.score, self.run_id))
        return Assignment(contact_id=analyzed.contact.id, stage=stage, score=a.score)

    # -- runs and resume -------------------------------------------------------------------------
    def start_run(self, strategy: str, params: dict[str, Any]) -> int:
        """Insert a ``sync_runs`` row; later saves and assigns are tagged with its id."""

        def insert(cur: psycopg2.extensions.cursor) -> int:
            cur.execute("INSERT INTO sync_runs (strategy, params) VALUES (%s, %s::jsonb) "
                        "RETURNING run_id", (strategy, json.dumps(params)))
            row = cur.fetchone()
            assert row is not None
            return int(row[0])

        self.run_id = self.transaction(insert)
        return self.run_id

    def record_failure(self, key: str, contact_id: int | None, status: str, stage: str | None,
                       error_type: str | None, message: str | None) -> None:
        """Record an item that did not finish in this run (durable, idempotent). ``key``
        names it even when it has no contact id (an unreadable line of a contacts file)."""
        run_id = self.run_id

        def clean(text: str | None) -> str | None:
            return None if text is None else text.replace("\x00", "\\x00")

        def insert(cur: psycopg2.extensions.cursor) -> None:
            cur.execute(
                "INSERT INTO sync_failures (run_id, item_key, contact_id, status, stage, "
                "error_type, message) VALUES (%s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (run_id, item_key) DO UPDATE SET status = EXCLUDED.status, "
                "stage = EXCLUDED.stage, error_type = EXCLUDED.error_type, "
                "message = EXCLUDED.message",
                (run_id, clean(key), contact_id, status, stage, error_type, clean(message)))

        self.transaction(insert)

    def finish_run(self, *, status: str, total: int, ok: int, failed: int, cancelled: int,
                   skipped: int = 0) -> None:
        run_id = self.run_id

        def update(cur: psycopg2.extensions.cursor) -> None:
            cur.execute("UPDATE sync_runs SET finished_at = now(), status = %s, total = %s, "
                        "ok = %s, failed = %s, cancelled = %s, skipped = %s WHERE run_id = %s",
                        (status, total, ok, failed, cancelled, skipped, run_id))

        self.transaction(update)

    def done_ids(self, ids: Iterable[int]) -> set[int]:
        """Which of ``ids`` are already saved, analysed and assigned."""
        wanted = list(ids)
        if not wanted:
            return set()

        def query(cur: psycopg2.extensions.cursor) -> set[int]:
            cur.execute(_DONE, (wanted,))
            return {int(r[0]) for r in cur.fetchall()}

        return self.transaction(query)

    def pending(self, items: Iterable[T], key: Callable[[T], int], *,
                chunk: int = 500, on_skip: Callable[[T], None] | None = None) -> Iterator[T]:
        """Lazily drop the items already done (for ``--resume``), ``chunk`` ids per query:
        memory stays O(chunk) however long the input is."""
        buf: list[T] = []
        for item in items:
            buf.append(item)
            if len(buf) >= chunk:
                yield from self._filter(buf, key, on_skip)
                buf = []
        if buf:
            yield from self._filter(buf, key, on_skip)

    def _filter(self, buf: list[T], key: Callable[[T], int],
                on_skip: Callable[[T], None] | None) -> Iterator[T]:
        done = self.done_ids(key(i) for i in buf)
        for item in buf:
            if key(item) in done:
                if on_skip is not None:
                    on_skip(item)
            else:
                yield item
