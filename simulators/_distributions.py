"""Latency distributions (DESIGN.md section 4), built from spec dicts and validated at the door.

A spec is a dict such as ``{"dist": "lognormal", "median": 1.0, "p99": 3.0}`` (seconds).
``parse_latency`` turns it into a ``Distribution``; every problem is a ``ValueError`` whose
message starts with the field's path (``latency.parts[1].p99: ...``) so a scenario loader can
prefix the file name and print one clear line.

Every distribution samples from a caller-supplied ``numpy.random.Generator`` (never a global
one) and can describe itself: mean, p50 and p99, analytic where a closed form exists, otherwise
from the distribution's CDF (mixtures) or a large seeded sample (empirical resampling).
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Any, ClassVar, final

import numpy as np
import numpy.typing as npt

__all__ = [
    "Constant",
    "Distribution",
    "Empirical",
    "Exponential",
    "LogNormal",
    "Mixture",
    "Normal",
    "Pareto",
    "Uniform",
    "as_distribution",
    "parse_latency",
]

FloatArray = npt.NDArray[np.float64]

_STD_NORMAL = NormalDist()
_Z99 = _STD_NORMAL.inv_cdf(0.99)
#: sample size used by describe() where no closed form exists
DESCRIBE_SAMPLES = 1_000_000


class Distribution(ABC):
    """A distribution of latencies in seconds (all values >= 0)."""

    #: the ``dist`` name used in specs
    kind: ClassVar[str]

    @abstractmethod
    def sample(self, rng: np.random.Generator, n: int) -> FloatArray:
        """``n`` independent draws, as a float64 array."""

    @abstractmethod
    def spec(self) -> dict[str, Any]:
        """The spec dict this distribution was (or could have been) parsed from."""

    def mean(self) -> float:
        return float(np.mean(self._big_sample()))

    def quantile(self, q: float) -> float:
        """The ``q``-quantile (0 < q < 1)."""
        return float(np.quantile(self._big_sample(), q))

    def cdf(self, x: float) -> float | None:
        """P(X <= x), or None where no closed form is implemented."""
        return None

    def describe(self) -> dict[str, float]:
        """``{"mean", "p50", "p99"}`` in seconds."""
        return {"mean": self.mean(), "p50": self.quantile(0.5), "p99": self.quantile(0.99)}

    def _big_sample(self) -> FloatArray:
        cached: FloatArray | None = getattr(self, "_sample_cache", None)
        if cached is None:
            cached = self.sample(np.random.default_rng(0x5EED), DESCRIBE_SAMPLES)
            object.__setattr__(self, "_sample_cache", cached)
        return cached

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.spec().items() if k != "dist")
        return f"{type(self).__name__}({fields})"


@final
@dataclass(frozen=True, eq=True, repr=False)
class Constant(Distribution):
    value: float
    kind: ClassVar[str] = "constant"

    def sample(self, rng: np.random.Generator, n: int) -> FloatArray:
        return np.full(n, self.value, dtype=np.float64)

    def spec(self) -> dict[str, Any]:
        return {"dist": self.kind, "value": self.value}

    def mean(self) -> float:
        return self.value

    def quantile(self, q: float) -> float:
        return self.value

    def cdf(self, x: float) -> float:
        return 1.0 if x >= self.value else 0.0


@final
@dataclass(frozen=True, eq=True, repr=False)
class Uniform(Distribution):
    low: float
    high: float
    kind: ClassVar[str] = "uniform"

    def sample(self, rng: np.random.Generator, n: int) -> FloatArray:
        return rng.uniform(self.low, self.high, n)

    def spec(self) -> dict[str, Any]:
        return {"dist": self.kind, "low": self.low, "high": self.high}

    def mean(self) -> float:
        return (self.low + self.high) / 2

    def quantile(self, q: float) -> float:
        return self.low + q * (self.high - self.low)

    def cdf(self, x: float) -> float:
        if x < self.low:
            return 0.0
        if x >= self.high:
            return 1.0
        return (x - self.low) / (self.high - self.low)


@final
@dataclass(frozen=True, eq=True, repr=False)
class Exponential(Distribution):
    mean_: float
    kind: ClassVar[str] = "exponential"

    def sample(self, rng: np.random.Generator, n: int) -> FloatArray:
        return rng.exponential(self.mean_, n)

    def spec(self) -> dict[str, Any]:
        return {"dist": self.kind, "mean": self.mean_}

    def mean(self) -> float:
        return self.mean_

    def quantile(self, q: float) -> float:
        return -self.mean_ * math.log1p(-q)

    def cdf(self, x: float) -> float:
        if x < 0:
            return 0.0
        if self.mean_ == 0:
            return 1.0
        return -math.expm1(-x / self.mean_)


@final
@dataclass(frozen=True, eq=True, repr=False)
class Normal(Distribution):
    """A normal distribution truncated at 0: draws below 0 are redrawn (not clipped), so the
    density is the normal's, renormalised over [0, inf). ``mean`` and ``sd`` are the parameters
    of the untruncated normal; ``describe()`` gives the truncated distribution's moments."""

    mu: float
    sd: float
    kind: ClassVar[str] = "normal"

    def sample(self, rng: np.random.Generator, n: int) -> FloatArray:
        if self.sd == 0:
            return np.full(n, self.mu, dtype=np.float64)
        out = rng.normal(self.mu, self.sd, n)
        bad = out < 0
        # mu >= 0 is enforced, so each redraw keeps at least half: this ends in a few rounds.
        while bad.any():
            out[bad] = rng.normal(self.mu, self.sd, int(bad.sum()))
            bad = out < 0
        return out

    def spec(self) -> dict[str, Any]:
        return {"dist": self.kind, "mean": self.mu, "sd": self.sd}

    def _alpha_mass(self) -> tuple[float, float]:
        alpha = -self.mu / self.sd
        return alpha, 1.0 - _STD_NORMAL.cdf(alpha)

    def mean(self) -> float:
        if self.sd == 0:
            return self.mu
        alpha, mass = self._alpha_mass()
        return self.mu + self.sd * _STD_NORMAL.pdf(alpha) / mass

    def quantile(self, q: float) -> float:
        if self.sd == 0:
            return self.mu
        alpha, mass = self._alpha_mass()
        return self.mu + self.sd * _STD_NORMAL.inv_cdf(_STD_NORMAL.cdf(alpha) + q * mass)

    def cdf(self, x: float) -> float:
        if self.sd == 0:
            return 1.0 if x >= self.mu else 0.0
        if x < 0:
            return 0.0
        alpha, mass = self._alpha_mass()
        return (_STD_NORMAL.cdf((x - self.mu) / self.sd) - _STD_NORMAL.cdf(alpha)) / mass


@final
@dataclass(frozen=True, eq=True, repr=False)
class LogNormal(Distribution):
    """Log-normal given by its median and 99th percentile (the numbers people quote)."""

    median: float
    p99: float
    kind: ClassVar[str] = "lognormal"

    @property
    def mu(self) -> float:
        return math.log(self.median)

    @property
    def sigma(self) -> float:
        return (math.log(self.p99) - math.log(self.median)) / _Z99

    def sample(self, rng: np.random.Generator, n: int) -> FloatArray:
        return rng.lognormal(self.mu, self.sigma, n)

    def spec(self) -> dict[str, Any]:
        return {"dist": self.kind, "median": self.median, "p99": self.p99}

    def mean(self) -> float:
        return math.exp(self.mu + self.sigma**2 / 2)

    def quantile(self, q: float) -> float:
        return math.exp(self.mu + self.sigma * _STD_NORMAL.inv_cdf(q))

    def cdf(self, x: float) -> float:
        if x <= 0:
            return 0.0
        return _STD_NORMAL.cdf((math.log(x) - self.mu) / self.sigma)


@final
@dataclass(frozen=True, eq=True, repr=False)
class Pareto(Distribution):
    """Classic (type I) Pareto: minimum ``scale``, tail index ``alpha`` (> 1 so the mean exists)."""

    scale: float
    alpha: float
    kind: ClassVar[str] = "pareto"

    def sample(self, rng: np.random.Generator, n: int) -> FloatArray:
        # numpy's pareto() is the Lomax (shifted) form: +1 then scale gives type I.
        return (rng.pareto(self.alpha, n) + 1.0) * self.scale

    def spec(self) -> dict[str, Any]:
        return {"dist": self.kind, "scale": self.scale, "alpha": self.alpha}

    def mean(self) -> float:
        return self.alpha * self.scale / (self.alpha - 1)

    def quantile(self, q: float) -> float:
        return self.scale * (1.0 - q) ** (-1.0 / self.alpha)

    def cdf(self, x: float) -> float:
        if x < self.scale:
            return 0.0
        return 1.0 - (self.scale / x) ** self.alpha


@final
@dataclass(frozen=True, eq=False, repr=False)
class Empirical(Distribution):
    """Resamples (with replacement) recorded latencies. ``describe()`` is exact for the
    resampling distribution: the mean of the values and their percentiles."""

    values: tuple[float, ...]
    file: str | None = None
    kind: ClassVar[str] = "empirical"

    def __post_init__(self) -> None:
        object.__setattr__(self, "_array", np.asarray(self.values, dtype=np.float64))

    def sample(self, rng: np.random.Generator, n: int) -> FloatArray:
        arr: FloatArray = self._array  # type: ignore[attr-defined]
        return arr[rng.integers(0, arr.size, n)]

    def spec(self) -> dict[str, Any]:
        if self.file is not None:
            return {"dist": self.kind, "file": self.file}
        return {"dist": self.kind, "values": list(self.values)}

    def mean(self) -> float:
        return float(np.mean(self._array))  # type: ignore[attr-defined]

    def quantile(self, q: float) -> float:
        return float(np.quantile(self._array, q))  # type: ignore[attr-defined]

    def cdf(self, x: float) -> float:
        arr: FloatArray = self._array  # type: ignore[attr-defined]
        return float(np.count_nonzero(arr <= x)) / arr.size

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Empirical) and self.values == other.values

    def __hash__(self) -> int:
        return hash(self.values)

    def __repr__(self) -> str:
        if self.file is not None:
            return f"Empirical(file={self.file!r}, n={len(self.values)})"
        return f"Empirical(n={len(self.values)})"


@final
@dataclass(frozen=True, eq=True, repr=False)
class Mixture(Distribution):
    """With probability ``weight_i`` a draw comes from part ``i``."""

    weights: tuple[float, ...]
    parts: tuple[Distribution, ...]
    kind: ClassVar[str] = "mixture"

    def sample(self, rng: np.random.Generator, n: int) -> FloatArray:
        cumulative = np.cumsum(self.weights)
        which = np.searchsorted(cumulative[:-1], rng.random(n), side="right")
        out = np.empty(n, dtype=np.float64)
        for i, part in enumerate(self.parts):
            mask = which == i
            count = int(mask.sum())
            if count:
                out[mask] = part.sample(rng, count)
        return out

    def spec(self) -> dict[str, Any]:
        return {
            "dist": self.kind,
            "parts": [
                {"weight": w, **p.spec()} for w, p in zip(self.weights, self.parts, strict=True)
            ],
        }

    def mean(self) -> float:
        return math.fsum(w * p.mean() for w, p in zip(self.weights, self.parts, strict=True))

    def cdf(self, x: float) -> float | None:
        total = 0.0
        for w, p in zip(self.weights, self.parts, strict=True):
            c = p.cdf(x)
            if c is None:
                return None
            total += w * c
        return total

    def quantile(self, q: float) -> float:
        if self.cdf(0.0) is None:
            return super().quantile(q)
        # Bisection on the CDF: the smallest x with F(x) >= q, bracketed by the parts' quantiles.
        lo = min(p.quantile(q) for p in self.parts)
        hi = max(p.quantile(q) for p in self.parts)
        lo = min(lo, 0.0)
        for _ in range(200):
            mid = (lo + hi) / 2
            if mid in (lo, hi):
                break
            if self.cdf(mid) >= q:  # type: ignore[operator]
                hi = mid
            else:
                lo = mid
        return hi


# --------------------------------------------------------------------------------- parsing

_KEYS: dict[str, tuple[str, ...]] = {
    "constant": ("value",),
    "uniform": ("low", "high"),
    "exponential": ("mean",),
    "normal": ("mean", "sd"),
    "lognormal": ("median", "p99"),
    "pareto": ("scale", "alpha"),
    "empirical": (),  # values | file, checked by hand
    "mixture": ("parts",),
}
WEIGHT_TOLERANCE = 1e-9


def _number(spec: Mapping[str, Any], key: str, where: str, *, positive: bool = False) -> float:
    value = spec[key]
    field = f"{where}.{key}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{field}: expected a number, got {value!r}")
    value = float(value)
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"{field}: expected a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{field}: expected a number > 0, got {value!r}")
    if value < 0:
        raise ValueError(f"{field}: expected a number >= 0, got {value!r}")
    return value


def _check_keys(spec: Mapping[str, Any], dist: str, where: str, allowed: Sequence[str]) -> None:
    required = _KEYS[dist]
    for key in required:
        if key not in spec:
            raise ValueError(f"{where}: missing key {key!r} for dist {dist!r}")
    extra = sorted(set(spec) - set(allowed) - {"dist"})
    if extra:
        raise ValueError(
            f"{where}.{extra[0]}: unexpected key for dist {dist!r} "
            f"(allowed: {', '.join(['dist', *allowed])})"
        )


def parse_latency(
    spec: Mapping[str, Any], *, where: str = "latency", base_dir: str | Path | None = None
) -> Distribution:
    """Build a ``Distribution`` from a spec dict (DESIGN.md section 4), validating it.

    ``where`` is the field path used in error messages; ``base_dir`` is where a relative
    ``empirical`` ``file`` is looked up (default: the current directory).
    Raises ``ValueError("<where>.<field>: <what was expected>, got <what was found>")``.
    """
    return _parse(spec, where, base_dir, allowed_extra=())


def _parse(
    spec: Any, where: str, base_dir: str | Path | None, allowed_extra: tuple[str, ...]
) -> Distribution:
    if not isinstance(spec, Mapping):
        raise ValueError(f"{where}: expected a table/dict with a 'dist' key, got {spec!r}")
    if "dist" not in spec:
        raise ValueError(f"{where}: missing key 'dist' (one of: {', '.join(_KEYS)})")
    dist = spec["dist"]
    if not isinstance(dist, str) or dist not in _KEYS:
        raise ValueError(
            f"{where}.dist: unknown distribution {dist!r} (expected one of: {', '.join(_KEYS)})"
        )
    body = {k: v for k, v in spec.items() if k not in allowed_extra}
    if dist == "empirical":
        _check_keys(body, dist, where, ("values", "file"))
        return _parse_empirical(body, where, base_dir)
    _check_keys(body, dist, where, _KEYS[dist])
    if dist == "constant":
        return Constant(_number(body, "value", where))
    if dist == "uniform":
        low = _number(body, "low", where)
        high = _number(body, "high", where)
        if high < low:
            raise ValueError(f"{where}.high: expected a number >= low ({low!r}), got {high!r}")
        return Uniform(low, high)
    if dist == "exponential":
        return Exponential(_number(body, "mean", where))
    if dist == "normal":
        return Normal(_number(body, "mean", where), _number(body, "sd", where))
    if dist == "lognormal":
        median = _number(body, "median", where, positive=True)
        p99 = _number(body, "p99", where)
        if p99 <= median:
            raise ValueError(f"{where}.p99: expected a number > median ({median!r}), got {p99!r}")
        return LogNormal(median, p99)
    if dist == "pareto":
        scale = _number(body, "scale", where, positive=True)
        alpha = _number(body, "alpha", where)
        if alpha <= 1:
            raise ValueError(
                f"{where}.alpha: expected a number > 1 (a finite mean is needed), got {alpha!r}"
            )
        return Pareto(scale, alpha)
    return _parse_mixture(body, where, base_dir)


def _parse_mixture(spec: Mapping[str, Any], where: str, base_dir: str | Path | None) -> Mixture:
    parts = spec["parts"]
    if not isinstance(parts, Sequence) or isinstance(parts, str | bytes) or not parts:
        raise ValueError(
            f"{where}.parts: expected a non-empty list of {{weight, dist, ...}}, got {parts!r}"
        )
    weights: list[float] = []
    dists: list[Distribution] = []
    for i, part in enumerate(parts):
        pwhere = f"{where}.parts[{i}]"
        if not isinstance(part, Mapping):
            raise ValueError(
                f"{pwhere}: expected a table/dict with 'weight' and 'dist', got {part!r}"
            )
        if "weight" not in part:
            raise ValueError(f"{pwhere}: missing key 'weight'")
        weight = _number(part, "weight", pwhere)
        weights.append(weight)
        dists.append(_parse(part, pwhere, base_dir, allowed_extra=("weight",)))
    total = math.fsum(weights)
    if abs(total - 1.0) > WEIGHT_TOLERANCE:
        raise ValueError(f"{where}.parts: expected weights summing to 1, got {total!r}")
    return Mixture(tuple(weights), tuple(dists))


def _parse_empirical(spec: Mapping[str, Any], where: str, base_dir: str | Path | None) -> Empirical:
    has_values, has_file = "values" in spec, "file" in spec
    if has_values == has_file:
        raise ValueError(
            f"{where}: expected exactly one of 'values' or 'file' for dist 'empirical'"
        )
    if has_values:
        raw = spec["values"]
        field = f"{where}.values"
        if not isinstance(raw, Sequence) or isinstance(raw, str | bytes):
            raise ValueError(f"{field}: expected a non-empty list of numbers, got {raw!r}")
        return Empirical(_check_values(list(raw), field))
    file = spec["file"]
    field = f"{where}.file"
    if not isinstance(file, str | Path) or not str(file):
        raise ValueError(f"{field}: expected a path to a CSV or JSON file, got {file!r}")
    path = Path(file)
    if base_dir is not None and not path.is_absolute():
        path = Path(base_dir) / path
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{field}: cannot read {str(path)!r}: {exc}") from None
    values = _read_values(text, path, field)
    return Empirical(_check_values(values, field), file=str(file))


def _read_values(text: str, path: Path, field: str) -> list[Any]:
    stripped = text.lstrip()
    if path.suffix.lower() == ".json" or stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{field}: {str(path)!r} is not valid JSON: {exc}") from None
        if not isinstance(data, list):
            raise ValueError(f"{field}: {str(path)!r}: expected a JSON list of numbers")
        return data
    # CSV: one number per line (first column); blank lines and '#' comments are skipped, and so
    # is a non-numeric first line (a header).
    values: list[Any] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        cell = line.split(",", 1)[0].strip()
        if not cell or cell.startswith("#"):
            continue
        try:
            values.append(float(cell))
        except ValueError:
            if not values and lineno == 1:
                continue  # header
            raise ValueError(
                f"{field}: {str(path)!r} line {lineno}: expected a number, got {cell!r}"
            ) from None
    return values


def _check_values(values: list[Any], field: str) -> tuple[float, ...]:
    if not values:
        raise ValueError(f"{field}: expected at least one recorded latency, got none")
    out: list[float] = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ValueError(f"{field}[{i}]: expected a number, got {v!r}")
        fv = float(v)
        if math.isnan(fv) or math.isinf(fv):
            raise ValueError(f"{field}[{i}]: expected a finite number, got {v!r}")
        if fv < 0:
            raise ValueError(f"{field}[{i}]: expected a number >= 0, got {v!r}")
        out.append(fv)
    return tuple(out)


def as_distribution(
    latency: Distribution | Mapping[str, Any] | float | None, *, where: str = "latency"
) -> Distribution:
    """Accept a Distribution, a spec dict, a plain number (constant seconds) or None (0 s)."""
    if latency is None:
        return Constant(0.0)
    if isinstance(latency, Distribution):
        return latency
    if isinstance(latency, Mapping):
        return parse_latency(latency, where=where)
    if isinstance(latency, bool) or not isinstance(latency, int | float):
        raise ValueError(
            f"{where}: expected a latency spec dict, a Distribution or seconds, got {latency!r}"
        )
    return parse_latency({"dist": "constant", "value": latency}, where=where)
