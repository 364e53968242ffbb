"""Retry policy: how many attempts, and how long to wait before the next one.

A small policy object the scheduler consults when a call fails (tenacity's habit): it never
sleeps itself, so the same policy runs on the live and the virtual clock.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["RetryPolicy", "unit_random"]

_MASK = (1 << 64) - 1


def unit_random(*parts: int) -> float:
    """A uniform number in [0, 1) that depends only on ``parts`` (splitmix64).

    Jitter drawn this way is the same for an item in a live and a virtual run, whatever the
    order in which threads happen to fail.
    """
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (p & _MASK)) * 0xBF58476D1CE4E5B9 & _MASK
        x = (x ^ (x >> 31)) * 0x94D049BB133111EB & _MASK
        x ^= x >> 29
    return (x >> 11) / float(1 << 53)


def _check_number(field: str, value: object, *, minimum: float, strict: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise TypeError(f"RetryPolicy.{field}: expected a number, got {value!r}")
    if value < minimum or (strict and value == minimum):
        op = ">" if strict else ">="
        raise ValueError(f"RetryPolicy.{field}: expected a number {op} {minimum}, got {value!r}")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Retry a failing stage call up to ``attempts`` calls in all.

    The wait before attempt *n+1* is exponential, ``backoff * 2**(n-1)`` capped at
    ``max_backoff``, with full jitter (uniform in [0, that]) when ``jitter`` is true. An
    exception with a numeric ``retry_after`` attribute (an HTTP 429's ``Retry-After``) makes the
    wait at least that long. Only exceptions that are instances of ``retry_on`` are retried; the
    others fail the item at once. A retry goes back to the end of the stage's queue, through its
    concurrency limit and rate limit like any call.
    """

    attempts: int = 3
    backoff: float = 0.5
    max_backoff: float = 30.0
    jitter: bool = True
    retry_on: tuple[type[BaseException], ...] = (Exception,)

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int):
            raise TypeError(f"RetryPolicy.attempts: expected an int >= 1, got {self.attempts!r}")
        if self.attempts < 1:
            raise ValueError(f"RetryPolicy.attempts: expected an int >= 1, got {self.attempts!r}")
        _check_number("backoff", self.backoff, minimum=0)
        _check_number("max_backoff", self.max_backoff, minimum=0)
        if isinstance(self.retry_on, type):
            object.__setattr__(self, "retry_on", (self.retry_on,))
        if not (
            isinstance(self.retry_on, tuple)
            and all(isinstance(t, type) and issubclass(t, BaseException) for t in self.retry_on)
        ):
            raise TypeError(
                f"RetryPolicy.retry_on: expected a tuple of exception types, got {self.retry_on!r}"
            )

    def should_retry(self, error: BaseException, attempt: int) -> bool:
        """Whether a call that raised ``error`` on attempt ``attempt`` (1-based) is retried."""
        return attempt < self.attempts and isinstance(error, self.retry_on)

    def delay(self, error: BaseException, attempt: int, u: float = 1.0) -> float:
        """Seconds to wait after attempt ``attempt`` failed; ``u`` in [0, 1) is the jitter draw."""
        base = min(self.max_backoff, self.backoff * 2.0 ** (attempt - 1))
        wait = base * u if self.jitter else base
        hint = getattr(error, "retry_after", None)
        if isinstance(hint, int | float) and not isinstance(hint, bool) and hint > wait:
            wait = float(hint)
        return wait
