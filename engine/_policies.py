"""Per-run policies: the strategies' rules as the scheduler consults them (the hot path).

A strategy (``engine._strategies``) is the frozen, validated description a user writes; its
``policy(sched)`` builds one of these for each run. The scheduler calls ``fill``,
``stage_done`` and ``item_done`` and nothing else; a policy's only effects are the
:class:`~engine._core.Admission` methods ``admit_one`` / ``advance`` / ``emit`` / ``drop``.
"""
from __future__ import annotations

from typing import Any

from ._core import Admission, Policy, _Item

__all__ = ["BatchPolicy", "ContinuousPolicy"]


class ContinuousPolicy(Policy):
    """Admit while fewer than ``window`` admitted items are unfinished; an item moves on the
    moment it leaves a stage; visible the moment it ends."""

    __slots__ = ("in_flight", "lookahead", "sched", "window")

    def __init__(self, sched: Admission, window: int | None) -> None:
        self.sched = sched
        self.window = window
        self.in_flight = 0
        self.lookahead = window if window is not None else 1 << 30  # read ahead one window

    def params(self) -> dict[str, Any]:
        return {"max_in_flight": self.window}

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
            if item.status:  # restored from a ledger, ended already: visible now
                self.item_done(item)
            else:
                sched.advance(item)

    def stage_done(self, item: _Item) -> None:
        self.sched.advance(item)

    def item_done(self, item: _Item) -> None:
        self.in_flight -= 1
        self.sched.emit((item,))


class _Batch:
    __slots__ = ("active", "arrived", "members", "parked")

    def __init__(self, members: list[_Item]) -> None:
        self.members = members
        self.active = len(members)  # members not yet ended
        self.arrived: list[_Item] = []  # members waiting at the current barrier
        # members restored from a ledger past the batch's stage: they wait for the batch
        self.parked: list[_Item] = []


class BatchPolicy(Policy):
    """``lanes`` batches at a time (1: Batched), a barrier after every stage of a batch."""

    __slots__ = ("lanes", "lockstep", "lookahead", "running", "sched", "size")

    def __init__(self, sched: Admission, size: int, *, lanes: int, lockstep: bool) -> None:
        self.sched = sched
        self.size = size
        self.lookahead = size * lanes  # read ahead one batch per lane
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
        if not sched.ready(self.size):  # a slow input: wait for a whole batch (or the end)
            return False
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
        fresh = []
        for item in members:
            item.batch = batch
            if item.status:  # restored, ended already: visible with its batch
                batch.active -= 1
            elif item.stage >= 0:  # restored to a later stage: joins the batch there
                batch.parked.append(item)
            else:
                fresh.append(item)
        for item in fresh:
            sched.advance(item)
        if not fresh:
            self._check(batch)
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
        if len(batch.arrived) < batch.active - len(batch.parked):
            return  # the barrier holds
        sched = self.sched
        released, batch.arrived = batch.arrived, []
        parked = batch.parked
        if parked:  # restored members at the stage the batch just finished go on with it
            level = released[0].stage if released else min(it.stage for it in parked)
            released += [it for it in parked if it.stage == level]
            batch.parked = [it for it in parked if it.stage != level]
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
