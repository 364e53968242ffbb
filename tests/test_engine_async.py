"""Async stages (issue 15): ``async def`` stage functions and ``init`` on one event-loop thread
owned by the run, under the same scheduler, strategies, limits, retries, rate limits, budgets,
hedges and cancellation as thread stages; sync and async stages mix in one pipeline."""
from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from engine import (
    Budget,
    CancelToken,
    Continuous,
    CurrentCall,
    Hedge,
    Pipeline,
    RateLimit,
    RetryPolicy,
    Stage,
    StageInitError,
    current_call,
)
from engine._async import asleep
from engine_helpers import STRATEGIES, check_report, double, max_overlap, sleepy

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def no_thread_outlives_the_run():
    before = threading.active_count()
    yield
    assert threading.active_count() == before, [t.name for t in threading.enumerate()]


class Gauge:
    """Counts the coroutines of a stage running at once (recorded inside them)."""

    def __init__(self) -> None:
        self.now = self.peak = self.started = self.finished = 0

    def enter(self) -> None:
        self.now += 1
        self.started += 1
        self.peak = max(self.peak, self.now)

    def leave(self) -> None:
        self.now -= 1
        self.finished += 1


def async_sleepy(gauge: Gauge | None = None, scale: float = 0.001):
    async def fn(x: Any) -> Any:
        if gauge is not None:
            gauge.enter()
        try:
            await asyncio.sleep(scale * (hash(str(x)) % 5))
            return x
        finally:
            if gauge is not None:
                gauge.leave()

    return fn


async def async_inc(x: int) -> int:
    await asyncio.sleep(0)
    return x + 1


# -- alone and mixed, every strategy ------------------------------------------------------------
@pytest.mark.parametrize("strategy", list(STRATEGIES), ids=list(STRATEGIES))
def test_async_stage_alone(strategy: str) -> None:
    gauge = Gauge()
    stages = [Stage("a", async_sleepy(gauge), concurrency=3)]
    report = Pipeline(stages).run(range(40), STRATEGIES[strategy]())
    assert report.ok == 40
    assert [r.value for r in sorted(report.items, key=lambda r: r.index)] == list(range(40))
    assert gauge.peak <= 3 and gauge.started == gauge.finished == 40
    check_report(report, stages, 40)


@pytest.mark.parametrize("strategy", list(STRATEGIES), ids=list(STRATEGIES))
def test_sync_and_async_stages_mix(strategy: str) -> None:
    g1, g2 = Gauge(), Gauge()
    stages = [Stage("fetch", sleepy, concurrency=2),
              Stage("analyze", async_sleepy(g1), concurrency=4),
              Stage("double", double, concurrency=3),
              Stage("inc", async_inc, concurrency=2),
              Stage("check", async_sleepy(g2), concurrency=5)]
    report = Pipeline(stages).run(range(30), STRATEGIES[strategy]())
    assert report.ok == 30
    assert sorted(r.value for r in report.items) == [2 * i + 1 for i in range(30)]
    assert g1.peak <= 4 and g2.peak <= 5
    check_report(report, stages, 30)


def test_limits_never_exceeded_and_reached() -> None:
    gauge = Gauge()
    stages = [Stage("a", async_sleepy(gauge, 0.002), concurrency=7),
              Stage("b", async_sleepy(None, 0.001), concurrency=2)]
    report = Pipeline(stages).run(range(200), Continuous(max_in_flight=None))
    assert report.ok == 200
    assert gauge.peak == 7  # the limit holds, and the loop really runs that many at once
    assert report.stages[0].peak_in_flight <= 7 and report.stages[1].peak_in_flight <= 2
    check_report(report, stages, 200)


def test_one_event_loop_thread_for_every_async_stage() -> None:
    seen: set[tuple[int, str]] = set()

    async def where(x):
        seen.add((threading.get_ident(), threading.current_thread().name))
        await asyncio.sleep(0)
        return x

    def names_now(x):
        return x

    report = Pipeline([Stage("a", where, 3), Stage("b", names_now, 2),
                       Stage("c", where, 4)]).run(range(30))
    assert report.ok == 30
    assert len(seen) == 1
    ((ident, name),) = seen
    assert ident != threading.get_ident() and name == "conveyor-async"


def test_no_event_loop_thread_without_async_stages() -> None:
    names: list[str] = []

    def look(x):
        names.extend(t.name for t in threading.enumerate())
        return x

    Pipeline([Stage("s", look)]).run(range(3))
    assert "conveyor-async" not in names


# -- current_call() inside coroutines ------------------------------------------------------------
def test_current_call_inside_coroutines() -> None:
    seen: dict[int, tuple] = {}

    async def look(x):
        before = current_call()
        await asyncio.sleep(0.001 * (x % 3))  # other coroutines run meanwhile
        after = current_call()
        assert after.index == before.index == x // 2
        seen[x] = (after.index, after.key, after.stage, after.stage_index, after.attempt)
        return x

    stages = [Stage("pre", double), Stage("look", look, concurrency=10)]
    report = Pipeline(stages, key=lambda v: f"k{v}").run(range(20))
    assert report.ok == 20
    assert seen == {2 * i: (i, f"k{i}", "look", 1, 1) for i in range(20)}


def test_current_call_in_tasks_the_coroutine_starts_and_charge() -> None:
    async def fan_out(x):
        async def child():
            await asyncio.sleep(0)
            return current_call().index  # the task inherits the call's context

        got = await asyncio.gather(child(), child())
        current_call().charge(tokens=3)
        return got

    report = Pipeline([Stage("s", fan_out, 4, budget=Budget("b", {"tokens": 1e9}))]).run(
        range(8))
    assert report.ok == 8
    assert all(r.value == [r.index, r.index] for r in report.items)
    for r in report.items:
        (attempt,) = r.stages[0].attempts
        assert attempt.cost is not None and attempt.cost.get("tokens") == 3


def test_current_call_outside_a_call_still_raises() -> None:
    async def probe():
        current_call()

    with pytest.raises(RuntimeError, match="only available inside a stage call"):
        asyncio.run(probe())


# -- init: once per stage per run, on the loop, closed at the end ------------------------------
class AsyncClient:
    """An httpx.AsyncClient-like resource."""

    made: list[AsyncClient] = []

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.uses = 0
        self.closed = False
        self.in_use = 0
        self.closed_while_in_use = False
        AsyncClient.made.append(self)

    async def get(self, x):
        assert asyncio.get_running_loop() is self.loop
        self.uses += 1
        self.in_use += 1
        await asyncio.sleep(0.001)
        self.in_use -= 1
        return x

    async def aclose(self) -> None:
        await asyncio.sleep(0)
        self.closed_while_in_use = self.in_use > 0
        self.closed = True


async def make_client() -> AsyncClient:
    await asyncio.sleep(0.01)  # an async init (connects, ...)
    return AsyncClient()


async def use_client(x, client: AsyncClient):
    return await client.get(x)


def test_async_init_once_per_stage_and_aclose() -> None:
    AsyncClient.made = []
    stages = [Stage("a", use_client, concurrency=5, init=make_client),
              Stage("b", use_client, concurrency=3, init=make_client)]
    report = Pipeline(stages).run(range(50))
    assert report.ok == 50
    assert len(AsyncClient.made) == 2  # one per stage, not per slot
    assert [c.uses for c in AsyncClient.made] == [50, 50]
    assert all(c.closed and not c.closed_while_in_use for c in AsyncClient.made)


def test_sync_init_of_an_async_stage_and_async_close() -> None:
    class Client:  # AsyncOpenAI-like: a sync constructor, an async close()
        made = 0

        def __init__(self) -> None:
            Client.made += 1
            self.closed = False

        async def close(self) -> None:
            await asyncio.sleep(0)
            self.closed = True

    clients: list[Client] = []

    def init() -> Client:
        clients.append(Client())
        return clients[-1]

    async def fn(x, client):
        assert isinstance(client, Client)
        return x

    assert Pipeline([Stage("s", fn, 4, init=init)]).run(range(10)).ok == 10
    assert len(clients) == 1 and clients[0].closed


def test_async_init_failure_raises_naming_the_stage() -> None:
    async def bad_init():
        await asyncio.sleep(0)
        raise ConnectionRefusedError("no server")

    with pytest.raises(StageInitError, match="Stage 's': init raised ConnectionRefusedError: "
                       "no server") as info:
        Pipeline([Stage("s", use_client, 2, init=bad_init)]).run(range(5))
    assert isinstance(info.value.__cause__, ConnectionRefusedError)


def test_resource_closed_after_stream_closed_early() -> None:
    AsyncClient.made = []
    gen = Pipeline([Stage("s", use_client, concurrency=4, init=make_client)]).stream(
        range(1000))
    next(gen)
    gen.close()
    assert len(AsyncClient.made) == 1 and AsyncClient.made[0].closed
    assert not AsyncClient.made[0].closed_while_in_use


# -- errors, retries, rate limits, budgets ---------------------------------------------------------
class Boom(BaseException):
    pass


async def failing(x):
    await asyncio.sleep(0)
    if x % 5 == 0:
        raise ValueError(f"{x} is a multiple of 5")
    if x == 7:
        raise Boom("base")
    if x == 8:
        raise SystemExit(3)
    if x == 9:
        raise asyncio.CancelledError()  # the coroutine's own doing: an error like any other
    return x


@pytest.mark.parametrize("strategy", list(STRATEGIES), ids=list(STRATEGIES))
def test_errors_end_in_the_record(strategy: str) -> None:
    stages = [Stage("s", failing, concurrency=3), Stage("t", async_inc, 2)]
    report = Pipeline(stages).run(range(20), STRATEGIES[strategy]())
    by = {r.index: r for r in report.items}
    assert {i for i, r in by.items() if r.status == "failed"} == {0, 5, 10, 15, 7, 8, 9}
    assert by[5].error is not None and by[5].error.type == "ValueError"
    assert by[5].error.stage == "s" and "multiple of 5" in by[5].error.message
    assert by[7].error is not None and by[7].error.type == "Boom"
    assert by[8].error is not None and by[8].error.type == "SystemExit"
    assert by[9].error is not None and by[9].error.type == "CancelledError"
    assert by[3].value == 4
    check_report(report, stages, 20)


def test_retries_on_an_async_stage() -> None:
    tries: dict[int, int] = {}

    async def flaky(x):
        n = tries[x] = tries.get(x, 0) + 1
        assert current_call().attempt == n
        await asyncio.sleep(0.001)
        if n < 3:
            raise ConnectionError("try again")
        return x

    stages = [Stage("s", flaky, 4, retry=RetryPolicy(attempts=3, backoff=0.005))]
    report = Pipeline(stages).run(range(10))
    assert report.ok == 10 and report.stages[0].retries == 20
    assert all(len(r.stages[0].attempts) == 3 for r in report.items)
    check_report(report, stages, 10)


def test_a_plain_function_returning_a_coroutine_fails_clearly() -> None:
    # ``lambda v: client.get(v)``: a coroutine returned by a thread stage is never awaited
    report = Pipeline([Stage("s", lambda v: async_inc(v))]).run(range(3))
    assert report.failed == 3
    err = report.items[0].error
    assert err is not None and err.type == "TypeError" and "async def" in err.message


def test_rate_limit_on_an_async_stage() -> None:
    starts: list[float] = []

    async def stamp(x):
        starts.append(time.perf_counter())
        return x

    report = Pipeline([Stage("s", stamp, 10, rate_limit=RateLimit(50.0))]).run(range(10))
    assert report.ok == 10
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert min(gaps) > 0.015  # 50/s, burst 1: evenly spaced ~20 ms
    assert starts[-1] - starts[0] >= 9 * 0.02 * 0.9


def test_budget_on_an_async_stage() -> None:
    budget = Budget("llm", {"requests": 600}, burst={"requests": 2})  # 10/s
    starts: list[float] = []

    async def call_llm(x):
        starts.append(time.perf_counter())
        await asyncio.sleep(0.001)
        return x

    stages = [Stage("llm", call_llm, 10, budget=budget)]
    report = Pipeline(stages).run(range(6))
    assert report.ok == 6
    assert starts[-1] - starts[0] >= (6 - 2) / 10 * 0.9
    for j in range(len(starts)):  # any window: at most rate * w + burst calls
        for i in range(j + 1):
            assert j - i + 1 <= 10 * (starts[j] - starts[i]) + 2 + 1e-6
    assert report.stages[0].budget_wait_s > 0
    check_report(report, stages, 6)


# -- hedges: asleep ends early when the call is discarded ---------------------------------------
def test_hedged_async_stage_loser_ends_early() -> None:
    ended: dict[tuple[int, bool], tuple[float, bool]] = {}
    t0 = time.perf_counter()

    async def slow_first(x):
        info = current_call()
        seconds = 5.0 if (x == 3 and not info.hedge) else 0.01
        cut = await asleep(seconds)
        ended[(x, info.hedge)] = (time.perf_counter() - t0, cut)
        return x

    stage = Stage("s", slow_first, 4, idempotent=True, hedge=Hedge(after=0.1, max_extra=1.0))
    report = Pipeline([stage]).run(range(8))
    assert report.ok == 8
    assert report.stages[0].hedges_won >= 1
    elapsed, cut = ended[(3, False)]
    assert cut and elapsed < 2.0  # the loser's sleep was cut short: close did not wait 5 s
    assert ended[(3, True)][1] is False


def test_asleep_without_a_hedge_is_asyncio_sleep() -> None:
    async def nap(x):
        assert await asleep(0.001) is False
        if hasattr(CurrentCall, "asleep"):  # the CurrentCall method, once it exists
            assert await current_call().asleep(0.001) is False  # type: ignore[attr-defined]
        return x

    assert Pipeline([Stage("s", nap, 3)]).run(range(5)).ok == 5


# -- cancellation and close --------------------------------------------------------------------
@pytest.mark.parametrize("strategy", list(STRATEGIES), ids=list(STRATEGIES))
def test_cancel_token_mid_run(strategy: str) -> None:
    token = CancelToken()
    gauge = Gauge()

    async def work(x):
        gauge.enter()
        await asyncio.sleep(0.01)
        gauge.leave()
        return x

    def on_result(r):
        if r.index >= 5:
            token.cancel()

    stages = [Stage("a", work, 3), Stage("b", sleepy, 2), Stage("c", work, 2)]
    report = Pipeline(stages).run(range(10_000), STRATEGIES[strategy](), on_result=on_result,
                                  cancel=token)
    assert report.cancelled > 0 and report.ok >= 1
    assert gauge.started == gauge.finished  # running coroutines finished, none was cancelled
    assert len(report.items) < 10_000
    check_report(report, stages, len(report.items))


def test_handed_over_but_not_begun_reports_cancelled() -> None:
    # The first coroutine cancels the run before its first await: the calls already handed to
    # the loop in the same burst have not begun, and end cancelled without running.
    token = CancelToken()
    ran: list[int] = []

    async def first_cancels(x):
        ran.append(x)
        if x == 0:
            token.cancel()
        await asyncio.sleep(0.001)
        return x

    report = Pipeline([Stage("s", first_cancels, 50)]).run(range(50), cancel=token)
    assert ran == [0]
    by = {r.index: r.status for r in report.items}
    assert by[0] == "ok"
    assert set(list(by.values())[1:]) <= {"cancelled"} and len(report.items) >= 1


def test_close_waits_for_running_coroutines() -> None:
    gauge = Gauge()

    async def slow(x):
        gauge.enter()
        await asyncio.sleep(0.2)
        gauge.leave()
        return x

    gen = Pipeline([Stage("fast", async_inc, 8), Stage("slow", slow, 6)]).stream(range(100))
    next(gen)
    gen.close()
    assert gauge.started > 1 and gauge.started == gauge.finished


def test_stray_tasks_and_to_thread_leave_nothing_behind() -> None:
    async def sloppy(x):
        asyncio.get_running_loop().create_task(asyncio.sleep(30))  # never awaited
        return await asyncio.to_thread(lambda: x)  # the loop's default executor

    assert Pipeline([Stage("s", sloppy, 4)]).run(range(10)).ok == 10
    # the fixture checks that the loop thread and the to_thread workers are gone


def test_many_runs_in_a_row_and_at_once() -> None:
    def one(n: int) -> int:
        return Pipeline([Stage("a", async_inc, 5), Stage("b", double, 2)]).run(range(n)).ok

    assert [one(20) for _ in range(5)] == [20] * 5
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        assert list(pool.map(one, [30, 40, 50])) == [30, 40, 50]


# -- validation --------------------------------------------------------------------------------
class AsyncCallable:
    async def __call__(self, x):
        return x


@pytest.mark.parametrize("executor", ["process", "executor"])
def test_async_fn_on_a_process_pool_or_executor_is_refused(executor: str) -> None:
    ex: Any = executor
    if executor == "executor":
        ex = concurrent.futures.ThreadPoolExecutor(1)
    try:
        with pytest.raises(ValueError, match=r"Stage 'fetch'.*async function"):
            Stage("fetch", async_inc, executor=ex)
        with pytest.raises(ValueError, match=r"Stage 'fetch'.*async function"):
            Stage("fetch", AsyncCallable(), executor=ex)
    finally:
        if isinstance(ex, concurrent.futures.Executor):
            ex.shutdown()


def test_async_init_needs_an_async_stage() -> None:
    with pytest.raises(ValueError, match=r"Stage 'fetch': init.*async"):
        Stage("fetch", double, init=make_client)


def test_async_callables_and_threads_executor_accepted() -> None:
    import functools

    stages = [Stage("a", AsyncCallable(), 2), Stage("b", functools.partial(async_inc), 2,
                                                    executor="thread")]
    report = Pipeline(stages).run(range(10))
    assert report.ok == 10 and sorted(r.value for r in report.items) == list(range(1, 11))


def test_peak_in_flight_across_many_calls() -> None:
    intervals: list[tuple[float, float]] = []

    async def timed(x):
        t = time.perf_counter()
        await asyncio.sleep(0.001)
        intervals.append((t, time.perf_counter()))
        return x

    report = Pipeline([Stage("s", timed, 25)]).run(range(500))
    assert report.ok == 500 and max_overlap(intervals) <= 25


# -- Ctrl-C: as with threads, the first cancels and waits for running coroutines -----------------
CHILD = textwrap.dedent("""
    import asyncio, json, sys, threading, time
    sys.path.insert(0, {root!r})
    from engine import Pipeline, Stage
    started, finished = [], []
    async def slow(x):
        started.append(x)
        if len(started) == 4:
            print("running", flush=True)
        await asyncio.sleep({seconds})
        finished.append(x)
        print("done", flush=True)
        return x
    try:
        Pipeline([Stage("s", slow, 4)]).run(range(1000))
    except KeyboardInterrupt:
        print(json.dumps({{"started": len(started), "finished": len(finished),
                          "threads": [t.name for t in threading.enumerate()]}}), flush=True)
    print("exit", len(finished), flush=True)
""")


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c(presses: int) -> None:
    root = str(Path(__file__).resolve().parents[1])
    body = CHILD.format(root=root, seconds=0.5 if presses == 1 else 1.5)
    proc = subprocess.Popen([sys.executable, "-c", body], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "running"
    for _ in range(presses):
        os.kill(proc.pid, signal.SIGINT)
        time.sleep(0.1)
    out, err = proc.communicate(timeout=30)
    lines = out.strip().splitlines()
    doc = json.loads(next(line for line in lines if line.startswith("{")))
    assert doc["started"] == 4, (out, err)
    if presses == 1:  # waited: the running coroutines finished, the loop thread is gone
        assert doc["finished"] == 4 and doc["threads"] == ["MainThread"]
        assert lines[-1] == "exit 4" and lines.count("done") == 4
    else:  # stopped waiting at once; they finish in the background before the process exits
        assert doc["finished"] == 0
        at = lines.index("exit 0")
        assert lines[at + 1:] == ["done"] * 4
    assert proc.returncode == 0, err


def test_adaptive_limit_on_an_async_stage() -> None:
    from engine import Adaptive

    gauge = Gauge()
    stage = Stage("s", async_sleepy(gauge, 0.002), concurrency=Adaptive(2, max=6))
    report = Pipeline([stage]).run(range(300))
    assert report.ok == 300
    assert 2 < gauge.peak <= 6  # the limit grew, never past its max
    assert report.stages[0].peak_in_flight == gauge.peak
