"""HttpFetch over the real requests client, against a scripted server on loopback."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest
from http_script import Reply, Request, ScriptedServer

from engine.adapters import Contact, Fetched, HttpFetch, PermanentError, TransientError

pytestmark = pytest.mark.timeout(30)


def messages_for(req: Request) -> Reply:
    cid = req.path.split("/")[2]
    return Reply.json({"contact_id": int(cid), "messages": [{"id": 1, "body": f"hi {cid}"}]})


def call(reply: Callable[[Request], Reply], item: int = 1, **kwargs: Any) -> Fetched:
    with ScriptedServer(reply) as srv, HttpFetch(srv.url, **kwargs) as fetch:
        return fetch(item)


def test_fetch_returns_messages_for_int_and_contact() -> None:
    with ScriptedServer(messages_for) as srv, HttpFetch(srv.url) as fetch:
        r = fetch(7)
        assert r == Fetched(Contact(7), ({"id": 1, "body": "hi 7"},))
        c = Contact(8, name="Ann")
        assert fetch(c).contact is c
        assert [q.path for q in srv.requests] == ["/contacts/7/messages", "/contacts/8/messages"]


def test_fetch_accepts_a_bare_list() -> None:
    with ScriptedServer(lambda r: Reply.json([{"b": 1}, {"b": 2}])) as srv, \
            HttpFetch(srv.url) as fetch:
        assert fetch(1).messages == ({"b": 1}, {"b": 2})


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504, 408])
def test_retryable_status_is_transient_with_retry_after(status: int) -> None:
    with ScriptedServer(lambda r: Reply(status, b"busy", {"Retry-After": "2.5"})) as srv, \
            HttpFetch(srv.url) as fetch:
        with pytest.raises(TransientError) as ei:
            fetch(1)
        assert ei.value.retry_after == 2.5
        assert ei.value.status == status
        assert len(srv.requests) == 1  # no hidden retries below the engine


def test_retry_after_http_date_and_missing_and_scaled() -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    with ScriptedServer(lambda r: Reply(429, b"", {"Retry-After": when})) as srv, \
            HttpFetch(srv.url) as fetch:
        with pytest.raises(TransientError) as ei:
            fetch(1)
        assert ei.value.retry_after is not None and 25 < ei.value.retry_after <= 30
    with ScriptedServer(lambda r: Reply(503)) as srv, HttpFetch(srv.url) as fetch:
        with pytest.raises(TransientError) as ei:
            fetch(1)
        assert ei.value.retry_after is None
    with ScriptedServer(lambda r: Reply(429, b"", {"Retry-After": "10"})) as srv, \
            HttpFetch(srv.url, retry_after_scale=0.02) as fetch:
        with pytest.raises(TransientError) as ei:
            fetch(1)
        assert ei.value.retry_after == pytest.approx(0.2)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 410, 422])
def test_other_4xx_is_permanent(status: int) -> None:
    with ScriptedServer(lambda r: Reply(status, b"nope")) as srv, HttpFetch(srv.url) as fetch:
        with pytest.raises(PermanentError, match=f"HTTP {status}") as ei:
            fetch(1)
        assert not isinstance(ei.value, TransientError)


def test_body_that_is_not_json_is_retryable_with_the_text() -> None:
    with pytest.raises(TransientError, match=r"not JSON.*<html>oops"):
        call(lambda r: Reply(200, b"<html>oops</html>"))
    with pytest.raises(PermanentError, match="expected a JSON list"):
        call(lambda r: Reply.json({"nothing": 1}))


def test_non_utf8_bytes_are_replaced_not_fatal() -> None:
    body = b'{"messages": [{"body": "caf\xe9 \xff ok"}]}'
    with ScriptedServer(lambda r: Reply(200, body)) as srv, HttpFetch(srv.url) as fetch:
        assert fetch(1).messages[0]["body"] == "caf\ufffd \ufffd ok"


def test_one_megabyte_body() -> None:
    big = "x" * (1 << 20)
    with ScriptedServer(lambda r: Reply.json({"messages": [{"body": big}]})) as srv, \
            HttpFetch(srv.url) as fetch:
        assert fetch(1).messages[0]["body"] == big


def test_read_timeout_is_transient() -> None:
    with ScriptedServer(lambda r: Reply(200, b"[]", delay=1.0)) as srv, \
            HttpFetch(srv.url, timeout=(1.0, 0.1)) as fetch:
        t0 = time.monotonic()
        with pytest.raises(TransientError, match="timed out"):
            fetch(1)
        assert time.monotonic() - t0 < 0.9


def test_dropped_and_refused_connections_are_transient() -> None:
    with pytest.raises(TransientError, match="connection failed"):
        call(lambda r: Reply.drop())
    with ScriptedServer(lambda r: Reply(200)) as srv:
        url = srv.url
    # the server is gone: nothing listens there now
    with HttpFetch(url) as fetch, pytest.raises(TransientError, match="connection failed"):
        fetch(1)


def test_errors_never_show_credentials_or_query() -> None:
    with ScriptedServer(lambda r: Reply(404)) as srv:
        url = srv.url.replace("http://", "http://user:hunter2@")
        fetch = HttpFetch(url, path="/c/{id}?token=sekrit",
                          headers={"Authorization": "Bearer tok-123"})
        with fetch, pytest.raises(PermanentError) as ei:
            fetch(1)
        assert srv.requests[0].headers["authorization"].startswith("Basic ")  # URL userinfo
    text = str(ei.value)
    assert "hunter2" not in text and "sekrit" not in text and "tok-123" not in text


def test_one_session_and_one_connection_per_worker_thread() -> None:
    threads, calls = 8, 25
    with ScriptedServer(messages_for) as srv, HttpFetch(srv.url) as fetch:
        barrier = threading.Barrier(threads)

        def work(base: int) -> None:
            barrier.wait()
            for i in range(calls):
                fetch(base * 1000 + i)

        ts = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert len(srv.requests) == threads * calls
        assert len(srv.connections) == threads  # keep-alive reuse, no per-call connection
        assert len(fetch._sessions) == threads


def test_sessions_of_dead_threads_are_closed_and_close_is_final() -> None:
    with ScriptedServer(messages_for) as srv:
        fetch = HttpFetch(srv.url)
        for _ in range(3):
            t = threading.Thread(target=fetch, args=(1,))
            t.start()
            t.join()
        fetch(2)  # this thread's session; the dead threads' ones are pruned by now
        assert len(fetch._sessions) <= 2
        fetch.close()
        with pytest.raises(RuntimeError, match="closed"):
            threading_call(fetch)


def threading_call(fetch: HttpFetch) -> None:
    err: list[BaseException] = []

    def run() -> None:
        try:
            fetch(1)
        except BaseException as exc:
            err.append(exc)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if err:
        raise err[0]


@pytest.mark.parametrize("kwargs", [{"path": "/no-id"}, {"timeout": (0, 1)}])
def test_bad_config_is_rejected(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        HttpFetch("http://127.0.0.1:1", **kwargs)
    with pytest.raises(ValueError, match="base_url"):
        HttpFetch("ftp://x")


def test_retry_after_ms_wins_when_sent() -> None:
    headers = {"Retry-After": "1", "retry-after-ms": "50"}
    with pytest.raises(TransientError) as ei:
        call(lambda r: Reply(429, b"", headers))
    assert ei.value.retry_after == pytest.approx(0.05)
