"""The parent's side of the worker processes of ``processes=N`` (engine/_procs.py): starting
them, reading what they send, replacing one that died, stopping them.

``_WorkerPool`` is ``ProcessBackend``'s base class. It owns the children (a ``_Worker`` record
each: its process, its two pipes, its share of every stage's slots, its calls in flight), the
selector over their replies pipes and a wake pipe, and the cancel flag they read; the
subclass adds the Backend interface (which child runs a call, the dispatcher step, timers).

Start: every child is started with SIGINT ignored (inherited as ignored, see engine/_procs.py)
and the backend waits, up to ``START_TIMEOUT`` seconds, until each has its initial worker
threads and ran their ``init``.

A child that dies (``os._exit``, a signal, the OOM killer): its replies pipe closes, the
dispatcher fails the child's in-flight calls with the retryable ``WorkerLost`` (the
scheduler retries those even without a ``RetryPolicy``) and starts a replacement.

Close: every child is told to stop; its worker threads finish their current call (none is
running on a normal close: the run has settled), close their resources, and the child exits.
``close(wait=True)`` joins each child for up to ``JOIN_TIMEOUT`` seconds, then terminates and,
if need be, kills it (a resource's ``close()`` that hangs), and closes every pipe: no
process or thread of the run outlives it. ``close(wait=False)`` (a second Ctrl-C) only tells the
children to stop: they finish their running calls in the background (daemon processes:
multiprocessing ends them at interpreter exit). A child whose parent dies sees its pipe close
and exits once its running calls end.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import selectors
import signal
import threading
import time
from typing import Any

from ._cancel import CancelToken
from ._core import _Call
from ._errors import StageInitError, WorkerLost, safe_str
from ._live import LiveBackend, _running
from ._messages import _InitFailed
from ._procs_child import (
    _FATAL,
    _INIT_FAILED,
    _PROTOCOL,
    _READY,
    _STOP,
    _child_main,
    _dumps,
    _frame,
    _frames,
    _loads,
    _Spec,
)
from ._stage import Stage

__all__ = ["JOIN_TIMEOUT", "START_TIMEOUT"]

JOIN_TIMEOUT = 10.0  # seconds close() waits for a child to exit before terminating it
START_TIMEOUT = 120.0  # seconds the backend waits for its children to be ready


class _Worker:
    """The parent's record of one child."""

    def __init__(self, slot: int, caps: list[int]) -> None:
        self.slot = slot  # its position: a replacement takes the same one
        self.caps = caps  # slots of each stage it holds
        self.busy = [0] * len(caps)  # calls of each stage sent and not yet answered
        self.load = 0  # all calls sent and not yet answered
        self.inflight: dict[int, _Call] = {}
        self.out: list[bytes] = []  # frames to send at the next flush
        self.discards: list[int] = []
        self.alive = True
        self.ready = False
        self.fatal: str | None = None
        self.proc: Any = None
        self.calls: Any = None  # our end of its calls pipe
        self.replies: Any = None  # our end of its replies pipe


def _shares(total: int, n: int) -> list[int]:
    """``total`` split over ``n`` as evenly as possible (the first ones get the remainder)."""
    base, extra = divmod(total, n)
    return [base + (1 if k < extra else 0) for k in range(n)]


class _WorkerPool(LiveBackend):
    """``ProcessBackend``'s worker processes: started, read, replaced and stopped here."""

    def __init__(self, stages: tuple[Stage, ...], cancel: CancelToken,
                 processes: int) -> None:
        # not LiveBackend.__init__: the stages' threads run in the children
        self._cancel = cancel
        self._ctx = multiprocessing.get_context("spawn")
        self._flag = self._ctx.RawValue("b", 0)
        self._closing = False
        self._told_stop = False
        self._events: list[Any] = []  # for the next step: unsent calls, init failures
        self._dead: list[_Worker] = []  # died, waiting for the next step to settle them
        self._gone: list[_Worker] = []  # settled (joined at close)
        self.processes = processes
        self.replaced = 0  # children replaced after they died
        caps = [_shares(st.max_concurrency, processes) for st in stages]
        self._caps = [[caps[s][k] for s in range(len(stages))] for k in range(processes)]
        initial = [_shares(c if isinstance(c, int) else c.initial, processes)
                   for c in (st.concurrency for st in stages)]
        self._specs = [
            _dumps([_Spec(st.name, st.fn, st.init, st.hedge is not None,
                          min(initial[s][k], caps[s][k])) for s, st in enumerate(stages)],
                   _PROTOCOL)
            for k in range(processes)]
        self._workers: list[_Worker] = []
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._remove_wake = cancel._on_cancel(self._on_cancel)
        _running[id(self)] = self.abandon

    # -- children ------------------------------------------------------------------------------
    def _start_all(self) -> None:
        main = threading.current_thread() is threading.main_thread()
        old = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:
            for k in range(self.processes):
                self._workers.append(self._launch(k))
        finally:
            if old is not None:
                signal.signal(signal.SIGINT, old)
        deadline = time.monotonic() + START_TIMEOUT
        while not all(w.ready for w in self._workers):
            for key, _ in self._selector.select(0.1):
                if key.data is None:
                    self._drain_wake()
                else:
                    self._receive(key.data, None)
            for w in self._workers:
                if w.fatal is not None or not w.alive:
                    w.proc.join(1.0)
                    raise RuntimeError(
                        f"processes={self.processes}: worker process {w.slot} could not start"
                        + (f": {w.fatal}" if w.fatal else f" (exit code {w.proc.exitcode})"))
            if time.monotonic() > deadline:
                raise RuntimeError(f"processes={self.processes}: the worker processes were "
                                   f"not ready after {START_TIMEOUT:.0f} s")

    def _launch(self, slot: int) -> _Worker:
        ctx = self._ctx
        w = _Worker(slot, self._caps[slot])
        calls_r, calls_w = ctx.Pipe(duplex=False)
        replies_r, replies_w = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child_main, name=f"conveyor-worker-{slot}",
                           args=(self._specs[slot], calls_r, replies_w, self._flag),
                           daemon=True)
        try:
            proc.start()
        finally:
            calls_r.close()  # the child's ends: closed here so that its death closes them
            replies_w.close()
        w.proc, w.calls, w.replies = proc, calls_w, replies_r
        self._selector.register(replies_r, selectors.EVENT_READ, w)
        return w

    def _receive(self, w: _Worker, sched: Any) -> None:
        """Read what ``w`` sent; with ``sched``, report the completions to it."""
        conn = w.replies
        base = self.base if sched is not None else 0.0
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            self._selector.unregister(conn)
            conn.close()
            w.alive = False
            self._dead.append(w)
            return
        on_done = sched.on_done if sched is not None else None
        for cid, payload in _frames(data):
            if cid >= 0:
                call = w.inflight.pop(cid, None)
                if call is None:
                    continue
                try:
                    t0, t1, ok, result, charged = _loads(payload)
                except BaseException as exc:
                    t0 = t1 = time.perf_counter()
                    ok, charged = False, None
                    result = RuntimeError(
                        f"the call's result could not be unpickled in the calling process "
                        f"({type(exc).__name__}: {safe_str(exc)})")
                s = call.stage
                w.busy[s] -= 1
                w.load -= 1
                if charged:
                    call.charged = charged
                assert on_done is not None
                on_done(call, t0 - base, t1 - base, ok, result)
            elif cid == _READY:
                w.ready = True
            elif cid == _INIT_FAILED:
                try:
                    err = _loads(payload)
                except BaseException as exc:
                    err = StageInitError("?", exc)
                if sched is None:
                    self._events.append(_InitFailed(err))
                else:
                    sched.fail_run(err)
            elif cid == _FATAL:
                w.fatal = str(_loads(payload))

    def _settle_dead(self, sched: Any) -> None:
        """Children that died: fail their in-flight calls (retryable), replace them."""
        while self._dead:
            w = self._dead.pop()
            self._gone.append(w)
            w.proc.join(1.0)
            code = w.proc.exitcode
            lost = list(w.inflight.values())
            w.inflight.clear()
            if self._workers[w.slot] is w and not self._closing:
                if not w.ready:  # it never started: a replacement would not either
                    sched.fail_run(RuntimeError(
                        f"worker process {w.slot} died before it was ready (exit code {code})"
                        + (f": {w.fatal}" if w.fatal else "")))
                else:
                    self.replaced += 1
                    self._workers[w.slot] = self._launch(w.slot)  # usable now: calls queue
            now = time.perf_counter() - self.base
            for call in lost:
                sched.on_done(call, now, now, False, WorkerLost(
                    f"worker process {w.slot} (pid {w.proc.pid}) died (exit code {code}) "
                    "while running this call"))
        self._dispatch_overflow()

    def _drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 4096):
                pass

    def _dispatch_overflow(self) -> None:
        """Send the calls waiting for a free slot to children that have one (the subclass)."""
        raise NotImplementedError

    def _on_cancel(self) -> None:
        self._flag.value = 1  # the children's cancellation check: a flag read
        self.wake()

    def wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):  # full: a wake is pending anyway
            os.write(self._wake_w, b"w")

    # -- the end -------------------------------------------------------------------------------
    def abandon(self) -> None:
        """Cancel and tell every child to stop, without waiting."""
        self._cancel.cancel("abandoned")
        self._flag.value = 1
        self._stop_workers()

    def _stop_workers(self) -> None:
        if self._told_stop:
            return
        self._told_stop = True
        self._closing = True
        for w in self._workers:
            if w.alive and w.calls is not None:
                with contextlib.suppress(OSError):
                    w.calls.send_bytes(_frame(_STOP, b""))

    def close(self, wait: bool = True) -> None:
        """Stop every child and (``wait``) join it, killing it after ``JOIN_TIMEOUT``
        seconds; close every pipe."""
        _running.pop(id(self), None)
        self._remove_wake()
        self._closing = True
        self._stop_workers()
        workers = [*self._workers, *self._dead, *self._gone]
        if wait:
            deadline = time.monotonic() + JOIN_TIMEOUT
            for w in workers:
                if w.proc is None:
                    continue
                w.proc.join(max(0.0, deadline - time.monotonic()))
                if w.proc.exitcode is None:
                    w.proc.terminate()
                    w.proc.join(1.0)
                if w.proc.exitcode is None:
                    w.proc.kill()
                    w.proc.join()
        for w in workers:
            for conn in (w.calls, w.replies):
                if conn is not None and not conn.closed:
                    conn.close()
            if wait and w.proc is not None:
                with contextlib.suppress(ValueError):
                    w.proc.close()
        self._selector.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._wake_r = self._wake_w = -1

    @property
    def pids(self) -> list[int]:
        """The worker processes' ids, in slot order (for tests and tooling)."""
        return [w.proc.pid for w in self._workers]
