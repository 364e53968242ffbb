"""Frozen result records: what a run hands back, and the results document of DESIGN.md §6.

Records are immutable so they can be shared between threads and kept after the run. ``Attempt``
and ``StageSpan`` are named tuples: they are built once per call on the engine's hot path, and a
tuple costs a third of a frozen dataclass to build.
"""
from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import FrozenInstanceError, dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

__all__ = [
    "Attempt",
    "ErrorInfo",
    "ItemResult",
    "RunReport",
    "StageSpan",
    "StageStats",
    "percentile",
    "summarize",
]

Status = Literal["ok", "failed", "cancelled"]


class ErrorInfo(NamedTuple):
    """An exception, reduced to what can be stored and compared: stage, type name, message."""

    stage: str
    type: str
    message: str

    @classmethod
    def from_exception(cls, stage: str, exc: BaseException) -> ErrorInfo:
        return cls(stage, type(exc).__name__, str(exc))


class Attempt(NamedTuple):
    """One call of a stage: when it started and ended (seconds since the run started)."""

    start: float
    end: float
    error: ErrorInfo | None = None


class StageSpan(NamedTuple):
    """An item's passage through one stage: every attempt, in order."""

    name: str
    start: float
    end: float
    attempts: tuple[Attempt, ...]


_set = object.__setattr__
_FIELDS = ("index", "key", "status", "value", "error", "stages", "visible_at")


class ItemResult:
    """The outcome of one item, handed over when it becomes visible (immutable, like a frozen
    dataclass: fields ``index, key, status, value, error, stages, visible_at``).

    ``stages`` (one :class:`StageSpan` per stage the item entered) is built on first access:
    the scheduler records a call as two floats, not three records, which is most of what a
    result costs to make and to keep. Reading it is the same either way.
    """

    __slots__ = ("_names", "_stages", "_trace", "error", "index", "key", "status", "value",
                 "visible_at")
    __match_args__ = ("index", "key", "status", "value", "error", "stages", "visible_at")

    index: int
    key: Hashable
    status: Status
    value: Any
    error: ErrorInfo | None
    visible_at: float | None
    _stages: tuple[StageSpan, ...] | None
    _trace: list[Any] | None
    _names: Sequence[str] | None

    def __init__(self, index: int, key: Hashable, status: Status, value: Any,
                 error: ErrorInfo | None, stages: Sequence[StageSpan],
                 visible_at: float | None) -> None:
        _set(self, "index", index)
        _set(self, "key", key)
        _set(self, "status", status)
        _set(self, "value", value)
        _set(self, "error", error)
        _set(self, "visible_at", visible_at)
        _set(self, "_stages", tuple(stages))
        _set(self, "_trace", None)
        _set(self, "_names", None)

    @property
    def stages(self) -> tuple[StageSpan, ...]:
        spans = self._stages
        if spans is None:
            trace = self._trace
            if trace is None:  # another thread built them since: _stages is set before this
                return self._stages  # type: ignore[return-value]
            spans = tuple(_spans(trace, self._names))  # type: ignore[arg-type]
            _set(self, "_stages", spans)  # two threads may both build them: equal tuples
            _set(self, "_trace", None)
        return spans

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def _fields(self) -> tuple[Any, ...]:
        return (self.index, self.key, self.status, self.value, self.error, self.stages,
                self.visible_at)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        body = ", ".join(f"{n}={v!r}" for n, v in zip(_FIELDS, self._fields(), strict=True))
        return f"{type(self).__name__}({body})"

    def __setattr__(self, name: str, value: Any) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), self._fields())



def _trace_rows(trace: list[Any], names: Sequence[str]
                ) -> Iterator[StageSpan | tuple[str, float, float]]:
    """Walk a compact trace: per stage entered, in order, the scheduler (``engine._scheduler``,
    which also builds these results) wrote either ``start, end`` (one successful call) or a
    ready :class:`StageSpan` (any other case). Yields that span, or ``(name, start, end)``."""
    i, k, n = 0, 0, len(trace)
    while i < n:
        x = trace[i]
        if x.__class__ is StageSpan:
            yield x
            i += 1
        else:
            yield names[k], x, trace[i + 1]
            i += 2
        k += 1


def _spans(trace: list[Any], names: Sequence[str]) -> Iterator[StageSpan]:
    """The :class:`StageSpan` records of a compact trace."""
    for row in _trace_rows(trace, names):
        if isinstance(row, StageSpan):
            yield row
        else:
            name, start, end = row
            yield StageSpan(name, start, end, (Attempt(start, end, None),))


@dataclass(frozen=True, slots=True)
class StageStats:
    """Per-stage statistics of a run (seconds are engine-clock seconds)."""

    name: str
    concurrency: int
    calls: int
    errors: int
    retries: int
    busy_s: float  #: sum of call durations
    queue_wait_s: float  #: sum over calls of (start - time the item was queued for the stage)
    peak_in_flight: int
    wall_s: float

    @property
    def busy_share(self) -> float:
        """Share of the stage's slot-time spent in calls: busy / (concurrency x wall time)."""
        cap = self.concurrency * self.wall_s
        return self.busy_s / cap if cap > 0 else 0.0


def percentile(sorted_xs: Sequence[float], q: float) -> float:
    """``numpy.percentile``'s default (linear) method, on an already sorted sequence."""
    if not sorted_xs:
        raise ValueError("percentile of an empty sequence")
    h = (len(sorted_xs) - 1) * q / 100.0
    lo = math.floor(h)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (h - lo) * (sorted_xs[hi] - sorted_xs[lo])


def summarize(items: Sequence[Mapping[str, Any]], limits: Mapping[str, int]) -> dict[str, Any]:
    """The §6 summary, computed from item documents only (``to_json()["items"]``).

    Undefined values (nothing visible, no ok item) are 0, so every field is a number. The
    harness (``bench._metrics``) recomputes the same summary independently, with numpy, to
    verify what the engine wrote.
    """
    counts = {"ok": 0, "failed": 0, "cancelled": 0}
    visible_ok: list[float] = []
    visible_any: list[float] = []
    busy: dict[str, float] = dict.fromkeys(limits, 0.0)
    chain_max = 0.0
    for it in items:
        counts[it["status"]] += 1
        total = 0.0
        for st in it["stages"]:
            b = sum(e - s for s, e in st["calls"])
            busy[st["name"]] += b
            total += b
        chain_max = max(chain_max, total)
        v = it["visible_at"]
        if v is not None:
            visible_any.append(v)
            if it["status"] == "ok":
                visible_ok.append(v)
    makespan = max(visible_any) if visible_any else 0.0
    lower = max([busy[n] / limits[n] for n in busy] + [chain_max, 0.0])
    xs = sorted(visible_ok)

    def pct(q: float) -> float:
        return percentile(xs, q) if xs else 0.0

    return {
        "makespan_s": makespan,
        "throughput_per_s": counts["ok"] / makespan if makespan > 0 else 0.0,
        "lower_bound_s": lower,
        "efficiency": lower / makespan if makespan > 0 else 0.0,
        "first_visible_s": xs[0] if xs else 0.0,
        "visible_p50_s": pct(50),
        "visible_p90_s": pct(90),
        "visible_p99_s": pct(99),
        "visible_max_s": xs[-1] if xs else 0.0,
        **counts,
    }


def _item_doc(r: ItemResult, scale: float) -> dict[str, Any]:
    return {
        "index": r.index,
        "key": str(r.key),
        "status": r.status,
        "visible_at": None if r.visible_at is None else r.visible_at / scale,
        "error": None if r.error is None else r.error._asdict(),
        "stages": _stage_docs(r, scale),
    }


def _stage_docs(r: ItemResult, scale: float) -> list[dict[str, Any]]:
    trace, names = r._trace, r._names
    if trace is None or names is None:  # built by hand, or its stages were already read
        return [_span_doc(sp, scale) for sp in r.stages]
    docs = []
    for row in _trace_rows(trace, names):  # read directly: no StageSpan for a one-call stage
        if isinstance(row, StageSpan):
            docs.append(_span_doc(row, scale))
        else:
            name, start, end = row
            start, end = start / scale, end / scale
            docs.append({"name": name, "start": start, "end": end, "attempts": 1,
                         "calls": [[start, end]]})
    return docs


def _span_doc(sp: StageSpan, scale: float) -> dict[str, Any]:
    return {
        "name": sp.name,
        "start": sp.start / scale,
        "end": sp.end / scale,
        "attempts": len(sp.attempts),
        "calls": [[a.start / scale, a.end / scale] for a in sp.attempts],
    }


@dataclass(frozen=True)
class RunReport:
    """Everything a run produced: every item, per-stage statistics, the strategy, wall time."""

    items: tuple[ItemResult, ...]
    stages: tuple[StageStats, ...]
    strategy: str
    params: Mapping[str, Any]
    clock: str
    wall_time: float
    started_at: str
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> int:
        return sum(1 for r in self.items if r.status == "ok")

    @property
    def failed(self) -> int:
        return sum(1 for r in self.items if r.status == "failed")

    @property
    def cancelled(self) -> int:
        return sum(1 for r in self.items if r.status == "cancelled")

    @property
    def bottleneck(self) -> StageStats | None:
        """The stage whose slots were busiest (highest busy share)."""
        return max(self.stages, key=lambda s: s.busy_share, default=None)

    def text(self) -> str:
        """A short human report: counts, throughput, per-stage table, the bottleneck."""
        n = len(self.items)
        rate = self.ok / self.wall_time if self.wall_time > 0 else 0.0
        lines = [
            f"{self.strategy} {dict(self.params)} on the {self.clock} clock: {n} items, "
            f"{self.ok} ok, {self.failed} failed, {self.cancelled} cancelled in "
            f"{self.wall_time:.3f} s ({rate:.1f} items/s)",
            f"{'stage':<14}{'limit':>6}{'calls':>9}{'errors':>8}{'retries':>8}"
            f"{'busy':>7}{'wait/call':>11}{'peak':>6}",
        ]
        for s in self.stages:
            wait = s.queue_wait_s / s.calls if s.calls else 0.0
            lines.append(
                f"{s.name:<14}{s.concurrency:>6}{s.calls:>9}{s.errors:>8}{s.retries:>8}"
                f"{s.busy_share:>7.0%}{wait:>10.3f}s{s.peak_in_flight:>6}"
            )
        b = self.bottleneck
        if b is not None:
            lines.append(f"bottleneck: {b.name} (slots busy {b.busy_share:.0%} of the run)")
        return "\n".join(lines)

    def to_json(
        self, *, metadata: Mapping[str, Any] | None = None, time_scale: float = 1.0
    ) -> dict[str, Any]:
        """The results document of DESIGN.md §6 (version 1), times divided by ``time_scale``."""
        if not (isinstance(time_scale, int | float) and time_scale > 0):
            raise ValueError(f"time_scale: expected a number > 0, got {time_scale!r}")
        items = [_item_doc(r, time_scale) for r in self.items]
        limits = {s.name: s.concurrency for s in self.stages}
        meta: dict[str, Any] = {
            "scenario": None,
            "strategy": self.strategy,
            "params": dict(self.params),
            "clock": self.clock,
            "seed": None,
            "time_scale": time_scale,
            "items": len(items),
            "stages": [{"name": s.name, "concurrency": s.concurrency} for s in self.stages],
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "git_commit": None,
            "started_at": self.started_at,
        }
        meta.update(self.metadata)
        if metadata:
            meta.update(metadata)
        return {"version": 1, "metadata": meta, "summary": summarize(items, limits),
                "items": items}

    def save(
        self,
        path: str | os.PathLike[str],
        *,
        metadata: Mapping[str, Any] | None = None,
        time_scale: float = 1.0,
    ) -> Path:
        """Write :meth:`to_json` to ``path`` (parents created) and return the path."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        doc = self.to_json(metadata=metadata, time_scale=time_scale)
        p.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
        return p
