"""Injected server faults (5xx, 429, malformed bodies, slow drips, dropped connections) as the
real `requests` and `openai` clients see them."""

from __future__ import annotations

import json
import time
from collections import Counter

import openai
import pytest
import requests

from simulators.servers import MessagesServer, OpenAIServer, ServerFaults

pytestmark = pytest.mark.timeout(30)
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}


def client(srv: OpenAIServer, timeout: float | openai.Timeout = 10) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="test", max_retries=0, timeout=timeout)


def test_5xx() -> None:
    with MessagesServer(error_rate=1.0) as srv, requests.Session() as s:
        codes = {s.get(f"{srv.url}/contacts/{i}/messages").status_code for i in range(30)}
        assert codes <= {500, 502, 503} and len(codes) > 1
        r = s.get(f"{srv.url}/contacts/1/messages")
        assert r.json()["error"]["type"] == "server_error"
    with OpenAIServer(faults=ServerFaults(error_rate=1.0, error_statuses=(502,))) as srv:
        with pytest.raises(openai.InternalServerError) as info:
            client(srv).chat.completions.create(**CHAT)  # type: ignore[call-overload]
        assert info.value.status_code == 502


def test_random_429_carries_retry_after_scaled() -> None:
    faults = ServerFaults(throttle_rate=1.0, retry_after=3.0)
    with MessagesServer(faults=faults, time_scale=0.5) as srv:
        r = requests.get(f"{srv.url}/contacts/1/messages")
        assert r.status_code == 429
        assert r.headers["Retry-After"] == "2"  # 1.5 s rounded up to whole seconds
        assert r.headers["retry-after-ms"] == "1500"
        assert r.json()["retry_after"] == pytest.approx(1.5)
    with OpenAIServer(faults=ServerFaults(throttle_rate=1.0)) as srv:
        with pytest.raises(openai.RateLimitError) as info:
            client(srv).chat.completions.create(**CHAT)  # type: ignore[call-overload]
        assert info.value.response.headers["retry-after"] == "1"


def test_malformed_body() -> None:
    with MessagesServer(faults=ServerFaults(malformed_rate=1.0)) as srv:
        r = requests.get(f"{srv.url}/contacts/1/messages")
        assert r.status_code == 200 and r.headers["Content-Type"] == "application/json"
        with pytest.raises(requests.JSONDecodeError):
            r.json()
    with (
        OpenAIServer(faults=ServerFaults(malformed_rate=1.0)) as srv,
        pytest.raises(json.JSONDecodeError),  # openai does not wrap a bad JSON body
    ):
        client(srv).chat.completions.create(**CHAT)  # type: ignore[call-overload]


def test_slow_drip_delivers_the_body_slowly() -> None:
    faults = ServerFaults(slow_drip_rate=1.0, drip_seconds=0.4)
    with MessagesServer(faults=faults, seed=4) as srv:
        t0 = time.perf_counter()
        r = requests.get(f"{srv.url}/contacts/8/messages", timeout=5)
        assert r.json()[0]["contact_id"] == "8"
        assert time.perf_counter() - t0 >= 0.35
        # a client whose read timeout is shorter than the gap between chunks gives up
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(f"{srv.url}/contacts/8/messages", timeout=(2, 0.01)).json()
    with OpenAIServer(faults=faults) as srv:
        t0 = time.perf_counter()
        out = client(srv).chat.completions.create(**CHAT)  # type: ignore[call-overload]
        assert out.choices[0].message.content and time.perf_counter() - t0 >= 0.35
        with pytest.raises(openai.APITimeoutError):
            client(srv, timeout=openai.Timeout(5, read=0.01)).chat.completions.create(**CHAT)  # type: ignore[call-overload]


def test_dropped_connection() -> None:
    with MessagesServer(faults=ServerFaults(drop_rate=1.0)) as srv:
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{srv.url}/contacts/1/messages", timeout=5)
        assert srv.stats["drop"] == 1
    with (
        OpenAIServer(faults=ServerFaults(drop_rate=1.0)) as srv,
        pytest.raises(openai.APIConnectionError),
    ):
        client(srv).chat.completions.create(**CHAT)  # type: ignore[call-overload]


def test_mixed_rates_are_respected_and_reproducible() -> None:
    faults = ServerFaults(error_rate=0.2, throttle_rate=0.1, malformed_rate=0.1, drop_rate=0.1)

    def outcomes() -> list[str]:
        with MessagesServer(faults=faults, seed=9) as srv, requests.Session() as s:
            out = []
            for i in range(400):
                try:
                    r = s.get(f"{srv.url}/contacts/{i}/messages", timeout=5)
                except requests.ConnectionError:
                    out.append("drop")
                    continue
                if r.status_code != 200:
                    out.append(str(r.status_code // 100) + "xx")
                else:
                    try:
                        r.json()
                        out.append("ok")
                    except requests.JSONDecodeError:
                        out.append("malformed")
            return out

    first = outcomes()
    assert first == outcomes()  # same seed, same per-request faults
    n = Counter(first)
    assert n["5xx"] == pytest.approx(80, abs=30)
    assert n["4xx"] == pytest.approx(40, abs=22)
    assert n["malformed"] == pytest.approx(40, abs=22)
    assert n["drop"] == pytest.approx(40, abs=22)
    assert n["ok"] == pytest.approx(200, abs=40)


def test_a_retried_request_draws_again() -> None:
    with MessagesServer(error_rate=0.5, seed=1) as srv, requests.Session() as s:
        codes = [s.get(f"{srv.url}/contacts/77/messages").status_code for _ in range(20)]
        assert 200 in codes and any(c >= 500 for c in codes)
        srv.reset()
        assert [s.get(f"{srv.url}/contacts/77/messages").status_code for _ in range(20)] == codes


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"error_rate": -0.1}, r"^faults\.error_rate"),
        ({"drop_rate": 2}, r"^faults\.drop_rate"),
        (
            {"error_rate": 0.6, "drop_rate": 0.6},
            r"^faults: expected fault rates summing to at most 1",
        ),
        ({"retry_after": -1}, r"^faults\.retry_after"),
        ({"drip_seconds": float("inf")}, r"^faults\.drip_seconds"),
        ({"error_statuses": (404,)}, r"^faults\.error_statuses"),
    ],
)
def test_server_faults_validation(kwargs: dict[str, object], pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        ServerFaults(**kwargs)  # type: ignore[arg-type]


def test_error_rate_given_twice() -> None:
    with pytest.raises(ValueError, match=r"^error_rate: given both"):
        MessagesServer(error_rate=0.1, faults=ServerFaults(error_rate=0.2))
    assert (
        MessagesServer(error_rate=0.1, faults=ServerFaults(drop_rate=0.1)).faults.error_rate == 0.1
    )
