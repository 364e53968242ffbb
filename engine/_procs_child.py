"""The worker process's side of ``processes=N`` (engine/_procs.py), and what crosses the pipes.

A child runs ``_child_main``: the ``spawn`` start method imports this module in the new
interpreter by its path, and unpickles the stages' ``_Spec`` (defined here) the same way. For
every stage it runs a share of that stage's slots as worker threads, each with its own resource
(``init`` runs in the child, once per worker thread, as on threads). Its main thread reads the
calls pipe and hands each call to its stage's threads (one more thread when all are taken: the
parent never sends a child more calls of a stage than its share of the slots); a worker thread
runs the call and sends its completion back.

Wire format: two one-way pipes per child (``multiprocessing.connection``), carrying frames
``<length u32><call id i64><pickle>``; a dispatcher step sends each child all its calls in one
write, and a child's worker threads send back every completion waiting in one write (measured
against a ``multiprocessing.Queue``: see tests/benchmarks/test_processes.py). Each call and each
result is pickled on its own, so one that does not pickle fails that item, not the batch.
Negative call ids are control frames (ready, init failed, fatal, discard, stop).

Errors cross as themselves, their traceback text rebuilt as their ``__cause__``, when they
pickle here and unpickle in the parent; otherwise as a ``RemoteError`` of the same type name,
message and ``retry_after`` hint.

Clocks: a child stamps a call's start and end with ``time.perf_counter()``, which is
``CLOCK_MONOTONIC`` on Linux (and a system-wide clock on macOS and Windows): the same clock as
the parent's, so the parent only subtracts its run's base.

Cancel: a flag in shared memory, set the moment the run's token is cancelled; a child's worker
reads it before each call and reports a call it has not started as not started (``ok=None``).
A child ignores SIGINT (the parent's engine handles Ctrl-C, see engine/_procs.py), and stops
when told to or when its calls pipe closes (the parent is gone), once its running calls end.
"""
from __future__ import annotations

import contextlib
import multiprocessing.connection
import pickle
import queue
import signal
import struct
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from ._context import _local, _RemoteCall, _RemoteItem
from ._errors import RemoteError, StageInitError, _RemoteTraceback, describe, portable, safe_str

__all__ = ["RemoteError"]  # re-exported: engine._errors.RemoteError

_HEAD = struct.Struct("<Iq")  # payload length, call id
_HEAD_SIZE = _HEAD.size
# control frames (call ids are >= 0)
_READY = -1  # child -> parent: every initial worker thread exists and ran its init
_INIT_FAILED = -2  # child -> parent: a stage's init raised (payload: StageInitError)
_FATAL = -3  # child -> parent: the child cannot start (payload: text)
_DISCARD = -4  # parent -> child: payload: a list of call ids whose results will be ignored
_STOP = -5  # parent -> child: stop once the running calls end
_PROTOCOL = pickle.HIGHEST_PROTOCOL
_dumps, _loads = pickle.dumps, pickle.loads
_pack, _unpack_from = _HEAD.pack, _HEAD.unpack_from


def _frame(cid: int, payload: bytes) -> bytes:
    return _pack(len(payload), cid) + payload


def _frames(data: bytes) -> list[tuple[int, memoryview]]:
    view = memoryview(data)
    out = []
    pos, end = 0, len(data)
    while pos < end:
        n, cid = _unpack_from(view, pos)
        pos += _HEAD_SIZE
        out.append((cid, view[pos:pos + n]))
        pos += n
    return out


# -- errors that cross the process boundary ---------------------------------------------------

def _with_traceback(exc: BaseException, tb: str) -> BaseException:
    exc.__cause__ = _RemoteTraceback(tb)
    return exc


class _Traced:
    """Pickles an exception with its traceback text, rebuilt as its ``__cause__``."""

    def __init__(self, exc: BaseException, tb: str) -> None:
        self.exc, self.tb = exc, tb

    def __reduce__(self) -> tuple[Any, ...]:
        return (_with_traceback, (self.exc, self.tb))


def _portable_error(exc: BaseException) -> Any:
    """``exc`` in a form that pickles here and unpickles in the parent (with its traceback)."""
    err = portable(exc)
    return _Traced(exc, describe(exc)[3]) if err is exc else err


# -- the child ---------------------------------------------------------------------------------

class _Spec(NamedTuple):
    """What a child needs of a stage (not the Stage: its budget or rate limit may not pickle,
    and they stay with the scheduler)."""

    name: str
    fn: Callable[..., Any]
    init: Callable[[], Any] | None
    hedged: bool
    initial: int  # worker threads started at once (the share of the initial limit)


class _ChildStage:
    def __init__(self, index: int, spec: _Spec) -> None:
        self.index = index
        self.spec = spec
        self.inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.threads: list[threading.Thread] = []
        self.assigned = 0  # calls put in the inbox and not yet ended


class _Child:
    """The worker process's side: a reader (its main thread) and worker threads."""

    def __init__(self, specs: list[_Spec], calls: multiprocessing.connection.Connection,
                 replies: multiprocessing.connection.Connection, flag: Any) -> None:
        self.calls, self.replies, self.flag = calls, replies, flag
        self.out: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        self.send_lock = threading.Lock()
        self.gone = False  # the parent's end of the replies pipe is closed
        self.lock = threading.Lock()
        self.running: dict[int, _RemoteCall] = {}
        self.discarded: set[int] = set()
        self.stages = [_ChildStage(i, sp) for i, sp in enumerate(specs)]
        self.inits = threading.Semaphore(0)

    def main(self) -> None:
        try:
            waiting = 0
            for st in self.stages:
                for _ in range(st.spec.initial):
                    self.spawn(st)
                    waiting += 1
            for _ in range(waiting):
                self.inits.acquire()
            self.post(_frame(_READY, b""))
            self.read_loop()
        finally:
            for st in self.stages:
                for _ in st.threads:
                    st.inbox.put(None)
            for st in self.stages:
                for t in st.threads:
                    t.join()
            self.post(b"")

    def spawn(self, st: _ChildStage) -> None:
        t = threading.Thread(target=self.work, args=(st,), daemon=True,
                             name=f"conveyor-{st.spec.name}-{len(st.threads)}")
        st.threads.append(t)
        t.start()

    def read_loop(self) -> None:
        recv = self.calls.recv_bytes
        stages, lock = self.stages, self.lock
        while True:
            try:
                data = recv()
            except (EOFError, OSError):  # the parent is gone: stop
                return
            for cid, payload in _frames(data):
                if cid >= 0:
                    try:
                        s, attempt, hedge, index, key, value = _loads(payload)
                    except BaseException as exc:
                        self.reply_error(cid, exc, "its value could not be unpickled in the "
                                                   "worker process")
                        continue
                    st = stages[s]
                    with lock:
                        st.assigned += 1
                        grow = st.assigned > len(st.threads)
                    if grow:
                        self.spawn(st)
                    st.inbox.put((cid, attempt, hedge, index, key, value))
                elif cid == _DISCARD:
                    for d in _loads(payload):
                        call = self.running.get(d)
                        if call is None:
                            self.discarded.add(d)
                        else:
                            call.lost = True
                            if call.event is not None:
                                call.event.set()
                elif cid == _STOP:
                    return

    def reply_error(self, cid: int, exc: BaseException, why: str) -> None:
        now = time.perf_counter()
        err = RuntimeError(f"this call could not run: {why} ({type(exc).__name__}: "
                           f"{safe_str(exc)})")
        self.post(_frame(cid, _dumps((now, now, False, err, None), _PROTOCOL)))

    def post(self, frame: bytes) -> None:
        """Queue a frame and send every frame queued, unless another thread is sending now
        (it sends this one too): no sender thread, so no hand-off, and what piles up while
        one thread writes goes in one write."""
        out, lock = self.out, self.send_lock
        out.put(frame)
        while not out.empty() and lock.acquire(blocking=False):
            try:
                frames: list[bytes] = []
                while not out.empty() and len(frames) < 4096:
                    frames.append(out.get())
                if not self.gone:
                    try:
                        self.replies.send_bytes(b"".join(frames))
                    except OSError:  # the parent is gone
                        self.gone = True
            finally:
                lock.release()

    def work(self, st: _ChildStage) -> None:
        spec = st.spec
        fn, name, s = spec.fn, spec.name, st.index
        get, put, clock, flag = st.inbox.get, self.post, time.perf_counter, self.flag
        running, discarded, lock = self.running, self.discarded, self.lock
        resource = None
        broken = False
        if spec.init is not None:
            try:
                resource = spec.init()
            except BaseException as exc:
                broken = True
                err = StageInitError(name, exc)
                try:
                    payload = _dumps(err, _PROTOCOL)
                    _loads(payload)
                except Exception:
                    payload = _dumps(StageInitError(name, RuntimeError(
                        f"{type(exc).__name__}: {safe_str(exc)}")), _PROTOCOL)
                put(_frame(_INIT_FAILED, payload))
        self.inits.release()
        try:
            while True:
                msg = get()
                if msg is None:
                    return
                cid, attempt, hedge, index, key, value = msg
                if broken or flag.value or cid in discarded:  # the cancellation check
                    discarded.discard(cid)
                    now = clock()
                    payload = _dumps((now, now, None, None, None), _PROTOCOL)
                else:
                    call = _RemoteCall(_RemoteItem(index, key), s, name, attempt, hedge,
                                       threading.Event() if spec.hedged else None)
                    running[cid] = call
                    _local.call = call
                    t0 = clock()
                    try:
                        result = fn(value) if resource is None else fn(value, resource)
                        ok = True
                    except BaseException as exc:
                        result, ok = exc, False
                    t1 = clock()
                    _local.call = None
                    del running[cid]
                    payload = self.encode(name, t0, t1, ok, result, call.charged)
                    del call, result
                del value, msg
                with lock:
                    st.assigned -= 1
                put(_frame(cid, payload))
        finally:
            close = getattr(resource, "close", None)
            if callable(close):
                with contextlib.suppress(Exception):
                    close()

    @staticmethod
    def encode(name: str, t0: float, t1: float, ok: bool, result: Any,
               charged: dict[str, float] | None) -> bytes:
        if not ok:
            result = _portable_error(result)
        try:
            return _dumps((t0, t1, ok, result, charged), _PROTOCOL)
        except Exception as exc:
            if ok:
                err: BaseException = TypeError(
                    f"Stage {name!r}: the call's result does not pickle ({type(exc).__name__}: "
                    f"{safe_str(exc)}); with processes=N a stage's results must pickle")
            else:
                err = RuntimeError(f"Stage {name!r}: the call's error does not pickle "
                                   f"({type(exc).__name__}: {safe_str(exc)})")
            return _dumps((t0, t1, False, err, None), _PROTOCOL)


def _child_main(spec: bytes, calls: multiprocessing.connection.Connection,
                replies: multiprocessing.connection.Connection, flag: Any) -> None:
    """A worker process's entry point."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent's engine handles Ctrl-C
    try:
        specs = _loads(spec)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            replies.send_bytes(_frame(_FATAL, _dumps(
                f"the stages could not be unpickled in the worker process "
                f"({type(exc).__name__}: {safe_str(exc)})", _PROTOCOL)))
        return
    _Child(specs, calls, replies, flag).main()
