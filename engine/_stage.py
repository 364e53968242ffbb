"""A stage: a named function, its concurrency limit and the policies that govern its calls."""
from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from ._ratelimit import RateLimit
from ._retry import RetryPolicy

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
        c = self.concurrency
        if isinstance(c, bool) or not isinstance(c, int):
            raise TypeError(f"{where}: concurrency: expected an int >= 1, got {c!r}")
        if c < 1:
            raise ValueError(f"{where}: concurrency: expected an int >= 1, got {c!r}")
        if self.retry is not None and not isinstance(self.retry, RetryPolicy):
            raise TypeError(f"{where}: retry: expected a RetryPolicy or None, got {self.retry!r}")
        if self.rate_limit is not None and not isinstance(self.rate_limit, RateLimit):
            raise TypeError(
                f"{where}: rate_limit: expected a RateLimit or None, got {self.rate_limit!r}"
            )
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
            if ex not in (None, "thread"):
                raise ValueError(
                    f"{where}: init: only thread stages take init; give a process pool or "
                    "executor its own initializer instead"
                )
