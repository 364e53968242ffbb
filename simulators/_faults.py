"""Faults a simulated service injects, and the exceptions it raises.

* ``error_rate`` -- the share of calls that fail with ``TransientError`` after their latency;
* ``timeout`` -- a call whose latency exceeds it raises ``ServiceTimeout`` after ``timeout``;
* ``rate_limit`` -- a service-side token bucket (calls per second, ``burst`` deep); a call
  beyond it is refused at once with ``RateLimitError(retry_after=...)``;
* ``outages`` -- windows ``[t0, t1)`` (seconds since the run started) in which every call is
  refused at once with ``OutageError``.

All times are scenario seconds; the service scales them for live runs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Faults",
    "OutageError",
    "RateLimitError",
    "ServiceTimeout",
    "SimulatedFault",
    "TokenBucket",
    "TransientError",
    "parse_faults",
]


class SimulatedFault(Exception):
    """Base class of every fault a simulator injects."""


class TransientError(SimulatedFault):
    """A call that failed but would likely succeed if retried."""


class ServiceTimeout(SimulatedFault, TimeoutError):
    """The service did not answer within its timeout."""


class RateLimitError(SimulatedFault):
    """The service refused the call (HTTP 429).

    ``retry_after``: seconds until the service would accept a call. ``remaining`` and ``reset``
    (a ``Provider``'s refusals; empty otherwise): per limit dimension ("requests", "tokens"),
    what is left in the bucket and the seconds until it is full again, as OpenAI's
    ``x-ratelimit-remaining-*`` and ``x-ratelimit-reset-*`` headers say.
    """

    def __init__(
        self,
        message: str,
        retry_after: float,
        remaining: Mapping[str, float] | None = None,
        reset: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.remaining: dict[str, float] = dict(remaining or {})
        self.reset: dict[str, float] = dict(reset or {})

    def __reduce__(self) -> tuple[Any, ...]:  # keep the fields across pickling (process pools)
        return (type(self), (str(self), self.retry_after, self.remaining, self.reset))


class OutageError(SimulatedFault):
    """The service is down; ``until`` is when the outage window ends (scenario seconds)."""

    def __init__(self, message: str, until: float) -> None:
        super().__init__(message)
        self.until = until

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.until))


def _finite(value: Any, field_: str, *, low: float = 0.0, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{field_}: expected a number, got {value!r}")
    v = float(value)
    if math.isnan(v) or math.isinf(v):
        raise ValueError(f"{field_}: expected a finite number, got {value!r}")
    if (v <= low) if low_open else (v < low):
        raise ValueError(
            f"{field_}: expected a number {'>' if low_open else '>='} {low:g}, got {value!r}"
        )
    return v


@dataclass(frozen=True)
class Faults:
    """What goes wrong with a simulated service (all times in scenario seconds)."""

    error_rate: float = 0.0
    timeout: float | None = None
    rate_limit: float | None = None  #: calls per second accepted by the service
    outages: Sequence[tuple[float, float]] = field(default_factory=tuple)
    burst: int | None = None  #: token-bucket depth; default: one second's worth (>= 1)

    def __post_init__(self) -> None:
        rate = _finite(self.error_rate, "faults.error_rate")
        if rate > 1:
            raise ValueError(
                f"faults.error_rate: expected a number in [0, 1], got {self.error_rate!r}"
            )
        object.__setattr__(self, "error_rate", rate)
        if self.timeout is not None:
            object.__setattr__(
                self, "timeout", _finite(self.timeout, "faults.timeout", low_open=True)
            )
        if self.rate_limit is not None:
            object.__setattr__(
                self, "rate_limit", _finite(self.rate_limit, "faults.rate_limit", low_open=True)
            )
        if self.burst is not None:
            if isinstance(self.burst, bool) or not isinstance(self.burst, int) or self.burst < 1:
                raise ValueError(f"faults.burst: expected an integer >= 1, got {self.burst!r}")
            if self.rate_limit is None:
                raise ValueError("faults.burst: only meaningful with faults.rate_limit")
        object.__setattr__(self, "outages", _check_outages(self.outages))

    @property
    def effective_burst(self) -> int:
        if self.burst is not None:
            return self.burst
        return max(1, math.floor(self.rate_limit or 1.0))

    @property
    def time_dependent(self) -> bool:
        """True when outcomes depend on when a call starts (rate limit or outages)."""
        return self.rate_limit is not None or bool(self.outages)

    def outage_at(self, t: float) -> tuple[float, float] | None:
        for t0, t1 in self.outages:
            if t0 <= t < t1:
                return (t0, t1)
        return None


def _check_outages(outages: Iterable[Any]) -> tuple[tuple[float, float], ...]:
    if isinstance(outages, str | bytes) or not isinstance(outages, Iterable):
        raise ValueError(f"faults.outages: expected a list of [t0, t1] pairs, got {outages!r}")
    out: list[tuple[float, float]] = []
    for i, window in enumerate(outages):
        where = f"faults.outages[{i}]"
        if isinstance(window, str | bytes) or not isinstance(window, Sequence) or len(window) != 2:
            raise ValueError(f"{where}: expected a pair [t0, t1], got {window!r}")
        t0 = _finite(window[0], f"{where}[0]")
        t1 = _finite(window[1], f"{where}[1]")
        if t1 <= t0:
            raise ValueError(f"{where}[1]: expected a number > t0 ({t0!r}), got {window[1]!r}")
        out.append((t0, t1))
    return tuple(sorted(out))


_FAULT_KEYS = {
    "rate": "error_rate",
    "error_rate": "error_rate",
    "timeout": "timeout",
    "rate_limit": "rate_limit",
    "burst": "burst",
    "outages": "outages",
}


def parse_faults(spec: Mapping[str, Any] | None, *, where: str = "errors") -> Faults:
    """Build ``Faults`` from a scenario table such as ``{rate = 0.01, timeout = 5.0,
    rate_limit = 40, outages = [[100, 160]]}`` (``error_rate`` is accepted for ``rate``).
    Error messages name ``<where>.<field>``."""
    if spec is None:
        return Faults()
    if not isinstance(spec, Mapping):
        raise ValueError(f"{where}: expected a table/dict, got {spec!r}")
    kwargs: dict[str, Any] = {}
    for key, value in spec.items():
        if key not in _FAULT_KEYS:
            raise ValueError(f"{where}.{key}: unexpected key (allowed: {', '.join(_FAULT_KEYS)})")
        target = _FAULT_KEYS[key]
        if target in kwargs:
            raise ValueError(f"{where}.{key}: given twice (as 'rate' and 'error_rate')")
        kwargs[target] = value
    try:
        return Faults(**kwargs)
    except ValueError as exc:
        msg = str(exc)
        if msg.startswith("faults."):
            field_ = msg[len("faults.") :]
            if field_.startswith("error_rate") and "rate" in spec:
                field_ = "rate" + field_[len("error_rate") :]
            msg = f"{where}.{field_}"
        raise ValueError(msg) from None


class TokenBucket:
    """A token bucket on an external clock: ``rate`` tokens per second, ``burst`` deep, full at
    start. Not thread-safe: the owner holds a lock around ``acquire``."""

    __slots__ = ("_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._last: float | None = None

    def reset(self) -> None:
        self._tokens = float(self.burst)
        self._last = None

    def acquire(self, now: float) -> float:
        """Take a token at time ``now``: 0.0 if granted, else the seconds until one is due."""
        last = self._last
        if last is not None and now > last:
            self._tokens = min(float(self.burst), self._tokens + (now - last) * self.rate)
        if last is None or now > last:
            self._last = now
        # a client pacing at exactly `rate` arrives a rounding error early: not a violation
        if self._tokens >= 1.0 - 1e-9:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self.rate
