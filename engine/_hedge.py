"""Hedged calls (DESIGN §10): a duplicate of a slow attempt, for stages safe to call twice.

``Hedge(after=seconds | "pNN", max_extra=0.05)`` is the frozen description a user writes;
``HedgeState`` is its run-time state at one stage (the dispatcher's only): when an attempt has
run ``after`` seconds (or the stage's running pNN of call durations), the scheduler starts one
duplicate if the allowance permits -- hedges so far below ``max_extra`` x calls started, +1 --
and stops hedging a stage whose hedges do not win (slowness that sticks to the item: a second
call is as slow as the first, and hedging it would only waste slots).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ._validate import check_number

__all__ = ["Hedge", "HedgeState"]

_PCT = re.compile(r"^p(\d{1,2}(?:\.\d+)?)$")
_SAMPLES = 512  # recent call durations kept for the running percentile
_MIN_SAMPLES = 32  # no percentile hedging before this many calls
_RECOMPUTE = 64  # recompute the percentile every this many calls
_JUDGE_AFTER = 20  # hedges before judging whether they win
_MIN_WIN_RATE = 0.1  # below it, hedging stops at this stage


@dataclass(frozen=True, slots=True)
class Hedge:
    """Start one duplicate of an attempt that has run longer than ``after``: seconds, or a
    running percentile of the stage's call durations such as ``"p95"``; at most ``max_extra``
    x calls started (+1) duplicates over the run."""

    after: float | str = "p95"
    max_extra: float = 0.05

    def __post_init__(self) -> None:
        a = self.after
        if isinstance(a, str):
            m = _PCT.match(a)
            if m is None or not 0 < float(m.group(1)) < 100:
                raise ValueError(f"Hedge.after: expected seconds or a percentile like 'p95', "
                                 f"got {a!r}")
        else:
            check_number("Hedge.after", a)
        check_number("Hedge.max_extra", self.max_extra, maximum=1.0)

    @property
    def percentile(self) -> float | None:
        return float(self.after[1:]) if isinstance(self.after, str) else None

    def state(self) -> HedgeState:
        return HedgeState(self)


class HedgeState:
    """A hedged stage's run-time state (dispatcher thread only)."""

    __slots__ = (
        "_durations",
        "_pct",
        "_ring",
        "_since",
        "_threshold",
        "fixed",
        "hedges",
        "max_extra",
        "won",
    )

    def __init__(self, hedge: Hedge) -> None:
        self.max_extra = hedge.max_extra
        self._pct = hedge.percentile
        self.fixed = None if self._pct is not None else float(hedge.after)
        self._durations: list[float] = []
        self._ring = 0
        self._since = 0
        self._threshold: float | None = self.fixed
        self.hedges = 0
        self.won = 0

    def delay(self) -> float | None:
        """How long after its start an attempt is hedged now (None: not yet known)."""
        return self._threshold

    def observe(self, duration: float) -> None:
        """A first call of an attempt succeeded in ``duration`` seconds."""
        if self._pct is None:
            return
        d = self._durations
        if len(d) < _SAMPLES:
            d.append(duration)
        else:
            d[self._ring] = duration
            self._ring = (self._ring + 1) % _SAMPLES
        self._since += 1
        if len(d) >= _MIN_SAMPLES and (self._threshold is None or self._since >= _RECOMPUTE):
            self._since = 0
            xs = sorted(d)
            h = (len(xs) - 1) * self._pct / 100.0
            lo = int(h)
            hi = min(lo + 1, len(xs) - 1)
            self._threshold = xs[lo] + (h - lo) * (xs[hi] - xs[lo])

    @property
    def active(self) -> bool:
        """False once hedges here have been judged not to win (the item's slowness sticks:
        a second call is as slow as the first)."""
        return self.hedges < _JUDGE_AFTER or self.won >= _MIN_WIN_RATE * self.hedges

    def allowed(self, calls_started: int, first_look: bool = False, pending: int = 0) -> bool:
        """Whether one more hedge fits the allowance -- ``max_extra`` x the stage's calls
        started that are not hedges, +1, counting the ``pending`` ones queued to start -- and
        hedges here have been winning.

        A first look (the call has just passed the hedge delay) gets half the allowance: the
        calls that pass a percentile are mostly the distribution's tail, about to finish; the
        rest is kept for the calls still running a little later, the truly slow ones.
        """
        share = 0.5 if first_look else 1.0  # with this one, at most max_extra x calls + 1
        return (self.active
                and self.hedges + pending <= share * self.max_extra * calls_started)
