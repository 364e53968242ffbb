"""The ledger's base class, ``Ledger``: what every backend shares (engine/_ledger.py).

``put`` validates an op and queues it; one writer thread per ledger takes everything queued,
has the backend apply it in one transaction (``_write``), commits, and calls the ops'
``on_durable`` callbacks (group commit); a failed write is sticky. ``open``/``release`` take and
drop a pipeline name's exclusive use through the backend; ``lookup``, ``failures`` and
``counts`` run the shared queries on the backend's reader. The guarantees are described in
engine/_ledger.py; a backend (engine/_ledger_sqlite.py, engine/adapters/_ledger_pg.py)
provides the abstract methods.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, Final

from ._ledger_records import (
    _COUNT_FAILED_AT,
    _COUNT_IN_PROGRESS,
    _COUNT_ROWS,
    _FAILURES,
    _OPS,
    Batch,
    Counts,
    Entry,
    Failure,
    LedgerBusy,
    LedgerError,
    Op,
    _need_str,
    _reduce,
    _storable,
)

__all__ = ["Callback", "Ledger"]

log = logging.getLogger("engine.ledger")

Callback = Callable[[LedgerError | None], None]

# queue markers (never ops)
_BARRIER: Final = object()
_STOP: Final = object()



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

