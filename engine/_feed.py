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
Lookup = Callable[[list[Hashable]], list[Any]] | None  # keys -> ledger entries (or None)
Got = tuple[Any, Hashable, Any]  # value, key, ledger entry
_CHUNK = 64  # keys looked up in the ledger at once
ABANDON_AFTER = 1.0  # seconds a closing run waits for a feeder blocked in next()


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

    def take(self) -> Got | None:
        """The next (value, key, ledger entry), or None when none is available now (see
        ``exhausted``)."""
        raise NotImplementedError

    def stop(self) -> list[Got]:
        """Read no more (the run is cancelled) and hand back what was read ahead: those items
        were taken from the caller's iterator, so the run reports them (cancelled)."""
        return []

    def close(self) -> None:
        """Stop reading (the run is over)."""


class SyncFeed(Feed):
    """Reads the iterator on demand, on the caller's thread."""

    def __init__(self, items: Iterator[Any], key: Key, lookup: Lookup = None) -> None:
        self._it = items
        self._key = key
        self._lookup = lookup
        self._ahead: deque[Got] = deque()
        self.exhausted = False
        self.error = None
        self._ended = False

    def _read(self) -> bool:
        """Read one item (a chunk with a ledger: one lookup per chunk)."""
        if self._ended:
            return False
        pairs: list[tuple[Any, Hashable]] = []
        try:
            while len(pairs) < (_CHUNK if self._lookup is not None else 1):
                try:
                    value = next(self._it)
                except StopIteration:
                    self._ended = True
                    break
                pairs.append((value, _key_of(self._key, value)))
            entries = (self._lookup([k for _, k in pairs]) if self._lookup is not None and pairs
                       else [None] * len(pairs))
        except Exception as exc:
            self._ended = True
            self.error = exc
            return False
        self._ahead.extend((v, k, e) for (v, k), e in zip(pairs, entries, strict=True))
        return bool(pairs)

    def ready(self, n: int) -> bool:
        while len(self._ahead) < n and self._read():
            pass
        return len(self._ahead) >= n or self._ended

    def stop(self) -> list[Got]:
        self._ended = True
        got, self._ahead = list(self._ahead), deque()
        self.exhausted = True
        return got

    def take(self) -> Got | None:
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
                 wake: Callable[[], None], lookup: Lookup = None) -> None:
        self._it = items
        self._key = key
        self._lookup = lookup
        self._cap = max(2, ahead)
        self._buf: deque[Got] = deque()
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
        error: BaseException | None = None
        try:
            self._read_all()
        except BaseException as exc:
            error = exc
        with self._cond:
            self.error = error
            self._ended = True
            starved = self._starved
        if starved:
            self._wake()

    def _read_all(self) -> None:
        it, key, cond, buf, lookup = self._it, self._key, self._cond, self._buf, self._lookup
        pending: list[tuple[Any, Hashable]] = []  # read, not yet looked up in the ledger
        while True:
            with cond:
                # refill in bursts: wait until the buffer is half empty (one wake-up per
                # cap/2 items, not one per item)
                while len(buf) + len(pending) >= self._cap and not self._stop:
                    if pending:
                        break
                    cond.wait()
                if self._stop:
                    buf.extend((v, k, None) for v, k in pending)  # stop() hands these back
                    return
                low = len(buf) < max(1, self._cap // 4)
            if pending and (len(pending) >= _CHUNK or low
                            or len(buf) + len(pending) >= self._cap):
                self._deliver(pending, lookup)
                pending = []
                continue
            try:
                value = next(it)
            except StopIteration:
                break
            pair = (value, _key_of(key, value))
            if lookup is None:
                self._deliver([pair], None)
            else:
                pending.append(pair)
        if pending:
            self._deliver(pending, lookup)

    def _deliver(self, pairs: list[tuple[Any, Hashable]], lookup: Lookup) -> None:
        entries = lookup([k for _, k in pairs]) if lookup is not None else [None] * len(pairs)
        with self._cond:
            self._buf.extend((v, k, e) for (v, k), e in zip(pairs, entries, strict=True))
            wake = self._starved and len(self._buf) >= self._want
            if wake:
                self._starved = False
        if wake:
            self._wake()

    def ready(self, n: int) -> bool:
        with self._cond:
            if len(self._buf) >= n or self._ended:
                return True
            self._starved = True
            self._want = min(n, self._cap)
            return False

    def take(self) -> Got | None:
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

    def stop(self) -> list[Got]:
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
            # a feeder blocked in the caller's next() (a page that never comes) must not
            # hold the run: after a grace period it is left to finish on its own (a daemon
            # thread), and what that next() returns is dropped
            self._thread.join(ABANDON_AFTER)
