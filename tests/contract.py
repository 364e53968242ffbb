"""The independent contract checker (../shared/tools/check_results.py) for the tests, and the
hand-off of results files to .ci/run.

The project does not depend on ../shared (users clone only the project): when the checker is
absent the tests keep their own validation, and the checker's part is reported: a warning
names every test whose files went unchecked, so a missing checker is visible in the summary
(`-ra`), never mistaken for a pass.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
CHECKER = ROOT.parent / "shared" / "tools" / "check_results.py"


def run_checker(*paths: Path) -> subprocess.CompletedProcess[str]:
    """The checker as a command, on ``paths`` (only call it when ``CHECKER.exists()``)."""
    return subprocess.run([sys.executable, str(CHECKER), *map(str, paths)],
                          capture_output=True, text=True, timeout=120)


class CheckerMissing(UserWarning):
    """../shared/tools/check_results.py is not beside the project: files went unchecked."""


def assert_checker_accepts(*paths: Path) -> None:
    """The checker accepts every file (a ``CheckerMissing`` warning when it is absent)."""
    if not CHECKER.exists():
        warnings.warn(CheckerMissing(f"{CHECKER} is absent: {len(paths)} results file(s) not "
                                     "checked by the shared contract checker"), stacklevel=2)
        return
    res = run_checker(*paths)
    assert res.returncode == 0, res.stdout + res.stderr


def load_checker() -> ModuleType | None:
    """The checker as a module (``check(doc)``, ``percentile``), or None when absent."""
    if not CHECKER.exists():
        return None
    spec = importlib.util.spec_from_file_location("check_results", CHECKER)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def keep_for_ci(group: str, files: Iterable[tuple[Path, str]]) -> None:
    """Copy ``(path, name)`` pairs to $CONVEYOR_RESULTS_OUT/<group>/<name>: .ci/run re-checks
    every results file kept there. Nothing happens outside CI."""
    keep = os.environ.get("CONVEYOR_RESULTS_OUT")
    if not keep:
        return
    dest = Path(keep, group)
    dest.mkdir(parents=True, exist_ok=True)
    for path, name in files:
        shutil.copyfile(path, dest / name)
