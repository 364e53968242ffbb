"""Scheduling strategies: the rules the scheduler consults for admission, barriers, visibility.

A strategy is a frozen, validated description (``Continuous()``, ``Batched(50)``,
``ParallelBatches(3, 50)``). For each run it builds a small policy object (``_policies``) with
three methods, called by the scheduler and nothing else:

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

from ._policies import Policy, _BatchPolicy, _ContinuousPolicy

if TYPE_CHECKING:
    from ._scheduler import Scheduler

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
