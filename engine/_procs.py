"""The process backend: ``run/stream(..., processes=N)``.

``N`` worker processes (the ``spawn`` start method: ``fork`` with threads running is unsafe,
and a fork server would outlive the run) each run, for every stage, a share of that stage's
slots as threads, with their own per-worker resources (``init`` runs in the child, once per
worker thread, as on threads). The scheduler stays in the calling process, so limits, barriers,
budgets, hedges, the ledger and the records stay global: this backend only moves a call to a
child with a free slot of its stage and its completion back.

Ctrl-C: the children ignore SIGINT (inherited as ignored from the parent, which ignores it
while it starts them, and set again first thing in the child): a Ctrl-C at the terminal reaches
the whole process group, and only the parent's engine decides what it means (cancel, then
settle). Running calls in the children finish.

Modules: this one is the Backend interface of ``ProcessBackend``: which child a call goes to
(one with a free slot of the call's stage, the least loaded; if none has one, the call waits),
the dispatcher step (one write per child, then a wait on every replies pipe at once), timers.
Starting, replacing and stopping the children is its base class's, in engine/_procs_pool.py;
the worker process itself and the wire format are in engine/_procs_child.py.
"""
from __future__ import annotations

import contextlib
import heapq
import itertools
import pickle
import time
from collections import deque
from typing import Any, NamedTuple

from ._cancel import CancelToken
from ._core import _Call
from ._errors import safe_str
from ._procs_child import _DISCARD, _PROTOCOL, RemoteError, _dumps, _frame, _pack
from ._procs_pool import JOIN_TIMEOUT, _Worker, _WorkerPool
from ._stage import Stage

__all__ = ["JOIN_TIMEOUT", "ProcessBackend", "RemoteError"]


class _Unsent(NamedTuple):
    """A call whose value does not pickle: it fails without reaching a child."""

    call: _Call
    error: BaseException


def check_stages(stages: tuple[Stage, ...]) -> None:
    """What ``processes=N`` needs of the stages, checked before any work: thread stages, and
    a ``fn`` and ``init`` that pickle (a ValueError naming the stage)."""
    for st in stages:
        where = f"Stage {st.name!r}"
        if st.executor not in (None, "thread"):
            raise ValueError(f"{where}: executor={st.executor!r}: processes=N runs thread "
                             "stages in its worker processes; drop the executor, or run "
                             "without processes=N")
        for what, fn in (("fn", st.fn), ("init", st.init)):
            if fn is None:
                continue
            try:
                pickle.dumps(fn, _PROTOCOL)
            except Exception as exc:
                raise ValueError(
                    f"{where}: {what}: processes=N needs a {what} that pickles (defined at "
                    f"module level), got {fn!r} ({type(exc).__name__}: {safe_str(exc)})"
                ) from None


class ProcessBackend(_WorkerPool):
    """Real time, calls on worker threads in ``processes`` worker processes.

    One thread does the parent's side: the dispatcher (the run's caller) sends the calls a
    step started in one write per child, then waits on every child's replies pipe and a wake
    pipe at once (``selectors``): no reader thread, so no GIL hand-off per reply.
    """

    def __init__(self, stages: tuple[Stage, ...], cancel: CancelToken,
                 processes: int) -> None:
        if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
            raise ValueError(f"processes: expected an int >= 1, got {processes!r}")
        check_stages(stages)
        self._timers: list[tuple[float, int, object]] = []
        self._seq = itertools.count()
        self._ids = itertools.count()
        self._stages = stages
        self.executor_workers: list[int | None] = [None] * len(stages)
        self._overflow: list[deque[_Call]] = [deque() for _ in stages]
        super().__init__(stages, cancel, processes)  # the children's side: _WorkerPool
        try:
            self._start_all()
        except BaseException:
            self.close()
            raise
        # the run's clock starts once every child is up and its initial workers ran init
        self.base = time.perf_counter()

    # -- the Backend interface -----------------------------------------------------------------
    def _pick(self, s: int) -> _Worker | None:
        best: _Worker | None = None
        for w in self._workers:
            if w.alive and w.busy[s] < w.caps[s] and (best is None or w.load < best.load):
                best = w
        return best

    def prefetch(self, stage: int) -> int:
        return 0  # a child takes a call only into a free slot (its share of the limit)

    def start(self, call: _Call) -> None:
        s = call.stage
        w = self._pick(s)
        if w is None:  # no child has a free slot of the stage now (one is being replaced)
            self._overflow[s].append(call)
            return
        self._send(w, call)

    def _send(self, w: _Worker, call: _Call) -> None:
        item = call.item
        try:
            payload = _dumps((call.stage, call.attempt, call.hedge, item.index, item.key,
                              item.value), _PROTOCOL)
        except Exception:
            try:  # the key is only there for current_call(): a value that pickles still runs
                payload = _dumps((call.stage, call.attempt, call.hedge, item.index, None,
                                  item.value), _PROTOCOL)
            except Exception as exc:
                self._events.append(_Unsent(call, TypeError(
                    f"Stage {call.name!r}: the item's value does not pickle "
                    f"({type(exc).__name__}: {safe_str(exc)}); with processes=N values must "
                    "pickle")))
                return
        cid = next(self._ids)
        w.inflight[cid] = call
        w.busy[call.stage] += 1
        w.load += 1
        w.out.append(_pack(len(payload), cid) + payload)

    def _dispatch_overflow(self) -> None:
        for s, waiting in enumerate(self._overflow):
            while waiting:
                w = self._pick(s)
                if w is None:
                    break
                self._send(w, waiting.popleft())

    def _flush(self) -> None:
        for w in self._workers:
            if w.discards:
                w.out.append(_frame(_DISCARD, _dumps(w.discards, _PROTOCOL)))
                w.discards = []
            if w.out:
                data = b"".join(w.out)
                w.out = []
                if w.alive:
                    with contextlib.suppress(OSError):  # it died: its pipe will say so
                        w.calls.send_bytes(data)

    def discard(self, call: _Call) -> None:
        for w in self._workers:
            for cid, c in w.inflight.items():
                if c is call:
                    w.discards.append(cid)
                    return

    def step(self, sched: Any) -> None:
        """Send what was started, wait for the next replies (or due timer, or a wake), then
        handle all that are waiting and send what they started."""
        self._flush()
        timers = self._timers
        timeout = None
        if self._events or self._dead:
            timeout = 0.0
        elif timers:
            timeout = 0.0 if sched.cancelled else max(0.0, timers[0][0] - time.perf_counter())
        select, receive = self._selector.select, self._receive
        ready = select(timeout)
        for _ in range(64):  # decide in bulk, but hand results over now and then
            if not ready:
                break
            for key, _ in ready:
                if key.data is None:
                    self._drain_wake()
                else:
                    receive(key.data, sched)
            ready = select(0)
        if self._events:
            events, self._events = self._events, []
            for ev in events:
                if ev.__class__ is _Unsent:
                    now = time.perf_counter() - self.base
                    sched.on_done(ev.call, now, now, False, ev.error)
                else:
                    sched.fail_run(ev.error)
        if self._dead:
            self._settle_dead(sched)
        elif any(self._overflow):
            self._dispatch_overflow()
        if timers:
            now = time.perf_counter()
            cancelled = sched.cancelled
            while timers and (cancelled or timers[0][0] <= now):
                sched.on_timer(heapq.heappop(timers)[2])
        sched.after_events()
        self._flush()

    def call_later(self, delay: float, obj: object) -> None:
        heapq.heappush(self._timers, (time.perf_counter() + delay, next(self._seq), obj))
