"""Rate-limited providers in scenarios (DESIGN.md sections 6.1 and 9): the provider, budget,
[budgets], adaptive concurrency, pause_s and [variants] keys, validated at the door; variants
run side by side into their own results files, every one measured against the same account."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench import ScenarioError, load_scenario, resolve_scenario
from bench._build import PauseOnRateLimit, build_pipeline, run_once
from bench._cli import main
from bench._metrics import budget_bound, summarize, validate
from bench._scenario import scenario_variants, variant_scenario
from contract import assert_checker_accepts, keep_for_ci, load_checker
from engine import Adaptive, CallInfo
from simulators import Provider, RateLimitError

GOOD = """\
name = "acct"
items = 120
seed = 3
time_scale = 0.01

[[stages]]
name = "fetch"
concurrency = 8
latency = { dist = "lognormal", median = 0.2, p99 = 0.6 }

[[stages]]
name = "analyze"
concurrency = 20
latency = { dist = "lognormal", median = 1.0, p99 = 2.8 }
provider = { capacity = 10, per_minute = { requests = 600, tokens = 60000 }, \
tokens = { dist = "lognormal", median = 1500, p99 = 4800 } }
budget = "acct"
retry = { attempts = 10, backoff = 0.5, max_backoff = 30.0 }

[[stages]]
name = "save"
concurrency = 4
latency = { dist = "constant", value = 0.05 }

[budgets.acct]
per_minute = { requests = 600, tokens = 60000 }
burst = { requests = 590, tokens = 59000 }

[variants]
fixed = { "stages.analyze.budget" = false }
small = { "stages.analyze.budget" = false, "stages.analyze.concurrency" = 3 }
pause-all = { "stages.analyze.pause_s" = 15 }
adaptive = { "stages.analyze.concurrency" = { adaptive = { initial = 2, max = 40 } } }

[strategies]
continuous = {}
batched = { size = 20 }
"""

def edit(old: str, new: str) -> str:
    assert old in GOOD, old
    return GOOD.replace(old, new, 1)


def variant(line: str) -> str:
    return edit('fixed = { "stages.analyze.budget" = false }', line)


V = 'variants.bad."stages.analyze'
# (case, TOML text, the field the message must name, a phrase it must contain)
BAD = [
    ("budget-unknown", edit('budget = "acct"', 'budget = "acme"'), "stages[1].budget",
     "no [budgets.acme] table (budgets: acct)"),
    ("budget-number", edit('budget = "acct"', "budget = 3"), "stages[1].budget",
     "name of a [budgets.NAME] table"),
    ("budget-no-tables", edit("[budgets.acct]\nper_minute = { requests = 600, tokens = 60000 }\n"
                              "burst = { requests = 590, tokens = 59000 }\n", "")
     .replace('pause-all = { "stages.analyze.pause_s" = 15 }\n', ""),
     "stages[1].budget", "the scenario has no budgets"),
    ("budgets-per-minute-zero", edit("per_minute = { requests = 600, tokens = 60000 }\nburst",
                                     "per_minute = { requests = 0, tokens = 60000 }\nburst"),
     "budgets.acct.per_minute.requests", "> 0"),
    ("budgets-burst-unknown-dim", edit("burst = { requests = 590, tokens = 59000 }",
                                       "burst = { requests = 590, watts = 3 }"),
     "budgets.acct.burst.watts", "unknown key"),
    ("budgets-missing-per-minute", edit("per_minute = { requests = 600, tokens = 60000 }\nburst",
                                        "burst"), "budgets.acct.per_minute", "missing"),
    ("budgets-stages-unknown", edit("burst = { requests = 590, tokens = 59000 }",
                                    'stages = ["analyse"]'), "budgets.acct.stages",
     "no stage 'analyse'"),
    ("adaptive-initial-above-max",
     edit("concurrency = 20", "concurrency = { adaptive = { initial = 50, max = 40 } }"),
     "stages[1].concurrency.adaptive.initial", "[min, max] = [1, 40]"),
    ("adaptive-missing-max",
     edit("concurrency = 20", "concurrency = { adaptive = { initial = 4 } }"),
     "stages[1].concurrency.adaptive.max", "missing"),
    ("adaptive-unknown-key",
     edit("concurrency = 20", "concurrency = { adaptive = { initial = 4, max = 9, step = 2 } }"),
     "stages[1].concurrency.adaptive.step", "unknown key"),
    ("adaptive-not-a-table", edit("concurrency = 20", "concurrency = { adaptive = 4 }"),
     "stages[1].concurrency.adaptive", "expected a table"),
    ("adaptive-wrong-wrapper", edit("concurrency = 20", "concurrency = { aimd = { initial = 4 } }"),
     "stages[1].concurrency.aimd", "unknown key"),
    ("adaptive-min-zero",
     edit("concurrency = 20", "concurrency = { adaptive = { initial = 4, min = 0, max = 9 } }"),
     "stages[1].concurrency.adaptive.min", "integer >= 1"),
    ("concurrency-string", edit("concurrency = 20", 'concurrency = "20"'),
     "stages[1].concurrency", "expected an integer >= 1, got a string"),
    ("provider-capacity-zero", edit("provider = { capacity = 10,", "provider = { capacity = 0,"),
     "stages[1].provider.capacity", "integer >= 1"),
    ("provider-dimension", edit("per_minute = { requests = 600, tokens = 60000 }, tokens",
                                "per_minute = { requests = 600, watts = 60000 }, tokens"),
     "stages[1].provider.per_minute.watts", "unknown key"),
    ("provider-tokens-p99", edit("median = 1500, p99 = 4800", "median = 1500, p99 = 100"),
     "stages[1].provider.tokens.p99", "median"),
    ("provider-missing-limits", edit("per_minute = { requests = 600, tokens = 60000 }, tokens",
                                     "tokens"), "stages[1].provider.per_minute", "missing"),
    ("provider-with-faults", edit('budget = "acct"', 'budget = "acct"\nerrors = { rate = 0.1 }'),
     "stages[1].errors", "not with provider"),
    ("pause-without-budget", edit('budget = "acct"', "pause_s = 15"), "stages[1].pause_s",
     "needs budget"),
    ("pause-string", edit('budget = "acct"', 'budget = "acct"\npause_s = "15"'),
     "stages[1].pause_s", "got a string"),
    ("variant-unknown-stage", variant('bad = { "stages.analyse.budget" = false }'),
     'variants.bad."stages.analyse.budget"', "no stage 'analyse'"),
    ("variant-unknown-key", variant('bad = { "stages.analyze.concurency" = 4 }'),
     f'{V}.concurency"', "did you mean 'concurrency'"),
    ("variant-workload-key", variant('bad = { "stages.analyze.latency" = 4 }'),
     f'{V}.latency"', "not the workload"),
    ("variant-top-level", variant('bad = { "items" = 4 }'), 'variants.bad."items"',
     "unknown key path"),
    ("variant-short-path", variant('bad = { "stages.analyze" = 4 }'),
     f'{V}"', "stages.NAME.KEY"),
    ("variant-bad-adaptive", variant(
        'bad = { "stages.analyze.concurrency" = { adaptive = { initial = 0, max = 9 } } }'),
     f'{V}.concurrency".adaptive.initial', "integer >= 1"),
    ("variant-wrong-type", variant('bad = { "stages.analyze.concurrency" = "many" }'),
     f'{V}.concurrency"', "got a string"),
    ("variant-budget-unknown", variant('bad = { "stages.analyze.budget" = "nope" }'),
     f'{V}.budget"', "no [budgets.nope] table"),
    ("variant-retry-bad", variant('bad = { "stages.analyze.retry.attempts" = 0 }'),
     f'{V}.retry.attempts"', "integer >= 1"),
    ("variant-empty", variant("bad = {}"), "variants.bad", "one or more overrides"),
    ("variant-not-a-table", variant("bad = 3"), "variants.bad", "expected a table"),
    ("variant-name", variant('"a/b" = { "stages.analyze.budget" = false }'), "variants.a/b",
     "results folder"),
    ("variants-empty", "variants = {}\n" + GOOD.split("[variants]")[0]
     + "[strategies]\ncontinuous = {}\n",
     "variants", "one or more variants"),
    ("variant-with-variants", edit('seed = 3', 'seed = 3\nvariant = "x"'), "variant",
     "not with [variants]"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case,text,field,phrase", BAD, ids=[b[0] for b in BAD])
def test_bad_keys_are_one_line_naming_file_and_field(tmp_path: Path, case: str, text: str,
                                                     field: str, phrase: str) -> None:
    path = tmp_path / f"{case}.toml"
    path.write_text(text)
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: {field}: "), msg
    assert phrase in msg, msg


@pytest.mark.timeout(60)
def test_cli_rejects_a_bad_variant_in_one_line_exit_2(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(variant('bad = { "stages.analyze.concurency" = 4 }'))
    assert main(["run", "--scenario", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f'{path}: {V}.concurency"' in err[0], err
    good = tmp_path / "good.toml"
    good.write_text(GOOD)
    assert main(["run", "--scenario", str(good), "--variants", "fixed,nope",
                 "--out", str(tmp_path / "out")]) == 2
    assert "has no 'nope' (it defines: fixed, small, pause-all, adaptive)" in \
        capsys.readouterr().err
    assert not (tmp_path / "out" / "acct").exists()  # nothing ran


@pytest.mark.timeout(60)
def test_variants_apply_their_overrides_and_keep_one_account(tmp_path: Path) -> None:
    path = tmp_path / "acct.toml"
    path.write_text(GOOD)
    sc = load_scenario(path)
    assert sc.variants == ("fixed", "small", "pause-all", "adaptive")
    vs = {v.variant: v for v in scenario_variants(sc)}
    analyze = {n: v.stages[1] for n, v in vs.items()}
    assert analyze["fixed"].budget is None and analyze["fixed"].concurrency == 20
    assert analyze["small"].concurrency == 3
    assert analyze["pause-all"].pause_s == 15 and analyze["pause-all"].budget == "acct"
    a = analyze["adaptive"].adaptive
    assert a is not None and (a.initial, a.min, a.max) == (2, 1, 40)
    assert analyze["adaptive"].concurrency == 40  # the most it may ever run
    want = [{"name": "acct", "stages": ["analyze"],
             "per_minute": {"requests": 600.0, "tokens": 60000.0},
             "burst": {"requests": 600.0, "tokens": 60000.0}}]  # the provider's: one minute
    assert sc.accounts() == want
    for v in vs.values():  # the same account whatever the variant enforces
        assert v.accounts() == want
    assert [v.variant for v in scenario_variants(sc, ["adaptive", "fixed"])] == \
        ["adaptive", "fixed"]
    with pytest.raises(ScenarioError, match="has no 'nope'"):
        variant_scenario(sc, "nope")
    plain = resolve_scenario("seed")
    assert scenario_variants(plain) == [plain]
    with pytest.raises(ScenarioError, match="no \\[variants\\]"):
        scenario_variants(plain, ["fixed"])
    # a variant's document stands alone: re-validated (a live worker, a sweep) it is the same
    from bench import parse_scenario
    again = parse_scenario(vs["fixed"].raw, source=str(path))
    assert again.variant == "fixed" and again.accounts() == want
    assert again.stages == vs["fixed"].stages


@pytest.mark.timeout(60)
def test_pipeline_stages_get_provider_budget_adaptive_and_the_pause_rule(tmp_path: Path) -> None:
    path = tmp_path / "acct.toml"
    path.write_text(GOOD)
    sc = load_scenario(path)
    by = {v.variant: v for v in scenario_variants(sc)}
    pipe, services = build_pipeline(by["adaptive"], clock="virtual")
    st = pipe.stages[1]
    assert isinstance(st.fn, Provider) and isinstance(services[1], Provider)
    assert isinstance(st.concurrency, Adaptive) and st.concurrency.max == 40
    assert st.budget is not None and st.budget.per_minute == {"requests": 600, "tokens": 60000}
    assert st.cost is not None
    pipe, _ = build_pipeline(by["fixed"], clock="virtual")
    assert pipe.stages[1].budget is None and pipe.stages[1].concurrency == 20
    pipe, _ = build_pipeline(by["pause-all"], clock="live", time_scale=0.01)
    st = pipe.stages[1]
    assert isinstance(st.fn, PauseOnRateLimit) and st.budget is not None
    assert st.budget.per_minute == {"requests": 60000, "tokens": 6000000}  # per real minute
    assert st.budget.burst == {"requests": 590, "tokens": 59000}  # units, not scaled


class _Refusing:
    """A stage callable whose every call is refused with a short retry_after."""

    def __call__(self, value: Any) -> Any:
        raise RateLimitError("429", retry_after=0.5)

    def simulate(self, call: CallInfo, value: Any, *, now: float) -> Any:
        from engine import Simulated
        return Simulated(0.02, None, RateLimitError("429", retry_after=0.5))


@pytest.mark.timeout(30)
def test_pause_rule_widens_every_rate_limit_errors_retry_after() -> None:
    wrapped = PauseOnRateLimit(_Refusing(), 15.0, time_scale=0.1)
    with pytest.raises(RateLimitError) as info:
        wrapped(1)
    assert info.value.retry_after == pytest.approx(1.5)  # 15 scenario s, in real seconds
    sim = wrapped.simulate(CallInfo(0, 0, "analyze", 1, 1), 1, now=0.0)
    assert sim.error is not None and sim.error.retry_after == 15.0
    long = PauseOnRateLimit(_Refusing(), 0.1)
    assert long.simulate(CallInfo(0, 0, "analyze", 1, 1), 1, now=0.0).error.retry_after == 0.5


def _docs(out: Path) -> dict[tuple[str, str], dict[str, Any]]:
    docs = {}
    for f in sorted(out.rglob("*.json")):
        d = json.loads(f.read_text())
        docs[(d["metadata"]["variant"], d["metadata"]["strategy"])] = d
        docs[(d["metadata"]["variant"], d["metadata"]["strategy"])]["_path"] = f
    return docs


@pytest.mark.timeout(300)
def test_run_writes_one_file_per_variant_and_strategy_on_one_account(tmp_path: Path) -> None:
    path = tmp_path / "acct.toml"
    path.write_text(GOOD)
    out = tmp_path / "out"
    assert main(["run", "--scenario", str(path), "--out", str(out)]) == 0
    docs = _docs(out)
    names = ("fixed", "small", "pause-all", "adaptive")
    assert set(docs) == {(v, s) for v in names for s in ("continuous", "batched")}
    paths = {d["_path"] for d in docs.values()}
    assert paths == {out / "acct" / v / f"{s}.json" for v, s in docs}  # distinct files
    checker = load_checker()
    account = docs[("fixed", "continuous")]["metadata"]["budgets"]
    assert account and account[0]["stages"] == ["analyze"]
    for (v, _), d in docs.items():
        m, summ = d["metadata"], d["summary"]
        assert m["variant"] == v
        assert m["budgets"] == account  # every variant, whatever it enforces
        assert validate({k: x for k, x in d.items() if k != "_path"}) == []
        mine = summarize(d["items"], m["stages"], m["budgets"])
        # the engine's budget_bound_s (and the lower bound including it) match bench's own
        assert summ["budget_bound_s"] == pytest.approx(mine["budget_bound_s"], rel=1e-6)
        assert summ["lower_bound_s"] == pytest.approx(mine["lower_bound_s"], rel=1e-6)
        assert mine["budget_bound_s"] == pytest.approx(budget_bound(d["items"], account))
        if checker is not None:
            assert checker.budget_bound(m, d["items"]) == pytest.approx(mine["budget_bound_s"])
        assert summ["budget_bound_s"] > 0
    # the budget binds: 120 items x ~1,700 tokens against 60k tokens/min
    assert docs[("fixed", "continuous")]["summary"]["budget_bound_s"] > 60
    ad = docs[("adaptive", "continuous")]["metadata"]["stages"][1]
    assert ad["concurrency"] == 40 and ad["limit_timeline"][0][1] == 2
    assert docs[("fixed", "continuous")]["metadata"]["stages"][1].get("overloaded", 0) > 0
    for f in ("report.md", "summary.csv", "acct/flow.png", "acct/limits.png", "acct/visible.png"):
        assert (out / f).exists(), f
    report = (out / "report.md").read_text()
    assert "**Flow control**" in report and "| virtual | adaptive | continuous |" in report
    assert "continuous [pause-all]" in report
    files = [d["_path"] for d in docs.values()]
    assert_checker_accepts(*files)
    keep_for_ci("bench-variants", [(p, f"{p.parent.name}--{p.name}") for p in files])
    # only some variants: the others' files stay
    assert main(["run", "--scenario", str(path), "--variants", "small", "--strategies",
                 "continuous", "--no-plots", "--out", str(out)]) == 0
    assert len(_docs(out)) == 8


@pytest.mark.timeout(120)
def test_builtin_llm_scenarios_have_the_issue_numbers() -> None:
    for name, rpm, tpm, attempts in (("llm-tier", 5000, 2_000_000, 10),
                                     ("llm-tight", 500, 200_000, 4)):
        sc = resolve_scenario(name)
        assert [s.name for s in sc.stages] == ["fetch", "analyze", "save", "assign"]
        assert sc.items == 3220
        assert sc.variants == ("fixed-50", "best-fixed", "pause-all", "adaptive")
        analyze = sc.stages[1]
        assert analyze.provider is not None and analyze.provider.capacity == 60
        assert analyze.provider.per_minute == {"requests": rpm, "tokens": tpm}
        assert analyze.retry is not None and analyze.retry.attempts == attempts
        assert analyze.retry.max_backoff >= 15  # pause-all's retry_after
        assert sc.accounts() == [{"name": "openai", "stages": ["analyze"],
                                  "per_minute": {"requests": rpm, "tokens": tpm},
                                  "burst": {"requests": rpm, "tokens": tpm}}]
        by = {v.variant: v for v in scenario_variants(sc)}
        assert by["fixed-50"].stages[1].concurrency == 50 and by["fixed-50"].stages[1].budget \
            is None
        assert by["best-fixed"].stages[1].budget is None
        assert by["pause-all"].stages[1].pause_s == 15
        ad = by["adaptive"].stages[1].adaptive
        assert ad is not None and ad.initial == 4 and by["adaptive"].stages[1].budget == "openai"
        p = Provider("analyze", analyze.latency, tokens=analyze.provider.tokens, seed=sc.seed)
        mean = np.mean([p.usage_of(i).total_tokens for i in range(sc.items)])
        assert 1550 < mean < 1850, mean  # ~1,700 tokens per contact


@pytest.mark.timeout(120)
def test_llm_tier_virtual_run_is_measured_against_the_budget_bound() -> None:
    sc = variant_scenario(resolve_scenario("llm-tier"), "adaptive")
    doc = run_once(sc, "continuous", clock="virtual")
    s = doc["summary"]
    assert validate(doc) == []
    assert s["failed"] == 0
    assert 95 < s["budget_bound_s"] < 115  # (5.47M - 2M) tokens / 33,333 per s
    assert s["lower_bound_s"] == pytest.approx(max(s["lower_bound_s"], s["budget_bound_s"]))
