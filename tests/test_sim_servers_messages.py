"""The fake messages API, driven by the real `requests` client."""

from __future__ import annotations

import time

import pytest
import requests

from simulators.servers import MessagesServer, messages_for

pytestmark = pytest.mark.timeout(30)


def test_messages_deterministic_per_id_and_seed() -> None:
    with MessagesServer(seed=1) as srv, requests.Session() as s:
        assert srv.url.startswith("http://127.0.0.1:")
        r = s.get(f"{srv.url}/contacts/42/messages")
        assert r.status_code == 200
        assert r.headers["Content-Type"] == "application/json"
        msgs = r.json()
        assert 2 <= len(msgs) <= 6
        for m in msgs:
            assert set(m) == {"id", "contact_id", "direction", "sent_at", "body"}
            assert m["contact_id"] == "42"
            assert m["direction"] in ("inbound", "outbound")
            assert m["sent_at"].endswith("Z") and m["body"]
        assert [m["sent_at"] for m in msgs] == sorted(m["sent_at"] for m in msgs)
        assert s.get(f"{srv.url}/contacts/42/messages").json() == msgs
        assert msgs == messages_for("42", seed=1)
        others = [s.get(f"{srv.url}/contacts/{i}/messages").json() for i in range(20)]
        assert len({str(o) for o in others}) == 20
    with MessagesServer(seed=1) as again, MessagesServer(seed=2) as other:
        assert requests.get(f"{again.url}/contacts/42/messages").json() == msgs
        assert requests.get(f"{other.url}/contacts/42/messages").json() != msgs


def test_routes_and_errors() -> None:
    with MessagesServer() as srv, requests.Session() as s:
        assert s.get(f"{srv.url}/health").json() == {"ok": True}
        r = s.get(f"{srv.url}/contacts")
        assert r.status_code == 404 and "error" in r.json()
        r = s.post(f"{srv.url}/contacts/1/messages", json={})
        assert r.status_code == 405 and r.headers["Allow"] == "GET"
        assert s.get(f"{srv.url}/contacts/abc-1/messages?limit=5").status_code == 200
        assert srv.stats["ok"] == 1 and srv.stats["404"] == 1


def test_keep_alive_reuses_one_connection() -> None:
    with MessagesServer() as srv, requests.Session() as s:
        for i in range(25):
            assert s.get(f"{srv.url}/contacts/{i}/messages").status_code == 200
        assert srv.connections_opened == 1


def test_latency_is_slept_scaled() -> None:
    with MessagesServer({"dist": "constant", "value": 2.0}, time_scale=0.1) as srv:
        t0 = time.perf_counter()
        requests.get(f"{srv.url}/contacts/1/messages").raise_for_status()
        assert 0.19 <= time.perf_counter() - t0 < 1.0


def test_latency_per_key_and_attempt_is_deterministic() -> None:
    spec = {"dist": "lognormal", "median": 1.0, "p99": 3.0}
    with MessagesServer(spec, seed=5) as a, MessagesServer(spec, seed=5) as b:
        draws_a = [a.draw(str(i)) for i in range(50)]
        draws_a.append(a.draw("7"))
        draws_b = [b.draw(str(i)) for i in reversed(range(50))][::-1]  # another order
        draws_b.append(b.draw("7"))
        assert draws_a == draws_b
        assert draws_a[-1] != draws_a[7]  # the 2nd request for a key is a fresh draw


def test_service_side_rate_limit_answers_429_with_retry_after() -> None:
    with MessagesServer(rate_limit=2.0, burst=2) as srv, requests.Session() as s:
        codes = [s.get(f"{srv.url}/contacts/{i}/messages").status_code for i in range(3)]
        assert codes == [200, 200, 429]
        r = s.get(f"{srv.url}/contacts/9/messages")
        assert r.status_code == 429
        assert int(r.headers["Retry-After"]) >= 1
        assert 0 < int(r.headers["retry-after-ms"]) <= 500
        assert 0 < r.json()["retry_after"] <= 0.5
        time.sleep(0.55)
        assert s.get(f"{srv.url}/contacts/9/messages").status_code == 200


def test_rate_limit_is_in_scenario_seconds() -> None:
    # 1 request per scenario second at time_scale 0.01 is 100 per real second
    with MessagesServer(rate_limit=1.0, time_scale=0.01) as srv, requests.Session() as s:
        assert s.get(f"{srv.url}/contacts/1/messages").status_code == 200
        time.sleep(0.03)
        assert s.get(f"{srv.url}/contacts/2/messages").status_code == 200


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"seed": -1}, r"^seed"),
        ({"time_scale": -0.5}, r"^time_scale"),
        ({"error_rate": 1.5}, r"^error_rate"),
        ({"rate_limit": 0}, r"^rate_limit"),
        ({"latency": {"dist": "pareto", "scale": 1, "alpha": 1}}, r"^latency\.alpha"),
    ],
)
def test_constructor_validation(kwargs: dict[str, object], pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        MessagesServer(**kwargs)  # type: ignore[arg-type]


def test_stop_is_idempotent_and_frees_the_port() -> None:
    srv = MessagesServer().start()
    url = srv.url
    requests.get(f"{url}/health").raise_for_status()
    srv.stop()
    srv.stop()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/health", timeout=2)
    with pytest.raises(RuntimeError):
        _ = srv.url
