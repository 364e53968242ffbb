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

import contextlib
import datetime as _dt
import signal
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from typing import Any, Literal

from ._cancel import CancelToken
from ._core import Backend
from ._feed import Feed, SyncFeed, ThreadFeed
from ._live import LiveBackend
from ._records import ItemResult
from ._scheduler import Scheduler
from ._stage import Stage
from ._strategies import Strategy
from ._virtual import VirtualBackend

__all__ = ["Clock", "Run"]

Clock = Literal["live", "virtual"]


class Run:
    """One run of a pipeline over some items."""

    def __init__(self, stages: tuple[Stage, ...], key: Callable[[Any], Hashable] | None,
                 items: Iterable[Any], strategy: Strategy, cancel: CancelToken | None,
                 clock: Clock) -> None:
        self.strategy = strategy
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
        self.sched = Scheduler(stages, SyncFeed(iter(()), None), self.token,
                               virtual=clock == "virtual")
        self.policy = strategy.policy(self.sched)
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
        if self.clock == "virtual":
            backend = VirtualBackend(self._stages, self.token, observed=self.observed)
        else:
            backend = LiveBackend(self._stages, self.token)
        self.backend = backend
        items = self._items
        ahead = self.policy.lookahead
        if self.clock == "virtual" or isinstance(items, Sequence | range):
            self.feed = SyncFeed(iter(items), self._key)  # in memory: nothing to wait for
        else:
            assert isinstance(backend, LiveBackend)
            self.feed = ThreadFeed(iter(items), self._key, ahead, backend.wake)
        self.sched.feed = self.feed
        self.sched.attach(backend, self.policy)
        if isinstance(backend, LiveBackend):
            for st, workers in zip(self.sched.stages, backend.executor_workers, strict=True):
                st.executor_workers = workers
        return backend

    @contextlib.contextmanager
    def _sigint(self) -> Iterator[None]:
        """The engine's SIGINT handler, in force only inside this block."""
        if (self.clock != "live" or threading.current_thread() is not threading.main_thread()
                or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
            yield
            return

        def on_sigint(signum: int, frame: Any) -> None:
            if self.interrupted:  # the second Ctrl-C: stop waiting
                self.hard_stop = True
                raise KeyboardInterrupt
            self.interrupted = True
            self.token.cancel("KeyboardInterrupt")

        old = signal.signal(signal.SIGINT, on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, old)

    def batches(self) -> Iterator[list[ItemResult]]:
        """Drive the loop; yield the results that became visible together, as a list. After a
        Ctrl-C, settle, keep the last results in ``leftover`` and stop (the caller raises)."""
        sched = self.sched
        try:
            with self._sigint():
                backend = self._start()
                self.policy.fill()
            while True:
                if sched.out:
                    batch, sched.out = sched.out, []
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
                        sched.out.clear()  # nobody will read these any more
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
            if self._unlink is not None:
                self._unlink()

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
