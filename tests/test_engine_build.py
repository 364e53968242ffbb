"""The compiled hot path (setup.py, engine/_accel.py): compiled on request, from the very
sources; the same decisions as the sources; an editable install always runs the sources."""
from __future__ import annotations

import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import engine
from contract import ROOT
from engine._accel import HOT

pytestmark = pytest.mark.timeout(240)
EXT = tuple(importlib.machinery.EXTENSION_SUFFIXES)

# A small virtual run that exercises every policy path: retries, a failure, barriers, lanes.
RUN = textwrap.dedent("""
    import json, sys
    import engine
    from engine import (Batched, Continuous, ParallelBatches, Pipeline, RetryPolicy, Simulated,
                        Stage)

    class Sim:
        def __init__(self, k):
            self.k = k
        def simulate(self, call, value, *, now=0.0):
            d = ((call.index * 7919 + self.k * 104729) % 1000) / 250 + 0.01
            if (call.index + self.k) % 9 == 0 and call.attempt == 1:
                return Simulated(d / 2, None, RuntimeError("flaky"))
            if call.index == 17 and self.k == 2:
                return Simulated(d, None, ValueError("bad input"))
            return Simulated(d, value)
        def __call__(self, value):
            return value

    from simulators import Faults, SimulatedService

    stages = [Stage(f"s{k}", Sim(k), c, retry=RetryPolicy(attempts=2, backoff=0.3))
              for k, c in enumerate((4, 3, 2))]
    # the simulators' per-call path too: errors, timeouts, a rate limit and an outage
    services = [
        Stage("fetch", SimulatedService("fetch", {"dist": "lognormal", "median": 1, "p99": 4},
                                        Faults(error_rate=0.1, timeout=3.0), seed=3), 5,
              retry=RetryPolicy(attempts=3, backoff=0.5)),
        Stage("llm", SimulatedService("llm", {"dist": "exponential", "mean": 0.5},
                                      Faults(rate_limit=4.0, outages=[(5.0, 8.0)]), seed=3), 4,
              retry=RetryPolicy(attempts=4, backoff=0.2)),
    ]
    out = {"compiled": engine.COMPILED,
           "files": [getattr(engine, m).__file__ for m in engine._accel.HOT]}
    for strategy in (Continuous(), Continuous(max_in_flight=5), Batched(size=7),
                     ParallelBatches(lanes=2, size=5)):
        for name, st in (("sim", stages), ("services", services)):
            doc = Pipeline(st).run(range(60), strategy, clock="virtual").to_json()
            doc["metadata"].pop("started_at")
            out[name + strategy.name + json.dumps(strategy.params)] = doc
    # live, on threads, with an interpreted backend and a user's interpreted policy: both
    # subclass compiled classes (LiveBackend(Backend), a strategy's own Policy)
    from engine import Policy

    class Halves(Policy):
        lookahead = 1
        def __init__(self, sched):
            self.sched = sched
        def params(self):
            return {}
        def fill(self):
            while (item := self.sched.admit_one()) is not None:
                self.sched.advance(item)
        def stage_done(self, item):
            self.sched.advance(item)
        def item_done(self, item):
            self.sched.emit((item,))

    class Mine:
        name, params = "mine", {}
        def policy(self, sched):
            return Halves(sched)

    live = [Stage("a", lambda x: x + 1, 2), Stage("b", lambda x: x * 2, 3)]
    got = sorted(r.value for r in Pipeline(live).stream(range(500), Continuous()))
    mine = Pipeline(live).run(range(50), Mine())
    out["live"] = {"values": got == [(i + 1) * 2 for i in range(500)], "mine": mine.ok}
    print(json.dumps(out))
""")


def run_child(env_extra: dict[str, str], pythonpath: Path | None = None
              ) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CONVEYOR_PURE"} | env_extra
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([sys.executable, "-c", RUN], capture_output=True, text=True,
                          env=env, cwd=pythonpath or ROOT, timeout=100, check=True)


def test_an_editable_install_runs_the_sources() -> None:
    """./test.sh installs editable: what runs is the source as written, never a build."""
    files = [getattr(engine, name).__file__ for name in HOT]
    assert engine.COMPILED is False and all(f.endswith(".py") for f in files), files
    assert not list((ROOT / "engine").glob("*.so")), "a compiled module in the source tree"
    assert isinstance(engine.COMPILED, bool) and "COMPILED" in engine.__all__


@pytest.fixture(scope="module")
def compiled_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The engine compiled by mypyc in a copy of the sources (what CONVEYOR_COMPILE=1 pip
    install . builds), importable with PYTHONPATH."""
    if shutil.which("gcc") is None:
        pytest.skip("no C compiler on this machine: the compiled build cannot be tested here")
    where = tmp_path_factory.mktemp("compiled")
    shutil.copytree(ROOT / "engine", where / "engine",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    shutil.copytree(ROOT / "simulators", where / "simulators",
                    ignore=shutil.ignore_patterns("__pycache__"))
    mods = [f"engine/{m}.py" for m in HOT]
    subprocess.run([sys.executable, "-m", "mypyc", *mods], cwd=where, check=True,
                   capture_output=True, text=True, timeout=200)
    return where


def test_compiled_and_sources_decide_the_same(compiled_copy: Path) -> None:
    compiled = json.loads(run_child({}, pythonpath=compiled_copy).stdout)
    pure = json.loads(run_child({"CONVEYOR_PURE": "1"}, pythonpath=compiled_copy).stdout)
    assert compiled.pop("compiled") is True and pure.pop("compiled") is False
    assert all(f.endswith(EXT) for f in compiled.pop("files"))
    assert all(f.endswith(".py") for f in pure.pop("files"))
    assert compiled.pop("live") == pure.pop("live") == {"values": True, "mine": 50}
    assert compiled.keys() == pure.keys() and len(compiled) == 8
    for name in compiled:
        assert compiled[name] == pure[name], name  # every call's start and end, every status
        if name.startswith("sim"):
            assert compiled[name]["summary"]["failed"] == 1
        else:  # the faults were hit: retried calls (errors, timeouts, refusals)
            assert sum(st["attempts"] - 1 for it in compiled[name]["items"]
                       for st in it["stages"]) > 20


def test_setup_compiles_only_on_request_and_never_editable() -> None:
    text = (ROOT / "setup.py").read_text()
    assert 'os.environ.get("CONVEYOR_COMPILE", "")' in text and "editable" in text
