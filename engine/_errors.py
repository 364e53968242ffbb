"""Named errors of the engine, and reading an exception without trusting it.

Stage code raises whatever its clients raise. Reading such an exception (``str()``, a
``retry_after`` property) runs *their* code, which may itself raise (an API error formatting an
HTML body as JSON, a property reading a header that is missing): the helpers here never raise,
so no exception raised while handling a completion can leave an item unfinished.
"""
from __future__ import annotations

import email.utils
import math
import pickle
import time
import traceback as _tb
from typing import Any

__all__ = ["RemoteError", "StageInitError", "WorkerLost", "describe", "retry_after_of", "safe_str"]

TRACEBACK_LIMIT = 8192  # characters of formatted traceback kept per error (its tail)


class StageInitError(RuntimeError):
    """A stage's ``init`` raised: the run cannot use that stage. ``__cause__`` is the error."""

    def __init__(self, stage: str, cause: BaseException) -> None:
        super().__init__(f"Stage {stage!r}: init raised {type(cause).__name__}: "
                         f"{safe_str(cause)}")
        self.stage = stage
        self.__cause__ = cause

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.stage, self.__cause__))


class RemoteError(Exception):
    """Stands in for an exception raised in a worker process (``processes=N``, a process
    pool, a Dask worker) that does not survive pickling (or unpickling): a subclass of the
    same type name, with its message, ``retry_after`` hint and the worker's traceback as
    ``remote_traceback`` (and in its ``__cause__``), instead of breaking the pool. The item's
    error names the original type (``ErrorInfo.type`` / ``exc_type``)."""

    remote_type = ""
    remote_traceback = ""
    retry_after: float | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        cls = type(self)
        return (_rebuild_remote, (cls.__name__, cls.__module__, cls.__qualname__,
                                  safe_str(self), self.remote_traceback, self.retry_after))


_remote_types: dict[tuple[str, str, str], type[RemoteError]] = {}


def _rebuild_remote(name: str, module: str, qualname: str, message: str, tb: str,
                    retry_after: float | None) -> RemoteError:
    key = (name, module, qualname)
    cls = _remote_types.get(key)
    if cls is None:
        cls = _remote_types[key] = type(name, (RemoteError,), {
            "__module__": module, "__qualname__": qualname, "remote_type": f"{module}.{qualname}"})
    exc = cls(message)
    exc.remote_traceback = tb
    exc.retry_after = retry_after
    if tb:
        exc.__cause__ = _RemoteTraceback(tb)
    return exc


class _RemoteTraceback(Exception):
    """The traceback of the call in the child, as text (what concurrent.futures does)."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


def portable(exc: BaseException) -> BaseException:
    """``exc`` itself if it survives pickling as its own type, else a :class:`RemoteError`
    standing for it: what a worker process sends back for a call that raised."""
    try:
        if type(pickle.loads(pickle.dumps(exc))) is type(exc):
            return exc
    except Exception:
        pass
    return remote_error(exc)


def remote_error(exc: BaseException) -> RemoteError:
    """A :class:`RemoteError` standing for ``exc`` (its type name, message, hint, traceback):
    what a worker raises or sends instead of an exception that does not pickle."""
    name, message, qualified, tb = describe(exc)
    module, _, qual = qualified.rpartition(".")
    return _rebuild_remote(name, module or "builtins", qual or name, message, tb,
                           retry_after_of(exc))


class WorkerLost(RuntimeError):
    """The process running a call died before answering (``BrokenProcessPool``, a killed
    worker). Retryable: the call may not have run, or may have run and lost its result."""


def safe_str(exc: BaseException) -> str:
    """``str(exc)``, or a placeholder when formatting it raises."""
    try:
        return str(exc)
    except BaseException as inner:
        try:
            name = type(inner).__name__
        except BaseException:
            name = "an exception"
        return f"<str() of this {type(exc).__name__} raised {name}>"


def qualified_type(exc: BaseException) -> str:
    t = type(exc)
    module = getattr(t, "__module__", None) or ""
    qual = getattr(t, "__qualname__", t.__name__)
    return qual if module in ("builtins", "") else f"{module}.{qual}"


def format_traceback(exc: BaseException) -> str:
    """The formatted traceback (its last ``TRACEBACK_LIMIT`` characters), never raising."""
    try:
        text = "".join(_tb.format_exception(exc))
    except BaseException:
        text = f"{qualified_type(exc)}: {safe_str(exc)}\n"
    if len(text) > TRACEBACK_LIMIT:
        text = "...\n" + text[-TRACEBACK_LIMIT:]
    return text


def describe(exc: BaseException) -> tuple[str, str, str, str]:
    """(type name, message, module-qualified type, traceback) of ``exc``; never raises. A
    :class:`RemoteError` describes the exception it stands for."""
    if isinstance(exc, RemoteError):
        return (type(exc).__name__, safe_str(exc), exc.remote_type or qualified_type(exc),
                exc.remote_traceback)
    return (type(exc).__name__, safe_str(exc), qualified_type(exc), format_traceback(exc))


def parse_retry_after(hint: object, now: float | None = None) -> float | None:
    """Seconds from a ``retry_after`` hint: a number, the text of a number (``"0.2"``), or an
    HTTP date (``Retry-After: Wed, 21 Oct 2015 07:28:00 GMT``). None when it says nothing
    usable (missing, negative, NaN, unparseable); infinities are returned as such (the caller
    caps them)."""
    if hint is None or isinstance(hint, bool):
        return None
    if isinstance(hint, int | float):
        try:
            v = float(hint)
        except OverflowError:  # an int beyond any float: as long as can be (then capped)
            v = math.inf
    elif isinstance(hint, bytes | str):
        text = hint.decode("latin-1") if isinstance(hint, bytes) else hint
        text = text.strip()
        try:
            v = float(text)
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(text)
            except (TypeError, ValueError, IndexError, OverflowError):
                return None
            if when is None:
                return None
            v = when.timestamp() - (time.time() if now is None else now)
            v = max(v, 0.0)
    else:
        return None
    if math.isnan(v) or v < 0:
        return None
    return v


def retry_after_of(exc: BaseException) -> float | None:
    """``exc.retry_after`` in seconds, read without trusting it (a property that raises, or a
    value that is no number, says nothing)."""
    try:
        hint = getattr(exc, "retry_after", None)
    except BaseException:
        return None
    try:
        return parse_retry_after(hint)
    except BaseException:
        return None
