"""The compiled hot path (setup.py, engine/_accel.py): the same decisions as the sources, the
sources on request, and never a build older than its source."""
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

pytestmark = pytest.mark.timeout(120)
EXT = tuple(importlib.machinery.EXTENSION_SUFFIXES)
needs_build = pytest.mark.skipif(not engine.COMPILED,
                                 reason="the package was built without the compiled hot path")

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

    import simulators
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
    out = {"compiled": [engine.COMPILED, simulators.COMPILED],
           "files": [getattr(engine, m).__file__ for m in engine._accel.HOT]
                    + [simulators._virtual.__file__]}
    for strategy in (Continuous(), Continuous(max_in_flight=5), Batched(size=7),
                     ParallelBatches(lanes=2, size=5)):
        for name, st in (("sim", stages), ("services", services)):
            doc = Pipeline(st).run(range(60), strategy, clock="virtual").to_json()
            doc["metadata"].pop("started_at")
            out[name + strategy.name + json.dumps(strategy.params)] = doc
    print(json.dumps(out))
""")


def run_child(env_extra: dict[str, str], pythonpath: Path | None = None
              ) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CONVEYOR_PURE"} | env_extra
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([sys.executable, "-c", RUN], capture_output=True, text=True,
                          env=env, cwd=pythonpath or ROOT, timeout=100, check=True)


def test_the_flags_say_which_modules_run() -> None:
    import simulators
    from simulators._accel import HOT as SIM_HOT

    files = [getattr(engine, name).__file__ for name in HOT]
    assert all(f.endswith(EXT) == engine.COMPILED for f in files), files
    assert isinstance(engine.COMPILED, bool) and "COMPILED" in engine.__all__
    files = [getattr(simulators, name).__file__ for name in SIM_HOT]
    assert all(f.endswith(EXT) == simulators.COMPILED for f in files), files


def test_sources_on_request() -> None:
    out = json.loads(run_child({"CONVEYOR_PURE": "1"}).stdout)
    assert out["compiled"] == [False, False]
    assert all(f.endswith(".py") for f in out["files"])


@needs_build
def test_compiled_and_sources_decide_the_same() -> None:
    compiled = json.loads(run_child({}).stdout)
    pure = json.loads(run_child({"CONVEYOR_PURE": "1"}).stdout)
    assert compiled.pop("compiled") == [True, True] and pure.pop("compiled") == [False, False]
    compiled.pop("files"), pure.pop("files")
    assert compiled.keys() == pure.keys() and len(compiled) == 8
    for name in compiled:
        assert compiled[name] == pure[name], name  # every call's start and end, every status
        if name.startswith("sim"):
            assert compiled[name]["summary"]["failed"] == 1
        else:  # the faults were hit: retried calls (errors, timeouts, refusals)
            assert sum(st["attempts"] - 1 for it in compiled[name]["items"]
                       for st in it["stages"]) > 20


@needs_build
@pytest.mark.parametrize("after_build", [60.0, 0.5], ids=["edited", "installed-just-after"])
def test_a_build_older_than_its_source_is_not_used(tmp_path: Path, after_build: float) -> None:
    """A source edited after the build runs instead of the build (with a warning); one
    written within a second of its .so (a wheel install writes it just after) does not."""
    shutil.copytree(ROOT / "engine", tmp_path / "engine",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for lib in ROOT.glob("*__mypyc*"):  # the compiled modules' shared runtime
        shutil.copy2(lib, tmp_path / lib.name)
    src = tmp_path / "engine" / "_policies.py"
    built = next((tmp_path / "engine").glob("_policies.*[!y]")).stat().st_mtime  # the .so
    os.utime(src, (built + after_build, built + after_build))
    proc = run_child({}, pythonpath=tmp_path)
    out = json.loads(proc.stdout)
    engine_files = out["files"][:len(HOT)]
    assert all(f.startswith(str(tmp_path)) for f in engine_files)
    if after_build > 2:
        assert out["compiled"][0] is False
        assert all(f.endswith(".py") for f in engine_files)
        assert "older than the source" in proc.stderr and "_policies" in proc.stderr
    else:
        assert out["compiled"][0] is True
        assert all(f.endswith(EXT) for f in engine_files)
        assert "older than the source" not in proc.stderr
