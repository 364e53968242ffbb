"""``save`` and ``assign`` as ``async def`` stages over ``asyncpg`` (DESIGN §13).

``AsyncPostgresStore`` is :class:`~engine.adapters.PostgresStore`'s twin for an event loop: the
same tables (``SCHEMA``), the same upserts (``INSERT ... ON CONFLICT (contact_id) DO UPDATE``,
parameterized, so a retried or resumed contact overwrites its rows and never duplicates them),
the same ``run_id`` tagging and the same errors (``TransientError`` / ``PermanentError``, the DSN's
password scrubbed)::

    store = AsyncPostgresStore(dsn, concurrency=20)        # save 10 + assign 10
    Stage("save", store.save, concurrency=10, retry=db)    # async: on the run's event loop
    Stage("assign", store.assign, concurrency=10, retry=db)

One pool per event loop
-----------------------
An asyncpg connection belongs to the event loop that opened it, so the store keeps one
``asyncpg.Pool`` per running loop (like ``AsyncHttpFetch``'s clients: see
``engine.adapters._async``): created on the loop's first call, holding at most
``concurrency + 1`` connections, opened lazily and kept; a caller past the limit waits for a
connection (asyncpg's pool queues, it never fails for lack of one). A loop's pool is closed when
that loop shuts down (``asyncio.run``'s end, the end of an engine run); ``await store.aclose()``
closes the running loop's at once, ``close()`` every one it still can. The first pool creates
the schema (``create_schema=True``, the default); nothing connects before the first call.

Round trips
-----------
``save`` writes the contact and its analysis in **one statement**: the contact's upsert is a
data-modifying ``WITH`` of the analysis' upsert (PostgreSQL runs both to completion in one
statement, one implicit transaction; the analysis' foreign key is checked at the statement's
end, when the contact's row exists). asyncpg's extended protocol takes one statement per
message, so this is its way to psycopg2's one round trip for two upserts. ``assign`` is one
upsert. Statements are prepared once per connection (asyncpg's statement cache).

Errors
------
The same mapping as ``PostgresStore`` (which follows psycopg2's classes): a SQLSTATE psycopg2
raises as ``OperationalError`` (classes 08, 26-28, 34, 40, 53-58, HV: connection failures,
serialization failures and deadlocks, resource limits, shutdowns, cancelled statements), a
client-side connection error (``asyncpg.InterfaceError``, ``OSError``, a connect timeout) ->
``TransientError``; the connection is dropped (and the pool's idle ones: a server restart
breaks them all), the next call opens a fresh one. Anything else the database rejects (a NUL
character, a constraint) and a value asyncpg cannot encode -> ``PermanentError`` with the
server's message.

DSNs: a libpq key/value string or a ``postgresql://`` URL, as psycopg2 takes them
(``connect_timeout``, ``application_name`` and ``options='-c name=value'`` are honoured; libpq's
TCP knobs such as ``keepalives`` are ignored). ``connect_kwargs`` go to ``asyncpg.connect``.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shlex
import urllib.parse
from collections.abc import Callable
from typing import Any

import asyncpg
import psycopg2.extensions

from ._async import _PerLoop
from ._errors import AdapterError, PermanentError, TransientError, truncate
from ._records import Analysis, Analyzed, Assignment
from .postgres import (
    _UPSERT_ANALYSIS,
    _UPSERT_ASSIGNMENT,
    _UPSERT_CONTACT,
    SCHEMA,
    default_assignment,
    redact_dsn,
)

__all__ = ["AsyncPostgresStore"]


def _numbered(sql: str, start: int = 1) -> str:
    """psycopg2's ``%s`` placeholders as asyncpg's ``$1, $2, ...`` (from ``start``)."""
    counter = iter(range(start, start + sql.count("%s")))
    return re.sub("%s", lambda _: f"${next(counter)}", sql)


# PostgresStore's statements, numbered; save: both upserts in one statement (module docstring)
_SAVE = (f"WITH contact AS ({_numbered(_UPSERT_CONTACT).strip()})\n"
         f"{_numbered(_UPSERT_ANALYSIS, start=7).strip()}")
_ASSIGN = _numbered(_UPSERT_ASSIGNMENT).strip()

# SQLSTATE classes that psycopg2 raises as OperationalError: PostgresStore retries those
_TRANSIENT_CLASSES = frozenset({"08", "26", "27", "28", "34", "40", "53", "54", "55", "57",
                                "58", "HV"})
# libpq keywords asyncpg reads from a DSN's query string
_URL_KEYS = ("passfile", "sslmode", "sslcert", "sslkey", "sslrootcert", "sslcrl",
             "sslpassword", "ssl_min_protocol_version", "ssl_max_protocol_version",
             "sslnegotiation", "target_session_attrs", "krbsrvname", "gsslib", "service")


def connect_args(dsn: str) -> dict[str, Any]:
    """``asyncpg.connect`` keyword arguments for a libpq DSN (key/value or URL), parsed as
    libpq (and so psycopg2) parses it. Raises ``ValueError`` on a DSN libpq rejects."""
    try:
        params = psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.ProgrammingError as exc:
        raise ValueError(f"invalid PostgreSQL DSN ({redact_dsn(dsn)}): "
                         f"{str(exc).strip()}") from None
    out: dict[str, Any] = {}
    host = params.get("hostaddr") or params.get("host")
    if host:
        hosts = host.split(",")
        out["host"] = hosts if len(hosts) > 1 else hosts[0]
    if params.get("port"):
        ports = [int(p) for p in params["port"].split(",")]
        out["port"] = ports if len(ports) > 1 else ports[0]
    for key, arg in (("user", "user"), ("password", "password"), ("dbname", "database")):
        if params.get(key):
            out[arg] = params[key]
    if params.get("connect_timeout") and float(params["connect_timeout"]) > 0:  # 0: no limit
        out["timeout"] = max(float(params["connect_timeout"]), 2.0)  # libpq's minimum is 2 s
    settings: dict[str, str] = {}
    name = params.get("application_name") or params.get("fallback_application_name")
    if name:
        settings["application_name"] = name
    words = shlex.split(params.get("options") or "")
    for i, word in enumerate(words):  # "-c name=value", "-cname=value", "--name=value"
        if word == "-c" and i + 1 < len(words):
            word = words[i + 1]
        elif word.startswith(("-c", "--")):
            word = word[2:]
        else:
            continue
        key, eq, value = word.partition("=")
        if eq:
            settings[key.replace("-", "_")] = value
    if settings:
        out["server_settings"] = settings
    query = {k: params[k] for k in _URL_KEYS if params.get(k)}
    if query:
        out["dsn"] = "postgresql://?" + urllib.parse.urlencode(query)
    return out


class AsyncPostgresStore:
    """The sync job's database for ``async def`` stages: ``save`` and ``assign`` coroutines.

    ``concurrency`` is the sum of the concurrency limits of the stages that call this store
    (save 10 + assign 10 -> 20); each event loop's pool holds at most ``concurrency + 1``
    connections. ``assign_rule`` maps an ``Analysis`` to a pipeline stage name; ``run_id``
    (set it, or leave None) tags every row written, as ``PostgresStore.start_run`` does.
    """

    def __init__(
        self,
        dsn: str,
        *,
        concurrency: int,
        create_schema: bool = True,
        assign_rule: Callable[[Analysis], str] = default_assignment,
        **connect_kwargs: Any,
    ) -> None:
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"AsyncPostgresStore.concurrency: expected an int >= 1, got "
                             f"{concurrency!r}")
        self._connect = {**connect_args(dsn), **connect_kwargs}
        self._secret = str(self._connect.get("password") or "")
        self._where = redact_dsn(dsn)
        self.maxconn = concurrency + 1
        self.run_id: int | None = None
        self._assign_rule = assign_rule
        self._schema_wanted = create_schema
        self._pools: _PerLoop[asyncpg.Pool] = _PerLoop(
            type(self).__name__, self._new_pool, _close_pool, start=self._start_pool)

    # -- pools ---------------------------------------------------------------------------------
    def _new_pool(self) -> asyncpg.Pool:
        # not awaited yet: _start_pool initialises it (no connection opened: min_size=0)
        return asyncpg.create_pool(min_size=0, max_size=self.maxconn, **self._connect)

    async def _start_pool(self, pool: asyncpg.Pool) -> None:
        await pool
        if self._schema_wanted:
            try:
                await self._run(pool, self._ddl)
            except BaseException:
                pool.terminate()
                raise
            self._schema_wanted = False

    async def pool(self) -> asyncpg.Pool:
        """The running event loop's pool (created on first use)."""
        return self._pools.current() or await self._pools.get()

    def pools(self) -> list[asyncpg.Pool]:
        """The pools open now (one per loop)."""
        return self._pools.clients()

    async def aclose(self) -> None:
        await self._pools.aclose()

    def close(self) -> None:
        self._pools.close()

    async def __aenter__(self) -> AsyncPostgresStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- statements ----------------------------------------------------------------------------
    def _scrub(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text

    async def execute(self, sql: str, *args: Any) -> None:
        """Run one statement (``$1``-style parameters, bound server-side) on a pooled
        connection: one round trip, autocommit. Errors as the module docstring says."""
        pool = self._pools.current() or await self._pools.get()
        try:
            async with pool.acquire() as conn:
                try:
                    await conn.execute(sql, *args)
                except BaseException as exc:
                    if _broken(exc):  # drop it: the pool opens a fresh one next time
                        conn.terminate()
                    raise
        except Exception as exc:
            error = self._translate(exc)
        else:
            return
        if isinstance(error, TransientError):
            with contextlib.suppress(Exception):  # a restart breaks the idle connections too
                await pool.expire_connections()
        raise error from None

    async def _run(self, pool: asyncpg.Pool, fn: Callable[[Any], Any]) -> Any:
        try:
            async with pool.acquire() as conn:
                return await fn(conn)
        except Exception as exc:
            error = self._translate(exc)
        raise error from None

    async def _ddl(self, conn: Any) -> None:
        # racing CREATE TABLE IF NOT EXISTS can still collide on the catalog: serialised by a
        # transaction-scoped advisory lock, as PostgresStore does
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", "conveyor.schema")
            await conn.execute(SCHEMA)

    async def create_schema(self) -> None:
        """Create the tables if they are missing (safe to run concurrently and repeatedly)."""
        await self._run(await self.pool(), self._ddl)

    def _translate(self, exc: BaseException) -> AdapterError:
        if isinstance(exc, AdapterError):
            return exc
        kind = type(exc).__name__
        text = truncate(self._scrub(str(exc).strip()), 300)
        if isinstance(exc, asyncpg.PostgresError):
            state = str(getattr(exc, "sqlstate", "") or "")
            if state[:2] in _TRANSIENT_CLASSES:
                return TransientError(f"PostgreSQL connection failed ({kind} {state}): {text}")
            return PermanentError(f"PostgreSQL rejected the write ({kind} {state}): {text}")
        if isinstance(exc, asyncpg.exceptions.DataError | ValueError | TypeError):
            return PermanentError(f"PostgreSQL cannot store this value: {text}")
        if isinstance(exc, asyncpg.InterfaceError | asyncpg.exceptions.InternalClientError
                      | OSError | TimeoutError):
            return TransientError(f"PostgreSQL connection failed ({kind}): {text}"
                                  f"{'' if text else ' (' + self._where + ')'}")
        return PermanentError(f"PostgreSQL failed ({kind}): {text}")

    # -- stage callables -----------------------------------------------------------------------
    async def save(self, analyzed: Analyzed) -> Analyzed:
        """Stage ``Analyzed -> Analyzed``: upsert the contact and its analysis (one statement,
        one transaction)."""
        c, a = analyzed.contact, analyzed.analysis
        attributes = json.dumps(dict(c.attributes), ensure_ascii=False, default=str)
        run_id = self.run_id
        await self.execute(_SAVE, c.id, c.name, c.email, attributes, analyzed.message_count,
                           run_id, c.id, a.stage, a.score, a.summary, analyzed.model, run_id)
        return analyzed

    async def assign(self, analyzed: Analyzed) -> Assignment:
        """Stage ``Analyzed -> Assignment``: upsert the contact's pipeline assignment."""
        a = analyzed.analysis
        stage = self._assign_rule(a)
        await self.execute(_ASSIGN, analyzed.contact.id, stage, a.score, self.run_id)
        return Assignment(contact_id=analyzed.contact.id, stage=stage, score=a.score)


def _broken(exc: BaseException) -> bool:
    """The connection cannot be trusted after ``exc`` (PostgresStore drops it on any
    OperationalError or InterfaceError)."""
    if isinstance(exc, asyncpg.PostgresError):
        return str(getattr(exc, "sqlstate", "") or "")[:2] in _TRANSIENT_CLASSES
    return isinstance(exc, asyncpg.InterfaceError | asyncpg.exceptions.InternalClientError
                      | OSError | TimeoutError) and not isinstance(
        exc, asyncpg.exceptions.DataError | ValueError)


async def _close_pool(pool: asyncpg.Pool) -> None:
    try:
        await asyncio.wait_for(pool.close(), 5.0)  # graceful: every call has ended by now
    except BaseException:
        with contextlib.suppress(Exception):
            pool.terminate()
        raise
