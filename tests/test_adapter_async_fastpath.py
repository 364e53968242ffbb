"""The async adapters' two CPU savings (issue 15).

* AsyncLLMAnalyze's direct request: it posts the body ``create()`` would send, on the same
  client method, without the SDK's per-call parameter transform -- the same request (path,
  JSON body, auth and raw-response headers) and the same outcome as the SDK's ``create()`` path
  and as the sync ``LLMAnalyze``.
* The socket-caching network streams of both adapters' connection pools: a connection the server
  closed while idle is still noticed (and not reused), through the socket looked up once."""
from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

import pytest
from http_script import Reply, Request, ScriptedServer
from test_adapter_llm import FETCHED, KEY, good

from engine.adapters import AsyncHttpFetch, AsyncLLMAnalyze, LLMAnalyze

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


class ClosingServer:
    """Answers each request on a keep-alive connection, then closes that connection once it
    has been idle ``idle`` seconds (a server's keep-alive timeout), counting connections."""

    def __init__(self, idle: float = 0.05) -> None:
        self.idle = idle
        self.connections = 0
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 2\r\n\r\n[]")
            time.sleep(self.idle)  # then the server drops the idle connection

    def close(self) -> None:
        self._sock.close()


def test_a_connection_the_server_closed_while_idle_is_not_reused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.adapters._async as adapters

    checks: list[bool] = []
    readable = adapters._readable

    def counting(sock: Any) -> bool:
        checks.append(result := readable(sock))
        return result

    monkeypatch.setattr(adapters, "_readable", counting)
    srv = ClosingServer()
    try:
        async def go() -> list[Any]:
            async with AsyncHttpFetch(srv.url, concurrency=4) as fetch:
                pool = (await fetch.client())._transport._pool
                assert isinstance(pool._network_backend, adapters._SocketCachingBackend)
                first = await fetch(1)
                await asyncio.sleep(0.3)  # the server closes the idle connection meanwhile
                return [first, await fetch(2)]  # a fresh connection, not an error

        first, second = asyncio.run(go())
    finally:
        srv.close()
    assert (first.messages, second.messages) == ((), ())
    assert srv.connections == 2
    assert True in checks  # the pool saw the closed connection through the cached socket
