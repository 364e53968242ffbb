"""Latency distributions: sampling matches describe(), seeding is reproducible."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from simulators import (
    Constant,
    Distribution,
    Empirical,
    Exponential,
    LogNormal,
    Mixture,
    Normal,
    Pareto,
    Uniform,
    as_distribution,
    parse_latency,
)

SPECS: list[dict[str, object]] = [
    {"dist": "constant", "value": 0.25},
    {"dist": "uniform", "low": 0.5, "high": 1.5},
    {"dist": "exponential", "mean": 0.8},
    {"dist": "normal", "mean": 1.0, "sd": 0.3},
    {"dist": "normal", "mean": 0.0, "sd": 1.0},  # half-normal after truncation
    {"dist": "lognormal", "median": 1.0, "p99": 3.0},
    {"dist": "pareto", "scale": 0.5, "alpha": 3.0},
    {"dist": "empirical", "values": [0.1, 0.2, 0.2, 0.4, 1.5]},
    {
        "dist": "mixture",
        "parts": [
            {"weight": 0.98, "dist": "lognormal", "median": 1.0, "p99": 3.0},
            {"weight": 0.02, "dist": "constant", "value": 10.0},
        ],
    },
]
N = 400_000


@pytest.mark.timeout(30)
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: str(s["dist"]))
def test_sample_agrees_with_describe(spec: dict[str, object]) -> None:
    dist = parse_latency(spec)
    x = dist.sample(np.random.default_rng(1), N)
    assert x.shape == (N,) and x.dtype == np.float64
    assert (x >= 0).all()
    d = dist.describe()
    assert set(d) == {"mean", "p50", "p99"}
    assert d["p50"] <= d["p99"]
    assert np.mean(x) == pytest.approx(d["mean"], rel=0.02, abs=1e-9)
    assert np.quantile(x, 0.5) == pytest.approx(d["p50"], rel=0.02, abs=1e-9)
    if not isinstance(dist, Pareto):  # heavy tail: the sample p99 is noisier
        assert np.quantile(x, 0.99) == pytest.approx(d["p99"], rel=0.05, abs=1e-9)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: str(s["dist"]))
def test_same_seed_same_numbers(spec: dict[str, object]) -> None:
    dist = parse_latency(spec)
    a = dist.sample(np.random.default_rng(42), 1000)
    b = dist.sample(np.random.default_rng(42), 1000)
    c = dist.sample(np.random.default_rng(43), 1000)
    assert np.array_equal(a, b)
    if not isinstance(dist, Constant):
        assert not np.array_equal(a, c)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: str(s["dist"]))
def test_spec_round_trips(spec: dict[str, object]) -> None:
    dist = parse_latency(spec)
    assert parse_latency(dist.spec()) == dist
    assert type(dist).__name__ in repr(dist)


def test_analytic_values() -> None:
    ln = parse_latency({"dist": "lognormal", "median": 2.0, "p99": 6.0})
    assert isinstance(ln, LogNormal)
    assert ln.describe()["p50"] == pytest.approx(2.0)
    assert ln.describe()["p99"] == pytest.approx(6.0)
    assert ln.mean() == pytest.approx(math.exp(math.log(2) + ln.sigma**2 / 2))
    p = parse_latency({"dist": "pareto", "scale": 1.0, "alpha": 2.0})
    assert isinstance(p, Pareto)
    assert p.describe() == pytest.approx({"mean": 2.0, "p50": math.sqrt(2), "p99": 10.0})
    e = parse_latency({"dist": "exponential", "mean": 1.0})
    assert isinstance(e, Exponential)
    assert e.describe() == pytest.approx({"mean": 1.0, "p50": math.log(2), "p99": math.log(100)})
    u = parse_latency({"dist": "uniform", "low": 1, "high": 3})
    assert isinstance(u, Uniform)
    assert u.describe() == pytest.approx({"mean": 2.0, "p50": 2.0, "p99": 2.98})
    c = parse_latency({"dist": "constant", "value": 0})
    assert c.describe() == {"mean": 0.0, "p50": 0.0, "p99": 0.0}


def test_normal_is_truncated_not_clipped() -> None:
    n = parse_latency({"dist": "normal", "mean": 0.0, "sd": 1.0})
    assert isinstance(n, Normal)
    x = n.sample(np.random.default_rng(3), 100_000)
    assert (x > 0).all()  # clipping would pile half the mass on exactly 0
    assert n.mean() == pytest.approx(math.sqrt(2 / math.pi))  # half-normal mean
    zero_sd = parse_latency({"dist": "normal", "mean": 0.7, "sd": 0})
    assert (zero_sd.sample(np.random.default_rng(0), 5) == 0.7).all()
    assert zero_sd.describe() == {"mean": 0.7, "p50": 0.7, "p99": 0.7}


def test_mixture_weights_and_quantiles() -> None:
    m = parse_latency(SPECS[-1])
    assert isinstance(m, Mixture)
    x = m.sample(np.random.default_rng(5), 200_000)
    assert np.mean(x == 10.0) == pytest.approx(0.02, abs=0.002)
    assert m.describe()["p99"] == pytest.approx(10.0)  # 2% at 10 s owns the p99
    assert m.cdf(10.0) == pytest.approx(1.0, abs=1e-4)


def test_mixture_of_empirical_uses_cdf() -> None:
    m = parse_latency(
        {
            "dist": "mixture",
            "parts": [
                {"weight": 0.5, "dist": "empirical", "values": [1.0]},
                {"weight": 0.5, "dist": "constant", "value": 3.0},
            ],
        }
    )
    assert m.describe()["mean"] == pytest.approx(2.0)
    assert 1.0 <= m.describe()["p50"] <= 3.0
    assert m.describe()["p99"] == pytest.approx(3.0)


def test_nested_mixture() -> None:
    inner = {
        "dist": "mixture",
        "parts": [
            {"weight": 0.5, "dist": "constant", "value": 1.0},
            {"weight": 0.5, "dist": "constant", "value": 2.0},
        ],
    }
    m = parse_latency(
        {
            "dist": "mixture",
            "parts": [{"weight": 0.5, **inner}, {"weight": 0.5, "dist": "constant", "value": 4.0}],
        }
    )
    assert m.mean() == pytest.approx(0.5 * 1.5 + 0.5 * 4.0)


def test_empirical_from_csv_and_json(tmp_path: Path) -> None:
    csv = tmp_path / "lat.csv"
    csv.write_text("latency_s\n0.5\n# a comment\n\n1.5\n2.5,extra\n")
    e = parse_latency({"dist": "empirical", "file": str(csv)})
    assert isinstance(e, Empirical)
    assert e.values == (0.5, 1.5, 2.5)
    assert e.describe()["mean"] == pytest.approx(1.5)
    assert e.spec() == {"dist": "empirical", "file": str(csv)}
    js = tmp_path / "lat.json"
    js.write_text("[0.1, 0.2, 0.3]")
    assert parse_latency({"dist": "empirical", "file": str(js)}).describe()["p50"] == pytest.approx(
        0.2
    )
    rel = parse_latency({"dist": "empirical", "file": "lat.json"}, base_dir=tmp_path)
    assert isinstance(rel, Empirical) and rel.values == (0.1, 0.2, 0.3)
    x = e.sample(np.random.default_rng(0), 1000)
    assert set(np.unique(x)) <= {0.5, 1.5, 2.5}


def test_as_distribution() -> None:
    assert as_distribution(None) == Constant(0.0)
    assert as_distribution(1.5) == Constant(1.5)
    d = Uniform(0, 1)
    assert as_distribution(d) is d
    assert isinstance(as_distribution({"dist": "exponential", "mean": 1}), Distribution)
    with pytest.raises(ValueError, match="latency"):
        as_distribution("fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"latency\.value"):
        as_distribution(-1.0)
