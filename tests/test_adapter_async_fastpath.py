"""AsyncLLMAnalyze's direct request (issue 15): it posts the body ``create()`` would send, on the
same client method, without the SDK's per-call parameter transform -- the same request (path,
JSON body, auth and raw-response headers) and the same outcome as the SDK's ``create()`` path
and as the sync ``LLMAnalyze``."""
from __future__ import annotations

import asyncio
from typing import Any

import pytest
from http_script import Reply, Request, ScriptedServer
from test_adapter_llm import FETCHED, KEY, good

from engine.adapters import AsyncLLMAnalyze, LLMAnalyze

pytestmark = pytest.mark.timeout(30)

#: headers that name the client or the server, not the request
CLIENT_HEADERS = ("host", "user-agent", "x-stainless-async", "x-stainless-retry-count",
                  "x-stainless-read-timeout", "x-stainless-timeout", "content-length")


def request_seen(analyze: Any) -> tuple[Any, Request]:
    """(outcome, the request the server got) of one ``analyze(srv_url)`` call."""
    seen: list[Request] = []

    def reply(req: Request) -> Reply:
        seen.append(req)
        return good(req)

    with ScriptedServer(reply) as srv:
        result = analyze(srv.url + "/v1")
    (req,) = seen
    return result, req


def same_request(a: Request, b: Request) -> None:
    assert (a.method, a.path) == (b.method, b.path) == ("POST", "/v1/chat/completions")
    assert a.json() == b.json()
    strip = {k: v for k, v in a.headers.items() if k not in CLIENT_HEADERS}
    assert strip == {k: v for k, v in b.headers.items() if k not in CLIENT_HEADERS}
    assert a.headers["authorization"] == f"Bearer {KEY}"


def async_call(url: str, direct: bool = True) -> Any:
    async def go() -> Any:
        async with AsyncLLMAnalyze(base_url=url, api_key=KEY, model="m") as llm:
            assert (llm._post_options is not None) is True  # this SDK: the direct request
            if not direct:
                llm._post_options = None  # the SDK's create(), as before
            return await llm(FETCHED)

    return asyncio.run(go())


def test_the_direct_request_is_the_one_create_sends() -> None:
    direct, req_direct = request_seen(async_call)
    create, req_create = request_seen(lambda url: async_call(url, direct=False))

    def sync_call(url: str) -> Any:
        with LLMAnalyze(base_url=url, api_key=KEY, model="m") as llm:
            return llm(FETCHED)

    sync, req_sync = request_seen(sync_call)
    assert direct == create == sync
    same_request(req_direct, req_create)
    same_request(req_direct, req_sync)
    assert req_direct.headers["x-stainless-raw-response"] == "true"


def test_a_body_the_transform_would_change_falls_back_to_create() -> None:
    from engine.adapters._async import _direct_post_options

    llm = AsyncLLMAnalyze(base_url="http://127.0.0.1:1/v1", api_key=KEY, model="m")
    sample = llm._create_kwargs("x")
    assert _direct_post_options(sample) is not None
    # an Iterable the transform turns into a list: not the identity, so not the direct path
    assert _direct_post_options({**sample, "messages": iter(sample["messages"])}) is None
