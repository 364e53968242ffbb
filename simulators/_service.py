"""``SimulatedService``: a stage callable that behaves like a remote service.

Live (``service(value)`` on an engine thread) it sleeps its latency times ``time_scale`` and
returns ``value`` unchanged or raises a fault; on the virtual clock the engine calls
``service.simulate(call, value, now=...)`` and gets the same duration (in scenario seconds) and
outcome without sleeping. Both read the per-item numbers from one block cache (see
``_sampling``), so an item's latency, error and timeout depend on (seed, name, index, attempt,
hedge) only.

A second call of an item at this stage -- a retry (attempt >= 2) or a hedge (a duplicate of an
attempt, ``CallInfo.hedge``) -- repeats the item's slowness as much as ``correlation`` says:
with probability ``correlation`` it takes exactly the latency of the call it repeats (attempt
1's for a retry, its own attempt's for a hedge), otherwise a fresh draw from its own stream.
Why a mixture rather than a blend ``c * original + (1 - c) * fresh``: every call, first or
repeated, keeps the service's latency distribution (a blend of two draws has a thinner tail, so
hedges and retries would look faster than first calls and flatter the hedging they measure),
and the correlation between the two latencies is exactly ``c`` (a blend's is
``c / sqrt(c**2 + (1 - c)**2)``). It also matches the two causes it models: the item is slow
(a contact with many messages: it is slow every time) or the server was (a fresh draw).
Transient errors stay independent per call; a timeout follows the latency.

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

import numpy as np

from engine import CallInfo, Simulated, current_call

from ._distributions import Distribution, as_distribution
from ._faults import (
    Faults,
    OutageError,
    RateLimitError,
    ServiceTimeout,
    TokenBucket,
    TransientError,
)
from ._sampling import (
    BLOCK_MASK,
    BLOCK_SHIFT,
    HEDGE_STREAMS,
    REPEAT_STREAM,
    BlockCache,
    check_seed_and_scale,
    draw_block,
    draw_uniforms,
)

__all__ = ["SimulatedService", "check_correlation"]

_SHIFT: Final = BLOCK_SHIFT
_MASK: Final = BLOCK_MASK
OK, ERROR, TIMEOUT = 0, 1, 2
_KINDS = ("ok", "error", "timeout")
_new: Final = tuple.__new__  # skips the NamedTuple's Python-level __new__ on the hot path
#: a tuple built with ``_new`` must have every field of ``Simulated`` for attribute reads to
#: work: (duration, value, error, cost) today; any other shape goes through the constructor
_FOUR_FIELDS: Final = len(Simulated._fields) == 4

# (durations, outcome codes, raw latencies) for one block of item indices
_Block = tuple[list[float], list[int], list[float]]
FloatArray = Any  # numpy float64 array


def check_correlation(value: object, where: str = "correlation") -> float:
    """``value`` as a float in [0, 1]; TypeError / ValueError naming ``where`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{where}: expected a number in [0, 1], got {value!r}")
    v = float(value)
    if not 0.0 <= v <= 1.0:  # NaN fails too
        raise ValueError(f"{where}: expected a number in [0, 1], got {value!r}")
    return v


def _rebuild(args: tuple[Any, ...], kwargs: dict[str, Any]) -> SimulatedService:
    return SimulatedService(*args, **kwargs)


@final
class SimulatedService:
    """A simulated remote service usable as an engine stage function.

    ``name`` seeds the per-item numbers (use the stage's name, so that two stages with the
    same spec do not see the same latencies); ``latency`` is a spec dict, a ``Distribution``
    or seconds; all times (latency, ``faults``) are scenario seconds, slept times
    ``time_scale`` in live calls. ``retry_after`` of a live ``RateLimitError`` is in real
    seconds (scenario seconds times ``time_scale``), in ``simulate()`` scenario seconds.
    ``correlation`` (0 to 1, default 0) is how much of an item's slowness a retry or a hedge
    of it repeats (see the module docstring).

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
        correlation: float = 0.0,
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
        self.correlation = check_correlation(correlation)
        self._sleep = sleep
        self._clock = clock
        self._timeout = faults.timeout
        self._error_rate = faults.error_rate
        self._time_dependent = faults.time_dependent
        # keyed by (attempt, block), a hedge's by (-attempt, block)
        self._cache: BlockCache[_Block] = BlockCache(self._make_block, max_blocks)
        self._blocks = self._cache._blocks  # read directly on the hot path
        self._lock = threading.Lock()
        self._bucket = (
            TokenBucket(faults.rate_limit, faults.effective_burst) if faults.rate_limit else None
        )
        self._epoch: float | None = None
        self._vlast = -math.inf
        self._counter = itertools.count()

    def __repr__(self) -> str:
        extra = f", correlation={self.correlation:g}" if self.correlation else ""
        return (
            f"SimulatedService({self.name!r}, {self.latency!r}, {self.faults!r}, "
            f"seed={self.seed}, time_scale={self.time_scale}{extra})"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # picklable for process pools: rebuilt from its parameters (the cache is rebuilt lazily)
        return (
            _rebuild,
            (
                (self.name, self.latency, self.faults, self.seed, self.time_scale),
                {"correlation": self.correlation},
            ),
        )

    # ------------------------------------------------------------------ per-item numbers
    def _draw(self, attempt: int, block: int, hedge: bool) -> tuple[FloatArray, FloatArray]:
        """Raw latencies and fault uniforms of one block, correlation applied."""
        lat, u = draw_block(self.latency, self.seed, self.name, attempt, block, hedge=hedge)
        c = self.correlation
        if c > 0.0 and (hedge or attempt > 1):
            # the call repeated: a hedge repeats its attempt, a retry the first attempt
            original = self._draw(attempt if hedge else 1, block, False)[0]
            stream = REPEAT_STREAM + (HEDGE_STREAMS if hedge else 0)
            repeat = draw_uniforms(self.seed, self.name, attempt, block, stream, len(lat)) < c
            lat = np.where(repeat, original, lat)
        return lat, u

    def _make_block(self, key: int, block: int) -> _Block:
        lat, u = self._draw(abs(key), block, key < 0)
        lats: list[float] = lat.tolist()
        codes = (u < self._error_rate).astype(int)  # ERROR where the fault uniform is low
        if self._timeout is not None:
            late = lat > self._timeout
            codes[late] = TIMEOUT  # a call that times out never gets to fail otherwise
            durations: list[float] = lat.clip(max=self._timeout).tolist()
        else:
            durations = lats
        return durations, codes.tolist(), lats

    def _block(self, index: int, attempt: int, hedge: bool = False) -> _Block:
        if index < 0 or attempt < 1:
            raise ValueError(
                f"{self.name}: expected index >= 0 and attempt >= 1, got {index}, {attempt}"
            )
        return self._cache.get(-attempt if hedge else attempt, index >> BLOCK_SHIFT)

    def latency_of(self, index: int, attempt: int = 1, *, hedge: bool = False) -> float:
        """The sampled latency (scenario seconds) of item ``index`` at ``attempt`` (of the
        hedge of that attempt when ``hedge``)."""
        return self._block(index, attempt, hedge)[2][index & _MASK]

    def outcome_of(self, index: int, attempt: int = 1, *, hedge: bool = False) -> tuple[float, str]:
        """(duration in scenario seconds, "ok" | "error" | "timeout") ignoring time-dependent
        faults (rate limit, outages)."""
        blk = self._block(index, attempt, hedge)
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

    def _error(self, code: int, index: int, key: int) -> BaseException:
        which = f"attempt {key}" if key > 0 else f"attempt {-key}, hedge"
        if code == TIMEOUT:
            return ServiceTimeout(
                f"{self.name}: timed out after {self._timeout:g}s (item {index}, {which})"
            )
        return TransientError(f"{self.name}: simulated transient error (item {index}, {which})")

    # ------------------------------------------------------------------ virtual clock
    def simulate(self, call: CallInfo, value: Any, now: float | None = None) -> Simulated:
        """The call's duration (scenario seconds) and outcome, without sleeping.

        ``now`` is the virtual time the call starts at (the engine's virtual clock always
        passes it). It is needed only for rate limits and outages (not applied without it).
        Refused calls (rate limit, outage) take 0 s. A ``call`` with ``hedge`` set (its 6th
        field) is the hedge of its attempt.
        """
        # the per-call path of the virtual clock: a dict read and two list reads
        index: int = call[0]
        key: int = call[4]
        if len(call) > 5 and call[5]:  # a hedge (a CallInfo without the field is none)
            key = -key
        blk = self._blocks.get((key, index >> _SHIFT))
        if blk is None:
            blk = self._block(index, abs(key), key < 0)
        if self._time_dependent and now is not None:
            refused = self._refused(now)
            if refused is not None:
                return Simulated(0.0, None, refused)
        off = index & _MASK
        code = blk[1][off]
        if code:
            return Simulated(blk[0][off], None, self._error(code, index, key))
        if _FOUR_FIELDS:
            result: Simulated = _new(Simulated, (blk[0][off], value, None, None))
            return result
        return Simulated(blk[0][off], value)

    def _refused(self, now: float) -> BaseException | None:
        """The refusal of a call starting at virtual time ``now`` (outage, rate limit)."""
        with self._lock:
            if now < self._vlast - 1e-9 and self._bucket is not None:
                self._bucket.reset()  # time went back: a new run
            self._vlast = now
            return self._refusal(now)

    # ------------------------------------------------------------------ live
    #: a call whose result the engine will discard (its hedged twin won) stops at once: live,
    #: the sleep watches ``current_call().cancelled``; on the virtual clock the engine ends it
    #: when it loses (DESIGN §10)
    stops_when_cancelled = True

    def __call__(self, value: Any) -> Any:
        call: Any
        try:
            call = current_call()
        except RuntimeError:
            call = None
            index, key = next(self._counter), 1
        else:
            index, key = call[0], call[4]
            if len(call) > 5 and call[5]:
                key = -key
        blk = self._block(index, abs(key), key < 0)
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
            if call is not None and self._sleep is time.sleep:
                call.sleep(duration * self.time_scale)  # ends early if its twin wins
            else:
                self._sleep(duration * self.time_scale)
        if code:
            raise self._error(code, index, key)
        return value
