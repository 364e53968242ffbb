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
    "AdaptiveSpec",
    "BudgetSpec",
    "HedgeSpec",
    "ProviderSpec",
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
    "scenario_variants",
    "variant_scenario",
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
class AdaptiveSpec:
    """``concurrency = { adaptive = { initial, min, max } }``: the engine's ``Adaptive``."""

    initial: int
    min: int
    max: int


@dataclass(frozen=True)
class ProviderSpec:
    """``provider = { capacity, per_minute, tokens }``: the stage is a ``simulators.Provider``
    (a rate-limited service such as an LLM account) with the stage's latency."""

    per_minute: Mapping[str, float]
    capacity: int | None = None
    tokens: Mapping[str, Any] | None = None  #: a distribution spec, in tokens per item
    #: what live runs call: "simulated" (the Provider, sleeping) or "openai" (LLMAnalyze and
    #: the openai client against the fake OpenAI server with the same limits); virtual runs
    #: are the Provider either way
    client: str = "simulated"


@dataclass(frozen=True)
class BudgetSpec:
    """A ``[budgets.NAME]`` table: a client-side ``engine.Budget`` with these limits, and, when
    ``stages`` is not empty, the provider account those stages call (DESIGN.md section 6.1:
    ``metadata.budgets``, the same for every variant)."""

    name: str
    per_minute: Mapping[str, float]
    burst: Mapping[str, float] | None = None
    #: the stages whose provider is this account: the stages that name it in the scenario as
    #: written (before any variant), or the table's own ``stages``
    stages: tuple[str, ...] = ()

    def account(self) -> dict[str, Any]:
        """The ``metadata.budgets`` entry: the account's limits; its burst is the provider's
        (one minute's worth), not the client budget's."""
        return {"name": self.name, "stages": list(self.stages),
                "per_minute": dict(self.per_minute), "burst": dict(self.per_minute)}


@dataclass(frozen=True)
class HedgeSpec:
    """``hedge = { after = 2.5 | "p95", max_extra = 0.05 }``: the engine's ``Hedge`` (DESIGN.md
    section 10); ``after`` in scenario seconds, or a running percentile of the stage's calls."""

    after: float | str
    max_extra: float = 0.05


@dataclass(frozen=True)
class StageSpec:
    name: str
    concurrency: int  #: the fixed limit, or an adaptive stage's max
    latency: Mapping[str, Any]
    error_rate: float = 0.0
    timeout: float | None = None
    rate_limit: RateLimitSpec | None = None
    outages: tuple[tuple[float, float], ...] = ()
    retry: RetrySpec | None = None
    adaptive: AdaptiveSpec | None = None
    provider: ProviderSpec | None = None
    budget: str | None = None  #: the name of a [budgets.NAME] table
    #: the OpenAI cookbook's rule: every rate-limit error of the stage pauses its budget for at
    #: least this long (its retry_after becomes max(pause_s, its own))
    pause_s: float | None = None
    #: safe to call twice for one item (reads, upserts): only then may it be hedged
    idempotent: bool = False
    hedge: HedgeSpec | None = None
    #: how much of an item's slowness a second call of it (hedge or retry) repeats: 0 = a
    #: fresh draw (a slow server), 1 = the same latency (a contact slow every time)
    correlation: float = 0.0


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
    budgets: tuple[BudgetSpec, ...] = ()
    variants: tuple[str, ...] = ()  #: the names of its [variants], in file order
    variant: str | None = None  #: the variant this scenario is (metadata.variant), if any

    def budget(self, name: str) -> BudgetSpec:
        for b in self.budgets:
            if b.name == name:
                return b
        raise KeyError(name)

    def accounts(self) -> list[dict[str, Any]]:
        """``metadata.budgets``: the provider accounts (budgets some stage is on), the same for
        every variant of the scenario."""
        return [b.account() for b in self.budgets if b.stages]

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


def _concurrency(value: Any, where: str) -> tuple[int, AdaptiveSpec | None]:
    """``N`` or ``{ adaptive = { initial, min = 1, max } }``: (the fixed limit or the max, the
    adaptive spec or None)."""
    if not isinstance(value, dict):
        return _int(value, where, minimum=1), None
    _keys(value, where, ("adaptive",))
    w = f"{where}.adaptive"
    tbl = _table(value["adaptive"], w)
    _keys(tbl, w, ("initial", "max"), ("min",))
    lo = _int(tbl.get("min", 1), f"{w}.min", minimum=1)
    hi = _int(tbl["max"], f"{w}.max", minimum=lo)
    init = _int(tbl["initial"], f"{w}.initial", minimum=lo)
    if init > hi:
        raise _Invalid(f"{w}.initial", f"expected an integer in [min, max] = [{lo}, {hi}], "
                                       f"got {init}")
    return hi, AdaptiveSpec(init, lo, hi)


_DIMENSIONS = ("requests", "tokens")  #: what simulators.Provider counts


def _limits(value: Any, where: str, allowed: tuple[str, ...] | None = None
            ) -> dict[str, float]:
    tbl = _table(value, where)
    if not tbl:
        raise _Invalid(where, "expected at least one limit, e.g. { requests = 5000, tokens = "
                              "2000000 }")
    if allowed is not None:
        _keys(tbl, where, (), allowed)
    out = {}
    for k, v in tbl.items():
        if not _NAME_RE.match(k):
            raise _Invalid(_join(where, k), "expected a dimension name of letters and digits")
        out[k] = _num(v, _join(where, k), gt=0)
    return out


def _provider(value: Any, where: str, base: Path) -> ProviderSpec:
    tbl = _table(value, where)
    _keys(tbl, where, ("per_minute",), ("capacity", "tokens", "client"))
    per_minute = _limits(tbl["per_minute"], f"{where}.per_minute", _DIMENSIONS)
    capacity = _int(tbl["capacity"], f"{where}.capacity", minimum=1) if "capacity" in tbl \
        else None
    tokens = _latency(tbl["tokens"], f"{where}.tokens", base) if "tokens" in tbl else None
    client = tbl.get("client", "simulated")
    if client not in _CLIENTS:
        raise _Invalid(f"{where}.client", f"expected one of: {', '.join(_CLIENTS)}, got "
                                          f"{client!r}")
    return ProviderSpec(per_minute, capacity, tokens, client)


#: provider.client: what a live run calls
_CLIENTS = ("simulated", "openai")


_PCT_RE = re.compile(r"^p(\d+(?:\.\d+)?)$")


def _hedge(value: Any, where: str) -> HedgeSpec:
    tbl = _table(value, where)
    _keys(tbl, where, ("after",), ("max_extra",))
    after: float | str
    a = tbl["after"]
    expected = "seconds > 0 or a running percentile such as \"p95\" (p1 to p99.9)"
    if isinstance(a, str):
        m = _PCT_RE.match(a)
        if m is None or not 0 < float(m.group(1)) < 100:
            raise _Invalid(f"{where}.after", f"expected {expected}, got {a!r}")
        after = a
    else:
        after = _num(a, f"{where}.after", gt=0, what=expected)
    max_extra = _num(tbl.get("max_extra", 0.05), f"{where}.max_extra", gt=0,
                     what="a share of the stage's calls in (0, 1], e.g. 0.05")
    if max_extra > 1:
        raise _Invalid(f"{where}.max_extra", f"expected a share of the stage's calls in (0, 1], "
                                             f"e.g. 0.05, got {tbl['max_extra']}")
    return HedgeSpec(after, max_extra)


#: keys a stage with a provider may not have: the provider is the service and its faults
_NOT_WITH_PROVIDER = ("errors", "timeout", "rate_limit", "outages")


def _stage(value: Any, where: str, base: Path) -> StageSpec:
    tbl = _table(value, where)
    _keys(tbl, where, ("name", "concurrency", "latency"),
          ("errors", "timeout", "rate_limit", "outages", "retry", "provider", "budget",
           "pause_s", "idempotent", "hedge", "correlation"))
    name = _str(tbl["name"], f"{where}.name")
    if not _NAME_RE.match(name):
        raise _Invalid(f"{where}.name", f"expected letters, digits, '.', '_' or '-', got {name!r}")
    concurrency, adaptive = _concurrency(tbl["concurrency"], f"{where}.concurrency")
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
    provider = None
    if "provider" in tbl:
        provider = _provider(tbl["provider"], f"{where}.provider", base)
        for k in _NOT_WITH_PROVIDER:
            if k in tbl:
                raise _Invalid(f"{where}.{k}", "not with provider (the provider is the service: "
                                               "its limits and 429s are its faults)")
    budget = None
    if "budget" in tbl:
        if not isinstance(tbl["budget"], str):
            raise _Invalid(f"{where}.budget", "expected the name of a [budgets.NAME] table, got "
                                              f"{_type_name(tbl['budget'])}")
        budget = tbl["budget"]
    pause_s = None
    if "pause_s" in tbl:
        pause_s = _num(tbl["pause_s"], f"{where}.pause_s", gt=0)
        if budget is None:
            raise _Invalid(f"{where}.pause_s", "needs budget = \"NAME\" (a rate-limit error "
                                               "pauses the stage's budget)")
    idempotent = _bool(tbl.get("idempotent", False), f"{where}.idempotent")
    hedge = _hedge(tbl["hedge"], f"{where}.hedge") if "hedge" in tbl else None
    if hedge is not None and not idempotent:
        raise _Invalid(f"{where}.hedge", f"stage {name!r} is not idempotent: a hedge calls it "
                                         "twice for one item; declare idempotent = true if "
                                         "that is safe")
    correlation = _num(tbl.get("correlation", 0.0), f"{where}.correlation", ge=0,
                       what="a number from 0 (a fresh draw) to 1 (the same latency)")
    if correlation > 1:
        raise _Invalid(f"{where}.correlation", "expected a number from 0 (a fresh draw) to 1 "
                                               f"(the same latency), got {tbl['correlation']}")
    return StageSpec(name, concurrency, latency, error_rate, timeout, rate_limit, outages, retry,
                     adaptive, provider, budget, pause_s, idempotent, hedge, correlation)


def _budgets(value: Any, stages: tuple[StageSpec, ...]) -> tuple[BudgetSpec, ...]:
    tbl = _table(value, "budgets")
    names = [st.name for st in stages]
    out = []
    for name, b in tbl.items():
        where = f"budgets.{name}"
        if not _NAME_RE.match(name):
            raise _Invalid(where, "expected a name of letters, digits, '.', '_' or '-'")
        b = _table(b, where)
        _keys(b, where, ("per_minute",), ("burst", "stages"))
        per_minute = _limits(b["per_minute"], f"{where}.per_minute")
        burst = None
        if "burst" in b:
            burst = _limits(b["burst"], f"{where}.burst", tuple(per_minute))
        if "stages" in b:
            on = b["stages"]
            if not isinstance(on, list) or not all(isinstance(x, str) for x in on):
                raise _Invalid(f"{where}.stages", "expected an array of stage names")
            for x in on:
                if x not in names:
                    raise _Invalid(f"{where}.stages", f"no stage {x!r} (stages: "
                                                      f"{', '.join(names)})")
            account = tuple(on)
        else:
            account = tuple(st.name for st in stages if st.budget == name)
        out.append(BudgetSpec(name, per_minute, burst, account))
    return tuple(out)


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
          ("seed", "time_scale", "description", "budgets", "variants", "variant"))
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
    budgets = _budgets(doc["budgets"], stages) if "budgets" in doc else ()
    have = [b.name for b in budgets]
    for k, st in enumerate(stages):
        if st.budget is not None and st.budget not in have:
            raise _Invalid(f"stages[{k}].budget",
                           f"no [budgets.{st.budget}] table (budgets: {', '.join(have)})" if have
                           else f"no [budgets.{st.budget}] table (the scenario has no budgets)")
    too_big = fits_message(items, stages)  # before anything runs, not when the kernel kills it
    if too_big:
        raise _Invalid("items", too_big)
    strategies_tbl = _table(doc["strategies"], "strategies")
    if not strategies_tbl:
        raise _Invalid("strategies", f"expected at least one of: {', '.join(STRATEGY_NAMES)}")
    strategies = tuple(_strategy(k, v, f"strategies.{k}") for k, v in strategies_tbl.items())
    variant = None
    if "variant" in doc:
        if "variants" in doc:
            raise _Invalid("variant", "not with [variants] (it names the variant a document "
                                      "was made from)")
        variant = _str(doc["variant"], "variant")
        if not _NAME_RE.match(variant):
            raise _Invalid("variant", f"expected letters, digits, '.', '_' or '-', got "
                                      f"{variant!r}")
    raw = copy.deepcopy(doc)
    raw_out = []
    for s, st in zip(raw_stages, stages, strict=True):
        d = dict(s, latency=st.latency)
        if st.provider is not None and st.provider.tokens is not None:
            d["provider"] = dict(s["provider"], tokens=st.provider.tokens)
        raw_out.append(d)
    raw["stages"] = raw_out
    variants: tuple[str, ...] = ()
    if "variants" in doc:
        vt = _table(doc["variants"], "variants")
        if not vt:
            raise _Invalid("variants", "expected one or more variants, e.g. fixed-50 = { "
                                       "\"stages.analyze.budget\" = false }")
        for vname in vt:
            if not _NAME_RE.match(vname):
                raise _Invalid(f"variants.{vname}", "expected a name of letters, digits, '.', "
                                                    "'_' or '-' (it names a results folder)")
            _parse_variant(raw, vname, budgets, source, base)  # validated before anything runs
        variants = tuple(vt)
    return Scenario(name, items, seed, time_scale, stages, strategies, description, source, raw,
                    budgets, variants, variant)


# --------------------------------------------------------------------------- variants

#: what a variant may change in a stage: how it runs, never the workload (latency, provider,
#: faults), so that every variant runs on the same latencies and is measured on one bound.
#: ``correlation`` is the one exception: it changes only the second calls of an item (hedges,
#: retries), every first call keeps its latency, so hedged variants compare on the same draws
VARIANT_STAGE_KEYS = ("concurrency", "budget", "pause_s", "retry", "idempotent", "hedge",
                      "correlation")
#: stage keys an override of ``false`` removes
_REMOVABLE = ("budget", "pause_s", "retry", "hedge")


def _override(doc: dict[str, Any], path: str, value: Any, where: str) -> str:
    """Set ``path`` to ``value`` in ``doc``; returns the field that path is in the document
    (``stages[1].concurrency``), to name the override in later errors."""
    keys = path.split(".")
    if any(not k for k in keys):
        raise _Invalid(where, "expected a dotted path such as stages.analyze.concurrency")
    if keys[0] == "stages":
        if len(keys) < 3:
            raise _Invalid(where, "expected stages.NAME.KEY")
        stages = doc["stages"]
        k = next((k for k, st in enumerate(stages) if st.get("name") == keys[1]), None)
        if k is None:
            raise _Invalid(where, f"no stage {keys[1]!r} (stages: "
                                  f"{', '.join(str(st.get('name')) for st in stages)})")
        if keys[2] not in VARIANT_STAGE_KEYS:
            near = difflib.get_close_matches(keys[2], VARIANT_STAGE_KEYS, n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise _Invalid(where, f"unknown key path ({hint}a variant changes how a stage runs, "
                                  f"not the workload: expected stages.{keys[1]}.KEY with KEY one "
                                  f"of: {', '.join(VARIANT_STAGE_KEYS)})")
        target: dict[str, Any] = stages[k]
        rest = keys[2:]
        field_ = f"stages[{k}]." + ".".join(rest)
        removable = len(rest) == 1 and rest[0] in _REMOVABLE
    elif keys[0] == "strategies" and len(keys) >= 2:
        target = doc["strategies"]
        rest = keys[1:]
        field_ = path
        removable = len(rest) == 1
    else:
        raise _Invalid(where, "unknown key path (expected stages.NAME.KEY or "
                              "strategies.NAME[.KEY])")
    for key in rest[:-1]:
        nxt = target.setdefault(key, {})
        if not isinstance(nxt, dict):
            raise _Invalid(where, f"{key!r} is not a table")
        target = nxt
    if value is False and removable:
        target.pop(rest[-1], None)
    else:
        target[rest[-1]] = copy.deepcopy(value)
    return field_


def variant_doc(raw: Mapping[str, Any], name: str, budgets: tuple[BudgetSpec, ...]
                ) -> dict[str, Any]:
    """The scenario document of variant ``name``: the overrides applied, ``variants`` replaced
    by ``variant = name``, and each budget's account stages written into it (those of the
    scenario as written), so the document stands alone (live workers, sweeps, repeats)."""
    doc, _ = _variant_doc(raw, name, budgets)
    return doc


def _variant_doc(raw: Mapping[str, Any], name: str, budgets: tuple[BudgetSpec, ...]
                 ) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    overrides = _table(raw["variants"][name], f"variants.{name}")
    if not overrides:
        raise _Invalid(f"variants.{name}", "expected one or more overrides, e.g. "
                                           "{ \"stages.analyze.concurrency\" = 20 }")
    doc = copy.deepcopy({k: v for k, v in raw.items() if k != "variants"})
    fields = []
    for path, value in overrides.items():
        where = f'variants.{name}."{path}"'
        fields.append((_override(doc, path, value, where), where))
    doc["variant"] = name
    if budgets:
        doc["budgets"] = {b.name: dict(doc["budgets"][b.name], stages=list(b.stages))
                          for b in budgets}
    return doc, fields


def _parse_variant(raw: Mapping[str, Any], name: str, budgets: tuple[BudgetSpec, ...],
                   source: str, base: Path) -> Scenario:
    doc, fields = _variant_doc(raw, name, budgets)
    try:
        return _scenario(doc, source, base)
    except _Invalid as exc:  # name the override that made the document invalid
        for field_, where in fields:
            if exc.field == field_ or exc.field.startswith(field_ + "."):
                raise _Invalid(where + exc.field[len(field_):], exc.message) from None
        raise _Invalid(f"variants.{name}", f"{exc.field}: {exc.message}") from None


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


def variant_scenario(sc: Scenario, name: str) -> Scenario:
    """Variant ``name`` of ``sc`` (a scenario with [variants]) as a scenario of its own."""
    if name not in sc.variants:
        raise ScenarioError(sc.source, "variants", f"has no {name!r} (it defines: "
                                                   f"{', '.join(sc.variants) or 'none'})")
    try:
        return _parse_variant(sc.raw, name, sc.budgets, sc.source, Path.cwd())
    except _Invalid as exc:
        raise ScenarioError(sc.source, exc.field, exc.message) from None


def scenario_variants(sc: Scenario, names: list[str] | None = None) -> list[Scenario]:
    """The scenarios to run: each named variant (default: all of them), or ``sc`` itself when
    it has no [variants]."""
    if not sc.variants:
        if names:
            raise ScenarioError(sc.source, "variants", "the scenario has no [variants] table")
        return [sc]
    return [variant_scenario(sc, n) for n in (names or sc.variants)]


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
