"""Cancellation: explicit, one-way, and cheap to check (a flag read, never I/O)."""
from __future__ import annotations

import threading
from collections.abc import Callable

__all__ = ["CancelToken"]


class CancelToken:
    """Stop a run: admission stops at once, running calls finish, the rest end ``cancelled``.

    A token can be made anywhere, passed around and cancelled from any thread (or a signal
    handler); cancelling is one-way and idempotent.
    """

    __slots__ = ("_callbacks", "_lock", "cancelled", "reason")

    def __init__(self) -> None:
        self.cancelled = False
        self.reason: str | None = None
        self._callbacks: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    def cancel(self, reason: str | None = None) -> None:
        """Cancel. Safe to call more than once and from any thread."""
        with self._lock:
            if self.cancelled:
                return
            self.cancelled = True
            self.reason = reason
            callbacks, self._callbacks = self._callbacks, []
        for cb in callbacks:
            cb()

    def _on_cancel(self, cb: Callable[[], None]) -> Callable[[], None]:
        """Call ``cb`` when cancelled (at once if already); returns a function that removes it."""
        with self._lock:
            if not self.cancelled:
                self._callbacks.append(cb)

                def remove() -> None:
                    with self._lock:
                        if cb in self._callbacks:
                            self._callbacks.remove(cb)

                return remove
        cb()
        return lambda: None

    def __repr__(self) -> str:
        return f"<CancelToken cancelled={self.cancelled}>"
