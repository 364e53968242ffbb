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
import time
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
        def simulate(self, call, value):
            d = ((call.index * 7919 + self.k * 104729) % 1000) / 250 + 0.01
            if (call.index + self.k) % 9 == 0 and call.attempt == 1:
                return Simulated(d / 2, None, RuntimeError("flaky"))
            if call.index == 17 and self.k == 2:
                return Simulated(d, None, ValueError("bad input"))
            return Simulated(d, value)
        def __call__(self, value):
            return value

    stages = [Stage(f"s{k}", Sim(k), c, retry=RetryPolicy(attempts=2, backoff=0.3))
              for k, c in enumerate((4, 3, 2))]
    out = {"compiled": engine.COMPILED,
           "files": [getattr(engine, m).__file__ for m in engine._accel.HOT]}
    for strategy in (Continuous(), Continuous(max_in_flight=5), Batched(size=7),
                     ParallelBatches(lanes=2, size=5)):
        doc = Pipeline(stages).run(range(60), strategy, clock="virtual").to_json()
        doc["metadata"].pop("started_at")
        out[strategy.name + json.dumps(strategy.params)] = doc
    print(json.dumps(out))
""")


def run_child(env_extra: dict[str, str], pythonpath: Path | None = None
              ) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CONVEYOR_PURE"} | env_extra
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([sys.executable, "-c", RUN], capture_output=True, text=True,
                          env=env, cwd=pythonpath or ROOT, timeout=100, check=True)


def test_the_flag_says_which_modules_run() -> None:
    files = [getattr(engine, name).__file__ for name in HOT]
    assert all(f.endswith(EXT) == engine.COMPILED for f in files), files
    assert isinstance(engine.COMPILED, bool) and "COMPILED" in engine.__all__


def test_sources_on_request() -> None:
    out = json.loads(run_child({"CONVEYOR_PURE": "1"}).stdout)
    assert out["compiled"] is False
    assert all(f.endswith(".py") for f in out["files"])


@needs_build
def test_compiled_and_sources_decide_the_same() -> None:
    compiled = json.loads(run_child({}).stdout)
    pure = json.loads(run_child({"CONVEYOR_PURE": "1"}).stdout)
    assert compiled.pop("compiled") is True and pure.pop("compiled") is False
    compiled.pop("files"), pure.pop("files")
    assert compiled.keys() == pure.keys() and len(compiled) == 4
    for name in compiled:
        assert compiled[name] == pure[name], name  # every call's start and end, every status
        assert compiled[name]["summary"]["failed"] == 1


@needs_build
def test_a_build_older_than_its_source_is_not_used(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "engine", tmp_path / "engine",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for lib in ROOT.glob("*__mypyc*"):  # the compiled modules' shared runtime
        shutil.copy2(lib, tmp_path / lib.name)
    src = tmp_path / "engine" / "_policies.py"
    future = time.time() + 60
    os.utime(src, (future, future))
    proc = run_child({}, pythonpath=tmp_path)
    out = json.loads(proc.stdout)
    assert out["compiled"] is False
    assert all(f.startswith(str(tmp_path)) and f.endswith(".py") for f in out["files"])
    assert "older than the source" in proc.stderr and "_policies" in proc.stderr
