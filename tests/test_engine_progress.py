"""Progress (DESIGN §13): a tqdm bar on a terminal, plain lines elsewhere, the caller's bar or
callable; and the ``engine`` logger's capture for tests. The run loop is driven here as the
lead's wiring will drive it (``run_observed``): update after every dispatcher step."""
from __future__ import annotations

import importlib.util
import io
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

import pytest

from engine import Adaptive, ItemResult, Pipeline, RunReport, Stage
from engine._observe import Observer, RunInfo, capture_logs, observers
from engine._progress import Progress, ProgressObserver, StageProgress
from engine._run import Options


def run_observed(pipeline: Pipeline, items: Iterable[Any], obs: Sequence[Any], *,
                 clock: str = "live", strategy: Any = None) -> RunReport:
    """``pipeline.run(items)`` with the observers driven as the run loop will drive them:
    ``start`` once the backend exists, ``update(batch, sched)`` after every dispatcher step
    (an empty batch when nothing became visible), ``close(report)`` at the end."""
    run = pipeline._prepare(items, strategy, Options(clock=clock))  # type: ignore[arg-type]
    run.observed = True
    orig_start = run._start
    stepped = [False]

    def start() -> Any:
        backend = orig_start()
        info = RunInfo.at(backend.now(), run.clock, run.strategy.name)
        for o in obs:
            o.start(info)
        step = backend.step

        def observed_step(sched: Any) -> None:
            step(sched)
            if not sched.out:  # nothing visible: the loop will not yield, observe here
                for o in obs:
                    o.update([], sched)
        backend.step = observed_step  # type: ignore[method-assign]
        stepped[0] = True
        return backend

    run._start = start  # type: ignore[method-assign]
    results: list[ItemResult] = []
    report: RunReport | None = None
    try:
        for batch in run.batches():
            for o in obs:
                o.update(batch, run.sched)
            results += batch
        results.sort(key=lambda r: r.index)
        wall = run.wall()
        report = RunReport(tuple(results), run.sched.stats(wall), run.strategy.name,
                           run.params, run.clock, wall, run.started_at)
    finally:
        run.close()
        for o in obs:
            o.close(report)
    run.raise_pending()
    assert report is not None
    return report


def fail_7(x: int) -> int:
    if x % 7 == 0:
        raise ValueError(f"secret-{x}")
    return x


def slow(x: int) -> int:
    time.sleep(0.002)
    return x


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


# -- plain lines -------------------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_plain_lines_when_not_a_terminal() -> None:
    out = io.StringIO()
    [o] = observers(True, ["a", "b"], 70, stream=out)
    assert isinstance(o, ProgressObserver) and o.mode == "lines"
    o.interval = 0.0  # draw at every step: the 10% marks decide
    obs = [o]
    p = Pipeline([Stage("a", slow, concurrency=2), Stage("b", fail_7, concurrency=1)])
    report = run_observed(p, range(70), obs)
    assert report.ok == 60 and report.failed == 10
    lines = out.getvalue().splitlines()
    assert lines[-1].startswith("conveyor: 70/70 visible (ok 60, failed 10) in ")
    assert lines[-1].endswith("(done)")
    # a line at every 10% of the total (7 items), not one per item
    assert 5 <= len(lines) <= 11, lines
    mid = [ln for ln in lines[:-1] if "a " in ln]
    assert mid and all("visible (ok" in ln for ln in mid)
    assert "secret" not in out.getvalue()


def test_plain_line_every_few_seconds_without_a_total() -> None:
    out = io.StringIO()
    o = ProgressObserver(True, ["a"], None, stream=out, interval=0.0, line_every=0.05)
    o.start()
    sched = _Sched([("a", 2, 5, 2)])
    o.update([], sched)
    assert out.getvalue() == ""  # not yet
    time.sleep(0.06)
    o.update([_result(0)], sched)
    assert out.getvalue().splitlines() == [
        out.getvalue().splitlines()[0]]
    line = out.getvalue().splitlines()[0]
    assert line.startswith("conveyor: 1 visible (ok 1, failed 0) in ")
    assert line.endswith("| a 2+5 | held by a")
    o.close(None)
    assert out.getvalue().splitlines()[-1].endswith("(done)")


def test_closed_stream_stops_drawing_not_the_run() -> None:
    out = io.StringIO()
    o = ProgressObserver(True, ["a"], 10, stream=out, interval=0.0)
    o.start()
    out.close()
    o.update([_result(i) for i in range(10)], _Sched([("a", 0, 0, 1)]))
    o.close(None)  # no ValueError


# -- tqdm --------------------------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_tqdm_bar_on_a_terminal() -> None:
    pytest.importorskip("tqdm")
    out = Tty()
    obs = observers(True, ["a", "b"], 50, stream=out)
    assert obs[0].mode == "bar"  # type: ignore[attr-defined]
    p = Pipeline([Stage("a", slow, concurrency=2), Stage("b", fail_7, concurrency=1)])
    run_observed(p, range(50), obs)
    text = out.getvalue()
    assert "conveyor" in text and "50/50" in text
    assert "ok 42, failed 8" in text.split("\r")[-1]
    assert obs[0].bar is None  # type: ignore[attr-defined]  # ours: closed


def test_missing_tqdm_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)
    with pytest.raises(ImportError, match=r"conveyor\[progress\]"):
        observers("bar", ["a"], 10, stream=Tty())  # the bar, asked for by name
    # True on a terminal without tqdm: plain lines, and a warning naming the extra
    with capture_logs() as logs:
        [o] = observers(True, ["a"], 10, stream=Tty())
    assert o.mode == "lines"  # type: ignore[attr-defined]
    assert any("conveyor[progress]" in r.getMessage() for r in logs.records)
    # off a terminal the plain line needs no tqdm
    assert observers(True, ["a"], 10, stream=io.StringIO())[0].mode == "lines"  # type: ignore


def test_progress_on_a_stream_of_yours_and_lines_by_name() -> None:
    out = io.StringIO()
    report = Pipeline([Stage("a", slow, concurrency=2)]).run(range(20), progress=out)
    assert report.ok == 20
    lines = out.getvalue().splitlines()
    assert lines[-1].startswith("conveyor: 20/20 visible (ok 20, failed 0)")
    assert len([ln for ln in lines if "20/20" in ln]) == 1  # the end is drawn once
    assert observers("lines", ["a"], 10, stream=Tty())[0].mode == "lines"  # type: ignore
    if importlib.util.find_spec("tqdm") is not None:
        assert observers(Tty(), ["a"], 10)[0].mode == "bar"  # type: ignore[attr-defined]
    with pytest.raises(TypeError, match="progress"):
        observers("fancy", ["a"], 10)


@pytest.mark.timeout(30)
def test_the_callers_tqdm_bar_gets_the_counts_and_stays_open() -> None:
    tqdm = pytest.importorskip("tqdm").tqdm
    out = io.StringIO()
    bar = tqdm(file=out, mininterval=0)
    p = Pipeline([Stage("a", slow, concurrency=2), Stage("b", fail_7, concurrency=1)])
    run_observed(p, range(30), observers(bar, ["a", "b"], 30))
    assert bar.n == 30 and bar.total == 30
    assert not bar.disable and "ok 25, failed 5" in bar.postfix
    bar.close()


class _FakeBar:
    """A tqdm-like bar: update and set_postfix_str are all it takes."""

    def __init__(self) -> None:
        self.n = 0
        self.total: int | None = 5
        self.postfix = ""

    def update(self, n: int) -> None:
        self.n += n

    def set_postfix_str(self, s: str, refresh: bool = True) -> None:
        self.postfix = s

    def refresh(self) -> None:
        pass


def test_a_tqdm_like_bar() -> None:
    bar = _FakeBar()
    [o] = observers(bar, ["a"], 99)
    o.start(RunInfo(0))
    o.update([_result(0), _result(1, "failed")], _Sched([("a", 1, 0, 1)]))
    o.close(None)
    assert bar.n == 2 and bar.total == 5  # its total is the caller's
    assert bar.postfix == "ok 1, failed 1"


# -- callables, snapshots, in flight -----------------------------------------------------------
@pytest.mark.timeout(30)
def test_callable_sees_in_flight_per_stage_and_the_stage_holding_items() -> None:
    seen: list[Progress] = []
    gate = threading.Event()

    def held(x: int) -> int:
        gate.wait(5)
        return x

    def watch(p: Progress) -> None:
        seen.append(p)
        if p.stages and p.stages[1].queued >= 5:
            gate.set()

    o = ProgressObserver(watch, ["fast", "held"], 20, interval=0.0)
    pipeline = Pipeline([Stage("fast", lambda x: x, concurrency=4),
                         Stage("held", held, concurrency=2)])
    run_observed(pipeline, range(20), [o])
    assert seen[-1].final and seen[-1].visible == 20 and seen[-1].ok == 20
    assert not any(p.final for p in seen[:-1])
    busy = [p for p in seen if not p.final and p.stages and p.stages[1].queued >= 5]
    assert busy, "the held stage queued items while it was blocked"
    assert any(p.holding == "held" for p in busy)
    for p in seen:
        if p.stages:
            fast, slow_ = p.stages
            if fast.held != slow_.held:
                assert p.holding == (fast.name if fast.held > slow_.held else slow_.name) \
                    or fast.held == slow_.held == 0
    for p in seen:
        for st in p.stages:
            assert st.running <= max(st.limit, 0) or p.final
    assert [p.visible for p in seen] == sorted(p.visible for p in seen)


def test_redraws_are_throttled() -> None:
    calls: list[Progress] = []
    o = ProgressObserver(calls.append, ["a"], None)  # the default interval: 0.1 s
    o.start()
    sched = _Sched([("a", 1, 1, 1)])
    t = time.monotonic()
    n = 0
    while time.monotonic() - t < 0.25:
        o.update([], sched)
        n += 1
    assert n > 1000 and 1 <= len(calls) <= 4


def test_snapshot_text() -> None:
    p = Progress(12, 40, 10, 1, 1, 2.0, (StageProgress("fetch", 4, 12, 4),
                                         StageProgress("save", 1, 0, 2)))
    assert p.holding == "fetch" and p.rate == 6.0
    assert p.postfix() == "ok 10, failed 1, cancelled 1 | fetch 4+12, save 1+0 | held by fetch"
    assert p.line() == ("conveyor: 12/40 visible (ok 10, failed 1, cancelled 1) in 2.0 s, "
                        "6.0/s | fetch 4+12, save 1+0 | held by fetch")
    idle = Progress(0, None, 0, 0, 0, 0.0, (StageProgress("a", 0, 0, 1),))
    assert idle.holding is None and idle.postfix() == "ok 0, failed 0 | a 0+0"


def test_observers_validation_and_factories() -> None:
    assert observers(False, ["a"], 1) == [] and observers(None, ["a"], 1, None) == []
    with pytest.raises(TypeError, match="progress"):
        observers(3, ["a"], 1)
    with pytest.raises(TypeError, match="observe"):
        observers(False, ["a"], 1, observe=object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"observe\[0\]"):
        observers(False, ["a"], 1, observe=[object()])
    made: list[ProgressObserver] = []

    class Factory:
        def observer(self) -> ProgressObserver:
            made.append(ProgressObserver(lambda p: None, ["a"], 1))
            return made[-1]

    f = Factory()
    first, second = observers(False, ["a"], 1, [f]), observers(False, ["a"], 1, [f])
    assert first == [made[0]] and second == [made[1]] and made[0] is not made[1]
    assert isinstance(made[0], Observer)


def test_engine_imports_without_tqdm_or_opentelemetry() -> None:
    code = ("import sys; sys.modules['tqdm'] = None; sys.modules['opentelemetry'] = None\n"
            "import engine, engine._observe as o, engine._otel as t\n"
            "o.observers(False, ['a'], 1)\n"
            "assert not [m for m in sys.modules if m.startswith(('tqdm.', 'opentelemetry.'))]\n"
            "try:\n    t.otel()\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert "conveyor[otel]" in out


# -- the engine's log --------------------------------------------------------------------------
class Overloaded(Exception):
    pass


def sometimes_overloaded(x: int) -> int:
    time.sleep(0.001)
    if x % 10 == 3:
        raise Overloaded(f"token=sk-secret-{x}")
    return x


@pytest.mark.timeout(30)
def test_capture_logs_sees_limit_changes_and_no_values() -> None:
    stage = Stage("api", sometimes_overloaded,
                  concurrency=Adaptive(8, min=1, max=8, overload_on=(Overloaded,)))
    with capture_logs() as logs:
        report = Pipeline([stage]).run(range(100))
    assert report.failed == 10
    rec = logs.assert_logged("stage %r: limit", "DEBUG")
    assert isinstance(rec.args, tuple) and rec.args[0] == "api"
    assert logs.messages("DEBUG") and all(m.startswith("stage 'api': limit ")
                                          for m in logs.messages("DEBUG"))
    logs.assert_clean("sk-secret", "token=")
    with pytest.raises(AssertionError, match="no INFO record like 'budget"):
        logs.assert_logged("budget %r paused", "INFO")
    assert logging.getLogger("engine").level == logging.NOTSET  # put back


def test_capture_logs_finds_a_leak() -> None:
    log = logging.getLogger("engine")
    with capture_logs(logging.INFO) as logs:
        log.debug("not captured %s", "x")
        log.warning("stage %r: item %d failed (%s)", "fetch", 3, "KeyError")
        log.info("oops %s", "api-key-123")
    assert logs.templates() == ["stage %r: item %d failed (%s)", "oops %s"]
    assert logs.messages(logging.WARNING) == ["stage 'fetch': item 3 failed (KeyError)"]
    logs.assert_clean("sk-")
    with pytest.raises(AssertionError, match="api-key-123"):
        logs.assert_clean("api-key-123")


# -- helpers -----------------------------------------------------------------------------------
class _Stage:
    def __init__(self, name: str, running: int, queued: int, limit: int) -> None:
        self.name, self.running, self.limit = name, running, limit
        self.waiting = [None] * queued


class _Sched:
    def __init__(self, stages: list[tuple[str, int, int, int]]) -> None:
        self.stages = [_Stage(*s) for s in stages]


def _result(i: int, status: str = "ok") -> ItemResult:
    return ItemResult(i, i, status, i, None, (), 0.0)  # type: ignore[arg-type]


@pytest.mark.timeout(30)
def test_through_pipeline_run_progress() -> None:
    seen: list[Progress] = []
    report = Pipeline([Stage("a", slow, concurrency=2),
                       Stage("b", fail_7, concurrency=1)]).run(range(30), progress=seen.append)
    assert report.failed == 5
    assert seen[-1].final and (seen[-1].visible, seen[-1].ok, seen[-1].failed) == (30, 25, 5)
