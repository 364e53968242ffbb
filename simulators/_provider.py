"""``Provider``: a simulated rate-limited service with a capacity, such as an LLM API (DESIGN §9).

* **Capacity.** Up to ``capacity`` concurrent calls run at the base latency; beyond it the
  service slows down: a call takes ``latency * in_flight / capacity``, ``in_flight`` counted at
  the call's start, itself included (calls the server refused do not count).
* **Per-minute limits.** One server-side token bucket per ``per_minute`` dimension:
  ``"requests"`` (1 per call) and ``"tokens"`` (the item's total tokens). Each bucket holds one
  minute's worth, starts full and refills continuously (``per_minute / 60`` per second). A call
  that does not fit every bucket is refused fast (``reject_latency``, 20 ms by default) with
  ``RateLimitError``: ``retry_after`` is the seconds until every bucket holds enough for it,
  ``remaining`` what each bucket holds, ``reset`` the seconds until each is full again. A
  refused call takes nothing from any bucket. A call larger than a bucket never fits: it is
  refused every time (its ``retry_after`` is then what it would be were the bucket deep
  enough).
* **Tokens.** ``tokens`` is a distribution spec (as for latencies, in tokens) of the tokens an
  item's call uses, drawn per (seed, name, item index): the same for every attempt and hedge
  of the item, since the prompt is the same. The completion is a per-item share of 10% to 40%
  of the total (uniform), the rest is the prompt. A call returns a :class:`ProviderResult`
  whose ``usage`` says so, as an OpenAI response does.
* **Latency.** The base latency of a call is a ``SimulatedService``'s (per seed, name, index,
  attempt, hedge; ``correlation`` as there).

Times: scenario seconds. Live calls sleep ``time_scale`` times the duration and report
``retry_after`` and ``reset`` in real seconds; ``simulate()`` reports scenario seconds (as
``SimulatedService`` does). Live, the clock is scenario seconds since the first call (or
``start()``); on the virtual clock it is ``now``, and calls must come in nondecreasing ``now``
(a ``now`` earlier than the last one starts a new run: full buckets, nothing in flight).
Without ``now``, capacity and limits are not applied.
"""

from __future__ import annotations

import heapq
import itertools
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, final

import numpy as np

from engine import CallInfo, Simulated, current_call

from ._distributions import Distribution, as_distribution
from ._faults import RateLimitError
from ._sampling import BLOCK_MASK, BLOCK_SHIFT, BlockCache, check_seed_and_scale, draw_block
from ._service import SimulatedService, check_correlation

__all__ = ["DIMENSIONS", "Provider", "ProviderResult", "RateLimits", "Usage"]

DIMENSIONS = ("requests", "tokens")
#: what the estimate assumes the completion is of the total (the mean of the 10%-40% share)
ESTIMATED_COMPLETION_SHARE = 0.25
_COMPLETION_LOW, _COMPLETION_SPAN = 0.10, 0.30
_TOKEN_ATTEMPT = 0  # tokens' streams: attempt 0, which no call has (attempts start at 1)
_HAS_COST = "cost" in Simulated._fields
# a refill that leaves a bucket a rounding error short of a cost is not a refusal
_SLACK = 1e-9


@dataclass(frozen=True, slots=True)
class Usage:
    """The tokens a call used (the fields of an OpenAI response's ``usage``)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@dataclass(frozen=True, slots=True)
class ProviderResult:
    """What a provider call returns: the input ``value``, the call's ``usage``, and the state
    of the limits once the call was admitted (``remaining`` units and ``reset`` seconds per
    dimension, as the ``x-ratelimit-*`` headers of a 200 say)."""

    value: Any
    usage: Usage
    remaining: Mapping[str, float] = field(default_factory=dict, compare=False)
    reset: Mapping[str, float] = field(default_factory=dict, compare=False)


class RateLimits:
    """Server-side buckets, one per dimension, on an external clock (seconds). Not thread-safe:
    the owner holds a lock."""

    __slots__ = ("_last", "capacity", "level", "rate")

    def __init__(self, per_minute: Mapping[str, float]) -> None:
        self.capacity = {d: float(v) for d, v in per_minute.items()}
        self.rate = {d: v / 60.0 for d, v in self.capacity.items()}
        self.level = dict(self.capacity)
        self._last: float | None = None

    def reset_all(self) -> None:
        self.level = dict(self.capacity)
        self._last = None

    def refill(self, now: float) -> None:
        last = self._last
        if last is not None and now > last:
            dt = now - last
            for d, cap in self.capacity.items():
                self.level[d] = min(cap, self.level[d] + dt * self.rate[d])
        if last is None or now > last:
            self._last = now

    def admit(self, now: float, need: Mapping[str, float]) -> float:
        """Take ``need`` at ``now`` (0.0), or take nothing and return the seconds until every
        bucket holds enough."""
        self.refill(now)
        wait = 0.0
        for d, cap in self.capacity.items():
            n = need.get(d, 0.0)
            short = n - self.level[d]
            if short > _SLACK * max(1.0, cap):
                wait = max(wait, short / self.rate[d])
        if wait > 0.0:
            return max(wait, 1e-9)
        for d in self.capacity:
            self.level[d] = max(0.0, self.level[d] - need.get(d, 0.0))
        return 0.0

    def remaining(self) -> dict[str, float]:
        return {d: float(math.floor(v + 1e-9)) for d, v in self.level.items()}

    def reset_in(self) -> dict[str, float]:
        return {d: (cap - self.level[d]) / self.rate[d] for d, cap in self.capacity.items()}


def _check_name(name: object) -> str:
    if not isinstance(name, str):
        raise TypeError(f"name: expected a non-empty string, got {name!r}")
    if not name:
        raise ValueError("name: expected a non-empty string, got ''")
    return name


def _check_number(value: object, where: str, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{where}: expected a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or (v <= 0 if positive else v < 0):
        raise ValueError(f"{where}: expected a finite number {'>' if positive else '>='} 0, "
                         f"got {value!r}")
    return v


def _check_capacity(capacity: object) -> int | None:
    if capacity is None:
        return None
    if isinstance(capacity, bool) or not isinstance(capacity, int):
        raise TypeError(f"capacity: expected an integer >= 1 or None, got {capacity!r}")
    if capacity < 1:
        raise ValueError(f"capacity: expected an integer >= 1 or None, got {capacity!r}")
    return capacity


def _check_per_minute(per_minute: object) -> dict[str, float]:
    if per_minute is None:
        return {}
    if not isinstance(per_minute, Mapping):
        raise TypeError(f"per_minute: expected a table of limits such as "
                        f"{{requests = 5000, tokens = 2000000}}, got {per_minute!r}")
    out: dict[str, float] = {}
    for key, value in per_minute.items():
        if key not in DIMENSIONS:
            raise ValueError(f"per_minute.{key}: unexpected key (allowed: {', '.join(DIMENSIONS)})")
        out[key] = _check_number(value, f"per_minute.{key}", positive=True)
    return out


def _rebuild(kwargs: dict[str, Any]) -> Provider:
    return Provider(**kwargs)


@final
class Provider:
    """A simulated rate-limited provider, usable as a stage function (live, thread-safe) and
    on the virtual clock (``simulate``). See the module docstring for the model.

    ``latency``: a spec dict, a ``Distribution`` or seconds (the base latency); ``capacity``:
    concurrent calls served at the base latency (None: no limit); ``per_minute``: e.g.
    ``{"requests": 5000, "tokens": 2000000}`` (None or empty: no limits); ``tokens``: a spec of
    the tokens per item (None: 0 tokens).
    """

    def __init__(
        self,
        name: str,
        latency: Distribution | Mapping[str, Any] | float | None,
        capacity: int | None = None,
        per_minute: Mapping[str, float] | None = None,
        tokens: Distribution | Mapping[str, Any] | float | None = None,
        seed: int = 0,
        time_scale: float = 1.0,
        *,
        correlation: float = 0.0,
        reject_latency: float = 0.02,
        sleep: Callable[[float], Any] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = _check_name(name)
        self.capacity = _check_capacity(capacity)
        self.per_minute = _check_per_minute(per_minute)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed: expected an integer >= 0, got {seed!r}")
        if isinstance(time_scale, bool) or not isinstance(time_scale, int | float):
            raise TypeError(f"time_scale: expected a finite number >= 0, got {time_scale!r}")
        check_seed_and_scale(seed, time_scale)
        if time_scale == 0 and self.per_minute:
            raise ValueError("time_scale: must be > 0 with per_minute limits (they need a clock)")
        self.correlation = check_correlation(correlation)
        self.reject_latency = _check_number(reject_latency, "reject_latency", positive=False)
        if tokens is not None and not isinstance(tokens, Distribution | Mapping | int | float):
            raise TypeError(f"tokens: expected a distribution spec dict, a Distribution or a "
                            f"number, got {tokens!r}")
        self.tokens = as_distribution(tokens, where="tokens")
        self.seed = seed
        self.time_scale = float(time_scale)
        self._service = SimulatedService(name, latency, seed=seed, time_scale=time_scale,
                                         correlation=correlation)
        self.latency = self._service.latency
        self._sleep = sleep
        self._clock = clock
        self._token_cache: BlockCache[tuple[list[int], list[int]]] = BlockCache(
            self._make_tokens, 16)
        self._lock = threading.Lock()
        self._buckets = RateLimits(self.per_minute) if self.per_minute else None
        # virtual clock: the ends of the calls in flight, the last start time
        self._ends: list[float] = []
        self._vlast = -math.inf
        # live: the epoch, calls in flight, calls numbered outside the engine
        self._epoch: float | None = None
        self._in_flight = 0
        self._counter = itertools.count()

    def __repr__(self) -> str:
        return (f"Provider({self.name!r}, {self.latency!r}, capacity={self.capacity}, "
                f"per_minute={self.per_minute}, tokens={self.tokens!r}, seed={self.seed}, "
                f"time_scale={self.time_scale})")

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, ({
            "name": self.name, "latency": self.latency, "capacity": self.capacity,
            "per_minute": self.per_minute, "tokens": self.tokens, "seed": self.seed,
            "time_scale": self.time_scale, "correlation": self.correlation,
            "reject_latency": self.reject_latency},))

    # ------------------------------------------------------------------ per-item numbers
    def _make_tokens(self, _attempt: int, block: int) -> tuple[list[int], list[int]]:
        raw, u = draw_block(self.tokens, self.seed, self.name, _TOKEN_ATTEMPT, block)
        total = np.rint(raw).clip(min=0).astype(np.int64)
        completion = np.rint(total * (_COMPLETION_LOW + _COMPLETION_SPAN * u)).astype(np.int64)
        return total.tolist(), completion.tolist()

    def usage_of(self, index: int) -> Usage:
        """The tokens item ``index``'s call uses (every attempt and hedge of it)."""
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ValueError(f"{self.name}: expected an item index >= 0, got {index!r}")
        total, completion = self._token_cache.get(_TOKEN_ATTEMPT, index >> BLOCK_SHIFT)
        t, c = total[index & BLOCK_MASK], completion[index & BLOCK_MASK]
        return Usage(prompt_tokens=t - c, completion_tokens=c, total_tokens=t)

    def latency_of(self, index: int, attempt: int = 1, *, hedge: bool = False) -> float:
        """The base latency (scenario seconds, before any capacity slowdown)."""
        return self._service.latency_of(index, attempt, hedge=hedge)

    def estimate(self, value: Any, call: CallInfo | None = None) -> int:
        """A noisy estimate of the tokens the item's call will use, as a client's tokenizer
        gives before the call: the prompt's tokens counted exactly plus a completion guessed
        at the average share (``prompt / 0.75``), so it is off by -20% to +20% depending on
        how long the item's answer turns out to be. Deterministic per item.

        The item is ``call``'s (a ``CallInfo``: the engine's budget should pass it), else the
        running stage call's (``current_call()``), else ``value`` itself when it is an item
        index (an int >= 0, as the bench's items are); anything else is a ``TypeError``. An
        estimate cannot be keyed by the value alone: the tokens it must approximate are drawn
        per item index, and equal values of two items would need two estimates."""
        index: Any = None
        if call is not None:
            index = call[0]
        else:
            try:
                index = current_call()[0]
            except RuntimeError:
                if not isinstance(value, bool) and isinstance(value, int) and value >= 0:
                    index = value
        if index is None:
            raise TypeError(f"{self.name}.estimate: pass the call (estimate(value, call)), call "
                            f"it inside a stage call, or pass an item index; got {value!r}")
        usage = self.usage_of(index)
        return round(usage.prompt_tokens / (1.0 - ESTIMATED_COMPLETION_SHARE))

    # ------------------------------------------------------------------ shared
    def start(self) -> None:
        """Start the live clock now (by default it starts at the first live call)."""
        with self._lock:
            self._epoch = self._clock()

    def reset(self) -> None:
        """A fresh run: full buckets, nothing in flight, the live epoch and counter forgotten."""
        with self._lock:
            self._new_run()
            self._epoch = None
            self._in_flight = 0
            self._counter = itertools.count()

    def _new_run(self) -> None:
        self._ends.clear()
        self._vlast = -math.inf
        if self._buckets is not None:
            self._buckets.reset_all()

    def _refuse(self, now: float, need: Mapping[str, float]) -> RateLimitError | None:
        """Admit a call at scenario time ``now`` into the buckets, or its refusal (scenario
        seconds). The caller holds the lock."""
        b = self._buckets
        if b is None:
            return None
        wait = b.admit(now, need)
        if wait == 0.0:
            return None
        over = [d for d in b.capacity if need.get(d, 0.0) > b.capacity[d]]
        why = (f"a call of {need.get(over[0], 0):g} {over[0]} exceeds the limit of "
               f"{b.capacity[over[0]]:g} per minute" if over else "rate limit exceeded")
        return RateLimitError(f"{self.name}: {why}", retry_after=wait,
                              remaining=b.remaining(), reset=b.reset_in())

    def _limits(self, scale: float) -> tuple[dict[str, float], dict[str, float]]:
        b = self._buckets
        if b is None:
            return {}, {}
        return b.remaining(), {d: v * scale for d, v in b.reset_in().items()}

    def _slowdown(self, in_flight: int) -> float:
        cap = self.capacity
        return in_flight / cap if cap is not None and in_flight > cap else 1.0

    # ------------------------------------------------------------------ virtual clock
    def simulate(self, call: CallInfo, value: Any, now: float | None = None) -> Simulated:
        """The call's duration (scenario seconds) and outcome, without sleeping: a
        ``ProviderResult`` and ``cost={"tokens": total, "requests": 1}``, or a fast
        ``RateLimitError`` (cost 0). ``now``: the virtual start time (see the module
        docstring); calls must come in nondecreasing ``now``."""
        index: int = call[0]
        attempt: int = call[4]
        hedge = len(call) > 5 and bool(call[5])
        base = self._service.latency_of(index, attempt, hedge=hedge)
        usage = self.usage_of(index)
        remaining: dict[str, float] = {}
        reset: dict[str, float] = {}
        if now is None:
            duration = base
        else:
            with self._lock:
                if now < self._vlast - 1e-9:
                    self._new_run()  # time went back: a new run
                self._vlast = now
                refused = self._refuse(now, {"requests": 1.0, "tokens": usage.total_tokens})
                if refused is not None:
                    return _simulated(self.reject_latency, None, refused, 0, 0)
                ends = self._ends
                while ends and ends[0] <= now:
                    heapq.heappop(ends)
                duration = base * self._slowdown(len(ends) + 1)
                heapq.heappush(ends, now + duration)
                remaining, reset = self._limits(1.0)
        result = ProviderResult(value, usage, remaining, reset)
        return _simulated(duration, result, None, usage.total_tokens, 1)

    # ------------------------------------------------------------------ live
    def __call__(self, value: Any) -> ProviderResult:
        running: Any = None
        try:
            running = current_call()
            index, attempt = running[0], running[4]
            hedge = len(running) > 5 and bool(running[5])
        except RuntimeError:
            index, attempt, hedge = next(self._counter), 1, False
        base = self._service.latency_of(index, attempt, hedge=hedge)
        usage = self.usage_of(index)
        scale = self.time_scale
        with self._lock:
            t = self._clock()
            if self._epoch is None:
                self._epoch = t
            now = (t - self._epoch) / scale if scale > 0 else 0.0
            refused = self._refuse(now, {"requests": 1.0, "tokens": usage.total_tokens})
            if refused is None:
                self._in_flight += 1
                in_flight = self._in_flight
                remaining, reset = self._limits(scale)
        if refused is not None:
            refused.retry_after *= scale
            refused.reset = {d: v * scale for d, v in refused.reset.items()}
            _charge(running, 0, 0)
            if self.reject_latency > 0 and scale > 0:
                self._sleep(self.reject_latency * scale)
            raise refused
        try:
            duration = base * self._slowdown(in_flight)
            if duration > 0 and scale > 0:
                self._sleep(duration * scale)
        finally:
            with self._lock:
                self._in_flight -= 1
        _charge(running, usage.total_tokens, 1)
        return ProviderResult(value, usage, remaining, reset)


def _simulated(duration: float, value: Any, error: BaseException | None, tokens: int,
               requests: int) -> Simulated:
    if _HAS_COST:
        return Simulated._make((duration, value, error, {"tokens": tokens, "requests": requests}))
    return Simulated(duration, value, error)


def _charge(running: Any, tokens: int, requests: int) -> None:
    """Tell the engine what the call cost (``current_call().charge``, where it exists)."""
    charge = getattr(running, "charge", None)
    if charge is not None:
        charge(tokens=tokens, requests=requests)
