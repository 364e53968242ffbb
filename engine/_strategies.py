"""Scheduling strategies: the rules the scheduler consults for admission, barriers, visibility.

A strategy is a frozen, validated description (``Continuous()``, ``Batched(50)``,
``ParallelBatches(3, 50)``). For each run it builds a small policy object with four methods,
called by the scheduler and nothing else:

* ``fill()``            -- admit what the rule allows now (pull items lazily from the input);
* ``stage_done(item)``  -- ``item`` finished a stage that is not its last: where does it go?
* ``item_done(item)``   -- ``item`` ended (ok, failed or cancelled): may it become visible?
* the scheduler's ``advance`` / ``emit`` / ``admit_one`` / ``drop`` are the only effects a
  policy has.

All strategies run under the same per-stage concurrency limits: those are enforced by the
backend's slots, not here, so comparisons are at equal resource budget.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

if TYPE_CHECKING:
    from ._scheduler import Scheduler, _Item

__all__ = ["AUTO", "Batched", "Continuous", "ParallelBatches", "Strategy"]


class _Auto:
    __slots__ = ()

    def __repr__(self) -> str:
        return "AUTO"


AUTO: Final = _Auto()
"""``Continuous(max_in_flight=AUTO)``: 4 x the sum of the stage limits, at least 64."""


def _positive_int(owner: str, field: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}.{field}: expected an int >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{owner}.{field}: expected an int >= 1, got {value!r}")


class Policy:
    def fill(self) -> None:
        raise NotImplementedError

    def stage_done(self, item: _Item) -> None:
        raise NotImplementedError

    def item_done(self, item: _Item) -> None:
        raise NotImplementedError


class Strategy(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def params(self) -> Mapping[str, Any]: ...

    def policy(self, sched: Scheduler) -> Policy: ...


@dataclass(frozen=True, slots=True)
class Continuous:
    """Every item moves to its next stage the moment it leaves one and a slot is free.

    Items are admitted in input order, lazily, while fewer than ``max_in_flight`` admitted items
    are unfinished (``None``: no bound). Each item is visible the moment its last stage ends.
    """

    max_in_flight: int | _Auto | None = AUTO
    name: str = "continuous"

    def __post_init__(self) -> None:
        if self.max_in_flight is not None and self.max_in_flight is not AUTO:
            _positive_int("Continuous", "max_in_flight", self.max_in_flight)

    def window(self, limits: list[int]) -> int | None:
        if self.max_in_flight is AUTO:
            return max(64, 4 * sum(limits))
        assert not isinstance(self.max_in_flight, _Auto)
        return self.max_in_flight

    @property
    def params(self) -> dict[str, Any]:
        return {"max_in_flight": None if self.max_in_flight is AUTO else self.max_in_flight}

    def policy(self, sched: Scheduler) -> Policy:
        return _ContinuousPolicy(sched, self.window(sched.limits))


@dataclass(frozen=True, slots=True)
class Batched:
    """Consecutive batches of ``size`` items, a barrier after every stage.

    Within a batch no item starts stage *s+1* before every item of the batch has finished stage
    *s*. The next batch starts when the current one has finished; its items become visible
    together, when it completes.
    """

    size: int = 50
    name: str = "batched"

    def __post_init__(self) -> None:
        _positive_int("Batched", "size", self.size)

    @property
    def params(self) -> dict[str, Any]:
        return {"size": self.size}

    def policy(self, sched: Scheduler) -> Policy:
        return _BatchPolicy(sched, self.size, lanes=1, lockstep=False)


@dataclass(frozen=True, slots=True)
class ParallelBatches:
    """``lanes`` batch workers, each running the Batched rule on its own batch.

    A lane takes the next unstarted batch when its own completes; all lanes share the stage
    limits. With ``lockstep=True`` groups of ``lanes`` batches start together and the next group
    waits for the whole group.
    """

    lanes: int = 3
    size: int = 50
    lockstep: bool = False
    name: str = "parallel-batches"

    def __post_init__(self) -> None:
        _positive_int("ParallelBatches", "lanes", self.lanes)
        _positive_int("ParallelBatches", "size", self.size)
        if not isinstance(self.lockstep, bool):
            raise TypeError(f"ParallelBatches.lockstep: expected a bool, got {self.lockstep!r}")

    @property
    def params(self) -> dict[str, Any]:
        return {"size": self.size, "lanes": self.lanes, "lockstep": self.lockstep}

    def policy(self, sched: Scheduler) -> Policy:
        return _BatchPolicy(sched, self.size, lanes=self.lanes, lockstep=self.lockstep)


class _ContinuousPolicy(Policy):
    __slots__ = ("in_flight", "sched", "window")

    def __init__(self, sched: Scheduler, window: int | None) -> None:
        self.sched = sched
        self.window = window
        self.in_flight = 0

    def fill(self) -> None:
        sched = self.sched
        if sched.exhausted:  # after the last admission this is all fill does, once per event
            return
        window = self.window
        while window is None or self.in_flight < window:
            item = sched.admit_one()
            if item is None:
                return
            self.in_flight += 1
            sched.advance(item)

    def stage_done(self, item: _Item) -> None:
        self.sched.advance(item)

    def item_done(self, item: _Item) -> None:
        self.in_flight -= 1
        self.sched.emit((item,))


class _Batch:
    __slots__ = ("active", "arrived", "members")

    def __init__(self, members: list[_Item]) -> None:
        self.members = members
        self.active = len(members)  # members not yet ended
        self.arrived: list[_Item] = []  # members waiting at the current barrier


class _BatchPolicy(Policy):
    __slots__ = ("lanes", "lockstep", "running", "sched", "size")

    def __init__(self, sched: Scheduler, size: int, *, lanes: int, lockstep: bool) -> None:
        self.sched = sched
        self.size = size
        self.lanes = lanes
        self.lockstep = lockstep
        self.running = 0  # batches started and not complete

    def fill(self) -> None:
        if self.lockstep and self.running:
            return
        while self.running < self.lanes and self._start_batch():
            pass

    def _start_batch(self) -> bool:
        sched = self.sched
        members: list[_Item] = []
        while len(members) < self.size:
            item = sched.admit_one()
            if item is None:
                break
            members.append(item)
        if not members:
            return False
        batch = _Batch(members)
        self.running += 1
        for item in members:
            item.batch = batch
            sched.advance(item)
        return True

    def stage_done(self, item: _Item) -> None:
        batch = item.batch
        assert batch is not None
        batch.arrived.append(item)
        self._check(batch)

    def item_done(self, item: _Item) -> None:
        batch = item.batch
        assert batch is not None
        batch.active -= 1
        self._check(batch)

    def _check(self, batch: _Batch) -> None:
        if len(batch.arrived) < batch.active:
            return  # the barrier holds
        sched = self.sched
        released, batch.arrived = batch.arrived, []
        if released and sched.cancelled:
            for item in released:
                sched.drop(item)  # cancelled at the barrier
            batch.active -= len(released)
            released = []
        if released:
            released.sort(key=lambda it: it.index)  # FIFO into the next stage, in input order
            for item in released:
                sched.advance(item)
            return
        if batch.active == 0:  # every member ended: the batch completes, visible together
            self.running -= 1
            sched.emit(batch.members)
            for item in batch.members:
                item.batch = None
            self.fill()
