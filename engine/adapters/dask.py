"""Stages on a Dask cluster (``pip install conveyor[dask]``): per-worker resources.

A stage runs on Dask through ``Stage(..., executor=client.get_executor(pure=False))``: the
engine's scheduler stays in the calling process (limits, barriers, budgets, retries global) and
each call is one Dask task. ``pure=False`` is required (``pure=True``, Dask's default,
deduplicates identical calls; the engine refuses it). A call whose worker died is retried: Dask
reschedules a task whose worker died on another worker by itself, and when it gives up
(``KilledWorker``) or the connection closes mid-call (``CommClosedError``) the engine retries the
call as ``WorkerLost``.

Per-worker resources (the Dask counterpart of ``Stage(init=...)``, which only thread stages
take)::

    from engine.adapters.dask import worker_resource

    session = worker_resource(client, make_session, name="session")  # once per Dask worker
    Stage("fetch", session.bind(fetch), concurrency=50,
          executor=client.get_executor(pure=False))    # fetch(value, session_of_this_worker)
    ...
    session.close()   # optional: unregisters the plugin; each worker closes its resource

``worker_resource`` registers a ``distributed.WorkerPlugin`` named ``conveyor-<name>``: its
``setup`` runs ``init()`` on every worker (those running now, and any that joins later or is
restarted by its nanny), its ``teardown`` calls the resource's ``close()`` (if it has one) when
the worker closes or the plugin is unregistered. One resource per Dask worker, shared by that
worker's threads (``nthreads``): it must be thread-safe (a ``requests.Session`` or an openai
client is). ``init`` and ``fn`` must pickle (Dask uses cloudpickle: lambdas work too).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from distributed import Client, WorkerPlugin, get_worker

__all__ = ["WorkerResource", "worker_resource"]

_PREFIX = "conveyor-"


class _ResourcePlugin(WorkerPlugin):
    """Builds the resource on a worker; closes it when the worker closes."""

    idempotent = False  # registering the same name again replaces it (a new init)

    def __init__(self, init: Callable[[], Any]) -> None:
        self.init = init
        self.resource: Any = None
        self.built = False

    def setup(self, worker: Any) -> None:
        self.resource = self.init()
        self.built = True

    def teardown(self, worker: Any) -> None:
        close = getattr(self.resource, "close", None)
        self.resource, self.built = None, False
        if callable(close):
            with contextlib.suppress(Exception):
                close()


class _Bound:
    """``fn(value, resource)`` with this worker's resource: a stage's callable (it pickles
    when ``fn`` does)."""

    def __init__(self, fn: Callable[[Any, Any], Any], name: str) -> None:
        self.fn, self.name = fn, name

    def __call__(self, value: Any) -> Any:
        return self.fn(value, WorkerResource(self.name).get())

    def __repr__(self) -> str:
        return f"<{getattr(self.fn, '__qualname__', self.fn)!s} with Dask resource {self.name!r}>"


class WorkerResource:
    """A handle on a per-worker resource: picklable (it holds only its name)."""

    def __init__(self, name: str, client: Client | None = None) -> None:
        self.name = name
        self._client = client

    def get(self) -> Any:
        """This worker's resource (inside a Dask task)."""
        try:
            worker = get_worker()
        except ValueError:
            raise RuntimeError(f"Dask resource {self.name!r}: get() runs inside a Dask task "
                               "(on a worker)") from None
        plugin = worker.plugins.get(_PREFIX + self.name)
        if plugin is None or not getattr(plugin, "built", False):
            raise RuntimeError(f"Dask resource {self.name!r} is not registered on worker "
                               f"{worker.address}: make it with worker_resource(client, init, "
                               f"name={self.name!r})")
        return getattr(plugin, "resource", None)

    def bind(self, fn: Callable[[Any, Any], Any]) -> Callable[[Any], Any]:
        """A stage callable: ``value -> fn(value, this worker's resource)``."""
        if not callable(fn):
            raise TypeError(f"bind: expected a callable fn(value, resource), got {fn!r}")
        return _Bound(fn, self.name)

    def close(self) -> None:
        """Unregister the plugin: every worker closes its resource."""
        if self._client is not None:
            self._client.unregister_worker_plugin(_PREFIX + self.name)
            self._client = None

    def __getstate__(self) -> dict[str, Any]:
        return {"name": self.name, "_client": None}

    def __repr__(self) -> str:
        return f"WorkerResource({self.name!r})"


def worker_resource(client: Client, init: Callable[[], Any], *,
                    name: str | None = None) -> WorkerResource:
    """Build ``init()`` once on every Dask worker of ``client`` (and on workers that join
    later); returns its handle. ``name`` defaults to ``init``'s name."""
    if not callable(init):
        raise TypeError(f"worker_resource: init: expected a callable, got {init!r}")
    if name is None:
        name = getattr(init, "__name__", None) or type(init).__name__
    if not isinstance(name, str) or not name:
        raise TypeError(f"worker_resource: name: expected a non-empty string, got {name!r}")
    client.register_plugin(_ResourcePlugin(init), name=_PREFIX + name)
    return WorkerResource(name, client)
