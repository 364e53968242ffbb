"""The fake servers serve >= 200 concurrent connections and stop cleanly under load."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests

from simulators.servers import MessagesServer, OpenAIServer


@pytest.mark.timeout(60)
def test_200_concurrent_connections() -> None:
    n = 200
    barrier = threading.Barrier(n)
    # 0.5 s per request: served one at a time this would take 100 s
    with MessagesServer({"dist": "constant", "value": 0.5}) as srv:

        def one(i: int) -> int:
            with requests.Session() as s:  # its own connection each
                barrier.wait()
                return len(s.get(f"{srv.url}/contacts/{i}/messages", timeout=20).json())

        t0 = time.perf_counter()
        with ThreadPoolExecutor(n) as pool:
            sizes = list(pool.map(one, range(n)))
        elapsed = time.perf_counter() - t0
        assert all(2 <= k <= 6 for k in sizes)
        assert srv.connections_opened == n
        assert srv.stats["ok"] == n
        assert elapsed < 10, elapsed


@pytest.mark.timeout(60)
def test_200_concurrent_openai_requests() -> None:
    with OpenAIServer({"dist": "constant", "value": 0.3}) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="test", max_retries=0, timeout=30)
        c = c.with_options()  # one client shared by all threads, as the analyze stage does

        def one(i: int) -> str:
            r = c.chat.completions.create(
                model="m", messages=[{"role": "user", "content": f"contact {i}: book a demo"}]
            )
            return r.choices[0].message.content or ""

        t0 = time.perf_counter()
        with ThreadPoolExecutor(200) as pool:
            out = list(pool.map(one, range(200)))
        assert all('"qualified"' in o for o in out)
        assert time.perf_counter() - t0 < 15
        c.close()


@pytest.mark.timeout(20)
def test_stop_with_idle_and_busy_connections() -> None:
    srv = MessagesServer({"dist": "constant", "value": 30.0}).start()
    idle = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(20)]
    errors: list[BaseException] = []

    def busy() -> None:
        try:
            requests.get(f"{srv.url}/contacts/1/messages", timeout=25)
        except requests.RequestException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=busy) for _ in range(5)]
    for t in threads:
        t.start()
    time.sleep(0.3)  # the 5 requests are now sleeping their 30 s latency
    t0 = time.perf_counter()
    srv.stop()
    assert time.perf_counter() - t0 < 3  # sleeping handlers are woken, idle sockets closed
    for t in threads:
        t.join(5)
    assert len(errors) == 5  # they got no answer: the server went away
    for sock in idle:
        sock.settimeout(2)
        assert sock.recv(1) == b""  # closed by the server
        sock.close()
