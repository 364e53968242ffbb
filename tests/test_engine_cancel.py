"""Cancellation: a token or Ctrl-C stops admission at once, running calls finish, the rest end
cancelled, the report is complete and no thread is left behind."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from contract import ROOT
from engine import Batched, CancelToken, Continuous, ParallelBatches, Pipeline, Stage
from engine_helpers import check_report, shared_check

pytestmark = pytest.mark.timeout(60)
STRATS = [Continuous(), Batched(size=4), ParallelBatches(lanes=2, size=3)]


@pytest.mark.parametrize("strategy", STRATS, ids=lambda s: s.name)
def test_token_cancel_mid_run(strategy, tmp_path) -> None:
    token = CancelToken()
    finished: list[int] = []

    def work(x):
        time.sleep(0.01)
        finished.append(x)
        return x

    def on_result(r):
        if r.index >= 5:
            token.cancel()

    stages = [Stage("a", work, 3), Stage("b", work, 2)]
    pulled = []

    def items():
        for i in range(10_000):
            pulled.append(i)
            yield i

    before = threading.active_count()
    report = Pipeline(stages).run(items(), strategy, on_result=on_result, cancel=token)
    assert threading.active_count() == before
    assert len(pulled) < 200  # admission stopped at once
    assert len(report.items) == len(pulled)  # every item read is in the report, once
    assert report.cancelled > 0
    assert {r.status for r in report.items} <= {"ok", "cancelled", "failed"}
    check_report(report, stages, len(report.items))
    shared_check(report, tmp_path)


def test_cancel_before_run_admits_nothing() -> None:
    token = CancelToken()
    token.cancel()
    report = Pipeline([Stage("s", str)]).run(range(100), cancel=token)
    assert report.items == ()


def test_running_calls_finish_after_cancel() -> None:
    token = CancelToken()
    started = threading.Semaphore(0)
    ended = []

    def slow(x):
        started.release()
        time.sleep(0.2)
        ended.append(x)
        return x

    def canceller():
        started.acquire(timeout=5)
        started.acquire(timeout=5)  # both slots are running
        token.cancel()

    threading.Thread(target=canceller).start()
    report = Pipeline([Stage("s", slow, 2), Stage("t", str)]).run(range(10), cancel=token)
    assert sorted(ended) == [0, 1]  # both running calls ran to their end
    assert [r.status for r in report.items] == ["cancelled"] * 10
    assert [len(r.stages) for r in report.items[:2]] == [1, 1]
    assert report.items[5].stages == ()


def test_closing_stream_early_joins_threads() -> None:
    before = threading.active_count()
    gen = Pipeline([Stage("s", lambda x: time.sleep(0.005) or x, 4)]).stream(range(1000))
    first = next(gen)
    assert first.status == "ok"
    gen.close()
    assert threading.active_count() == before


def test_retry_timers_do_not_delay_cancellation() -> None:
    from engine import RetryPolicy

    token = CancelToken()

    def fail(x):
        token.cancel()
        raise ConnectionError("x")

    t = time.perf_counter()
    report = Pipeline([Stage("s", fail, retry=RetryPolicy(attempts=5, backoff=30))]).run(
        range(3), cancel=token)
    assert time.perf_counter() - t < 5
    assert report.items[0].status == "cancelled"


SIGINT_SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from engine import Pipeline, Stage, {strategy}
    def work(x):
        if x == 0:
            print("started", flush=True)
        time.sleep(0.05)
        return x
    try:
        Pipeline([Stage("a", work, 4), Stage("b", work, 2)]).run(range(100000), {strategy}())
    except KeyboardInterrupt as exc:
        r = exc.report
        print("interrupted", len(r.items), r.ok, r.cancelled, flush=True)
        import threading
        print("threads", threading.active_count(), flush=True)
        sys.exit(0)
    print("not interrupted")
    sys.exit(1)
""")


@pytest.mark.parametrize("strategy", ["Continuous", "Batched", "ParallelBatches"])
def test_sigint_to_subprocess(strategy: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", SIGINT_SCRIPT.format(root=str(ROOT), strategy=strategy)],
        stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "started"
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    line, threads = out.strip().splitlines()[-2:]
    word, n, _ok, cancelled = line.split()
    assert word == "interrupted" and int(n) < 1000 and int(cancelled) > 0
    assert threads == "threads 1"


def test_token_is_one_way_and_idempotent() -> None:
    t = CancelToken()
    calls = []
    t._on_cancel(lambda: calls.append(1))
    t.cancel("first")
    t.cancel("second")
    assert t.cancelled and t.reason == "first" and calls == [1]
    assert "cancelled=True" in repr(t)


def test_path_unused() -> None:
    assert Path(ROOT, "engine").is_dir()


def test_stream_never_iterated_starts_no_thread() -> None:
    before = threading.active_count()
    gen = Pipeline([Stage("s", str, 8)]).stream(range(10))
    assert threading.active_count() == before
    del gen
    assert threading.active_count() == before


def test_thread_backend_exits_cleanly_after_abandoned_stream() -> None:
    """A stream abandoned half-way (not closed, just dropped) must not hang interpreter exit."""
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from engine import Pipeline, Stage
        gen = Pipeline([Stage("s", lambda x: time.sleep(0.001) or x, 4)]).stream(range(10**6))
        next(gen)
        unused = Pipeline([Stage("t", str, 4)]).stream(range(10))
        print("done", flush=True)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0 and out.stdout.strip() == "done", out.stderr


def _slow_pages(pulled: list[int]):
    for i in range(5):
        pulled.append(i)
        yield i
    time.sleep(10)  # the next page takes 10 s (a slow API) ...
    for i in range(5, 10):
        pulled.append(i)
        yield i


@pytest.mark.timeout(30, method="thread")
def test_cancel_while_the_input_blocks_returns_promptly() -> None:
    token = CancelToken()
    pulled: list[int] = []
    threading.Timer(0.5, token.cancel).start()
    t = time.perf_counter()
    report = Pipeline([Stage("s", lambda x: time.sleep(0.01) or x, 2)]).run(
        _slow_pages(pulled), cancel=token)
    assert time.perf_counter() - t < 5
    assert sorted(r.index for r in report.items) == list(range(len(report.items)))
