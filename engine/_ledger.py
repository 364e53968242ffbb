"""Durable runs: the ledger (DESIGN.md section 11) and its SQLite store.

The scheduler records, per (pipeline name, item key, stage), what a later run must not pay for
again: a checkpointed stage's encoded output (``Output``), that an item is done (``Done``), or
that it failed (``Failed``, a dead letter). A run calls, in this order::

    ledger.open(name)                       # tables if missing; exclusive use of `name`
    ledger.lookup(name, keys)               # prefetch thread, one query per chunk of keys
    ledger.put(op, on_durable)              # never blocks: a queue to the writer thread
    ledger.flush()                          # blocks until everything put so far is durable
    ledger.release(name); ledger.close()

Writes
------
``put`` only validates the op and appends it to a queue. One writer thread per ledger takes
**everything queued** (up to ``max_batch`` ops), applies it in one transaction, commits, and
then calls each op's ``on_durable`` callback, in put order, from the writer thread: group
commit, so the write rate is bounded by the rows, not by the commits (``commits`` counts them).
While a transaction commits, the next batch queues up. Ops for one key are applied in put
order. Callbacks must be quick (they hold up the next commit) and must not call ``flush``.

Failed writes are never lost silently. ``on_durable(error)`` is called **exactly once** per op
given one: with ``None`` after its transaction committed, or with the ``LedgerError`` if the op
will never be durable. A failed write is sticky: the ledger keeps the error, every later
``put``/``flush`` raises it (chained to the database's exception), ops still queued are not
written and their callbacks get the error, and ``close`` raises it if nothing else has. Before
giving up, a backend may recover and replay the batch (PostgreSQL reconnects after a dropped
connection); replaying is safe because every write is an idempotent upsert.

Entries
-------
One table (``conveyor_ledger``), a row per (pipeline, item_key, stage): ``status='output'`` rows
hold a checkpointed stage's payload; the item's own row has ``stage=''`` (stage names are never
empty) and ``status`` ``'done'`` or ``'failed'`` (with the failing stage, type, message and
traceback). ``Done`` and ``Failed`` replace the item row; an ``Output`` deletes a ``failed`` item
row (a later success clears the dead letter); outputs are kept when an item is done.

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
import logging
import math
import os
import queue
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, Protocol, TypedDict, runtime_checkable
from urllib.parse import quote

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "Codec",
    "CodecError",
    "Counts",
    "Done",
    "Entry",
    "Failed",
    "Failure",
    "JsonCodec",
    "Ledger",
    "LedgerBusy",
    "LedgerError",
    "Op",
    "Output",
    "SqliteLedger",
]

log = logging.getLogger("engine.ledger")

# -- errors -------------------------------------------------------------------------------------


class LedgerError(Exception):
    """The ledger cannot do what was asked: a write that failed, a closed or read-only ledger,
    a database that cannot be opened."""


class LedgerBusy(LedgerError):
    """Another run holds the pipeline name ``name`` in this ledger."""

    def __init__(self, name: str, detail: str = "") -> None:
        self.name = name
        self.detail = detail
        super().__init__(
            f"ledger: pipeline name {name!r} is in use by another run{detail}; wait for that "
            f"run to end (or stop it), or give this pipeline another name")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.name, self.detail))


class CodecError(ValueError):
    """A stage's output cannot be encoded for the ledger, or a stored payload decoded."""


# -- codec --------------------------------------------------------------------------------------


@runtime_checkable
class Codec(Protocol):
    """How a checkpointed stage's output becomes the text the ledger stores, and back."""

    def encode(self, value: Any) -> str: ...

    def decode(self, text: str) -> Any: ...


@dataclass(frozen=True, slots=True)
class JsonCodec:
    """JSON (the default codec of ``Stage(..., checkpoint=True)``).

    Python's JSON dialect: ``NaN``/``Infinity`` round-trip; a tuple comes back as a list and
    non-string dict keys as strings. Values JSON cannot hold (sets, dataclasses, datetimes)
    raise ``CodecError`` naming the type: give such a stage a ``codec=`` of its own.
    """

    def encode(self, value: Any) -> str:
        try:
            return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        except (TypeError, ValueError, RecursionError) as exc:
            raise CodecError(f"JsonCodec cannot encode a value of type {type(value).__name__}: "
                             f"{exc}; give the stage a codec= that can") from None

    def decode(self, text: str) -> Any:
        try:
            return json.loads(text)
        except (TypeError, ValueError, RecursionError) as exc:
            raise CodecError(f"JsonCodec cannot decode the stored payload "
                             f"{text[:60]!r}: {exc}") from None


# -- ops and entries ----------------------------------------------------------------------------


def _need_str(owner: str, field: str, value: object, *, empty: bool = False,
              free: bool = False) -> None:
    if type(value) is not str:  # exact: subclasses do not bind everywhere
        raise TypeError(f"{owner}.{field}: expected a str, got {value!r}")
    if not value and not empty:
        raise ValueError(f"{owner}.{field}: expected a non-empty str")
    if not free and not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{owner}.{field}: {value!r} is not valid Unicode (a lone "
                             f"surrogate): the ledger stores UTF-8") from None


@dataclass(frozen=True, slots=True)
class Output:
    """A checkpointed stage's encoded output for item ``key`` of pipeline ``name``."""

    name: str
    key: str
    stage: str
    payload: str

    def __post_init__(self) -> None:
        _need_str("Output", "name", self.name)
        _need_str("Output", "key", self.key, empty=True)
        _need_str("Output", "stage", self.stage)
        _need_str("Output", "payload", self.payload, empty=True)


@dataclass(frozen=True, slots=True)
class Done:
    """Item ``key`` of pipeline ``name`` finished its last stage (clears a failure)."""

    name: str
    key: str

    def __post_init__(self) -> None:
        _need_str("Done", "name", self.name)
        _need_str("Done", "key", self.key, empty=True)


@dataclass(frozen=True, slots=True)
class Failed:
    """A dead letter: item ``key`` failed at ``stage`` (replaces an earlier one)."""

    name: str
    key: str
    stage: str
    type: str
    message: str
    traceback: str = ""

    def __post_init__(self) -> None:
        _need_str("Failed", "name", self.name)
        _need_str("Failed", "key", self.key, empty=True)
        _need_str("Failed", "stage", self.stage)
        _need_str("Failed", "type", self.type, free=True)  # free text: stored escaped
        _need_str("Failed", "message", self.message, empty=True, free=True)
        _need_str("Failed", "traceback", self.traceback, empty=True, free=True)


Op = Output | Done | Failed
_OPS: Final = frozenset((Output, Done, Failed))


@dataclass(frozen=True, slots=True)
class Failure:
    """A recorded failure; ``recorded_at`` is in seconds since the epoch (``time.time()``)."""

    key: str
    stage: str
    type: str
    message: str
    traceback: str
    recorded_at: float


@dataclass(frozen=True, slots=True)
class Entry:
    """What the ledger holds for one item: done, checkpointed outputs (stage -> payload) and
    the current failure, if any (``None`` once the item is done or a later stage succeeded)."""

    done: bool
    outputs: dict[str, str]
    failure: Failure | None = None


class Counts(TypedDict):
    """``Ledger.counts``: items done, failed, and with checkpoints but neither
    (``in_progress``); checkpointed outputs per stage and failures per failing stage, each in
    the order the stages were first recorded (ties: the larger count first, as an earlier
    stage has at least as many outputs as a later one)."""

    done: int
    failed: int
    in_progress: int
    outputs: dict[str, int]
    failed_at: dict[str, int]


Callback = Callable[[LedgerError | None], None]

# queue markers (never ops)
_BARRIER: Final = object()
_STOP: Final = object()

# SQL shared by the backends ({t}: the table, {p}: the placeholder)
_COLUMNS: Final = ("pipeline, item_key, stage, status, payload, failed_stage, error_type, "
                   "message, traceback, recorded_at")
_UPSERT_SET: Final = ("status = excluded.status, payload = excluded.payload, "
                      "failed_stage = excluded.failed_stage, error_type = excluded.error_type, "
                      "message = excluded.message, traceback = excluded.traceback, "
                      "recorded_at = excluded.recorded_at")
_FAILURES: Final = ("SELECT item_key, failed_stage, error_type, message, traceback, recorded_at "
                    "FROM {t} WHERE pipeline = {p} AND stage = '' AND status = 'failed' "
                    "ORDER BY recorded_at, item_key")
_COUNT_ROWS: Final = ("SELECT stage, status, COUNT(*), MIN(recorded_at) FROM {t} "
                      "WHERE pipeline = {p} GROUP BY stage, status "
                      "ORDER BY MIN(recorded_at), COUNT(*) DESC, stage")
_COUNT_FAILED_AT: Final = ("SELECT failed_stage, COUNT(*) FROM {t} WHERE pipeline = {p} "
                           "AND stage = '' AND status = 'failed' GROUP BY failed_stage "
                           "ORDER BY MIN(recorded_at), COUNT(*) DESC, failed_stage")
_COUNT_IN_PROGRESS: Final = ("SELECT COUNT(DISTINCT o.item_key) FROM {t} o "
                             "WHERE o.pipeline = {p} AND o.stage <> '' AND NOT EXISTS "
                             "(SELECT 1 FROM {t} i WHERE i.pipeline = o.pipeline "
                             "AND i.item_key = o.item_key AND i.stage = '')")


@dataclass(slots=True)
class Batch:
    """What one transaction writes: a batch of ops reduced to one row per primary key (the
    last op wins), grouped by kind. ``clears`` are the (name, key) whose *failed* item row is
    deleted first (an ``Output`` after a failure); ``recorded_at`` is ``time.time()``."""

    outputs: list[tuple[str, str, str, str]]  # name, key, stage, payload
    done: list[tuple[str, str]]  # name, key
    failed: list[tuple[str, str, str, str, str, str]]  # name, key, stage, type, message, tb
    clears: list[tuple[str, str]]
    recorded_at: float
    ops: int


def _reduce(batch: list[Op], now: float, text: Callable[[str], str]) -> Batch:
    outputs: dict[tuple[str, str, str], str] = {}
    items: dict[tuple[str, str], Failed | None] = {}  # None: done
    clears: dict[tuple[str, str], None] = {}
    for op in batch:
        nk = (op.name, op.key)
        if type(op) is Output:
            outputs[(op.name, op.key, op.stage)] = op.payload
            if nk not in items:
                clears[nk] = None  # a success clears a stored dead letter
            elif items[nk] is not None:
                del items[nk]  # ... and one put earlier in this batch
                clears[nk] = None
        elif type(op) is Done:
            items[nk] = None
            clears.pop(nk, None)  # the upsert replaces the item row anyway
        else:
            assert type(op) is Failed
            items[nk] = op
            clears.pop(nk, None)
    return Batch(
        outputs=[(n, k, s, p) for (n, k, s), p in outputs.items()],
        done=[nk for nk, f in items.items() if f is None],
        failed=[(f.name, f.key, f.stage, text(f.type), text(f.message), text(f.traceback))
                for f in items.values() if f is not None],
        clears=list(clears), recorded_at=now, ops=len(batch))


def _storable(text: str) -> str:
    """``text`` with what UTF-8 cannot hold (lone surrogates) escaped."""
    if text.isascii():
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


# -- the ledger ---------------------------------------------------------------------------------


class Ledger(ABC):
    """Durable per-item state of pipeline runs (see the module docstring for the guarantees).

    Thread-safe: ``put`` from the dispatcher, ``lookup`` from a prefetch thread, ``counts``
    from anywhere. ``commits`` and ``written`` count the transactions and ops written.
    """

    #: transactions to try a batch in before the failure is sticky (if ``_recover`` agrees)
    write_attempts: int = 3
    #: seconds to wait before the second, third ... attempt
    retry_delays: tuple[float, ...] = (0.2, 1.0)

    def __init__(self, *, max_batch: int = 10_000) -> None:
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"{type(self).__name__}.max_batch: expected an int >= 1, got "
                             f"{max_batch!r}")
        self.max_batch = max_batch
        self.commits = 0
        self.written = 0
        self._queue: queue.SimpleQueue[tuple[object, Any]] = queue.SimpleQueue()
        self._lock = threading.Lock()  # held, writer, closed, error state
        self._held: set[str] = set()
        self._writer: threading.Thread | None = None
        self._error: LedgerError | None = None
        self._error_raised = False
        self._closed = False

    # -- what a backend provides ------------------------------------------------------------
    #: the SQL placeholder and the (quoted) table name the shared queries use
    _placeholder: str = "?"
    _table_sql: str = "conveyor_ledger"

    @abstractmethod
    def _ensure_schema(self) -> None:
        """Create the table if it is missing (safe to repeat, safe to race)."""

    @abstractmethod
    def _acquire(self, name: str) -> None:
        """Take exclusive use of ``name`` or raise ``LedgerBusy``."""

    @abstractmethod
    def _release_lock(self, name: str) -> None:
        """Let go of ``name`` (best effort: never raises)."""

    @abstractmethod
    def _write(self, batch: Batch) -> None:
        """On the writer thread: delete the failed item rows of ``batch.clears``, then upsert
        its rows, in one transaction, and commit (or roll back and raise)."""

    @abstractmethod
    def _query(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        """Run a read on the reader connection (any thread)."""

    @abstractmethod
    def _keys_clause(self, keys: list[str]) -> tuple[str, list[Any]]:
        """SQL matching ``item_key`` against ``keys`` and its parameters."""

    @abstractmethod
    def _close_backend(self) -> None:
        """Close every connection (the writer thread has stopped)."""

    def _close_writer_connection(self) -> None:
        """On the writer thread, as it stops."""
        return None

    def _recover(self, exc: Exception) -> bool:
        """After a failed write: whether to retry the batch (after reconnecting, say)."""
        return False

    def _check(self, op: Op) -> None:
        """Backend-specific validation of an op at ``put`` (raise ``ValueError``)."""
        return None

    def _text(self, text: str) -> str:
        """Free text (error messages) as the backend can store it."""
        return _storable(text)

    def _scrub(self, text: str) -> str:
        """``text`` without secrets (a DSN's password), for error messages."""
        return text

    def _sql(self, template: str) -> str:
        return template.format(t=self._table_sql, p=self._placeholder)

    # -- runs -------------------------------------------------------------------------------
    def open(self, name: str) -> None:
        """Create the tables if missing and take exclusive use of ``name`` for this run.

        Raises ``LedgerBusy`` if another run (another ledger object, thread or process, or this
        object already) holds ``name``; ``release(name)`` ends the use.
        """
        _need_str(type(self).__name__, "open(name)", name)
        with self._lock:
            self._check_open()
            if name in self._held:
                raise LedgerBusy(name, " (this ledger object already holds it)")
            self._ensure_schema()
            self._acquire(name)
            self._held.add(name)

    def release(self, name: str) -> None:
        """Flush, then end this run's exclusive use of ``name`` (no-op if not held)."""
        with self._lock:
            if name not in self._held:
                return
            self._held.discard(name)  # puts for it raise from now on
        try:
            self.flush()
        finally:
            self._release_lock(name)

    @property
    def held(self) -> frozenset[str]:
        """The pipeline names this ledger object holds."""
        return frozenset(self._held)

    # -- writes -----------------------------------------------------------------------------
    def put(self, op: Op, on_durable: Callback | None = None) -> None:
        """Enqueue ``op`` for the writer thread; never waits for the database.

        ``on_durable(error)`` is called exactly once, from the writer thread: ``None`` after the
        transaction holding ``op`` committed, or the ``LedgerError`` if it never will. Raises
        ``LedgerError`` (and enqueues nothing) once a write failed, after ``close``, or for a
        name this ledger has not ``open``ed; ``TypeError``/``ValueError`` for a malformed op.
        """
        if type(op) not in _OPS:
            raise TypeError(f"Ledger.put: expected an Output, Done or Failed, got {op!r}")
        self._check(op)
        with self._lock:
            if self._error is not None:
                self._raise_error()
            if self._closed:
                raise LedgerError("ledger is closed")
            if op.name not in self._held:
                raise LedgerError(f"ledger: put for pipeline name {op.name!r}, which this "
                                  f"ledger has not open()ed (or has released)")
            if self._writer is None:
                self._writer = threading.Thread(target=self._run, daemon=True,
                                                name=f"{type(self).__name__}-writer")
                self._writer.start()
            self._queue.put((op, on_durable))

    def flush(self) -> None:
        """Block until everything put so far is durable; raise ``LedgerError`` if a write
        failed."""
        with self._lock:
            writer = self._writer
            if writer is threading.current_thread():
                raise LedgerError("ledger: flush() from an on_durable callback would wait for "
                                  "itself")
            done = threading.Event()
            if writer is not None and not self._closed:
                self._queue.put((_BARRIER, done))
            else:
                done.set()
        while not done.wait(0.5):
            if writer is not None and not writer.is_alive() and not done.is_set():
                raise LedgerError("ledger: the writer thread is gone")
        if self._error is not None:
            with self._lock:
                self._raise_error()

    def close(self) -> None:
        """Flush, stop the writer thread, release held names and close the connections.
        Idempotent. Raises the ``LedgerError`` of a failed write not raised before."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            writer = self._writer
            if writer is not None:
                self._queue.put((_STOP, None))
        try:
            if writer is not None:
                writer.join()
        finally:
            for name in sorted(self._held):
                self._release_lock(name)
            self._held.clear()
            self._close_backend()
        with self._lock:
            if self._error is not None and not self._error_raised:
                self._raise_error()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise LedgerError("ledger is closed")

    def _raise_error(self) -> None:  # under self._lock
        assert self._error is not None
        self._error_raised = True
        raise LedgerError(f"ledger: an earlier write failed, nothing more is written: "
                          f"{self._error}") from self._error

    # -- the writer thread --------------------------------------------------------------------
    def _run(self) -> None:
        q = self._queue
        limit = self.max_batch
        try:
            while True:
                batch = [q.get()]
                while len(batch) < limit:
                    try:
                        batch.append(q.get_nowait())
                    except queue.Empty:
                        break
                ops: list[Op] = []
                callbacks: list[Callback] = []
                barriers: list[threading.Event] = []
                stop = False
                for op, arg in batch:
                    if op is _BARRIER:
                        barriers.append(arg)
                    elif op is _STOP:
                        stop = True
                    else:
                        ops.append(op)  # type: ignore[arg-type]
                        if arg is not None:
                            callbacks.append(arg)
                error = self._error
                if ops and error is None:
                    error = self._commit(ops)
                    if error is not None:
                        log.error("%s", error)
                        with self._lock:
                            self._error = error
                for cb in callbacks:
                    try:
                        cb(error)
                    except Exception:
                        log.exception("ledger: an on_durable callback raised")
                for ev in barriers:
                    ev.set()
                if stop:
                    return
        finally:
            self._close_writer_connection()

    def _commit(self, ops: list[Op]) -> LedgerError | None:
        try:
            batch = _reduce(ops, time.time(), self._text)
        except Exception as exc:  # a bug, not the database: still surfaced
            err = LedgerError(f"ledger: cannot prepare a write: {exc!r}")
            err.__cause__ = exc
            return err
        attempt = 1
        while True:
            try:
                self._write(batch)
            except Exception as exc:
                if attempt < self.write_attempts and self._recover(exc):
                    delays = self.retry_delays
                    time.sleep(delays[min(attempt, len(delays)) - 1] if delays else 0.0)
                    attempt += 1
                    continue
                err = LedgerError(
                    f"ledger write of {len(ops)} op(s) failed after {attempt} attempt(s): "
                    f"{type(exc).__name__}: {self._scrub(str(exc).strip())}")
                err.__cause__ = exc
                return err
            self.commits += 1
            self.written += len(ops)
            return None

    # -- reads --------------------------------------------------------------------------------
    def lookup(self, name: str, keys: Sequence[str]) -> dict[str, Entry]:
        """The entries of those of ``keys`` the ledger has (absent keys are left out): one
        query (per ``max_keys`` keys)."""
        keys = list(keys)
        for k in keys:
            if type(k) is not str:
                raise TypeError(f"Ledger.lookup: keys must be str, got {k!r}")
        if not keys:
            return {}
        acc: dict[str, list[Any]] = {}
        for i in range(0, len(keys), self.max_keys):
            clause, params = self._keys_clause(keys[i:i + self.max_keys])
            sql = (f"SELECT item_key, stage, status, payload, failed_stage, error_type, "
                   f"message, traceback, recorded_at FROM {self._table_sql} "
                   f"WHERE pipeline = {self._placeholder} AND {clause}")
            for key, stage, status, payload, fstage, etype, msg, tb, at in self._query(
                    sql, [name, *params]):
                e = acc.get(key)
                if e is None:
                    e = acc[key] = [False, {}, None]
                if status == "output":
                    e[1][stage] = payload
                elif status == "done":
                    e[0] = True
                else:
                    e[2] = Failure(key, fstage, etype, msg or "", tb or "", float(at))
        return {k: Entry(d, o, f) for k, (d, o, f) in acc.items()}

    #: keys per query in ``lookup`` (larger requests are split)
    max_keys: int = 900

    def failures(self, name: str) -> list[Failure]:
        """The dead letters of pipeline ``name``, oldest first."""
        return [Failure(k, s, t, m or "", tb or "", float(at))
                for k, s, t, m, tb, at in self._query(self._sql(_FAILURES), [name])]

    def counts(self, name: str) -> Counts:
        """Items done / failed / in progress and per-stage counts of pipeline ``name``."""
        counts: Counts = {"done": 0, "failed": 0, "in_progress": 0, "outputs": {},
                          "failed_at": {}}
        for stage, status, n, _ in self._query(self._sql(_COUNT_ROWS), [name]):
            if status == "output":
                counts["outputs"][stage] = int(n)
            elif status == "done":
                counts["done"] = int(n)
            elif status == "failed":
                counts["failed"] = int(n)
        if counts["failed"]:
            for stage, n in self._query(self._sql(_COUNT_FAILED_AT), [name]):
                counts["failed_at"][stage] = int(n)
        if counts["outputs"]:
            rows = self._query(self._sql(_COUNT_IN_PROGRESS), [name])
            counts["in_progress"] = int(rows[0][0]) if rows else 0
        return counts


# -- SQLite -------------------------------------------------------------------------------------

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
