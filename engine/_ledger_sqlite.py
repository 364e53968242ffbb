"""The ledger in one SQLite file: ``SqliteLedger("sync.db")`` (stdlib ``sqlite3``).

The table layout, the semantics (group commit, ``on_durable``, sticky failures) and the reads
are the shared ones (engine/_ledger.py, engine/_ledger_base.py); this module is how SQLite
stores and locks them. Each batch is a handful of statements whatever its size: the rows of a
kind are bound as one JSON array (``json_each``), not one parameter per column per row.

Durability (SQLite)
-------------------
WAL journal, ``synchronous=NORMAL`` by default: a committed transaction survives a crash or a
``kill -9`` of the process (it is in the WAL file, which the OS writes out), but the last
transactions before a power loss or an OS crash may be rolled back. ``synchronous="FULL"``
fsyncs the WAL at every commit and survives those too; group commit makes it cheap.

Exclusive use: ``open(name)`` takes ``fcntl.flock`` on a side file ``<db>.lock-<hash of name>``
(it holds the holder's pid, for the message). The kernel releases it when the process dies, so a
``kill -9`` never leaves a stale lock. Another ``Ledger`` object, thread or process opening the
same name meanwhile gets ``LedgerBusy``.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import quote

from ._ledger_base import Ledger
from ._ledger_records import _COLUMNS, _UPSERT_SET, Batch, LedgerBusy, LedgerError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = ["SqliteLedger"]

_SQLITE_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS conveyor_ledger (
    pipeline     TEXT NOT NULL,
    item_key     TEXT NOT NULL,
    stage        TEXT NOT NULL,  -- a checkpointed stage; '' = the item's own row
    status       TEXT NOT NULL CHECK (status IN ('output', 'done', 'failed')),
    payload      TEXT,           -- output: the encoded output
    failed_stage TEXT,           -- failed: where, and the error
    error_type   TEXT,
    message      TEXT,
    traceback    TEXT,
    recorded_at  REAL NOT NULL,  -- seconds since the epoch
    PRIMARY KEY (pipeline, item_key, stage)
)
"""


def _json_rows(columns: str) -> str:
    """``INSERT ... SELECT`` over a JSON array of arrays bound as ?1 (one bound parameter per
    batch instead of one per column per row: binding is most of executemany's cost)."""
    return (f"INSERT INTO conveyor_ledger ({_COLUMNS}) SELECT {columns} FROM json_each(?1) "
            f"WHERE true ON CONFLICT (pipeline, item_key, stage) DO UPDATE SET {_UPSERT_SET}")


def _at(i: int) -> str:
    return f"json_extract(value, '$[{i}]')"


_SQLITE_OUTPUTS: Final = _json_rows(f"{_at(0)}, {_at(1)}, {_at(2)}, 'output', {_at(3)}, "
                                    f"NULL, NULL, NULL, NULL, ?2")
_SQLITE_DONE: Final = _json_rows(f"{_at(0)}, {_at(1)}, '', 'done', NULL, NULL, NULL, NULL, "
                                 f"NULL, ?2")
_SQLITE_FAILED: Final = (f"INSERT INTO conveyor_ledger ({_COLUMNS}) VALUES "
                         f"(?, ?, '', 'failed', NULL, ?, ?, ?, ?, ?) ON CONFLICT (pipeline, "
                         f"item_key, stage) DO UPDATE SET {_UPSERT_SET}")
_SQLITE_CLEAR: Final = (f"DELETE FROM conveyor_ledger WHERE stage = '' AND status = 'failed' "
                        f"AND (pipeline, item_key) IN (SELECT {_at(0)}, {_at(1)} "
                        f"FROM json_each(?1))")


def _dumps(rows: list[Any]) -> str:
    return json.dumps(rows, ensure_ascii=False, separators=(",", ":"))


class SqliteLedger(Ledger):
    """A ledger in one SQLite file (stdlib ``sqlite3``, WAL): ``SqliteLedger("sync.db")``.

    One connection for the writer thread, one (locked) for reads. ``synchronous`` is
    ``"NORMAL"`` (durable against a process crash, not a power loss) or ``"FULL"`` (both).
    ``readonly=True`` opens an existing file for reading only (``open``/``put`` raise; a file
    without the table reads as empty); a missing file is then a ``LedgerError``. ``timeout`` is
    how long a statement waits for another process's write lock.
    """

    def __init__(self, path: str | os.PathLike[str], *,
                 synchronous: Literal["NORMAL", "FULL"] = "NORMAL", readonly: bool = False,
                 timeout: float = 30.0, max_batch: int = 10_000) -> None:
        super().__init__(max_batch=max_batch)
        if not isinstance(path, str | os.PathLike):
            raise TypeError(f"SqliteLedger.path: expected a path, got {path!r}")
        text = os.fspath(path)
        if not text or text == ":memory:" or text.startswith("file:"):
            raise ValueError(f"SqliteLedger.path: expected a file path, got {text!r} (an "
                             f"in-memory database is not durable nor shared between "
                             f"connections)")
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"SqliteLedger.synchronous: expected 'NORMAL' or 'FULL', got "
                             f"{synchronous!r}")
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not (
                timeout >= 0 and math.isfinite(timeout)):
            raise ValueError(f"SqliteLedger.timeout: expected seconds >= 0, got {timeout!r}")
        self.path = Path(text)
        self.synchronous = synchronous
        self.readonly = readonly
        self.timeout = float(timeout)
        self._rconn: sqlite3.Connection | None = None
        self._rlock = threading.Lock()
        self._wconn: sqlite3.Connection | None = None
        self._schema_ready = False
        self._locks: dict[str, int] = {}  # name -> fd of its flock'ed side file

    def __repr__(self) -> str:
        return f"SqliteLedger({str(self.path)!r})"

    def _connect(self) -> sqlite3.Connection:
        try:
            if self.readonly:
                if not self.path.is_file():
                    raise LedgerError(f"no SQLite ledger at {self.path}")
                uri = f"file:{quote(str(self.path.resolve()))}?mode=ro"
                conn = sqlite3.connect(uri, uri=True, timeout=self.timeout,
                                       isolation_level=None, check_same_thread=False)
            else:
                conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None,
                                       check_same_thread=False)
                mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    conn.close()
                    raise LedgerError(f"SQLite ledger {self.path}: cannot use WAL journal "
                                      f"mode (got {mode!r})")
                conn.execute(f"PRAGMA synchronous={self.synchronous}")
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot open the SQLite ledger {self.path}: {exc}") from exc
        return conn

    def _reader(self) -> sqlite3.Connection:  # under self._rlock
        if self._rconn is None:
            self._rconn = self._connect()
        if not self._schema_ready and not self.readonly:
            self._rconn.execute(_SQLITE_SCHEMA)
            self._schema_ready = True
        return self._rconn

    def _ensure_schema(self) -> None:
        if self.readonly:
            raise LedgerError(f"SQLite ledger {self.path} is open read-only")
        with self._rlock:
            try:
                self._reader()
            except sqlite3.Error as exc:
                raise LedgerError(f"SQLite ledger {self.path}: cannot create the table: "
                                  f"{exc}") from exc

    def _lock_path(self, name: str) -> Path:
        digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:20]
        return self.path.with_name(f"{self.path.name}.lock-{digest}")

    def _acquire(self, name: str) -> None:
        if fcntl is None:  # pragma: no cover - not POSIX
            raise LedgerError("SqliteLedger needs fcntl.flock (a POSIX system)")
        lock_path = self._lock_path(name)
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise LedgerError(f"cannot create the lock file {lock_path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = os.pread(fd, 100, 0).decode("utf-8", "replace").split()
            except OSError:
                holder = []
            os.close(fd)
            pid = f", pid {holder[0]}" if holder else ""
            raise LedgerBusy(name, f" (lock file {lock_path}{pid})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._locks[name] = fd

    def _release_lock(self, name: str) -> None:
        fd = self._locks.pop(name, None)
        if fd is not None:
            os.close(fd)  # closing the last descriptor drops the flock

    def _write(self, batch: Batch) -> None:
        conn = self._wconn
        if conn is None:
            conn = self._wconn = self._connect()
        now = batch.recorded_at
        conn.execute("BEGIN IMMEDIATE")
        try:
            if batch.clears:
                conn.execute(_SQLITE_CLEAR, (_dumps(batch.clears),))
            if batch.outputs:
                conn.execute(_SQLITE_OUTPUTS, (_dumps(batch.outputs), now))
            if batch.done:
                conn.execute(_SQLITE_DONE, (_dumps(batch.done), now))
            if batch.failed:
                conn.executemany(_SQLITE_FAILED, [(*f, now) for f in batch.failed])
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _close_writer_connection(self) -> None:
        if self._wconn is not None:
            self._wconn.close()
            self._wconn = None

    def _query(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        with self._rlock:
            try:
                return self._reader().execute(sql, params).fetchall()
            except sqlite3.OperationalError as exc:
                if self.readonly and "no such table" in str(exc):
                    return []
                raise LedgerError(f"SQLite ledger {self.path}: {exc}") from exc
            except sqlite3.Error as exc:
                raise LedgerError(f"SQLite ledger {self.path}: {exc}") from exc

    def _keys_clause(self, keys: list[str]) -> tuple[str, list[Any]]:
        return f"item_key IN ({', '.join('?' * len(keys))})", keys

    def _close_backend(self) -> None:
        with self._rlock:
            if self._rconn is not None:
                self._rconn.close()
                self._rconn = None
