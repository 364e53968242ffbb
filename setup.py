"""Build hook: compile the engine's hot path with mypyc when possible (pure Python otherwise).

The engine's scheduler, the strategies' policies and the backends, and the simulators' per-call
path of ``SimulatedService.simulate``, are compiled from the very same sources (mypyc, as black
and mypy ship themselves). The lists are ``HOT`` in engine/_accel.py and simulators/_accel.py.
It is optional on purpose:

* ``CONVEYOR_PURE=1 pip install ...`` skips compilation;
* a machine without a C compiler gets the pure-Python package (each extension is ``optional``:
  a failed build is a warning, not an error);
* at import, ``CONVEYOR_PURE=1`` (or a compiled module older than its source) makes the engine
  load the pure-Python sources instead; ``engine.COMPILED`` and ``simulators.COMPILED`` say
  which one runs.
"""
from __future__ import annotations

import ast
import os
import warnings
from pathlib import Path

from setuptools import setup


def hot_modules(package: str) -> list[str]:
    """<package>/_accel.py's HOT tuple (the one list of its compiled modules), read without
    importing the package."""
    tree = ast.parse((Path(__file__).parent / package / "_accel.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "HOT":
            return [f"{package}/{name}.py" for name in ast.literal_eval(node.value)]
    raise RuntimeError(f"{package}/_accel.py: no HOT tuple")


def ext_modules() -> list:
    if os.environ.get("CONVEYOR_PURE", "") not in ("", "0"):
        return []
    try:
        from mypyc.build import mypycify

        exts = mypycify(hot_modules("engine") + hot_modules("simulators"), opt_level="3")
    except (ImportError, Exception, SystemExit) as exc:  # mypyc missing or refusing: pure
        warnings.warn(f"conveyor: not compiling the hot path ({type(exc).__name__}: {exc}); "
                      f"installing pure Python", stacklevel=1)
        return []
    for ext in exts:
        ext.optional = True  # no C compiler: pure Python
    return exts


setup(ext_modules=ext_modules())
