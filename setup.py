"""Build hook: compile the engine's hot path with mypyc, on request.

``CONVEYOR_COMPILE=1 pip install .`` (or building a wheel with it set) compiles the modules
listed in ``HOT`` (engine/_accel.py) from the very sources it installs beside them, the way
black and mypy ship themselves. Nothing else compiles:

* an editable install (``pip install -e .``, what ./test.sh and ./run.sh do) never compiles,
  so what runs is always the source as written and a stale build cannot exist;
* without a C compiler (or mypyc refusing), the build falls back to pure Python with a warning
  (each extension is ``optional``).

``engine.COMPILED`` says which code runs; ``CONVEYOR_PURE=1`` at import runs the sources of a
compiled install.
"""
from __future__ import annotations

import ast
import os
import sys
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
    if os.environ.get("CONVEYOR_COMPILE", "") in ("", "0"):
        return []
    if any("editable" in arg for arg in sys.argv):
        warnings.warn("conveyor: an editable install never compiles (edits must run as "
                      "written); installing pure Python", stacklevel=1)
        return []
    try:
        from mypyc.build import mypycify

        exts = mypycify(hot_modules("engine"), opt_level="3")
    except (ImportError, Exception, SystemExit) as exc:  # mypyc missing or refusing: pure
        warnings.warn(f"conveyor: not compiling the hot path ({type(exc).__name__}: {exc}); "
                      f"installing pure Python", stacklevel=1)
        return []
    for ext in exts:
        ext.optional = True  # no C compiler: pure Python
    return exts


setup(ext_modules=ext_modules())
