"""A run over a ledger (DESIGN §11): what to restore at admission, and what to record.

The scheduler asks this module three things: at admission, what the ledger holds for an item
(``restore``); after a checkpointed stage's call succeeded, to record its output
(``checkpoint``: the item moves on only once that write is durable, so a kill -9 repeats at
most the calls in flight); and when an item ends, to record it done or failed (a dead letter
with its traceback). Writes go through the ledger's own writer thread, many items per
transaction; the dispatcher never waits for one.
"""
from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

from ._ledger import Done, Entry, Failed, Ledger, LedgerError, Output
from ._records import ErrorInfo, StageSpan
from ._stage import DEFAULT_CODEC, Stage

__all__ = ["Durable", "Restored"]


class Restored(NamedTuple):
    """What an item's ledger entry says to do: ``kind`` is ``"done"`` (report it ok, run
    nothing), ``"finish"`` (the same, and record it done: its end was not recorded),
    ``"failed"`` (a dead letter not replayed: report its recorded error) or
    ``"resume"`` (stages ``0..stage`` are restored: go on from ``stage + 1`` with ``value``)."""

    kind: str
    stage: int
    value: Any
    error: ErrorInfo | None


class Durable:
    """One run's use of a ledger: the pipeline's name, its checkpointed stages and codecs."""

    def __init__(self, ledger: Ledger, name: str, stages: Sequence[Stage], *,
                 retry_failed: bool) -> None:
        self.ledger = ledger
        self.name = name
        self.names = [st.name for st in stages]
        self.codecs = [(st.codec or DEFAULT_CODEC) if st.checkpoint else None for st in stages]
        self.retry_failed = retry_failed
        self.opened = False

    def open(self) -> None:
        """Take exclusive use of the pipeline's name (``LedgerBusy`` if another run has it)."""
        self.ledger.open(self.name)
        self.opened = True

    def close(self) -> None:
        """Flush what was recorded and release the name (the caller owns the ledger)."""
        if self.opened:
            self.opened = False
            self.ledger.release(self.name)

    def lookup(self, keys: Sequence[Hashable]) -> list[Entry | None]:
        """The entries of ``keys`` (None where the ledger has nothing): one query."""
        found = self.ledger.lookup(self.name, [str(k) for k in keys])
        return [found.get(str(k)) for k in keys]

    def restore(self, entry: Entry) -> Restored | None:
        """What to do with an item the ledger knows; None: run it from the start."""
        if entry.failure is not None and not entry.done:
            f = entry.failure
            if not self.retry_failed:
                return Restored("failed", -1, None, ErrorInfo(
                    f.stage, f.type, f.message, f.type, f.traceback))
        last = -1
        value: Any = None
        for s, codec in enumerate(self.codecs):  # the latest stage whose output is recorded
            payload = entry.outputs.get(self.names[s])
            if codec is not None and payload is not None:
                last, value = s, codec.decode(payload)
        if entry.done:
            return Restored("done", len(self.names) - 1, value if last == len(self.names) - 1
                            else None, None)
        if last < 0:
            return None
        if last == len(self.names) - 1:  # its last output recorded, its end not (a kill
            return Restored("finish", last, value, None)  # between the two writes): record it
        return Restored("resume", last, value, None)

    def spans(self, upto: int, now: float) -> list[StageSpan]:
        """Stages ``0..upto`` as restored from the ledger: no calls, ``start == end``."""
        return [StageSpan(self.names[s], now, now, (), True) for s in range(upto + 1)]

    def checkpointed(self, stage: int) -> bool:
        return self.codecs[stage] is not None

    def checkpoint(self, key: Hashable, stage: int, value: Any,
                   on_durable: Callable[[LedgerError | None], None] | None) -> None:
        """Record a checkpointed stage's output; raises ``CodecError`` if it cannot be
        encoded (the item then fails with it), ``LedgerError`` if the ledger has failed."""
        codec = self.codecs[stage]
        assert codec is not None
        payload = codec.encode(value)
        self.ledger.put(Output(self.name, str(key), self.names[stage], payload), on_durable)

    def done(self, key: Hashable) -> None:
        self.ledger.put(Done(self.name, str(key)))

    def failed(self, key: Hashable, error: ErrorInfo) -> None:
        self.ledger.put(Failed(self.name, str(key), error.stage, error.type,
                               error.message, error.traceback))
