"""What a stage call can know about itself, and what a simulated stage tells the virtual clock.

Stage functions are plain ``fn(value) -> value``. Two small hooks let simulators (and any user
code that wants them) see more without changing that signature:

* ``current_call()`` -- inside a stage call run by the engine (on a worker thread, or in a
  coroutine of an async stage), the item's index and key, the stage, the attempt number
  (1-based), whether it is a hedge, ``charge(**units)`` to report what the call actually cost
  its stage's budget, and ``cancelled`` (True once its result will be discarded: a hedged twin
  won, so it may stop early).
* ``Simulated`` / ``SupportsSimulate`` -- on the virtual clock (``clock="virtual"``) the engine
  never calls the stage; it calls ``stage_fn.simulate(call, value, now=t)`` and gets back how
  long the call takes (in virtual seconds) and what it returns or raises at its end.
"""
from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Hashable, Mapping
from typing import Any, NamedTuple, Protocol, runtime_checkable

__all__ = ["CallInfo", "CurrentCall", "Simulated", "SupportsSimulate", "current_call"]


class CallInfo(NamedTuple):
    """One call of one stage for one item."""

    index: int  # type: ignore[assignment]  # the item's position in the input (0-based)
    key: Hashable  #: the item's key (``key(item)``, default: its position)
    stage: str  #: the stage's name
    stage_index: int  #: the stage's position in the pipeline (0-based)
    attempt: int  #: 1 for the first call, 2 for the first retry, ...
    hedge: bool = False  #: a hedged duplicate of attempt ``attempt`` (DESIGN §10)


class CurrentCall(CallInfo):
    """``current_call()``'s answer: the :class:`CallInfo` of the running call, plus what the
    call may tell the engine."""

    def charge(self, **units: float) -> None:
        """Report the call's actual cost (e.g. ``charge(tokens=812)``), which replaces the
        estimate its stage's budget reserved. Later charges of a call add up."""
        for unit, amount in units.items():
            if isinstance(amount, bool) or not isinstance(amount, int | float) or amount < 0:
                raise ValueError(f"charge({unit}=...): expected a number >= 0, got {amount!r}")
        call = self.__dict__["_call"]
        charged = call.charged
        if charged is None:
            charged = call.charged = {}
        for unit, amount in units.items():
            charged[unit] = charged.get(unit, 0.0) + float(amount)

    def sleep(self, seconds: float) -> bool:
        """``time.sleep(seconds)``, cut short when the engine discards this call (its hedged
        twin won); returns True if it was cut short. It blocks: in a coroutine (an async
        stage) use :meth:`asleep`."""
        event = self.__dict__["_call"].event
        if event is None:
            time.sleep(seconds)
            return False
        return bool(event.wait(seconds))

    async def asleep(self, seconds: float) -> bool:
        """``await asyncio.sleep(seconds)``, cut short when the engine discards this call (its
        hedged twin won); returns True if it was cut short. For async stages."""
        return await asleep(seconds, self.__dict__["_call"])

    @property
    def cancelled(self) -> bool:
        """True once the engine will discard this call's result (its hedged twin won): the
        call may stop early; its return value or error is ignored."""
        return bool(self.__dict__["_call"].lost)


class Simulated(NamedTuple):
    """A simulated call's outcome: it takes ``duration`` seconds, then returns ``value``
    or, when ``error`` is not None, raises ``error``; ``cost`` is what it actually charged its
    stage's budget (e.g. ``{"tokens": 812}``), when known."""

    duration: float
    value: Any = None
    error: BaseException | None = None
    cost: Mapping[str, float] | None = None


@runtime_checkable
class SupportsSimulate(Protocol):
    """A stage callable that can also run on the virtual clock: ``now`` is the virtual time at
    which the call starts (calls are simulated in nondecreasing ``now`` order)."""

    def simulate(self, call: CallInfo, value: Any, *, now: float) -> Simulated: ...


_local = threading.local()
_async_call: contextvars.ContextVar[Any] = contextvars.ContextVar("conveyor_call", default=None)


def current_call() -> CurrentCall:
    """The call the current thread (or coroutine) is running for the engine.

    Raises ``RuntimeError`` outside a stage call. In a call on a process pool or a caller's
    executor (a Dask worker) it describes the call (index, key, stage, attempt); ``charge()``
    there is not carried back, and ``cancelled`` stays False.
    """
    call = _async_call.get()
    if call is None:
        call = getattr(_local, "call", None)
    if call is None:
        raise RuntimeError("current_call() is only available inside a stage call run by the "
                           "engine (threads or async stages)")
    item = call.item
    info = CurrentCall(item.index, item.key, call.name, call.stage, call.attempt, call.hedge)
    info.__dict__["_call"] = call
    return info


def checkpoint() -> None:
    """A Python-level no-op. Loops that may run long without calling any Python code (the
    virtual clock, if compiled) call it now and then so that Ctrl-C interrupts them."""


# Calls sleeping in asleep(), by call: only ever touched on the call's own loop thread.
_sleepers: dict[Any, Any] = {}  # call -> its asyncio.Future[bool]


async def asleep(seconds: float, call: Any = None) -> bool:
    """``await asyncio.sleep(seconds)``, cut short when the engine discards this call (its
    hedged twin won); returns True if it was cut short. ``call``: the running call (default:
    the one this coroutine runs for)."""
    if call is None:
        call = _async_call.get()
        if call is None:
            raise RuntimeError("asleep() is only available inside an async stage call run by "
                               "the engine")
    else:
        # a CurrentCall (its record in __dict__), or the engine's own record (slots)
        call = getattr(call, "__dict__", {}).get("_call", call)
    import asyncio  # only in coroutines: a thread-only run never imports it

    event = call.event
    if event is None:  # not hedged: nothing can cut it short
        await asyncio.sleep(seconds)
        return False
    if event.is_set():
        return True
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[bool] = loop.create_future()
    _sleepers[call] = fut
    handle = loop.call_later(max(0.0, seconds), _settle, fut, False)
    try:
        return await fut
    finally:
        handle.cancel()
        if _sleepers.get(call) is fut:
            del _sleepers[call]


def _settle(fut: Any, value: bool) -> None:
    if not fut.done():
        fut.set_result(value)


def _wake(call: Any) -> None:
    """On the loop: ``call`` was discarded; end its asleep() now."""
    fut = _sleepers.pop(call, None)
    if fut is not None:
        _settle(fut, True)


# -- a call's context where it runs elsewhere ------------------------------------------------
class _RemoteItem:
    __slots__ = ("index", "key")

    def __init__(self, index: int, key: Any) -> None:
        self.index, self.key = index, key


class _RemoteCall:
    """What ``current_call()`` reads where a call runs away from the engine's own threads: a
    ``processes=N`` child, a process pool or a caller's executor (a Dask worker)."""

    __slots__ = ("attempt", "charged", "event", "hedge", "item", "lost", "name", "stage")

    def __init__(self, item: _RemoteItem, stage: int, name: str, attempt: int, hedge: bool,
                 event: threading.Event | None) -> None:
        self.item, self.stage, self.name = item, stage, name
        self.attempt, self.hedge = attempt, hedge
        self.charged: dict[str, float] | None = None
        self.lost = False
        self.event = event
