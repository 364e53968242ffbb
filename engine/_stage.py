"""A stage: a named function, its concurrency limit and the policies that govern its calls."""
from __future__ import annotations

import concurrent.futures
import inspect
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from ._ratelimit import RateLimit
from ._retry import RetryPolicy
from ._validate import check_int, check_type

__all__ = ["Stage"]

ExecutorSpec = None | Literal["thread", "process"] | concurrent.futures.Executor


@dataclass(frozen=True, slots=True)
class Stage:
    """One step of a per-item pipeline.

    ``fn(value) -> value`` gets what the previous stage returned (the item itself for the first
    stage). At no instant do more than ``concurrency`` calls of this stage run, whatever the
    strategy. ``retry`` retries failing calls; ``rate_limit`` spaces them out.

    ``executor`` says where calls run: ``None``/``"thread"`` (default: long-lived worker threads,
    one per slot), ``"process"`` (a ``ProcessPoolExecutor`` of ``concurrency`` workers for
    CPU-bound stages; ``fn`` and values must pickle) or any ``concurrent.futures.Executor``
    (e.g. Dask's ``Client.get_executor()``), which the caller owns and shuts down.

    ``init``, for thread stages, builds a per-worker resource once (a ``requests.Session``, a
    client); ``fn`` is then called as ``fn(value, resource)`` and ``resource.close()`` (if it
    has one) is called when the run ends.
    """

    name: str
    fn: Callable[..., Any]
    concurrency: int = 1
    retry: RetryPolicy | None = None
    rate_limit: RateLimit | None = None
    executor: ExecutorSpec = None
    init: Callable[[], Any] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"Stage.name: expected a non-empty string, got {self.name!r}")
        where = f"Stage {self.name!r}"
        if not callable(self.fn):
            raise TypeError(f"{where}: fn: expected a callable, got {self.fn!r}")
        if _is_async(self.fn):
            raise TypeError(f"{where}: fn: {self.fn!r} is an async function; stage functions "
                            "must be plain functions (fn(value) -> value)")
        check_int(f"{where}: concurrency", self.concurrency)
        check_type(f"{where}: retry", self.retry, RetryPolicy, "a RetryPolicy", optional=True)
        check_type(f"{where}: rate_limit", self.rate_limit, RateLimit, "a RateLimit",
                   optional=True)
        ex = self.executor
        if not (ex is None or ex in ("thread", "process")
                or isinstance(ex, concurrent.futures.Executor)):
            raise TypeError(
                f"{where}: executor: expected None, 'thread', 'process' or a "
                f"concurrent.futures.Executor, got {ex!r}"
            )
        if self.init is not None:
            if not callable(self.init):
                raise TypeError(f"{where}: init: expected a callable, got {self.init!r}")
            if _is_async(self.init):
                raise TypeError(f"{where}: init: {self.init!r} is an async function; expected "
                                "a plain function")
            if ex not in (None, "thread"):
                raise ValueError(
                    f"{where}: init: only thread stages take init; give a process pool or "
                    "executor its own initializer instead"
                )
        if ex == "process":
            _check_picklable(where, self.fn)


def _is_async(fn: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None))  # noqa: B004 -- a callable object's async __call__


def _check_picklable(where: str, fn: Callable[..., Any]) -> None:
    """A process pool sends ``fn`` to its workers by pickling it: a lambda or a local function
    would fail every call, so refuse it before any work."""
    try:
        pickle.dumps(fn)
    except Exception as exc:
        raise ValueError(
            f"{where}: fn: executor='process' needs a function that pickles (defined at module "
            f"level), got {fn!r} ({type(exc).__name__}: {exc})") from None
