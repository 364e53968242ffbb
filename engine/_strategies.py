"""Scheduling strategies: the rules the scheduler consults for admission, barriers, visibility.

A strategy is a frozen, validated description (``Continuous()``, ``Batched(50)``,
``ParallelBatches(3, 50)``, or your own: anything with a ``name``, ``params`` and a
``policy(sched)`` that returns an ``engine.Policy``). For each run it builds a small policy
object (``_policies``) with three methods, called by the scheduler and nothing else:

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
from typing import Any, ClassVar, Final, Protocol, runtime_checkable

from ._core import Admission, Policy
from ._policies import BatchPolicy, ContinuousPolicy
from ._validate import check_bool, check_int

__all__ = ["AUTO", "Batched", "Continuous", "ParallelBatches", "Strategy", "strategy_from_name"]


class _Auto:
    __slots__ = ()

    def __repr__(self) -> str:
        return "AUTO"


AUTO: Final = _Auto()
"""``Continuous(max_in_flight=AUTO)``: 4 x the sum of the stage limits, at least 64."""


@runtime_checkable
class Strategy(Protocol):
    """What ``Pipeline.run(..., strategy=...)`` accepts: a name and parameters for the report,
    and a fresh :class:`~engine.Policy` per run (see ``engine/_policies.py`` for examples)."""

    @property
    def name(self) -> str: ...

    @property
    def params(self) -> Mapping[str, Any]: ...

    def policy(self, sched: Admission) -> Policy: ...


@dataclass(frozen=True, slots=True)
class Continuous:
    """Every item moves to its next stage the moment it leaves one and a slot is free.

    Items are admitted in input order, lazily, while fewer than ``max_in_flight`` admitted items
    are unfinished (``None``: no bound). Each item is visible the moment its last stage ends.
    """

    max_in_flight: int | _Auto | None = AUTO

    name: ClassVar[str] = "continuous"

    def __post_init__(self) -> None:
        if self.max_in_flight is not None and self.max_in_flight is not AUTO:
            check_int("Continuous.max_in_flight", self.max_in_flight)

    def window(self, limits: list[int]) -> int | None:
        if self.max_in_flight is AUTO:
            return max(64, 4 * sum(limits))
        assert not isinstance(self.max_in_flight, _Auto)
        return self.max_in_flight

    @property
    def params(self) -> dict[str, Any]:
        return {"max_in_flight": None if self.max_in_flight is AUTO else self.max_in_flight}

    def policy(self, sched: Admission) -> Policy:
        return ContinuousPolicy(sched, self.window(sched.limits))


@dataclass(frozen=True, slots=True)
class Batched:
    """Consecutive batches of ``size`` items, a barrier after every stage.

    Within a batch no item starts stage *s+1* before every item of the batch has finished stage
    *s*. The next batch starts when the current one has finished; its items become visible
    together, when it completes.
    """

    size: int = 50

    name: ClassVar[str] = "batched"

    def __post_init__(self) -> None:
        check_int("Batched.size", self.size)

    @property
    def params(self) -> dict[str, Any]:
        return {"size": self.size}

    def policy(self, sched: Admission) -> Policy:
        return BatchPolicy(sched, self.size, lanes=1, lockstep=False)


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

    name: ClassVar[str] = "parallel-batches"

    def __post_init__(self) -> None:
        check_int("ParallelBatches.lanes", self.lanes)
        check_int("ParallelBatches.size", self.size)
        check_bool("ParallelBatches.lockstep", self.lockstep)

    @property
    def params(self) -> dict[str, Any]:
        return {"size": self.size, "lanes": self.lanes, "lockstep": self.lockstep}

    def policy(self, sched: Admission) -> Policy:
        return BatchPolicy(sched, self.size, lanes=self.lanes, lockstep=self.lockstep)


STRATEGIES: Final[dict[str, type[Continuous] | type[Batched] | type[ParallelBatches]]] = {
    "continuous": Continuous,
    "batched": Batched,
    "parallel-batches": ParallelBatches,
}


def strategy_from_name(name: str, **params: Any) -> Continuous | Batched | ParallelBatches:
    """A built-in strategy from its results-file name and parameters:
    ``strategy_from_name("batched", size=50)``. The one factory the harness, the example job
    and the engine share; unknown names and parameters are a ``ValueError`` naming them."""
    if not isinstance(name, str):
        raise TypeError(f"strategy: expected a name, got {name!r}")
    cls = STRATEGIES.get(name)
    if cls is None:
        raise ValueError(f"strategy: expected one of {', '.join(STRATEGIES)}, got {name!r}")
    try:
        return cls(**params)
    except TypeError as exc:
        if "unexpected keyword" in str(exc):
            known = [f for f in cls.__dataclass_fields__ if f != "name"]
            raise ValueError(f"strategy {name!r}: unknown parameter(s) {sorted(params)}; "
                             f"expected some of {known}") from None
        raise
