"""A scripted HTTP server on 127.0.0.1 for adapter tests: each request is answered by a
function of the test's choosing, so every status, header, body and failure is exact.

    def reply(req: Request) -> Reply: ...
    with ScriptedServer(reply) as srv:
        srv.url, srv.requests, srv.connections

``Reply(status, body, headers)``; ``Reply.drop()`` closes the connection without answering;
``Reply(..., delay=s)`` answers after ``s`` seconds. The simulators' fake servers exercise the
realistic paths; this one pins down the edge cases.
"""
from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    client: tuple[str, int]

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Reply:
    status: int = 200
    body: bytes | str | Any = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    drop_connection: bool = False

    @classmethod
    def drop(cls) -> Reply:
        return cls(drop_connection=True)

    @classmethod
    def json(cls, obj: Any, status: int = 200, **headers: str) -> Reply:
        return cls(status, json.dumps(obj).encode(),
                   {"Content-Type": "application/json", **headers})


class ScriptedServer:
    def __init__(self, reply: Callable[[Request], Reply]) -> None:
        self.reply = reply
        self.requests: list[Request] = []
        self.connections: set[tuple[str, int]] = set()
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, so connection reuse is observable
            disable_nagle_algorithm = True  # no 40 ms delayed-ACK stalls on loopback
            wbufsize = 1 << 16  # headers and body in one segment (flushed per request)

            def log_message(self, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                headers = {k.lower(): v for k, v in self.headers.items()}
                req = Request(self.command, self.path, headers,
                              self.rfile.read(n) if n else b"", self.client_address)
                with outer._lock:
                    outer.requests.append(req)
                    outer.connections.add(self.client_address)
                r = outer.reply(req)
                if r.delay:
                    time.sleep(r.delay)
                if r.drop_connection:
                    self.close_connection = True
                    self.wfile.flush()
                    self.connection.shutdown(2)
                    return
                body = r.body
                if not isinstance(body, bytes | str):
                    body = json.dumps(body)
                if isinstance(body, str):
                    body = body.encode()
                self.send_response(r.status)
                for k, v in r.headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.02}, daemon=True)

    def __enter__(self) -> ScriptedServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
