"""Bad latency specs are rejected with one line naming the field and what was expected."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from simulators import parse_latency

LN = {"dist": "lognormal", "median": 1.0, "p99": 3.0}

BAD: list[tuple[Any, str]] = [
    # (spec, regex the message must match)
    (
        {"dist": "gamma", "shape": 2},
        r"^latency\.dist: unknown distribution 'gamma' \(expected one of: constant,",
    ),
    ({"dist": 3}, r"^latency\.dist: unknown distribution 3"),
    ({"value": 1.0}, r"^latency: missing key 'dist'"),
    ("lognormal", r"^latency: expected a table/dict"),
    (None, r"^latency: expected a table/dict"),
    ({"dist": "constant"}, r"^latency: missing key 'value' for dist 'constant'"),
    (
        {"dist": "constant", "value": 1, "sd": 2},
        r"^latency\.sd: unexpected key for dist 'constant' \(allowed: dist, value\)",
    ),
    ({"dist": "constant", "value": -1}, r"^latency\.value: expected a number >= 0, got -1"),
    (
        {"dist": "constant", "value": math.nan},
        r"^latency\.value: expected a finite number, got nan",
    ),
    (
        {"dist": "constant", "value": math.inf},
        r"^latency\.value: expected a finite number, got inf",
    ),
    ({"dist": "constant", "value": "1"}, r"^latency\.value: expected a number, got '1'"),
    ({"dist": "constant", "value": True}, r"^latency\.value: expected a number, got True"),
    (
        {"dist": "uniform", "low": 2, "high": 1},
        r"^latency\.high: expected a number >= low \(2\.0\), got 1",
    ),
    ({"dist": "uniform", "low": -1, "high": 1}, r"^latency\.low: expected a number >= 0"),
    ({"dist": "uniform", "low": 1}, r"^latency: missing key 'high'"),
    ({"dist": "exponential", "mean": -0.5}, r"^latency\.mean: expected a number >= 0, got -0\.5"),
    ({"dist": "exponential", "rate": 2}, r"^latency: missing key 'mean' for dist 'exponential'"),
    ({"dist": "normal", "mean": 1, "sd": -1}, r"^latency\.sd: expected a number >= 0"),
    ({"dist": "normal", "mean": -1, "sd": 1}, r"^latency\.mean: expected a number >= 0"),
    (
        {"dist": "lognormal", "median": 1.0, "p99": 0.5},
        r"^latency\.p99: expected a number > median \(1\.0\), got 0\.5$",
    ),
    (
        {"dist": "lognormal", "median": 1.0, "p99": 1.0},
        r"^latency\.p99: expected a number > median \(1\.0\), got 1\.0$",
    ),
    (
        {"dist": "lognormal", "median": 0, "p99": 1.0},
        r"^latency\.median: expected a number > 0, got 0",
    ),
    ({"dist": "lognormal", "median": 1.0}, r"^latency: missing key 'p99' for dist 'lognormal'"),
    (
        {"dist": "lognormal", "median": 1.0, "p99": 3.0, "p95": 2.0},
        r"^latency\.p95: unexpected key",
    ),
    (
        {"dist": "pareto", "scale": 1, "alpha": 1},
        r"^latency\.alpha: expected a number > 1 \(a finite mean is needed\), got 1",
    ),
    ({"dist": "pareto", "scale": 1, "alpha": 0.5}, r"^latency\.alpha: expected a number > 1"),
    ({"dist": "pareto", "scale": 0, "alpha": 2}, r"^latency\.scale: expected a number > 0"),
    ({"dist": "empirical"}, r"^latency: expected exactly one of 'values' or 'file'"),
    (
        {"dist": "empirical", "values": [1], "file": "x.csv"},
        r"^latency: expected exactly one of 'values' or 'file'",
    ),
    (
        {"dist": "empirical", "values": []},
        r"^latency\.values: expected at least one recorded latency",
    ),
    ({"dist": "empirical", "values": "1,2"}, r"^latency\.values: expected a non-empty list"),
    (
        {"dist": "empirical", "values": [0.1, -0.2]},
        r"^latency\.values\[1\]: expected a number >= 0, got -0\.2",
    ),
    (
        {"dist": "empirical", "values": [0.1, math.nan]},
        r"^latency\.values\[1\]: expected a finite number",
    ),
    (
        {"dist": "empirical", "values": [0.1, None]},
        r"^latency\.values\[1\]: expected a number, got None",
    ),
    (
        {"dist": "empirical", "file": "/nonexistent/lat.csv"},
        r"^latency\.file: cannot read '/nonexistent/lat\.csv'",
    ),
    ({"dist": "empirical", "file": ""}, r"^latency\.file: expected a path"),
    ({"dist": "empirical", "values": [1], "extra": 1}, r"^latency\.extra: unexpected key"),
    ({"dist": "mixture", "parts": []}, r"^latency\.parts: expected a non-empty list"),
    ({"dist": "mixture"}, r"^latency: missing key 'parts' for dist 'mixture'"),
    (
        {"dist": "mixture", "parts": [{"weight": 0.5, **LN}, {"weight": 0.4, **LN}]},
        r"^latency\.parts: expected weights summing to 1, got 0\.9",
    ),
    (
        {"dist": "mixture", "parts": [{"weight": 1.0 + 1e-6, **LN}]},
        r"^latency\.parts: expected weights summing to 1",
    ),
    ({"dist": "mixture", "parts": [LN]}, r"^latency\.parts\[0\]: missing key 'weight'"),
    (
        {"dist": "mixture", "parts": [{"weight": -0.5, **LN}, {"weight": 1.5, **LN}]},
        r"^latency\.parts\[0\]\.weight: expected a number >= 0",
    ),
    (
        {"dist": "mixture", "parts": [{"weight": 1.0, "dist": "lognormal", "median": 2, "p99": 1}]},
        r"^latency\.parts\[0\]\.p99: expected a number > median \(2\.0\), got 1",
    ),
    (
        {"dist": "mixture", "parts": [{"weight": 1.0, "dist": "nope"}]},
        r"^latency\.parts\[0\]\.dist: unknown distribution",
    ),
    ({"dist": "mixture", "parts": [1.0]}, r"^latency\.parts\[0\]: expected a table/dict"),
    (
        {"dist": "mixture", "parts": [{"weight": 1.0, "value": 1}]},
        r"^latency\.parts\[0\]: missing key 'dist'",
    ),
]


@pytest.mark.parametrize(("spec", "pattern"), BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_bad_spec_rejected(spec: Any, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern) as info:
        parse_latency(spec)
    assert "\n" not in str(info.value)  # one line


def test_where_prefixes_the_field() -> None:
    with pytest.raises(ValueError, match=r"^stages\[1\]\.latency\.p99: expected a number > median"):
        parse_latency({"dist": "lognormal", "median": 1, "p99": 1}, where="stages[1].latency")


def test_weights_within_tolerance_accepted() -> None:
    mix = parse_latency(
        {
            "dist": "mixture",
            "parts": [{"weight": 0.1, **LN}, {"weight": 0.2, **LN}, {"weight": 0.7, **LN}],
        }
    )  # 0.1+0.2 != 0.3 in floating point: accepted, and the same distribution as one part
    one = parse_latency(LN)
    assert mix.describe()["p50"] == pytest.approx(one.describe()["p50"], rel=0.05)
    almost = parse_latency({"dist": "mixture", "parts": [{"weight": 1.0 - 5e-10, **LN}]})
    assert almost.describe()["p50"] == pytest.approx(one.describe()["p50"], rel=0.05)
    with pytest.raises(ValueError, match="weight"):  # beyond the tolerance: rejected
        parse_latency({"dist": "mixture", "parts": [{"weight": 0.9, **LN}]})


@pytest.mark.parametrize(
    ("content", "suffix", "pattern"),
    [
        ("", ".csv", r"expected at least one recorded latency"),
        ("# only a comment\n\n", ".csv", r"expected at least one recorded latency"),
        ("latency\n", ".csv", r"expected at least one recorded latency"),
        ("0.1\nfast\n", ".csv", r"line 2: expected a number, got 'fast'"),
        ("0.1\n-3\n", ".csv", r"latency\.file\[1\]: expected a number >= 0"),
        ("[]", ".json", r"expected at least one recorded latency"),
        ("[0.1, ", ".json", r"is not valid JSON"),
        ('{"a": 1}', ".json", r"expected a JSON list of numbers"),
        ('[0.1, "x"]', ".json", r"latency\.file\[1\]: expected a number, got 'x'"),
    ],
)
def test_bad_empirical_file(tmp_path: Path, content: str, suffix: str, pattern: str) -> None:
    path = tmp_path / f"lat{suffix}"
    path.write_text(content)
    with pytest.raises(ValueError, match=r"^latency\.file") as info:
        parse_latency({"dist": "empirical", "file": str(path)})
    assert info.match(pattern)


def test_unreadable_empirical_file(tmp_path: Path) -> None:
    path = tmp_path / "lat.csv"
    path.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match=r"^latency\.file: cannot read"):
        parse_latency({"dist": "empirical", "file": str(path)})
    with pytest.raises(ValueError, match=r"^latency\.file: cannot read"):
        parse_latency({"dist": "empirical", "file": str(tmp_path)})  # a directory
