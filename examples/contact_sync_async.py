"""The example sync job on async adapters: one process, one event loop for every call.

    python examples/contact_sync_async.py --contacts 2000 --ledger none --quiet

The same four stages as ``examples/contact_sync.py`` -- fetch -> analyze -> save -> assign, with
its stage names, limits, key, retry policies, checkpointed analyze stage and codec, pipeline
name, flags, environment configuration, bookkeeping (``sync_runs``, ``sync_failures``), ledger
and summary -- but every stage is an ``async def`` call on the engine's event-loop thread:

* fetch   -- ``AsyncHttpFetch`` (``httpx2.AsyncClient``)
* analyze -- ``AsyncLLMAnalyze`` (``openai.AsyncOpenAI``)
* save, assign -- ``AsyncPostgresStore`` (``asyncpg``)

instead of ``HttpFetch`` (requests), ``LLMAnalyze`` (openai) and ``PostgresStore`` (psycopg2)
on 120 worker threads. The run's bookkeeping (``start_run``, ``record_failure``,
``finish_run``, clearing the ledger) stays on a one-connection ``PostgresStore``: a few
statements a run, off the stages' path.

For ``contact_sync.py`` (a ``--async`` flag) and the benchmarks::

    from examples.contact_sync_async import build_async_pipeline, run_async_job
    with build_async_pipeline(cfg) as job:          # duck-types contact_sync.SyncJob
        status = run_sync(job, contacts, strategy=..., resume=False, console=..., total=n)
    status = run_async_job(cfg, range(1, n + 1), console=console, total=n)
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

if __package__ in (None, ""):  # run as a script from a checkout: make `engine` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import (
    CancelToken,
    ItemResult,
    Ledger,
    Pipeline,
    RunReport,
    Stage,
)
from engine.adapters import (
    AsyncHttpFetch,
    AsyncLLMAnalyze,
    AsyncPostgresStore,
    Contact,
    Fetched,
    PermanentError,
    PostgresStore,
)
from examples.contact_sync import (
    DEFAULT_CONCURRENCY,
    PIPELINE_NAME,
    AnalyzedCodec,
    BadRecord,
    ConfigError,
    Console,
    SyncConfig,
    item_key,
    make_strategy,
    retry_policies,
    run_sync,
)
from examples.contact_sync import (
    main as contact_sync_main,
)

__all__ = ["AsyncSyncJob", "build_async_pipeline", "main", "run_async_job"]


class _Bookkeeping(PostgresStore):
    """The run's own statements on one psycopg2 connection; ``start_run`` also tags the async
    store's rows with the run's id, as ``PostgresStore.start_run`` tags its own."""

    def __init__(self, dsn: str, rows: AsyncPostgresStore) -> None:
        super().__init__(dsn, concurrency=1)
        self._rows = rows

    def start_run(self, strategy: str, params: dict[str, Any]) -> int:
        self._rows.run_id = run_id = super().start_run(strategy, params)
        return run_id


class AsyncSyncJob:
    """The four-stage pipeline on async adapters, and the clients it owns; the interface of
    ``contact_sync.SyncJob`` (``config``, ``limits``, ``pipeline``, ``store``, ``close()``), so
    ``contact_sync.run_sync`` runs it as it is."""

    def __init__(self, config: SyncConfig, *, concurrency: Mapping[str, int] | None = None,
                 time_scale: float = 1.0, attempts: int = 4,
                 http_timeout: tuple[float, float] = (3.05, 30.0),
                 llm_timeout: float = 60.0) -> None:
        limits = {**DEFAULT_CONCURRENCY, **(concurrency or {})}
        unknown = set(limits) - set(DEFAULT_CONCURRENCY)
        if unknown:
            raise ConfigError(f"concurrency: unknown stage(s) {sorted(unknown)}; expected "
                              f"{list(DEFAULT_CONCURRENCY)}")
        self.config = config
        self.limits = limits
        # each event loop's connection pools sized to the stage limits
        self.fetch = AsyncHttpFetch(config.messages_api_url, timeout=http_timeout,
                                    concurrency=limits["fetch"])
        self.llm = AsyncLLMAnalyze(base_url=config.openai_base_url,
                                   api_key=config.openai_api_key, model=config.openai_model,
                                   concurrency=limits["analyze"], timeout=llm_timeout)
        self.db = AsyncPostgresStore(config.database_url,
                                     concurrency=limits["save"] + limits["assign"],
                                     create_schema=False)  # the bookkeeping store creates it
        # connects (and creates the schema) now: an unreachable database fails here, at start
        self.store: PostgresStore = _Bookkeeping(config.database_url, self.db)
        net, db = retry_policies(attempts, time_scale)  # contact_sync.SyncJob's
        fetch = self.fetch

        async def fetch_contact(item: Contact | BadRecord | int) -> Fetched:
            if isinstance(item, BadRecord):
                raise PermanentError(item.reason)
            return await fetch(item)

        self.pipeline = Pipeline([
            Stage("fetch", fetch_contact, concurrency=limits["fetch"], retry=net),
            # checkpointed: with a ledger, a paid-for analysis is never asked for again
            Stage("analyze", self.llm, concurrency=limits["analyze"], retry=net,
                  checkpoint=True, codec=AnalyzedCodec()),
            Stage("save", self.db.save, concurrency=limits["save"], retry=db),
            Stage("assign", self.db.assign, concurrency=limits["assign"], retry=db),
        ], key=item_key, name=PIPELINE_NAME)

    #: one process: every call runs on the run's event loop here
    processes = 1

    def start_run(self, strategy: str, params: dict[str, Any]) -> int:
        """A ``sync_runs`` row for the coming run; its id tags every row the run writes."""
        return self.store.start_run(strategy, params)  # sets self.db.run_id too

    def stream(self, items: Iterable[Any], strategy: Any = None,
               **options: Any) -> Iterator[ItemResult]:
        return self.pipeline.stream(items, strategy, **options)

    def run(self, items: Iterable[Any], strategy: Any = None, **options: Any) -> RunReport:
        return self.pipeline.run(items, strategy, **options)

    def close(self) -> None:
        # the engine's loop has closed its clients and pools as it ended; these close any
        # still open (a loop of the caller's own)
        self.fetch.close()
        self.llm.close()
        self.db.close()
        self.store.close()

    def __enter__(self) -> AsyncSyncJob:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build_async_pipeline(config: SyncConfig, *, concurrency: Mapping[str, int] | None = None,
                         time_scale: float = 1.0, attempts: int = 4,
                         http_timeout: tuple[float, float] = (3.05, 30.0),
                         llm_timeout: float = 60.0) -> AsyncSyncJob:
    """``contact_sync.build_pipeline``'s job on async adapters (the same arguments)."""
    return AsyncSyncJob(config, concurrency=concurrency, time_scale=time_scale,
                        attempts=attempts, http_timeout=http_timeout, llm_timeout=llm_timeout)


def run_async_job(config: SyncConfig, contacts: Iterable[Contact | BadRecord | int], *,
                  console: Console, total: int | None = None, strategy: Any = None,
                  resume: bool = False, cancel: CancelToken | None = None,
                  ledger: Ledger | None = None, retry_failed: bool = False,
                  **job: Any) -> int:
    """Build the async job (``job``: ``build_async_pipeline``'s keyword arguments), run it with
    ``contact_sync.run_sync`` (bookkeeping, ledger, summary) and return the exit status."""
    if strategy is None:
        strategy = make_strategy("continuous", 50, 3)
    try:
        built = build_async_pipeline(config, **job)
    except Exception as exc:  # unreachable database and the like: one clear line
        console.note(f"contact_sync_async.py: error: cannot start: {exc}")
        return 2
    with built:
        return run_sync(built, contacts, strategy=strategy, resume=resume, console=console,
                        cancel=cancel, ledger=ledger, retry_failed=retry_failed, total=total)


def main(argv: list[str] | None = None, *, env: Mapping[str, str] = os.environ,
         out: IO[str] = sys.stdout, err: IO[str] = sys.stderr) -> int:
    """``contact_sync.py --async``: the same command line, on the async job."""
    return contact_sync_main(["--async", *(sys.argv[1:] if argv is None else argv)], env=env,
                             out=out, err=err)


if __name__ == "__main__":
    sys.exit(main())
