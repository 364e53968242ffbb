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

from collections import deque
from typing import Any

from ._cancel import CancelToken
from ._core import Admission, Backend, Policy, _Call, _Item
from ._errors import WorkerLost
from ._feed import Feed
from ._records import Attempt, ErrorInfo, ItemResult, StageSpan, StageStats
from ._retry import RetryPolicy, unit_random
from ._stage import Stage

__all__ = ["Scheduler"]

# A call lost with its worker process is retried even on a stage without a RetryPolicy.
_LOST_RETRY = RetryPolicy(attempts=3, backoff=0.0, max_backoff=0.0, retry_on=(WorkerLost,))


class _StageState:
    """A stage's run-time state: its FIFO, its slots and its counters."""

    def __init__(self, index: int, stage: Stage) -> None:
        self.index = index
        self.name = stage.name
        self.limit = stage.concurrency
        self.retry = stage.retry
        self.rate_limit = stage.rate_limit
        self.bucket: Any = None  # the rate limit's bucket, made when the run starts
        self.waiting: deque[_Item] = deque()  # FIFO of items that arrived here
        self.running = 0  # calls handed to the backend and not yet reported
        self.wake_at = -1.0  # a rate-limit wake-up is pending until then
        self.gated_at = -1.0  # when the head of the queue started waiting for the limit
        self.peak = 0
        self.calls = 0
        self.errors = 0
        self.retries = 0
        self.busy = 0.0  # sum of call durations
        self.wait = 0.0  # sum over calls of (start - time queued)
        self.limit_wait = 0.0  # item-seconds spent waiting for the rate limit
        self.executor_workers: int | None = None


class Scheduler(Admission):
    """Admission, stage queues and slots, retries, cancellation, visibility."""

    def __init__(self, stages: tuple[Stage, ...], feed: Feed, cancel: CancelToken) -> None:
        self.names = tuple(s.name for s in stages)
        self._limits = [s.concurrency for s in stages]
        self.last = len(stages) - 1
        self.feed = feed
        self.cancel = cancel
        self.next_index = 0
        self.open = 0  # admitted and not yet handed to the caller
        self.error: BaseException | None = None  # raised by the input, a key or a callback
        self.out: list[ItemResult] = []
        self.stages = [_StageState(i, st) for i, st in enumerate(stages)]
        self.backend: Backend  # set by attach()
        self.policy: Policy  # set by the run, from its strategy

    def attach(self, backend: Backend, policy: Policy) -> None:
        self.backend = backend
        self.policy = policy
        now = backend.now()
        for st in self.stages:
            if st.rate_limit is not None:
                st.bucket = st.rate_limit.bucket(now)

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
        self.cancel.cancel(f"{type(exc).__name__}")

    # -- called by the policy ------------------------------------------------------------------
    def ready(self, n: int) -> bool:
        return self.feed.ready(n) or self.cancel.cancelled

    def admit_one(self) -> _Item | None:
        if self.cancel.cancelled:
            return None
        got = self.feed.take()
        if got is None:
            if self.feed.error is not None:
                self.fail_run(self.feed.error)
            return None
        value, key = got
        index = self.next_index
        self.next_index = index + 1
        self.open += 1
        return _Item(index, index if key is None else key, value)

    def advance(self, item: _Item) -> None:
        """Queue ``item`` for its next stage (the first after admission), first attempt there.
        Items only ever move forward one stage: the policies' one way to move them."""
        item.stage += 1
        item.attempt = 1
        self._enqueue(item)

    def drop(self, item: _Item) -> None:
        item.status = "cancelled"

    def emit(self, items: tuple[_Item, ...] | list[_Item]) -> None:
        now = self.backend.now()
        out = self.out
        for it in items:
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
        item.queued_at = self.backend.now()
        st.waiting.append(item)
        self._pump(st)

    def _pump(self, st: _StageState) -> None:
        """Start the calls the stage's free slots and rate limit allow now, in FIFO order."""
        if self.cancel.cancelled:
            self._drain()
            return
        waiting = st.waiting
        while waiting and st.running < st.limit:
            if st.bucket is not None and not self._gate(st):
                return
            item = waiting.popleft()
            self._start(st, item, False)

    def _gate(self, st: _StageState) -> bool:
        """Whether the stage's rate limit lets a call start now; if not, wake when it does."""
        now = self.backend.now()
        if st.wake_at > now:
            return False
        wait = st.bucket.take(now)
        if wait <= 0.0:
            if st.gated_at >= 0.0:
                st.limit_wait += (now - st.gated_at) * (len(st.waiting))
                st.gated_at = -1.0
            return True
        if st.gated_at < 0.0:
            st.gated_at = now
        st.wake_at = now + wait
        self.backend.call_later(wait, st)
        return False

    def _start(self, st: _StageState, item: _Item, hedge: bool) -> None:
        call = _Call(item, st.index, st.name, item.attempt, hedge, item.queued_at)
        st.running += 1
        item.running += 1
        if st.running > st.peak:
            st.peak = st.running
        self.backend.start(call)

    def _drain(self) -> None:
        """The run is cancelled: every item still waiting for a slot ends cancelled now."""
        for st in self.stages:
            while st.waiting:
                self._finish(st.waiting.popleft(), "cancelled")
        self.drop_unadmitted()

    def drop_unadmitted(self) -> None:
        """Items read from the input but not admitted when the run was cancelled: taken from
        the caller's iterator, so reported (cancelled), never silently lost."""
        read = self.feed.stop()
        if read:
            items = []
            for value, key in read:
                index = self.next_index
                self.next_index = index + 1
                self.open += 1
                item = _Item(index, index if key is None else key, value)
                item.status = "cancelled"
                items.append(item)
            self.emit(items)

    # -- called by the backend -----------------------------------------------------------------
    def after_events(self) -> None:
        """After a backend has reported a batch of events: admit what the policy allows."""
        if self.cancel.cancelled:
            self._drain()
        elif not self.feed.exhausted:
            self.policy.fill()

    def on_timer(self, obj: object) -> None:
        """A timer set with ``backend.call_later`` is due: a retry's backoff (an item) or a
        stage's rate-limit wake-up."""
        if isinstance(obj, _StageState):
            obj.wake_at = -1.0
            self._pump(obj)
            return
        assert isinstance(obj, _Item)
        if self.cancel.cancelled:
            self._finish(obj, "cancelled")
        else:
            self._enqueue(obj)

    def on_done(self, call: _Call, start: float, end: float, ok: bool | None,
                result: Any) -> None:
        """A call ended (``ok=None``: it never started). Never raises: an exception while
        handling the completion fails the item instead (see ``_handle``)."""
        st = self.stages[call.stage]
        st.running -= 1
        item = call.item
        item.running -= 1
        try:
            self._handle(st, call, start, end, ok, result)
        except Exception as exc:  # a bug of ours or an exception too strange to read
            if not item.status:
                item.error = ErrorInfo.from_exception(st.name, exc)
                self._finish(item, "failed")
        self._pump(st)

    def _handle(self, st: _StageState, call: _Call, start: float, end: float,
                ok: bool | None, result: Any) -> None:
        item = call.item
        if ok is None:
            self._finish(item, "cancelled")
            return
        st.calls += 1
        st.busy += end - start
        st.wait += max(0.0, start - call.queued_at)
        if ok:
            item.calls.append(Attempt(start, end))
            item.value = result
            self._close_span(item)
            if item.stage == self.last:
                item.status = "ok"
                self.policy.item_done(item)
            elif self.cancel.cancelled:
                item.status = "cancelled"
                self.policy.item_done(item)
            else:
                self.policy.stage_done(item)
            return
        err = ErrorInfo.from_exception(st.name, result)
        item.calls.append(Attempt(start, end, err))
        st.errors += 1
        if not self.cancel.cancelled and self._should_retry(st, result, item.attempt):
            self._retry(st, item, result)
            return
        item.error = err
        self._finish(item, "cancelled" if self.cancel.cancelled else "failed")

    def _should_retry(self, st: _StageState, error: BaseException, attempt: int) -> bool:
        if isinstance(error, WorkerLost) and _LOST_RETRY.should_retry(error, attempt):
            return True
        return st.retry is not None and st.retry.should_retry(error, attempt)

    def _retry(self, st: _StageState, item: _Item, error: BaseException) -> None:
        policy = st.retry if st.retry is not None else _LOST_RETRY
        delay = policy.delay(error, item.attempt, unit_random(item.index, st.index, item.attempt))
        item.attempt += 1
        st.retries += 1
        self.backend.call_later(delay, item)  # then back to the end of the stage's queue

    def _close_span(self, item: _Item) -> None:
        calls = item.calls
        if calls:
            item.spans.append(StageSpan(self.names[item.stage], calls[0].start,
                                        calls[-1].end, tuple(calls)))
            item.calls = []

    def _finish(self, item: _Item, status: str) -> None:
        self._close_span(item)
        if status == "cancelled":
            item.error = None
        item.status = status
        self.policy.item_done(item)

    def stats(self, wall: float) -> tuple[StageStats, ...]:
        return tuple(
            StageStats(st.name, st.limit, st.calls, st.errors, st.retries, st.busy, st.wait,
                       min(st.peak, st.limit, st.executor_workers or st.limit), wall,
                       limit_wait_s=st.limit_wait, executor_workers=st.executor_workers)
            for st in self.stages
        )

