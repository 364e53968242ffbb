"""What the engine knows about Dask (``distributed``) without importing it.

* :func:`check_executor` -- a Dask ``ClientExecutor`` made with ``pure=True`` (Dask's default
  for ``client.get_executor()``) deduplicates identical calls: the same ``fn`` on an equal value
  runs once and every caller gets that one result (measured: 80 sleeps "ran" in 0.08 s). A
  pipeline stage must run every call, so such an executor is refused, naming the stage.
* :func:`is_worker_lost` -- the errors a Dask call ends with when the worker running it died:
  ``distributed.scheduler.KilledWorker`` (the task's workers died ``allowed-failures`` times)
  and ``distributed.comm.core.CommClosedError`` (the connection to it closed mid-call). The
  relay turns them into the retryable ``WorkerLost``.
"""
from __future__ import annotations

import concurrent.futures
from typing import Any

__all__ = ["check_executor", "is_dask_executor", "is_worker_lost"]

_LOST = frozenset({("distributed.scheduler", "KilledWorker"),
                   ("distributed.comm.core", "CommClosedError")})


def is_dask_executor(executor: Any) -> bool:
    """A ``distributed`` ``ClientExecutor`` (``client.get_executor(...)``)."""
    if not isinstance(executor, concurrent.futures.Executor):
        return False
    return any(c.__module__.partition(".")[0] == "distributed" and c.__name__ == "ClientExecutor"
               for c in type(executor).__mro__)


def check_executor(where: str, executor: Any) -> None:
    """Raise ValueError for a Dask executor that deduplicates calls (``pure`` not False).

    ``ClientExecutor`` keeps the keyword arguments it was made with in ``_kwargs`` and passes
    them to every ``client.submit``, whose ``pure`` defaults to True."""
    if not is_dask_executor(executor):
        return
    kwargs = getattr(executor, "_kwargs", None)
    pure = kwargs.get("pure", True) if isinstance(kwargs, dict) else True
    if pure is not False:
        raise ValueError(
            f"{where}: executor: a Dask executor with pure=True (Dask's default) runs identical "
            "calls once and hands every caller that one result; a stage must run every call: "
            "use client.get_executor(pure=False)")


def is_worker_lost(exc: BaseException) -> bool:
    """``exc`` says the Dask worker running the call died (retryable as ``WorkerLost``)."""
    return any((c.__module__, c.__name__) in _LOST for c in type(exc).__mro__)
