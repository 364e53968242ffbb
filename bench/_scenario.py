"""Scenario files (DESIGN.md section 5): TOML in, frozen dataclasses out, validated at the door.

Every problem is reported as one :class:`ScenarioError` line that names the file, the field
(``stages[1].latency.p99``; stages are numbered from 0) and what was expected, before anything
runs. Latency specs are validated by ``simulators.parse_latency`` (the simulators own their
distributions); its ``ValueError`` is re-worded here with the file name.
"""
from __future__ import annotations

import copy
import difflib
import math
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from bench._memory import fits_message

__all__ = [
    "STRATEGY_NAMES",
    "RateLimitSpec",
    "RetrySpec",
    "Scenario",
    "ScenarioError",
    "StageSpec",
    "StrategySpec",
    "builtin_names",
    "builtin_path",
    "load_scenario",
    "parse_scenario",
    "resolve_scenario",
]

STRATEGY_NAMES = ("continuous", "batched", "parallel-batches")
SCENARIO_DIR = Path(__file__).with_name("scenarios")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class ScenarioError(ValueError):
    """A scenario file that cannot be run; ``str()`` is one line: ``file: field: expected``."""

    def __init__(self, source: str, field: str, message: str) -> None:
        self.source, self.field, self.message = source, field, message
        where = f"{source}: {field}" if field else source
        super().__init__(f"{where}: {message}".replace("\n", " "))


class _Invalid(Exception):
    """Raised while validating; carries the field and the message, gets the file name later."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(field, message)
        self.field, self.message = field, message


# --------------------------------------------------------------------------- dataclasses


@dataclass(frozen=True)
class RetrySpec:
    attempts: int
    backoff: float = 0.5
    max_backoff: float = 30.0
    jitter: bool = True


@dataclass(frozen=True)
class RateLimitSpec:
    """A service-side limit: beyond ``per_s`` calls per second (a token bucket ``burst`` deep;
    None: one second's worth) the service answers 429 with ``retry_after`` = when its next token
    is due. With ``pace`` the pipeline also paces its own calls at ``per_s`` with the engine's
    token bucket (burst 1: evenly spaced)."""

    per_s: float
    burst: int | None = None
    pace: bool = True


@dataclass(frozen=True)
class StageSpec:
    name: str
    concurrency: int
    latency: Mapping[str, Any]
    error_rate: float = 0.0
    timeout: float | None = None
    rate_limit: RateLimitSpec | None = None
    outages: tuple[tuple[float, float], ...] = ()
    retry: RetrySpec | None = None


@dataclass(frozen=True)
class StrategySpec:
    name: str  #: one of STRATEGY_NAMES
    #: keyword arguments of the engine's strategy class, as DESIGN.md section 6 names them;
    #: continuous without max_in_flight keeps the engine's default bound
    params: Mapping[str, Any]


@dataclass(frozen=True)
class Scenario:
    name: str
    items: int
    seed: int
    time_scale: float
    stages: tuple[StageSpec, ...]
    strategies: tuple[StrategySpec, ...]
    description: str = ""
    source: str = "<memory>"  #: the file it came from
    #: the validated document, with file paths made absolute: what sweeps edit and re-validate,
    #: and what a live run's worker process gets
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def strategy(self, name: str) -> StrategySpec:
        for s in self.strategies:
            if s.name == name:
                return s
        raise KeyError(name)


# --------------------------------------------------------------------------- field checks


def _type_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "a table"}.get(type(value), type(value).__name__)


def _table(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Invalid(where, f"expected a table, got {_type_name(value)}")
    return value


def _keys(tbl: Mapping[str, Any], where: str, required: tuple[str, ...],
          optional: tuple[str, ...] = ()) -> None:
    allowed = required + optional
    for key in tbl:
        if key not in allowed:
            near = difflib.get_close_matches(key, allowed, n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise _Invalid(_join(where, key),
                           f"unknown key ({hint}expected one of: {', '.join(allowed)})")
    for key in required:
        if key not in tbl:
            raise _Invalid(_join(where, key), "missing (required)")


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _int(value: Any, where: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid(where, f"expected an integer >= {minimum}, got {_type_name(value)}")
    if value < minimum:
        raise _Invalid(where, f"expected an integer >= {minimum}, got {value}")
    return value


def _num(value: Any, where: str, *, gt: float | None = None, ge: float | None = None,
         lt: float | None = None, what: str = "") -> float:
    bounds = [f"> {gt:g}" if gt is not None else "", f">= {ge:g}" if ge is not None else "",
              f"< {lt:g}" if lt is not None else ""]
    expected = what or ("a number " + " and ".join(b for b in bounds if b)).strip()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Invalid(where, f"expected {expected}, got {_type_name(value)}")
    x = float(value)
    if not math.isfinite(x) or (gt is not None and not x > gt) or (ge is not None and not x >= ge) \
            or (lt is not None and not x < lt):
        raise _Invalid(where, f"expected {expected}, got {value}")
    return x


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise _Invalid(where, f"expected a string, got {_type_name(value)}")
    return value


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(where, f"expected true or false, got {_type_name(value)}")
    return value


# --------------------------------------------------------------------------- latency specs

_DISTS = ("constant", "uniform", "exponential", "normal", "lognormal", "pareto", "empirical",
          "mixture")


def _fallback_parse_latency(spec: Any, where: str = "latency") -> Any:
    """Used only while the simulators package is not importable: checks the shape only."""
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: expected a table, got {_type_name(spec)}")
    dist = spec.get("dist")
    if dist not in _DISTS:
        raise ValueError(f"{where}.dist: expected one of {', '.join(_DISTS)}, got {dist!r}")
    return spec


def _latency_parser() -> Callable[..., Any]:
    try:
        from simulators import parse_latency
    except ImportError:
        return _fallback_parse_latency
    return cast(Callable[..., Any], parse_latency)


def _absolute_files(spec: Any, base: Path) -> Any:
    """An empirical ``file`` is relative to the scenario file: make it absolute, recursively."""
    if isinstance(spec, dict):
        out = {k: _absolute_files(v, base) for k, v in spec.items()}
        f = out.get("file")
        if isinstance(f, str) and f and not Path(f).is_absolute():
            out["file"] = str((base / f).resolve())
        return out
    if isinstance(spec, list):
        return [_absolute_files(v, base) for v in spec]
    return spec


def _latency(value: Any, where: str, base: Path) -> dict[str, Any]:
    spec = _absolute_files(_table(value, where), base)
    try:
        _latency_parser()(spec, where=where)
    except (ValueError, TypeError, KeyError, OSError) as exc:
        msg = str(exc).replace("\n", " ").strip() or type(exc).__name__
        if msg.startswith(where):  # the simulators already name the field: keep their words
            fld, _, rest = msg.partition(": ")
            raise _Invalid(fld, rest or "invalid latency spec") from None
        raise _Invalid(where, msg) from None
    return spec


# --------------------------------------------------------------------------- sections


def _retry(value: Any, where: str) -> RetrySpec:
    tbl = _table(value, where)
    _keys(tbl, where, ("attempts",), ("backoff", "max_backoff", "jitter"))
    attempts = _int(tbl["attempts"], f"{where}.attempts", minimum=1)
    backoff = _num(tbl.get("backoff", 0.5), f"{where}.backoff", ge=0)
    max_backoff = _num(tbl.get("max_backoff", max(30.0, backoff)), f"{where}.max_backoff",
                       ge=backoff, what=f"a number >= backoff ({backoff:g})")
    jitter = _bool(tbl.get("jitter", True), f"{where}.jitter")
    return RetrySpec(attempts, backoff, max_backoff, jitter)


def _rate_limit(value: Any, where: str) -> RateLimitSpec:
    tbl = _table(value, where)
    _keys(tbl, where, (), ("per_s", "per_min", "burst", "pace"))
    if ("per_s" in tbl) == ("per_min" in tbl):
        raise _Invalid(f"{where}.per_s", "expected exactly one of per_s or per_min")
    if "per_s" in tbl:
        per_s = _num(tbl["per_s"], f"{where}.per_s", gt=0)
    else:
        per_s = _num(tbl["per_min"], f"{where}.per_min", gt=0) / 60.0
    burst = _int(tbl["burst"], f"{where}.burst", minimum=1) if "burst" in tbl else None
    pace = _bool(tbl.get("pace", True), f"{where}.pace")
    return RateLimitSpec(per_s, burst, pace)


def _outages(value: Any, where: str) -> tuple[tuple[float, float], ...]:
    if not isinstance(value, list):
        raise _Invalid(where, f"expected an array of [start, end] pairs, got {_type_name(value)}")
    out = []
    for k, pair in enumerate(value):
        w = f"{where}[{k}]"
        if not isinstance(pair, list) or len(pair) != 2:
            raise _Invalid(w, "expected a [start, end] pair of seconds")
        t0 = _num(pair[0], f"{w}[0]", ge=0)
        t1 = _num(pair[1], f"{w}[1]", gt=t0, what=f"an end > start ({t0:g})")
        out.append((t0, t1))
    return tuple(out)


def _stage(value: Any, where: str, base: Path) -> StageSpec:
    tbl = _table(value, where)
    _keys(tbl, where, ("name", "concurrency", "latency"),
          ("errors", "timeout", "rate_limit", "outages", "retry"))
    name = _str(tbl["name"], f"{where}.name")
    if not _NAME_RE.match(name):
        raise _Invalid(f"{where}.name", f"expected letters, digits, '.', '_' or '-', got {name!r}")
    concurrency = _int(tbl["concurrency"], f"{where}.concurrency", minimum=1)
    latency = _latency(tbl["latency"], f"{where}.latency", base)
    error_rate = 0.0
    if "errors" in tbl:
        errs = _table(tbl["errors"], f"{where}.errors")
        _keys(errs, f"{where}.errors", ("rate",))
        error_rate = _num(errs["rate"], f"{where}.errors.rate", ge=0, lt=1)
    timeout = _num(tbl["timeout"], f"{where}.timeout", gt=0) if "timeout" in tbl else None
    rate_limit = _rate_limit(tbl["rate_limit"], f"{where}.rate_limit") if "rate_limit" in tbl \
        else None
    outages = _outages(tbl["outages"], f"{where}.outages") if "outages" in tbl else ()
    retry = _retry(tbl["retry"], f"{where}.retry") if "retry" in tbl else None
    return StageSpec(name, concurrency, latency, error_rate, timeout, rate_limit, outages, retry)


def _strategy(name: str, value: Any, where: str) -> StrategySpec:
    if name not in STRATEGY_NAMES:
        near = difflib.get_close_matches(name, STRATEGY_NAMES, n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise _Invalid(where, f"unknown strategy ({hint}expected one of: "
                              f"{', '.join(STRATEGY_NAMES)})")
    tbl = _table(value, where)
    params: dict[str, Any]
    if name == "continuous":
        _keys(tbl, where, (), ("max_in_flight",))
        mif = tbl.get("max_in_flight", "auto")
        if mif not in ("auto", "unbounded"):
            if isinstance(mif, str):
                raise _Invalid(f"{where}.max_in_flight",
                               f"expected an integer >= 1, \"auto\" or \"unbounded\", got {mif!r}")
            mif = _int(mif, f"{where}.max_in_flight", minimum=1)
        # "auto" (no param) keeps the engine's default bound; "unbounded" is params' null (the
        # seed's Promise.all of every contact)
        params = {} if mif == "auto" else {"max_in_flight": None if mif == "unbounded" else mif}
    elif name == "batched":
        _keys(tbl, where, (), ("size",))
        params = {"size": _int(tbl.get("size", 50), f"{where}.size", minimum=1)}
    else:
        _keys(tbl, where, (), ("lanes", "size", "lockstep"))
        params = {"size": _int(tbl.get("size", 50), f"{where}.size", minimum=1),
                  "lanes": _int(tbl.get("lanes", 3), f"{where}.lanes", minimum=1),
                  "lockstep": _bool(tbl.get("lockstep", False), f"{where}.lockstep")}
    return StrategySpec(name, params)


def _scenario(doc: Any, source: str, base: Path) -> Scenario:
    doc = _table(doc, "")
    _keys(doc, "", ("name", "items", "stages", "strategies"),
          ("seed", "time_scale", "description"))
    name = _str(doc["name"], "name")
    if not _NAME_RE.match(name):
        raise _Invalid("name", f"expected letters, digits, '.', '_' or '-' (it names the results "
                               f"folder), got {name!r}")
    items = _int(doc["items"], "items", minimum=1)
    seed = _int(doc.get("seed", 0), "seed", minimum=0)
    time_scale = _num(doc.get("time_scale", 0.02), "time_scale", gt=0)
    description = _str(doc.get("description", ""), "description")
    raw_stages = doc["stages"]
    if not isinstance(raw_stages, list) or not raw_stages:
        raise _Invalid("stages", "expected one or more [[stages]] tables")
    stages = tuple(_stage(s, f"stages[{k}]", base) for k, s in enumerate(raw_stages))
    seen: set[str] = set()
    for k, st in enumerate(stages):
        if st.name in seen:
            raise _Invalid(f"stages[{k}].name",
                           f"expected a unique stage name, {st.name!r} repeats")
        seen.add(st.name)
    too_big = fits_message(items, stages)  # before anything runs, not when the kernel kills it
    if too_big:
        raise _Invalid("items", too_big)
    strategies_tbl = _table(doc["strategies"], "strategies")
    if not strategies_tbl:
        raise _Invalid("strategies", f"expected at least one of: {', '.join(STRATEGY_NAMES)}")
    strategies = tuple(_strategy(k, v, f"strategies.{k}") for k, v in strategies_tbl.items())
    raw = copy.deepcopy(doc)
    raw["stages"] = [dict(s, latency=st.latency) for s, st in zip(raw_stages, stages, strict=True)]
    return Scenario(name, items, seed, time_scale, stages, strategies, description, source, raw)


# --------------------------------------------------------------------------- entry points


def parse_scenario(doc: Mapping[str, Any], *, source: str = "<memory>",
                   base: Path | None = None) -> Scenario:
    """Validate a scenario document (the dict a TOML file parses to)."""
    try:
        return _scenario(dict(doc), source, base or Path.cwd())
    except _Invalid as exc:
        raise ScenarioError(source, exc.field, exc.message) from None
    except RecursionError:
        raise ScenarioError(source, "", "nested too deeply") from None


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError(str(p), "", f"cannot read it ({exc.__class__.__name__}: "
                                        f"{getattr(exc, 'strerror', None) or exc})") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(str(p), "", f"not valid TOML ({exc})") from None
    return parse_scenario(doc, source=str(p), base=p.resolve().parent)


def builtin_names() -> list[str]:
    return sorted(f.stem for f in SCENARIO_DIR.glob("*.toml"))


def builtin_path(name: str) -> Path:
    return SCENARIO_DIR / f"{name}.toml"


def resolve_scenario(name_or_path: str) -> Scenario:
    """A built-in scenario's name, or a path to any TOML file."""
    if name_or_path in builtin_names():
        return load_scenario(builtin_path(name_or_path))
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.exists():
        return load_scenario(p)
    raise ScenarioError(name_or_path, "", "no such file, and not a built-in scenario "
                                          f"(built-in: {', '.join(builtin_names())})")
