"""Stage callables over real services, for sync jobs built on the engine.

    from engine.adapters import HttpFetch, LLMAnalyze, PostgresStore, RETRYABLE

* ``HttpFetch`` -- GET a contact's messages over ``requests`` (a Session per worker thread).
* ``LLMAnalyze`` -- classify a contact over the ``openai`` client (JSON-schema output).
* ``PostgresStore`` -- ``save`` and ``assign`` over ``psycopg2`` (pooled, upserts, schema).
* ``AsyncHttpFetch`` / ``AsyncLLMAnalyze`` -- the same stages as ``async def`` callables, over
  ``httpx2.AsyncClient`` and ``openai.AsyncOpenAI`` (one client per event loop).
* ``AsyncPostgresStore`` -- ``PostgresStore``'s tables and upserts over asyncpg (one pool per
  event loop; the ``async`` extra, imported on first use).
* ``LLMAnalyze(..., budget=b)`` resyncs ``b`` from every response's ``x-ratelimit-*`` headers
  and charges the actual usage; ``Stage("analyze", llm, budget=b, cost=llm.estimate)``.
* ``PostgresLedger`` -- a run's ledger (DESIGN §11) in PostgreSQL, its own table in the job's
  database: ``pipeline.run(items, ledger=PostgresLedger(dsn))``.
* ``TransientError`` / ``PermanentError`` -- what every adapter raises; retry only
  ``RETRYABLE`` (``RetryPolicy(retry_on=RETRYABLE)``), so a 404 or a malformed answer fails the
  item at once while 429/5xx/timeouts are retried, honouring ``retry_after``.

This package imports requests, openai (and its httpx2) and psycopg2; ``import engine`` alone
does not.
"""
from typing import TYPE_CHECKING

from ._async import AsyncHttpFetch, AsyncLLMAnalyze
from ._errors import RETRYABLE, AdapterError, PermanentError, TransientError, parse_retry_after
from ._ledger_pg import PostgresLedger
from ._records import (
    PIPELINE_STAGES,
    Analysis,
    Analyzed,
    Assignment,
    Contact,
    Fetched,
    PipelineStage,
    contact_id,
)
from .http import HttpFetch
from .llm import (
    ANALYSIS_SCHEMA,
    DEFAULT_OUTPUT_ESTIMATE,
    LLMAnalyze,
    MalformedOutputError,
    parse_analysis,
)
from .postgres import SCHEMA, PostgresStore, redact_dsn

if TYPE_CHECKING:
    from ._async_postgres import AsyncPostgresStore


def __getattr__(name: str) -> object:
    # AsyncPostgresStore needs asyncpg (the ``async`` extra): imported on first use, so
    # ``import engine.adapters`` works without it
    if name == "AsyncPostgresStore":
        try:
            from ._async_postgres import AsyncPostgresStore
        except ImportError as exc:
            if exc.name != "asyncpg":
                raise
            raise ImportError("AsyncPostgresStore needs asyncpg: pip install 'conveyor[async]'",
                              name="asyncpg") from exc
        return AsyncPostgresStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ANALYSIS_SCHEMA",
    "DEFAULT_OUTPUT_ESTIMATE",
    "PIPELINE_STAGES",
    "RETRYABLE",
    "SCHEMA",
    "AdapterError",
    "Analysis",
    "Analyzed",
    "Assignment",
    "AsyncHttpFetch",
    "AsyncLLMAnalyze",
    "AsyncPostgresStore",
    "Contact",
    "Fetched",
    "HttpFetch",
    "LLMAnalyze",
    "MalformedOutputError",
    "PermanentError",
    "PipelineStage",
    "PostgresLedger",
    "PostgresStore",
    "TransientError",
    "contact_id",
    "parse_analysis",
    "parse_retry_after",
    "redact_dsn",
]
