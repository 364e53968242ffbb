"""The sync job as a user would write it by hand on asyncio, without the engine: the peer the
engine's async job is measured against (tests/benchmarks/test_sync_load_async.py).

    python examples/asyncio_peer.py --contacts 2000      # config: contact_sync.py's env vars

One event loop; one ``asyncio.Semaphore`` per stage at the example job's limits (fetch 50,
analyze 50, save 10, assign 10); ``window`` worker coroutines (default ``4 x`` the sum of the
limits, the engine's default in-flight bound) each take the next contact id and carry it through
fetch -> analyze -> save -> assign, so at most ``window`` contacts are in flight and each moves
on the moment the next stage's semaphore lets it. Clients: ``httpx2.AsyncClient`` for the
messages API, ``openai.AsyncOpenAI`` for the analysis, an ``asyncpg`` pool for the database,
each pool sized to its stage's limit.

It sends the same requests (URL, the same system prompt, user message, JSON schema and
parameters as ``LLMAnalyze``) and makes the same writes (the same upserts, run-tagged, and a
``sync_runs`` row with the counts; a failed contact in ``sync_failures``), so the database ends
as the example job leaves it. Retries are a plain loop: 4 attempts for the network calls (0.5 s
doubling up to 8 s, or the server's ``Retry-After``), 6 for the database (0.2 s up to 5 s), on
429/408/409/5xx, timeouts and dropped connections only.

Prints one line: ``asyncio peer: N contacts, ok A, failed B, wall W s, R contacts/s``.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

if __package__ in (None, ""):  # run as a script from a checkout: make `engine` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncpg
import httpx2
import openai
import psycopg2.extensions

# the request's and the tables' definitions only: the constants the example job sends and writes
from engine.adapters.llm import ANALYSIS_SCHEMA, DEFAULT_OUTPUT_ESTIMATE, SYSTEM_PROMPT
from engine.adapters.postgres import SCHEMA

__all__ = ["LIMITS", "main", "run_peer"]

T = TypeVar("T")

LIMITS: Mapping[str, int] = {"fetch": 50, "analyze": 50, "save": 10, "assign": 10}
STAGES = ("lead", "qualified", "proposal", "negotiation", "won", "lost")
MAX_INPUT_CHARS = 12_000

SAVE = """
WITH contact AS (
    INSERT INTO contacts (contact_id, name, email, attributes, message_count, run_id, saved_at)
    VALUES ($1, NULL, NULL, '{}'::jsonb, $2, $3, now())
    ON CONFLICT (contact_id) DO UPDATE SET
        name = EXCLUDED.name, email = EXCLUDED.email, attributes = EXCLUDED.attributes,
        message_count = EXCLUDED.message_count, run_id = EXCLUDED.run_id, saved_at = now())
INSERT INTO analyses (contact_id, stage, score, summary, model, run_id, analyzed_at)
VALUES ($1, $4, $5, $6, $7, $3, now())
ON CONFLICT (contact_id) DO UPDATE SET
    stage = EXCLUDED.stage, score = EXCLUDED.score, summary = EXCLUDED.summary,
    model = EXCLUDED.model, run_id = EXCLUDED.run_id, analyzed_at = now()
"""
ASSIGN = """
INSERT INTO pipeline_assignments (contact_id, stage, score, run_id, assigned_at)
VALUES ($1, $2, $3, $4, now())
ON CONFLICT (contact_id) DO UPDATE SET
    stage = EXCLUDED.stage, score = EXCLUDED.score, run_id = EXCLUDED.run_id, assigned_at = now()
"""


class Retryable(Exception):
    """A failure worth another attempt; ``after``: the server's Retry-After, seconds."""

    def __init__(self, message: str, after: float | None = None) -> None:
        super().__init__(message)
        self.after = after


def _retry_after(headers: Mapping[str, str]) -> float | None:
    try:
        if "retry-after-ms" in headers:
            return float(headers["retry-after-ms"]) / 1000.0
        if "retry-after" in headers:
            return min(float(headers["retry-after"]), 120.0)
    except ValueError:
        pass
    return None


async def with_retries(sem: asyncio.Semaphore, call: Callable[[], Awaitable[T]], *,
                       attempts: int, backoff: float, max_backoff: float) -> T:
    """``call()`` under ``sem``, retried on ``Retryable`` (the wait is outside the slot)."""
    for attempt in range(1, attempts + 1):
        try:
            async with sem:
                return await call()
        except Retryable as exc:
            if attempt == attempts:
                raise
            await asyncio.sleep(max(exc.after or 0.0,
                                    min(max_backoff, backoff * 2 ** (attempt - 1))))
    raise AssertionError("unreachable")


def pg_kwargs(dsn: str) -> dict[str, Any]:
    """asyncpg's connect arguments for a libpq DSN (key/value or URL)."""
    p = psycopg2.extensions.parse_dsn(dsn)
    out: dict[str, Any] = {"host": p.get("host"), "port": int(p.get("port") or 5432),
                           "user": p.get("user"), "password": p.get("password"),
                           "database": p.get("dbname")}
    if p.get("connect_timeout"):
        out["timeout"] = float(p["connect_timeout"])
    return out


async def run_peer(env: Mapping[str, str], contacts: Iterable[int], *,
                   limits: Mapping[str, int] = LIMITS, window: int | None = None,
                   attempts: int = 4) -> dict[str, Any]:
    """Run every contact through the four stages; returns the counts and the wall time."""
    model = env.get("OPENAI_MODEL") or "gpt-4o-mini"
    messages_url = env["MESSAGES_API_URL"].rstrip("/") + "/contacts/{id}/messages"
    window = window or 4 * sum(limits.values())
    sems = {name: asyncio.Semaphore(n) for name, n in limits.items()}
    net = {"attempts": attempts, "backoff": 0.5, "max_backoff": 8.0}
    db = {"attempts": max(attempts, 6), "backoff": 0.2, "max_backoff": 5.0}
    response_format: Any = {"type": "json_schema",
                            "json_schema": {"name": "contact_analysis", "strict": True,
                                            "schema": ANALYSIS_SCHEMA}}

    http = httpx2.AsyncClient(
        headers={"Accept": "application/json"}, follow_redirects=True,
        timeout=httpx2.Timeout(connect=3.05, read=30.0, write=30.0, pool=30.0),
        limits=httpx2.Limits(max_connections=limits["fetch"],
                             max_keepalive_connections=limits["fetch"]))
    llm = openai.AsyncOpenAI(
        api_key=env["OPENAI_API_KEY"], base_url=env["OPENAI_BASE_URL"], timeout=60.0,
        max_retries=0, http_client=openai.DefaultAsyncHttpxClient(
            timeout=60.0, limits=httpx2.Limits(max_connections=limits["analyze"],
                                               max_keepalive_connections=limits["analyze"])))
    pool = await asyncpg.create_pool(min_size=0, max_size=limits["save"] + limits["assign"] + 1,
                                     **pg_kwargs(env["DATABASE_URL"]))
    counts = {"ok": 0, "failed": 0}
    try:
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", "conveyor.schema")
            await conn.execute(SCHEMA)
        run_id = await pool.fetchval(
            "INSERT INTO sync_runs (strategy, params) VALUES ($1, $2::jsonb) RETURNING run_id",
            "asyncio-peer", json.dumps({"window": window}))

        async def fetch(cid: int) -> list[Any]:
            try:
                resp = await http.get(messages_url.format(id=cid))
            except httpx2.TransportError as exc:
                raise Retryable(f"GET messages of {cid}: {type(exc).__name__}") from exc
            if resp.status_code in (408, 429) or resp.status_code >= 500:
                raise Retryable(f"GET messages of {cid}: HTTP {resp.status_code}",
                                _retry_after(resp.headers))
            resp.raise_for_status()
            body = resp.json()
            return list(body["messages"] if isinstance(body, dict) else body)

        async def analyze(cid: int, msgs: list[Any]) -> tuple[str, float, str]:
            head = json.dumps({"contact_id": cid, "name": None, "email": None},
                              ensure_ascii=False)
            body = json.dumps(msgs, ensure_ascii=False, default=str)
            if len(body) > MAX_INPUT_CHARS:
                body = body[:MAX_INPUT_CHARS] + " ...[truncated]"
            try:
                completion = await llm.chat.completions.create(
                    model=model, response_format=response_format, temperature=0.0,
                    max_completion_tokens=DEFAULT_OUTPUT_ESTIMATE,
                    messages=[{"role": "system", "content": SYSTEM_PROMPT},
                              {"role": "user", "content": f"Contact: {head}\nMessages: {body}"}])
            except (openai.APIConnectionError, openai.RateLimitError,
                    openai.InternalServerError) as exc:
                headers = getattr(getattr(exc, "response", None), "headers", None) or {}
                raise Retryable(f"analyze {cid}: {type(exc).__name__}",
                                _retry_after(headers)) from exc
            data = json.loads(completion.choices[0].message.content or "")
            stage, score, summary = data["stage"], float(data["score"]), str(data["summary"])
            if stage not in STAGES or not 0.0 <= score <= 1.0:
                raise ValueError(f"analyze {cid}: the answer breaks the schema: {data!r}")
            return stage, score, " ".join(summary.split())

        async def execute(sql: str, *args: Any) -> None:
            try:
                await pool.execute(sql, *args)
            except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
                    asyncpg.TooManyConnectionsError, asyncpg.CannotConnectNowError,
                    asyncpg.DeadlockDetectedError, asyncpg.SerializationError) as exc:
                raise Retryable(f"database: {type(exc).__name__}") from exc

        async def one(cid: int) -> None:
            msgs = await with_retries(sems["fetch"], lambda: fetch(cid), **net)
            stage, score, summary = await with_retries(
                sems["analyze"], lambda: analyze(cid, msgs), **net)
            await with_retries(sems["save"], lambda: execute(
                SAVE, cid, len(msgs), run_id, stage, score, summary, model), **db)
            await with_retries(sems["assign"], lambda: execute(
                ASSIGN, cid, stage, score, run_id), **db)

        async def record_failure(cid: int, exc: Exception) -> None:
            await pool.execute(
                "INSERT INTO sync_failures (run_id, item_key, contact_id, status, error_type, "
                "message) VALUES ($1, $2, $3, 'failed', $4, $5) ON CONFLICT (run_id, item_key) "
                "DO UPDATE SET message = EXCLUDED.message",
                run_id, str(cid), cid, type(exc).__name__, str(exc)[:300])

        todo = iter(contacts)

        async def worker() -> None:
            for cid in todo:  # one event loop: next() on the shared iterator needs no lock
                try:
                    await one(cid)
                    counts["ok"] += 1
                except Exception as exc:
                    counts["failed"] += 1
                    await record_failure(cid, exc)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(window)))
        wall = time.perf_counter() - t0
        await pool.execute(
            "UPDATE sync_runs SET finished_at = now(), status = $1, total = $2, ok = $3, "
            "failed = $4, cancelled = 0, skipped = 0 WHERE run_id = $5",
            "ok" if counts["failed"] == 0 else "failed", counts["ok"] + counts["failed"],
            counts["ok"], counts["failed"], run_id)
    finally:
        await http.aclose()
        await llm.close()
        await pool.close()
    return {**counts, "wall": wall, "run_id": run_id}


def main(argv: list[str] | None = None, env: Mapping[str, str] = os.environ) -> int:
    ap = argparse.ArgumentParser(prog="asyncio_peer.py", description=__doc__.split("\n")[0])
    ap.add_argument("--contacts", type=int, required=True, metavar="N", help="contact ids 1..N")
    ap.add_argument("--window", type=int, default=None, metavar="N",
                    help="contacts in flight at most (default: 4 x the sum of the limits)")
    args = ap.parse_args(argv)
    out = asyncio.run(run_peer(env, range(1, args.contacts + 1), window=args.window))
    n = out["ok"] + out["failed"]
    print(f"asyncio peer: {n} contacts, ok {out['ok']}, failed {out['failed']}, "
          f"wall {out['wall']:.2f} s, {out['ok'] / out['wall']:.1f} contacts/s")
    return 0 if out["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
