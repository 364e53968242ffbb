"""Backends: where stage calls run, and the clock the scheduler reads.

* ``LiveBackend`` -- real time. Each stage has a FIFO queue and ``concurrency`` long-lived
  worker loops, submitted once to the stage's ``ThreadPoolExecutor``: a call costs two
  ``SimpleQueue`` hand-offs, not a ``Future``. A stage on a process pool or a caller's executor
  gets the same worker loops as relays: each submits its call to the executor and waits for it,
  so the limit stays global and the dispatcher stays central.
* ``VirtualBackend`` -- virtual time. No threads, no sleeping: each call asks the stage's
  ``simulate(call, value)`` for its duration and outcome and completes at ``now + duration`` on
  an event heap. The same ``Scheduler`` decides what runs next.
"""
from __future__ import annotations

import concurrent.futures
import concurrent.futures.thread  # registers its exit hook now, so ours (below) runs first
import contextlib
import heapq
import inspect
import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from ._cancel import CancelToken
from ._context import CallInfo, Simulated, _local, checkpoint
from ._scheduler import Backend

if TYPE_CHECKING:
    from ._ratelimit import TokenBucket
    from ._scheduler import Scheduler, _Item
    from ._stage import Stage

__all__ = ["LiveBackend", "VirtualBackend"]

_heappush: Final = heapq.heappush
_heappop: Final = heapq.heappop
_new: Final = tuple.__new__  # builds a named tuple without its Python-level __new__ (hot path)
_WAKE = object()  # wakes the dispatcher (cancellation) without a completion
_STOP = None  # tells a worker loop to exit


# Live backends not closed yet: id -> abandon. close() removes its entry; a stream dropped
# without close() is closed by its generator's finally when collected, so only a stream still
# referenced at interpreter exit is left here (a dict, not a WeakSet: compiled classes take
# no weak references).
_running: dict[int, Callable[[], None]] = {}


def _abandon_all() -> None:
    # A stream held at exit (e.g. by a global) would leave worker loops blocked on their
    # queues and the interpreter waiting forever to join them. Like concurrent.futures (whose
    # own hook runs after this one), stop them before the join.
    for abandon in list(_running.values()):
        abandon()


threading._register_atexit(_abandon_all)  # type: ignore[attr-defined]


def _relay(executor: concurrent.futures.Executor, fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def call(value: Any) -> Any:
        return executor.submit(fn, value).result()

    return call


def _worker_loop(
    stage_index: int,
    stage: Stage,
    call: Callable[..., Any],
    inbox: queue.SimpleQueue[Any],
    outbox: queue.SimpleQueue[Any],
    cancel: Any,
    bucket: TokenBucket | None,
) -> None:
    """One slot of a stage: take the next queued item, call, report. Runs until _STOP."""
    get, put, clock, sleep = inbox.get, outbox.put, time.perf_counter, time.sleep
    name = stage.name
    resource = None
    broken = False
    if stage.init is not None:
        try:
            resource = stage.init()
        except BaseException as exc:  # the run cannot use this stage: fail it, keep draining
            broken = True
            put((None, 0.0, 0.0, exc, None))
    try:
        while True:
            item = get()
            if item is _STOP:
                return
            if broken or cancel.cancelled:  # the cancellation check: a flag read
                now = clock()
                put((item, now, now, None, None))
                continue
            if bucket is not None:
                wait = bucket.reserve(clock()) - clock()
                if wait > 0:
                    sleep(wait)
            _local.call = (item.index, item.key, name, stage_index, item.attempt)
            t0 = clock()
            try:
                result = call(item.value) if resource is None else call(item.value, resource)
                ok = True
            except BaseException as exc:  # every error ends in the item's record
                result, ok = exc, False
            t1 = clock()
            _local.call = None
            put((item, t0, t1, ok, result))
    finally:
        close = getattr(resource, "close", None)
        if callable(close):
            with contextlib.suppress(Exception):  # a failing close must not break shutdown
                close()


class LiveBackend(Backend):
    """Real time on worker threads (and relays to process pools or other executors)."""

    def __init__(self, stages: tuple[Stage, ...], cancel: CancelToken) -> None:
        self._outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._timers: list[tuple[float, int, _Item]] = []
        self._seq = itertools.count()
        self._cancel = cancel
        self._inboxes: list[queue.SimpleQueue[Any]] = []
        self._pools: list[concurrent.futures.Executor] = []
        self._workers: list[int] = []
        self._owned: list[concurrent.futures.Executor] = []
        self._remove_wake = cancel._on_cancel(self.wake)
        _running[id(self)] = self.abandon
        try:
            for i, st in enumerate(stages):
                self._start_stage(i, st)
        except BaseException:
            self.close()
            raise
        # the run's clock starts once every worker thread exists (creating 100+ threads takes
        # tens of ms on a loaded machine: that is set-up, not scheduling)
        self.base = time.perf_counter()

    def _start_stage(self, i: int, st: Stage) -> None:
        inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=st.concurrency, thread_name_prefix=f"conveyor-{st.name}")
        self._inboxes.append(inbox)
        self._pools.append(pool)
        self._workers.append(st.concurrency)
        call = st.fn
        if st.executor == "process":
            ex: concurrent.futures.Executor = concurrent.futures.ProcessPoolExecutor(
                max_workers=st.concurrency)
            self._owned.append(ex)
            call = _relay(ex, st.fn)
        elif isinstance(st.executor, concurrent.futures.Executor):
            call = _relay(st.executor, st.fn)
        bucket = (st.rate_limit.bucket(time.perf_counter()) if st.rate_limit is not None
                  else None)
        for _ in range(st.concurrency):
            pool.submit(_worker_loop, i, st, call, inbox, self._outbox, self._cancel, bucket)

    def now(self) -> float:
        return time.perf_counter() - self.base

    def submit(self, stage: int, item: _Item) -> None:
        self._inboxes[stage].put(item)

    def call_later(self, delay: float, item: _Item) -> None:
        heapq.heappush(self._timers, (time.perf_counter() + delay, next(self._seq), item))

    def wake(self) -> None:
        self._outbox.put(_WAKE)

    def step(self, sched: Scheduler) -> None:
        """Wait for the next completion (or due timer), then handle all that are waiting."""
        outbox = self._outbox
        timers = self._timers
        timeout = None
        if timers:
            timeout = max(0.0, timers[0][0] - time.perf_counter())
            if sched.cancelled:
                timeout = 0.0
        try:
            msg = outbox.get(timeout=timeout)
        except queue.Empty:
            msg = _WAKE
        base = self.base
        on_done = sched.on_done
        for _ in range(4096):  # decide in bulk, but hand results over now and then
            if msg is not _WAKE:
                item, t0, t1, ok, result = msg
                if item is None:  # a worker's init failed
                    sched.fail_run(ok)
                else:
                    on_done(item, t0 - base, t1 - base, ok, result)
            if outbox.empty():
                break
            msg = outbox.get()
        if timers:
            now = time.perf_counter()
            cancelled = sched.cancelled
            while timers and (cancelled or timers[0][0] <= now):
                sched.on_timer(heapq.heappop(timers)[2])

    def abandon(self) -> None:
        """Cancel and tell every worker loop to stop, without waiting (interpreter exit)."""
        self._cancel.cancel("interpreter exit")
        self._stop_workers()

    def _stop_workers(self) -> None:
        for inbox, n in zip(self._inboxes, self._workers, strict=True):
            for _ in range(n):
                inbox.put(_STOP)
        self._workers = [0] * len(self._workers)

    def close(self) -> None:
        """Stop every worker loop and join every thread this backend started."""
        _running.pop(id(self), None)
        self._remove_wake()
        self._stop_workers()
        for pool in self._pools:
            pool.shutdown(wait=True)
        for ex in self._owned:
            ex.shutdown(wait=True)


class VirtualBackend(Backend):
    """Virtual time: an event heap, no threads, no sleeping."""

    @staticmethod
    def check(stages: tuple[Stage, ...]) -> None:
        """Every stage must be able to simulate its calls."""
        for st in stages:
            if not callable(getattr(st.fn, "simulate", None)):
                raise TypeError(
                    f"Stage {st.name!r}: fn: the virtual clock needs a callable with a "
                    f".simulate(call, value) method (e.g. a simulators.SimulatedService), "
                    f"got {st.fn!r}")

    def __init__(self, stages: tuple[Stage, ...], cancel: CancelToken, *,
                 observed: bool = True) -> None:
        self.check(stages)
        self.t = 0.0
        self._observed = observed
        self._heap: list[tuple[float, int, _Item, float | None, Simulated | None]] = []
        self._n = 0
        self._cancel = cancel
        self._stages = [_VStage(st) for st in stages]

    def now(self) -> float:
        return self.t

    def submit(self, s: int, item: _Item) -> None:
        """Start ``item``'s call at stage ``s`` now if a slot is free, else queue it (FIFO)."""
        st = self._stages[s]
        if st.running >= st.limit:
            st.waiting.append(item)
            return
        st.running += 1
        t = self.t
        self._n += 1
        if self._cancel.cancelled:
            _heappush(self._heap, (t, self._n, item, t, None))
            return
        bucket = st.bucket
        if bucket is not None:
            t = bucket.reserve(t)
        call = _new(CallInfo, (item.index, item.key, st.name, s, item.attempt))
        sim = st.sim(call, item.value, now=t) if st.wants_now else st.sim(call, item.value)
        _heappush(self._heap, (t + sim[0], self._n, item, t, sim))

    def call_later(self, delay: float, item: _Item) -> None:
        self._n += 1
        _heappush(self._heap, (self.t + delay, self._n, item, None, None))

    def step(self, sched: Scheduler) -> None:
        """Run events until one makes a result visible (or nothing is left); when the run is
        not ``observed`` (nobody can react to a result before the next), until nothing is left.

        Admission (``policy.fill``) runs after every event, at that event's virtual time, so a
        freed place is taken at the instant it frees, exactly as the live dispatcher does.
        """
        heap = self._heap
        if not heap:
            raise RuntimeError("virtual clock: items are in flight but nothing is scheduled")
        stages = self._stages
        observed = self._observed
        events = 0
        while heap and not (sched.out and observed):
            events += 1
            if not events & 1023:
                checkpoint()  # compiled, this loop may not enter the interpreter: see Ctrl-C
            end, _, item, start, sim = _heappop(heap)
            self.t = end  # never earlier than now: every event is scheduled at now + d, d >= 0
            if start is None:  # a retry's backoff elapsed
                sched.on_timer(item)
            else:
                s = item.stage
                st = stages[s]
                st.running -= 1
                if st.waiting:
                    self.submit(s, st.waiting.popleft())  # the freed slot: first in line
                if sim is None:
                    sched.on_done(item, end, end, None, None)
                elif sim[2] is None:
                    sched.on_done(item, start, end, True, sim[1])
                else:
                    sched.on_done(item, start, end, False, sim[2])
            if not sched.exhausted:  # a policy admits only from the input: nothing left to do
                sched.policy.fill()

    def close(self) -> None:
        self._heap.clear()


class _VStage:
    """One stage on the virtual clock: its slots, its FIFO and its simulator."""

    def __init__(self, stage: Stage) -> None:
        self.name = stage.name
        self.limit = stage.concurrency
        self.running = 0
        self.waiting: deque[_Item] = deque()
        self.sim: Callable[..., Simulated] = stage.fn.simulate  # type: ignore[attr-defined]
        self.wants_now = _accepts_now(self.sim)
        self.bucket = stage.rate_limit.bucket(0.0) if stage.rate_limit is not None else None


def _accepts_now(fn: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "now" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
