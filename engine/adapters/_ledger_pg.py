"""The ledger in PostgreSQL (psycopg2): ``PostgresLedger(dsn, table="conveyor_ledger")``.

The same table layout, semantics and guarantees as ``SqliteLedger`` (see ``engine._ledger``):
one writer thread applying every queued op in one transaction (group commit), reads on a
connection of their own, and exclusive use of a pipeline name through
``pg_try_advisory_lock(hashtext(table), hashtext(name))`` held on a **dedicated** connection
(the server drops it when that session ends, so a killed run never leaves a stale lock; two
names whose hashes collide would exclude each other: rare, and only a false ``LedgerBusy``).

Each batch is a handful of statements whatever its size (``unnest`` of arrays, all values bound
as parameters, never pasted into the SQL text). A write that fails because the connection broke
(``OperationalError``/``InterfaceError``: server restart, network) is retried on a fresh
connection (the transaction rolled back; every write is an idempotent upsert); any other error
is sticky, as described in ``engine._ledger``. The DSN's password never appears in a message.
"""
from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from typing import Any

import psycopg2
import psycopg2.extensions

from .._ledger import (
    _COLUMNS,
    _UPSERT_SET,
    Batch,
    Failed,
    Ledger,
    LedgerBusy,
    LedgerError,
    Op,
    Output,
)
from .postgres import redact_dsn

__all__ = ["PostgresLedger"]

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS {t} (
    pipeline     text NOT NULL,
    item_key     text NOT NULL,
    stage        text NOT NULL,
    status       text NOT NULL CHECK (status IN ('output', 'done', 'failed')),
    payload      text,
    failed_stage text,
    error_type   text,
    message      text,
    traceback    text,
    recorded_at  double precision NOT NULL,
    PRIMARY KEY (pipeline, item_key, stage)
)
"""
_UPSERT = f"ON CONFLICT (pipeline, item_key, stage) DO UPDATE SET {_UPSERT_SET}"
_OUTPUTS = (f"INSERT INTO {{t}} ({_COLUMNS}) SELECT p, k, s, 'output', v, NULL, NULL, NULL, "
            f"NULL, %s FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[]) "
            f"AS u(p, k, s, v) {_UPSERT}")
_DONE = (f"INSERT INTO {{t}} ({_COLUMNS}) SELECT p, k, '', 'done', NULL, NULL, NULL, NULL, "
         f"NULL, %s FROM unnest(%s::text[], %s::text[]) AS u(p, k) {_UPSERT}")
_FAILED = (f"INSERT INTO {{t}} ({_COLUMNS}) SELECT p, k, '', 'failed', NULL, s, e, m, tb, %s "
           f"FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[], "
           f"%s::text[]) AS u(p, k, s, e, m, tb) {_UPSERT}")
_CLEAR = ("DELETE FROM {t} AS l USING unnest(%s::text[], %s::text[]) AS c(p, k) "
          "WHERE l.pipeline = c.p AND l.item_key = c.k AND l.stage = '' "
          "AND l.status = 'failed'")


def _columns(rows: Sequence[tuple[str, ...]], n: int) -> list[list[str]]:
    return [[r[i] for r in rows] for i in range(n)]


class PostgresLedger(Ledger):
    """A ledger in the job's own PostgreSQL database; ``table`` is created if missing.

    ``connect_kwargs`` go to ``psycopg2.connect`` (e.g. ``connect_timeout``). Three
    connections at most: the writer thread's, the readers' (``lookup``, ``failures``,
    ``counts``, under a lock) and the one holding the advisory locks of ``open``ed names.
    """

    def __init__(self, dsn: str, table: str = "conveyor_ledger", *, max_batch: int = 10_000,
                 **connect_kwargs: Any) -> None:
        super().__init__(max_batch=max_batch)
        if not isinstance(dsn, str):
            raise TypeError(f"PostgresLedger.dsn: expected a str, got {type(dsn).__name__}")
        if not isinstance(table, str) or not _IDENTIFIER.fullmatch(table):
            raise ValueError(f"PostgresLedger.table: expected an SQL identifier (letters, "
                             f"digits, _; at most 63), got {table!r}")
        try:
            self._secret = psycopg2.extensions.parse_dsn(dsn).get("password") or ""
        except psycopg2.ProgrammingError:
            raise ValueError("PostgresLedger.dsn: not a valid PostgreSQL DSN") from None
        self._dsn = dsn
        self.where = redact_dsn(dsn)
        self.table = table
        self._connect_kwargs = connect_kwargs
        self._table_sql = f'"{table}"'  # a checked identifier, quoted: never user SQL
        self._placeholder = "%s"
        self._rconn: Any = None
        self._rlock = threading.Lock()
        self._wconn: Any = None
        self._lconn: Any = None
        self._schema_ready = False

    def __repr__(self) -> str:
        return f"PostgresLedger({self.where!r}, table={self.table!r})"

    # -- connections --------------------------------------------------------------------------
    def _scrub(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text

    def _connect(self, *, autocommit: bool) -> Any:
        try:
            conn = psycopg2.connect(self._dsn, **self._connect_kwargs)
        except psycopg2.Error as exc:
            raise LedgerError(f"cannot connect to the PostgreSQL ledger ({self.where}): "
                              f"{self._scrub(str(exc).strip())}") from None
        conn.autocommit = autocommit
        return conn

    def _read(self, sql_text: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        # under self._rlock; one reconnect when the connection broke (reads are idempotent)
        for attempt in (1, 2):
            if self._rconn is None or self._rconn.closed:
                self._rconn = self._connect(autocommit=True)
            try:
                with self._rconn.cursor() as cur:
                    cur.execute(sql_text, params)
                    return cur.fetchall() if cur.description is not None else []
            except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
                self._rconn.close()
                self._rconn = None
                if attempt == 2:
                    raise LedgerError(f"PostgreSQL ledger ({self.where}): "
                                      f"{self._scrub(str(exc).strip())}") from None
            except psycopg2.Error as exc:
                raise LedgerError(f"PostgreSQL ledger ({self.where}): {type(exc).__name__}: "
                                  f"{self._scrub(str(exc).strip())}") from None
        raise AssertionError("unreachable")

    def _query(self, sql_text: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        with self._rlock:
            if not self._schema_ready:
                self._create_schema()
            return self._read(sql_text, params)

    def _create_schema(self) -> None:  # under self._rlock
        # racing creators collide on the catalog: a transaction-scoped advisory lock serialises
        # them (one simple query is one implicit transaction)
        self._read("SELECT pg_advisory_xact_lock(hashtext('conveyor.ledger.schema')); "
                   + _SCHEMA.format(t=self._table_sql), ())
        self._schema_ready = True

    def _ensure_schema(self) -> None:
        with self._rlock:
            self._create_schema()

    def _keys_clause(self, keys: list[str]) -> tuple[str, list[Any]]:
        return "item_key = ANY(%s)", [keys]

    # -- exclusive use ---------------------------------------------------------------------------
    def _acquire(self, name: str) -> None:
        if self._lconn is None or self._lconn.closed:
            self._lconn = self._connect(autocommit=True)
        try:
            with self._lconn.cursor() as cur:
                cur.execute("SELECT pg_try_advisory_lock(hashtext(%s), hashtext(%s))",
                            (self.table, name))
                row = cur.fetchone()
        except psycopg2.Error as exc:
            raise LedgerError(f"PostgreSQL ledger ({self.where}): cannot take the lock of "
                              f"{name!r}: {self._scrub(str(exc).strip())}") from None
        if not (row and row[0]):
            raise LedgerBusy(name, f" (PostgreSQL advisory lock on table {self.table!r} at "
                                   f"{self.where})")

    def _release_lock(self, name: str) -> None:
        conn = self._lconn
        if conn is None or conn.closed:
            return
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT pg_advisory_unlock(hashtext(%s), hashtext(%s))",
                            (self.table, name))
        except psycopg2.Error:  # the session is gone, and its locks with it
            pass

    # -- writes ---------------------------------------------------------------------------------
    def _check(self, op: Op) -> None:
        # PostgreSQL's text cannot hold NUL; refuse it here rather than fail a whole batch
        if type(op) is Output:
            fields: tuple[str, ...] = (op.name, op.key, op.stage, op.payload)
        elif type(op) is Failed:
            fields = (op.name, op.key, op.stage)
        else:
            fields = (op.name, op.key)
        for value in fields:
            if "\x00" in value:
                raise ValueError(f"PostgresLedger: {value!r} contains a NUL character, "
                                 f"which PostgreSQL text cannot store")

    def _text(self, text: str) -> str:
        return super()._text(text).replace("\x00", "\\x00")

    def _write(self, batch: Batch) -> None:
        if self._wconn is None:
            self._wconn = self._connect(autocommit=False)
        conn = self._wconn
        t = self._table_sql
        now = batch.recorded_at
        try:
            with conn.cursor() as cur:
                if batch.clears:
                    cur.execute(_CLEAR.format(t=t), _columns(batch.clears, 2))
                if batch.outputs:
                    cur.execute(_OUTPUTS.format(t=t), [now, *_columns(batch.outputs, 4)])
                if batch.done:
                    cur.execute(_DONE.format(t=t), [now, *_columns(batch.done, 2)])
                if batch.failed:
                    cur.execute(_FAILED.format(t=t), [now, *_columns(batch.failed, 6)])
            conn.commit()
        except BaseException:
            if not conn.closed:
                try:
                    conn.rollback()
                except psycopg2.Error:
                    conn.close()
            raise

    def _recover(self, exc: Exception) -> bool:
        if isinstance(exc, psycopg2.OperationalError | psycopg2.InterfaceError | LedgerError):
            if self._wconn is not None:
                self._wconn.close()
            self._wconn = None  # the next attempt connects afresh
            return True
        return False

    def _close_writer_connection(self) -> None:
        if self._wconn is not None:
            self._wconn.close()
            self._wconn = None

    def _close_backend(self) -> None:
        with self._rlock:
            for conn in (self._rconn, self._lconn):
                if conn is not None and not conn.closed:
                    conn.close()
            self._rconn = self._lconn = None
