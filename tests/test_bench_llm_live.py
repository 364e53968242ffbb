"""A provider stage live through the real client (issue 12): ``provider.client = "openai"``
runs ``LLMAnalyze`` and the openai client against the fake OpenAI server with the provider's
capacity and per-minute limits; virtual runs are the ``simulators.Provider`` either way."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench import ScenarioError, parse_scenario, resolve_scenario
from bench._build import build_pipeline, run_once
from bench._llm_live import ServerBackedLLM
from bench._metrics import validate
from bench._results import run_data, write_doc
from bench._scenario import Scenario, variant_scenario
from contract import assert_checker_accepts
from simulators import Provider


def _llm_tier(items: int, client: str, variant: str = "adaptive") -> Scenario:
    sc = resolve_scenario("llm-tier")
    raw: dict[str, Any] = dict(sc.raw, items=items)
    raw["stages"] = [dict(s, provider=dict(s["provider"], client=client)) if "provider" in s
                     else s for s in raw["stages"]]
    return variant_scenario(parse_scenario(raw, source=sc.source), variant)


def test_client_key_is_validated() -> None:
    sc = resolve_scenario("llm-tier")
    raw: dict[str, Any] = dict(sc.raw)
    raw["stages"] = [dict(s, provider=dict(s["provider"], client="anthropic"))
                     if "provider" in s else s for s in raw["stages"]]
    with pytest.raises(ScenarioError) as exc:
        parse_scenario(raw, source="x.toml")
    assert exc.value.field == "stages[1].provider.client"
    assert "simulated, openai" in exc.value.message
    assert _llm_tier(10, "openai").stages[1].provider.client == "openai"  # type: ignore[union-attr]


def test_virtual_is_the_provider_either_way() -> None:
    _, services = build_pipeline(_llm_tier(10, "openai"), clock="virtual")
    assert isinstance(services[1], Provider)


def test_prompts_carry_the_providers_tokens() -> None:
    """Each item's prompt is sized so the server charges the Provider's tokens for it."""
    sc = _llm_tier(50, "openai")
    _, services = build_pipeline(sc, clock="live", time_scale=0.2)
    llm = services[1]
    try:
        assert isinstance(llm, ServerBackedLLM)
        for i in (0, 7, 33):
            fetched = llm.fetched(i)
            answer = llm.llm.analyze(llm.llm.prompt(fetched))
            assert answer.stage
            want = llm.provider.usage_of(i).total_tokens
            served = llm.server.tokens_of("k", _request(llm, fetched))
            assert abs(served - want) <= 3, (i, served, want)
    finally:
        for s in services:
            getattr(s, "close", lambda: None)()


def _request(llm: ServerBackedLLM, fetched: Any) -> Any:
    from simulators.servers._openai import _Request

    kw = llm.llm._create_kwargs(llm.llm.prompt(fetched))
    return _Request(kw["model"], kw["messages"], 1, "json_schema",
                    kw["response_format"]["json_schema"]["schema"], "contact_analysis")


@pytest.mark.timeout(120)
def test_small_live_run_through_the_client(tmp_path: Path) -> None:
    sc = _llm_tier(150, "openai")
    d = run_once(sc, "continuous", clock="live", time_scale=0.2)
    assert d["metadata"]["live_clients"] == {
        "analyze": "LLMAnalyze (openai client) -> fake OpenAI server"}
    assert [p for p in validate(d) if "visible over" not in p] == []  # lag: see test_bench_hedge
    assert d["summary"]["ok"] == 150
    costs = [c[2]["cost"]["tokens"] for it in d["items"] for s in it["stages"]
             if s["name"] == "analyze" for c in s["calls"] if len(c) > 2 and "cost" in c[2]
             and c[2]["cost"].get("tokens")]
    assert len(costs) == 150  # the actual usage charged per call
    p = tmp_path / "live.json"
    write_doc(d, p)
    r = run_data(d, p)
    assert r.summary["budget_bound_s"] is not None
    v = run_once(sc, "continuous", clock="virtual")
    write_doc(v, tmp_path / "virtual.json")
    assert_checker_accepts(tmp_path / "virtual.json")
