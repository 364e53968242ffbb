"""Sweep parameters: ranges, lists, and edits of the scenario document, re-validated."""
from __future__ import annotations

import pytest

from bench import ScenarioError, resolve_scenario
from bench._sweep import apply_param, parse_param, variant


@pytest.mark.timeout(30)
def test_ranges_include_stop_and_keep_integers() -> None:
    p = parse_param("stages.analyze.concurrency=10:200:10")
    assert p.path == "stages.analyze.concurrency"
    assert p.values[0] == 10 and p.values[-1] == 200 and len(p.values) == 20
    assert all(isinstance(v, int) for v in p.values)
    assert parse_param("stages.fetch.slow_share=0:0.1:0.02").values == (0.0, 0.02, 0.04, 0.06,
                                                                       0.08, 0.1)
    assert parse_param("strategies.batched.size=10,25,50").values == (10, 25, 50)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("bad", ["x", "x=", "=1:2:1", "x=1:2", "x=3:1:1", "x=1:2:0",
                                 "x=a,b", "x=0:1e9:1"])
def test_bad_param_specs_raise_value_error(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_param(bad)


@pytest.mark.timeout(30)
def test_slow_share_rescales_the_other_parts() -> None:
    sc = resolve_scenario("seed")
    raw = apply_param(dict(sc.raw), "stages.fetch.slow_share", 0.1)
    parts = raw["stages"][0]["latency"]["parts"]
    assert [round(p["weight"], 12) for p in parts] == [0.9, 0.1]
    assert sc.raw["stages"][0]["latency"]["parts"][1]["weight"] == 0.02   # original untouched
    v = variant(sc, parse_param("stages.fetch.slow_share=0.1"), 0.1)
    assert v.stages[0].latency["parts"][1]["weight"] == pytest.approx(0.1)


@pytest.mark.timeout(30)
def test_strategy_params_and_wildcard() -> None:
    sc = resolve_scenario("seed")
    v = variant(sc, parse_param("strategies.*.size=25"), 25)
    assert v.strategy("batched").params["size"] == 25
    assert v.strategy("parallel-batches").params["size"] == 25
    v = variant(sc, parse_param("strategies.continuous.max_in_flight=100"), 100)
    assert v.strategy("continuous").params == {"max_in_flight": 100}
    v = variant(sc, parse_param("stages.1.concurrency=7"), 7)
    assert v.stages[1].concurrency == 7


@pytest.mark.timeout(30)
def test_impossible_points_are_scenario_errors_naming_the_field() -> None:
    sc = resolve_scenario("seed")
    with pytest.raises(ScenarioError, match=r"stages\[1\]\.concurrency"):
        variant(sc, parse_param("stages.analyze.concurrency=0"), 0)
    with pytest.raises(ScenarioError, match="slow_share needs a mixture"):
        variant(sc, parse_param("stages.analyze.slow_share=0.1"), 0.1)
    with pytest.raises(ScenarioError, match="no such stage"):
        variant(sc, parse_param("stages.nope.concurrency=3"), 3)
