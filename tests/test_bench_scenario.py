"""Scenario files are validated at the door: one line naming the file, the field and what was
expected, before anything runs; never a traceback."""
from __future__ import annotations

import math
import tomllib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench import ScenarioError, builtin_names, load_scenario, parse_scenario, resolve_scenario
from bench._scenario import builtin_path

GOOD = """\
name = "t"
items = 10
seed = 1
time_scale = 0.01

[[stages]]
name = "fetch"
concurrency = 5
latency = { dist = "mixture", parts = [
  { weight = 0.9, dist = "lognormal", median = 1.0, p99 = 3.0 },
  { weight = 0.1, dist = "constant", value = 10.0 } ] }
errors = { rate = 0.01 }
retry = { attempts = 3, backoff = 0.5 }

[[stages]]
name = "analyze"
concurrency = 4
latency = { dist = "lognormal", median = 1.0, p99 = 4.0 }

[strategies]
continuous = {}
batched = { size = 5 }
parallel-batches = { lanes = 2, size = 5 }
"""


def edit(old: str, new: str) -> str:
    assert old in GOOD, old
    return GOOD.replace(old, new, 1)


def analyze_with(line: str) -> str:
    return edit('latency = { dist = "lognormal", median = 1.0, p99 = 4.0 }',
                'latency = { dist = "lognormal", median = 1.0, p99 = 4.0 }\n' + line)


# (TOML text, the field the message must name, a phrase it must contain)
BAD = [
    ("unknown-top", edit("items = 10", "itemz = 10"), "itemz", "did you mean 'items'"),
    ("missing-name", edit('name = "t"\n', ""), "name", "missing"),
    ("missing-strategies", GOOD.split("[strategies]")[0], "strategies", "missing"),
    ("items-zero", edit("items = 10", "items = 0"), "items", "integer >= 1"),
    ("items-string", edit("items = 10", 'items = "ten"'), "items", "got a string"),
    ("items-float", edit("items = 10", "items = 2.5"), "items", "got a number"),
    ("time-scale-zero", edit("time_scale = 0.01", "time_scale = 0"), "time_scale", "> 0"),
    ("time-scale-negative", edit("time_scale = 0.01", "time_scale = -1.0"), "time_scale",
     "> 0"),
    ("seed-negative", edit("seed = 1", "seed = -3"), "seed", ">= 0"),
    ("name-slash", edit('name = "t"', 'name = "a/b"'), "name", "results folder"),
    ("stages-empty", GOOD.split("[[stages]]")[0] + "stages = []\n[strategies]\ncontinuous = {}\n",
     "stages", "one or more"),
    ("concurrency-missing", edit("concurrency = 5\n", ""), "stages[0].concurrency", "missing"),
    ("concurrency-zero", edit("concurrency = 4", "concurrency = 0"), "stages[1].concurrency",
     "integer >= 1"),
    ("concurrency-bool", edit("concurrency = 5", "concurrency = true"),
     "stages[0].concurrency", "got a boolean"),
    ("stage-unknown-key", edit("concurrency = 5", "concurency = 5"), "stages[0].concurency",
     "did you mean 'concurrency'"),
    ("stage-duplicate", edit('name = "analyze"', 'name = "fetch"'), "stages[1].name", "unique"),
    ("p99-below-median", edit("median = 1.0, p99 = 4.0", "median = 1.0, p99 = 0.5"),
     "stages[1].latency.p99", "median"),
    ("dist-unknown", edit('dist = "lognormal", median = 1.0, p99 = 4.0',
                          'dist = "gamma", median = 1.0, p99 = 4.0'),
     "stages[1].latency.dist", "gamma"),
    ("latency-negative", edit("value = 10.0", "value = -10.0"),
     "stages[0].latency.parts[1].value", ">= 0"),
    ("weights-sum", edit("weight = 0.1", "weight = 0.2"), "stages[0].latency.parts",
     "summing to 1"),
    ("latency-not-table", edit('latency = { dist = "lognormal", median = 1.0, p99 = 4.0 }',
                               "latency = 5"), "stages[1].latency", "table"),
    ("latency-missing", edit('latency = { dist = "lognormal", median = 1.0, p99 = 4.0 }\n', ""),
     "stages[1].latency", "missing"),
    ("error-rate-high", edit("errors = { rate = 0.01 }", "errors = { rate = 1.5 }"),
     "stages[0].errors.rate", "< 1"),
    ("errors-unknown", edit("errors = { rate = 0.01 }", "errors = { rat = 0.01 }"),
     "stages[0].errors.rat", "did you mean 'rate'"),
    ("retry-attempts-zero", edit("attempts = 3", "attempts = 0"), "stages[0].retry.attempts",
     "integer >= 1"),
    ("retry-backoff-negative", edit("backoff = 0.5", "backoff = -1"),
     "stages[0].retry.backoff", ">= 0"),
    ("retry-max-below", edit("backoff = 0.5", "backoff = 5.0, max_backoff = 1.0"),
     "stages[0].retry.max_backoff", ">= backoff"),
    ("timeout-zero", analyze_with("timeout = 0"), "stages[1].timeout", "> 0"),
    ("rate-limit-both", analyze_with("rate_limit = { per_s = 1, per_min = 60 }"),
     "stages[1].rate_limit.per_s", "exactly one"),
    ("rate-limit-zero", analyze_with("rate_limit = { per_min = 0 }"),
     "stages[1].rate_limit.per_min", "> 0"),
    ("rate-limit-pace", analyze_with('rate_limit = { per_s = 2, pace = "yes" }'),
     "stages[1].rate_limit.pace", "true or false"),
    ("outage-reversed", analyze_with("outages = [[10.0, 5.0]]"), "stages[1].outages[0][1]",
     "end > start"),
    ("outage-single", analyze_with("outages = [[1.0]]"), "stages[1].outages[0]", "pair"),
    ("strategy-unknown", edit("batched = { size = 5 }", "batch = { size = 5 }"),
     "strategies.batch", "did you mean 'batched'"),
    ("batch-size-zero", edit("batched = { size = 5 }", "batched = { size = 0 }"),
     "strategies.batched.size", "integer >= 1"),
    ("lanes-zero", edit("lanes = 2", "lanes = 0"), "strategies.parallel-batches.lanes",
     "integer >= 1"),
    ("max-in-flight-word", edit("continuous = {}", 'continuous = { max_in_flight = "lots" }'),
     "strategies.continuous.max_in_flight", "unbounded"),
    ("strategy-param-unknown", edit("batched = { size = 5 }", "batched = { lanes = 5 }"),
     "strategies.batched.lanes", "expected one of: size"),
    ("strategies-empty", "strategies = {}\n" + GOOD.split("[strategies]")[0], "strategies",
     "at least one"),
    ("empirical-missing-file", edit('dist = "lognormal", median = 1.0, p99 = 4.0',
                                    'dist = "empirical", file = "nope.csv"'),
     "stages[1].latency.file", "nope.csv"),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case,text,field,phrase", BAD, ids=[b[0] for b in BAD])
def test_bad_file_is_one_line_naming_file_and_field(tmp_path: Path, case: str, text: str,
                                                    field: str, phrase: str) -> None:
    path = tmp_path / f"{case}.toml"
    path.write_text(text)
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: {field}: "), msg
    assert phrase in msg, msg
    assert info.value.field == field


@pytest.mark.timeout(30)
def test_good_file_loads_with_defaults_filled(tmp_path: Path) -> None:
    path = tmp_path / "good.toml"
    path.write_text(GOOD)
    sc = load_scenario(path)
    assert (sc.name, sc.items, sc.seed, sc.time_scale) == ("t", 10, 1, 0.01)
    assert [s.name for s in sc.stages] == ["fetch", "analyze"]
    assert sc.stages[0].retry is not None and sc.stages[0].retry.attempts == 3
    assert sc.stages[0].error_rate == 0.01
    assert sc.strategy("continuous").params == {}
    assert sc.strategy("parallel-batches").params == {"size": 5, "lanes": 2, "lockstep": False}
    assert sc.source == str(path)


@pytest.mark.timeout(30)
def test_rate_limit_per_min_becomes_per_second(tmp_path: Path) -> None:
    path = tmp_path / "rl.toml"
    path.write_text(analyze_with("rate_limit = { per_min = 120, burst = 3 }"))
    rl = load_scenario(path).stages[1].rate_limit
    assert rl is not None and rl.per_s == 2.0 and rl.burst == 3 and rl.pace


@pytest.mark.timeout(30)
def test_unbounded_continuous_is_a_null_max_in_flight(tmp_path: Path) -> None:
    path = tmp_path / "u.toml"
    path.write_text(edit("continuous = {}", 'continuous = { max_in_flight = "unbounded" }'))
    assert load_scenario(path).strategy("continuous").params == {"max_in_flight": None}


@pytest.mark.timeout(30)
def test_unreadable_and_invalid_toml_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    with pytest.raises(ScenarioError, match=r"missing\.toml: cannot read it"):
        load_scenario(missing)
    broken = tmp_path / "broken.toml"
    broken.write_text("name = \n")
    with pytest.raises(ScenarioError, match=r"broken\.toml: not valid TOML"):
        load_scenario(broken)
    with pytest.raises(ScenarioError, match="not a built-in scenario"):
        resolve_scenario("no-such-scenario")


@pytest.mark.timeout(30)
def test_empirical_file_is_relative_to_the_scenario(tmp_path: Path) -> None:
    (tmp_path / "lat.csv").write_text("0.5\n1.0\n2.0\n")
    path = tmp_path / "emp.toml"
    path.write_text(edit('dist = "lognormal", median = 1.0, p99 = 4.0',
                         'dist = "empirical", file = "lat.csv"'))
    sc = load_scenario(path)
    assert sc.stages[1].latency["file"] == str(tmp_path / "lat.csv")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", builtin_names())
def test_builtin_scenarios_load_and_say_what_they_show(name: str) -> None:
    sc = resolve_scenario(name)
    assert sc.name == name and sc.description
    assert {s.name for s in sc.strategies} == {"continuous", "batched", "parallel-batches"}
    text = builtin_path(name).read_text()
    assert text.startswith("#") and "what it shows" in text.lower()


@pytest.mark.timeout(30)
def test_seed_scenario_has_the_issue_numbers() -> None:
    sc = resolve_scenario("seed")
    assert (sc.items, sc.seed, sc.time_scale) == (3220, 7, 0.02)
    fetch, analyze, save, assign = sc.stages
    assert [s.concurrency for s in sc.stages] == [50, 50, 10, 10]
    assert fetch.error_rate == 0.01 and fetch.retry is not None and fetch.retry.attempts == 3
    assert [p["weight"] for p in fetch.latency["parts"]] == [0.98, 0.02]
    assert fetch.latency["parts"][1] == {"weight": 0.02, "dist": "constant", "value": 10.0}
    assert analyze.latency == {"dist": "lognormal", "median": 1.0, "p99": 4.0}
    assert save.latency == {"dist": "lognormal", "median": 0.05, "p99": 0.2}
    assert assign.latency == {"dist": "lognormal", "median": 0.02, "p99": 0.1}
    assert sc.strategy("batched").params == {"size": 50}
    assert sc.strategy("parallel-batches").params == {"size": 50, "lanes": 3, "lockstep": False}


# --------------------------------------------------------------------------- fuzzing

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 300),
                     st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8))
_keys = st.sampled_from(["name", "items", "seed", "time_scale", "stages", "strategies",
                         "concurrency", "latency", "dist", "median", "p99", "value", "parts",
                         "weight", "errors", "rate", "retry", "attempts", "backoff",
                         "rate_limit", "per_s", "per_min", "outages", "timeout", "continuous",
                         "batched", "parallel-batches", "size", "lanes", "max_in_flight",
                         "lognormal", "constant", "mixture", "x"])
_values = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(_keys, inner, max_size=5)), max_leaves=25)


def _mutations() -> st.SearchStrategy[dict[str, object]]:
    """The good document with one field replaced, removed or added, anywhere in it."""
    base = tomllib.loads(GOOD)

    def paths(node: object, prefix: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        out = [prefix] if prefix else []
        if isinstance(node, dict):
            for k, v in node.items():
                out += paths(v, (*prefix, k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                out += paths(v, (*prefix, i))
        return out

    def mutate(path: tuple[object, ...], op: str, value: object, key: str) -> dict[str, object]:
        import copy
        doc = copy.deepcopy(base)
        parent: object = doc
        for k in path[:-1]:
            parent = parent[k]  # type: ignore[index]
        last = path[-1]
        if op == "replace":
            parent[last] = value  # type: ignore[index]
        elif op == "delete":
            del parent[last]  # type: ignore[attr-defined]
        elif isinstance(parent, dict):
            parent[key] = value
        return doc

    return st.builds(mutate, st.sampled_from(paths(base)),
                     st.sampled_from(["replace", "delete", "add"]), _values, _keys)


@pytest.mark.timeout(120)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=st.one_of(_mutations(), st.dictionaries(_keys, _values, max_size=6)))
def test_fuzzed_documents_give_a_scenario_error_never_a_traceback(doc: dict[str, object]
                                                                  ) -> None:
    try:
        sc = parse_scenario(doc, source="fuzz.toml")
    except ScenarioError as exc:
        msg = str(exc)
        assert msg.startswith("fuzz.toml") and "\n" not in msg
    else:
        assert sc.items >= 1 and sc.stages and sc.strategies
        assert all(s.concurrency >= 1 for s in sc.stages)
        assert sc.time_scale > 0 and math.isfinite(sc.time_scale)


@pytest.mark.timeout(120)
@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=200))
def test_fuzzed_text_gives_a_scenario_error_never_a_traceback(tmp_path_factory: pytest.
                                                              TempPathFactory, text: str) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "f.toml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    with pytest.raises(ScenarioError):
        load_scenario(path)
