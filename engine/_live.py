"""The live backend: real time, calls on long-lived worker threads.

Each stage has an inbox (a ``SimpleQueue``) and one worker loop per slot, each on its own
(daemon) thread: a call costs two ``SimpleQueue`` hand-offs, not a ``Future``.
The scheduler hands a call over only when the stage has a free slot, so a worker never waits
for a slot or a rate limit, and the limit holds by construction. A stage on a process pool or
a caller's executor gets the same worker loops as relays: each submits its call to the
executor and waits for it, so the limit stays global and the dispatcher stays central.

An ``async def`` stage has no worker threads: its calls go to the run's one event-loop thread
(``_async.AsyncLoop``, started only when the run has an async stage), which runs up to
``concurrency`` of its coroutines at once and reports each completion on the same outbox.
"""
from __future__ import annotations

import concurrent.futures
import concurrent.futures.thread  # registers its exit hook now, so ours (below) runs first
import contextlib
import heapq
import itertools
import multiprocessing
import queue
import threading
import time
import types
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._cancel import CancelToken
from ._context import _local
from ._core import Backend, _Call
from ._errors import StageInitError
from ._messages import _Done, _InitFailed
from ._relay import _Relay, _Timed
from ._stage import Stage, _is_async

if TYPE_CHECKING:
    from ._async import AsyncLoop

__all__ = ["LiveBackend"]

_STOP = None  # tells a worker loop to exit
_PRIO = 0  # wakes a worker loop: a retry waits in its stage's priority queue
_MAX_WAIT = 3600.0  # longest single wait for a timer (a longer one is waited for in steps)
_COROUTINE = types.CoroutineType
_UNSTARTED = 1 << 62  # an async stage's "worker loops": the event loop, never spawned
_UNBOUNDED = 1 << 62  # a fixed thread stage's prefetch: its inbox takes any number of calls


class _Wake:
    """Wakes the dispatcher without a completion (a cancel, or input arriving)."""


_WAKE = _Wake()


# Live backends not closed yet: id -> abandon. close() removes its entry; a stream dropped
# without close() is closed by its generator's finally when collected, so only a stream still
# referenced at interpreter exit is left here.
_running: dict[int, Callable[[], None]] = {}


def _abandon_all() -> None:
    # A stream held at exit (e.g. by a global) would leave worker loops blocked on their
    # queues and the interpreter waiting forever to join them. Like concurrent.futures (whose
    # own hook runs after this one), stop them before the join.
    for abandon in list(_running.values()):
        abandon()


threading._register_atexit(_abandon_all)  # type: ignore[attr-defined]


def _worker_loop(stage: Stage, call_fn: Callable[..., Any], inbox: queue.SimpleQueue[Any],
                 prio: deque[_Call], outbox: queue.SimpleQueue[Any], cancel: CancelToken) -> None:
    """One slot of a stage: take the next call (a retry in ``prio`` first), run it, report
    it. Runs until _STOP."""
    get, put, clock = inbox.get, outbox.put, time.perf_counter
    resource = None
    broken = False
    if stage.init is not None:
        try:
            resource = stage.init()
        except BaseException as exc:  # the run cannot use this stage: fail it, keep draining
            broken = True
            put(_InitFailed(StageInitError(stage.name, exc)))
    try:
        while True:
            if prio:  # a retry goes ahead of the first attempts queued in the inbox
                try:
                    call = prio.popleft()
                except IndexError:  # another worker took it
                    call = get()
            else:
                call = get()
            if call is _STOP:
                return
            if call is _PRIO:
                continue  # woken for a retry: it is taken above (or was taken already)
            if broken or cancel.cancelled:  # the cancellation check: a flag read
                now = clock()
                put(_Done(call, now, now, None, None))
                continue
            _local.call = call
            value = call.item.value
            t0 = clock()
            try:
                result = call_fn(value) if resource is None else call_fn(value, resource)
                ok = True
            except BaseException as exc:  # every error ends in the item's record
                result, ok = exc, False
            t1 = clock()
            _local.call = None
            if ok:
                cls = result.__class__
                if cls is _Timed:
                    t0, t1, result = result
                elif cls is _COROUTINE:  # a plain function that returned a coroutine
                    result, ok = _unawaited(stage, result), False
            put(_Done(call, t0, t1, ok, result))
            del call, value, result  # do not keep the last value alive while idle
    finally:
        close = getattr(resource, "close", None)
        if callable(close):
            with contextlib.suppress(Exception):  # a failing close must not break shutdown
                close()


def _unawaited(stage: Stage, coro: Any) -> TypeError:
    coro.close()  # never awaited: close it, without the "never awaited" warning
    return TypeError(f"Stage {stage.name!r}: fn returned a coroutine ({coro.__qualname__}); "
                     "declare the stage function `async def` to run it on the event loop")


class LiveBackend(Backend):
    """Real time on worker threads (and relays to process pools or other executors)."""

    def __init__(self, stages: tuple[Stage, ...], cancel: CancelToken) -> None:
        self._outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._timers: list[tuple[float, int, object]] = []
        self._seq = itertools.count()
        self._cancel = cancel
        self._stages = stages
        self._inboxes: list[Any] = []  # a SimpleQueue per thread stage, the loop for async
        self._prio: list[deque[_Call]] = []  # retries per stage, taken before the inbox
        self._grows: list[bool] = []  # an adaptive stage: a worker loop per slot on demand
        # worker loops per stage: daemon threads, so that after a second Ctrl-C (close without
        # waiting) a call still running cannot keep the interpreter from exiting
        self._threads: list[list[threading.Thread]] = []
        self._calls: list[Callable[..., Any]] = []
        self._started: list[int] = []  # worker loops started per stage
        self._busy: list[int] = []  # calls handed over and not yet reported, per stage
        self._relays: list[_Relay] = []
        self.executor_workers: list[int | None] = []
        self._loop: AsyncLoop | None = None  # the event-loop thread, if a stage is async
        self._remove_wake = cancel._on_cancel(self.wake)
        _running[id(self)] = self.abandon
        try:
            for st in stages:
                self._start_stage(st)
        except BaseException:
            self.close()
            raise
        # the run's clock starts once every worker thread exists (creating 100+ threads takes
        # tens of ms on a loaded machine: that is set-up, not scheduling)
        self.base = time.perf_counter()

    def _start_stage(self, st: Stage) -> None:
        if _is_async(st.fn):
            self._start_async_stage(st)
            return
        self._inboxes.append(queue.SimpleQueue())
        self._prio.append(deque())
        self._grows.append(not isinstance(st.concurrency, int))
        self._threads.append([])
        call: Callable[..., Any] = st.fn
        workers: int | None = None
        if st.executor == "process":
            n = st.max_concurrency

            def make(n: int = n) -> concurrent.futures.Executor:
                # spawn, not fork: this process runs threads (workers, the feeder), and a
                # child forked while one of them holds a lock can hang or die
                return concurrent.futures.ProcessPoolExecutor(
                    max_workers=n, mp_context=multiprocessing.get_context("spawn"))

            relay = _Relay(make(), st.fn, make)
            self._relays.append(relay)
            call = relay
        elif isinstance(st.executor, concurrent.futures.Executor):
            call = _Relay(st.executor, st.fn, None)
            workers = getattr(st.executor, "_max_workers", None)
        self._calls.append(call)
        self.executor_workers.append(workers)
        self._started.append(0)
        self._busy.append(0)
        c = st.concurrency
        # an adaptive stage starts with threads for its initial limit and grows on demand
        self._spawn(len(self._inboxes) - 1, c if isinstance(c, int) else c.initial)

    def _start_async_stage(self, st: Stage) -> None:
        loop = self._loop
        if loop is None:
            from ._async import AsyncLoop  # asyncio: only for a run with an async stage

            loop = self._loop = AsyncLoop(self._outbox, self._cancel)
        s = len(self._inboxes)
        self._inboxes.append(loop)  # loop.put(call) starts its coroutine
        self._prio.append(deque())
        self._grows.append(False)
        self._threads.append([])  # no threads: the loop runs its coroutines
        self._calls.append(st.fn)
        self.executor_workers.append(None)
        self._started.append(_UNSTARTED)
        self._busy.append(0)
        loop.add_stage(s, st)

    def _spawn(self, s: int, n: int) -> None:
        st = self._stages[s]
        threads = self._threads[s]
        for _ in range(n):
            t = threading.Thread(target=_worker_loop, name=f"conveyor-{st.name}-{len(threads)}",
                                 args=(st, self._calls[s], self._inboxes[s], self._prio[s],
                                       self._outbox, self._cancel), daemon=True)
            t.start()
            threads.append(t)
        self._started[s] += n

    def now(self) -> float:
        return time.perf_counter() - self.base

    def budget_now(self) -> float:
        return time.monotonic()

    def prefetch(self, stage: int) -> int:
        # a thread stage of a fixed limit has exactly that many worker loops: it can hold any
        # number of calls queued in its inbox (the old model: no round trip per call)
        if self._grows[stage] or self._inboxes[stage] is self._loop:
            return 0
        return _UNBOUNDED

    def start(self, call: _Call) -> None:
        s = call.stage
        busy = self._busy[s] = self._busy[s] + 1
        if busy > self._started[s] and self._grows[s]:  # an adaptive limit rose: one more
            self._spawn(s, 1)
        if call.attempt > 1 and self._started[s] != _UNSTARTED:
            self._prio[s].append(call)  # ahead of the first attempts already in the inbox
            self._inboxes[s].put(_PRIO)
        else:
            self._inboxes[s].put(call)

    def call_later(self, delay: float, obj: object) -> None:
        heapq.heappush(self._timers, (time.perf_counter() + delay, next(self._seq), obj))

    def discard(self, call: _Call) -> None:
        # the call sees current_call().cancelled; its slot frees when it returns
        if self._loop is not None and self._inboxes[call.stage] is self._loop:
            self._loop.discard(call)  # its asleep() ends now

    def wake(self) -> None:
        self._outbox.put(_WAKE)

    def step(self, sched: Any) -> None:
        """Wait for the next completion (or due timer), then handle all that are waiting."""
        outbox = self._outbox
        timers = self._timers
        timeout = None
        if timers:
            timeout = 0.0 if sched.cancelled else min(
                max(0.0, timers[0][0] - time.perf_counter()), _MAX_WAIT)
        try:
            msg = outbox.get(timeout=timeout)
        except queue.Empty:
            msg = _WAKE
        base = self.base
        on_done = sched.on_done
        busy = self._busy
        for _ in range(4096):  # decide in bulk, but hand results over now and then
            if msg.__class__ is _Done:
                call, start, end, ok, result = msg  # unpacked: faster than named fields
                busy[call.stage] -= 1
                on_done(call, start - base, end - base, ok, result)
            elif msg.__class__ is _InitFailed:
                sched.fail_run(msg.error)
            if outbox.empty():
                break
            msg = outbox.get()
        msg = result = None  # do not keep the last result alive while waiting
        if timers:
            now = time.perf_counter()
            cancelled = sched.cancelled
            while timers and (cancelled or timers[0][0] <= now):
                sched.on_timer(heapq.heappop(timers)[2])
        sched.after_events()

    def abandon(self) -> None:
        """Cancel and tell every worker loop to stop, without waiting (interpreter exit, or a
        second Ctrl-C: running calls finish in the background)."""
        self._cancel.cancel("abandoned")
        self._stop_workers()
        if self._loop is not None:
            self._loop.stop()  # it exits once its running coroutines finish

    def _stop_workers(self) -> None:
        for s, inbox in enumerate(self._inboxes):
            if inbox is self._loop:
                continue
            for _ in range(self._started[s]):
                inbox.put(_STOP)
            self._started[s] = 0

    def close(self, wait: bool = True) -> None:
        """Stop every worker loop and (``wait``) join every thread this backend started."""
        _running.pop(id(self), None)
        self._remove_wake()
        self._stop_workers()
        if wait:
            for threads in self._threads:
                for t in threads:
                    t.join()
        if self._loop is not None:
            self._loop.close(wait=wait)
        if wait:
            for relay in self._relays:
                relay.shutdown()
