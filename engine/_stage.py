"""A stage: a named function, its concurrency limit and the policies that govern its calls."""
from __future__ import annotations

import concurrent.futures
import inspect
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ._adaptive import Adaptive
from ._budget import Budget
from ._dask import check_executor
from ._hedge import Hedge
from ._ledger import Codec, JsonCodec
from ._ratelimit import RateLimit
from ._retry import RetryPolicy
from ._validate import check_bool, check_int, check_type

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

    ``fn`` may be ``async def`` (and ``init`` too, e.g. an ``AsyncOpenAI`` client): its calls
    run as coroutines on one event-loop thread owned by the run, up to ``concurrency`` at
    once, under the same scheduler; ``init`` then runs once per stage per run and
    ``aclose()``/``close()`` is awaited at the end.

    Flow control (DESIGN §9): ``concurrency=Adaptive(initial, max=...)`` lets the limit move
    (AIMD on overload signals); ``budget`` (a shared :class:`~engine.Budget`) is reserved
    before each call -- ``cost(value)`` is the estimate (``requests`` is always 1) -- and
    settled with the actual cost (``current_call().charge(...)`` or the result's
    ``usage.total_tokens``); an error carrying ``retry_after`` pauses the whole budget.

    ``idempotent=True`` declares the stage safe to call twice for one item; only then may it
    ``hedge`` (DESIGN §10). ``checkpoint=True`` records the stage's output in the run's ledger
    (``codec``, default JSON) once the call succeeds, so a later run restores it instead of
    calling again (DESIGN §11).
    """

    name: str
    fn: Callable[..., Any]
    concurrency: int | Adaptive = 1
    retry: RetryPolicy | None = None
    rate_limit: RateLimit | None = None
    executor: ExecutorSpec = None
    init: Callable[[], Any] | None = None
    budget: Budget | None = None
    cost: Callable[[Any], Mapping[str, float]] | None = None
    idempotent: bool = False
    hedge: Hedge | None = None
    checkpoint: bool = False
    codec: Codec | None = None

    @property
    def is_async(self) -> bool:
        """An ``async def`` stage: its calls are coroutines on the run's event-loop thread."""
        return _is_async(self.fn)

    @property
    def max_concurrency(self) -> int:
        """The most calls the stage may ever run at once (an adaptive stage's ``max``)."""
        c = self.concurrency
        return c.max if isinstance(c, Adaptive) else c

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"Stage.name: expected a non-empty string, got {self.name!r}")
        where = f"Stage {self.name!r}"
        if not callable(self.fn):
            raise TypeError(f"{where}: fn: expected a callable, got {self.fn!r}")
        if not isinstance(self.concurrency, Adaptive):
            check_int(f"{where}: concurrency", self.concurrency)
        check_type(f"{where}: budget", self.budget, Budget, "a Budget", optional=True)
        if self.cost is not None:
            if not callable(self.cost):
                raise TypeError(f"{where}: cost: expected a callable or None, got {self.cost!r}")
            if self.budget is None:
                raise ValueError(f"{where}: cost: a cost estimate needs a budget to reserve it "
                                 "from (budget=Budget(...))")
        check_bool(f"{where}: idempotent", self.idempotent)
        check_type(f"{where}: hedge", self.hedge, Hedge, "a Hedge", optional=True)
        if self.hedge is not None and not self.idempotent:
            raise ValueError(f"{where}: hedge: only an idempotent stage may be hedged (a hedge "
                             "calls it twice for one item); declare idempotent=True if that "
                             "is safe")
        check_bool(f"{where}: checkpoint", self.checkpoint)
        if self.codec is not None:
            if not (callable(getattr(self.codec, "encode", None))
                    and callable(getattr(self.codec, "decode", None))):
                raise TypeError(f"{where}: codec: expected an object with encode(value) -> str "
                                f"and decode(text), got {self.codec!r}")
            if not self.checkpoint:
                raise ValueError(f"{where}: codec: only a checkpointed stage (checkpoint=True) "
                                 "uses a codec")
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
        check_executor(where, ex)  # a Dask executor that deduplicates calls is refused
        is_async = _is_async(self.fn)
        if is_async and ex not in (None, "thread"):
            raise ValueError(
                f"{where}: fn: {self.fn!r} is an async function: it runs on the run's event "
                f"loop, not on executor={ex!r} (leave executor unset)")
        if self.init is not None:
            if not callable(self.init):
                raise TypeError(f"{where}: init: expected a callable, got {self.init!r}")
            if _is_async(self.init) and not is_async:
                raise ValueError(f"{where}: init: {self.init!r} is an async function, which "
                                 "only an async stage (async def fn) takes: its resource lives "
                                 "on the run's event loop")
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


DEFAULT_CODEC = JsonCodec()
