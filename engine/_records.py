"""Frozen result records: what a run hands back, and the results document of DESIGN.md §6.

One record format, owned by this module: the scheduler builds an item's :class:`StageSpan`
when the item leaves a stage (with one :class:`Attempt` per call, the per-call extras of
DESIGN §6.1 included) and an :class:`ItemResult` when the item becomes visible; the one
serializer (:func:`item_doc`) writes them. ``Attempt`` and ``StageSpan`` are named tuples
(immutable, and a third of a frozen dataclass's cost to build: one is made per call);
``ErrorInfo`` and ``ItemResult`` are frozen dataclasses.
"""
from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol, runtime_checkable

from ._errors import describe
from ._summary import summarize

__all__ = [
    "Attempt",
    "ErrorInfo",
    "ItemResult",
    "Observer",
    "RunInfo",
    "RunReport",
    "StageSpan",
    "StageStats",
    "item_doc",
]

Status = Literal["ok", "failed", "cancelled"]


@dataclass(frozen=True)
class ErrorInfo:
    """An exception, reduced to what can be stored and compared: the stage, the type's name
    and the message; ``exc_type`` (module-qualified) and ``traceback`` (formatted, at most
    8 KB, its tail) say more but do not take part in equality."""

    stage: str
    type: str
    message: str
    exc_type: str = field(default="", compare=False)
    traceback: str = field(default="", repr=False, compare=False)

    @classmethod
    def from_exception(cls, stage: str, exc: BaseException) -> ErrorInfo:
        """Never raises, even when ``str(exc)`` does (the message is then a placeholder)."""
        name, message, qualified, tb = describe(exc)
        return cls(stage, name, message, qualified, tb)

    def to_json(self) -> dict[str, str]:
        return {"stage": self.stage, "type": self.type, "message": self.message,
                "exc_type": self.exc_type or self.type, "traceback": self.traceback}


class Attempt(NamedTuple):
    """One call of a stage: when it started and ended (seconds since the run started), its
    error if it failed, and DESIGN §6.1's extras: ``hedge`` (a hedged duplicate of an attempt),
    ``lost`` (its twin won; its result was discarded), ``cost`` (what it charged its budget)."""

    start: float
    end: float
    error: ErrorInfo | None = None
    hedge: bool = False
    lost: bool = False
    cost: Mapping[str, float] | None = None


class StageSpan(NamedTuple):
    """An item's passage through one stage: every call, in order of start. ``start`` is the
    first call's start, ``end`` the end of the last call not ``lost``. A stage restored from a
    ledger is ``resumed``: no calls, ``start == end`` = when it was restored."""

    name: str
    start: float
    end: float
    attempts: tuple[Attempt, ...]
    resumed: bool = False


@dataclass(frozen=True)
class ItemResult:
    """The outcome of one item, handed over when it becomes visible."""

    # slots by hand: dataclass(slots=True) rebuilds the class, and frozen's __setattr__ then
    # fails with a TypeError instead of FrozenInstanceError (CPython gh-90562, fixed in 3.12)
    __slots__ = ("error", "index", "key", "stages", "status", "value", "visible_at")

    index: int
    key: Hashable
    status: Status
    value: Any
    error: ErrorInfo | None
    stages: tuple[StageSpan, ...]
    visible_at: float | None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def __reduce__(self) -> tuple[Any, ...]:  # frozen with slots: rebuild through __init__
        return (ItemResult, (self.index, self.key, self.status, self.value, self.error,
                             self.stages, self.visible_at))


@dataclass(frozen=True, slots=True)
class StageStats:
    """Per-stage statistics of a run (seconds are engine-clock seconds).

    ``queue_wait_s`` is the time calls waited between being queued and starting: for a free
    slot, and (``limit_wait_s`` of it) for the stage's rate limit or budget. When a caller's
    ``Executor`` has fewer workers than the stage's limit, ``executor_workers`` says so and the
    call times are measured where the call ran (not including the executor's own queue).
    """

    name: str
    concurrency: int
    calls: int
    errors: int
    retries: int
    busy_s: float  #: sum of call durations
    queue_wait_s: float  #: sum over calls of (start - time the item was queued for the stage)
    peak_in_flight: int
    wall_s: float
    limit_wait_s: float = 0.0  #: the part of queue_wait_s spent waiting for a rate limit/budget
    budget_wait_s: float = 0.0  #: the budget's part of limit_wait_s
    overloaded: int = 0  #: calls answered with a rate-limit/overload error
    hedges: int = 0
    hedges_won: int = 0
    resumed: int = 0  #: items whose output at this stage was restored from a ledger
    executor_workers: int | None = None
    limit_timeline: tuple[tuple[float, int], ...] = ()  #: an adaptive stage's limit changes
    budget: str | None = None  #: the name of the budget the stage reserves from

    def to_json(self, scale: float = 1.0) -> dict[str, Any]:
        """The stage's entry in ``metadata.stages`` (DESIGN §6.1: counters only when set)."""
        doc: dict[str, Any] = {"name": self.name, "concurrency": self.concurrency}
        if self.limit_timeline:
            doc["limit_timeline"] = [[t / scale, n] for t, n in self.limit_timeline]
        for key, value in (("overloaded", self.overloaded), ("resumed", self.resumed)):
            if value:
                doc[key] = value
        if self.hedges:  # both, 0 won included
            doc["hedges"], doc["hedges_won"] = self.hedges, self.hedges_won
        if self.budget is not None:
            doc["budget_wait_s"] = self.budget_wait_s / scale
        return doc

    @property
    def busy_share(self) -> float:
        """Share of the stage's slot-time spent in calls: busy / (concurrency x wall time)."""
        cap = self.concurrency * self.wall_s
        return self.busy_s / cap if cap > 0 else 0.0

    @property
    def held_s(self) -> float:
        """Item-seconds the stage held items back: queued (for a slot or a limit) or in calls."""
        return self.queue_wait_s + self.busy_s


def item_doc(r: ItemResult, scale: float = 1.0) -> dict[str, Any]:
    """One item of the results document (DESIGN §6 and §6.1), times divided by ``scale``."""
    return {
        "index": r.index,
        "key": str(r.key),
        "status": r.status,
        "visible_at": None if r.visible_at is None else r.visible_at / scale,
        "error": None if r.error is None else r.error.to_json(),
        "stages": [_span_doc(sp, scale) for sp in r.stages],
    }


def _span_doc(sp: StageSpan, scale: float) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": sp.name,
        "start": sp.start / scale,
        "end": sp.end / scale,
        "attempts": sum(1 for a in sp.attempts if not a.hedge),
        "calls": [_call_doc(a, scale) for a in sp.attempts],
    }
    if sp.resumed:
        doc["resumed"] = True
    return doc


def _call_doc(a: Attempt, scale: float) -> list[Any]:
    if not (a.hedge or a.lost or a.cost):
        return [a.start / scale, a.end / scale]
    extras: dict[str, Any] = {}
    if a.hedge:
        extras["hedge"] = True
    if a.lost:
        extras["lost"] = True
    if a.cost:
        extras["cost"] = dict(a.cost)
    return [a.start / scale, a.end / scale, extras]


@dataclass(frozen=True)
class RunReport:
    """Everything a run produced: every item, per-stage statistics, the strategy, wall time."""

    items: tuple[ItemResult, ...]
    stages: tuple[StageStats, ...]
    strategy: str
    params: Mapping[str, Any]
    clock: str
    wall_time: float
    started_at: str
    metadata: Mapping[str, Any] = field(default_factory=dict)
    #: the budgets the stages reserve from: ``{"name", "stages", "per_minute", "burst"}``
    budgets: tuple[Mapping[str, Any], ...] = ()

    @property
    def ok(self) -> int:
        return sum(1 for r in self.items if r.status == "ok")

    @property
    def failed(self) -> int:
        return sum(1 for r in self.items if r.status == "failed")

    @property
    def cancelled(self) -> int:
        return sum(1 for r in self.items if r.status == "cancelled")

    @property
    def bottleneck(self) -> StageStats | None:
        """The stage that held items back longest: time queued for a slot, for its rate limit
        or budget, and in calls, summed over its calls (:attr:`StageStats.held_s`)."""
        return max(self.stages, key=lambda s: s.held_s, default=None)

    def text(self) -> str:
        """A short human report: counts, throughput, per-stage table, the bottleneck and why."""
        n = len(self.items)
        rate = self.ok / self.wall_time if self.wall_time > 0 else 0.0
        lines = [
            f"{self.strategy} {dict(self.params)} on the {self.clock} clock: {n} items, "
            f"{self.ok} ok, {self.failed} failed, {self.cancelled} cancelled in "
            f"{self.wall_time:.3f} s ({rate:.1f} items/s)",
            f"{'stage':<14}{'limit':>6}{'calls':>9}{'errors':>8}{'retries':>8}"
            f"{'busy':>7}{'wait/call':>11}{'peak':>6}",
        ]
        for s in self.stages:
            wait = s.queue_wait_s / s.calls if s.calls else 0.0
            lines.append(
                f"{s.name:<14}{s.concurrency:>6}{s.calls:>9}{s.errors:>8}{s.retries:>8}"
                f"{s.busy_share:>7.0%}{wait:>10.3f}s{s.peak_in_flight:>6}"
            )
        for s in self.stages:
            notes = []
            if s.executor_workers is not None and s.executor_workers < s.concurrency:
                notes.append(f"its executor has {s.executor_workers} workers for a limit of "
                             f"{s.concurrency}: at most {s.executor_workers} calls ran at once")
            if s.overloaded:
                notes.append(f"{s.overloaded} calls answered overloaded (429)")
            if s.limit_timeline and len(s.limit_timeline) > 1:
                notes.append(f"adaptive limit {s.limit_timeline[0][1]} -> "
                             f"{s.limit_timeline[-1][1]} ({len(s.limit_timeline) - 1} changes)")
            if s.hedges:
                notes.append(f"{s.hedges} hedged calls, {s.hedges_won} won")
            if s.resumed:
                notes.append(f"{s.resumed} items restored from the ledger")
            if notes:
                lines.append(f"  {s.name}: " + "; ".join(notes))
        b = self.bottleneck
        if b is not None and b.calls:
            per = b.held_s / b.calls
            slot = b.queue_wait_s - b.limit_wait_s
            lines.append(
                f"bottleneck: {b.name} held items longest ({per:.3f} s per call: "
                f"{b.limit_wait_s / b.calls:.3f} s waiting for its rate limit or budget, "
                f"{slot / b.calls:.3f} s for a slot, {b.busy_s / b.calls:.3f} s in calls; "
                f"slots busy {b.busy_share:.0%})")
        return "\n".join(lines)

    def to_json(
        self, *, metadata: Mapping[str, Any] | None = None, time_scale: float = 1.0
    ) -> dict[str, Any]:
        """The results document of DESIGN.md §6 (version 1), times divided by ``time_scale``."""
        if not (isinstance(time_scale, int | float) and time_scale > 0):
            raise ValueError(f"time_scale: expected a number > 0, got {time_scale!r}")
        items = [item_doc(r, time_scale) for r in self.items]
        limits = {s.name: s.concurrency for s in self.stages}
        meta: dict[str, Any] = {
            "scenario": None,
            "strategy": self.strategy,
            "params": dict(self.params),
            "clock": self.clock,
            "seed": None,
            "time_scale": time_scale,
            "items": len(items),
            "stages": [s.to_json(time_scale) for s in self.stages],
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "git_commit": None,
            "started_at": self.started_at,
        }
        if self.budgets:
            meta["budgets"] = [dict(b) for b in self.budgets]
        meta.update(self.metadata)
        if metadata:
            meta.update(metadata)
        summary = summarize(items, limits, meta.get("budgets"))
        return {"version": 1, "metadata": meta, "summary": summary, "items": items}

    def save(
        self,
        path: str | os.PathLike[str],
        *,
        metadata: Mapping[str, Any] | None = None,
        time_scale: float = 1.0,
    ) -> Path:
        """Write :meth:`to_json` to ``path`` (parents created) and return the path."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        doc = self.to_json(metadata=metadata, time_scale=time_scale)
        p.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
        return p


# -- what an observer of a run sees (engine._observe) ------------------------------------------
@dataclass(frozen=True, slots=True)
class RunInfo:
    """What an observer learns when the run starts. Record times are seconds since the run's
    zero; ``t0_epoch_ns`` is that zero on the wall clock (``time.time_ns()``), so a record time
    ``t`` happened at ``t0_epoch_ns + t * 1e9`` (on the virtual clock: as if the simulated run
    had started when it really did)."""

    t0_epoch_ns: int
    clock: str = "live"
    strategy: str = ""

    @classmethod
    def at(cls, now_s: float, clock: str = "live", strategy: str = "") -> RunInfo:
        """The run's info from its clock's reading now (``backend.now()``)."""
        return cls(time.time_ns() - round(now_s * 1e9), clock, strategy)


@runtime_checkable
class Observer(Protocol):
    """Something that watches a run. All three methods run on the dispatcher thread."""

    def start(self, info: RunInfo) -> None: ...

    def update(self, results: list[ItemResult], sched: Any) -> None: ...

    def close(self, report: Any) -> None: ...
