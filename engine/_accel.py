"""Which engine runs: the hot path compiled by mypyc, or the pure-Python sources.

Compiling is on request, for installs that copy the sources (a wheel, ``pip install .``):
``CONVEYOR_COMPILE=1 pip install .`` compiles the modules in ``HOT`` from the very sources it
installs beside them (setup.py). An editable install (``pip install -e .``, what ``./test.sh``
and ``./run.sh`` do) never compiles, so an edit is always what runs and a stale build cannot
exist. ``CONVEYOR_PURE=1`` at import runs the sources of a compiled install (to step through
the scheduler in a debugger or profile it with cProfile, which cannot see into compiled code).
It is all or nothing: compiled classes cannot be mixed with interpreted subclasses.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path

HOT = ("_core", "_policies", "_flow", "_scheduler", "_virtual")  # in dependency order


def use_compiled(package: str, here: Path, hot: tuple[str, ...]) -> bool:
    """Import ``package``'s ``hot`` modules compiled if they were built, else from sources.

    Call it from the package's ``__init__`` before anything imports those modules; returns
    True when the compiled ones are in use.
    """
    if os.environ.get("CONVEYOR_PURE", "") not in ("", "0"):
        _load_sources(package, here, hot)
        return False
    for name in hot:
        spec = importlib.util.find_spec(f"{package}.{name}")
        origin = spec.origin if spec is not None else None
        if origin is None or not origin.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)):
            _load_sources(package, here, hot)
            return False  # not built (an editable or pure install): the sources
    return True


def _load_sources(package: str, here: Path, hot: tuple[str, ...]) -> None:
    for name in hot:
        full = f"{package}.{name}"
        if full in sys.modules:
            continue
        spec = importlib.util.spec_from_file_location(full, here / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module
        spec.loader.exec_module(module)
        setattr(sys.modules[package], name, module)


COMPILED: bool = use_compiled(__name__.rpartition(".")[0], Path(__file__).parent, HOT)
"""True when the mypyc-compiled hot path is in use, False when the pure-Python sources are."""
