"""Per-stage rate limit: a token bucket the scheduler consults before it starts a call."""
from __future__ import annotations

from dataclasses import dataclass

from ._validate import check_int, check_number

__all__ = ["RateLimit"]


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most ``rate`` calls per second on average, bursts of up to ``burst`` calls
    (default 1: calls evenly spaced, none back to back).

    ``RateLimit.per_minute(500)`` reads like an API's documentation. The limit is enforced where
    a call starts: the scheduler starts a call only when a token is there, and otherwise wakes
    when one is due (the call keeps its place in the stage's queue; no thread sleeps, and a
    cancel drops the waiting calls at once).
    """

    rate: float
    burst: int = 1

    def __post_init__(self) -> None:
        check_number("RateLimit.rate", self.rate, strict=True)
        check_int("RateLimit.burst", self.burst)

    @classmethod
    def per_minute(cls, calls: float, burst: int = 1) -> RateLimit:
        check_number("RateLimit.per_minute(calls)", calls, strict=True)
        return cls(calls / 60.0, burst)

    def bucket(self, now: float) -> TokenBucket:
        """A fresh bucket (full) for one run, starting at engine time ``now``."""
        return TokenBucket(self.rate, self.burst, now)


class TokenBucket:
    """The run-time state of a :class:`RateLimit` (used by the dispatcher thread only)."""

    __slots__ = ("_burst", "_last", "_rate", "_tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._last = now

    def take(self, now: float) -> float:
        """Take a token and return 0.0, or take nothing and return the seconds until one is
        due."""
        if now > self._last:
            self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
            self._last = now
        if self._tokens >= 1.0 - 1e-9:
            self._tokens -= 1.0
            return 0.0
        return max((1.0 - self._tokens) / self._rate, 1e-9)

    def give_back(self) -> None:
        """Return the token just taken (another gate refused the call)."""
        self._tokens = min(self._burst, self._tokens + 1.0)
