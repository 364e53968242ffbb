"""One run: the scheduler, its backend, its input feed and the loop, with a ``close()`` that
settles on every path, and the run's Ctrl-C handling.

Ctrl-C (live clock, main thread): the engine's SIGINT handler is in force only while control
is inside the engine (never while the caller's own code runs between two results, where
Ctrl-C raises ``KeyboardInterrupt`` as usual). The first Ctrl-C cancels the run: admission
stops, no call starts, running calls finish; then the run raises ``KeyboardInterrupt`` (with
the report, or the last results). A second Ctrl-C during that wait stops waiting at once:
``KeyboardInterrupt`` is raised and the running calls finish in the background (Celery's
warm and cold shutdown).
"""
from __future__ import annotations

import datetime as _dt
import signal
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ._cancel import CancelToken
from ._core import Backend, Policy
from ._durable import Durable
from ._feed import Feed, SyncFeed, ThreadFeed
from ._ledger import Ledger
from ._live import LiveBackend
from ._records import ItemResult
from ._scheduler import Scheduler
from ._stage import Stage
from ._strategies import Strategy
from ._virtual import VirtualBackend

__all__ = ["Clock", "Options", "Run"]

Clock = Literal["live", "virtual"]


@dataclass(frozen=True)
class Options:
    """How one run goes, as ``Pipeline.run``/``stream`` were asked (validated there)."""

    cancel: CancelToken | None = None
    clock: Clock = "live"
    processes: int | None = None
    progress: Any = False
    ordered: bool = False
    ledger: Ledger | None = None
    retry_failed: bool = False
    name: str | None = None  # the pipeline's name (a ledger's entries are keyed by it)
    observe: Sequence[Any] | None = None  # observers: engine.otel(), your own


class _Inside:
    """``with run._sigint():`` -- marks control as inside the engine (a flag, no syscall)."""

    __slots__ = ("inside",)

    def __init__(self) -> None:
        self.inside = False

    def __enter__(self) -> None:
        self.inside = True

    def __exit__(self, *exc: object) -> None:
        self.inside = False


class _Reorder:
    """``stream(..., ordered=True)``: results in input order through a bounded buffer;
    admission waits while it is full, so memory stays bounded."""

    def __init__(self, bound: int) -> None:
        self.bound = bound
        self.next = 0
        self.waiting: dict[int, ItemResult] = {}

    def full(self) -> bool:
        return len(self.waiting) >= self.bound

    def push(self, batch: list[ItemResult]) -> list[ItemResult]:
        waiting = self.waiting
        for r in batch:
            waiting[r.index] = r
        out = []
        while self.next in waiting:
            out.append(waiting.pop(self.next))
            self.next += 1
        return out


class Run:
    """One run of a pipeline over some items."""

    def __init__(self, stages: tuple[Stage, ...], key: Callable[[Any], Hashable] | None,
                 items: Iterable[Any], strategy: Strategy, options: Options) -> None:
        self.strategy = strategy
        self.options = options
        cancel, clock = options.cancel, options.clock
        self.clock = clock
        self.started_at = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
        self.t0 = time.perf_counter()
        self.token = CancelToken()  # the run's own; the caller's token cancels it, not vice versa
        self.interrupted = False  # a first Ctrl-C was caught
        self.hard_stop = False  # a second one: stop waiting
        self.leftover: list[ItemResult] = []  # visible after a Ctrl-C, not yet handed over
        self._cancel = cancel
        self._unlink: Callable[[], None] | None = None
        self._stages = stages
        self._key = key
        self._items = items
        if clock == "virtual":
            VirtualBackend.check(stages)
        self.sched = Scheduler(stages, self.token, virtual=clock == "virtual")
        self.policy = strategy.policy(self.sched)
        if not isinstance(self.policy, Policy):
            raise TypeError(f"strategy: {strategy!r}.policy() must return an engine.Policy, "
                            f"got {self.policy!r}")
        self.durable: Durable | None = None
        if options.ledger is not None:
            assert options.name is not None
            self.durable = Durable(options.ledger, options.name, stages,
                                   retry_failed=options.retry_failed)
            self.sched.durable = self.durable
        self.reorder: _Reorder | None = None
        if options.ordered:
            window = getattr(self.policy, "lookahead", 64)
            self.reorder = _Reorder(max(64, min(window, 1 << 16)))
            self.sched.hold = self.reorder.full
        self.observers: list[Any] = []
        self._main_thread = threading.current_thread() is threading.main_thread()
        self._sigint_checked = False
        self._old_sigint: Any = None
        self._inside_block = _Inside()
        if options.progress or options.observe:
            from ._observe import observers  # tqdm / opentelemetry: only when asked for

            self.observers = observers(options.progress, self.sched.names,
                                       len(items) if isinstance(items, Sequence | range)
                                       else None, options.observe)
        self.backend: Backend | None = None  # threads start with the first result asked for
        self.feed: Feed | None = None
        self.closed = False
        # Nobody can act between two results (run() with no on_result and no cancel token):
        # the virtual clock may then run to the end in one go instead of stopping at each.
        self.observed = True
        self.abandoned = False  # a virtual step raised: close() must not try to settle

    @property
    def params(self) -> dict[str, Any]:
        """The strategy's parameters in force (e.g. the window ``AUTO`` resolved to)."""
        return {**dict(self.strategy.params), **self.policy.params()}

    def _start(self) -> Backend:
        # Not in __init__: a stream() that is never iterated must not leave threads behind.
        if self._cancel is not None:
            self._unlink = self._cancel._on_cancel(self.token.cancel)
        backend: Backend
        if self.durable is not None:
            self.durable.open()  # LedgerBusy if another run holds this pipeline's name
        if self.clock == "virtual":
            backend = VirtualBackend(self._stages, self.token, observed=self.observed)
        elif self.options.processes:
            from ._procs import ProcessBackend  # multiprocessing: only when asked for

            backend = ProcessBackend(self._stages, self.token, self.options.processes)
        else:
            backend = LiveBackend(self._stages, self.token)
        self.backend = backend
        items = self._items
        ahead = self.policy.lookahead
        lookup = self.durable.lookup if self.durable is not None else None
        if self.clock == "virtual" or isinstance(items, Sequence | range):
            self.feed = SyncFeed(iter(items), self._key, lookup)  # in memory: no waiting
        else:
            assert isinstance(backend, LiveBackend)
            self.feed = ThreadFeed(iter(items), self._key, ahead, backend.wake, lookup)
        self.sched.attach(backend, self.policy, self.feed)
        if self.observers:
            from ._observe import RunInfo

            info = RunInfo.at(backend.now(), self.clock, self.strategy.name)
            for ob in self.observers:
                ob.start(info)
        if isinstance(backend, LiveBackend):
            for st, workers in zip(self.sched.stages, backend.executor_workers, strict=True):
                st.executor_workers = workers
        return backend

    def _sigint(self) -> _Inside:
        """A block in which control is inside the engine: there, Ctrl-C cancels the run; out
        of it (the caller's code between two results) it raises ``KeyboardInterrupt`` as
        Python's default handler does. The handler is installed once per run (cheaper than
        swapping it around every step) and removed by ``close()``."""
        if not self._sigint_checked:
            self._sigint_checked = True
            if (self.clock == "live" and self._main_thread
                    and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
                self._old_sigint = signal.signal(signal.SIGINT, self._on_sigint)
        return self._inside_block

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if not self._inside_block.inside:  # the caller's own code: the default behaviour
            raise KeyboardInterrupt
        if self.interrupted:  # the second Ctrl-C: stop waiting
            self.hard_stop = True
            raise KeyboardInterrupt
        self.interrupted = True
        self.token.cancel("KeyboardInterrupt")

    def _restore_sigint(self) -> None:
        if self._old_sigint is not None:
            if signal.getsignal(signal.SIGINT) == self._on_sigint:  # not replaced since
                signal.signal(signal.SIGINT, self._old_sigint)
            self._old_sigint = None

    def batches(self) -> Iterator[list[ItemResult]]:
        """Drive the loop; yield the results that became visible together, as a list. After a
        Ctrl-C, settle, keep the last results in ``leftover`` and stop (the caller raises)."""
        sched = self.sched
        try:
            with self._sigint():
                backend = self._start()
                try:
                    self.policy.fill()
                except BaseException:  # mid-admission (a simulator's BaseException): as below
                    self.abandoned = self.clock == "virtual"
                    raise
            reorder, observers = self.reorder, self.observers
            while True:
                if sched.out or observers:
                    batch, sched.out = sched.out, []
                    for ob in observers:
                        ob.update(batch, sched)
                    if reorder is not None:
                        batch = reorder.push(batch)
                    if batch:
                        yield batch
                if sched.done:
                    break
                try:
                    with self._sigint():
                        backend.step(sched)
                        if self.interrupted:
                            while not sched.done:
                                backend.step(sched)
                except BaseException:
                    # Raised mid-event (Ctrl-C, an engine bug): the virtual clock's state is
                    # half-updated, and with nothing running there is nothing to settle.
                    self.abandoned = self.clock == "virtual"
                    raise
                if self.interrupted:
                    self.leftover, sched.out = sched.out, []
                    break
        finally:
            self.close()

    def close(self) -> None:
        """Cancel what is left, let running calls finish, join every thread. Idempotent."""
        if self.closed:
            return
        self.closed = True
        sched, backend = self.sched, self.backend
        try:
            if backend is not None and not sched.done and not self.abandoned \
                    and not self.hard_stop:
                self.token.cancel("closed")
                with self._sigint():
                    while not sched.done:
                        for ob in self.observers:  # nobody else will read these any more
                            ob.update(sched.out, sched)
                        sched.out.clear()
                        backend.step(sched)
        finally:
            wait = not self.hard_stop
            if backend is not None:
                if isinstance(backend, LiveBackend):
                    backend.close(wait=wait)
                else:
                    backend.close()
            if self.feed is not None and wait:
                self.feed.close()
                self.sched.drop_unadmitted()  # read while the feeder stopped
                self.leftover += self.sched.out
                self.sched.out = []
            if self.reorder is not None:  # what was held back for order, in order
                self.leftover = [*sorted(self.reorder.waiting.values(), key=lambda r: r.index),
                                 *self.leftover]
                self.reorder.waiting.clear()
            if self._unlink is not None:
                self._unlink()
            for ob in self.observers:
                ob.update(self.leftover, sched)  # after a Ctrl-C, and what was never admitted
                ob.close(None)
            if self.durable is not None:
                self.durable.close()
            self._restore_sigint()

    def raise_pending(self) -> None:
        if self.sched.error is not None:
            raise self.sched.error

    def budgets(self) -> tuple[dict[str, Any], ...]:
        """The budgets the stages reserve from, for the report (DESIGN §6.1)."""
        found: dict[int, dict[str, Any]] = {}
        for st in self._stages:
            if st.budget is not None:
                doc = found.setdefault(id(st.budget), {**st.budget.describe(), "stages": []})
                doc["stages"].append(st.name)
        return tuple(found.values())

    def wall(self) -> float:
        assert self.backend is not None
        return (self.backend.now() if self.clock == "virtual"
                else time.perf_counter() - self.t0)
