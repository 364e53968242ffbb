"""The ledger's records: what a run tells a ledger and what it reads back (engine/_ledger.py).

The ops a run puts (``Output``: a checkpointed stage's encoded output; ``Done``; ``Failed``: a
dead letter), validated where they are made; what ``lookup`` / ``failures`` / ``counts`` return
(``Entry``, ``Failure``, ``Counts``); the codec of checkpointed outputs (``JsonCodec`` by
default); the ledger's errors; and, for the backends, the ``Batch`` one transaction writes (a
batch of ops reduced to one row per primary key) and the SQL they share.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol, TypedDict, runtime_checkable

__all__ = [
    "Batch",
    "Codec",
    "CodecError",
    "Counts",
    "Done",
    "Entry",
    "Failed",
    "Failure",
    "JsonCodec",
    "LedgerBusy",
    "LedgerError",
    "Op",
    "Output",
]

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

