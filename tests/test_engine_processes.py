"""``processes=N`` (issue 14): the stages' calls run in N worker processes (threads in each),
the scheduler stays here. The strategy suite, parametrized over processes=2; picklability at
the door and per item; children that die mid-run (their calls retried, the child replaced);
``current_call()``, ``charge`` and ``init`` in the child; cancel, Ctrl-C, and nothing left
behind. No timed assertions."""
from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, cast

import pytest

from engine import CancelToken, Continuous, Hedge, Pipeline, Stage, current_call
from engine._errors import StageInitError
from engine._procs import ProcessBackend, RemoteError
from engine._strategies import Strategy
from engine_helpers import STRATEGIES, check_report, shared_check, stages_for

pytestmark = pytest.mark.timeout(120)


# -- stage functions (module level: they pickle) -----------------------------------------------

def pid_of(x: Any) -> tuple[Any, int]:
    time.sleep(0.01)
    return x, os.getpid()


def die_once(x: int) -> int:
    """Item 3's first attempt takes its worker process down (os._exit)."""
    if x == 3 and current_call().attempt == 1:
        os._exit(7)
    time.sleep(0.005)
    return x


def whoami(x: int) -> dict[str, Any]:
    c = current_call()
    c.charge(tokens=x + 1)
    return {"index": c.index, "key": c.key, "stage": c.stage, "stage_index": c.stage_index,
            "attempt": c.attempt, "hedge": c.hedge, "pid": os.getpid()}


def identity(x: Any) -> Any:
    return x


def unpicklable_result(x: int) -> Any:
    if x == 2:
        return threading.Lock()
    return x


class NeedsKwargs(Exception):
    """Pickles, but does not unpickle (its __init__ needs a keyword): like many API errors."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = 0.5


def raise_odd(x: int) -> int:
    if x % 2:
        raise NeedsKwargs(f"odd {x}", status=429)
    return x


def raise_value_error(x: int) -> int:
    raise ValueError(f"bad {x}")


class Resource:
    def __init__(self, log: str) -> None:
        self.log = log
        self.pid = os.getpid()
        with open(log, "a") as f:
            f.write(f"init {self.pid} {id(self)}\n")

    def close(self) -> None:
        with open(self.log, "a") as f:
            f.write(f"close {self.pid} {id(self)}\n")


def make_resource(log: str) -> Resource:
    return Resource(log)


def use_resource(x: int, res: Resource) -> tuple[int, int, int]:
    time.sleep(0.002)
    return x, res.pid, id(res)


def failing_init() -> Any:
    raise OSError("no connection")


def slow_or_fast(x: int) -> int:
    """Hedged: item 0's first call is slow (it ends early when its twin wins)."""
    c = current_call()
    if x == 0 and not c.hedge:
        c.sleep(30)
        return -1 if c.cancelled else x
    time.sleep(0.002)
    return x


# -- helpers -------------------------------------------------------------------------------------

def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def strategy_of(name: str) -> Strategy:
    return cast(Strategy, STRATEGIES[name]())


def conveyor_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("conveyor")]


# -- the strategy suite ----------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_every_item_once_under_limits(strategy: str, tmp_path: Path) -> None:
    stages = stages_for("thread")
    n = 23
    report = Pipeline(stages).run(range(n), strategy_of(strategy), processes=2)
    check_report(report, stages, n)
    assert report.failed == len([i for i in range(n) if (i * 2) % 5 == 0])
    assert report.ok + report.failed == n
    assert all(r.value == r.index * 2 for r in report.items if r.ok)
    shared_check(report, tmp_path)


@pytest.mark.parametrize("strategy", ["continuous", "batched"])
def test_stream_yields_every_result_once(strategy: str) -> None:
    stages = stages_for("thread", 2)
    seen = [r.index for r in Pipeline(stages).stream(range(17), strategy_of(strategy),
                                                     processes=2)]
    assert sorted(seen) == list(range(17))


def test_calls_run_in_the_children_and_slots_are_shared() -> None:
    """Every call runs in a child; a stage whose limit is below N uses that many children."""
    report = Pipeline([Stage("wide", pid_of, concurrency=4), Stage("one", pid_of)]).run(
        range(12), processes=2)
    assert report.ok == 12
    wide = {r.value[0][1] for r in report.items}
    one = {r.value[1] for r in report.items}
    assert os.getpid() not in wide | one
    assert len(wide) == 2 and len(one) == 1


def test_current_call_and_charge_in_the_child() -> None:
    report = Pipeline([Stage("who", whoami, concurrency=2)], key=lambda v: f"k{v}").run(
        range(5), processes=2)
    for r in report.items:
        v = r.value
        assert (v["index"], v["key"], v["stage"], v["stage_index"], v["attempt"], v["hedge"]) \
            == (r.index, f"k{r.index}", "who", 0, 1, False)
        assert v["pid"] != os.getpid()
        (attempt,) = r.stages[0].attempts
        assert attempt.cost is not None and attempt.cost["tokens"] == r.index + 1


def test_init_runs_in_the_child_per_worker_thread_and_closes(tmp_path: Path) -> None:
    log = tmp_path / "resources.log"
    init = functools.partial(make_resource, str(log))
    report = Pipeline([Stage("r", use_resource, concurrency=3, init=init)]).run(
        range(30), processes=2)
    assert report.ok == 30
    resources = {(pid, rid) for _, pid, rid in (r.value for r in report.items)}
    assert all(pid != os.getpid() for pid, _ in resources)
    lines = log.read_text().split()
    inits = {(int(p), int(i)) for k, p, i in zip(lines[::3], lines[1::3], lines[2::3], strict=True)
             if k == "init"}
    closes = {(int(p), int(i)) for k, p, i in zip(lines[::3], lines[1::3], lines[2::3],
                                                   strict=True) if k == "close"}
    assert resources <= inits and len(inits) == 3  # one per slot: 2 in one child, 1 in the other
    assert closes == inits


def test_init_failing_in_the_child_fails_the_run() -> None:
    with pytest.raises(StageInitError, match="no connection"):
        Pipeline([Stage("r", use_resource, concurrency=2, init=failing_init)]).run(
            range(4), processes=2)


# -- picklability ----------------------------------------------------------------------------------

def test_unpicklable_fn_or_init_is_refused_naming_the_stage() -> None:
    with pytest.raises(ValueError, match=r"Stage 'local'.*fn.*pickle"):
        Pipeline([Stage("ok", identity), Stage("local", lambda x: x)]).run([1], processes=2)
    with pytest.raises(ValueError, match=r"Stage 'i'.*init.*pickle"):
        Pipeline([Stage("i", use_resource, init=lambda: None)]).run([1], processes=2)


def test_executor_stages_are_refused() -> None:
    with pytest.raises(ValueError, match=r"Stage 'p'.*executor"):
        ProcessBackend((Stage("p", identity, executor="process"),), CancelToken(), 2)


def test_unpicklable_value_fails_that_item_only() -> None:
    items: list[Any] = [1, threading.Lock(), 3]
    report = Pipeline([Stage("s", identity, concurrency=2)]).run(items, processes=2)
    assert [r.status for r in report.items] == ["ok", "failed", "ok"]
    err = report.items[1].error
    assert err is not None and err.type == "TypeError" and "does not pickle" in err.message


def test_unpicklable_result_fails_that_item_only() -> None:
    report = Pipeline([Stage("s", unpicklable_result, concurrency=2)]).run(range(4),
                                                                           processes=2)
    assert [r.status for r in report.items] == ["ok", "ok", "failed", "ok"]
    err = report.items[2].error
    assert err is not None and "result does not pickle" in err.message


def test_an_exception_that_does_not_unpickle_keeps_its_name_hint_and_traceback() -> None:
    report = Pipeline([Stage("s", raise_odd, concurrency=2)]).run(range(4), processes=2)
    assert [r.status for r in report.items] == ["ok", "failed", "ok", "failed"]
    err = report.items[1].error
    assert err is not None
    assert err.type == "NeedsKwargs" and err.message == "odd 1"
    assert "raise_odd" in err.traceback  # the child's traceback


def test_a_plain_exception_keeps_its_type_and_the_child_traceback() -> None:
    report = Pipeline([Stage("s", raise_value_error)]).run([1], processes=2)
    err = report.items[0].error
    assert err is not None and err.type == "ValueError" and err.message == "bad 1"
    assert "raise_value_error" in err.traceback


def test_remote_error_round_trips() -> None:
    import pickle

    from engine._procs_child import _portable_error

    exc = pickle.loads(pickle.dumps(_portable_error(NeedsKwargs("x", status=1))))
    assert isinstance(exc, RemoteError) and type(exc).__name__ == "NeedsKwargs"
    assert exc.retry_after == 0.5 and "NeedsKwargs" in exc.remote_traceback


# -- children that die -------------------------------------------------------------------------

def test_a_child_that_exits_mid_call_is_replaced_and_its_calls_retried() -> None:
    report = Pipeline([Stage("d", die_once, concurrency=4)]).run(range(20), processes=2)
    assert report.ok == 20
    (span,) = report.items[3].stages
    assert span.attempts[0].error is not None and span.attempts[0].error.type == "WorkerLost"
    assert report.items[3].value == 3


def test_a_child_killed_by_the_test_mid_run() -> None:
    """SIGKILL one child after the first results: every item still ends ok (retried)."""
    killed: list[int] = []

    def on_result(r: Any) -> None:
        if not killed:
            pid = r.value[1]
            killed.append(pid)
            os.kill(pid, signal.SIGKILL)

    report = Pipeline([Stage("p", pid_of, concurrency=6)]).run(
        range(60), Continuous(), on_result=on_result, processes=2)
    assert report.ok == 60
    pids = {r.value[1] for r in report.items}
    assert len(pids) >= 3  # the killed child, the other one, and its replacement
    lost = [a for r in report.items for a in r.stages[0].attempts
            if a.error is not None and a.error.type == "WorkerLost"]
    assert lost  # the killed child had calls in flight: they were retried
    assert gone(killed[0])


# -- cancel, hedges, Ctrl-C, close -------------------------------------------------------------

def test_cancel_mid_run_reports_every_item() -> None:
    token = CancelToken()
    seen: list[int] = []

    def on_result(r: Any) -> None:
        seen.append(r.index)
        if len(seen) == 5:
            token.cancel("enough")

    report = Pipeline([Stage("p", pid_of, concurrency=4)]).run(
        range(200), on_result=on_result, cancel=token, processes=2)
    assert len(report.items) == 200 or report.cancelled > 0
    assert report.ok >= 5 and report.failed == 0
    assert report.ok + report.cancelled == len(report.items)


def test_hedge_discards_the_slow_twin_in_the_child() -> None:
    stage = Stage("h", slow_or_fast, concurrency=4, idempotent=True,
                  hedge=Hedge(after=0.2, max_extra=1.0))
    report = Pipeline([stage]).run(range(8), processes=2)
    assert report.ok == 8
    first = report.items[0]
    assert first.value == 0
    attempts = first.stages[0].attempts
    assert any(a.hedge and not a.lost for a in attempts)
    assert any(a.lost for a in attempts)


def test_no_process_or_thread_outlives_the_run() -> None:
    before = conveyor_threads()
    report = Pipeline([Stage("p", pid_of, concurrency=4)]).run(range(10), processes=2)
    pids = {r.value[1] for r in report.items}
    assert pids and all(gone(p) for p in pids)
    assert conveyor_threads() == before


def test_a_stream_closed_early_stops_its_children() -> None:
    it = Pipeline([Stage("p", pid_of, concurrency=4)]).stream(range(1000), processes=2)
    first = next(it)
    it.close()  # type: ignore[attr-defined]
    assert gone(first.value[1])


def test_backend_closes_cleanly_without_a_run() -> None:
    b = ProcessBackend((Stage("p", identity, concurrency=3),), CancelToken(), 2)
    pids = b.pids
    assert len(pids) == 2 and all(not gone(p) for p in pids)
    b.close()
    assert all(gone(p) for p in pids)


SIGINT_SCRIPT = textwrap.dedent("""
    import os, signal, sys, threading
    sys.path.insert(0, {tests!r})
    from engine import Pipeline, Stage
    from test_engine_processes import pid_of

    def on_result(r):
        if r.index == 0:
            # what a terminal's Ctrl-C does: SIGINT to the whole process group
            threading.Timer(0.05, os.killpg, (os.getpgid(0), signal.SIGINT)).start()

    if __name__ == "__main__":
        try:
            Pipeline([Stage("p", pid_of, concurrency=4)]).run(range(400), on_result=on_result,
                                                               processes=2)
        except KeyboardInterrupt as exc:
            report = exc.report
            print("interrupted", report.ok, report.failed, report.cancelled, len(report.items))
        else:
            print("not interrupted")
""")


def test_ctrl_c_to_the_process_group_cancels_and_the_children_finish(tmp_path: Path) -> None:
    script = tmp_path / "sigint_run.py"
    script.write_text(SIGINT_SCRIPT.format(tests=str(Path(__file__).parent)))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=90, start_new_session=True,
                         cwd=str(Path(__file__).parents[1]))
    assert out.returncode == 0, out.stderr
    words = out.stdout.split()
    assert words[0] == "interrupted", out.stdout + out.stderr
    ok, failed, cancelled, total = map(int, words[1:])
    assert failed == 0  # no child died of the SIGINT: their calls finished
    assert ok >= 1 and cancelled >= 1 and ok + cancelled == total  # (items never read: not in)
