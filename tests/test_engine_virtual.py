"""The virtual clock runs the same scheduler: it predicts the live engine's schedule."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from contract import ROOT
from engine import Batched, Continuous, ParallelBatches, Pipeline, Simulated, Stage, current_call

pytestmark = pytest.mark.timeout(60)
SCALE = 0.02  # live seconds per virtual second (the harness default time_scale)


class Table:
    """Per-item durations known in advance; live calls sleep them, scaled."""

    def __init__(self, durations: list[float]) -> None:
        self.durations = durations

    def simulate(self, call, value, *, now=0.0):
        return Simulated(self.durations[call.index], value)

    def __call__(self, value):
        time.sleep(self.durations[current_call().index] * SCALE)
        return value


def _stages():
    import random

    rng = random.Random(4)
    n = 120
    # calls of at least 0.5 virtual s (5 ms live): time.sleep overshoots by ~0.1 ms a call,
    # which is the live run's own noise, not the scheduler's
    slow = [2 * rng.lognormvariate(0, 0.6) * (8 if rng.random() < 0.05 else 1) + 0.5
            for _ in range(n)]
    mid = [rng.uniform(1.0, 2.0) for _ in range(n)]
    fast = [rng.uniform(0.5, 1.0) for _ in range(n)]
    return n, [Stage("fetch", Table(slow), 8), Stage("analyze", Table(mid), 6),
               Stage("save", Table(fast), 4)]


@pytest.mark.parametrize("strategy", [Continuous(), Batched(size=20),
                                      ParallelBatches(lanes=3, size=10)],
                         ids=lambda s: s.name)
def test_live_makespan_matches_virtual(strategy) -> None:
    """Same per-item latencies: live makespan within 3% of the virtual one, and within 3% of
    a virtual replay of the live run's own call durations. Live timing is at the mercy of the
    machine's load (2 cores), so the best of up to three live runs is compared."""
    n, stages = _stages()
    virtual = Pipeline(stages).run(range(n), strategy, clock="virtual")
    v = max(r.visible_at for r in virtual.items)
    errors = []
    for _ in range(3):
        live = Pipeline(stages).run(range(n), strategy)
        lv = max(r.visible_at for r in live.items) / SCALE
        # replay the live run's own call durations on the virtual clock: the schedule the
        # scheduler chose live is the one it predicts, up to its dispatch lag
        replay = [Stage(st.name, Table([0.0] * n), st.concurrency) for st in stages]
        for r in live.items:
            for k, sp in enumerate(r.stages):
                replay[k].fn.durations[r.index] = (sp.end - sp.start) / SCALE
        rv = max(r.visible_at for r in Pipeline(replay).run(range(n), strategy,
                                                               clock="virtual").items)
        errors.append((abs(lv / v - 1), abs(lv / rv - 1)))
        if errors[-1][0] <= 0.03 and errors[-1][1] <= 0.03:
            break
    assert min(e[0] for e in errors) <= 0.03, errors
    assert min(e[1] for e in errors) <= 0.03, errors


def test_virtual_is_instant_and_needs_no_threads() -> None:
    import threading

    n, stages = _stages()
    before = threading.active_count()
    t = time.perf_counter()
    report = Pipeline(stages).run(range(n), Continuous(), clock="virtual")
    assert time.perf_counter() - t < 2.0
    assert threading.active_count() == before
    assert report.clock == "virtual" and report.ok == n


def test_virtual_wall_time_is_virtual_makespan() -> None:
    n, stages = _stages()
    report = Pipeline(stages).run(range(n), Batched(size=30), clock="virtual")
    assert report.wall_time == pytest.approx(max(r.visible_at for r in report.items))


@pytest.mark.parametrize("strategy", [Continuous(), Batched(size=20),
                                      ParallelBatches(lanes=3, size=10)],
                         ids=lambda s: s.name)
def test_virtual_cancellation_from_a_callback(strategy, tmp_path) -> None:
    from engine import CancelToken
    from engine_helpers import check_report, shared_check

    n, stages = _stages()
    token = CancelToken()

    def on_result(r):
        if r.index >= 30:
            token.cancel()

    report = Pipeline(stages).run(range(n), strategy, on_result=on_result, cancel=token,
                                  clock="virtual")
    assert report.cancelled > 0 and report.ok >= 1
    check_report(report, stages, len(report.items))
    shared_check(report, tmp_path)


def test_virtual_stream_closed_early() -> None:
    n, stages = _stages()
    gen = Pipeline(stages).stream(range(n), clock="virtual")
    assert next(gen).status == "ok"
    gen.close()


@pytest.mark.parametrize("strategy", [Continuous(), Continuous(max_in_flight=None),
                                      Batched(size=20), ParallelBatches(lanes=3, size=10)],
                         ids=lambda s: f"{s.name}-{s.params}")
def test_unobserved_run_gives_the_same_report(strategy) -> None:
    """run() with nobody watching (no on_result, no token) computes the run in one go; with a
    watcher it stops at every result. Both are the same schedule, result for result."""
    from engine import RetryPolicy

    class Flaky(Table):
        def simulate(self, call, value, *, now=0.0):
            if call.index % 7 == 0 and call.attempt == 1:
                return Simulated(0.3, None, RuntimeError("flaky"))
            return super().simulate(call, value)

    n, stages = _stages()
    stages[1] = Stage("analyze", Flaky(stages[1].fn.durations), 6,
                      retry=RetryPolicy(attempts=2, backoff=0.25))
    p = Pipeline(stages)
    alone = p.run(range(n), strategy, clock="virtual")
    seen = []
    watched = p.run(range(n), strategy, clock="virtual", on_result=seen.append)
    streamed = sorted(p.stream(range(n), strategy, clock="virtual"), key=lambda r: r.index)
    assert alone.items == watched.items == tuple(streamed)
    assert alone.stages == watched.stages and alone.wall_time == watched.wall_time
    assert [r.visible_at for r in seen] == sorted(r.visible_at for r in alone.items)
    assert sum(len(r.stages[1].attempts) for r in alone.items) == n + len(range(0, n, 7))


INTERRUPT_SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from engine import Continuous, Pipeline, Stage
    from simulators import SimulatedService

    stages = [Stage(f"s{{k}}", SimulatedService(f"s{{k}}", {{"dist": "exponential", "mean": 1}},
                                               seed=1), 8) for k in range(3)]
    p = Pipeline(stages)
    p.run(range(20_000), clock="virtual")  # every latency block cached: no Python per call
    print("ready", flush=True)
    t = time.perf_counter()
    try:
        for _ in range(10_000):
            p.run(range(20_000), Continuous(), clock="virtual")
        print("finished")
    except KeyboardInterrupt:
        print(f"interrupted {{time.perf_counter() - t:.2f}}")
""")


@pytest.mark.timeout(60)
def test_ctrl_c_interrupts_a_long_virtual_run_at_once() -> None:
    """Nothing runs on the virtual clock, so Ctrl-C needs no settling: KeyboardInterrupt comes
    out promptly (compiled too, where the loop may never enter the interpreter), not an error
    from a half-handled event."""
    proc = subprocess.Popen([sys.executable, "-c", INTERRUPT_SCRIPT.format(root=str(ROOT))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(1.0)
    os.kill(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert out.startswith("interrupted"), (out, err)
    assert float(out.split()[1]) < 3.0, out  # 1 s of running, then a prompt stop
    assert "RuntimeError" not in err, err


# -- a simulator's own failures surface (issue 10) ---------------------------------------------
class SimulatorBug(Exception):
    pass


class RaisingSim:
    """A custom simulator with a bug: raises for one item."""

    def __init__(self, bad: int) -> None:
        self.bad = bad
        self.raised: BaseException | None = None

    def __call__(self, value):
        return value

    def simulate(self, call, value, *, now):
        if value == self.bad:
            self.raised = SimulatorBug(f"no latency for {value}")
            raise self.raised
        return Simulated(1.0, value)


def _frames(exc: BaseException) -> list[str]:
    import traceback

    return [f.name for f in traceback.extract_tb(exc.__traceback__)]


@pytest.mark.timeout(20, method="thread")
@pytest.mark.parametrize("observed", [False, True], ids=["run", "run-on_result"])
@pytest.mark.parametrize("strategy", [Continuous(), Batched(size=4),
                                      ParallelBatches(lanes=2, size=3)], ids=lambda s: s.name)
@pytest.mark.parametrize("where", [0, 1], ids=["first-stage", "second-stage"])
def test_simulate_that_raises_is_raised_by_run(where, strategy, observed) -> None:
    sims = [Table([1.0] * 20), Table([1.0] * 20)]
    bad = RaisingSim(bad=7)
    sims[where] = bad
    stages = [Stage("a", sims[0], 3), Stage("b", sims[1], 2)]
    kwargs = {"on_result": lambda r: None} if observed else {}
    with pytest.raises(SimulatorBug) as info:
        Pipeline(stages).run(range(20), strategy, clock="virtual", **kwargs)
    assert info.value is bad.raised  # that very exception, not a hang or an engine error
    assert "simulate" in _frames(info.value)  # with the simulator's own traceback


@pytest.mark.timeout(20, method="thread")
def test_simulate_that_raises_is_raised_by_stream() -> None:
    bad = RaisingSim(bad=5)
    got = []
    with pytest.raises(SimulatorBug) as info:
        for r in Pipeline([Stage("a", Table([1.0] * 10), 2), Stage("b", bad, 2)]).stream(
                range(10), clock="virtual"):
            got.append(r)
    assert info.value is bad.raised and "simulate" in _frames(info.value)
    by = {r.index: r for r in got}
    assert sorted(by) == list(range(10))  # every item handed over once before the raise
    assert by[5].status == "cancelled" and [sp.name for sp in by[5].stages] == ["a"]


@pytest.mark.timeout(20, method="thread")
def test_simulate_that_raises_on_a_retry() -> None:
    from engine import RetryPolicy

    class RetryBug(RaisingSim):
        def simulate(self, call, value, *, now):
            if call.attempt == 1:
                return Simulated(1.0, error=ConnectionError("flaky"))
            self.raised = SimulatorBug("attempt 2")
            raise self.raised

    bad = RetryBug(bad=-1)
    with pytest.raises(SimulatorBug) as info:
        Pipeline([Stage("a", bad, retry=RetryPolicy(attempts=3, backoff=0.5))]).run(
            range(3), clock="virtual")
    assert info.value is bad.raised


class Durations:
    def __init__(self, bad) -> None:
        self.bad = bad

    def __call__(self, value):
        return value

    def simulate(self, call, value, *, now):
        return Simulated(self.bad if value == 3 else 1.0, value)


@pytest.mark.timeout(20, method="thread")
@pytest.mark.parametrize("bad", [-4.9, -1e-9, float("nan"), float("inf"), float("-inf"), "1",
                                 None, True], ids=repr)
@pytest.mark.parametrize("consume", ["run", "stream"])
def test_bad_simulated_duration_is_a_simulation_error_naming_the_stage(bad, consume) -> None:
    from engine import SimulationError

    p = Pipeline([Stage("fetch", Table([1.0] * 8), 2), Stage("analyze", Durations(bad), 2)])
    with pytest.raises(SimulationError, match="'analyze'") as info:
        if consume == "run":
            p.run(range(8), clock="virtual")
        else:
            list(p.stream(range(8), clock="virtual"))
    assert isinstance(info.value, ValueError)


def test_zero_duration_is_fine() -> None:
    report = Pipeline([Stage("s", Durations(0.0))]).run(range(5), clock="virtual")
    assert report.ok == 5 and report.items[3].stages[0].end == report.items[3].stages[0].start


def test_simulate_is_called_with_now_as_a_keyword() -> None:
    """The engine calls ``simulate(call, value, now=t)``: ``now`` is the call's start."""
    seen = []

    class KeywordOnly:
        def __call__(self, value):
            return value

        def simulate(self, call, value, *, now):  # no default: must be passed by keyword
            seen.append((call.index, call.stage, call.attempt, value, now))
            return Simulated(1.0 + call.index, value * 10)

    p = Pipeline([Stage("a", KeywordOnly(), 2), Stage("b", KeywordOnly(), 1)])
    report = p.run(range(4), clock="virtual")
    starts = {(r.index, sp.name): sp.start for r in report.items for sp in r.stages}
    assert len(seen) == 8
    for index, stage, attempt, value, now in seen:
        assert attempt == 1
        assert now == starts[(index, stage)]
        assert value == (index if stage == "a" else index * 10)
    assert [n for *_, n in seen] == sorted(n for *_, n in seen)  # nondecreasing
