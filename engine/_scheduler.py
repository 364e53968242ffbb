"""The scheduler: one state machine that owns every decision of a run.

Data flow of a live run on thread stages (the virtual clock replaces the right-hand side with
an event heap, and drives the very same Scheduler)::

      caller thread (stream()/run())                       worker threads, `concurrency` per stage
    +-----------------------------------------+          +------------------------------------+
    | input iterator --admit_one()--> Policy  |  submit  |  stage queue (SimpleQueue, FIFO)   |
    |   (Continuous / Batch)          |       | -------> |  worker: cancel flag? rate limit?  |
    |                                 v       |          |          fn(value) -> result        |
    |   Scheduler.on_done(item, ...)  <-------+--------- |  completion queue (one, shared)     |
    |     retry? -> timer heap               | complete |                                    |
    |     next stage? barrier? -> Policy     |          +------------------------------------+
    |     visible? -> ItemResult -> caller   |
    +-----------------------------------------+

Nothing but the scheduler touches run state; stage code only sees its value. The dispatcher is
the caller's own thread (no extra thread, no extra wake-up): it blocks on the completion queue,
then handles every completion waiting there in one go (streamed hand-offs, decisions in bulk).
Concurrency limits are enforced by the number of workers per stage: a stage's queue is its FIFO
of items that arrived there, and at most `concurrency` workers call `fn` at any instant.
"""
from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from typing import TYPE_CHECKING, Any, Final

from ._cancel import CancelToken
from ._records import Attempt, ErrorInfo, ItemResult, StageSpan, StageStats
from ._retry import unit_random

if TYPE_CHECKING:
    from ._policies import Policy, _Batch
    from ._stage import Stage
    from ._strategies import Strategy

__all__ = ["Backend", "Scheduler"]

# Records are built on the hot path (one Attempt and one StageSpan per call): tuple.__new__ with
# the named-tuple class skips the generated Python __new__ and builds the same record.
_new: Final = tuple.__new__
_object_new: Final = object.__new__
# ItemResult's slot descriptors, called directly: its __setattr__ refuses (it is frozen), and a
# descriptor's own __set__ skips object.__setattr__'s lookup by name (~40% of building one).
_S = ItemResult.__dict__
_set_index: Final = _S["index"].__set__
_set_key: Final = _S["key"].__set__
_set_status: Final = _S["status"].__set__
_set_value: Final = _S["value"].__set__
_set_error: Final = _S["error"].__set__
_set_visible_at: Final = _S["visible_at"].__set__
_set_trace: Final = _S["_trace"].__set__
_set_names: Final = _S["_names"].__set__
_set_stages: Final = _S["_stages"].__set__


def _result(index: int, key: Hashable, status: str, value: Any, error: ErrorInfo | None,
            trace: list[Any], names: tuple[str, ...], visible_at: float | None) -> ItemResult:
    """An ItemResult whose stages are built from ``trace`` on first read (see _records)."""
    r = _object_new(ItemResult)
    _set_index(r, index)
    _set_key(r, key)
    _set_status(r, status)
    _set_value(r, value)
    _set_error(r, error)
    _set_visible_at(r, visible_at)
    _set_trace(r, trace)
    _set_names(r, names)
    _set_stages(r, None)
    return r


class _Item:
    """The one mutable record of an item in flight (tenacity's RetryCallState, per item)."""

    __slots__ = ("attempt", "batch", "calls", "error", "index", "key", "queued_at", "stage",
                 "status", "trace", "value")

    def __init__(self, index: int, key: Hashable, value: Any) -> None:
        self.index = index
        self.key = key
        self.value = value
        self.stage = -1
        self.attempt = 1
        self.calls: list[Attempt] | None = None  # failed attempts at the current stage
        self.trace: list[Any] = []  # per stage: start, end (one ok call) or a StageSpan
        self.status = ""
        self.error: ErrorInfo | None = None
        self.batch: _Batch | None = None
        self.queued_at = 0.0


class Backend:
    """Where calls run and what time it is. The scheduler asks nothing else of it.

    A base class rather than a Protocol: the live and virtual backends subclass it, so the
    compiled scheduler calls them directly.
    """

    def now(self) -> float:
        """Seconds since the run started (real or virtual)."""
        raise NotImplementedError

    def submit(self, stage: int, item: _Item) -> None:
        """Queue a call of ``item`` at ``stage`` (it starts when a slot is free, FIFO)."""
        raise NotImplementedError

    def call_later(self, delay: float, item: _Item) -> None:
        """Call ``sched.on_timer(item)`` after ``delay`` seconds (a retry's backoff)."""
        raise NotImplementedError

    def step(self, sched: Scheduler) -> None:
        """Wait for completions and report each to ``sched.on_done``."""
        raise NotImplementedError

    def close(self) -> None:
        """Release everything the backend holds (threads, pools)."""
        raise NotImplementedError


class Scheduler:
    """Admission, barriers (through the strategy's policy), retries, cancellation, visibility."""

    def __init__(
        self,
        stages: tuple[Stage, ...],
        strategy: Strategy,
        items: Iterator[Any],
        key: Callable[[Any], Hashable] | None,
        cancel: CancelToken,
    ) -> None:
        self.names = tuple(s.name for s in stages)
        self.limits = [s.concurrency for s in stages]
        self.last = len(stages) - 1
        self._iter = items
        self._key = key
        self.cancel = cancel
        self.next_index = 0
        self.open = 0  # admitted and not yet handed to the caller
        self.exhausted = False
        self.error: BaseException | None = None  # raised by the input, a key or a callback
        self.out: list[ItemResult] = []
        self.stages = [_StageState(st) for st in stages]
        self.backend: Backend  # set by attach()
        self.policy: Policy = strategy.policy(self)

    def attach(self, backend: Backend) -> None:
        self.backend = backend

    # -- state the loop reads ------------------------------------------------------------------
    @property
    def cancelled(self) -> bool:
        return self.cancel.cancelled

    @property
    def done(self) -> bool:
        return self.open == 0 and (self.exhausted or self.cancel.cancelled)

    def fail_run(self, exc: BaseException) -> None:
        """An error outside any stage (input, key, callback): stop admission, settle, re-raise."""
        if self.error is None:
            self.error = exc
        self.exhausted = True
        self.cancel.cancel(f"{type(exc).__name__}: {exc}")

    # -- called by the policy ------------------------------------------------------------------
    def admit_one(self) -> _Item | None:
        """The next input item, or None when the input is exhausted or the run cancelled."""
        if self.exhausted or self.cancel.cancelled:
            return None
        try:
            value = next(self._iter)
            index = self.next_index
            key = index if self._key is None else self._key(value)
        except StopIteration:
            self.exhausted = True
            return None
        except Exception as exc:
            self.fail_run(exc)
            return None
        self.next_index = index + 1
        self.open += 1
        return _Item(index, key, value)

    def advance(self, item: _Item) -> None:
        """Queue ``item`` for its next stage (the first after admission), first attempt there.

        Items only ever move forward one stage, so this is the policies' one way to move them.
        """
        item.stage += 1
        item.attempt = 1
        self._submit(item)

    def _submit(self, item: _Item) -> None:
        s = item.stage
        st = self.stages[s]
        st.in_flight += 1
        if st.in_flight > st.peak:
            st.peak = st.in_flight
        backend = self.backend
        item.queued_at = backend.now()
        backend.submit(s, item)

    def drop(self, item: _Item) -> None:
        """End ``item`` as cancelled without telling the policy (it is the one asking)."""
        item.status = "cancelled"

    def emit(self, items: tuple[_Item, ...] | list[_Item]) -> None:
        """``items`` become visible now (together)."""
        now = self.backend.now()
        out, names = self.out, self.names
        for it in items:
            status = it.status
            if status == "ok":
                out.append(_result(it.index, it.key, status, it.value, None, it.trace, names, now))
            else:
                out.append(_result(it.index, it.key, status, None, it.error, it.trace, names,
                              None if status == "cancelled" else now))
            it.value = None
        self.open -= len(items)

    # -- called by the backend -----------------------------------------------------------------
    def on_done(self, item: _Item, start: float, end: float, ok: bool | None, result: Any) -> None:
        """A call of ``item`` at its current stage ended (``ok=None``: it never started)."""
        s = item.stage
        st = self.stages[s]
        st.in_flight -= 1
        if ok is None:
            self._finish(item, "cancelled")
            return
        st.calls += 1
        st.busy += end - start
        st.wait += start - item.queued_at
        if ok:
            calls = item.calls
            if calls:  # earlier attempts failed
                calls.append(_new(Attempt, (start, end, None)))
                item.trace.append(_new(StageSpan, (self.names[s], calls[0][0], end,
                                                   tuple(calls))))
                item.calls = None
            else:  # the common case, recorded as two floats (ItemResult builds the span)
                trace = item.trace
                trace.append(start)
                trace.append(end)
            item.value = result
            if s == self.last:
                item.status = "ok"
                self.policy.item_done(item)
            elif self.cancel.cancelled:
                item.status = "cancelled"
                self.policy.item_done(item)
            else:
                self.policy.stage_done(item)
            return
        err = ErrorInfo(self.names[s], type(result).__name__, str(result))
        if item.calls is None:
            item.calls = []
        item.calls.append(_new(Attempt, (start, end, err)))
        st.errors += 1
        policy = st.retry
        if (policy is not None and not self.cancel.cancelled
                and policy.should_retry(result, item.attempt)):
            delay = policy.delay(result, item.attempt, unit_random(item.index, s, item.attempt))
            item.attempt += 1
            st.retries += 1
            st.in_flight += 1  # a retry waiting for its timer still belongs to the stage
            self.backend.call_later(delay, item)
            return
        if self.cancel.cancelled:
            self._finish(item, "cancelled")
        else:
            item.error = err
            self._finish(item, "failed")

    def on_timer(self, item: _Item) -> None:
        """A retry's backoff has elapsed: back to the end of its stage's queue."""
        self.stages[item.stage].in_flight -= 1
        if self.cancel.cancelled:
            self._finish(item, "cancelled")
        else:
            self._submit(item)

    def _finish(self, item: _Item, status: str) -> None:
        calls = item.calls
        if calls:
            item.trace.append(
                StageSpan(self.names[item.stage], calls[0].start, calls[-1].end, tuple(calls)))
            item.calls = None
        item.status = status
        self.policy.item_done(item)

    def stats(self, wall: float) -> tuple[StageStats, ...]:
        return tuple(
            StageStats(st.name, st.limit, st.calls, st.errors, st.retries, st.busy, st.wait,
                       min(st.peak, st.limit), wall)
            for st in self.stages
        )


class _StageState:
    """A stage's counters, kept by the scheduler (the backend keeps its own slots)."""

    def __init__(self, stage: Stage) -> None:
        self.name = stage.name
        self.limit = stage.concurrency
        self.retry = stage.retry
        self.in_flight = 0  # queued, running or waiting for a retry's timer
        self.peak = 0
        self.calls = 0
        self.errors = 0
        self.retries = 0
        self.busy = 0.0  # sum of call durations
        self.wait = 0.0  # sum over calls of (start - time queued)
