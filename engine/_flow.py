"""The scheduler's flow-control and durability steps: gates (rate limits, budgets), hedges,
retries, checkpoints and restores, and closing an item's span when it leaves a stage.
``Scheduler`` (``engine._scheduler``) subclasses ``FlowSteps``; the split is only for reading:
one state machine, two files.
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from ._cancel import CancelToken
from ._core import Admission, Backend, Policy, _Call, _Item
from ._durable import Durable
from ._errors import WorkerLost
from ._feed import Feed
from ._records import Attempt, ErrorInfo, ItemResult, StageSpan, StageStats
from ._retry import RetryPolicy, unit_random
from ._stagestate import StageState

__all__ = ["FlowSteps"]

log = logging.getLogger("engine")

# A call lost with its worker process is retried even on a stage without a RetryPolicy.
_LOST_RETRY = RetryPolicy(attempts=3, backoff=0.0, max_backoff=0.0, retry_on=(WorkerLost,))


class _HedgeDue:
    """A timer: ``call`` has run as long as its stage hedges after (``late``: and longer:
    a look again after the allowance said no)."""

    __slots__ = ("call", "late")

    def __init__(self, call: _Call, late: bool = False) -> None:
        self.call = call
        self.late = late


class FlowSteps(Admission):
    """The steps of :class:`~engine._scheduler.Scheduler` that consult flow-control and
    durability policies. The state they use is the scheduler's (set in its ``__init__``)."""

    stages: list[StageState]
    names: tuple[str, ...]
    backend: Backend
    backend_wake: Callable[[], None]
    policy: Policy
    cancel: CancelToken
    feed: Feed
    durable: Durable | None
    posted: deque[tuple[_Item, BaseException | None]]
    virtual: bool
    next_index: int
    open: int
    out: list[ItemResult]

    # implemented by the scheduler
    def _pump(self, st: StageState) -> None:
        raise NotImplementedError

    def _finish(self, item: _Item, status: str) -> None:
        raise NotImplementedError

    def _move_on(self, item: _Item) -> None:
        raise NotImplementedError

    def _restore(self, item: _Item, entry: Any) -> None:
        """Apply the ledger's entry to a newly admitted item. An item the ledger has as done
        (or failed, not replayed) comes back ended (``status`` set): its policy reports it
        with the others, a batch's with its batch. A resumed one has ``stage`` set to its last
        restored stage: the policy moves it on from there (a batch's, once its batch gets
        there)."""
        durable = self.durable
        assert durable is not None
        try:
            restored = durable.restore(entry)
        except Exception as exc:  # a payload the codec cannot decode: that item fails
            item.error = ErrorInfo.from_exception(self.names[0], exc)
            item.status = "failed"
            return
        if restored is None:
            return
        if restored.kind == "failed":
            item.status, item.error = "failed", restored.error
            item.record_end = False  # a dead letter already
            return
        item.spans = durable.spans(restored.stage, self.backend.now())
        for s in range(restored.stage + 1):
            self.stages[s].resumed += 1
        item.value = restored.value
        item.stage = restored.stage  # advance() moves it on to the next stage
        if restored.kind in ("done", "finish"):
            item.status = "ok"
            item.record_end = restored.kind == "finish"  # done already, or not recorded yet

    def _next_call(self, st: StageState) -> _Call | None:
        """The call to start next at the stage (hedge requests that went stale are dropped)."""
        due = st.hedge_due
        while due:
            primary = due[0]
            item = primary.item
            if primary.done or item.won or item.running != 1 or primary.twin is not None:
                due.popleft()
                continue
            hedge = _Call(item, st.index, st.name, primary.attempt, True, self.backend.now())
            hedge.twin, primary.twin = primary, hedge
            return hedge
        if not st.waiting:  # only stale hedge requests were left
            return None
        item = st.waiting[0]
        return _Call(item, st.index, st.name, item.attempt, False, item.queued_at)

    def _gate(self, st: StageState, call: _Call) -> bool | None:
        """Whether the stage's rate limit and budget let ``call`` start now; if not, wake
        when they may (one wake-up per stage pending at a time). None: ``cost(value)`` raised,
        and the call's item failed with that error."""
        backend = self.backend
        now = backend.now()
        if st.wake_at > now:
            return False
        try:
            wait = st.gate_wait(call, now, backend.budget_now())
        except Exception as exc:  # the cost estimate raised: that item fails, the run goes on
            st.head = None
            item = call.item
            (st.hedge_due if call.hedge else st.waiting).popleft()
            if not call.hedge:
                item.error = ErrorInfo.from_exception(st.name, exc)
                self._finish(item, "failed")
            return None
        if wait <= 0.0:
            st.gate_opened(now)
            return True
        st.gate_closed(now)
        st.wake_at = now + wait
        backend.call_later(wait, st)
        return False

    def _start(self, st: StageState, call: _Call) -> None:
        st.running += 1
        st.started += 1
        call.item.running += 1
        if st.running > st.peak:
            st.peak = st.running
        backend = self.backend
        call.started_at = backend.now()
        hedge = st.hedge
        if hedge is not None:
            if not self.virtual:
                call.event = threading.Event()  # wakes its sleep if it loses
            if call.hedge:
                hedge.hedges += 1
                st.hedges += 1
            else:
                d = hedge.delay()
                if d is not None:
                    backend.call_later(d, _HedgeDue(call))
                else:  # no running percentile yet: armed once there is one
                    st.unarmed.append(call)
        backend.start(call)

    def drop_unadmitted(self) -> None:
        """Items read from the input but not admitted when the run was cancelled: taken from
        the caller's iterator, so reported (cancelled), never silently lost."""
        read = self.feed.stop()
        if read:
            items = []
            for value, key, _ in read:
                index = self.next_index
                self.next_index = index + 1
                self.open += 1
                item = _Item(index, index if key is None else key, value)
                item.status = "cancelled"
                items.append(item)
            self.emit(items)

    def _hedge_due(self, call: _Call, obj_is_late: bool = False) -> None:
        """``call`` has run as long as its stage hedges after: queue one duplicate, ahead of
        first attempts. Over the allowance, look again a quarter of the hedge delay later (the
        allowance grows with every call started, and the calls still running by then are the
        slow ones: the tail's fast end has finished)."""
        item = call.item
        st = self.stages[call.stage]
        hedge = st.hedge
        if (call.done or item.won or item.running != 1 or call.twin is not None
                or self.cancel.cancelled or hedge is None):
            return
        if not hedge.allowed(st.started - st.hedges, first_look=not obj_is_late,
                             pending=len(st.hedge_due)):
            d = hedge.delay()
            if d is not None and hedge.active:  # the allowance grows with every call started
                self.backend.call_later(d / 4, _HedgeDue(call, late=True))
            return
        st.hedge_due.append(call)
        self._pump(st)

    def _checkpoint(self, st: StageState, item: _Item) -> None:
        """Record a checkpointed stage's output; the item moves on once it is durable (live:
        the ledger's writer posts it back; virtual: at once, the run's end flushes)."""
        durable = self.durable
        assert durable is not None
        posted, wake = self.posted, self.backend_wake
        try:
            if self.virtual:
                durable.checkpoint(item.key, item.stage, item.value, None)
            else:
                def on_durable(error: BaseException | None) -> None:  # the writer's thread
                    posted.append((item, error))
                    wake()

                durable.checkpoint(item.key, item.stage, item.value, on_durable)
                return
        except Exception as exc:  # CodecError: the output cannot be recorded; LedgerError
            item.error = ErrorInfo.from_exception(st.name, exc)
            self._finish(item, "failed")
            return
        self._move_on(item)

    def _durable_done(self, item: _Item, error: BaseException | None) -> None:
        if error is not None:
            item.error = ErrorInfo.from_exception(self.names[item.stage], error)
            self._finish(item, "failed")
        else:
            self._move_on(item)

    def _arm(self, st: StageState) -> None:
        """The stage's hedge delay is known now: arm the calls that started before it was."""
        assert st.hedge is not None
        d = st.hedge.delay()
        assert d is not None
        now = self.backend.now()
        for call in st.unarmed:
            if not call.done:
                self.backend.call_later(max(0.0, call.started_at + d - now), _HedgeDue(call))
        st.unarmed = []

    def stats(self, wall: float) -> tuple[StageStats, ...]:
        return tuple(
            StageStats(st.name, st.max, st.calls, st.errors, st.retries, st.busy, st.wait,
                       min(st.peak, st.max, st.executor_workers or st.max), wall,
                       limit_wait_s=st.limit_wait, budget_wait_s=st.budget_wait,
                       overloaded=st.overloaded, hedges=st.hedges, hedges_won=st.hedges_won,
                       resumed=st.resumed, executor_workers=st.executor_workers,
                       limit_timeline=st.timeline,
                       budget=None if st.budget is None else st.budget.name)
            for st in self.stages
        )

    def _should_retry(self, st: StageState, error: BaseException, attempt: int) -> bool:
        if isinstance(error, WorkerLost) and _LOST_RETRY.should_retry(error, attempt):
            return True
        return st.retry is not None and st.retry.should_retry(error, attempt)

    def _retry(self, st: StageState, item: _Item, error: BaseException) -> None:
        policy = st.retry if st.retry is not None else _LOST_RETRY
        delay = policy.delay(error, item.attempt, unit_random(item.index, st.index, item.attempt))
        if isinstance(error, WorkerLost):
            log.warning("stage %r: item %d attempt %d lost its worker (%s)", st.name, item.index,
                        item.attempt, type(error).__name__)
        else:
            log.debug("stage %r: item %d attempt %d raised %s; retrying in %.3g s", st.name,
                      item.index, item.attempt, type(error).__name__, delay)
        item.attempt += 1
        st.retries += 1
        self.backend.call_later(delay, item)  # then ahead of the first attempts waiting

    def _close_span(self, item: _Item, winner: Attempt | None = None) -> None:
        """The item leaves its stage: its calls become the stage's span, in order of start
        with the winning call last (a stage's end is its last call not lost)."""
        calls = item.calls
        if not calls:
            return
        if len(calls) == 1:  # the common case
            a = calls[0]
            item.spans.append(StageSpan(self.names[item.stage], a.start, a.end, (a,)))
            item.calls = []
            item.won = False
            return
        if len(calls) > 1:
            calls.sort(key=lambda a: a.start)
            if winner is not None and calls[-1] is not winner:
                calls.remove(winner)
                calls.append(winner)
        end = calls[-1].end
        if winner is None:
            kept = [a for a in calls if not a.lost]
            end = kept[-1].end if kept else end
        item.spans.append(StageSpan(self.names[item.stage], min(a.start for a in calls), end,
                                    tuple(calls)))
        item.calls = []
        item.won = False
