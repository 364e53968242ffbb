"""``mypyc_attr`` when mypy_extensions is installed (it is wherever mypyc compiles the hot
path), else a no-op decorator: the engine needs only the standard library at run time."""
from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

try:
    from mypy_extensions import mypyc_attr
except ImportError:  # a pure install without mypy: nothing compiled, nothing to mark
    def mypyc_attr(*attrs: str, **kwattrs: object) -> Callable[[T], T]:
        def mark(cls: T) -> T:
            return cls
        return mark

__all__ = ["mypyc_attr"]
