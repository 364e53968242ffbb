"""Which engine runs: the hot path compiled by mypyc, or the pure-Python sources.

``setup.py`` compiles the modules in ``HOT`` from these very sources when it can. At import,
the sources are used instead when

* ``CONVEYOR_PURE=1`` is set (to step through the engine in a debugger or profile it with
  cProfile, which cannot see into compiled code), or
* any compiled module is missing or older than its source (a checkout edited after the last
  build: a warning says so, and the edits run rather than a stale build).

It is all or nothing: compiled classes cannot be mixed with interpreted subclasses.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import warnings
from pathlib import Path

HOT = ("_scheduler", "_policies", "_backends")  # in dependency order


def use_compiled(package: str, here: Path, hot: tuple[str, ...]) -> bool:
    """Import ``package``'s ``hot`` modules compiled if built and fresh, else from sources.

    Call it from the package's ``__init__`` before anything imports those modules; returns
    True when the compiled ones are in use. (``simulators`` uses it too.)
    """
    if os.environ.get("CONVEYOR_PURE", "") not in ("", "0"):
        _load_sources(package, here, hot)
        return False
    built = []
    for name in hot:
        spec = importlib.util.find_spec(f"{package}.{name}")
        origin = spec.origin if spec is not None else None
        if origin is None or not origin.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)):
            _load_sources(package, here, hot)
            return False  # not built (no compiler, or a pure install): nothing to say
        built.append((name, os.path.getmtime(origin)))
    # 2 s of slack: installing a wheel writes each .py just after its .so (the .so sorts
    # first), which must not count as an edit; an edit made that soon after a build cannot be
    stale = [n for n, t in built if (here / f"{n}.py").stat().st_mtime > t + 2.0]
    if stale:
        warnings.warn(
            f"{package}: compiled {', '.join(stale)} older than the source; running the "
            f"pure-Python sources (rebuild: pip install -e .)", RuntimeWarning, stacklevel=3)
        _load_sources(package, here, hot)
        return False
    return True


def _load_sources(package: str, here: Path, hot: tuple[str, ...]) -> None:
    for name in hot:
        full = f"{package}.{name}"
        spec = importlib.util.spec_from_file_location(full, here / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module
        spec.loader.exec_module(module)
        setattr(sys.modules[package], name, module)


COMPILED: bool = use_compiled(__name__.rpartition(".")[0], Path(__file__).parent, HOT)
"""True when the mypyc-compiled hot path is in use, False when the pure-Python sources are."""
