"""A stage on an executor: the worker loop of each slot relays its call to a process pool
(``executor="process"``) or a caller's ``concurrent.futures.Executor`` (e.g. Dask's
``client.get_executor(pure=False)``) and waits for it, so the stage's limit stays global and
the dispatcher central. A process pool that breaks (a worker died) is replaced and the calls
it lost fail with the retryable ``WorkerLost``; an exception that does not pickle comes back
as a ``RemoteError`` naming its type."""
from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from ._context import _local, _RemoteCall, _RemoteItem
from ._dask import is_worker_lost
from ._errors import WorkerLost, portable

__all__ = ["_Relay", "_Timed"]


class _Timed(NamedTuple):
    """A relayed call's own start and end, measured where it ran (same host clock)."""

    start: float
    end: float
    value: Any


def _timed(fn: Callable[[Any], Any], value: Any) -> _Timed:
    t0 = time.perf_counter()
    try:
        result = fn(value)
    except Exception as exc:  # runs in the worker: make sure the parent can read it
        err = portable(exc)
        if err is exc:
            raise
        raise err from None
    return _Timed(t0, time.perf_counter(), result)


_PLAIN_KEYS = (int, str, float, bytes, type(None))


class _InCall:
    """``fn`` run where the executor runs it, with ``current_call()`` describing the engine's
    call there (a simulated service reads the item's index and attempt from it). One per
    relay, so an executor that caches a callable's pickle (Dask) pickles it once."""

    __slots__ = ("fn", "timed")

    def __init__(self, fn: Callable[[Any], Any], timed: bool) -> None:
        self.fn, self.timed = fn, timed

    def __call__(self, value: Any, where: tuple[Any, ...]) -> Any:
        index, key, name, stage, attempt, hedge = where
        prev = getattr(_local, "call", None)
        _local.call = _RemoteCall(_RemoteItem(index, key), stage, name, attempt, hedge, None)
        try:
            return _timed(self.fn, value) if self.timed else self.fn(value)
        finally:
            _local.call = prev


def _where() -> tuple[Any, ...]:
    """The relaying thread's call, as _InCall takes it (a key that may not pickle: None)."""
    call = _local.call
    item = call.item
    key = item.key if isinstance(item.key, _PLAIN_KEYS) else None
    return (item.index, key, call.name, call.stage, call.attempt, call.hedge)


class _Relay:
    """A stage's calls sent to an executor. A process pool that breaks (a worker died) is
    replaced, and the calls it lost fail with the retryable ``WorkerLost``."""

    def __init__(self, executor: concurrent.futures.Executor, fn: Callable[[Any], Any],
                 make: Callable[[], concurrent.futures.Executor] | None) -> None:
        self.executor = executor
        self.fn = fn
        self._make = make  # how to replace a broken pool we own (None: the caller's)
        self._lock = threading.Lock()
        # only executors on this host share our monotonic clock
        timed = isinstance(executor, concurrent.futures.ThreadPoolExecutor
                           | concurrent.futures.ProcessPoolExecutor)
        self._call = _InCall(fn, timed)

    def __call__(self, value: Any) -> Any:
        ex = self.executor
        try:
            return ex.submit(self._call, value, _where()).result()
        except concurrent.futures.BrokenExecutor as exc:
            self._replace(ex)
            raise WorkerLost(f"the worker running this call died ({type(exc).__name__})") from exc
        except Exception as exc:
            if is_worker_lost(exc):  # a Dask worker killed mid-call
                raise WorkerLost(f"the Dask worker running this call died "
                                 f"({type(exc).__name__})") from exc
            raise

    def _replace(self, broken: concurrent.futures.Executor) -> None:
        with self._lock:
            if self.executor is broken and self._make is not None:
                broken.shutdown(wait=False, cancel_futures=True)
                self.executor = self._make()

    def shutdown(self) -> None:
        if self._make is not None:
            self.executor.shutdown(wait=True)
