"""``SimulatedService``: a stage callable that behaves like a remote service.

Live (``service(value)`` on an engine thread) it sleeps its latency times ``time_scale`` and
returns ``value`` unchanged or raises a fault; on the virtual clock the engine calls
``service.simulate(call, value, now=...)`` and gets the same duration (in scenario seconds) and
outcome without sleeping. Both read the per-item numbers from one block cache (see
``_sampling``), so an item's latency, error and timeout depend on (seed, name, index, attempt)
only.

Rate limits and outages depend on *when* a call starts, which only the caller knows:

* live, the time is scenario seconds since the service's first call (or ``start()``):
  ``(monotonic() - epoch) / time_scale``;
* virtual, the engine passes ``now=<virtual start time of the call>``; without it (``now=None``)
  rate limits and outages are not applied. ``simulate`` must see calls in nondecreasing ``now``
  order (the order a discrete-event scheduler starts them); a ``now`` earlier than the last one
  starts a new run (the rate-limit bucket refills), as when one service object is reused for
  several virtual runs. ``reset()`` does the same explicitly.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Final, final

from engine._context import CallInfo, Simulated, current_call

from ._distributions import Distribution, as_distribution
from ._faults import (
    Faults,
    OutageError,
    RateLimitError,
    ServiceTimeout,
    TokenBucket,
    TransientError,
)
from ._sampling import BLOCK_MASK, BLOCK_SHIFT, BlockCache, check_seed_and_scale, draw_block
from ._virtual import VirtualCalls

__all__ = ["SimulatedService"]

_MASK: Final = BLOCK_MASK
OK, ERROR, TIMEOUT = 0, 1, 2
_KINDS = ("ok", "error", "timeout")

# (durations, outcome codes, raw latencies) for one block of item indices
_Block = tuple[list[float], list[int], list[float]]


@final
class SimulatedService:
    """A simulated remote service usable as an engine stage function.

    ``name`` seeds the per-item numbers (use the stage's name, so that two stages with the
    same spec do not see the same latencies); ``latency`` is a spec dict, a ``Distribution``
    or seconds; all times (latency, ``faults``) are scenario seconds, slept times
    ``time_scale`` in live calls. ``retry_after`` of a live ``RateLimitError`` is in real
    seconds (scenario seconds times ``time_scale``), in ``simulate()`` scenario seconds.

    Outside an engine stage call (no ``current_call()``), live calls number themselves 0, 1,
    2, ... in call order, each as attempt 1.
    """

    def __init__(
        self,
        name: str,
        latency: Distribution | Mapping[str, Any] | float | None,
        faults: Faults | None = None,
        seed: int = 0,
        time_scale: float = 1.0,
        *,
        max_blocks: int = 16,
        sleep: Callable[[float], Any] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"name: expected a non-empty string, got {name!r}")
        check_seed_and_scale(seed, time_scale)
        faults = faults if faults is not None else Faults()
        if not isinstance(faults, Faults):
            raise ValueError(f"faults: expected a Faults, got {faults!r}")
        if time_scale == 0 and faults.time_dependent:
            raise ValueError(
                "time_scale: must be > 0 with a rate limit or outages (they need a clock)"
            )
        self.name = name
        self.latency = as_distribution(latency)
        self.faults = faults
        self.seed = seed
        self.time_scale = float(time_scale)
        self._sleep = sleep
        self._clock = clock
        self._timeout = faults.timeout
        self._error_rate = faults.error_rate
        self._time_dependent = faults.time_dependent
        self._cache: BlockCache[_Block] = BlockCache(self._make_block, max_blocks)
        self._blocks = self._cache._blocks  # read directly on the hot path
        self._lock = threading.Lock()
        self._bucket = (
            TokenBucket(faults.rate_limit, faults.effective_burst) if faults.rate_limit else None
        )
        self._epoch: float | None = None
        self._vlast = -math.inf
        self._counter = itertools.count()
        self._virtual = VirtualCalls(self)
        self.simulate = self._virtual.simulate  # type: ignore[method-assign]  # the per-call path, bound once

    def __repr__(self) -> str:
        return (
            f"SimulatedService({self.name!r}, {self.latency!r}, {self.faults!r}, "
            f"seed={self.seed}, time_scale={self.time_scale})"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # picklable for process pools: rebuilt from its parameters (the cache is rebuilt lazily)
        return (
            SimulatedService,
            (self.name, self.latency, self.faults, self.seed, self.time_scale),
        )

    # ------------------------------------------------------------------ per-item numbers
    def _make_block(self, attempt: int, block: int) -> _Block:
        lat, u = draw_block(self.latency, self.seed, self.name, attempt, block)
        lats: list[float] = lat.tolist()
        codes = (u < self._error_rate).astype(int)  # ERROR where the fault uniform is low
        if self._timeout is not None:
            late = lat > self._timeout
            codes[late] = TIMEOUT  # a call that times out never gets to fail otherwise
            durations: list[float] = lat.clip(max=self._timeout).tolist()
        else:
            durations = lats
        return durations, codes.tolist(), lats

    def _block(self, index: int, attempt: int) -> _Block:
        if index < 0 or attempt < 1:
            raise ValueError(
                f"{self.name}: expected index >= 0 and attempt >= 1, got {index}, {attempt}"
            )
        return self._cache.get(attempt, index >> BLOCK_SHIFT)

    def latency_of(self, index: int, attempt: int = 1) -> float:
        """The sampled latency (scenario seconds) of item ``index`` at ``attempt``."""
        return self._block(index, attempt)[2][index & _MASK]

    def outcome_of(self, index: int, attempt: int = 1) -> tuple[float, str]:
        """(duration in scenario seconds, "ok" | "error" | "timeout") ignoring time-dependent
        faults (rate limit, outages)."""
        blk = self._block(index, attempt)
        off = index & _MASK
        return blk[0][off], _KINDS[blk[1][off]]

    # ------------------------------------------------------------------ time-dependent faults
    def start(self) -> None:
        """Start the live clock now (by default it starts at the first live call)."""
        with self._lock:
            self._epoch = self._clock()

    def reset(self) -> None:
        """A fresh run: forget the live epoch, the rate-limit bucket and the call counter."""
        with self._lock:
            self._epoch = None
            self._vlast = -math.inf
            self._counter = itertools.count()
            if self._bucket is not None:
                self._bucket.reset()

    def _refusal(self, now: float) -> BaseException | None:
        """A refusal (outage / rate limit) for a call starting at scenario time ``now``; the
        caller holds the lock. ``retry_after`` is in scenario seconds."""
        window = self.faults.outage_at(now)
        if window is not None:
            return OutageError(f"{self.name}: service down until t={window[1]:g}s", until=window[1])
        if self._bucket is not None:
            wait = self._bucket.acquire(now)
            if wait > 0:
                return RateLimitError(f"{self.name}: rate limit exceeded", retry_after=wait)
        return None

    def _error(self, code: int, index: int, attempt: int) -> BaseException:
        if code == TIMEOUT:
            return ServiceTimeout(
                f"{self.name}: timed out after {self._timeout:g}s (item {index}, attempt {attempt})"
            )
        return TransientError(
            f"{self.name}: simulated transient error (item {index}, attempt {attempt})"
        )

    # ------------------------------------------------------------------ virtual clock
    def simulate(self, call: CallInfo, value: Any, *, now: float | None = None) -> Simulated:
        """The call's duration (scenario seconds) and outcome, without sleeping.

        ``now`` is the virtual time the call starts at; the engine's virtual backend passes it
        as a keyword. It is needed only for rate limits and outages (ignored without it).
        Refused calls (rate limit, outage) take 0 s. (Each instance binds ``simulate`` to its
        ``VirtualCalls``, compiled when the package is: this is the same call.)
        """
        return self._virtual.simulate(call, value, now=now)

    def _refused(self, now: float) -> BaseException | None:
        """The refusal of a call starting at virtual time ``now`` (outage, rate limit)."""
        with self._lock:
            if now < self._vlast - 1e-9 and self._bucket is not None:
                self._bucket.reset()  # time went back: a new run
            self._vlast = now
            return self._refusal(now)

    # ------------------------------------------------------------------ live
    def __call__(self, value: Any) -> Any:
        try:
            call = current_call()
            index, attempt = call.index, call.attempt
        except RuntimeError:
            index, attempt = next(self._counter), 1
        blk = self._block(index, attempt)
        if self._time_dependent:
            with self._lock:
                t = self._clock()
                if self._epoch is None:
                    self._epoch = t
                refused = self._refusal((t - self._epoch) / self.time_scale)
            if refused is not None:
                if isinstance(refused, RateLimitError):
                    refused.retry_after *= self.time_scale
                raise refused
        off = index & _MASK
        duration, code = blk[0][off], blk[1][off]
        if duration > 0 and self.time_scale > 0:
            self._sleep(duration * self.time_scale)
        if code:
            raise self._error(code, index, attempt)
        return value
