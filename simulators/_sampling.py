"""Per-item random numbers that depend on (seed, name, item index, attempt) only.

Why blocks: a simulated call on the virtual clock must cost about a microsecond, and building a
``numpy.random.Generator`` costs tens of microseconds. So the numbers for ``BLOCK_SIZE``
consecutive item indices (same seed, name and attempt) are drawn at once::

    SeedSequence([seed, crc32(name), attempt, block, stream]) -> Generator -> n draws -> .tolist()

and cached; a call is then a dict lookup plus a list index. ``stream`` 0 holds latencies and
stream 1 the uniforms that decide faults, so changing a latency spec never changes which items
fail (and vice versa); stream 2 holds the uniforms that decide whether a repeated call (a retry)
repeats the item's first latency (``correlation``). A hedge (a duplicate of an attempt) has its
own three streams (3, 4, 5), so it never shares numbers with the attempt it duplicates.
The numbers do not depend on the order in which blocks are first asked
for, nor on threads: live and virtual runs see the same per-item values.

The cache keeps the ``max_blocks`` most recently *created* blocks (first in, first out): items
are admitted in input order, so accesses sweep forward and memory stays bounded on a run of a
million items. An evicted block is re-created identically if it is needed again.
"""

from __future__ import annotations

import math
import threading
import zlib
from collections.abc import Callable
from typing import Generic, TypeVar

import numpy as np

from ._distributions import Distribution, FloatArray

__all__ = ["BLOCK_SIZE", "BlockCache", "draw_block", "draw_uniforms", "stable_hash"]

BLOCK_SHIFT = 12
BLOCK_SIZE = 1 << BLOCK_SHIFT  # 4096 item indices per block
BLOCK_MASK = BLOCK_SIZE - 1  # index & BLOCK_MASK: the index's place in its block
LATENCY_STREAM = 0
FAULT_STREAM = 1
REPEAT_STREAM = 2
HEDGE_STREAMS = 3  #: a hedge's streams: the attempt's plus this offset

T = TypeVar("T")

# numpy builds part of SeedSequence's machinery on first use (~10 ms here); pay it at import
# rather than inside the first timed virtual run.
np.random.SeedSequence(0).generate_state(1)


def check_seed_and_scale(seed: object, time_scale: object) -> None:
    """Validate the two knobs every simulated service and fake server takes."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: expected an integer >= 0, got {seed!r}")
    if (
        isinstance(time_scale, bool)
        or not isinstance(time_scale, int | float)
        or not (math.isfinite(time_scale) and time_scale >= 0)
    ):
        raise ValueError(f"time_scale: expected a finite number >= 0, got {time_scale!r}")


def stable_hash(text: str) -> int:
    """A hash of ``text`` that is the same in every process (unlike ``hash()``)."""
    return zlib.crc32(text.encode("utf-8"))


def _rng(seed: int, name: str, attempt: int, block: int, stream: int) -> np.random.Generator:
    ss = np.random.SeedSequence([seed, stable_hash(name), attempt, block, stream])
    return np.random.Generator(np.random.PCG64(ss))


def draw_block(
    latency: Distribution,
    seed: int,
    name: str,
    attempt: int,
    block: int,
    n: int = BLOCK_SIZE,
    *,
    hedge: bool = False,
) -> tuple[FloatArray, FloatArray]:
    """Latencies and fault uniforms for item indices ``block*n .. block*n+n-1`` at ``attempt``
    (of its hedge when ``hedge``)."""
    off = HEDGE_STREAMS if hedge else 0
    lat_rng = _rng(seed, name, attempt, block, LATENCY_STREAM + off)
    u_rng = _rng(seed, name, attempt, block, FAULT_STREAM + off)
    return latency.sample(lat_rng, n), u_rng.random(n)


def draw_uniforms(
    seed: int, name: str, attempt: int, block: int, stream: int, n: int = BLOCK_SIZE
) -> FloatArray:
    """``n`` uniforms in [0, 1) of one named stream (e.g. ``REPEAT_STREAM``)."""
    return _rng(seed, name, attempt, block, stream).random(n)


class BlockCache(Generic[T]):
    """Bounded cache of per-block values, keyed by ``(attempt, block)``.

    ``get`` is lock-free on a hit (a dict read is atomic under the GIL); creation and eviction
    happen under a lock so two threads never build the same block twice.
    """

    __slots__ = ("_blocks", "_lock", "_make", "max_blocks")

    def __init__(self, make: Callable[[int, int], T], max_blocks: int = 64) -> None:
        if max_blocks < 1:
            raise ValueError(f"max_blocks: expected an integer >= 1, got {max_blocks!r}")
        self._make = make
        self._blocks: dict[tuple[int, int], T] = {}
        self._lock = threading.Lock()
        self.max_blocks = max_blocks

    def get(self, attempt: int, block: int) -> T:
        key = (attempt, block)
        value = self._blocks.get(key)
        if value is None:
            value = self.create(key)
        return value

    def create(self, key: tuple[int, int]) -> T:
        with self._lock:
            value = self._blocks.get(key)
            if value is None:
                value = self._make(*key)
                blocks = self._blocks
                while len(blocks) >= self.max_blocks:
                    del blocks[next(iter(blocks))]
                blocks[key] = value
            return value

    def clear(self) -> None:
        with self._lock:
            self._blocks.clear()

    def __len__(self) -> int:
        return len(self._blocks)
