"""Async variants of the adapters, for ``async def`` stages (DESIGN §13): one event loop runs
thousands of calls in flight without a thread each.

* ``AsyncLLMAnalyze`` -- ``LLMAnalyze`` over ``openai.AsyncOpenAI``: the same prompt, request,
  ``estimate``, budget feeding (``x-ratelimit-*`` of every response through the raw-response
  API), usage charge, errors and scrubbing; ``await llm(fetched)`` gives the same ``Analyzed``.
  It posts ``create()``'s request itself, without the SDK's per-call parameter transform
  (~0.6 ms of CPU a call; see ``_direct_post_options``).
* ``AsyncHttpFetch`` -- ``HttpFetch`` over ``httpx2.AsyncClient`` (the HTTP client the openai
  SDK is built on, so no new dependency): the same URL template, decoding and errors.

Both adapters' own connection pools look each connection's socket up once (``_cache_sockets``):
httpcore asks every idle pooled connection "did the server close you?" before every request,
and anyio answered by rebuilding its attributes, a ``getpeername`` each time (a fifth of the
load benchmark's CPU).

One client per event loop
-------------------------
An async HTTP client's connections belong to the event loop that opened them; used from another
loop (a second ``asyncio.run``, the next run's loop) it fails with "Event loop is closed". So
each adapter keeps one client per running loop, created on the loop's first call, with a
connection pool of ``concurrency`` keep-alive connections (the stage limit: every coroutine in
flight has its connection). A loop's client is closed when that loop shuts down
(``asyncio.run``'s end, the end of an engine run: both finalize async generators, and each
client is watched by one), so an adapter used as a plain async stage function, run after run,
leaves no connection open. ``await adapter.aclose()`` (or ``async with``) closes the current
loop's client at once; ``close()`` closes every client it still can, from any thread. After
either, calls raise ``RuntimeError``. A caller's own ``AsyncOpenAI`` (``client=``) is used as it
is, on whatever loop the caller runs it (its retries turned off).
"""
from __future__ import annotations

import asyncio
import contextlib
import select
import threading
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from typing import Any, Generic, TypeVar
from urllib.parse import urlsplit

import httpcore2
import httpx2
import openai
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from .._budget import Budget
from ._errors import PermanentError, TransientError
from ._records import Analysis, Analyzed, Contact, Fetched, contact_id
from .http import _decode, _fetched, _path
from .llm import DEFAULT_OUTPUT_ESTIMATE, _LLMBase

__all__ = ["AsyncHttpFetch", "AsyncLLMAnalyze"]

C = TypeVar("C")


class _PerLoop(Generic[C]):
    """One client per running event loop (see the module's docstring).

    Each client comes with a suspended async generator whose ``finally`` closes it; the loop
    knows it (asyncio's async-generator hooks), so ``loop.shutdown_asyncgens()`` -- which
    ``asyncio.run`` and the engine's event-loop thread both call before closing their loop --
    closes the client and its connections on the loop they belong to, with no call from the
    user. The generator is held here: the loop only keeps a weak reference."""

    def __init__(self, owner: str, make: Callable[[], C],
                 close: Callable[[C], Awaitable[None]],
                 start: Callable[[C], Awaitable[None]] | None = None) -> None:
        self._owner = owner
        self._make = make
        self._close = close
        self._start = start  # awaited before the client is handed out (a pool's set-up)
        self._clients: dict[asyncio.AbstractEventLoop, tuple[C, AsyncGenerator[None, None]]] = {}
        self._starting: dict[asyncio.AbstractEventLoop, asyncio.Future[C]] = {}
        self._lock = threading.Lock()
        self._closed = False

    def current(self) -> C | None:
        """The running loop's client if it has one (no coroutine: the calls' fast path)."""
        entry = self._clients.get(asyncio.get_running_loop())
        return None if entry is None else entry[0]

    async def get(self) -> C:
        loop = asyncio.get_running_loop()
        entry = self._clients.get(loop)
        if entry is not None:
            return entry[0]
        while (starting := self._starting.get(loop)) is not None:  # another call opens it
            try:
                return await asyncio.shield(starting)
            except asyncio.CancelledError:
                if not starting.cancelled():
                    raise  # this call was cancelled
                # the opening call was cancelled: try again (perhaps as the opener)
        with self._lock:  # never held across an await
            if self._closed:
                raise RuntimeError(f"{self._owner} is closed")
            entry = self._clients.get(loop)
            if entry is not None:
                return entry[0]
            # a closed loop has closed its client at shutdown (or can no longer): let it go
            for dead in [lp for lp in self._clients if lp.is_closed()]:
                del self._clients[dead]
            client = self._make()
            if self._start is None:
                closer = self._closer(client)
                self._clients[loop] = (client, closer)
        if self._start is not None:
            return await self._open(loop, client)
        await closer.__anext__()  # first step: the loop now finalizes it at shutdown
        return client

    async def _open(self, loop: asyncio.AbstractEventLoop, client: C) -> C:
        """Set ``client`` up (``start``) while later calls on the loop wait for it."""
        assert self._start is not None
        fut: asyncio.Future[C] = loop.create_future()
        self._starting[loop] = fut
        try:
            await self._start(client)
        except BaseException as exc:
            del self._starting[loop]
            if isinstance(exc, asyncio.CancelledError):
                fut.cancel()
            else:
                fut.set_exception(exc)
                fut.exception()  # retrieved: no "never retrieved" warning without waiters
            raise
        closer = self._closer(client)
        with self._lock:
            del self._starting[loop]
            closed = self._closed
            if not closed:
                self._clients[loop] = (client, closer)
        if closed:  # closed while it was being set up
            with contextlib.suppress(Exception):
                await self._close(client)
            error = RuntimeError(f"{self._owner} is closed")
            fut.set_exception(error)
            fut.exception()
            raise error
        await closer.__anext__()
        fut.set_result(client)
        return client

    async def _closer(self, client: C) -> AsyncGenerator[None, None]:
        try:
            yield
        finally:
            with contextlib.suppress(Exception):  # a failing close must not break shutdown
                await self._close(client)

    def clients(self) -> list[C]:
        """The clients open now (one per loop)."""
        with self._lock:
            return [c for c, _ in self._clients.values()]

    async def aclose(self) -> None:
        """Close the running loop's client (the others as :meth:`close` does)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            self._closed = True
            mine = self._clients.pop(loop, None)
        if mine is not None:
            await mine[1].aclose()
        self.close()

    def close(self) -> None:
        """Close every client that can still be closed: a loop's that runs on another thread
        (waiting for it), an idle loop's (running it), the current thread's running loop's
        (scheduled on it); a closed loop's client is dropped."""
        with self._lock:
            self._closed = True
            entries, self._clients = list(self._clients.items()), {}
        try:
            current: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        for loop, (_, closer) in entries:
            if loop.is_closed():
                continue
            if loop is current:
                loop.create_task(closer.aclose())
            elif loop.is_running():
                fut = asyncio.run_coroutine_threadsafe(closer.aclose(), loop)
                try:
                    fut.result(timeout=5.0)
                except Exception:
                    fut.cancel()
            else:
                with contextlib.suppress(Exception):  # e.g. the loop started meanwhile
                    loop.run_until_complete(closer.aclose())


class AsyncLLMAnalyze(_LLMBase):
    """Stage callable ``async (Fetched) -> Analyzed`` over ``openai.AsyncOpenAI``.

    The arguments, ``estimate``, budget feeding, usage charge and errors are
    :class:`~engine.adapters.LLMAnalyze`'s; ``concurrency`` sizes each event loop's connection
    pool (one coroutine, one connection)::

        llm = AsyncLLMAnalyze(base_url=..., api_key=..., model=..., budget=openai_budget)
        Stage("analyze", llm, concurrency=200, budget=openai_budget, cost=llm.estimate)
    """

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str,
        model: str,
        timeout: float = 60.0,
        concurrency: int = 50,
        max_input_chars: int = 12_000,
        max_output_tokens: int | None = DEFAULT_OUTPUT_ESTIMATE,
        temperature: float | None = 0.0,
        retry_after_scale: float = 1.0,
        budget: Budget | None = None,
        client: openai.AsyncOpenAI | None = None,
    ) -> None:
        super().__init__(api_key=api_key, model=model, concurrency=concurrency,
                         max_input_chars=max_input_chars, max_output_tokens=max_output_tokens,
                         temperature=temperature, retry_after_scale=retry_after_scale,
                         budget=budget)
        self._base_url = base_url
        self._timeout = timeout
        # a caller's client: keep its settings, but never let it retry on its own
        self._own = client.with_options(max_retries=0) if client is not None else None
        self._clients: _PerLoop[openai.AsyncOpenAI] = _PerLoop(
            type(self).__name__, self._new_client, _close_openai)
        self._post_options = _direct_post_options(self._create_kwargs("x"))

    def _new_client(self) -> openai.AsyncOpenAI:
        limits = type(openai.DEFAULT_CONNECTION_LIMITS)(
            max_connections=self._concurrency, max_keepalive_connections=self._concurrency)
        http = openai.DefaultAsyncHttpxClient(limits=limits, timeout=self._timeout)
        _cache_sockets(http)
        return openai.AsyncOpenAI(
            api_key=self._api_key, base_url=self._base_url, timeout=self._timeout,
            max_retries=0, http_client=http,
        )

    async def client(self) -> openai.AsyncOpenAI:
        """The running event loop's client (created on first use)."""
        if self._own is not None:
            return self._own
        return self._clients.current() or await self._clients.get()

    async def aclose(self) -> None:
        if self._own is not None:
            await self._own.close()
        await self._clients.aclose()

    def close(self) -> None:
        self._clients.close()

    async def __aenter__(self) -> AsyncLLMAnalyze:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- calls ----------------------------------------------------------------------------------
    async def __call__(self, fetched: Fetched) -> Analyzed:
        return self._analyzed(fetched, await self.analyze(self.prompt(fetched)))

    async def analyze(self, user_text: str) -> Analysis:
        """One chat completion; returns the parsed ``Analysis`` or raises an adapter error."""
        try:
            client = self._own
            if client is None:
                client = self._clients.current() or await self._clients.get()
            options = self._post_options
            raw: Any
            if options is not None:  # create()'s request, without its per-call transform
                raw = await client.post(
                    "/chat/completions", body=self._create_kwargs(user_text),
                    options=options, cast_to=ChatCompletion, stream=False,
                    stream_cls=openai.AsyncStream[ChatCompletionChunk])
            else:
                raw = await client.chat.completions.with_raw_response.create(
                    **self._create_kwargs(user_text))
            self._feed(raw.headers)
            completion = raw.parse()
        except Exception as exc:
            error = self._translate(exc)
            if error is exc:
                raise
        else:
            return self._result(completion)
        raise error  # outside the except block: see LLMAnalyze._translate


def _direct_post_options(sample: dict[str, Any]) -> Any:
    """The request options under which ``client.post("/chat/completions", body=...)`` sends
    what ``chat.completions.with_raw_response.create(**body)`` sends, or None (use create).

    ``create()`` runs its parameters through the SDK's TypedDict transform on every call:
    measured at ~0.6 ms of CPU per call with this adapter's request (the messages' union types
    and the JSON schema are walked key by key), about a tenth of the whole job's CPU per
    contact. For this request the transform is the identity (plain strings, numbers and a
    dict schema: no aliases, no dates, no files), so the adapter posts the same body on the
    same client method ``create`` ends in, with the options ``create`` gives it (bearer
    auth, the raw-response header). Checked once here, on a sample request: if this SDK's
    transform changes the body, or its request helpers differ, the adapter calls
    ``create`` as before."""
    try:
        from openai._base_client import make_request_options
        from openai._constants import RAW_RESPONSE_HEADER
        from openai._utils import maybe_transform
        from openai.types.chat import completion_create_params

        if maybe_transform(sample, completion_create_params.CompletionCreateParamsNonStreaming
                           ) != sample:
            return None
        return make_request_options(extra_headers={RAW_RESPONSE_HEADER: "true"},
                                    security={"bearer_auth": True})  # as create() has it
    except Exception:  # another SDK version: its create() it is
        return None


def _readable(sock: Any) -> bool:
    """httpcore's test for a server-closed idle connection: is its socket readable now?"""
    fd = sock.fileno()
    if fd < 0:  # closed: as good as a disconnect
        return True
    if not hasattr(select, "poll"):  # pragma: no cover - Windows
        return bool(select.select([fd], [], [], 0)[0])
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(0))


class _SocketCachingStream(httpcore2.AsyncNetworkStream):
    """A connection's network stream whose socket is looked up once, when it connects.

    Before every request, and again when every response is closed, httpcore's connection pool
    asks each idle connection whether the server has closed it (``get_extra_info
    ("is_readable")``: a poll of its socket). The anyio stream finds that socket by building
    its dict of typed attributes anew, with a ``getpeername`` system call, on every lookup:
    5.8 us a check against 0.9 us for the poll alone. With 50 pooled connections that is
    ~50 checks a request, ~200,000 for the load benchmark's 2,000 contacts: measured at ~2 s
    of CPU, a fifth of the job's. This stream answers the same question with the same poll
    on the socket it looked up at connect time; everything else is the wrapped stream's."""

    __slots__ = ("_sock", "_stream")

    def __init__(self, stream: httpcore2.AsyncNetworkStream) -> None:
        self._stream = stream
        self._sock = stream.get_extra_info("socket")

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return await self._stream.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._stream.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def start_tls(self, ssl_context: Any, server_hostname: str | None = None,
                        timeout: float | None = None) -> httpcore2.AsyncNetworkStream:
        return _SocketCachingStream(
            await self._stream.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable" and self._sock is not None:
            return _readable(self._sock)
        return self._stream.get_extra_info(info)


class _SocketCachingBackend(httpcore2.AsyncNetworkBackend):
    """The pool's network backend, its streams wrapped in :class:`_SocketCachingStream`."""

    def __init__(self, inner: httpcore2.AsyncNetworkBackend) -> None:
        self._inner = inner

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: Any = None) -> httpcore2.AsyncNetworkStream:
        return _SocketCachingStream(await self._inner.connect_tcp(
            host, port, timeout=timeout, local_address=local_address,
            socket_options=socket_options))

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Any = None) -> httpcore2.AsyncNetworkStream:
        return _SocketCachingStream(await self._inner.connect_unix_socket(
            path, timeout=timeout, socket_options=socket_options))

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def _cache_sockets(client: httpx2.AsyncClient) -> None:
    """Give ``client``'s own connection pool (not a proxy's) socket-caching streams, before it
    opens a connection. httpx2 takes no network backend, so this sets the pool's (private
    ``_transport._pool._network_backend``); on another httpx2 it does nothing."""
    pool: Any = getattr(getattr(client, "_transport", None), "_pool", None)
    inner = getattr(pool, "_network_backend", None)
    if (isinstance(pool, httpcore2.AsyncConnectionPool)
            and isinstance(inner, httpcore2.AsyncNetworkBackend)
            and not isinstance(inner, _SocketCachingBackend)):
        pool._network_backend = _SocketCachingBackend(inner)


async def _close_openai(client: openai.AsyncOpenAI) -> None:
    await client.close()


async def _close_httpx(client: httpx2.AsyncClient) -> None:
    await client.aclose()


class AsyncHttpFetch:
    """Stage callable ``async (Contact | int) -> Fetched``: GET ``base_url + path.format(id=...)``
    over ``httpx2.AsyncClient``.

    The arguments and errors are :class:`~engine.adapters.HttpFetch`'s (``timeout`` is
    ``(connect, read)`` seconds; writes get the read timeout, and so does waiting for a pooled
    connection, a ``TransientError`` if it runs out); redirects are followed as requests does.
    ``concurrency`` sizes each event loop's connection pool: give it the stage's limit.
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
        concurrency: int = 100,
    ) -> None:
        parts = urlsplit(base_url)
        name = type(self).__name__
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"{name}.base_url: expected an http(s) URL, got {base_url!r}")
        if "{id}" not in path:
            raise ValueError(f"{name}.path: expected a template with '{{id}}', got {path!r}")
        if len(timeout) != 2 or min(timeout) <= 0:
            raise ValueError(f"{name}.timeout: expected (connect, read) > 0, got {timeout!r}")
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"{name}.concurrency: expected an int >= 1, got {concurrency!r}")
        self._template = base_url.rstrip("/") + "/" + path.lstrip("/")
        connect, read = float(timeout[0]), float(timeout[1])
        self._timeout = httpx2.Timeout(connect=connect, read=read, write=read, pool=read)
        self._headers = {"Accept": "application/json", **(headers or {})}
        self._retry_after_scale = retry_after_scale
        self._trust_env = trust_env
        self._concurrency = concurrency
        self._clients: _PerLoop[httpx2.AsyncClient] = _PerLoop(
            name, self._new_client, _close_httpx)

    def _new_client(self) -> httpx2.AsyncClient:
        # No transport retries: the engine's RetryPolicy is the only retry loop.
        limits = httpx2.Limits(max_connections=self._concurrency,
                               max_keepalive_connections=self._concurrency)
        client = httpx2.AsyncClient(headers=self._headers, timeout=self._timeout, limits=limits,
                                    trust_env=self._trust_env, follow_redirects=True)
        _cache_sockets(client)
        return client

    async def client(self) -> httpx2.AsyncClient:
        """The running event loop's client (created on first use)."""
        return self._clients.current() or await self._clients.get()

    async def aclose(self) -> None:
        await self._clients.aclose()

    def close(self) -> None:
        self._clients.close()

    async def __aenter__(self) -> AsyncHttpFetch:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- calls ----------------------------------------------------------------------------------
    async def __call__(self, item: Contact | int) -> Fetched:
        cid = contact_id(item)
        url = self._template.format(id=cid)
        return _fetched(item, cid, url, await self.get_json(url))

    async def get_json(self, url: str) -> Any:
        """GET ``url`` and return its decoded JSON body, or raise Transient/PermanentError."""
        try:
            client = self._clients.current() or await self._clients.get()
            resp = await client.get(url)  # the whole body is read here: a drop too
        except httpx2.TimeoutException as exc:
            raise TransientError(f"GET {_path(url)}: timed out ({type(exc).__name__})") from exc
        except (httpx2.NetworkError, httpx2.RemoteProtocolError, httpx2.ProxyError,
                httpx2.DecodingError) as exc:
            raise TransientError(f"GET {_path(url)}: connection failed ({type(exc).__name__})") \
                from exc
        except (httpx2.HTTPError, httpx2.InvalidURL) as exc:  # bad URL, scheme: config errors
            raise PermanentError(f"GET {_path(url)}: {type(exc).__name__}") from exc
        return _decode(url, resp.status_code, resp.reason_phrase, resp.headers, resp.content,
                       self._retry_after_scale)
