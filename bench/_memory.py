"""How much memory a run of a scenario needs, and how much this machine has.

A run keeps a record of every item (the engine's report holds each item's stages and calls until
the run ends; the results document, written and read back, holds them again), so a run's memory
grows with ``items x calls``. ``estimate_bytes`` is that cost, from what tracemalloc measures
on the seed scenario's stages (``tests/test_bench_memory.py`` measures it afresh and checks the
constants cover it, within 3x): each further item costs ~620 bytes plus ~600 per stage call,
whichever of the two phases is larger -- running one strategy and writing its file, or reading
the file back and checking it (pure-Python engine; the compiled one costs a little less).

The estimate adds headroom (~1.4x): ``PER_ITEM + PER_CALL x expected calls`` per item.
``fits_message`` (which scenario validation calls) refuses a scenario whose estimate exceeds
the machine's physical memory (or its cgroup's limit), so ``items = 10000000000`` is one line
naming the field, not a process that grows until the kernel kills it.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

__all__ = ["PER_CALL", "PER_ITEM", "estimate_bytes", "expected_calls", "fits_message",
           "machine_memory"]

PER_ITEM = 1000  #: bytes per item, whatever its stages (record, key, visible time, list)
PER_CALL = 800  #: bytes per stage call of an item (span, call times, attempts)


class _Retry(Protocol):
    @property
    def attempts(self) -> int: ...


class _Stage(Protocol):
    @property
    def error_rate(self) -> float: ...
    @property
    def retry(self) -> _Retry | None: ...
    @property
    def timeout(self) -> float | None: ...
    @property
    def rate_limit(self) -> object: ...
    @property
    def outages(self) -> Sequence[tuple[float, float]]: ...


def expected_calls(stage: _Stage) -> float:
    """Calls per item of a stage: 1 + the expected retries at its error rate, plus one more
    (within its attempts) when timeouts, a rate limit or outages can fail calls beyond it."""
    attempts = stage.retry.attempts if stage.retry is not None else 1
    r = stage.error_rate
    calls = float(attempts) if r >= 1 else (1 - r ** attempts) / (1 - r)
    if stage.timeout is not None or stage.rate_limit is not None or stage.outages:
        calls = min(float(attempts), calls + 1)
    return calls


def estimate_bytes(items: int, stages: Sequence[_Stage]) -> int:
    """Peak memory of one run of ``items`` items through ``stages`` (records and results
    document), not counting the interpreter and its imports."""
    return int(items * _per_item(stages))


def _per_item(stages: Sequence[_Stage]) -> float:
    return PER_ITEM + PER_CALL * sum(expected_calls(s) for s in stages)


def _cgroup_limit() -> int | None:
    for f in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(f).read_text(encoding="ascii").strip()
        except (OSError, ValueError):
            continue
        if text.isdigit():
            return int(text)
    return None


@functools.cache
def machine_memory() -> int | None:
    """Physical memory in bytes, or the cgroup's limit when that is lower; None if unknown."""
    try:
        phys: int | None = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        phys = None
    limit = _cgroup_limit()
    known = [m for m in (phys, limit) if m is not None and m > 0]
    return min(known) if known else None


def _gb(n: float) -> str:
    return f"{n / 2**30:,.1f} GB" if n < 2**40 * 10 else f"{n / 2**40:,.0f} TB"


def fits_message(items: int, stages: Sequence[_Stage], memory: int | None = None) -> str | None:
    """None when a run fits in memory, else what to say about ``items`` (one line)."""
    memory = machine_memory() if memory is None else memory
    if memory is None:
        return None
    need = estimate_bytes(items, stages)
    if need <= memory:
        return None
    per_item = _per_item(stages)
    most = int(memory // per_item)
    while estimate_bytes(most + 1, stages) <= memory:  # float rounding, either way
        most += 1
    while most > 0 and estimate_bytes(most, stages) > memory:
        most -= 1
    return (f"expected at most {most:,} items on this machine (a run keeps every item's "
            f"record, ~{per_item:,.0f} bytes per item for these stages: {items:,} items need "
            f"~{_gb(need)}, the machine has {_gb(memory)})")
