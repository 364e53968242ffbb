"""One validator for the engine's configuration (validation at the door).

One rule everywhere: a value of the wrong type is a ``TypeError``, a value of the right type
that is out of range a ``ValueError``; both name the field (``RetryPolicy.backoff: expected a
number >= 0, got -1``).
"""
from __future__ import annotations

import math
from typing import Any

__all__ = ["check_bool", "check_int", "check_number", "check_type"]


def check_int(field: str, value: object, *, minimum: int = 1) -> int:
    """An int (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{field}: expected an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{field}: expected an int >= {minimum}, got {value!r}")
    return value


def check_number(field: str, value: object, *, minimum: float = 0.0, strict: bool = False,
                 finite: bool = True, maximum: float | None = None) -> float:
    """A real number (not a bool, not NaN) >= ``minimum`` (> when ``strict``), finite unless
    ``finite=False``, and <= ``maximum`` when given."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{field}: expected a number, got {value!r}")
    op = ">" if strict else ">="
    what = f"a {'finite ' if finite else ''}number {op} {minimum:g}"
    if maximum is not None:
        what += f" and <= {maximum:g}"
    v = float(value)
    if (math.isnan(v) or (finite and math.isinf(v)) or v < minimum or (strict and v == minimum)
            or (maximum is not None and v > maximum)):
        raise ValueError(f"{field}: expected {what}, got {value!r}")
    return v


def check_bool(field: str, value: object) -> bool:
    """A real bool: a truthy string such as ``'no'`` is a mistake, not ``True``."""
    if not isinstance(value, bool):
        raise TypeError(f"{field}: expected True or False, got {value!r}")
    return value


def check_type(field: str, value: object, types: type | tuple[type, ...], what: str,
               *, optional: bool = False) -> Any:
    """``value`` is an instance of ``types`` (or None when ``optional``); ``what`` says so."""
    if (value is None and optional) or isinstance(value, types):
        return value
    raise TypeError(f"{field}: expected {what}{' or None' if optional else ''}, got {value!r}")
