"""The public surface: the contract's names, each exported once; engine stays standalone."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import engine

pytestmark = pytest.mark.timeout(30)

CONTRACT = ["Pipeline", "Stage", "Continuous", "Batched", "ParallelBatches", "RetryPolicy",
            "CancelToken"]


def test_contract_names_importable() -> None:
    for name in [*CONTRACT, "ItemResult", "RunReport", "RateLimit"]:
        assert name in engine.__all__
        assert getattr(engine, name) is not None


def test_each_public_name_once() -> None:
    assert len(engine.__all__) == len(set(engine.__all__))
    for name in engine.__all__:
        obj = getattr(engine, name)
        assert not name.startswith("_"), obj


def test_engine_imports_neither_simulators_nor_bench() -> None:
    root = Path(engine.__file__).parent
    for path in root.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            mods = []
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                mods = [node.module]
            for m in mods:
                assert m.split(".")[0] not in ("simulators", "bench"), f"{path}: imports {m}"


def test_import_engine_alone_is_light() -> None:
    code = ("import sys, engine; bad=[m for m in ('numpy','simulators','bench','requests') "
            "if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_records_are_frozen() -> None:
    from dataclasses import FrozenInstanceError

    from engine import Pipeline, Stage

    report = Pipeline([Stage("s", str)]).run([1])
    r = report.items[0]
    with pytest.raises(FrozenInstanceError):
        r.status = "failed"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        r.stages[0].start = 3  # type: ignore[misc]
