"""Worker -> dispatcher messages on a live backend's completion queue (the thread stages'
worker loops, the event-loop thread of async stages, and the process backend's reader)."""
from __future__ import annotations

from typing import Any, NamedTuple

from ._core import _Call
from ._errors import StageInitError

__all__ = ["_Done", "_InitFailed"]


class _Done(NamedTuple):
    """Worker -> dispatcher: a call ended (``ok=None``: it was not started, the run is
    cancelled). ``result`` is the return value, or the exception when ``ok`` is False."""

    call: _Call
    start: float
    end: float
    ok: bool | None
    result: Any


class _InitFailed(NamedTuple):
    """Worker -> dispatcher: the stage's ``init`` raised in this worker."""

    error: StageInitError
