"""LLMAnalyze over the real openai client: against a scripted server for the edge cases and
against the simulators' fake OpenAI server for the realistic path."""
from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import pytest
from http_script import Reply, Request, ScriptedServer
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.adapters import (
    ANALYSIS_SCHEMA,
    PIPELINE_STAGES,
    Analysis,
    Analyzed,
    Contact,
    Fetched,
    LLMAnalyze,
    MalformedOutputError,
    PermanentError,
    TransientError,
    parse_analysis,
)
from simulators.servers import OpenAIServer

pytestmark = pytest.mark.timeout(30)

KEY = "sk-test-SECRET-0123456789"
FETCHED = Fetched(Contact(7, name="Ann"), ({"body": "Please send a quote"},))


def completion(content: str | None, finish_reason: str = "stop") -> Reply:
    return Reply.json({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "m",
        "choices": [{"index": 0, "finish_reason": finish_reason, "logprobs": None,
                     "message": {"role": "assistant", "content": content, "refusal": None}}],
    })


def good(req: Request) -> Reply:
    return completion(json.dumps({"stage": "proposal", "score": 0.6, "summary": "wants\na quote"}))


def analyze_with(reply: Callable[[Request], Reply], **kw: Any) -> tuple[Analyzed, ScriptedServer]:
    with ScriptedServer(reply) as srv, \
            LLMAnalyze(base_url=srv.url + "/v1", api_key=KEY, model="m", **kw) as llm:
        return llm(FETCHED), srv


def test_parses_into_a_frozen_typed_result_and_sends_the_schema() -> None:
    out, srv = analyze_with(good)
    assert out == Analyzed(FETCHED.contact, Analysis("proposal", 0.6, "wants a quote"), 1, "m")
    with pytest.raises(AttributeError):
        out.analysis.score = 1.0  # type: ignore[misc]
    (req,) = srv.requests
    assert req.path == "/v1/chat/completions"
    assert req.headers["authorization"] == f"Bearer {KEY}"
    body = req.json()
    assert body["model"] == "m"
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "contact_analysis", "strict": True, "schema": ANALYSIS_SCHEMA}}
    assert "Please send a quote" in body["messages"][1]["content"]


@pytest.mark.parametrize(("headers", "expected"), [
    ({"retry-after-ms": "1500", "Retry-After": "2"}, 1.5),
    ({"Retry-After": "3"}, 3.0),
    ({}, None),
])
def test_rate_limit_is_transient_with_retry_after(headers: dict, expected: float | None) -> None:
    reply = Reply.json({"error": {"message": "slow down", "type": "rate_limit"}}, 429, **headers)
    with pytest.raises(TransientError) as ei:
        analyze_with(lambda r: reply)
    assert ei.value.retry_after == expected
    assert ei.value.status == 429


@pytest.mark.parametrize("status", [500, 502, 503, 408, 409])
def test_server_errors_are_transient_and_the_client_never_retries(status: int) -> None:
    calls: list[int] = []

    def reply(req: Request) -> Reply:
        calls.append(1)
        return Reply.json({"error": {"message": "boom"}}, status)

    with pytest.raises(TransientError, match=f"HTTP {status}"):
        analyze_with(reply)
    assert len(calls) == 1  # max_retries=0: the engine's RetryPolicy is the only retry loop


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_other_4xx_are_permanent_and_scrubbed(status: int) -> None:
    reply = Reply.json({"error": {"message": f"Incorrect API key provided: {KEY}"}}, status)
    with pytest.raises(PermanentError) as ei:
        analyze_with(lambda r: reply)
    assert not isinstance(ei.value, TransientError)
    assert KEY not in str(ei.value)


def test_timeouts_and_dropped_connections_are_transient() -> None:
    with pytest.raises(TransientError, match="timed out"):
        analyze_with(lambda r: Reply(200, b"{}", delay=1.0), timeout=0.2)
    with pytest.raises(TransientError, match="connection"):
        analyze_with(lambda r: Reply.drop())


@pytest.mark.parametrize(("content", "why"), [
    ("Sure! The stage is proposal.", "is not JSON"),
    ('{"stage": "proposal", "score": 0.5}', "missing"),
    ('{"stage": "proposal", "score": 0.5, "summary": "x", "mood": "ok"}', "unexpected"),
    ('{"stage": "closed", "score": 0.5, "summary": "x"}', "stage"),
    ('{"stage": "won", "score": 1.5, "summary": "x"}', "score"),
    ('{"stage": "won", "score": true, "summary": "x"}', "score"),
    ('{"stage": "won", "score": 0.5, "summary": 3}', "summary"),
    ('["won", 0.5, "x"]', "expected an object"),
])
def test_schema_violations_fail_with_the_raw_text(content: str, why: str) -> None:
    with pytest.raises(MalformedOutputError) as ei:
        analyze_with(lambda r: completion(content))
    assert why in str(ei.value)
    assert content[:40] in str(ei.value).replace("\\'", "'")
    assert ei.value.raw == content


def test_long_raw_output_is_truncated_in_the_message() -> None:
    content = "x" * 5000
    with pytest.raises(MalformedOutputError) as ei:
        analyze_with(lambda r: completion(content))
    assert len(str(ei.value)) < 600 and "more chars" in str(ei.value)


def test_broken_envelopes_are_malformed_output() -> None:
    # a JSON content type whose body is cut off, as the fake server's `malformed` fault sends
    with pytest.raises(MalformedOutputError, match="not JSON"):
        analyze_with(lambda r: Reply(200, b'{"id": "x", "choi\x00<!--',
                                     {"Content-Type": "application/json"}))
    with pytest.raises(MalformedOutputError, match="not JSON"):
        analyze_with(lambda r: Reply(200, b"<html>gateway</html>", {"Content-Type": "text/html"}))
    with pytest.raises(MalformedOutputError, match="length limit"):
        analyze_with(lambda r: completion('{"stage": "won", "sco', finish_reason="length"))
    with pytest.raises(MalformedOutputError, match="no content"):
        analyze_with(lambda r: completion(None, finish_reason="content_filter"))


def test_huge_message_bodies_are_capped_in_the_prompt() -> None:
    big = Fetched(Contact(1), ({"body": "y" * (1 << 20)},))
    with ScriptedServer(good) as srv, \
            LLMAnalyze(base_url=srv.url + "/v1", api_key=KEY, model="m",
                       max_input_chars=5000) as llm:
        llm(big)
        assert len(srv.requests[0].body) < 10_000


def test_one_client_shared_by_threads_reuses_connections() -> None:
    threads, calls = 6, 10
    with ScriptedServer(good) as srv, \
            LLMAnalyze(base_url=srv.url + "/v1", api_key=KEY, model="m",
                       concurrency=threads) as llm:
        def work() -> None:
            for _ in range(calls):
                llm(FETCHED)

        ts = [threading.Thread(target=work) for _ in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert len(srv.requests) == threads * calls
        assert len(srv.connections) <= threads


def test_against_the_fake_openai_server() -> None:
    with OpenAIServer(seed=3) as srv, \
            LLMAnalyze(base_url=srv.url + "/v1", api_key=KEY, model="gpt-4o-mini") as llm:
        for text, stage in [("We signed the contract", "won"),
                            ("Could you send a proposal with pricing?", "proposal"),
                            ("Please unsubscribe me, we are not interested.", "lost")]:
            out = llm(Fetched(Contact(1), ({"body": text},)))
            assert out.analysis.stage == stage
            assert 0 <= out.analysis.score <= 1 and out.analysis.summary


@settings(max_examples=300, deadline=None)
@given(st.one_of(
    st.text(max_size=50),
    st.dictionaries(st.sampled_from(["stage", "score", "summary", "x"]),
                    st.one_of(st.none(), st.booleans(), st.floats(allow_nan=True),
                              st.integers(), st.text(max_size=10),
                              st.sampled_from(PIPELINE_STAGES)), max_size=4).map(json.dumps),
))
def test_parse_analysis_returns_a_valid_result_or_one_clear_error(raw: str) -> None:
    try:
        a = parse_analysis(raw)
    except MalformedOutputError as exc:
        assert "model output" in str(exc)
        return
    assert a.stage in PIPELINE_STAGES and 0 <= a.score <= 1 and isinstance(a.summary, str)
    assert "\n" not in a.summary


def test_a_callers_client_is_used_with_its_retries_off() -> None:
    import openai

    calls: list[int] = []

    def reply(req: Request) -> Reply:
        calls.append(1)
        return Reply.json({"error": {"message": "busy"}}, 503)

    with ScriptedServer(reply) as srv:
        client = openai.OpenAI(api_key=KEY, base_url=srv.url + "/v1", max_retries=5)
        llm = LLMAnalyze(base_url="unused", api_key=KEY, model="m", client=client)
        with pytest.raises(TransientError):
            llm(FETCHED)
        client.close()
    assert len(calls) == 1
