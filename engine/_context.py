"""What a stage call can know about itself, and what a simulated stage tells the virtual clock.

Stage functions are plain ``fn(value) -> value``. Two small hooks let simulators (and any user
code that wants them) see more without changing that signature:

* ``current_call()`` -- inside a stage call run by the engine on a thread, the item's index and
  key, the stage and the attempt number (1-based). It is a thread-local read: no locks, no I/O.
* ``Simulated`` / ``SupportsSimulate`` -- on the virtual clock (``clock="virtual"``) the engine
  never calls the stage; it calls ``stage_fn.simulate(call, value)`` and gets back how long the
  call takes (in virtual seconds) and what it returns or raises at its end.
"""
from __future__ import annotations

import threading
from collections.abc import Hashable
from typing import Any, NamedTuple, Protocol, runtime_checkable

__all__ = ["CallInfo", "Simulated", "SupportsSimulate", "current_call"]


class CallInfo(NamedTuple):
    """One call of one stage for one item (a named tuple: one is built per simulated call)."""

    index: int  # type: ignore[assignment]  # the item's position in the input (0-based)
    key: Hashable  #: the item's key (``key(item)``, default: its position)
    stage: str  #: the stage's name
    stage_index: int  #: the stage's position in the pipeline (0-based)
    attempt: int  #: 1 for the first call, 2 for the first retry, ...


class Simulated(NamedTuple):
    """A simulated call's outcome: it takes ``duration`` seconds, then returns ``value``
    or, when ``error`` is not None, raises ``error``."""

    duration: float
    value: Any = None
    error: BaseException | None = None


@runtime_checkable
class SupportsSimulate(Protocol):
    """A stage callable that can also run on the virtual clock."""

    def simulate(self, call: CallInfo, value: Any) -> Simulated: ...


_local = threading.local()


def current_call() -> CallInfo:
    """The call the current thread is running for the engine.

    Raises ``RuntimeError`` outside a stage call (or in a stage running on a process pool or
    another executor, where the call runs elsewhere).
    """
    info = getattr(_local, "call", None)
    if info is None:
        raise RuntimeError("current_call() is only available inside a stage call on a thread")
    if not isinstance(info, CallInfo):  # the worker stores a cheap tuple; build the record lazily
        info = CallInfo._make(info)
    return info


def checkpoint() -> None:
    """A Python-level no-op. Compiled loops that may run long without calling any Python code
    (the virtual clock) call it now and then: entering it lets the interpreter run pending
    signal handlers, so Ctrl-C interrupts them."""
