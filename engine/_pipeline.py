"""Pipeline: the public entry point. Validates, builds a run, drives the scheduler's loop."""
from __future__ import annotations

import datetime as _dt
import signal
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from typing import Any, Literal

from ._backends import LiveBackend, VirtualBackend
from ._cancel import CancelToken
from ._records import ItemResult, RunReport
from ._scheduler import Backend, Scheduler
from ._stage import Stage
from ._strategies import Batched, Continuous, ParallelBatches, Strategy

__all__ = ["Pipeline"]

Clock = Literal["live", "virtual"]


class _Run:
    """One run: scheduler + backend + the loop, with a close() that settles on every path."""

    def __init__(self, pipeline: Pipeline, items: Iterable[Any], strategy: Strategy,
                 cancel: CancelToken | None, clock: Clock) -> None:
        self.strategy = strategy
        self.clock = clock
        self.started_at = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
        self.t0 = time.perf_counter()
        self.token = CancelToken()  # the run's own; the caller's token cancels it, not vice versa
        self.interrupted = False
        self._cancel = cancel
        self._unlink: Any = None
        self._old_sigint: Any = None
        self._stages = pipeline.stages
        if clock == "virtual":
            VirtualBackend.check(pipeline.stages)
        self.sched = Scheduler(pipeline.stages, strategy, iter(items), pipeline.key, self.token)
        self.backend: Backend | None = None  # threads start with the first result asked for
        self.params = dict(strategy.params)
        if isinstance(strategy, Continuous):  # report the bound in force, not "auto"
            self.params["max_in_flight"] = strategy.window(self.sched.limits)
        self.closed = False
        # Nobody can act between two results (run() with no on_result and no cancel token):
        # the virtual clock may then run to the end in one go instead of stopping at each.
        self.observed = True
        self.abandoned = False  # a virtual step raised: close() must not try to settle

    def _start(self) -> Backend:
        # Not in __init__: a stream() that is never iterated must not leave threads behind.
        if self._cancel is not None:
            self._unlink = self._cancel._on_cancel(self.token.cancel)
        backend: Backend
        if self.clock == "virtual":
            backend = VirtualBackend(self._stages, self.token, observed=self.observed)
        else:
            backend = LiveBackend(self._stages, self.token)
        self.backend = backend
        self.sched.attach(backend)
        return backend

    def _install_sigint(self) -> None:
        # Ctrl-C cancels the run instead of raising mid-decision; the loop re-raises
        # KeyboardInterrupt once every in-flight call has settled and the report is complete.
        if (self.clock == "live" and threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            def on_sigint(signum: int, frame: Any) -> None:
                self.interrupted = True
                self.token.cancel("KeyboardInterrupt")

            self._old_sigint = signal.signal(signal.SIGINT, on_sigint)

    def results(self) -> Iterator[ItemResult]:
        """Drive the loop; yield each result the moment it becomes visible."""
        for batch in self.batches():
            yield from batch

    def batches(self) -> Iterator[list[ItemResult]]:
        """Drive the loop; yield the results that became visible together, as a list."""
        sched = self.sched
        try:
            backend = self._start()
            self._install_sigint()
            sched.policy.fill()
            while True:
                if sched.out:
                    batch, sched.out = sched.out, []
                    yield batch
                if sched.done:
                    break
                try:
                    backend.step(sched)
                except BaseException:
                    # Raised mid-event (Ctrl-C, a simulator's bug): the virtual clock's state
                    # is half-updated, and with nothing running there is nothing to settle.
                    self.abandoned = self.clock == "virtual"
                    raise
                sched.policy.fill()
        finally:
            self.close()

    def close(self) -> None:
        """Cancel what is left, let running calls finish, join every thread. Idempotent."""
        if self.closed:
            return
        self.closed = True
        sched, backend = self.sched, self.backend
        try:
            if backend is not None and not sched.done and not self.abandoned:
                self.token.cancel("closed")
                while not sched.done:
                    sched.out.clear()  # nobody will read these any more
                    backend.step(sched)
        finally:
            if backend is not None:
                backend.close()
            if self._unlink is not None:
                self._unlink()
            if self._old_sigint is not None:
                signal.signal(signal.SIGINT, self._old_sigint)

    def raise_pending(self) -> None:
        if self.sched.error is not None:
            raise self.sched.error


class Pipeline:
    """A per-item pipeline: stages run in order for each item, under per-stage limits."""

    def __init__(self, stages: Sequence[Stage], *,
                 key: Callable[[Any], Hashable] | None = None) -> None:
        if isinstance(stages, Stage) or not isinstance(stages, Sequence):
            raise TypeError(f"Pipeline.stages: expected a sequence of Stage, got {stages!r}")
        if not stages:
            raise ValueError("Pipeline.stages: expected at least one Stage, got an empty list")
        seen: set[str] = set()
        for i, st in enumerate(stages):
            if not isinstance(st, Stage):
                raise TypeError(f"Pipeline.stages[{i}]: expected a Stage, got {st!r}")
            if st.name in seen:
                raise ValueError(f"Pipeline.stages[{i}].name: duplicate stage name {st.name!r}")
            seen.add(st.name)
        if key is not None and not callable(key):
            raise TypeError(f"Pipeline.key: expected a callable or None, got {key!r}")
        self.stages: tuple[Stage, ...] = tuple(stages)
        self.key = key

    def __repr__(self) -> str:
        inner = ", ".join(f"{s.name}({s.concurrency})" for s in self.stages)
        return f"Pipeline([{inner}])"

    def _prepare(self, items: Iterable[Any], strategy: Strategy | None,
                 cancel: CancelToken | None, clock: Clock) -> _Run:
        if strategy is None:
            strategy = Continuous()
        if not isinstance(strategy, Continuous | Batched | ParallelBatches):
            raise TypeError(
                f"strategy: expected Continuous, Batched or ParallelBatches, got {strategy!r}")
        if cancel is not None and not isinstance(cancel, CancelToken):
            raise TypeError(f"cancel: expected a CancelToken or None, got {cancel!r}")
        if clock not in ("live", "virtual"):
            raise ValueError(f"clock: expected 'live' or 'virtual', got {clock!r}")
        try:
            iter(items)
        except TypeError:
            raise TypeError(f"items: expected an iterable, got {items!r}") from None
        return _Run(self, items, strategy, cancel, clock)

    def stream(self, items: Iterable[Any], strategy: Strategy | None = None, *,
               cancel: CancelToken | None = None, clock: Clock = "live") -> Iterator[ItemResult]:
        """Yield each item's result the moment it is visible; ``items`` is consumed lazily.

        Closing the iterator early cancels the rest and joins every thread. After a Ctrl-C the
        remaining results (cancelled) are still yielded, then KeyboardInterrupt is raised.
        """
        run = self._prepare(items, strategy, cancel, clock)
        return self._stream(run)

    @staticmethod
    def _stream(run: _Run) -> Iterator[ItemResult]:
        try:
            yield from run.results()
        finally:
            run.close()
        run.raise_pending()
        if run.interrupted:
            raise KeyboardInterrupt

    def run(self, items: Iterable[Any], strategy: Strategy | None = None, *,
            on_result: Callable[[ItemResult], Any] | None = None,
            cancel: CancelToken | None = None, clock: Clock = "live") -> RunReport:
        """Run to the end and return the complete report.

        ``on_result`` is called with each result as it becomes visible. If it raises, or the
        input iterator does, the run stops admitting, lets in-flight work settle, and re-raises
        that exception. On Ctrl-C the run is cancelled the same way, then KeyboardInterrupt is
        raised with the complete report as its ``report`` attribute.
        """
        if on_result is not None and not callable(on_result):
            raise TypeError(f"on_result: expected a callable or None, got {on_result!r}")
        run = self._prepare(items, strategy, cancel, clock)
        run.observed = on_result is not None or cancel is not None
        results: list[ItemResult] = []
        try:
            for batch in run.batches():
                results += batch
                if on_result is not None:
                    for r in batch:
                        try:
                            on_result(r)
                        except Exception as exc:
                            run.sched.fail_run(exc)
        finally:
            run.close()
        results.sort(key=lambda r: r.index)
        wall = (run.sched.backend.now() if run.clock == "virtual"
                else time.perf_counter() - run.t0)
        report = RunReport(tuple(results), run.sched.stats(wall), run.strategy.name,
                           run.params, run.clock, wall, run.started_at)
        run.raise_pending()
        if run.interrupted:
            interrupt = KeyboardInterrupt()
            interrupt.report = report  # type: ignore[attr-defined]
            raise interrupt
        return report
