"""Durable runs: the ledger (DESIGN.md section 11), its guarantees, and where it lives.

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

Modules
-------
This one is where the engine (and a backend) imports the ledger from. ``Ledger``, the base
class every backend extends (the queue, the writer thread, the sticky error, the reads), is in
engine/_ledger_base.py; the records (ops, entries, the codec, the errors) and the SQL the
backends share in engine/_ledger_records.py; ``SqliteLedger`` (its durability and its locks)
in engine/_ledger_sqlite.py; ``PostgresLedger`` in engine/adapters/_ledger_pg.py.
"""
from __future__ import annotations

from ._ledger_base import Ledger
from ._ledger_records import _COLUMNS as _COLUMNS  # the backends' shared SQL
from ._ledger_records import _UPSERT_SET as _UPSERT_SET
from ._ledger_records import Batch as Batch  # what a backend writes in one transaction
from ._ledger_records import (
    Codec,
    CodecError,
    Counts,
    Done,
    Entry,
    Failed,
    Failure,
    JsonCodec,
    LedgerBusy,
    LedgerError,
    Op,
    Output,
)
from ._ledger_sqlite import SqliteLedger

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
