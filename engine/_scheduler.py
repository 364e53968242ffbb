"""The scheduler: one state machine that owns every decision of a run.

Data flow of a live run on thread stages (the virtual clock replaces the right-hand side with
an event heap, and drives the very same Scheduler)::

   feeder thread          caller thread (stream()/run()): the dispatcher
  +---------------+     +---------------------------------------------+
  | input iterator| --> | read-ahead --admit_one()--> Policy           |     worker threads
  | key(item)     |     |   (Continuous / Batch / yours)  | advance    |    (per stage, one
  +---------------+     |                                 v            |     per slot)
                        |  stage FIFO --slot free? rate limit? budget?-+---> inbox -> fn(value)
                        |       ^                                      |          |
                        |       |  on_done(call, start, end, ok, res)  <-- completion queue
                        |     retry timer / next stage / barrier (Policy)  (one, shared)
                        |     visible? -> ItemResult -> caller         |
                        +---------------------------------------------+

Nothing but the scheduler touches run state; stage code only sees its value. The scheduler
decides when every call starts: a stage's FIFO lives here, and a call is handed to the backend
only when the stage has a free slot and its rate limit allows it, so waiting never blocks a
thread and a cancel drops every waiting call at once (none starts after it). The dispatcher is
the caller's own thread: it blocks on the completion queue, then handles every completion
waiting there in one go (streamed hand-offs, decisions in bulk).
"""
from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from ._cancel import CancelToken
from ._core import Backend, Policy, _Call, _Item
from ._durable import Durable
from ._feed import Feed
from ._flow import FlowSteps, _HedgeDue
from ._records import Attempt, ErrorInfo, ItemResult, StageSpan
from ._stage import Stage
from ._stagestate import StageState

__all__ = ["Scheduler"]



log = logging.getLogger("engine")
_new = tuple.__new__  # builds a named tuple without its Python-level __new__ (hot path)


class Scheduler(FlowSteps):
    """Admission, stage queues and slots, retries, cancellation, visibility (the flow-control
    and durability steps it takes are in ``engine._flow``)."""

    def __init__(self, stages: tuple[Stage, ...], cancel: CancelToken, *,
                 virtual: bool = False) -> None:
        self.names = tuple(s.name for s in stages)
        self.virtual = virtual
        self._limits = [s.max_concurrency for s in stages]
        self.last = len(stages) - 1
        self.feed: Feed  # set by attach(): the input is read only once the run starts
        self.cancel = cancel
        self.next_index = 0
        self.open = 0  # admitted and not yet handed to the caller
        self.error: BaseException | None = None  # raised by the input, a key or a callback
        self.out: list[ItemResult] = []
        copies: dict[int, Any] = {}  # one virtual copy per Budget object
        self.stages = [StageState(i, st, virtual=virtual, budgets=copies)
                       for i, st in enumerate(stages)]
        self.backend: Backend  # set by attach()
        self.policy: Policy  # set by the run, from its strategy
        self.durable: Durable | None = None  # the run's ledger, if any
        self.hold: Callable[[], bool] | None = None  # admission waits while it says so
        self.posted: deque[tuple[_Item, BaseException | None]] = deque()  # durable writes

    def attach(self, backend: Backend, policy: Policy, feed: Feed) -> None:
        """The run starts: where calls run, the strategy's policy and the input."""
        self.feed = feed
        self.backend = backend
        self.backend_wake: Callable[[], None] = getattr(backend, "wake", lambda: None)
        self.policy = policy
        now = backend.now()
        for st in self.stages:
            st.start_run(now)
            if st.plain:
                st.cap = st.limit + backend.prefetch(st.index)

    # -- state the loop and the policies read --------------------------------------------------
    @property
    def cancelled(self) -> bool:
        return self.cancel.cancelled

    @property
    def exhausted(self) -> bool:
        return self.feed.exhausted or self.cancel.cancelled

    @property
    def limits(self) -> list[int]:
        return self._limits

    @property
    def done(self) -> bool:
        return self.open == 0 and self.exhausted

    def fail_run(self, exc: BaseException) -> None:
        """An error outside any stage call (input, key, callback, a simulator's bug): stop
        admission, let what runs settle, then the run re-raises ``exc``."""
        if self.error is None:
            self.error = exc
            log.warning("run stopping: %s raised outside any stage call (input, key, callback "
                        "or simulator)", type(exc).__name__)
        self.cancel.cancel(f"{type(exc).__name__}")

    # -- called by the policy ------------------------------------------------------------------
    def ready(self, n: int) -> bool:
        return self.feed.ready(n) or self.cancel.cancelled

    def admit_one(self) -> _Item | None:
        if self.cancel.cancelled or (self.hold is not None and self.hold()):
            return None
        got = self.feed.take()
        if got is None:
            if self.feed.error is not None:
                self.fail_run(self.feed.error)
            return None
        value, key, entry = got
        index = self.next_index
        self.next_index = index + 1
        self.open += 1
        item = _Item(index, index if key is None else key, value)
        if entry is not None:
            self._restore(item, entry)
        return item

    def advance(self, item: _Item) -> None:
        """Queue ``item`` for its next stage (the first after admission), first attempt there.
        Items only ever move forward one stage: the policies' one way to move them."""
        s = item.stage = item.stage + 1
        item.attempt = 1
        st = self.stages[s]
        item.queued_at = self.backend.now()
        if st.plain and st.running < st.cap and not st.waiting and not self.cancel.cancelled:
            self._start_plain(st, item)  # the hot path: a free slot, nothing to consult
        else:
            if st.gated_at >= 0.0:
                st.gate_closed(item.queued_at)  # the queue grows while gated
            st.waiting.append(item)
            self._pump(st)

    def drop(self, item: _Item) -> None:
        item.status = "cancelled"

    def emit(self, items: tuple[_Item, ...] | list[_Item], *, record: bool = True) -> None:
        now = self.backend.now()
        out = self.out
        durable = self.durable
        for it in items:
            if durable is not None and record and it.record_end:  # the ledger learns how
                if it.status == "ok":
                    durable.done(it.key)
                elif it.status == "failed" and it.error is not None:
                    durable.failed(it.key, it.error)
            status = it.status
            visible = None if status == "cancelled" else now
            out.append(ItemResult(it.index, it.key, status,  # type: ignore[arg-type]
                                  it.value if status == "ok" else None,
                                  None if status == "ok" else it.error,
                                  tuple(it.spans), visible))
            it.value = None
            it.spans = []
        self.open -= len(items)

    # -- stage queues and slots ----------------------------------------------------------------
    def _enqueue(self, item: _Item) -> None:
        st = self.stages[item.stage]
        item.queued_at = now = self.backend.now()
        if st.gated_at >= 0.0:
            st.gate_closed(now)  # the queue grows while gated: account the interval so far
        st.waiting.append(item)
        self._pump(st)

    def _pump(self, st: StageState) -> None:
        """Start the calls the stage's free slots and gates allow now: hedges first (an item's
        second chance, not new work), then the queue in FIFO order."""
        if self.cancel.cancelled:
            self._drain()
            return
        waiting, due = st.waiting, st.hedge_due
        if st.plain:  # no gate, no hedge: the hot path
            while waiting and st.running < st.cap:
                self._start_plain(st, waiting.popleft())
            return
        while st.running < st.limit and (waiting or due):
            call = st.head
            if call is None:
                call = self._next_call(st)
                if call is None:
                    continue
                st.head = call
            if st.gated:
                opened = self._gate(st, call)
                if opened is None:
                    continue  # the call's cost estimate failed: its item failed, next
                if not opened:
                    return
            st.head = None
            if call.hedge:
                due.popleft()
            elif waiting[0] is call.item:
                waiting.popleft()
            else:  # a retry took the head of the queue meanwhile: start that one first
                if call.estimate is not None and st.budget is not None:
                    st.budget.settle(call.estimate, {k: 0.0 for k in call.estimate},
                                     self.backend.budget_now())  # give the reservation back
                if st.bucket is not None:
                    st.bucket.give_back()
                continue
            self._start(st, call)

    def _start_plain(self, st: StageState, item: _Item) -> None:
        n = st.running = st.running + 1
        item.running += 1
        if n > st.peak:
            st.peak = n
        self.backend.start(_Call(item, st.index, st.name, item.attempt, False, item.queued_at))

    def _drain(self) -> None:
        """The run is cancelled: every item still waiting for a slot ends cancelled now."""
        for st in self.stages:
            st.head = None
            st.hedge_due.clear()
            while st.waiting:
                self._finish(st.waiting.popleft(), "cancelled")
        self.drop_unadmitted()

    # -- called by the backend -----------------------------------------------------------------
    def after_events(self) -> None:
        """After a backend has reported a batch of events: move on the items whose checkpoint
        became durable, then admit what the policy allows."""
        posted = self.posted
        while posted:
            item, error = posted.popleft()
            self._durable_done(item, error)
        feed = self.feed
        if feed.exhausted and feed.error is not None and self.error is None:
            self.fail_run(feed.error)  # the input broke after its last item was admitted
        if self.cancel.cancelled:
            self._drain()
        elif not self.feed.exhausted:
            self.policy.fill()

    def on_timer(self, obj: object) -> None:
        """A timer set with ``backend.call_later`` is due: a retry's backoff (an item: it takes
        the stage's next free slot ahead of first attempts), a stage's gate wake-up, or a
        hedge's delay."""
        if isinstance(obj, StageState):
            obj.wake_at = -1.0
            self._pump(obj)
            return
        if isinstance(obj, _HedgeDue):
            self._hedge_due(obj.call, obj.late)
            return
        assert isinstance(obj, _Item)
        if self.cancel.cancelled:
            self._finish(obj, "cancelled")
        else:
            st = self.stages[obj.stage]
            obj.queued_at = self.backend.now()
            if st.gated_at >= 0.0:
                st.gate_closed(obj.queued_at)
            st.waiting.appendleft(obj)
            if st.head is not None and not st.head.hedge:
                st.head = None  # the call prepared for the old head waits behind it now
            self._pump(st)

    def on_done(self, call: _Call, start: float, end: float, ok: bool | None,
                result: Any) -> None:
        """A call ended (``ok=None``: it never started). Never raises: an exception while
        handling the completion fails the item instead."""
        st = self.stages[call.stage]
        st.running -= 1
        call.done = True
        item = call.item
        if call.lost:  # its twin won (and recorded it): only its slot was still held
            self._pump(st)
            return
        item.running -= 1
        try:
            if ok and st.plain and call.charged is None and not item.calls:
                self._won_plain(st, item, start, end, result, call.queued_at)
            else:
                self._handle(st, call, start, end, ok, result)
        except Exception as exc:  # a bug of ours or an exception too strange to read
            if not item.status:
                item.error = ErrorInfo.from_exception(st.name, exc)
                self._finish(item, "failed")
        self._pump(st)

    def _handle(self, st: StageState, call: _Call, start: float, end: float,
                ok: bool | None, result: Any) -> None:
        item = call.item
        twin = call.twin
        alive = twin is not None and not twin.done and not twin.lost
        if ok is None:
            if not alive:
                self._finish(item, "cancelled")
            return
        st.calls += 1
        st.busy += end - start
        if start > call.queued_at:
            st.wait += start - call.queued_at
        if ok and st.plain and call.charged is None:  # the hot path: nothing to settle
            self._won(st, call, start, end, result, None)
            return
        overloaded = not ok and st.is_overload(result)
        if overloaded:
            st.overloaded += 1
        cost = (st.settle(call, bool(ok), result, overloaded, self.backend.budget_now())
                if st.budget is not None or call.charged else None)
        if st.adaptive is not None:
            st.adapt(end, start, overloaded)
        if ok:
            self._won(st, call, start, end, result, cost)
            return
        err = ErrorInfo.from_exception(st.name, result)
        item.calls.append(Attempt(start, end, err, call.hedge, False, cost))
        st.errors += 1
        if alive:
            return  # its twin is still running: it decides
        if not self.cancel.cancelled and self._should_retry(st, result, item.attempt):
            self._retry(st, item, result)
            return
        item.error = err
        if not self.cancel.cancelled:
            log.info("stage %r: item %d failed after %d attempts (%s)", st.name, item.index,
                     item.attempt, err.type)
        self._finish(item, "cancelled" if self.cancel.cancelled else "failed")

    def _move_on(self, item: _Item) -> None:
        """``item`` left its stage with a value: the next stage, or the end."""
        if item.stage == self.last:
            item.status = "ok"
            self.policy.item_done(item)
        elif self.cancel.cancelled:
            item.status = "cancelled"
            self.policy.item_done(item)
        else:
            self.policy.stage_done(item)

    def _won_plain(self, st: StageState, item: _Item, start: float, end: float, result: Any,
                   queued_at: float) -> None:
        """The hot path of ``_handle``: a first call that succeeded at a plain stage."""
        st.calls += 1
        st.busy += end - start
        if start > queued_at:
            st.wait += start - queued_at
        item.spans.append(_new(StageSpan, (st.name, start, end,
                                           (_new(Attempt, (start, end, None, False, False,
                                                           None)),), False)))
        item.value = result
        self._move_on(item)

    def _won(self, st: StageState, call: _Call, start: float, end: float, result: Any,
             cost: dict[str, float] | None) -> None:
        item = call.item
        winner = Attempt(start, end, None, call.hedge, False, cost)
        twin = call.twin
        if twin is not None and not twin.done:  # the loser: its slot is freed when it returns
            twin.lost = True
            item.running -= 1
            item.calls.append(Attempt(twin.started_at, end, None, twin.hedge, True, None))
            if twin.event is not None:
                twin.event.set()
            self.backend.discard(twin)
        hedge = st.hedge
        if hedge is not None:
            if call.hedge:
                hedge.won += 1
                st.hedges_won += 1
            if item.attempt == 1:
                # the running percentile sees every first attempt: one that lost counts as
                # long as it had run (at least that slow), or the hedged slow calls would
                # drop out of the sample and pull the percentile down
                primary = twin if call.hedge and twin is not None else call
                hedge.observe(end - primary.started_at if primary is not call else end - start)
                if st.unarmed and hedge.delay() is not None:
                    self._arm(st)
        item.calls.append(winner)
        item.value = result
        self._close_span(item, winner)
        if self.durable is not None and self.durable.checkpointed(item.stage):
            self._checkpoint(st, item)
            return
        self._move_on(item)

    def _finish(self, item: _Item, status: str) -> None:
        self._close_span(item)
        if status == "cancelled":
            item.error = None
        item.status = status
        self.policy.item_done(item)

