"""An account's budget: a token bucket per dimension ("requests", "tokens", ...), shared by stages.

A provider such as OpenAI limits an account to so many requests and so many tokens per minute,
whichever stage or run spends them. A :class:`Budget` is that account seen from the client: one
object, thread-safe, shared by every stage (and every live run) that calls the provider. The
scheduler consults it from its dispatcher thread and never blocks on it: every method takes
``now``, the caller's clock (``time.monotonic()`` on a live run, virtual seconds on the virtual
clock, where :meth:`Budget.fresh` gives each run its own buckets).
"""
from __future__ import annotations

import math
import re
import threading
from collections.abc import Mapping

__all__ = ["Budget", "parse_duration"]

_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "\u00b5s": 1e-6,
          "\u03bcs": 1e-6, "ns": 1e-9}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(h|ms|m|s|us|\u00b5s|\u03bcs|ns)")
_NUMBER = re.compile(r"[+]?(\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
# A cost fits when the bucket holds it up to this relative slack: float refill arithmetic must
# not leave a call waiting for 1e-13 tokens (a wait the caller's clock could not even express).
_SLACK = 1e-9


def _number(value: object) -> float | None:
    """``value`` as a finite number >= 0 (ints, floats, numeric strings), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        v = float(value)
    elif isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        v = float(value.strip())
    else:
        return None
    return v if math.isfinite(v) and v >= 0.0 else None


def parse_duration(text: object) -> float | None:
    """Seconds from a provider's reset header, or None when it makes no sense.

    Accepts a number of seconds (``2``, ``0.5``, ``"1.5"``) or a Go-style duration as OpenAI
    sends them: ``"6m0s"``, ``"1s"``, ``"12ms"``, ``"1h2m3.5s"``, ``"0.5s"`` (units ``h``,
    ``m``, ``s``, ``ms``, ``us``/``µs``, ``ns``). Negative, NaN, infinite, empty and
    unparseable values give None; it never raises.
    """
    if isinstance(text, bool):
        return None
    if isinstance(text, int | float):
        return _number(text)
    if not isinstance(text, str):
        return None
    s = text.strip()
    if not s:
        return None
    plain = _number(s)
    if plain is not None:
        return plain
    total = 0.0
    pos = 0
    for m in _PART.finditer(s):
        if m.start() != pos:
            return None
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos != len(s) or not math.isfinite(total):
        return None
    return total


def _check_limits(field: str, value: object) -> dict[str, float | int]:
    if not isinstance(value, Mapping):
        raise TypeError(f"Budget.{field}: expected a mapping of dimension name to number, "
                        f"got {value!r}")
    out: dict[str, float | int] = {}
    for key, v in value.items():
        if not isinstance(key, str):
            raise TypeError(f"Budget.{field}: expected str dimension names, got {key!r}")
        if not key:
            raise ValueError(f"Budget.{field}: expected non-empty dimension names, got {key!r}")
        where = f"Budget.{field}[{key!r}]"
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise TypeError(f"{where}: expected a number > 0, got {v!r}")
        if not math.isfinite(v) or v <= 0:
            raise ValueError(f"{where}: expected a number > 0, got {v!r}")
        out[key] = v
    return out


def _check_cost(where: str, value: object) -> Mapping[str, object]:
    if not isinstance(value, Mapping):
        raise TypeError(f"{where}: expected a mapping of dimension name to number, got {value!r}")
    return value


class Budget:
    """A token bucket per dimension, refilled at ``per_minute / 60`` a second, ``burst`` deep.

    ``Budget("openai", per_minute={"requests": 5000, "tokens": 2_000_000})``. ``burst``
    (optional, per dimension, the rest default) is how much may be spent at once; the default is
    one second's worth (``per_minute / 60``), since providers enforce per-minute limits over
    shorter periods. Buckets start full.

    A call reserves its estimated cost before it starts (:meth:`reserve`; ``"requests"`` is 1
    per call unless the cost says otherwise) and settles it with the actual cost when it ends
    (:meth:`settle`):
    the difference is refunded or charged. A charge may leave a bucket negative (debt): later
    reservations wait until refill has repaid it, so over the long run the spend stays within
    the rate even when estimates are low. :meth:`pause` stops every reservation until a time (a
    429's ``Retry-After``); :meth:`update` resyncs from the provider's ``x-ratelimit-*``
    headers.

    All methods are thread-safe (one lock) and non-blocking. ``now`` is seconds on the caller's
    clock; a ``now`` earlier than one seen before refills nothing (it is treated as that time).
    """

    __slots__ = ("_burst", "_last", "_lock", "_name", "_paused_until", "_per_minute", "_rate",
                 "_tokens")

    def __init__(self, name: str, per_minute: Mapping[str, float],
                 burst: Mapping[str, float] | None = None) -> None:
        if not isinstance(name, str):
            raise TypeError(f"Budget.name: expected a non-empty str, got {name!r}")
        if not name:
            raise ValueError(f"Budget.name: expected a non-empty str, got {name!r}")
        limits = _check_limits("per_minute", per_minute)
        if not limits:
            raise ValueError("Budget.per_minute: expected at least one dimension, got {}")
        bursts: dict[str, float | int] = {k: v / 60.0 for k, v in limits.items()}
        if burst is not None:
            given = _check_limits("burst", burst)
            for key in given:
                if key not in limits:
                    raise ValueError(f"Budget.burst[{key!r}]: expected a dimension of "
                                     f"per_minute {sorted(limits)}, got {key!r}")
            bursts.update(given)
        self._name = name
        self._per_minute = limits
        self._burst = bursts
        self._rate = {k: v / 60.0 for k, v in limits.items()}
        self._tokens = {k: float(v) for k, v in bursts.items()}
        self._last = -math.inf
        self._paused_until = -math.inf
        self._lock = threading.Lock()

    # -- description ------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def per_minute(self) -> dict[str, float | int]:
        """The limits per minute, per dimension (a copy)."""
        return dict(self._per_minute)

    @property
    def burst(self) -> dict[str, float | int]:
        """The bucket sizes, per dimension (a copy)."""
        return dict(self._burst)

    @property
    def paused_until(self) -> float:
        """No reservation succeeds before this time (``-inf`` when never paused)."""
        with self._lock:
            return self._paused_until

    def describe(self) -> dict[str, object]:
        """``{"name", "per_minute", "burst"}``: a results file's ``metadata.budgets`` entry."""
        return {"name": self._name, "per_minute": dict(self._per_minute),
                "burst": dict(self._burst)}

    def fresh(self) -> Budget:
        """A new budget with the same limits, full buckets, not paused (one per virtual run)."""
        return Budget(self._name, self._per_minute, self._burst)

    def __repr__(self) -> str:
        return f"Budget({self._name!r}, per_minute={self._per_minute!r}, burst={self._burst!r})"

    # -- state ------------------------------------------------------------------------------

    def _refill(self, now: float) -> None:
        # under the lock
        if now > self._last:
            dt = now - self._last
            tokens, burst = self._tokens, self._burst
            for k, r in self._rate.items():
                t = tokens[k] + dt * r  # -inf + inf never happens: _last starts full
                b = burst[k]
                tokens[k] = b if t > b or math.isnan(t) else t
            self._last = now

    def available(self, now: float) -> dict[str, float]:
        """The tokens in each bucket at ``now`` (negative = debt); a snapshot, for tests/logs."""
        with self._lock:
            self._refill(now)
            return dict(self._tokens)

    def _needs(self, where: str, cost: Mapping[str, object]) -> dict[str, float]:
        # validates cost; returns the amounts for the dimensions this budget knows
        _check_cost(where, cost)
        need: dict[str, float] = {}
        for k in self._rate:
            if k in cost:
                v = cost[k]
                if isinstance(v, bool) or not isinstance(v, int | float):
                    raise TypeError(f"{where}[{k!r}]: expected a number >= 0, got {v!r}")
                if not math.isfinite(v) or v < 0:
                    raise ValueError(f"{where}[{k!r}]: expected a number >= 0, got {v!r}")
                need[k] = float(v)
            elif k == "requests":
                need[k] = 1.0
        return need

    def reserve(self, cost: Mapping[str, float], now: float) -> float:
        """Take ``cost`` now and return 0.0, or take nothing and return the seconds to wait (> 0).

        ``cost`` maps dimensions to amounts (numbers >= 0; a wrong type is a TypeError, a
        negative/NaN/infinite amount a ValueError, nothing taken). Dimensions the budget does
        not know are ignored; ``"requests"``, when the budget has it, is 1 unless ``cost``
        gives it. While paused the wait is at least until the pause ends. The wait is a hint:
        another reservation (another stage, another thread) may take the tokens first, so a
        caller asks again when it is over.

        A cost larger than a dimension's burst can never fit: it goes through when that bucket
        is full, leaving it in debt (negative) that refill repays before anything else fits, so
        such a call is neither starved forever nor spending faster than the rate in the long
        run.
        """
        return self._take(self._needs("Budget.reserve: cost", cost), now)

    def _take(self, need: Mapping[str, float], now: float) -> float:
        # reserve() of a cost _needs() validated (the scheduler validates a call's once)
        with self._lock:
            self._refill(now)
            if now < self._last:
                now = self._last
            wait = self._paused_until - now
            tokens, burst, rate = self._tokens, self._burst, self._rate
            for k, c in need.items():
                b = burst[k]
                want = c if c <= b else b
                short = want - tokens[k]
                if short > _SLACK * (want if want > 1.0 else 1.0):
                    w = short / rate[k]
                    if w > wait:
                        wait = w
            if wait > 0.0:
                # a wait the caller's clock cannot add to ``now`` would spin: round it up
                return max(wait, 1e-9, 4.0 * math.ulp(now))
            for k, c in need.items():
                tokens[k] -= c
            return 0.0

    def settle(self, estimate: Mapping[str, float], actual: Mapping[str, float],
               now: float) -> None:
        """A call that reserved ``estimate`` ended having cost ``actual``: refund or charge.

        ``estimate`` is the cost passed to :meth:`reserve` (``"requests"`` defaults to 1 the
        same way). A dimension missing from ``actual`` keeps its estimate. The difference is
        added (refund, capped at the burst) or taken (charge; the bucket may go negative, a debt
        later reservations wait out). Invalid amounts raise as in :meth:`reserve`, before
        anything changes.

        The bound this keeps: in the bucket's own ledger (estimates charged when calls start,
        corrections when they end), the net charge over any window ending at a granted
        reservation is at most ``rate * w + burst``; with actual costs, everything reserved
        since the budget was full fits ``rate * T + burst`` once the next call may start (debt
        repaid). Counted with actual costs at reservation times, a window may exceed the bound
        by an overrun (known only when the call ends) or by a refund credited after the
        bucket has meanwhile refilled: providers that count at request time see estimates, as
        this ledger does.
        """
        est = self._needs("Budget.settle: estimate", estimate)
        self._adjust(est, self._actual(est, actual), now)

    def _actual(self, est: Mapping[str, float], actual: Mapping[str, object]
                ) -> dict[str, float]:
        # settle()'s actual cost: validated, a dimension it does not give keeps its estimate
        _check_cost("Budget.settle: actual", actual)
        return self._needs("Budget.settle: actual", {k: actual.get(k, est.get(k, 0.0))
                                                     for k in self._rate})

    def _adjust(self, est: Mapping[str, float], act: Mapping[str, float], now: float) -> None:
        # settle() of costs _needs() validated
        with self._lock:
            self._refill(now)
            tokens, burst = self._tokens, self._burst
            for k in self._rate:
                delta = est.get(k, 0.0) - act.get(k, 0.0)
                if delta:
                    t = tokens[k] + delta
                    tokens[k] = burst[k] if t > burst[k] else t

    def pause(self, until: float) -> None:
        """No reservation succeeds before ``until`` (a later pause extends, an earlier one is a
        no-op). Running calls are not affected."""
        if isinstance(until, bool) or not isinstance(until, int | float):
            raise TypeError(f"Budget.pause: until: expected a number, got {until!r}")
        if math.isnan(until):
            raise ValueError(f"Budget.pause: until: expected a number, got {until!r}")
        with self._lock:
            if until > self._paused_until:
                self._paused_until = float(until)

    def update(self, remaining: Mapping[str, object] | None = None,
               reset_s: Mapping[str, object] | None = None, now: float | None = None) -> None:
        """Resync from the provider's ``x-ratelimit-remaining-*`` / ``x-ratelimit-reset-*``.

        For each dimension the budget knows with a sensible ``remaining`` (a number >= 0 or a
        numeric string): the bucket becomes ``min(current, remaining)``. It never grows: the
        provider may count calls we have not settled yet.

        ``reset_s`` (seconds, or durations such as ``"6m0s"``, ``"12ms"``) is read as OpenAI
        documents it: the time until the provider's bucket is back to its full limit
        (``per_minute``), refilling steadily from ``remaining`` (so ``remaining=0`` with a reset
        of 60 s is an ordinary empty bucket, not a minute-long stall). It is used only with a
        ``remaining`` for the same dimension, and only when it shows the provider refilling
        slower than ``per_minute / 60`` (a smaller limit or a fixed window): the bucket is then
        lowered so that it is full again when the provider's would hold one burst's worth.

        ``now`` (default: the latest time the budget has seen) is when the headers arrived.
        Values that make no sense (negative, NaN, missing, unparseable, unknown dimensions) are
        ignored; it never raises, whatever the headers hold.
        """
        if not isinstance(remaining, Mapping):
            return
        resets = reset_s if isinstance(reset_s, Mapping) else {}
        if now is not None and (isinstance(now, bool) or not isinstance(now, int | float)
                                or math.isnan(now)):
            return
        with self._lock:
            if now is not None:
                self._refill(now)
            tokens, burst, rate = self._tokens, self._burst, self._rate
            for k, raw in remaining.items():
                if k not in rate:
                    continue
                rem = _number(raw)
                if rem is None:
                    continue
                t = min(tokens[k], rem)
                reset = parse_duration(resets.get(k))
                limit = float(self._per_minute[k])
                if reset is not None and reset > 0.0 and rem < limit:
                    provider_rate = (limit - rem) / reset
                    b = burst[k]
                    if provider_rate < rate[k] and rem < b:
                        # the provider holds one burst at (b - rem) / provider_rate from now;
                        # our bucket refilling at rate[k] is full then from this level
                        t = min(t, b - (b - rem) * rate[k] / provider_rate)
                tokens[k] = t
