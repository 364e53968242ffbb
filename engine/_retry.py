"""Retry policy: how many attempts, and how long to wait before the next one.

A small policy object the scheduler consults when a call fails (tenacity's habit): it never
sleeps itself, so the same policy runs on the live and the virtual clock.
"""
from __future__ import annotations

from dataclasses import dataclass

from ._errors import retry_after_of
from ._validate import check_bool, check_int, check_number

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


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Retry a failing stage call up to ``attempts`` calls in all.

    The wait before attempt *n+1* is exponential, ``backoff * 2**(n-1)`` capped at
    ``max_backoff``, with full jitter (uniform in [0, that]) when ``jitter`` is true. An
    exception with a ``retry_after`` attribute (an HTTP 429's ``Retry-After``: seconds as a
    number or text, or an HTTP date) makes the wait at least that long, but ``max_backoff``
    caps every delay, ``retry_after`` included (a hint of a day is not worth waiting for).
    Only exceptions that are instances of ``retry_on`` are retried; the others fail the item
    at once (a ``WorkerLost`` call is retried regardless: its worker died, not the call).
    A retry goes back through the stage's concurrency limit and rate limit like any call,
    taking the next free slot ahead of first attempts waiting there (the item's second
    chance, not new work: the same rule as a hedge's).
    """

    attempts: int = 3
    backoff: float = 0.5
    max_backoff: float = 30.0
    jitter: bool = True
    retry_on: tuple[type[BaseException], ...] = (Exception,)

    def __post_init__(self) -> None:
        check_int("RetryPolicy.attempts", self.attempts)
        check_number("RetryPolicy.backoff", self.backoff)
        check_number("RetryPolicy.max_backoff", self.max_backoff)
        if self.max_backoff < self.backoff:
            raise ValueError(f"RetryPolicy.max_backoff: expected a number >= backoff "
                             f"({self.backoff!r}), got {self.max_backoff!r}")
        check_bool("RetryPolicy.jitter", self.jitter)
        if isinstance(self.retry_on, type):
            object.__setattr__(self, "retry_on", (self.retry_on,))
        if not (
            isinstance(self.retry_on, tuple) and self.retry_on
            and all(isinstance(t, type) and issubclass(t, BaseException) for t in self.retry_on)
        ):
            raise TypeError(
                f"RetryPolicy.retry_on: expected a tuple of exception types, got {self.retry_on!r}"
            )

    def should_retry(self, error: BaseException, attempt: int) -> bool:
        """Whether a call that raised ``error`` on attempt ``attempt`` (1-based) is retried."""
        return attempt < self.attempts and isinstance(error, self.retry_on)

    def delay(self, error: BaseException, attempt: int, u: float = 1.0) -> float:
        """Seconds to wait after attempt ``attempt`` failed; ``u`` in [0, 1) is the jitter draw.

        Never raises and never exceeds ``max_backoff``, whatever ``error.retry_after`` says.
        """
        cap = self.max_backoff
        exp = min(attempt - 1, 1000)  # 2.0 ** 1024 overflows; the cap applies long before
        base = min(cap, self.backoff * 2.0 ** exp)
        wait = base * u if self.jitter else base
        hint = retry_after_of(error)
        if hint is not None and hint > wait:
            wait = min(hint, cap)
        return wait
