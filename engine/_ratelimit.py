"""Per-stage rate limit: a token bucket the stage's slots consult before each call."""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass

__all__ = ["RateLimit"]


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most ``rate`` calls per second on average, bursts of up to ``burst`` calls.

    ``RateLimit.per_minute(500)`` reads like an API's documentation. The limit is enforced where
    a call starts: a call that would exceed it waits, holding its concurrency slot, until a
    token is due; calls keep their queue order.
    """

    rate: float
    burst: int = 1

    def __post_init__(self) -> None:
        r = self.rate
        if isinstance(r, bool) or not isinstance(r, int | float) or math.isnan(r) or r <= 0:
            raise ValueError(f"RateLimit.rate: expected calls per second > 0, got {r!r}")
        if isinstance(self.burst, bool) or not isinstance(self.burst, int) or self.burst < 1:
            raise ValueError(f"RateLimit.burst: expected an int >= 1, got {self.burst!r}")

    @classmethod
    def per_minute(cls, calls: float, burst: int = 1) -> RateLimit:
        return cls(calls / 60.0, burst)

    def bucket(self, now: float) -> TokenBucket:
        """A fresh bucket (full) for one run, starting at engine time ``now``."""
        return TokenBucket(self.rate, self.burst, now)


class TokenBucket:
    """The run-time state of a :class:`RateLimit`. Thread-safe."""

    __slots__ = ("_burst", "_last", "_lock", "_rate", "_tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._last = now
        self._lock = threading.Lock()

    def reserve(self, now: float) -> float:
        """Take a token; return the time at which the call may start (``>= now``).

        Tokens may go negative: each reservation queues behind the previous ones.
        """
        with self._lock:
            if now > self._last:
                self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
                self._last = now
            self._tokens -= 1.0
            if self._tokens >= 0.0:
                return now
            return self._last + (-self._tokens) / self._rate
