"""LLMAnalyze over the real openai client: against a scripted server for the edge cases and
against the simulators' fake OpenAI server for the realistic path."""
from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import openai
import pytest
from http_script import Reply, Request, ScriptedServer
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import Budget, Pipeline, RetryPolicy, Stage, parse_duration
from engine.adapters import (
    ANALYSIS_SCHEMA,
    DEFAULT_OUTPUT_ESTIMATE,
    PIPELINE_STAGES,
    RETRYABLE,
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
from engine.adapters.llm import SYSTEM_PROMPT
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


# -- budgets (issue 12) ---------------------------------------------------------------------------
class SpyBudget(Budget):
    """A real Budget that records what it is told."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.updates: list[tuple[dict, dict, float | None]] = []
        self.pauses: list[tuple[float, float]] = []  # (when, until), time.monotonic()
        self.grants: list[float] = []  # budget_now of every reservation that went through
        self.spy_lock = threading.Lock()

    def update(self, remaining: Any = None, reset_s: Any = None,
               now: float | None = None) -> None:
        with self.spy_lock:
            self.updates.append((dict(remaining or {}), dict(reset_s or {}), now))
        super().update(remaining=remaining, reset_s=reset_s, now=now)

    def pause(self, until: float) -> None:
        with self.spy_lock:
            self.pauses.append((time.monotonic(), until))
        super().pause(until)

    def reserve(self, cost: Any, now: float) -> float:
        wait = super().reserve(cost, now)
        if wait == 0.0:
            with self.spy_lock:
                self.grants.append(now)
        return wait


LIMIT_HEADERS = {"x-ratelimit-limit-requests": "5000", "x-ratelimit-limit-tokens": "2000000",
                 "x-ratelimit-remaining-requests": "4321",
                 "x-ratelimit-remaining-tokens": "1500000",
                 "x-ratelimit-reset-requests": "12ms", "x-ratelimit-reset-tokens": "6m0s"}
EXPECTED_UPDATE = ({"requests": "4321", "tokens": "1500000"},
                   {"requests": "12ms", "tokens": "6m0s"})


def openai_budget(**per_minute: float) -> SpyBudget:
    return SpyBudget("openai", per_minute=per_minute or {"requests": 5000, "tokens": 2_000_000})


def contacts(n: int, start: int = 1) -> list[Fetched]:
    bodies = ["Please send a quote", "We signed the contract", "Can we get a demo?",
              "Not interested, unsubscribe me", "Any discount on the contract terms?"]
    return [Fetched(Contact(i, name=f"c{i}"), ({"body": bodies[i % len(bodies)] + f" #{i}"},))
            for i in range(start, start + n)]


def test_budget_is_resynced_from_the_headers_of_a_200() -> None:
    reply = good(Request("POST", "/", {}, b"", ("", 0)))
    reply.headers.update(LIMIT_HEADERS)
    b = openai_budget()
    t0 = time.monotonic()
    out, srv = analyze_with(lambda r: reply, budget=b)
    assert out.analysis.stage == "proposal"
    assert len(srv.requests) == 1  # one HTTP client, one request: headers via the raw response
    ((remaining, reset, now),) = b.updates
    assert (remaining, reset) == EXPECTED_UPDATE
    assert now is not None and t0 <= now <= time.monotonic()  # the engine's live budget clock
    assert b.available(time.monotonic())["requests"] <= 4321


@pytest.mark.parametrize("status", [429, 500, 400])
def test_budget_is_resynced_from_the_headers_of_errors_too(status: int) -> None:
    reply = Reply.json({"error": {"message": "no"}}, status, **LIMIT_HEADERS,
                       **{"Retry-After": "2"})
    b = openai_budget()
    with pytest.raises((TransientError, PermanentError)) as ei:
        analyze_with(lambda r: reply, budget=b)
    assert [(r, s) for r, s, _ in b.updates] == [EXPECTED_UPDATE]
    if status == 429:
        assert isinstance(ei.value, TransientError) and ei.value.retry_after == 2.0


def test_nonsense_or_missing_limit_headers_are_ignored() -> None:
    reply = good(Request("POST", "/", {}, b"", ("", 0)))
    reply.headers.update({"x-ratelimit-remaining-requests": "-3",
                          "x-ratelimit-remaining-tokens": "lots",
                          "x-ratelimit-reset-tokens": "soon"})
    b = openai_budget()
    full = b.available(time.monotonic())
    analyze_with(lambda r: reply, budget=b)
    assert b.available(time.monotonic()) == full
    b2 = openai_budget()
    analyze_with(good, budget=b2)  # no headers at all: nothing to resync
    assert b2.updates == []


def test_budget_sees_the_fake_servers_remaining_and_reset_values() -> None:
    per_minute = {"requests": 600, "tokens": 200_000}
    items = contacts(6)
    with OpenAIServer(seed=3) as other, \
            LLMAnalyze(base_url=other.url + "/v1", api_key=KEY, model="gpt-4o-mini") as probe:
        usage = reported_usage(other.url, probe, items)  # deterministic: the same on any server
    b = openai_budget(**per_minute)
    with OpenAIServer(seed=3, per_minute=per_minute) as srv, \
            LLMAnalyze(base_url=srv.url + "/v1", api_key=KEY, model="gpt-4o-mini",
                       budget=b) as llm:
        t0 = time.monotonic()
        spent = 0
        for n, item in enumerate(items, 1):
            llm(item)
            spent += usage[item.contact.id]
            elapsed = time.monotonic() - t0
            remaining, reset, _ = b.updates[-1]
            # the server's buckets after n calls: full at the start, refilled since
            for dim, used in (("requests", n), ("tokens", spent)):
                cap, rate = per_minute[dim], per_minute[dim] / 60
                rem = int(remaining[dim])
                assert cap - used - 1 <= rem <= cap - used + elapsed * rate + 1, dim
                r = parse_duration(reset[dim])  # until the server's bucket is full again
                assert r is not None
                assert r == pytest.approx((cap - rem) / rate, abs=1.5 / rate + 0.01), dim
    assert len(b.updates) == len(items)


def test_usage_is_charged_inside_an_engine_call_and_ignored_outside() -> None:
    items = contacts(8)
    b = openai_budget()
    with OpenAIServer(seed=4, per_minute={"requests": 5000, "tokens": 2_000_000}) as srv, \
            LLMAnalyze(base_url=srv.url + "/v1", api_key=KEY, model="gpt-4o-mini",
                       budget=b) as llm:
        expected = reported_usage(srv.url, llm, items)
        report = Pipeline([Stage("analyze", llm, concurrency=4, budget=b,
                                 cost=llm.estimate)]).run(items)
        assert llm(items[0]).contact == items[0].contact  # outside the engine: no charge, no error
    assert all(r.ok for r in report.items)
    for r in report.items:
        (attempt,) = r.stages[0].attempts
        assert attempt.cost is not None
        assert attempt.cost["tokens"] == expected[r.value.contact.id]
        assert attempt.cost["requests"] == 1


def reported_usage(url: str, llm: LLMAnalyze, items: list[Fetched]) -> dict[int, int]:
    """``usage.total_tokens`` the server reports for each item's request, read independently."""
    client = openai.OpenAI(api_key=KEY, base_url=url + "/v1", max_retries=0)
    try:
        out = {}
        for item in items:
            c = client.chat.completions.create(**llm._create_kwargs(llm.prompt(item)))
            assert c.usage is not None
            out[item.contact.id] = c.usage.total_tokens
        return out
    finally:
        client.close()


def test_usage_of_an_unusable_answer_is_still_charged() -> None:
    def reply(req: Request) -> Reply:
        r = completion("not json")
        body = json.loads(r.body)
        body["usage"] = {"prompt_tokens": 90, "completion_tokens": 3, "total_tokens": 93}
        return Reply.json(body)

    with ScriptedServer(reply) as srv, \
            LLMAnalyze(base_url=srv.url + "/v1", api_key=KEY, model="m") as llm:
        report = Pipeline([Stage("analyze", llm, retry=RetryPolicy(attempts=1))]).run([FETCHED])
    (attempt,) = report.items[0].stages[0].attempts
    assert attempt.error is not None and attempt.cost is not None
    assert attempt.cost["tokens"] == 93


def test_estimate_is_prompt_chars_over_4_plus_the_output_cap() -> None:
    with ScriptedServer(good) as srv, \
            LLMAnalyze(base_url=srv.url + "/v1", api_key=KEY, model="m") as llm, \
            LLMAnalyze(base_url=srv.url + "/v1", api_key=KEY, model="m",
                       max_output_tokens=50) as small, \
            LLMAnalyze(base_url=srv.url + "/v1", api_key=KEY, model="m",
                       max_output_tokens=None) as unsent:
        chars = len(SYSTEM_PROMPT) + len(llm.prompt(FETCHED))
        assert llm.estimate(FETCHED) == {"tokens": chars // 4 + 1 + DEFAULT_OUTPUT_ESTIMATE}
        llm(FETCHED)
        assert srv.requests[0].json()["max_completion_tokens"] == DEFAULT_OUTPUT_ESTIMATE
        assert small.estimate(FETCHED) == {"tokens": chars // 4 + 1 + 50}
        unsent(FETCHED)
        assert "max_completion_tokens" not in srv.requests[-1].json()
        assert unsent.estimate(FETCHED) == llm.estimate(FETCHED)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_output_tokens"):
            LLMAnalyze(base_url="http://x/v1", api_key=KEY, model="m", max_output_tokens=bad)
    with pytest.raises(TypeError, match="budget"):
        LLMAnalyze(base_url="http://x/v1", api_key=KEY, model="m",
                   budget={"tokens": 1})  # type: ignore[arg-type]


def test_the_estimate_bounds_the_fake_servers_usage() -> None:
    items = contacts(5)
    with OpenAIServer(seed=5) as srv, \
            LLMAnalyze(base_url=srv.url + "/v1", api_key=KEY, model="gpt-4o-mini") as llm:
        usage = reported_usage(srv.url, llm, items)
        for item in items:
            est = llm.estimate(item)["tokens"]
            assert usage[item.contact.id] <= est <= usage[item.contact.id] + DEFAULT_OUTPUT_ESTIMATE


def test_a_429_storm_pauses_the_budget_and_every_item_gets_through() -> None:
    # The server allows 5 requests a (scaled) minute = 5 per 0.6 s; the client's budget thinks
    # it may send 100 at once, so the first wave overshoots and is answered 429 + Retry-After.
    server_limits = {"requests": 5, "tokens": 1_000_000}
    b = openai_budget(requests=6000, tokens=10_000_000)
    items = contacts(12)
    with OpenAIServer(seed=6, per_minute=server_limits, time_scale=0.01) as srv, \
            LLMAnalyze(base_url=srv.url + "/v1", api_key=KEY, model="gpt-4o-mini",
                       budget=b) as llm:
        report = Pipeline([Stage("analyze", llm, concurrency=12, budget=b, cost=llm.estimate,
                                 retry=RetryPolicy(attempts=20, backoff=0.01,
                                                   retry_on=RETRYABLE))]).run(items)
        served = {str(i.contact.id): srv.calls(str(i.contact.id)) for i in items}
    assert all(r.ok for r in report.items), [r.error for r in report.items if not r.ok]
    assert report.stages[0].overloaded > 0 and srv.stats.get("rate_limited", 0) > 0
    assert b.pauses, "a 429 with Retry-After pauses the budget"
    # every 429's headers (remaining 0) reached the budget too
    assert any(r.get("requests") == "0" for r, _, _ in b.updates)
    # no call started while the budget was paused
    for when, until in b.pauses:
        assert until > when
        assert not [g for g in b.grants if when < g < until - 1e-3]
    # each contact was served (charged by the server) exactly once: 429s cost nothing
    assert set(served.values()) == {1}
    for r in report.items:
        for a in r.stages[0].attempts:
            if a.error is not None:
                assert a.cost is not None and a.cost["tokens"] == 0  # refused: refunded


def key_echo(req: Request) -> Reply:
    """Every status an LLM API answers, each quoting the key it was sent."""
    status = [400, 401, 403, 404, 429, 500, 503][int(req.json()["messages"][1]["content"]
                                                     .split("#")[1].split('"')[0]) % 7]
    return Reply.json({"error": {"message": f"Incorrect API key provided: "
                                            f"{req.headers.get('authorization')} ({KEY})"}},
                      status, **{"Retry-After": "0"})


def test_no_error_record_of_a_run_holds_the_key() -> None:
    with ScriptedServer(key_echo) as srv, \
            LLMAnalyze(base_url=srv.url + "/v1", api_key=KEY, model="m") as llm:
        report = Pipeline([Stage("analyze", llm, concurrency=3,
                                 retry=RetryPolicy(attempts=2, backoff=0.0,
                                                   retry_on=RETRYABLE))]).run(contacts(7))
    assert not any(r.ok for r in report.items)
    text = json.dumps(report.to_json(), default=str)
    errors = [r.error for r in report.items if r.error is not None]
    assert len(errors) == 7 and all(e.traceback for e in errors)
    assert "Incorrect API key" in text  # the echo is there...
    assert KEY not in text  # ...scrubbed, in messages and tracebacks alike
    assert all(KEY not in e.traceback and KEY not in e.message for e in errors)
