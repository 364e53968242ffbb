"""Async stages: the coroutines of ``async def`` stage functions, on one event-loop thread.

A run with at least one async stage starts one :class:`AsyncLoop` (one thread, one asyncio
event loop) and stops and joins it at close. The live backend hands an async stage's calls to
it instead of to worker threads, and a call's completion comes back exactly like a thread
worker's: a ``_Done`` on the backend's outbox. The scheduler only hands a call over when its
stage has a free slot, so at most ``concurrency`` coroutines of a stage run at once by
construction, as with threads.

The hand-off is streamed: the dispatcher appends calls to a deque and wakes the loop
(``call_soon_threadsafe``, a write to its self-pipe) only when the loop is not already due to
drain it, so a burst of starts costs one wake-up.

``init`` of an async stage builds one resource per stage per run, on the loop (awaited when it
is a coroutine function or returns an awaitable: an ``AsyncOpenAI`` client, an
``httpx.AsyncClient``); ``fn(value, resource)`` then shares it, and ``await resource.aclose()``
(or ``close()``, awaited if it is a coroutine) runs once every call has ended.

The engine never cancels a running coroutine: a cancelled run starts none (a call handed over
but not begun reports ``ok=None``), running ones finish, and close waits for them.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import inspect
import queue
import threading
import time
from typing import Any

from ._cancel import CancelToken
from ._context import _async_call, _wake, asleep
from ._core import _Call
from ._errors import StageInitError
from ._messages import _Done, _InitFailed
from ._stage import Stage

__all__ = ["AsyncLoop", "asleep"]

async def _close(resource: Any) -> None:
    for name in ("aclose", "close"):
        method = getattr(resource, name, None)
        if callable(method):
            with contextlib.suppress(Exception):  # a failing close must not break shutdown
                result = method()
                if inspect.isawaitable(result):
                    await result
            return


class _AStage:
    """An async stage's state on the loop."""

    __slots__ = ("broken", "fn", "init", "name", "ready", "resource")

    def __init__(self, st: Stage) -> None:
        self.name = st.name
        self.fn = st.fn
        self.init = st.init
        self.resource: Any = None
        self.broken = False
        self.ready: asyncio.Future[None] | None = None  # set while init runs


class AsyncLoop:
    """One event loop on its own thread, running the calls of a run's async stages.

    ``put(call)`` (the dispatcher's hand-off, the same method a worker inbox has) and
    ``discard``/``stop`` may be called from any thread; everything else runs on the loop.
    """

    def __init__(self, outbox: queue.SimpleQueue[Any], cancel: CancelToken) -> None:
        self._outbox = outbox
        self._cancel = cancel
        self._pending: collections.deque[Any] = collections.deque()
        self._posted = False  # a drain is scheduled on the loop
        self._stages: dict[int, _AStage] = {}
        # the tasks running (calls, inits), by call: strong references (asyncio keeps weak
        # ones), dropped by the task itself as it ends (cheaper than a done callback)
        self._tasks: dict[Any, asyncio.Task[None]] = {}
        self._stopping = False
        self._finished = False
        self._closed = False  # the loop thread has exited: calls are answered here
        self._lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name="conveyor-async")
        self._thread.start()

    # -- any thread ----------------------------------------------------------------------------
    def add_stage(self, s: int, st: Stage) -> None:
        """Stage ``s`` is async: its ``init`` (if any) starts on the loop now."""
        ast = self._stages[s] = _AStage(st)
        if st.init is not None:
            self._post(functools.partial(self._start_init, ast))

    def put(self, item: _Call) -> None:
        """Start ``item`` (a call) on the loop."""
        self._post(item)

    def discard(self, call: _Call) -> None:
        """``call`` lost to its hedged twin: end its ``asleep`` early."""
        self._post(functools.partial(_wake, call))

    def stop(self) -> None:
        """Let the running calls finish, close the resources, stop the loop (no waiting)."""
        self._post(self._begin_shutdown)

    def close(self, wait: bool = True) -> None:
        """Stop and (``wait``) join the loop thread: running calls finish first."""
        self.stop()
        if wait and self._thread is not threading.current_thread():
            self._thread.join()

    def _post(self, item: Any) -> None:
        self._pending.append(item)
        if self._closed:  # the loop thread has exited (an abandoned run): answer it here
            with self._lock:
                self._answer_leftovers()
            return
        if not self._posted:
            self._posted = True
            try:
                self.loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # the loop closed meanwhile
                self._posted = False
                with self._lock:
                    self._answer_leftovers()

    def _answer_leftovers(self) -> None:
        while self._pending:
            item = self._pending.popleft()
            if item.__class__ is _Call:
                now = time.perf_counter()
                self._outbox.put(_Done(item, now, now, None, None))

    # -- the loop thread -----------------------------------------------------------------------
    def _main(self) -> None:
        loop = self.loop
        asyncio.set_event_loop(loop)
        try:
            while not self._finished:
                try:
                    loop.run_forever()
                except BaseException:  # a stray task of the user's raised out of the loop
                    continue  # (SystemExit...): calls are still running, keep going
        finally:
            try:
                _cancel_stray_tasks(loop)
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())  # asyncio.to_thread
            finally:
                asyncio.set_event_loop(None)
                with self._lock:
                    loop.close()
                    self._closed = True
                    self._answer_leftovers()

    def _drain(self) -> None:
        self._posted = False
        pending = self._pending
        begin, call_cls = self._begin, _Call
        while pending:
            item = pending.popleft()
            if item.__class__ is call_cls:
                begin(item)
            else:
                item()

    def _begin(self, call: _Call) -> None:
        if self._stopping:  # handed over after a stop (an abandoned run): it never starts
            now = time.perf_counter()
            self._outbox.put(_Done(call, now, now, None, None))
            return
        self._tasks[call] = self.loop.create_task(self._run(call, self._stages[call.stage]))

    async def _run(self, call: _Call, ast: _AStage) -> None:
        """One call: like a thread worker's iteration, in the task's own context."""
        put, clock = self._outbox.put, time.perf_counter
        ready = ast.ready
        if ready is not None:
            await ready
        if ast.broken or self._cancel.cancelled:  # the cancellation check: a flag read
            del self._tasks[call]
            now = clock()
            put(_Done(call, now, now, None, None))
            return
        _async_call.set(call)  # this task's context only: current_call() sees it
        value = call.item.value
        resource = ast.resource
        t0 = clock()
        try:
            if resource is None:
                result = await ast.fn(value)
            else:
                result = await ast.fn(value, resource)
            ok = True
        except BaseException as exc:  # every error ends in the item's record
            result, ok = exc, False
        t1 = clock()
        del self._tasks[call]
        put(_Done(call, t0, t1, ok, result))

    def _start_init(self, ast: _AStage) -> None:
        ast.ready = self.loop.create_future()
        self._tasks[ast] = self.loop.create_task(self._init(ast))

    async def _init(self, ast: _AStage) -> None:
        assert ast.init is not None and ast.ready is not None
        try:
            resource = ast.init()
            if inspect.isawaitable(resource):
                resource = await resource
            ast.resource = resource
        except BaseException as exc:  # the run cannot use this stage: fail it, keep draining
            ast.broken = True
            self._outbox.put(_InitFailed(StageInitError(ast.name, exc)))
        finally:
            ready, ast.ready = ast.ready, None
            ready.set_result(None)
            del self._tasks[ast]

    def _begin_shutdown(self) -> None:
        if not self._stopping:
            self._stopping = True
            self.loop.create_task(self._shutdown())

    async def _shutdown(self) -> None:
        try:
            while self._tasks:  # running calls finish (never cancelled by the engine)
                await asyncio.wait(list(self._tasks.values()))
            for ast in self._stages.values():
                if ast.resource is not None:
                    resource, ast.resource = ast.resource, None
                    await _close(resource)
        finally:
            self._finished = True
            self.loop.stop()


def _cancel_stray_tasks(loop: asyncio.AbstractEventLoop) -> None:
    """Tasks the stage functions started and left running (as ``asyncio.run`` does)."""
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    if not tasks:
        return
    for t in tasks:
        t.cancel()
    loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))

