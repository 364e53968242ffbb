"""Adaptive concurrency: a stage limit that finds the service's capacity by itself (AIMD).

``Stage("analyze", analyze, concurrency=Adaptive(initial=8, max=200))``: the limit grows by one
per window of about one limit's worth of completions while the stage is saturated and nothing
was overloaded, and is cut to ``limit * decrease`` on an overload signal (a 429 with
``retry_after``, a timeout, a type in ``overload_on``), at most once per window: overloads of
calls that started before the last cut were sent under the old limit and are ignored, so a burst
of simultaneous 429s cuts once. TCP's congestion avoidance, and Netflix's concurrency-limits AIMD.
"""
from __future__ import annotations

import math
from dataclasses import KW_ONLY, dataclass

__all__ = ["Adaptive", "AdaptiveLimit", "is_overload"]


def _check_int(field: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Adaptive.{field}: expected an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"Adaptive.{field}: expected an int >= {minimum}, got {value!r}")
    return value


def _retry_after(exc: BaseException) -> object:
    try:
        return getattr(exc, "retry_after", None)
    except Exception:  # a property that raises: no hint
        return None


def is_overload(exc: BaseException, overload_on: tuple[type[BaseException], ...] = ()) -> bool:
    """Whether a call that raised ``exc`` tells the stage to slow down.

    True for an error carrying a non-None ``retry_after`` attribute (a 429/503 with
    ``Retry-After``; a property that raises counts as no hint), a timeout (``TimeoutError`` or
    any class in its MRO whose name contains ``"Timeout"``: ``requests``' ``ReadTimeout``,
    ``openai.APITimeoutError``, ``httpx.ReadTimeout``) or an instance of a type in
    ``overload_on``.
    """
    if _retry_after(exc) is not None:
        return True
    if isinstance(exc, TimeoutError):
        return True
    for cls in type(exc).__mro__:
        if "Timeout" in cls.__name__:
            return True
    return bool(overload_on) and isinstance(exc, overload_on)


@dataclass(frozen=True, slots=True)
class Adaptive:
    """A stage's concurrency that moves during the run between ``min`` and ``max``.

    ``initial`` is the limit at the start of each run (``min <= initial <= max``). On an
    overload the limit becomes ``max(min, floor(limit * decrease))`` (``0 < decrease < 1``),
    at most once per window; while the stage is saturated and sees no overload it grows by one
    per window of about ``limit`` completions, never past ``max``. A decrease never interrupts
    running calls: the stage just starts no more until it is under the new limit.
    ``overload_on`` adds exception types to the built-in signals (see :func:`is_overload`).
    """

    initial: int
    _: KW_ONLY
    min: int = 1
    max: int
    decrease: float = 0.75
    overload_on: tuple[type[BaseException], ...] = ()

    def __post_init__(self) -> None:
        lo = _check_int("min", self.min, 1)
        hi = _check_int("max", self.max, 1)
        if hi < lo:
            raise ValueError(f"Adaptive.max: expected an int >= min ({lo}), got {hi!r}")
        init = self.initial
        if isinstance(init, bool) or not isinstance(init, int):
            raise TypeError(f"Adaptive.initial: expected an int in [{lo}, {hi}], got {init!r}")
        if not lo <= init <= hi:
            raise ValueError(f"Adaptive.initial: expected an int in [{lo}, {hi}], got {init!r}")
        d = self.decrease
        if isinstance(d, bool) or not isinstance(d, int | float):
            raise TypeError(f"Adaptive.decrease: expected a number in (0, 1), got {d!r}")
        if math.isnan(d) or not 0.0 < d < 1.0:
            raise ValueError(f"Adaptive.decrease: expected a number in (0, 1), got {d!r}")
        if isinstance(self.overload_on, type):
            object.__setattr__(self, "overload_on", (self.overload_on,))
        if not (
            isinstance(self.overload_on, tuple)
            and all(isinstance(t, type) and issubclass(t, BaseException)
                    for t in self.overload_on)
        ):
            raise TypeError(
                f"Adaptive.overload_on: expected a tuple of exception types, "
                f"got {self.overload_on!r}"
            )

    def controller(self, now: float) -> AdaptiveLimit:
        """The run-time limit of one stage in one run, starting at ``initial`` at ``now``."""
        return AdaptiveLimit(self, now)

    def is_overload(self, exc: BaseException) -> bool:
        """:func:`is_overload` with this policy's ``overload_on``."""
        return is_overload(exc, self.overload_on)


class AdaptiveLimit:
    """The state of an :class:`Adaptive` limit in one run. Not thread-safe: one owner (the
    dispatcher) calls :meth:`on_end`.

    ``limit`` is the limit in force; ``timeline`` lists ``(time, limit)``, from
    ``(start, initial)`` and then one entry per change (a results file's ``limit_timeline``).
    """

    __slots__ = ("_cut_at", "_overloaded", "_slow_start", "_window", "limit", "policy",
                 "timeline")

    def __init__(self, policy: Adaptive, now: float) -> None:
        self.policy = policy
        self.limit: int = policy.initial
        self.timeline: list[tuple[float, int]] = [(now, policy.initial)]
        self._cut_at = -math.inf   # when the last decrease happened
        self._window = 0           # saturated successes counted in the current window
        self._overloaded = False   # an overload (even an ignored one) seen in this window
        self._slow_start = True    # until the first overload: +1 per saturated completion

    def _set(self, now: float, limit: int) -> bool:
        if limit == self.limit:
            return False
        self.limit = limit
        self.timeline.append((now, limit))
        return True

    def on_end(self, now: float, start: float, overloaded: bool, saturated: bool) -> bool:
        """A call that started at ``start`` ended at ``now``; True when the limit changed.

        ``overloaded``: it failed with an overload signal (:func:`is_overload`). ``saturated``:
        the stage had items waiting for a slot, or ran at its limit, when it ended. An overload
        of a call that started before the last decrease is ignored for cutting (it was sent
        under the old limit) but still keeps the current window from growing. A decrease opens
        a new window. Completions while not saturated count for nothing: a limit the stage does
        not use says nothing about the service. Until the first overload the limit grows by
        one per saturated completion (TCP's slow start: it doubles per round trip), so a limit
        started far below the service's capacity gets there in a few round trips, not
        hundreds.
        """
        p = self.policy
        if overloaded:
            self._slow_start = False
            self._overloaded = True
            if start < self._cut_at:
                return False
            self._cut_at = now
            self._window = 0
            self._overloaded = False
            return self._set(now, max(p.min, math.floor(self.limit * p.decrease)))
        if not saturated:
            return False
        if self._slow_start:  # TCP's slow start: the limit doubles per round trip
            return self.limit < p.max and self._set(now, self.limit + 1)
        self._window += 1
        if self._window < self.limit:
            return False
        grow = not self._overloaded
        self._window = 0
        self._overloaded = False
        if grow and self.limit < p.max:
            return self._set(now, self.limit + 1)
        return False

    def __repr__(self) -> str:
        return f"AdaptiveLimit(limit={self.limit}, changes={len(self.timeline) - 1})"
