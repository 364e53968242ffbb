"""The fake OpenAI server's capacity and per-minute limits, read through the openai client."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import openai
import pytest
import requests

from simulators.servers import OpenAIServer
from simulators.servers._base import go_duration

pytestmark = pytest.mark.timeout(60)


def ask(text: str, **kw: Any) -> dict[str, Any]:
    return {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "Classify the contact. Answer in JSON."},
            {"role": "user", "content": text},
        ],
        **kw,
    }


def seconds(go: str) -> float:
    """Parse a Go duration ("6m0s", "12ms", "1h2m5s") back to seconds."""
    total, num = 0.0, ""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}
    i = 0
    while i < len(go):
        ch = go[i]
        if ch.isdigit() or ch == ".":
            num += ch
            i += 1
            continue
        unit = go[i : i + 2] if go[i : i + 2] in ("ms", "us") else ch
        total += float(num) * units[unit]
        num, i = "", i + len(unit)
    return total


def contact_prompt(cid: int) -> str:
    head = json.dumps({"contact_id": cid, "name": f"c{cid}", "email": f"c{cid}@example.com"})
    return f"Contact: {head}\nMessages: []"


@pytest.fixture
def limited() -> Iterator[OpenAIServer]:
    # 3 requests and 1000 tokens per scenario minute; time_scale 10: a scenario minute is 600 s
    # of real time, so nothing refills noticeably during the test
    with OpenAIServer(seed=0, time_scale=10.0, latency=0.0,
                      per_minute={"requests": 3, "tokens": 1000}) as srv:
        yield srv


def client_for(server: OpenAIServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="test", max_retries=0, timeout=10)


def test_go_durations() -> None:
    assert go_duration(360.0) == "6m0s"
    assert go_duration(1.0) == "1s"
    assert go_duration(0.012) == "12ms"
    assert go_duration(1.5) == "1.5s"
    assert go_duration(3725.0) == "1h2m5s"
    assert go_duration(0.0) == "0s"
    assert go_duration(0.0125) == "12.5ms"
    for d in (0.012, 1.5, 360.0, 3725.0, 59.75):
        assert seconds(go_duration(d)) == pytest.approx(d)


def test_limit_headers_on_every_answer_and_429_past_them(limited: OpenAIServer) -> None:
    with client_for(limited) as client:
        raws = [client.chat.completions.with_raw_response.create(**ask(f"hello {i}"))
                for i in range(3)]
        for i, raw in enumerate(raws):
            h = raw.headers
            assert raw.status_code == 200
            assert h["x-ratelimit-limit-requests"] == "3"
            assert h["x-ratelimit-limit-tokens"] == "1000"
            assert h["x-ratelimit-remaining-requests"] == str(2 - i)
            assert h["x-ratelimit-reset-requests"].endswith("s")
        usage = [raw.parse().usage for raw in raws]
        assert all(u is not None for u in usage)
        spent = sum(u.total_tokens for u in usage if u is not None)
        # the tokens bucket was charged exactly the usage the answers reported
        assert int(raws[-1].headers["x-ratelimit-remaining-tokens"]) == 1000 - spent
        # (1 request of 3 per minute) * 10 real s per scenario s: 20 scenario s -> 200 s real
        # (real time refills a hair meanwhile)
        assert seconds(raws[0].headers["x-ratelimit-reset-requests"]) == pytest.approx(200, abs=1)
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(**ask("one too many"))
        resp = info.value.response
        assert resp.status_code == 429
        assert resp.headers["x-ratelimit-remaining-requests"] == "0"
        assert int(resp.headers["Retry-After"]) == 200  # one request refills in 20 scenario s
        # the bucket has refilled for however long the calls above took (seconds, when loaded)
        assert int(resp.headers["retry-after-ms"]) == pytest.approx(200_000, abs=5_000)
        assert seconds(resp.headers["x-ratelimit-reset-requests"]) == pytest.approx(600, abs=1)
    assert limited.stats.get("rate_limited") == 1 and limited.stats.get("ok") == 3


def test_tokens_limit_refuses_and_takes_nothing() -> None:
    with OpenAIServer(seed=0, time_scale=10.0, latency=0.0,
                      per_minute={"requests": 100, "tokens": 40}) as srv, client_for(srv) as c:
        first = c.chat.completions.with_raw_response.create(**ask("hi"))
        left = int(first.headers["x-ratelimit-remaining-tokens"])
        with pytest.raises(openai.RateLimitError) as info:
            c.chat.completions.create(**ask("x" * 400))  # ~100 prompt tokens: more than 40
        h = info.value.response.headers
        assert "exceed" in info.value.message
        assert int(h["x-ratelimit-remaining-tokens"]) == left  # nothing taken
        assert h["x-ratelimit-remaining-requests"] == "99"


def test_capacity_slows_requests_beyond_it() -> None:
    # constant 1 s latency at time_scale 0.1: 0.1 s each; 6 at once on capacity 2
    with OpenAIServer(seed=0, time_scale=0.1, latency=1.0, capacity=2) as srv:
        factors: list[float] = []
        real = srv._slowdown

        def spy() -> float:
            f = real()
            factors.append(f)
            return f

        srv._slowdown = spy  # type: ignore[method-assign]
        barrier = threading.Barrier(6)

        def one(i: int) -> None:
            with client_for(srv) as c:
                barrier.wait()
                c.chat.completions.create(**ask(f"call {i}"))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(factors) == 6 and min(factors) == 1.0
    assert max(factors) > 1.0  # some requests started with more than 2 in flight
    assert all(f in (1.0, 1.5, 2.0, 2.5, 3.0) for f in factors)


def test_calls_are_counted_per_contact() -> None:
    with OpenAIServer(seed=0, latency=0.0, time_scale=10.0,
                      per_minute={"requests": 3}) as srv, client_for(srv) as c:
        for cid in (42, 42, 7):
            c.chat.completions.create(**ask(contact_prompt(cid)))
        with pytest.raises(openai.RateLimitError):
            c.chat.completions.create(**ask(contact_prompt(42)))
        c2 = c.with_options(max_retries=0)
        assert c2 is not None
        assert srv.calls("42") == 2 and srv.calls("7") == 1 and srv.calls("9") == 0
        assert srv.requests_seen == {"42": 3, "7": 1}
        doc = requests.get(srv.url + "/_conveyor/calls", timeout=5).json()
        assert doc == {"seen": {"42": 3, "7": 1}, "served": {"42": 2, "7": 1}}
        srv.reset()
        assert srv.calls("42") == 0
        # the user field names the identity when given
        c.chat.completions.create(**ask("anything", user="contact-9"))
        assert srv.calls("contact-9") == 1


def test_no_limits_no_headers() -> None:
    with OpenAIServer(seed=0, latency=0.0) as srv, client_for(srv) as c:
        raw = c.chat.completions.with_raw_response.create(**ask("hi"))
        assert not any(k.lower().startswith("x-ratelimit") for k in raw.headers)


@pytest.mark.parametrize(
    ("kwargs", "exc", "pattern"),
    [
        ({"capacity": 0}, ValueError, r"^capacity:"),
        ({"capacity": 1.5}, TypeError, r"^capacity:"),
        ({"per_minute": {"calls": 1}}, ValueError, r"^per_minute\.calls"),
        ({"per_minute": {"requests": -1}}, ValueError, r"^per_minute\.requests"),
        ({"per_minute": {"requests": 1}, "time_scale": 0}, ValueError, r"^time_scale"),
    ],
)
def test_limits_are_validated(kwargs: dict[str, Any], exc: type[Exception], pattern: str) -> None:
    with pytest.raises(exc, match=pattern):
        OpenAIServer(**kwargs)
