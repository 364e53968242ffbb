"""Ctrl-C is never lost (issue 10): the engine's SIGINT handler is in force only while control
is inside the engine; a Ctrl-C inside it cancels the run, and is raised once the running calls
have finished; a second one stops waiting at once.

Each test runs a small script in a subprocess and sends it SIGINT, as a terminal would.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from contract import ROOT

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")]

PRELUDE = textwrap.dedent(f"""
    import itertools, json, sys, threading, time
    sys.path.insert(0, {str(ROOT)!r})
    from engine import Batched, Continuous, ParallelBatches, Pipeline, RateLimit, Stage
    pulled = []
    def items():
        for i in itertools.count():
            pulled.append(i)
            yield i
    def say(*words):  # one write per line: worker threads print too
        sys.stdout.write(" ".join(map(str, words)) + "\\n")
        sys.stdout.flush()
    def busy(seconds):
        t = time.perf_counter()
        while time.perf_counter() - t < seconds:
            pass
""")


class Child:
    """A script in a subprocess; ``wait_for`` reads its stdout up to a line."""

    def __init__(self, body: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", PRELUDE + textwrap.dedent(body)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []

    def wait_for(self, word: str) -> None:
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            if not line:
                _, err = self.proc.communicate(timeout=30)
                raise AssertionError(f"child ended before {word!r}: {self.lines} {err}")
            self.lines.append(line.strip())
            if line.strip() == word:
                return

    def sigint(self) -> None:
        os.kill(self.proc.pid, signal.SIGINT)

    def finish(self, timeout: float = 30) -> tuple[list[str], str]:
        out, err = self.proc.communicate(timeout=timeout)
        return self.lines + out.strip().splitlines(), err

    def last_json(self, timeout: float = 30) -> dict:
        out, err = self.finish(timeout)
        assert out and out[-1].startswith("{"), (out, err)
        return json.loads(out[-1])


# -- (a) Ctrl-C while the caller's own code runs between two results ---------------------------
@pytest.mark.parametrize("work", ["time.sleep(20)", "busy(20)"], ids=["sleeping", "busy"])
@pytest.mark.parametrize("clock", ["live", "virtual"])
def test_ctrl_c_in_the_callers_code_raises_there(work: str, clock: str) -> None:
    """An open stream, the caller busy with its own work: Ctrl-C is the caller's
    KeyboardInterrupt, raised in its own code at once (not swallowed by the engine's handler
    and turned into a cancel nobody sees)."""
    child = Child(f"""
        from simulators import SimulatedService
        fn = SimulatedService("a", {{"dist": "constant", "value": 0.01}}, seed=1)
        if {clock!r} == "live":
            fn = lambda x: time.sleep(0.01) or x
        gen = Pipeline([Stage("a", fn, 2)]).stream(items(), clock={clock!r})
        next(gen)
        say("ready")
        t = time.perf_counter()
        try:
            {work}
            say("lost")
        except KeyboardInterrupt as exc:
            where = exc.__traceback__.tb_frame.f_code.co_name
            say(json.dumps({{"caught": time.perf_counter() - t, "where": where}}))
        gen.close()
        say(json.dumps({{"threads": threading.active_count()}}))
    """)
    child.wait_for("ready")
    time.sleep(0.3)
    child.sigint()
    out, err = child.finish()
    assert "lost" not in out, (out, err)
    caught = json.loads(out[-2])
    assert caught["caught"] < 5, caught  # at once, not after the 20 s of work
    assert json.loads(out[-1]) == {"threads": 1}, (out, err)


def test_ctrl_c_in_on_result_raises_from_run_with_the_report() -> None:
    """``on_result`` is the caller's code too: Ctrl-C there is raised by ``run()`` promptly."""
    child = Child("""
        def on_result(r):
            if r.index == 3:
                say("in callback")
                time.sleep(20)
        t = None
        try:
            Pipeline([Stage("a", lambda x: time.sleep(0.01) or x, 2)]).run(
                items(), on_result=on_result)
            say("lost")
        except KeyboardInterrupt as exc:
            rep = getattr(exc, "report", None)
            say(json.dumps({"report": rep is not None,
                            "n": None if rep is None else len(rep.items),
                            "pulled": len(pulled)}))
    """)
    child.wait_for("in callback")
    t = time.perf_counter()
    child.sigint()
    got = child.last_json()
    assert time.perf_counter() - t < 10
    assert got["report"] and got["n"] == got["pulled"], got


# -- (b) Ctrl-C inside the engine: the stream raises it itself, before more results --------------
@pytest.mark.parametrize("strategy", ["Continuous()", "Batched(size=2)"])
def test_ctrl_c_inside_stream_is_raised_even_if_the_caller_would_break(strategy: str) -> None:
    """The caller stops at the first result that is not ok (a cancelled one, after Ctrl-C):
    the stream must raise KeyboardInterrupt itself, right after settling, handing no
    cancelled result over first (else the Ctrl-C is lost in the caller's ``break``)."""
    child = Child(f"""
        def work(x):
            if x == 0:
                say("started")
            time.sleep(0.2)
            return x
        got = []
        try:
            for r in Pipeline([Stage("a", work, 2), Stage("b", work, 2)]).stream(
                    items(), {strategy}):
                got.append(r)
                if r.status != "ok":
                    break
            say("lost", [r.status for r in got])
        except KeyboardInterrupt as exc:
            rest = exc.results
            idx = sorted(r.index for r in got + rest)
            say(json.dumps({{"handed": [r.status for r in got],
                             "rest": [r.status for r in rest],
                             "once": idx == list(range(len(pulled)))}}))
    """)
    child.wait_for("started")
    time.sleep(0.5)
    child.sigint()
    got = child.last_json()
    assert set(got["handed"]) <= {"ok"}, got  # nothing cancelled handed to the loop
    assert "cancelled" in got["rest"], got  # the rest came with the KeyboardInterrupt
    assert got["once"], got  # every item read: handed over or in .results, once


# -- (c) a second Ctrl-C stops waiting at once ---------------------------------------------------
def _thirty_seconds_stage(consume: str, caught: bool) -> Child:
    call = ("Pipeline([Stage('a', work, 2)]).run(range(10))" if consume == "run"
            else "list(Pipeline([Stage('a', work, 2)]).stream(range(10)))")
    body = f"""
        def work(x):
            if x == 0:
                say("started")
            time.sleep(30)
            return x
        try:
            {call}
            say("finished")
        except KeyboardInterrupt:
            say("interrupted")
            if not {caught!r}:
                raise
    """
    child = Child(body)
    child.wait_for("started")
    time.sleep(0.3)
    child.sigint()
    time.sleep(0.5)
    assert child.proc.poll() is None  # the first Ctrl-C waits for the running calls
    return child


@pytest.mark.parametrize("consume", ["run", "stream"])
def test_second_ctrl_c_raises_at_once(consume: str) -> None:
    """A stage sleeping 30 s: the first Ctrl-C waits for it; the second raises
    KeyboardInterrupt at once (the running calls are left to finish in the background)."""
    child = _thirty_seconds_stage(consume, caught=True)
    t = time.perf_counter()
    child.sigint()
    try:
        child.wait_for("interrupted")
        assert time.perf_counter() - t < 3, child.lines
        assert "finished" not in child.lines
    finally:
        child.proc.kill()
        child.proc.communicate()


@pytest.mark.parametrize("consume", ["run", "stream"])
@pytest.mark.parametrize("caught", [False, True], ids=["uncaught", "caught"])
def test_second_ctrl_c_lets_the_process_exit_at_once(consume: str, caught: bool) -> None:
    """...and the process exits (KeyboardInterrupt) within a couple of seconds, not 30."""
    child = _thirty_seconds_stage(consume, caught)
    child.sigint()
    try:
        out, err = child.finish(timeout=6)
    except subprocess.TimeoutExpired:
        child.proc.kill()
        child.proc.communicate()
        raise AssertionError("the process did not exit within 6 s of the second Ctrl-C") from None
    assert "interrupted" in out and "finished" not in out, (out, err)
    if not caught:
        assert "KeyboardInterrupt" in err and child.proc.returncode != 0, (out, err)


def test_first_ctrl_c_waits_for_running_calls() -> None:
    child = Child("""
        ended = []
        def work(x):
            if x == 0:
                say("started")
            time.sleep(1.0)
            ended.append(x)
            return x
        try:
            Pipeline([Stage('a', work, 2)]).run(range(10))
        except KeyboardInterrupt as exc:
            r = exc.report
            say(json.dumps({"ended": sorted(ended), "ok": r.ok, "cancelled": r.cancelled}))
    """)
    child.wait_for("started")
    time.sleep(0.2)
    child.sigint()
    got = child.last_json()
    assert got == {"ended": [0, 1], "ok": 2, "cancelled": 8}, got


# -- (d) run() after Ctrl-C: KeyboardInterrupt with the complete report ---------------------------
@pytest.mark.parametrize("strategy", ["Continuous()", "Continuous(max_in_flight=None)",
                                      "Batched(size=4)", "ParallelBatches(lanes=2, size=3)"])
def test_run_after_ctrl_c_raises_with_a_complete_report(strategy: str) -> None:
    child = Child(f"""
        lock = threading.Lock()
        started = []
        def work(x):
            with lock:
                started.append(x)
            if x == 0:
                say("started")
            time.sleep(0.05)
            return x
        src = items() if "None" not in {strategy!r} else range(3000)
        try:
            Pipeline([Stage("a", work, 4), Stage("b", work, 2)]).run(src, {strategy})
            say("lost")
        except KeyboardInterrupt as exc:
            r = exc.report
            idx = sorted(x.index for x in r.items)
            calls = sum(len(sp.attempts) for x in r.items for sp in x.stages)
            n_read = len(pulled) if "None" not in {strategy!r} else 3000
            say(json.dumps({{"once": idx == list(range(len(idx))), "n": len(idx),
                             "read": n_read, "calls": calls, "started": len(started),
                             "ok": r.ok, "cancelled": r.cancelled,
                             "statuses": sorted({{x.status for x in r.items}}),
                             "threads": threading.active_count()}}))
    """)
    child.wait_for("started")
    time.sleep(0.4)
    child.sigint()
    got = child.last_json()
    assert got["once"] and got["n"] == got["read"], got  # every item read, exactly once
    assert got["calls"] == got["started"], got  # every call that ran is in the report
    assert got["cancelled"] > 0 and set(got["statuses"]) <= {"ok", "cancelled"}, got
    assert got["threads"] == 1, got


# -- Ctrl-C while calls wait for a rate-limit token -------------------------------------------
def test_ctrl_c_while_calls_wait_for_a_token_starts_none() -> None:
    child = Child("""
        starts = []
        def work(x):
            starts.append(time.perf_counter())
            if x == 0:
                say("started")
            return x
        t = None
        try:
            Pipeline([Stage("llm", work, 10, rate_limit=RateLimit(rate=2))]).run(range(50))
            say("lost")
        except KeyboardInterrupt as exc:
            t = time.perf_counter()
            say(json.dumps({"starts": len(starts), "n": len(exc.report.items),
                            "cancelled": exc.report.cancelled}))
        time.sleep(0.6)  # a call still queued would start now
        say(json.dumps({"starts": len(starts)}))
    """)
    child.wait_for("started")
    time.sleep(0.3)
    t = time.perf_counter()
    child.sigint()
    out, err = child.finish()
    first, after = json.loads(out[-2]), json.loads(out[-1])
    assert time.perf_counter() - t < 5, (out, err)  # not the 24.5 s of queued calls
    assert first == {"starts": 1, "n": 50, "cancelled": 49}, (out, err)
    assert after == {"starts": 1}, (out, err)
