"""The two kinds of failure an adapter reports, so one RetryPolicy can tell them apart.

* ``TransientError`` -- worth retrying: HTTP 429 and 5xx, timeouts, refused or dropped
  connections, a database that went away. It carries ``retry_after`` (seconds, or None) taken
  from the server's ``Retry-After`` header; the engine's ``RetryPolicy`` waits at least that long.
* ``PermanentError`` -- retrying cannot help: other HTTP 4xx, a response that is not the JSON we
  asked for, a value the database rejects. The item should fail at once, with the reason.

The engine's ``RetryPolicy`` retries ``retry_on=(Exception,)`` by default, which would retry
permanent errors too. Give the adapters' stages ``RetryPolicy(retry_on=RETRYABLE)``::

    Stage("fetch", fetch, concurrency=50, retry=RetryPolicy(attempts=4, retry_on=RETRYABLE))

Every adapter turns the client library's own exceptions into one of these two (the original is
kept as ``__cause__``), so ``RETRYABLE`` is the whole list.
"""
from __future__ import annotations

from collections.abc import Mapping

from engine._errors import parse_retry_after as _parse_hint

__all__ = ["RETRYABLE", "AdapterError", "PermanentError", "TransientError", "parse_retry_after",
           "retry_after_from"]

#: the longest ``Retry-After`` honoured, seconds; a longer hint is clipped to this
MAX_RETRY_AFTER = 120.0


class AdapterError(Exception):
    """Base of the adapters' errors."""


class TransientError(AdapterError):
    """A failure worth retrying; ``retry_after`` is the server's hint in seconds, or None."""

    def __init__(self, message: str, *, retry_after: float | None = None,
                 status: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.status = status


class PermanentError(AdapterError):
    """A failure that a retry cannot fix: the item fails at once."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


#: ``RetryPolicy(retry_on=RETRYABLE)`` retries exactly the adapters' transient failures
RETRYABLE: tuple[type[BaseException], ...] = (TransientError,)


def parse_retry_after(value: str | None, *, scale: float = 1.0) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date), times ``scale``.

    None when absent or unparsable; never negative; clipped to ``MAX_RETRY_AFTER``. The parsing
    is the engine's (``engine._errors.parse_retry_after``, which reads any ``retry_after`` hint).
    """
    if not value:
        return None
    seconds = _parse_hint(value.strip())
    if seconds is None:
        try:  # a negative delta: "now" (the engine's reading says nothing for it)
            return 0.0 if float(value) < 0 else None
        except ValueError:
            return None
    return min(seconds, MAX_RETRY_AFTER) * scale


def retry_after_from(headers: Mapping[str, str], *, scale: float = 1.0) -> float | None:
    """The retry hint of a response: ``retry-after-ms`` (OpenAI's, millisecond precision)
    when present, else ``Retry-After``."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return parse_retry_after(str(float(ms) / 1000.0), scale=scale)
        except ValueError:
            pass
    return parse_retry_after(headers.get("retry-after"), scale=scale)


def truncate(text: str, limit: int = 300) -> str:
    """``text`` cut to ``limit`` characters, saying how much was cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... [{len(text) - limit} more chars]"
