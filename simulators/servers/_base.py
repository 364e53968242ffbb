"""The machinery both fake servers share: a threaded HTTP/1.1 server on 127.0.0.1 that injects
latency and faults per request.

Request flow (one handler thread per connection, connections kept alive)::

    request -> route -> (400 / 404: answered at once)
            -> service-side rate limit (token bucket) -> 429 + Retry-After at once
            -> latency: sampled per (key, n-th request for that key), slept * time_scale
            -> one fault uniform decides: 5xx | random 429 | malformed body | slow drip
                                          | dropped connection | the normal answer

Latency and fault draws come from the same block sampler as ``SimulatedService``: the key of a
request (a contact id, a prompt hash) is the "item index" and the how-many-th time that key is
asked for is the "attempt", so a retried request draws fresh numbers and a rerun with the same
seed draws the same ones whatever the thread timing.
"""

from __future__ import annotations

import contextlib
import json
import math
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

from .._distributions import Distribution, as_distribution
from .._faults import TokenBucket
from .._provider import RateLimits, _check_capacity, _check_per_minute
from .._sampling import (
    BLOCK_SHIFT,
    BlockCache,
    check_seed_and_scale,
    draw_block,
    stable_hash,
)

__all__ = ["FakeServer", "Response", "ServerFaults", "go_duration"]

LatencyArg = Distribution | Mapping[str, Any] | float | None


def go_duration(seconds: float) -> str:
    """A duration as OpenAI's ``x-ratelimit-reset-*`` headers write it (Go's format):
    ``"6m0s"``, ``"1s"``, ``"1.5s"``, ``"12ms"``, ``"1h0m0s"``, ``"0s"``."""
    if not seconds > 0:
        return "0s"
    if seconds < 1.0:
        ms = round(seconds * 1000.0, 3)
        if ms < 1.0:
            return f"{max(1, round(seconds * 1e6))}us" if seconds >= 5e-7 else "0s"
        return f"{ms:.3f}".rstrip("0").rstrip(".") + "ms"
    total_ms = round(seconds * 1000.0)
    h, rest = divmod(total_ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    sec = f"{rest / 1000:.3f}".rstrip("0").rstrip(".") + "s"
    if h:
        return f"{h}h{m}m{sec}"
    if m:
        return f"{m}m{sec}"
    return sec


def _rate(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ValueError(f"{name}: expected a number in [0, 1], got {value!r}")
    return float(value)


@dataclass(frozen=True)
class ServerFaults:
    """Per-request fault rates of a fake server (each in [0, 1], summing to at most 1).

    ``retry_after`` (random 429s) and ``drip_seconds`` (how long a slow-drip body takes to
    arrive) are scenario seconds, multiplied by the server's ``time_scale``.
    """

    error_rate: float = 0.0  #: 5xx answers
    throttle_rate: float = 0.0  #: random 429 answers with Retry-After
    malformed_rate: float = 0.0  #: 200 with a truncated JSON body
    slow_drip_rate: float = 0.0  #: the correct body, trickled over ``drip_seconds``
    drop_rate: float = 0.0  #: the connection is closed without an answer
    retry_after: float = 1.0
    drip_seconds: float = 2.0
    error_statuses: tuple[int, ...] = (500, 502, 503)

    def __post_init__(self) -> None:
        total = 0.0
        for name in (
            "error_rate",
            "throttle_rate",
            "malformed_rate",
            "slow_drip_rate",
            "drop_rate",
        ):
            total += _rate(getattr(self, name), f"faults.{name}")
        if total > 1 + 1e-12:
            raise ValueError(f"faults: expected fault rates summing to at most 1, got {total!r}")
        for name in ("retry_after", "drip_seconds"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not (math.isfinite(value) and value >= 0)
            ):
                raise ValueError(f"faults.{name}: expected a finite number >= 0, got {value!r}")
        if not self.error_statuses or any(
            not isinstance(s, int) or not 500 <= s <= 599 for s in self.error_statuses
        ):
            raise ValueError(
                "faults.error_statuses: expected a non-empty tuple of 5xx codes, "
                f"got {self.error_statuses!r}"
            )


@dataclass
class Response:
    status: int
    body: Any  # JSON-able, or bytes sent as they are
    headers: dict[str, str] | None = None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: every answer carries Content-Length
    server_version = "ConveyorFake/1.0"
    timeout = 60  # seconds an idle keep-alive connection may stay open
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed ACK
    server: _HTTPServer

    def do_GET(self) -> None:
        self.server.app._handle(self, "GET")

    def do_POST(self) -> None:
        self.server.app._handle(self, "POST")

    def do_PUT(self) -> None:
        self.server.app._handle(self, "PUT")

    def do_DELETE(self) -> None:
        self.server.app._handle(self, "DELETE")

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.app.verbose:
            super().log_message(format, *args)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # listen backlog: hundreds of clients may connect at once
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], app: FakeServer) -> None:
        self.app = app
        self.connections: set[socket.socket] = set()
        self._conn_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._conn_lock:
            self.connections.add(request)
            self.app.connections_opened += 1
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._conn_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that hang up mid-answer (timeouts in tests) are expected, not noteworthy.
        if self.app.verbose:
            super().handle_error(request, client_address)


class FakeServer:
    """Base class: a local HTTP server with injected latency and faults.

    Use as a context manager (``with MessagesServer() as srv: srv.url``) or call ``start()``
    and ``stop()``. ``rate_limit`` is requests per scenario second (the real rate is
    ``rate_limit / time_scale``); beyond it the answer is 429 with ``Retry-After``.

    ``capacity`` and ``per_minute`` are a ``simulators.Provider``'s: up to ``capacity``
    requests in flight at the sampled latency, slower beyond (latency * in_flight /
    capacity); per-minute buckets ("requests": 1 per request, "tokens": ``tokens_of``) in
    scenario minutes, a request that does not fit answered 429 at once, taking nothing. With
    ``per_minute``, every answer to a served route (200s too) carries
    ``x-ratelimit-limit-*``, ``x-ratelimit-remaining-*`` and ``x-ratelimit-reset-*`` (real
    time, as ``"6m0s"``/``"12ms"``) per dimension.

    ``requests_seen`` / ``requests_served`` count, per request identity (``identity()``:
    e.g. the contact), the requests routed to ``answer`` and those admitted past the limits.
    """

    default_name = "fake"

    def __init__(
        self,
        latency: LatencyArg = None,
        seed: int = 0,
        time_scale: float = 1.0,
        error_rate: float = 0.0,
        rate_limit: float | None = None,
        faults: ServerFaults | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        name: str | None = None,
        burst: int | None = None,
        capacity: int | None = None,
        per_minute: Mapping[str, float] | None = None,
        verbose: bool = False,
    ) -> None:
        self.latency = as_distribution(latency)
        check_seed_and_scale(seed, time_scale)
        faults = faults if faults is not None else ServerFaults()
        error_rate = _rate(error_rate, "error_rate")
        if error_rate:
            if faults.error_rate and faults.error_rate != error_rate:
                raise ValueError(
                    "error_rate: given both as an argument and in faults, with different values"
                )
            faults = replace(faults, error_rate=error_rate)
        self.faults = faults
        self.seed = seed
        self.time_scale = float(time_scale)
        self.name = name or self.default_name
        self.host = host
        self.verbose = verbose
        self._port = port
        self._bucket: TokenBucket | None = None
        if rate_limit is not None:
            if (
                isinstance(rate_limit, bool)
                or not isinstance(rate_limit, int | float)
                or not (math.isfinite(rate_limit) and rate_limit > 0)
            ):
                raise ValueError(f"rate_limit: expected a number > 0, got {rate_limit!r}")
            if burst is None:
                burst = max(1, math.floor(rate_limit))
            real_rate = rate_limit / self.time_scale if self.time_scale > 0 else math.inf
            self._bucket = TokenBucket(real_rate, burst)
        self.rate_limit = rate_limit
        self.capacity = _check_capacity(capacity)
        self.per_minute = _check_per_minute(per_minute)
        if self.per_minute and self.time_scale == 0:
            raise ValueError("time_scale: must be > 0 with per_minute limits (they need a clock)")
        self._limits = RateLimits(self.per_minute) if self.per_minute else None
        self._epoch: float | None = None
        self._in_flight = 0
        #: per request identity: requests routed to ``answer`` / admitted past the limits
        self.requests_seen: dict[str, int] = {}
        self.requests_served: dict[str, int] = {}
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._draws: BlockCache[tuple[list[float], list[float]]] = BlockCache(self._make_block, 256)
        self._stop = threading.Event()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        #: requests answered, by outcome ("ok", "5xx", "429", "malformed", "drip", "drop",
        #: "rate_limited", or the status of an answer sent at once, e.g. "404")
        self.stats: dict[str, int] = {}
        #: TCP connections accepted (keep-alive clients open few)
        self.connections_opened = 0

    # ------------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("server not started")
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("server not started")
        return int(self._httpd.server_address[1])

    def start(self) -> Self:
        if self._httpd is not None:
            raise RuntimeError("server already started")
        self._stop.clear()
        self._httpd = _HTTPServer((self.host, self._port), self)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"{type(self).__name__}:{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving: interrupt sleeping handlers, close open connections, join threads."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._stop.set()
        httpd.shutdown()
        with httpd._conn_lock:
            conns = list(httpd.connections)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        httpd.server_close()  # joins the handler threads
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reset(self) -> None:
        """Forget per-key request counts, rate-limit state and stats (a fresh run)."""
        with self._lock:
            self._counts.clear()
            self.stats.clear()
            self.requests_seen.clear()
            self.requests_served.clear()
            self._epoch = None
            if self._bucket is not None:
                self._bucket.reset()
            if self._limits is not None:
                self._limits.reset_all()

    # ------------------------------------------------------------------ per-request draws
    def _make_block(self, attempt: int, block: int) -> tuple[list[float], list[float]]:
        lat, u = draw_block(self.latency, self.seed, self.name, attempt, block)
        return lat.tolist(), u.tolist()

    @staticmethod
    def key_index(key: str) -> int:
        """The "item index" of a request key: the number itself for a numeric id."""
        if key.isdigit() and len(key) < 12:
            return int(key)
        return stable_hash(key)

    def draw(self, key: str) -> tuple[float, float]:
        """(latency in scenario seconds, fault uniform) for the next request with ``key``."""
        with self._lock:
            attempt = self._counts.get(key, 0) + 1
            self._counts[key] = attempt
        index = self.key_index(key)
        lat, u = self._draws.get(attempt, index >> BLOCK_SHIFT)
        off = index & ((1 << BLOCK_SHIFT) - 1)
        return lat[off], u[off]

    def _count(self, outcome: str) -> None:
        with self._lock:
            self.stats[outcome] = self.stats.get(outcome, 0) + 1

    # ------------------------------------------------------------------ subclass hooks
    def route(self, method: str, path: str, body: bytes) -> tuple[str, Any] | Response:
        """Return (request key, parsed request) to serve, or a Response to send at once."""
        raise NotImplementedError

    def answer(self, key: str, request: Any) -> Response:
        """The normal (fault-free) answer."""
        raise NotImplementedError

    def error_body(self, status: int, message: str, kind: str) -> Any:
        return {"error": {"message": message, "type": kind, "code": status}}

    def identity(self, key: str, request: Any) -> str:
        """Who a request is for (counted in ``requests_seen``/``requests_served``)."""
        return key

    def tokens_of(self, key: str, request: Any) -> float:
        """What a request takes from the "tokens" bucket."""
        return 0.0

    def calls(self, identity: str) -> int:
        """Requests admitted past the limits for ``identity`` (the calls that cost)."""
        with self._lock:
            return self.requests_served.get(identity, 0)

    # ------------------------------------------------------------------ capacity and limits
    def _admit(self, key: str, request: Any) -> tuple[Response | None, dict[str, str]]:
        """Count the request and take it from the limits: (a 429 or None, limit headers)."""
        who = self.identity(key, request)
        with self._lock:
            self.requests_seen[who] = self.requests_seen.get(who, 0) + 1
            if self._bucket is not None:
                wait = self._bucket.acquire(time.monotonic())
                if wait > 0:
                    return self._too_many(wait, "rate limit exceeded"), {}
            limits = self._limits
            if limits is None:
                self.requests_served[who] = self.requests_served.get(who, 0) + 1
                self._in_flight += 1
                return None, {}
            t = time.monotonic()
            if self._epoch is None:
                self._epoch = t
            now = (t - self._epoch) / self.time_scale
            tokens = self.tokens_of(key, request)
            wait = limits.admit(now, {"requests": 1.0, "tokens": tokens})
            headers = self._limit_headers(limits)
            if wait > 0:
                over = [d for d, cap in limits.capacity.items()
                        if {"requests": 1.0, "tokens": tokens}.get(d, 0.0) > cap]
                why = (f"Request too large: {tokens:g} tokens exceed the limit of "
                       f"{limits.capacity['tokens']:g} per minute" if over
                       else "Rate limit reached for requests or tokens per minute")
                resp = self._too_many(wait * self.time_scale, why)
                return resp, headers
            self.requests_served[who] = self.requests_served.get(who, 0) + 1
            self._in_flight += 1
            return None, headers

    def _limit_headers(self, limits: RateLimits) -> dict[str, str]:
        remaining, reset = limits.remaining(), limits.reset_in()
        out: dict[str, str] = {}
        for d, cap in limits.capacity.items():
            out[f"x-ratelimit-limit-{d}"] = f"{cap:g}"
            out[f"x-ratelimit-remaining-{d}"] = str(int(remaining[d]))
            out[f"x-ratelimit-reset-{d}"] = go_duration(reset[d] * self.time_scale)
        return out

    def _slowdown(self) -> float:
        """The latency factor of a request just admitted (``_in_flight`` includes it)."""
        cap = self.capacity
        with self._lock:
            n = self._in_flight
        return n / cap if cap is not None and n > cap else 1.0

    def _release(self) -> None:
        with self._lock:
            self._in_flight -= 1

    # ------------------------------------------------------------------ request handling
    def _handle(self, h: _Handler, method: str) -> None:
        try:
            length = int(h.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            self._send(
                h,
                Response(400, self.error_body(400, "bad Content-Length", "invalid_request_error")),
            )
            h.close_connection = True
            return
        body = h.rfile.read(length) if length else b""
        routed = self.route(method, h.path, body)
        if isinstance(routed, Response):
            self._count(str(routed.status))
            self._send(h, routed)
            return
        key, request = routed
        refused, headers = self._admit(key, request)
        if refused is not None:
            self._count("rate_limited")
            self._send(h, _with(refused, headers))
            return
        try:
            factor = self._slowdown()
            latency, u = self.draw(key)
            if self._sleep(latency * factor * self.time_scale):
                h.close_connection = True
                return
        finally:
            self._release()
        self._serve(h, key, request, u, headers)

    def _serve(self, h: _Handler, key: str, request: Any, u: float,
               headers: dict[str, str]) -> None:
        f = self.faults
        edge = f.error_rate
        if u < edge:
            status = f.error_statuses[int(u * 1_000_003) % len(f.error_statuses)]
            self._count("5xx")
            self._send(
                h,
                _with(Response(status, self.error_body(status, "simulated server error",
                                                       "server_error")), headers),
            )
            return
        edge += f.throttle_rate
        if u < edge:
            self._count("429")
            self._send(h, _with(self._too_many(f.retry_after * self.time_scale,
                                               "simulated throttling"), headers))
            return
        edge += f.malformed_rate
        if u < edge:
            self._count("malformed")
            good = json.dumps(self.answer(key, request).body).encode()
            # a body cut in half, as from a proxy that dropped the upstream mid-answer
            self._send(h, _with(Response(200, good[: max(1, len(good) // 2)]), headers))
            return
        edge += f.slow_drip_rate
        if u < edge:
            self._count("drip")
            self._drip(h, _with(self.answer(key, request), headers),
                       f.drip_seconds * self.time_scale)
            return
        edge += f.drop_rate
        if u < edge:
            self._count("drop")
            h.close_connection = True
            with contextlib.suppress(OSError):
                h.connection.shutdown(socket.SHUT_RDWR)
            return
        self._count("ok")
        self._send(h, _with(self.answer(key, request), headers))

    def _too_many(self, wait: float, message: str) -> Response:
        body = self.error_body(429, message, "rate_limit_exceeded")
        if isinstance(body, dict):
            body["retry_after"] = wait
        headers = {
            # RFC 9110 allows whole seconds only; clients that can use more precision (openai's)
            # read retry-after-ms.
            "Retry-After": str(max(1, math.ceil(wait))) if wait > 0 else "0",
            "retry-after-ms": str(max(0, round(wait * 1000))),
        }
        return Response(429, body, headers)

    def _sleep(self, seconds: float) -> bool:
        """Sleep unless the server stops meanwhile; True if it stopped."""
        if seconds <= 0:
            return self._stop.is_set()
        return self._stop.wait(seconds)

    @staticmethod
    def _encode(resp: Response) -> bytes:
        if isinstance(resp.body, bytes):
            return resp.body
        return json.dumps(resp.body, separators=(",", ":")).encode()

    def _head(self, h: _Handler, resp: Response, data: bytes) -> None:
        h.send_response(resp.status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        for k, v in (resp.headers or {}).items():
            h.send_header(k, v)
        h.end_headers()

    def _send(self, h: _Handler, resp: Response) -> None:
        data = self._encode(resp)
        try:
            self._head(h, resp, data)
            h.wfile.write(data)
        except OSError:
            h.close_connection = True

    def _drip(self, h: _Handler, resp: Response, seconds: float, chunks: int = 10) -> None:
        data = self._encode(resp)
        step = max(1, math.ceil(len(data) / chunks))
        pieces = [data[i : i + step] for i in range(0, len(data), step)]
        try:
            self._head(h, resp, data)
            h.wfile.flush()
            for piece in pieces:
                if self._sleep(seconds / len(pieces)):
                    h.close_connection = True
                    return
                h.wfile.write(piece)
                h.wfile.flush()
        except OSError:
            h.close_connection = True


def _with(resp: Response, headers: Mapping[str, str]) -> Response:
    """``resp`` with ``headers`` added (its own win)."""
    if not headers:
        return resp
    return replace(resp, headers={**headers, **(resp.headers or {})})
