"""The leaf of the engine's run-time: the per-item and per-call records, and the two base
classes the scheduler talks to (``Backend`` below it, ``Policy`` beside it).

It imports nothing from the rest of the engine, so the scheduler, the strategies' policies
and the backends all import it and none of them imports another in a circle.
"""
from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

from ._mypyc import mypyc_attr

__all__ = ["Admission", "Backend", "Policy"]


class _Item:
    """The one mutable record of an item in flight (tenacity's RetryCallState, per item)."""

    __slots__ = ("attempt", "batch", "calls", "error", "index", "key", "queued_at",
                 "record_end", "running", "spans", "stage", "status", "value", "won")

    def __init__(self, index: int, key: Hashable, value: Any) -> None:
        self.index = index
        self.key = key
        self.value = value
        self.stage = -1
        self.attempt = 1
        self.calls: list[Any] = []  # Attempt records of the current stage, in order of start
        self.spans: list[Any] = []  # StageSpan per stage left, in order
        self.status = ""
        self.error: Any = None
        self.batch: Any = None  # the batch policies' record of its batch
        self.queued_at = 0.0
        self.running = 0  # calls of the current stage in flight (2 while a hedge runs)
        self.won = False  # a call of the current stage succeeded (its twin, if any, is lost)
        self.record_end = True  # tell the run's ledger how it ended (not if it knows already)


class _Call:
    """One call of one item at one stage: what a backend runs and reports back."""

    __slots__ = ("attempt", "charged", "done", "estimate", "event", "hedge", "item", "lost",
                 "name", "need", "queued_at", "stage", "started_at", "twin")

    def __init__(self, item: _Item, stage: int, name: str, attempt: int, hedge: bool,
                 queued_at: float) -> None:
        self.item = item
        self.stage = stage
        self.name = name
        self.attempt = attempt
        self.hedge = hedge
        self.queued_at = queued_at
        self.lost = False  # its twin won: its result will be discarded
        self.charged: dict[str, float] | None = None  # current_call().charge(...)
        self.estimate: Mapping[str, float] | None = None  # its cost(value), as given
        self.need: Mapping[str, float] | None = None  # what its budget reserved (validated)
        self.started_at = 0.0  # when the scheduler handed it to the backend
        self.done = False  # reported back
        self.twin: _Call | None = None  # its hedge, or the attempt it hedges
        self.event: Any = None  # live, at a hedged stage: set when the call is discarded


# compiled or not, backends, schedulers and policies (a user's own too) subclass it
@mypyc_attr(allow_interpreted_subclasses=True)
class Backend:
    """Where calls run and what time it is. The scheduler asks nothing else of it."""

    def now(self) -> float:
        """Seconds since the run started (real or virtual)."""
        raise NotImplementedError

    def budget_now(self) -> float:
        """The clock shared budgets are kept on: ``time.monotonic()`` live (a budget may be
        shared by several runs), the run's own time on the virtual clock."""
        raise NotImplementedError

    def start(self, call: _Call) -> None:
        """Start ``call`` now: the scheduler only starts a call when its stage has a free slot
        (and its rate limit and budget allow it)."""
        raise NotImplementedError

    def prefetch(self, stage: int) -> int:
        """How many calls of a plain stage (no gate, hedge or adaptive limit) the backend
        takes beyond the stage's free slots: 0, or more when its workers can never run more
        than the limit at once (one thread per slot), so a worker that ends a call takes the
        next without waiting for the dispatcher."""
        return 0

    def call_later(self, delay: float, obj: object) -> None:
        """Call ``sched.on_timer(obj)`` after ``delay`` seconds."""
        raise NotImplementedError

    def discard(self, call: _Call) -> None:
        """``call`` lost to its hedged twin: its result will be ignored. A live call sees
        ``current_call().cancelled`` (and its ``sleep`` ends); on the virtual clock a stage
        that ``stops_when_cancelled`` ends it now."""

    def step(self, sched: Any) -> None:
        """Wait for events and report each: ``sched.on_done(...)`` / ``sched.on_timer(...)``,
        then ``sched.after_events()``."""
        raise NotImplementedError

    def close(self) -> None:
        """Release everything the backend holds (threads, pools)."""
        raise NotImplementedError


# compiled or not, backends, schedulers and policies (a user's own too) subclass it
@mypyc_attr(allow_interpreted_subclasses=True)
class Admission:
    """What a :class:`Policy` may ask of the scheduler (the scheduler implements it)."""

    @property
    def cancelled(self) -> bool:
        raise NotImplementedError

    @property
    def exhausted(self) -> bool:
        """No input is left (or the run is cancelled): admission is over."""
        raise NotImplementedError

    @property
    def limits(self) -> list[int]:
        """Each stage's concurrency limit (for an adaptive stage, its maximum)."""
        raise NotImplementedError

    def ready(self, n: int) -> bool:
        """``n`` items can be admitted now, or fewer are left in the input than that."""
        raise NotImplementedError

    def admit_one(self) -> _Item | None:
        """The next input item, or None when none is available now (or ever). With a ledger,
        an item may come back restored: ended already (``status`` set: report it, run
        nothing) or at a later stage (``stage`` >= 0: ``advance`` moves it on from there)."""
        raise NotImplementedError

    def advance(self, item: _Item) -> None:
        """Queue ``item`` for its next stage (the first after admission)."""
        raise NotImplementedError

    def emit(self, items: tuple[_Item, ...] | list[_Item], *, record: bool = True) -> None:
        """``items`` become visible now (together); ``record``: tell the run's ledger how
        they ended."""
        raise NotImplementedError

    def drop(self, item: _Item) -> None:
        """End ``item`` as cancelled without telling the policy (it is the one asking)."""
        raise NotImplementedError


# compiled or not, backends, schedulers and policies (a user's own too) subclass it
@mypyc_attr(allow_interpreted_subclasses=True)
class Policy:
    """What a strategy decides during a run. A strategy's ``policy(sched)`` builds one; the
    scheduler calls these three methods and nothing else, and a policy's only effects are the
    :class:`Admission` methods."""

    #: how many items the policy may want to admit at once (the input is read ahead that far)
    lookahead: int = 1

    def params(self) -> dict[str, Any]:
        """The parameters in force, for the report (e.g. the window ``AUTO`` resolved to)."""
        return {}

    def fill(self) -> None:
        """Admit what the rule allows now (pull items with ``sched.admit_one``)."""
        raise NotImplementedError

    def stage_done(self, item: _Item) -> None:
        """``item`` finished a stage that is not its last: where does it go?"""
        raise NotImplementedError

    def item_done(self, item: _Item) -> None:
        """``item`` ended (ok, failed or cancelled): may it become visible?"""
        raise NotImplementedError
