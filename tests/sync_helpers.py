"""Helpers for the sync-job tests: fake services + a database, and row counting."""
from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from typing import Any

import psycopg2

from examples.contact_sync import SyncConfig, main
from simulators.servers import MessagesServer, OpenAIServer, ServerFaults

API_KEY = "sk-live-TOPSECRET-4f1c9e"


@contextlib.contextmanager
def services(dsn: str, *, faults: ServerFaults | None = None,
             llm_faults: ServerFaults | None = None, latency: Any = 0.0,
             **server_kw: Any) -> Iterator[SyncConfig]:
    with MessagesServer(latency=latency, seed=1, faults=faults, **server_kw) as msgs, \
            OpenAIServer(latency=latency, seed=2, faults=llm_faults or faults,
                         **server_kw) as llm:
        yield SyncConfig(dsn, msgs.url, llm.url + "/v1", API_KEY, "gpt-4o-mini")


def env_of(cfg: SyncConfig) -> dict[str, str]:
    return {"DATABASE_URL": cfg.database_url, "MESSAGES_API_URL": cfg.messages_api_url,
            "OPENAI_BASE_URL": cfg.openai_base_url, "OPENAI_API_KEY": cfg.openai_api_key,
            "OPENAI_MODEL": cfg.openai_model}


def run_main(cfg: SyncConfig, *args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(args), env=env_of(cfg), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def execute(dsn: str, sql: str) -> None:
    """Run one statement and commit it (a test's own change to the job's database)."""
    conn = psycopg2.connect(dsn)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


def query(dsn: str, sql: str, args: tuple = ()) -> list[tuple]:
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall()
    finally:
        conn.close()


def counts(dsn: str) -> dict[str, tuple[int, int]]:
    """(rows, distinct contact ids) per table."""
    return {t: query(dsn, f"SELECT count(*), count(DISTINCT contact_id) FROM {t}")[0]
            for t in ("contacts", "analyses", "pipeline_assignments")}
