"""Fetch stage over ``requests``: GET a contact's messages from a REST API.

Connection reuse -- one ``Session`` per worker thread
-----------------------------------------------------
``HttpFetch`` keeps one ``requests.Session`` per thread that calls it (a ``threading.local``),
created on the thread's first call, each with a one-connection pool to the API host. A stage with
``concurrency=50`` runs on 50 worker threads, so it holds exactly 50 keep-alive connections, the
stage limit, and never opens a throwaway connection.

Why not one shared Session with ``pool_maxsize >= concurrency``? It would hold the same number
of connections, but requests does not promise that a Session is thread-safe (psf/requests#2766,
#1871: the maintainers' advice is one Session per thread), and a pool sized wrong fails quietly
-- urllib3 opens and discards extra connections, paying a TCP handshake per call. A Session per
thread needs no sizing and no locks, works on any thread executor (no ``Stage(init=...)``
needed, so the adapter is an ordinary ``fn(value) -> value``), and ``close()`` closes them all.
Sessions of threads that have exited are closed when the next one is created, so repeated runs
on fresh worker threads do not pile up idle connections.

Errors (see ``_errors``)
------------------------
* 429, 408 and 5xx -> ``TransientError`` with ``retry_after`` from the ``Retry-After`` header
  (or ``retry-after-ms``, OpenAI-style millisecond precision, when the server sends it);
* timeouts, refused/dropped connections, truncated bodies -> ``TransientError``;
* a 2xx body that is not JSON -> ``TransientError`` (a glitch more often than not);
* any other 4xx, or JSON of the wrong shape -> ``PermanentError``.
Use ``RetryPolicy(retry_on=RETRYABLE)`` so permanent errors fail the item without retries.
Error messages name the method, status and URL path -- never headers (which may hold a token)
or the query string.

``AsyncHttpFetch`` (``engine.adapters._async``) is the same stage over ``httpx2.AsyncClient``
(the HTTP client the openai SDK itself is built on), with the same errors.
"""
from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter

from ._errors import PermanentError, TransientError, retry_after_from, truncate
from ._records import Contact, Fetched, contact_id

__all__ = ["HttpFetch"]

_TRANSIENT_STATUS = frozenset({408, 429})


class HttpFetch:
    """Stage callable ``Contact | int -> Fetched``: GET ``base_url + path.format(id=...)``.

    ``timeout`` is ``(connect, read)`` seconds. ``headers`` are sent with every request (put an
    ``Authorization`` header here; it is never included in errors). ``retry_after_scale``
    multiplies the server's ``Retry-After`` (e.g. a benchmark's ``time_scale`` when the server
    speaks in scenario seconds). ``trust_env`` is requests' own switch for proxy variables and
    ``.netrc`` (measured here: ~0.03 ms of CPU per call when on). The response may be a JSON
    list of messages or an object with a ``"messages"`` list; the body is decoded as UTF-8
    with invalid bytes replaced, so one stray byte in a message does not lose the contact.
    """

    def __init__(
        self,
        base_url: str,
        *,
        path: str = "/contacts/{id}/messages",
        timeout: tuple[float, float] = (3.05, 30.0),
        headers: Mapping[str, str] | None = None,
        retry_after_scale: float = 1.0,
        trust_env: bool = True,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"HttpFetch.base_url: expected an http(s) URL, got {base_url!r}")
        if "{id}" not in path:
            raise ValueError(f"HttpFetch.path: expected a template with '{{id}}', got {path!r}")
        if len(timeout) != 2 or min(timeout) <= 0:
            raise ValueError(f"HttpFetch.timeout: expected (connect, read) > 0, got {timeout!r}")
        self._template = base_url.rstrip("/") + "/" + path.lstrip("/")
        self._timeout = (float(timeout[0]), float(timeout[1]))
        self._headers = {"Accept": "application/json", **(headers or {})}
        self._retry_after_scale = retry_after_scale
        self._trust_env = trust_env
        self._local = threading.local()
        self._lock = threading.Lock()
        self._sessions: dict[threading.Thread, requests.Session] = {}
        self._closed = False

    # -- sessions -------------------------------------------------------------------------------
    def session(self) -> requests.Session:
        """This thread's Session (created on first use)."""
        s: requests.Session | None = getattr(self._local, "session", None)
        if s is None:
            s = self._new_session()
            self._local.session = s
        return s

    def _new_session(self) -> requests.Session:
        s = requests.Session()
        s.headers.update(self._headers)
        s.trust_env = self._trust_env
        # One connection: a worker thread makes one call at a time. No urllib3 retries: the
        # engine's RetryPolicy is the only retry loop.
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=1, max_retries=0)
        s.mount("http://", adapter)
        s.mount("https://", adapter)
        with self._lock:
            if self._closed:
                s.close()
                raise RuntimeError("HttpFetch is closed")
            for t in [t for t in self._sessions if not t.is_alive()]:
                self._sessions.pop(t).close()
            self._sessions[threading.current_thread()] = s
        return s

    def close(self) -> None:
        """Close every thread's Session and its connections."""
        with self._lock:
            self._closed = True
            sessions, self._sessions = list(self._sessions.values()), {}
        for s in sessions:
            s.close()

    def __enter__(self) -> HttpFetch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- calls ----------------------------------------------------------------------------------
    def __call__(self, item: Contact | int) -> Fetched:
        cid = contact_id(item)
        url = self._template.format(id=cid)
        return _fetched(item, cid, url, self.get_json(url))

    def get_json(self, url: str) -> Any:
        """GET ``url`` and return its decoded JSON body, or raise Transient/PermanentError."""
        try:
            resp = self.session().get(url, timeout=self._timeout)
            content = resp.content  # read the body inside the try: a drop here is transient
        except requests.Timeout as exc:
            raise TransientError(f"GET {_path(url)}: timed out ({type(exc).__name__})") from exc
        except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError,
                requests.exceptions.ContentDecodingError) as exc:
            raise TransientError(f"GET {_path(url)}: connection failed ({type(exc).__name__})") \
                from exc
        except requests.RequestException as exc:  # invalid URL and the like: config errors
            raise PermanentError(f"GET {_path(url)}: {type(exc).__name__}") from exc
        return _decode(url, resp.status_code, resp.reason, resp.headers, content,
                       self._retry_after_scale)


def _fetched(item: Contact | int, cid: int, url: str, body: Any) -> Fetched:
    """The ``Fetched`` of a decoded body: a JSON list of messages or ``{"messages": [...]}``."""
    contact = item if isinstance(item, Contact) else Contact(id=cid)
    messages = body.get("messages") if isinstance(body, dict) else body
    if not isinstance(messages, list):
        raise PermanentError(
            f"GET {_path(url)}: expected a JSON list of messages "
            f"or an object with 'messages', got {truncate(json.dumps(body), 200)}"
        )
    return Fetched(contact=contact, messages=tuple(messages))


def _decode(url: str, status: int, reason: str, headers: Mapping[str, str], content: bytes,
            retry_after_scale: float) -> Any:
    """A complete response's JSON body, or the Transient/PermanentError its status says
    (shared by ``HttpFetch`` and ``AsyncHttpFetch``)."""
    if status >= 500 or status in _TRANSIENT_STATUS:
        retry_after = retry_after_from(headers, scale=retry_after_scale)
        hint = f", retry after {retry_after:g}s" if retry_after is not None else ""
        raise TransientError(f"GET {_path(url)}: HTTP {status} {reason}{hint}",
                             retry_after=retry_after, status=status)
    if status >= 400:
        raise PermanentError(
            f"GET {_path(url)}: HTTP {status} {reason}: "
            f"{truncate(content.decode('utf-8', 'replace'), 200)}", status=status)
    text = content.decode("utf-8", "replace")
    try:
        return json.loads(text)
    except ValueError as exc:
        # Complete (Content-Length matched) but not JSON: a truncating proxy or a server
        # glitch far more often than a body that will never parse, so it is retried; a
        # server that always answers garbage costs `attempts` calls, then the item fails.
        raise TransientError(
            f"GET {_path(url)}: HTTP {status} body is not JSON ({exc}): "
            f"{truncate(text, 200)!r}", status=status) from None


def _path(url: str) -> str:
    """The URL without credentials or query string (either might carry a secret)."""
    p = urlsplit(url)
    netloc = p.netloc.rpartition("@")[2]
    return f"{p.scheme}://{netloc}{p.path}"
