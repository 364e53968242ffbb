"""The virtual backend: virtual time, an event heap, no threads and no sleeping.

Each call asks its stage's ``simulate(call, value, now=t)`` for its duration and outcome and
completes at ``t + duration`` on the heap. The same ``Scheduler`` decides what runs next (it
owns the stage queues, slots and rate limits), so a virtual run predicts what the live engine
does. A simulator that raises, or answers a duration that is negative, NaN or infinite, is the
run's error (raised by ``run()`` with the simulator's own traceback), never a silent hang.
"""
from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from typing import Any, Final

from ._cancel import CancelToken
from ._context import CallInfo, checkpoint
from ._core import Backend, _Call
from ._stage import Stage

__all__ = ["VirtualBackend"]

_heappush: Final = heapq.heappush
_heappop: Final = heapq.heappop
_TIMER: Final = object()  # the "start" slot of a timer event
_LOST: Final = object()  # the "start" slot of a lost call's early end
_new: Final = tuple.__new__  # builds a named tuple without its Python-level __new__
_INF: Final = math.inf


class SimulationError(ValueError):
    """A stage's ``simulate()`` answered something the virtual clock cannot run."""


class VirtualBackend(Backend):
    """Virtual time: an event heap, no threads, no sleeping."""

    @staticmethod
    def check(stages: tuple[Stage, ...]) -> None:
        """Every stage must be able to simulate its calls."""
        for st in stages:
            if not callable(getattr(st.fn, "simulate", None)):
                raise TypeError(
                    f"Stage {st.name!r}: fn: the virtual clock needs a callable with a "
                    f".simulate(call, value, *, now) method (e.g. a simulators.SimulatedService), "
                    f"got {st.fn!r}")

    def __init__(self, stages: tuple[Stage, ...], cancel: CancelToken, *,
                 observed: bool = True) -> None:
        self.check(stages)
        self.t = 0.0
        self._observed = observed
        self._heap: list[tuple[float, int, Any, Any, Any]] = []
        self._n = 0
        self._cancel = cancel
        self._sims: list[Callable[..., Any]] = [st.fn.simulate for st in stages]  # type: ignore[attr-defined]
        self._stops = [bool(getattr(st.fn, "stops_when_cancelled", False)) for st in stages]
        self._errors: list[BaseException] = []  # simulators' failures, for the scheduler

    def now(self) -> float:
        return self.t

    def budget_now(self) -> float:
        return self.t

    def start(self, call: _Call) -> None:
        t = self.t
        self._n += 1
        if self._cancel.cancelled:
            _heappush(self._heap, (t, self._n, call, t, None))
            return
        item = call.item
        info = _new(CallInfo, (item.index, item.key, call.name, call.stage, call.attempt,
                               call.hedge))
        try:
            sim = self._sims[call.stage](info, item.value, now=t)
            d = sim[0]
            if not (d.__class__ is float and 0.0 <= d < _INF) and (
                    isinstance(d, bool) or not isinstance(d, int | float) or not math.isfinite(d)
                    or d < 0):
                raise SimulationError(
                    f"Stage {call.name!r}: simulate() returned a duration of {d!r} for item "
                    f"{item.index}; expected a finite number of seconds >= 0")
        except Exception as exc:  # the simulator's bug: the run's error, with its traceback
            self._errors.append(exc)
            _heappush(self._heap, (t, self._n, call, t, None))  # the call never started
            return
        _heappush(self._heap, (t + d, self._n, call, t, sim))

    def discard(self, call: _Call) -> None:
        """A stage that stops when cancelled ends a lost call now: its slot frees now, and
        its scheduled end is skipped when it comes."""
        if self._stops[call.stage]:
            self._n += 1
            _heappush(self._heap, (self.t, self._n, call, _LOST, None))

    def call_later(self, delay: float, obj: object) -> None:
        self._n += 1
        _heappush(self._heap, (self.t + delay, self._n, obj, _TIMER, None))

    def step(self, sched: Any) -> None:
        """Run events until one makes a result visible (or nothing is left); when the run is
        not ``observed`` (nobody can react to a result before the next), until nothing is left.

        Admission runs after every event, at that event's virtual time, so a freed place is
        taken at the instant it frees, exactly as the live dispatcher does.
        """
        heap = self._heap
        errors = self._errors
        if errors:
            sched.fail_run(errors.pop(0))
        if not heap:
            if sched.done:
                return
            raise RuntimeError("virtual clock: items are in flight but nothing is scheduled "
                               "(an engine bug: please report it)")
        observed = self._observed
        on_done, on_timer, after = sched.on_done, sched.on_timer, sched.after_events
        events = 0
        while heap and not (sched.out and observed):
            events += 1
            if not events & 1023:
                checkpoint()  # lets Ctrl-C in, should this loop ever be compiled
            end, _, obj, start, sim = _heappop(heap)
            if start is not _TIMER and obj.done:
                continue  # a lost call that already ended early
            self.t = end  # never earlier than now: every event is scheduled at now + d, d >= 0
            if start is _TIMER:
                on_timer(obj)
            elif start is _LOST:
                on_done(obj, end, end, False, None)  # recorded when it lost; frees its slot
            elif sim is None:
                on_done(obj, end, end, None, None)
            else:
                if len(sim) > 3 and sim[3] is not None:
                    obj.charged = dict(sim[3])  # what the simulated call actually cost
                if sim[2] is None:
                    on_done(obj, start, end, True, sim[1])
                else:
                    on_done(obj, start, end, False, sim[2])
            if errors:
                sched.fail_run(errors.pop(0))
            after()

    def close(self) -> None:
        self._heap.clear()

