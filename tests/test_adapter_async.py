"""The async adapters (issue 15): AsyncLLMAnalyze over openai.AsyncOpenAI and AsyncHttpFetch over
httpx2.AsyncClient behave as their sync twins -- same results, same errors, same budget feeding --
against the scripted server (edge cases) and the simulators' fake servers (the realistic path).
Run directly with asyncio.run; the engine-level tests need ``async def`` stages in the engine."""
from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import openai
import pytest
from http_script import Reply, Request, ScriptedServer
from test_adapter_llm import (
    EXPECTED_UPDATE,
    FETCHED,
    KEY,
    LIMIT_HEADERS,
    SpyBudget,
    completion,
    contacts,
    good,
    key_echo,
    openai_budget,
    reported_usage,
)

from engine import Pipeline, RetryPolicy, Stage
from engine.adapters import (
    RETRYABLE,
    AsyncHttpFetch,
    AsyncLLMAnalyze,
    Contact,
    Fetched,
    HttpFetch,
    LLMAnalyze,
    PermanentError,
    TransientError,
)
from simulators.servers import MessagesServer, OpenAIServer

pytestmark = pytest.mark.timeout(30)


def outcome(fn: Callable[[], Any]) -> tuple[Any, ...]:
    """What a call gave: ("ok", value) or (error type, message, retry_after, status)."""
    try:
        return ("ok", fn())
    except Exception as exc:
        return (type(exc), str(exc), getattr(exc, "retry_after", None),
                getattr(exc, "status", None))


def both_llm(reply: Callable[[Request], Reply], item: Fetched = FETCHED,
             **kw: Any) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """(sync outcome, async outcome) of the same contact against the same scripted server."""
    with ScriptedServer(reply) as srv:
        with LLMAnalyze(base_url=srv.url + "/v1", api_key=KEY, model="m", **kw) as llm:
            sync = outcome(lambda: llm(item))

        async def go() -> Any:
            async with AsyncLLMAnalyze(base_url=srv.url + "/v1", api_key=KEY, model="m",
                                       **kw) as allm:
                return await allm(item)

        return sync, outcome(lambda: asyncio.run(go()))


# -- AsyncLLMAnalyze ----------------------------------------------------------------------------
def echo_key(status: int, **headers: str) -> Callable[[Request], Reply]:
    def reply(req: Request) -> Reply:
        return Reply.json({"error": {"message": f"Incorrect API key provided: "
                                                f"{req.headers.get('authorization')} ({KEY})"}},
                          status, **headers)
    return reply


@pytest.mark.parametrize("reply", [
    good,
    lambda r: Reply.json({"error": {"message": "slow down"}}, 429,
                         **{"retry-after-ms": "1500", "Retry-After": "2"}),
    lambda r: Reply.json({"error": {"message": "slow down"}}, 429, **{"Retry-After": "3"}),
    lambda r: Reply.json({"error": {"message": "boom"}}, 503),
    lambda r: Reply.json({"error": {"message": "timeout"}}, 408),
    echo_key(401), echo_key(404), echo_key(429, **{"Retry-After": "1"}), echo_key(500),
    lambda r: Reply.drop(),
    lambda r: completion("Sure! The stage is proposal."),
    lambda r: completion('{"stage": "won", "score": 1.5, "summary": "x"}'),
    lambda r: completion('{"stage": "won", "sco', finish_reason="length"),
    lambda r: completion(None, finish_reason="content_filter"),
    lambda r: Reply(200, b'{"id": "x", "choi\x00<!--', {"Content-Type": "application/json"}),
    lambda r: Reply(200, b"<html>gateway</html>", {"Content-Type": "text/html"}),
], ids=["ok", "429-ms", "429-s", "503", "408", "401-echo", "404-echo", "429-echo", "500-echo",
        "drop", "not-json", "bad-score", "length", "no-content", "cut-body", "html"])
def test_async_llm_gives_what_the_sync_one_gives(reply: Callable[[Request], Reply]) -> None:
    sync, async_ = both_llm(reply)
    assert async_ == sync
    assert KEY not in repr(async_)


def test_async_llm_timeouts_are_transient() -> None:
    sync, async_ = both_llm(lambda r: Reply(200, b"{}", delay=1.0), timeout=0.2)
    assert async_ == sync
    assert async_[0] is TransientError and "timed out" in async_[1]


def test_async_llm_secrets_never_appear_in_errors_or_their_causes() -> None:
    for status in (400, 401, 403, 429, 500, 503):
        with ScriptedServer(echo_key(status, **{"Retry-After": "1"})) as srv:
            async def go() -> None:
                async with AsyncLLMAnalyze(base_url=srv.url + "/v1", api_key=KEY,
                                           model="m") as llm:
                    await llm(FETCHED)

            with pytest.raises((TransientError, PermanentError)) as ei:
                asyncio.run(go())
        exc: BaseException | None = ei.value
        while exc is not None:  # the whole chain, as a traceback would print it
            assert KEY not in str(exc) and KEY not in repr(exc)
            exc = exc.__cause__ or exc.__context__
        assert "***" in str(ei.value)


def test_async_llm_gives_the_same_analysis_as_sync_against_the_fake_server() -> None:
    items = contacts(30)
    with OpenAIServer(seed=11) as srv:
        with LLMAnalyze(base_url=srv.url + "/v1", api_key=KEY, model="gpt-4o-mini") as llm:
            expected = [llm(item) for item in items]

        async def go() -> list[Any]:
            async with AsyncLLMAnalyze(base_url=srv.url + "/v1", api_key=KEY,
                                       model="gpt-4o-mini", concurrency=10) as allm:
                return list(await asyncio.gather(*(allm(item) for item in items)))

        got = asyncio.run(go())
        assert got == expected
        assert all(srv.calls(str(i.contact.id)) == 2 for i in items)  # once each way


def test_async_llm_feeds_its_budget_from_200s_and_errors() -> None:
    ok = good(Request("POST", "/", {}, b"", ("", 0)))
    ok.headers.update(LIMIT_HEADERS)
    limited = Reply.json({"error": {"message": "slow"}}, 429, **LIMIT_HEADERS,
                         **{"Retry-After": "2"})
    for reply in (ok, limited):
        b = openai_budget()
        t0 = time.monotonic()
        with ScriptedServer(lambda r, reply=reply: reply) as srv:  # type: ignore[misc]
            async def go(b: SpyBudget = b) -> Any:
                async with AsyncLLMAnalyze(base_url=srv.url + "/v1", api_key=KEY, model="m",
                                           budget=b) as llm:
                    return await llm(FETCHED)

            result = outcome(lambda: asyncio.run(go()))
        ((remaining, reset, now),) = b.updates
        assert (remaining, reset) == EXPECTED_UPDATE
        assert now is not None and t0 <= now <= time.monotonic()
        if reply is limited:
            assert result[0] is TransientError and result[2] == 2.0


def test_async_llm_feeds_the_fake_servers_values_like_sync() -> None:
    per_minute = {"requests": 600, "tokens": 200_000}
    items = contacts(4)
    seen = []
    for cls in (LLMAnalyze, AsyncLLMAnalyze):
        b = openai_budget(**per_minute)
        with OpenAIServer(seed=3, per_minute=per_minute) as srv:
            llm = cls(base_url=srv.url + "/v1", api_key=KEY, model="gpt-4o-mini", budget=b)
            if isinstance(llm, AsyncLLMAnalyze):
                async def go(llm: AsyncLLMAnalyze = llm) -> None:
                    for item in items:  # one at a time, as the sync loop does
                        await llm(item)
                    await llm.aclose()
                asyncio.run(go())
            else:
                for item in items:
                    llm(item)
                llm.close()
        seen.append([int(r["tokens"]) for r, _, _ in b.updates])
    # the same requests drain the server's token bucket the same way (refill aside)
    assert len(seen[0]) == len(seen[1]) == len(items)
    for a, s in zip(seen[0], seen[1], strict=True):
        assert abs(a - s) <= 200_000 / 60 * 0.5 + 1


def test_async_llm_client_never_retries_and_shares_a_bounded_pool() -> None:
    calls: list[int] = []

    def busy(req: Request) -> Reply:
        calls.append(1)
        return Reply.json({"error": {"message": "busy"}}, 503)

    with ScriptedServer(busy) as srv:
        async def one() -> None:
            async with AsyncLLMAnalyze(base_url=srv.url + "/v1", api_key=KEY, model="m") as llm:
                await llm(FETCHED)

        with pytest.raises(TransientError):
            asyncio.run(one())
    assert len(calls) == 1  # max_retries=0: the engine's RetryPolicy is the only retry loop

    with ScriptedServer(lambda r: Reply(good(r).status, good(r).body, good(r).headers,
                                        delay=0.01)) as srv:
        async def many() -> None:
            async with AsyncLLMAnalyze(base_url=srv.url + "/v1", api_key=KEY, model="m",
                                       concurrency=4) as llm:
                await asyncio.gather(*(llm(FETCHED) for _ in range(40)))

        asyncio.run(many())
        assert len(srv.requests) == 40
        assert len(srv.connections) <= 4  # one pool per loop, sized to the stage limit


def test_async_llm_works_on_a_new_loop_and_is_final_once_closed() -> None:
    with OpenAIServer(seed=1) as srv:
        llm = AsyncLLMAnalyze(base_url=srv.url + "/v1", api_key=KEY, model="gpt-4o-mini")
        first = asyncio.run(llm(FETCHED))
        (client,) = llm._clients.clients()
        assert client.is_closed()  # closed when its loop shut down, with no call from us
        second = asyncio.run(llm(FETCHED))  # a second loop: a client of its own
        assert first == second
        (again,) = llm._clients.clients()  # the dead loop's client was dropped
        assert again is not client and again.is_closed()
        llm.close()
        with pytest.raises(RuntimeError, match="closed"):
            asyncio.run(llm(FETCHED))


def test_async_llm_close_from_another_thread_closes_a_running_loops_client() -> None:
    with OpenAIServer(seed=1) as srv:
        llm = AsyncLLMAnalyze(base_url=srv.url + "/v1", api_key=KEY, model="gpt-4o-mini")
        loop = asyncio.new_event_loop()
        t = threading.Thread(target=loop.run_forever, daemon=True)
        t.start()
        try:
            asyncio.run_coroutine_threadsafe(llm(FETCHED), loop).result(10)
            (client,) = llm._clients.clients()
            assert not client.is_closed()  # its loop still runs
            llm.close()
            assert client.is_closed()
        finally:
            loop.call_soon_threadsafe(loop.stop)
            t.join(5)
            loop.close()


def test_async_llm_uses_a_callers_client_with_its_retries_off() -> None:
    calls: list[int] = []

    def busy(req: Request) -> Reply:
        calls.append(1)
        return Reply.json({"error": {"message": "busy"}}, 503)

    with ScriptedServer(busy) as srv:
        async def go() -> None:
            client = openai.AsyncOpenAI(api_key=KEY, base_url=srv.url + "/v1", max_retries=5)
            llm = AsyncLLMAnalyze(base_url="unused", api_key=KEY, model="m", client=client)
            try:
                await llm(FETCHED)
            finally:
                await llm.aclose()

        with pytest.raises(TransientError):
            asyncio.run(go())
    assert len(calls) == 1


def test_async_llm_estimate_and_validation_match_sync() -> None:
    sync = LLMAnalyze(base_url="http://127.0.0.1:9/v1", api_key=KEY, model="m",
                      max_output_tokens=77)
    async_ = AsyncLLMAnalyze(base_url="http://127.0.0.1:9/v1", api_key=KEY, model="m",
                             max_output_tokens=77)
    for item in contacts(3):
        assert async_.estimate(item) == sync.estimate(item)
    sync.close()
    async_.close()
    for bad in ({"model": ""}, {"concurrency": 0}, {"max_output_tokens": 0}):
        with pytest.raises(ValueError, match="AsyncLLMAnalyze"):
            AsyncLLMAnalyze(**{"base_url": "http://x/v1", "api_key": KEY, "model": "m", **bad})


# -- AsyncHttpFetch -----------------------------------------------------------------------------
def messages_for(req: Request) -> Reply:
    cid = req.path.split("/")[2]
    return Reply.json({"contact_id": int(cid), "messages": [{"id": 1, "body": f"hi {cid}"}]})


def both_fetch(reply: Callable[[Request], Reply], item: Contact | int = 1,
               **kw: Any) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    with ScriptedServer(reply) as srv:
        with HttpFetch(srv.url, **kw) as fetch:
            sync = outcome(lambda: fetch(item))

        async def go() -> Fetched:
            async with AsyncHttpFetch(srv.url, **kw) as afetch:
                return await afetch(item)

        return sync, outcome(lambda: asyncio.run(go()))


@pytest.mark.parametrize("reply", [
    messages_for,
    lambda r: Reply.json([{"b": 1}, {"b": 2}]),
    lambda r: Reply(429, b"busy", {"Retry-After": "2.5"}),
    lambda r: Reply(503, b"busy", {"retry-after-ms": "1500"}),
    lambda r: Reply(500), lambda r: Reply(502), lambda r: Reply(408),
    lambda r: Reply(404, b"nope"), lambda r: Reply(401, b"who?"), lambda r: Reply(422),
    lambda r: Reply(200, b"<html>oops</html>"),
    lambda r: Reply.json({"nothing": 1}),
    lambda r: Reply(200, b'{"messages": [{"body": "caf\xe9 \xff ok"}]}'),
    lambda r: Reply.json({"messages": [{"body": "x" * (1 << 20)}]}),
], ids=["ok", "list", "429", "503-ms", "500", "502", "408", "404", "401", "422", "not-json",
        "wrong-shape", "non-utf8", "1MB"])
def test_async_fetch_gives_what_the_sync_one_gives(reply: Callable[[Request], Reply]) -> None:
    sync, async_ = both_fetch(reply)
    assert async_ == sync


def test_async_fetch_keeps_the_callers_contact_and_scales_retry_after() -> None:
    c = Contact(8, name="Ann")
    sync, async_ = both_fetch(messages_for, c)
    assert async_ == sync and async_[1].contact is not None
    sync, async_ = both_fetch(lambda r: Reply(429, b"", {"Retry-After": "10"}),
                              retry_after_scale=0.02)
    assert async_ == sync and async_[2] == pytest.approx(0.2)


def test_async_fetch_timeouts_and_dropped_and_refused_connections_are_transient() -> None:
    async def fetch_once(url: str, **kw: Any) -> Fetched:
        async with AsyncHttpFetch(url, **kw) as f:
            return await f(1)

    with ScriptedServer(lambda r: Reply(200, b"[]", delay=1.0)) as srv:
        t0 = time.monotonic()
        with pytest.raises(TransientError, match="timed out"):
            asyncio.run(fetch_once(srv.url, timeout=(1.0, 0.1)))
        assert time.monotonic() - t0 < 0.9
    with ScriptedServer(lambda r: Reply.drop()) as srv, \
            pytest.raises(TransientError, match="connection failed"):
        asyncio.run(fetch_once(srv.url))
    with ScriptedServer(lambda r: Reply(200)) as srv:
        url = srv.url
    with pytest.raises(TransientError, match="connection failed"):  # nothing listens there now
        asyncio.run(fetch_once(url))


def test_async_fetch_errors_never_show_credentials_or_query() -> None:
    for status in (404, 500):
        with ScriptedServer(lambda r, s=status: Reply(s)) as srv:  # type: ignore[misc]
            url = srv.url.replace("http://", "http://user:hunter2@")
            fetch = AsyncHttpFetch(url, path="/c/{id}?token=sekrit",
                                   headers={"Authorization": "Bearer tok-123"})

            async def go(fetch: AsyncHttpFetch = fetch) -> None:
                async with fetch:
                    await fetch(1)

            with pytest.raises((PermanentError, TransientError)) as ei:
                asyncio.run(go())
            assert srv.requests[0].headers["authorization"].startswith("Basic ")  # URL userinfo
            assert "token=sekrit" in srv.requests[0].path  # sent, but never shown
        text = str(ei.value) + repr(ei.value)
        assert "hunter2" not in text and "sekrit" not in text and "tok-123" not in text


def test_async_fetch_pools_concurrency_connections_per_loop() -> None:
    with ScriptedServer(lambda r: Reply(messages_for(r).status, messages_for(r).body,
                                        messages_for(r).headers, delay=0.005)) as srv:
        fetch = AsyncHttpFetch(srv.url, concurrency=5)

        async def go() -> list[Fetched]:
            return list(await asyncio.gather(*(fetch(i) for i in range(60))))

        got = asyncio.run(go())
        assert [f.contact.id for f in got] == list(range(60))
        assert len(srv.requests) == 60
        assert len(srv.connections) <= 5  # keep-alive reuse, no per-call connection
        (first,) = fetch._clients.clients()
        assert first.is_closed  # its loop shut down: so did its connections
        asyncio.run(go())  # a second loop: a client (and pool) of its own
        assert len(srv.connections) <= 10
        fetch.close()
        with pytest.raises(RuntimeError, match="closed"):
            asyncio.run(go())


def test_async_fetch_gives_the_same_messages_as_sync_against_the_fake_server() -> None:
    with MessagesServer(seed=2) as srv:
        with HttpFetch(srv.url) as fetch:
            expected = [fetch(i) for i in range(1, 21)]

        async def go() -> list[Fetched]:
            async with AsyncHttpFetch(srv.url, concurrency=8) as afetch:
                return list(await asyncio.gather(*(afetch(i) for i in range(1, 21))))

        assert asyncio.run(go()) == expected


def test_async_fetch_validates_like_sync() -> None:
    for kw, match in (({"path": "/x"}, "path"), ({"timeout": (0, 1)}, "timeout"),
                      ({"concurrency": 0}, "concurrency")):
        with pytest.raises(ValueError, match=f"AsyncHttpFetch.{match}"):
            AsyncHttpFetch("http://x", **kw)
    with pytest.raises(ValueError, match="base_url"):
        AsyncHttpFetch("ftp://x")


# -- in the engine (needs async def stages) ---------------------------------------------------
def _async_stages_supported() -> bool:
    async def probe(x: Any) -> Any:
        return x

    try:
        Stage("probe", probe)
    except TypeError:
        return False
    return True


needs_async_stages = pytest.mark.skipif(
    not _async_stages_supported(),
    reason="the engine does not run async def stages yet: Stage('x', async_fn) raises "
           "TypeError (issue 15 engine part, engine/_async.py)")


@needs_async_stages
def test_async_pipeline_gives_the_sync_pipelines_results_and_charges_the_usage() -> None:
    ids = list(range(1, 25))
    limits = {"requests": 5000, "tokens": 2_000_000}
    with MessagesServer(seed=5) as msgs, OpenAIServer(seed=5, per_minute=limits) as srv:
        b_sync, b_async = openai_budget(), openai_budget()
        with HttpFetch(msgs.url) as fetch, \
                LLMAnalyze(base_url=srv.url + "/v1", api_key=KEY, model="gpt-4o-mini",
                           budget=b_sync) as llm:
            sync = Pipeline([Stage("fetch", fetch, concurrency=4),
                             Stage("analyze", llm, concurrency=4, budget=b_sync,
                                   cost=llm.estimate)]).run(ids)
            usage = reported_usage(srv.url, llm, [fetch(i) for i in ids])
        afetch = AsyncHttpFetch(msgs.url, concurrency=8)
        allm = AsyncLLMAnalyze(base_url=srv.url + "/v1", api_key=KEY, model="gpt-4o-mini",
                               concurrency=8, budget=b_async)
        pipeline = Pipeline([Stage("fetch", afetch, concurrency=8),
                             Stage("analyze", allm, concurrency=8, budget=b_async,
                                   cost=allm.estimate)])
        report = pipeline.run(ids)
        # the run's event loop closed each adapter's client as it shut down
        assert [c.is_closed for c in afetch._clients.clients()] == [True]
        assert [c.is_closed() for c in allm._clients.clients()] == [True]
        again = pipeline.run(ids[:5])  # the next run: a new loop, new clients
        first5 = {r.index: r.value for r in sync.items if r.index < 5}
        assert {r.index: r.value for r in again.items} == first5
        afetch.close()
        allm.close()
    assert all(r.ok for r in report.items), [r.error for r in report.items if not r.ok]
    by_index = {r.index: r.value for r in sync.items}
    assert {r.index: r.value for r in report.items} == by_index
    for r in report.items:
        (attempt,) = r.stages[1].attempts
        assert attempt.cost is not None
        assert attempt.cost["tokens"] == usage[r.value.contact.id]
    assert b_async.updates  # the headers reached the budget from the event loop too


@needs_async_stages
def test_async_429_storm_pauses_the_budget() -> None:
    b = openai_budget(requests=6000, tokens=10_000_000)
    items = contacts(12)
    with OpenAIServer(seed=6, per_minute={"requests": 5, "tokens": 1_000_000},
                      time_scale=0.01) as srv:
        llm = AsyncLLMAnalyze(base_url=srv.url + "/v1", api_key=KEY, model="gpt-4o-mini",
                              budget=b, concurrency=12)
        report = Pipeline([Stage("analyze", llm, concurrency=12, budget=b, cost=llm.estimate,
                                 retry=RetryPolicy(attempts=20, backoff=0.01,
                                                   retry_on=RETRYABLE))]).run(items)
        llm.close()
        served = {srv.calls(str(i.contact.id)) for i in items}
    assert all(r.ok for r in report.items), [r.error for r in report.items if not r.ok]
    assert report.stages[0].overloaded > 0 and b.pauses
    for when, until in b.pauses:
        assert not [g for g in b.grants if when < g < until - 1e-3]
    assert served == {1}


@needs_async_stages
def test_no_error_record_of_an_async_run_holds_the_key() -> None:
    with ScriptedServer(key_echo) as srv:
        llm = AsyncLLMAnalyze(base_url=srv.url + "/v1", api_key=KEY, model="m")
        report = Pipeline([Stage("analyze", llm, concurrency=3,
                                 retry=RetryPolicy(attempts=2, backoff=0.0,
                                                   retry_on=RETRYABLE))]).run(contacts(7))
        llm.close()
    errors = [r.error for r in report.items if r.error is not None]
    assert len(errors) == 7 and all(e.traceback for e in errors)
    text = json.dumps(report.to_json(), default=str)
    assert "Incorrect API key" in text and KEY not in text
