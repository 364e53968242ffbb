"""A stage's run-time state, and the flow-control policies the scheduler consults for it.

The scheduler owns one ``StageState`` per stage: the FIFO of items that arrived, the calls
running, the limit in force (fixed, or an ``Adaptive`` limit's controller), the rate limit's
bucket, the budget (with the cost estimate of the call at the head of the queue), the hedge
state and the counters the report shows. The policies (``TokenBucket``, ``Budget``,
``AdaptiveLimit``, ``HedgeState``) are small objects with one job each; this module is where
the scheduler asks them, so the scheduler itself reads as the state machine it is.
"""
from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Mapping
from typing import Any

from ._adaptive import Adaptive, AdaptiveLimit, is_overload
from ._budget import Budget
from ._context import _local
from ._core import _Call, _Item
from ._errors import retry_after_of
from ._hedge import HedgeState
from ._stage import DEFAULT_CODEC, Stage

__all__ = ["StageState", "usage_tokens"]

log = logging.getLogger("engine")


def usage_tokens(result: Any) -> float | None:
    """``result.usage.total_tokens`` (an OpenAI-style response, or a mapping with a ``usage``
    mapping), when present and a number; never raises."""
    try:
        usage = result["usage"] if isinstance(result, Mapping) else getattr(result, "usage", None)
        if usage is None:
            return None
        n = usage.get("total_tokens") if isinstance(usage, Mapping) else getattr(
            usage, "total_tokens", None)
    except Exception:
        return None
    if isinstance(n, bool) or not isinstance(n, int | float) or not 0 <= n < math.inf:
        return None
    return float(n)


def _attr(obj: Any, name: str) -> Any:
    try:
        return getattr(obj, name, None)
    except Exception:   # a property that raises says nothing
        return None


class StageState:
    """One stage in one run: its queue, slots, limit, gates and counters."""

    def __init__(self, index: int, stage: Stage, *, virtual: bool,
                 budgets: dict[int, Budget] | None = None) -> None:
        self.index = index
        self.name = stage.name
        self.stage = stage
        c = stage.concurrency
        self.adaptive: AdaptiveLimit | None = None
        self._adaptive_spec = c if isinstance(c, Adaptive) else None
        self.max = stage.max_concurrency
        self.limit = c.initial if isinstance(c, Adaptive) else c  # the limit in force
        self.retry = stage.retry
        self.bucket: Any = None  # the rate limit's bucket, made when the run starts
        # a budget shared by runs lives on the live clock; each virtual run gets its own copy,
        # one per Budget object: the stages sharing it share the copy
        self.budget: Budget | None = stage.budget
        if virtual and stage.budget is not None:
            copies = budgets if budgets is not None else {}
            self.budget = copies.setdefault(id(stage.budget), stage.budget.fresh())
        self.cost = stage.cost
        self.hedge: HedgeState | None = stage.hedge.state() if stage.hedge else None
        self.codec = (stage.codec or DEFAULT_CODEC) if stage.checkpoint else None
        self.gated = stage.rate_limit is not None or self.budget is not None
        # nothing but slots to consult: the scheduler's hot path
        self.plain = (not self.gated and self.hedge is None and not isinstance(c, Adaptive)
                      and not stage.checkpoint)
        self.waiting: deque[_Item] = deque()  # FIFO of items that arrived here
        self.hedge_due: deque[_Call] = deque()  # attempts due a hedge: ahead of the queue
        self.unarmed: list[_Call] = []  # started before the hedge delay was known
        self.head: _Call | None = None  # the call at the head, estimated, waiting for a gate
        self.running = 0  # calls handed to the backend and not yet reported
        # a plain stage hands the backend calls up to cap (limit + the backend's prefetch)
        self.cap = self.limit
        self.started = 0  # calls started (hedges included)
        self.wake_at = -1.0  # a gate's wake-up is pending until then
        self.gated_at = -1.0  # when the head of the queue started waiting at a gate
        self.gated_by_budget = False
        self.peak = 0
        self.calls = 0
        self.errors = 0
        self.retries = 0
        self.overloaded = 0
        self.hedges = 0
        self.hedges_won = 0
        self.resumed = 0
        self.busy = 0.0  # sum of call durations
        self.wait = 0.0  # sum over calls of (start - time queued)
        self.limit_wait = 0.0  # item-seconds waiting for the rate limit or the budget
        self.budget_wait = 0.0  # the budget's part of it
        self.executor_workers: int | None = None

    def start_run(self, now: float) -> None:
        if self.stage.rate_limit is not None:
            self.bucket = self.stage.rate_limit.bucket(now)
        if self._adaptive_spec is not None:
            self.adaptive = self._adaptive_spec.controller(now)

    # -- gates: rate limit and budget ----------------------------------------------------------
    def estimate(self, call: _Call) -> Mapping[str, float]:
        """The call's cost estimate, ``cost(value)``, with ``current_call()`` available to it
        (a simulated provider finds the item through it). Raises what ``cost`` raises."""
        if self.cost is None:
            return {}
        _local.call = call
        try:
            est = self.cost(call.item.value)
        finally:
            _local.call = None
        if not isinstance(est, Mapping):
            raise TypeError(f"Stage {self.name!r}: cost: expected a mapping such as "
                            f"{{'tokens': 812}}, got {est!r}")
        return est

    def gate_wait(self, call: _Call, now: float, budget_now: float) -> float:
        """Take the call's rate-limit token and budget reservation and return 0.0, or take
        nothing and return the seconds until the gates may let it through."""
        wait = 0.0
        bucket = self.bucket
        if bucket is not None:
            wait = bucket.take(now)
            if wait > 0.0:
                self.gated_by_budget = False
                return wait
        budget = self.budget
        if budget is not None:
            need = call.need
            if need is None:  # estimated and validated once per call, however long it waits
                call.estimate = self.estimate(call)
                need = call.need = budget._needs("Budget.reserve: cost", call.estimate)
            wait = budget._take(need, budget_now)
            if wait > 0.0:
                if bucket is not None:
                    bucket.give_back()
                self.gated_by_budget = True
                return wait
        return 0.0

    def gate_closed(self, now: float) -> None:
        """The head of the queue waits at a gate from ``now`` (or still does: the queue
        changed, so account for the interval so far and start a new one)."""
        self.gate_opened(now)
        self.gated_at = now

    def gate_opened(self, now: float) -> None:
        """Item-seconds waited at the gate since it closed, by the items queued meanwhile
        (each counted from when it was there: the mark moves whenever the gate is asked)."""
        if self.gated_at >= 0.0:
            waited = (now - self.gated_at) * (len(self.waiting) + len(self.hedge_due))
            self.limit_wait += waited
            if self.gated_by_budget:
                self.budget_wait += waited
            self.gated_at = -1.0

    # -- after a call ------------------------------------------------------------------------
    def settle(self, call: _Call, ok: bool, result: Any, overloaded: bool,
               budget_now: float) -> dict[str, float] | None:
        """The call's actual cost (recorded on its Attempt) and, at a budgeted stage, the
        budget settled with it; an error carrying ``retry_after`` pauses the budget."""
        actual: dict[str, float] | None = None
        if call.charged:
            actual = dict(call.charged)
        elif ok:
            tokens = usage_tokens(result)
            if tokens is not None:
                actual = {"tokens": tokens}
        elif overloaded and call.estimate:
            actual = {k: 0.0 for k in call.estimate if k != "requests"}  # refused: not spent
        budget = self.budget
        if budget is not None and call.need is not None:
            if actual:  # else it cost its estimate: nothing to settle
                budget._adjust(call.need, budget._actual(call.need, actual), budget_now)
            if not ok:
                self._maybe_pause(budget, result, budget_now)
        if actual is None and call.estimate is None:
            return None
        cost = dict(call.estimate or {})
        cost.update(actual or {})
        cost.setdefault("requests", 1.0)
        return cost

    def _maybe_pause(self, budget: Budget, error: Any, budget_now: float) -> None:
        remaining, reset = _attr(error, "remaining"), _attr(error, "reset")
        if isinstance(remaining, Mapping):  # the provider's own count: resync to it
            budget.update(remaining=remaining,
                          reset_s=reset if isinstance(reset, Mapping) else None, now=budget_now)
            log.debug("budget %r resynced to the provider's remaining counts (stage %r)",
                      budget.name, self.name)
        hint = retry_after_of(error)
        if hint is not None and hint > 0:
            hint = min(hint, 3600.0)
            if budget_now + hint > budget.paused_until:
                log.info("budget %r paused %.3g s (stage %r: %s)", budget.name, hint, self.name,
                         type(error).__name__)
            budget.pause(budget_now + hint)

    def is_overload(self, error: BaseException) -> bool:
        spec = self._adaptive_spec
        return is_overload(error, spec.overload_on if spec is not None else ())

    def adapt(self, now: float, start: float, overloaded: bool) -> None:
        """An adaptive stage's limit after a call ended (the running calls are never
        interrupted: a lower limit only starts fewer)."""
        ctl = self.adaptive
        if ctl is None:
            return
        # saturated: the call ran with the stage at its limit (items queued behind a budget
        # or rate limit say nothing about the service's capacity: the limit does not bind)
        saturated = self.running + 1 >= self.limit
        if ctl.on_end(now, start, overloaded, saturated):
            old, self.limit = self.limit, ctl.limit
            log.log(logging.INFO if self.limit < old else logging.DEBUG,
                    "stage %r: limit %d -> %d", self.name, old, self.limit)

    @property
    def timeline(self) -> tuple[tuple[float, int], ...]:
        return tuple(self.adaptive.timeline) if self.adaptive is not None else ()
