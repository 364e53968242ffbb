"""Reading the input: lazily, in order, with each item's key, and never on the dispatcher's time.

``SyncFeed`` reads the iterator when the scheduler asks (the virtual clock, and inputs that are
already in memory: a list costs nothing to read). ``ThreadFeed`` reads it on a feeder thread
into a bounded read-ahead buffer, so a slow iterator (a paginated API taking 0.3 s a page)
never keeps the dispatcher from moving finished calls on: memory stays bounded by the
read-ahead, and the dispatcher is woken when items arrive.

Any exception from the iterator or the key function -- ``StopIteration`` raised *by the key
function* included -- is the run's error (``feed.error``), never a silently shorter input.
"""
from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from typing import Any

__all__ = ["Feed", "SyncFeed", "ThreadFeed"]

Key = Callable[[Any], Hashable] | None


def _key_of(key: Key, value: Any) -> Hashable:
    if key is None:
        return None
    try:
        return key(value)
    except StopIteration as exc:  # would otherwise look like the end of the input
        raise RuntimeError(f"the key function raised StopIteration for {value!r}") from exc


class Feed:
    """The scheduler's view of the input."""

    exhausted: bool = False  # nothing more will come (the end, or an error)
    error: BaseException | None = None

    def ready(self, n: int) -> bool:
        """At least ``n`` items can be taken now, or the input ends before that."""
        raise NotImplementedError

    def take(self) -> tuple[Any, Hashable] | None:
        """The next (value, key), or None when none is available now (see ``exhausted``)."""
        raise NotImplementedError

    def stop(self) -> list[tuple[Any, Hashable]]:
        """Read no more (the run is cancelled) and hand back what was read ahead: those items
        were taken from the caller's iterator, so the run reports them (cancelled)."""
        return []

    def close(self) -> None:
        """Stop reading (the run is over)."""


class SyncFeed(Feed):
    """Reads the iterator on demand, on the caller's thread."""

    def __init__(self, items: Iterator[Any], key: Key) -> None:
        self._it = items
        self._key = key
        self._ahead: deque[tuple[Any, Hashable]] = deque()
        self.exhausted = False
        self.error = None
        self._ended = False

    def _read(self) -> bool:
        if self._ended:
            return False
        try:
            value = next(self._it)
        except StopIteration:
            self._ended = True
            return False
        except Exception as exc:
            self._ended = True
            self.error = exc
            return False
        try:
            self._ahead.append((value, _key_of(self._key, value)))
        except Exception as exc:
            self._ended = True
            self.error = exc
            return False
        return True

    def ready(self, n: int) -> bool:
        while len(self._ahead) < n and self._read():
            pass
        return len(self._ahead) >= n or self._ended

    def stop(self) -> list[tuple[Any, Hashable]]:
        self._ended = True
        got, self._ahead = list(self._ahead), deque()
        self.exhausted = True
        return got

    def take(self) -> tuple[Any, Hashable] | None:
        if not self._ahead and not self._read():
            self.exhausted = True
            return None
        got = self._ahead.popleft()
        if not self._ahead and self._ended:
            self.exhausted = True
        return got


class ThreadFeed(Feed):
    """Reads the iterator on a feeder thread, up to ``ahead`` items ahead of admission."""

    def __init__(self, items: Iterator[Any], key: Key, ahead: int,
                 wake: Callable[[], None]) -> None:
        self._it = items
        self._key = key
        self._cap = max(2, ahead)
        self._buf: deque[tuple[Any, Hashable]] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._wake = wake
        self._starved = False  # the dispatcher found the buffer short: wake it on arrival
        self._want = 1
        self._ended = False  # the feeder read the end (or an error)
        self._stop = False
        self.exhausted = False
        self.error = None
        self._thread = threading.Thread(target=self._run, name="conveyor-feeder", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        it, key, cond, buf = self._it, self._key, self._cond, self._buf
        error: BaseException | None = None
        try:
            while True:
                with cond:
                    # refill in bursts: wait until the buffer is half empty (one wake-up per
                    # cap/2 items, not one per item)
                    while len(buf) >= self._cap and not self._stop:
                        cond.wait()
                    if self._stop:
                        return
                try:
                    value = next(it)
                except StopIteration:
                    break
                pair = (value, _key_of(key, value))
                with cond:
                    buf.append(pair)  # even when stopping: stop()/close() hand it back
                    if self._stop:
                        return
                    wake = self._starved and len(buf) >= self._want
                    if wake:
                        self._starved = False
                if wake:
                    self._wake()
        except BaseException as exc:
            error = exc
        with cond:
            self.error = error
            self._ended = True
            starved = self._starved
        if starved:
            self._wake()

    def ready(self, n: int) -> bool:
        with self._cond:
            if len(self._buf) >= n or self._ended:
                return True
            self._starved = True
            self._want = min(n, self._cap)
            return False

    def take(self) -> tuple[Any, Hashable] | None:
        with self._cond:
            buf = self._buf
            if not buf:
                if self._ended:
                    self.exhausted = True
                else:
                    self._starved = True
                    self._want = 1
                return None
            got = buf.popleft()
            if len(buf) <= self._cap // 2:
                self._cond.notify()
            if not buf and self._ended:
                self.exhausted = True
            return got

    def stop(self) -> list[tuple[Any, Hashable]]:
        with self._cond:
            self._stop = True
            self._cond.notify()
            got = list(self._buf)
            self._buf.clear()
            return got

    def close(self) -> None:
        """Stop the feeder and join it (it finishes the ``next()`` it may be in)."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not threading.current_thread():
            self._thread.join()
