"""The process backend: ``run/stream(..., processes=N)``.

``N`` worker processes (the ``spawn`` start method: ``fork`` with threads running is unsafe,
and a fork server would outlive the run) each run, for every stage, a share of that stage's
slots as threads, with their own per-worker resources (``init`` runs in the child, once per
worker thread, as on threads). The scheduler stays in the calling process, so limits, barriers,
budgets, hedges, the ledger and the records stay global: this backend only moves a call to a
child with a free slot of its stage and its completion back.

Wire format: two one-way pipes per child (``multiprocessing.connection``), carrying frames
``<length u32><call id i64><pickle>``; a dispatcher step sends each child all its calls in one
write, and a child's worker threads send back every completion waiting in one write (measured
against a ``multiprocessing.Queue``: see tests/benchmarks/test_processes.py). Each call and each
result is pickled on its own, so one that does not pickle fails that item, not the batch.

Clocks: a child stamps a call's start and end with ``time.perf_counter()``, which is
``CLOCK_MONOTONIC`` on Linux (and a system-wide clock on macOS and Windows): the same clock as
the parent's, so the parent only subtracts its run's base.

A child that dies (``os._exit``, a signal, the OOM killer): its replies pipe closes, the
dispatcher fails the child's in-flight calls with the retryable ``WorkerLost`` (the
scheduler retries those even without a ``RetryPolicy``) and starts a replacement.

Cancel: a flag in shared memory, set the moment the run's token is cancelled; a child's worker
reads it before each call and reports a call it has not started as not started (``ok=None``).

Ctrl-C: the children ignore SIGINT (inherited as ignored from the parent, which ignores it
while it starts them, and set again first thing in the child): a Ctrl-C at the terminal reaches
the whole process group, and only the parent's engine decides what it means (cancel, then
settle). Running calls in the children finish.

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
import heapq
import itertools
import multiprocessing
import multiprocessing.connection
import os
import pickle
import queue
import selectors
import signal
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple

from ._cancel import CancelToken
from ._context import _local
from ._core import _Call
from ._errors import StageInitError, WorkerLost, describe, retry_after_of, safe_str
from ._live import LiveBackend, _InitFailed, _running
from ._stage import Stage

__all__ = ["JOIN_TIMEOUT", "ProcessBackend", "RemoteError"]

JOIN_TIMEOUT = 10.0  # seconds close() waits for a child to exit before terminating it
START_TIMEOUT = 120.0  # seconds the backend waits for its children to be ready

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

class RemoteError(Exception):
    """Stands in for an exception raised in a worker process that does not survive pickling
    (or unpickling): same type name, message, ``retry_after`` hint, and the child's traceback
    as ``remote_traceback`` (and in its ``__cause__``)."""

    remote_type = ""
    remote_traceback = ""
    retry_after: float | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        cls = type(self)
        return (_rebuild_remote, (cls.__name__, cls.__module__, cls.__qualname__,
                                  safe_str(self), self.remote_traceback, self.retry_after))


_remote_types: dict[tuple[str, str, str], type[RemoteError]] = {}


def _rebuild_remote(name: str, module: str, qualname: str, message: str, tb: str,
                    retry_after: float | None) -> RemoteError:
    key = (name, module, qualname)
    cls = _remote_types.get(key)
    if cls is None:
        cls = _remote_types[key] = type(name, (RemoteError,), {
            "__module__": module, "__qualname__": qualname, "remote_type": f"{module}.{qualname}"})
    exc = cls(message)
    exc.remote_traceback = tb
    exc.retry_after = retry_after
    if tb:
        exc.__cause__ = _RemoteTraceback(tb)
    return exc


class _RemoteTraceback(Exception):
    """The traceback of the call in the child, as text (what concurrent.futures does)."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


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
    """``exc`` in a form that pickles here and unpickles in the parent."""
    name, message, qualified, tb = describe(exc)
    try:
        if type(_loads(_dumps(exc, _PROTOCOL))) is type(exc):
            return _Traced(exc, tb)
    except Exception:
        pass
    module, _, qual = qualified.rpartition(".")
    return _rebuild_remote(name, module or "builtins", qual or name, message, tb,
                           retry_after_of(exc))


# -- the child ---------------------------------------------------------------------------------

class _RemoteItem:
    __slots__ = ("index", "key")

    def __init__(self, index: int, key: Any) -> None:
        self.index, self.key = index, key


class _RemoteCall:
    """What ``current_call()`` reads in a child (see engine/_context.py)."""

    __slots__ = ("attempt", "charged", "event", "hedge", "item", "lost", "name", "stage")

    def __init__(self, item: _RemoteItem, stage: int, name: str, attempt: int, hedge: bool,
                 event: threading.Event | None) -> None:
        self.item, self.stage, self.name = item, stage, name
        self.attempt, self.hedge = attempt, hedge
        self.charged: dict[str, float] | None = None
        self.lost = False
        self.event = event


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


# -- the parent --------------------------------------------------------------------------------

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


class _Unsent(NamedTuple):
    """A call whose value does not pickle: it fails without reaching a child."""

    call: _Call
    error: BaseException


def _shares(total: int, n: int) -> list[int]:
    """``total`` split over ``n`` as evenly as possible (the first ones get the remainder)."""
    base, extra = divmod(total, n)
    return [base + (1 if k < extra else 0) for k in range(n)]


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


class ProcessBackend(LiveBackend):
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
        self._cancel = cancel
        self._stages = stages
        self.executor_workers: list[int | None] = [None] * len(stages)
        self._ctx = multiprocessing.get_context("spawn")
        self._flag = self._ctx.RawValue("b", 0)
        self._closing = False
        self._told_stop = False
        self._overflow: list[deque[_Call]] = [deque() for _ in stages]
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
        try:
            self._start_all()
        except BaseException:
            self.close()
            raise
        # the run's clock starts once every child is up and its initial workers ran init
        self.base = time.perf_counter()

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

    # -- the Backend interface -----------------------------------------------------------------
    def _on_cancel(self) -> None:
        self._flag.value = 1  # the children's cancellation check: a flag read
        self.wake()

    def wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):  # full: a wake is pending anyway
            os.write(self._wake_w, b"w")

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
