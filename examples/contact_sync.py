"""Example sync job: every CRM contact -> fetch messages -> LLM analysis -> save -> assign.

    # against real services (config from the environment):
    DATABASE_URL=postgresql://... MESSAGES_API_URL=https://crm.example.com/api \\
    OPENAI_BASE_URL=https://api.openai.com/v1 OPENAI_API_KEY=sk-... OPENAI_MODEL=gpt-4o-mini \\
        python examples/contact_sync.py --contacts 3220 --strategy continuous

    # the whole job on this machine, nothing to set up (fake servers + a throwaway PostgreSQL):
    python examples/contact_sync.py --demo

Flags: ``--contacts N`` (ids 1..N) or ``--contacts-file F`` (one contact per line: a bare id
or a JSON object with ``id`` and optional ``name``, ``email`` and other attributes),
``--strategy continuous|batched|parallel-batches``, ``--processes N``, ``--resume``,
``--retry-failed``, ``--ledger db|none|PATH``, ``--demo``, ``--quiet``. Progress is the
engine's own (``progress=True``: a tqdm bar on a terminal, a plain line now and then
otherwise) on stderr; the summary goes to stdout. Exit status: 0 if every contact is ok, 1 if
any failed or was cancelled, 2 on a usage or configuration error (or another run of the job
holding the ledger).

More cores (DESIGN §12): the job's own Python CPU (the openai client, requests, psycopg2 under
one GIL) saturates one core at a few hundred contacts a second. ``--processes N`` runs every
stage's calls in N worker processes (``pipeline.run(..., processes=N)``); the scheduler, the
limits and the ledger stay in this process. Each worker process builds its own clients through
the stages' ``init`` (``PerProcess``: one HTTP fetcher, one openai client and one PostgreSQL
pool per process, shared by its worker threads, sized to its share of the stage limits), so
only configuration crosses the process boundary. ``--processes 1`` (the default) runs the
stages on threads in this process with the clients built here, as before.

Durable runs (DESIGN §11): every run records its progress in a ledger, by default a
``PostgresLedger`` in the job's own database (table ``conveyor_ledger``, pipeline name
``contact-sync``): the analysis of each contact once the LLM answered (the ``analyze`` stage is
checkpointed: an LLM call costs money), each contact done once assigned, and each failure with
its stage, type, message and traceback (a dead letter). ``--resume`` goes on from there: a
contact recorded done is not run again (reported ok, counted "already done"), one whose
analysis was recorded goes on to save and assign without a second LLM call, and the others run
from the start; recorded failures are reported again without a call unless ``--retry-failed``
(which implies ``--resume``) replays them. A run without ``--resume`` starts over: it forgets
what the ledger holds for the job first. ``--ledger PATH`` keeps the ledger in a SQLite file
instead; ``--ledger none`` runs without one (no ``--resume``). Inspect a ledger with
``python -m engine.ledger "$DATABASE_URL" --name contact-sync``.

What is guaranteed: each stage call is at-least-once (retried on transient errors), each row is
exactly-once (upserts keyed by contact id), an ok contact is durable the moment it is reported
(its assign committed), and every failure is recorded in ``sync_failures`` with its reason.
After a crash or a ``kill -9``, ``--resume`` loses nothing the ledger recorded: it repeats at
most the calls that were in flight, and never an analysis that was recorded.

Secrets (the API key, the DSN's password) are never printed: output goes through a redactor
that replaces them, and the DSN is only ever shown with its password masked.

For the benchmark harness (the ``live-services`` scenario)::

    from examples.contact_sync import build_pipeline, local_services
    with local_services(fetch_latency=..., analyze_latency=..., faults=None, seed=7,
                        time_scale=ts) as cfg, \
            build_pipeline(cfg, concurrency={"fetch": 50, ...}, time_scale=ts) as job:
        report = job.run(range(1, 1001), strategy=Batched(size=50))

``build_pipeline`` returns a ``SyncJob`` whose ``.pipeline`` is the four-stage engine
``Pipeline`` (items: contact ids or ``Contact``s; key: the contact id), whose ``run`` and
``stream`` are the pipeline's with the job's ``processes`` filled in, and whose ``close()``
releases clients and connections; ``local_services`` starts the fake servers and a throwaway
PostgreSQL (in this process: for CPU measurements start the servers in their own processes with
``python -m simulators.servers`` and build a ``SyncConfig`` by hand).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

if __package__ in (None, ""):  # run as a script from a checkout: make `engine` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import engine.adapters as _adapters
from engine import (
    CancelToken,
    CodecError,
    ItemResult,
    Ledger,
    LedgerBusy,
    LedgerError,
    Pipeline,
    RetryPolicy,
    RunReport,
    SqliteLedger,
    Stage,
    strategy_from_name,
)
from engine.adapters import (
    RETRYABLE,
    Analysis,
    Analyzed,
    Contact,
    HttpFetch,
    LLMAnalyze,
    PermanentError,
    PostgresStore,
    _ledger_pg,
    redact_dsn,
)

# engine.adapters exports it (DESIGN §11); older checkouts have it only in its module
PostgresLedger: Any = getattr(_adapters, "PostgresLedger", None) or _ledger_pg.PostgresLedger

__all__ = ["DEFAULT_CONCURRENCY", "PIPELINE_NAME", "AnalyzedCodec", "BadRecord", "Lease",
           "PerProcess", "SyncConfig", "SyncJob", "build_pipeline", "local_services", "main",
           "read_contacts", "run_sync"]

#: the pipeline's name in the ledger (its entries are keyed by it, the item key and the stage)
PIPELINE_NAME = "contact-sync"

#: the stage limits of the sync job (DESIGN §1: fetch 50, analyze 50, save 10, assign 10)
DEFAULT_CONCURRENCY: Mapping[str, int] = {"fetch": 50, "analyze": 50, "save": 10, "assign": 10}
ENV_VARS = ("DATABASE_URL", "MESSAGES_API_URL", "OPENAI_BASE_URL", "OPENAI_API_KEY",
            "OPENAI_MODEL")


class ConfigError(Exception):
    """A missing or invalid setting (exit status 2)."""


@dataclass(frozen=True)
class SyncConfig:
    """Where the job's services are. ``repr`` never shows the key or the DSN password."""

    database_url: str = field(repr=False)
    messages_api_url: str
    openai_base_url: str
    openai_api_key: str = field(repr=False)
    openai_model: str = "gpt-4o-mini"

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> SyncConfig:
        missing = [v for v in ENV_VARS[:4] if not env.get(v)]
        if missing:
            raise ConfigError(f"missing environment variable(s): {', '.join(missing)} "
                              f"(or use --demo)")
        return cls(env["DATABASE_URL"], env["MESSAGES_API_URL"], env["OPENAI_BASE_URL"],
                   env["OPENAI_API_KEY"], env.get("OPENAI_MODEL") or "gpt-4o-mini")

    @property
    def secrets(self) -> tuple[str, ...]:
        """The strings that must never be printed."""
        out = [self.openai_api_key, self.database_url]
        with contextlib.suppress(Exception):
            import psycopg2.extensions

            pw = psycopg2.extensions.parse_dsn(self.database_url).get("password")
            if pw:
                out.append(pw)
        return tuple(s for s in out if s)


@dataclass(frozen=True, slots=True)
class BadRecord:
    """A line of a contacts file that is not a usable contact; it fails with ``reason``."""

    key: str
    reason: str


def item_key(item: Contact | BadRecord | int) -> Any:
    if isinstance(item, Contact):
        return item.id
    if isinstance(item, BadRecord):
        return item.key
    return item


class AnalyzedCodec:
    """The ledger's codec for the ``analyze`` stage's output (an ``Analyzed``: frozen
    dataclasses, which JSON alone cannot hold): one JSON object with the contact (id, name,
    email, attributes), the analysis, the message count and the model. A contact whose
    attributes JSON cannot hold raises ``CodecError`` (that contact fails, with the reason)."""

    def encode(self, value: Analyzed) -> str:
        if not isinstance(value, Analyzed):
            raise CodecError(f"AnalyzedCodec: expected an Analyzed, got {type(value).__name__}")
        c, a = value.contact, value.analysis
        doc = {"contact": {"id": c.id, "name": c.name, "email": c.email,
                           "attributes": dict(c.attributes)},
               "analysis": {"stage": a.stage, "score": a.score, "summary": a.summary},
               "message_count": value.message_count, "model": value.model}
        try:
            return json.dumps(doc, ensure_ascii=False, separators=(",", ":"),
                              allow_nan=False)
        except (TypeError, ValueError, RecursionError) as exc:
            raise CodecError(f"AnalyzedCodec: contact {c.id}: cannot encode its analysis as "
                             f"JSON: {exc}") from None

    def decode(self, text: str) -> Analyzed:
        try:
            doc = json.loads(text)
            c, a = doc["contact"], doc["analysis"]
            return Analyzed(
                contact=Contact(int(c["id"]), name=c["name"], email=c["email"],
                                attributes=dict(c["attributes"])),
                analysis=Analysis(stage=a["stage"], score=float(a["score"]),
                                  summary=str(a["summary"])),
                message_count=int(doc["message_count"]), model=str(doc["model"]))
        except (TypeError, ValueError, KeyError, RecursionError) as exc:
            raise CodecError(f"AnalyzedCodec: cannot decode the stored analysis "
                             f"{text[:60]!r}: {type(exc).__name__}: {exc}") from None


def open_ledger(where: str, config: SyncConfig) -> Ledger | None:
    """The ledger ``--ledger`` names: ``db`` (a ``PostgresLedger`` in the job's database),
    ``none`` (None), or the path of a SQLite file."""
    if where == "none":
        return None
    if where == "db":
        return PostgresLedger(config.database_url, connect_timeout=10)
    return SqliteLedger(where)


class PerProcess:
    """``Stage(init=PerProcess(make))``: one client per process, shared by its worker threads.

    The engine runs a stage's ``init`` once per worker thread (in the worker process with
    ``processes=N``) and closes each worker's resource when the worker ends. The job's clients
    are thread-safe and pooled, so one per process is what is wanted: the first worker thread
    of a process calls ``make()``, every worker gets a ``Lease`` on that client, and closing the
    last lease closes the client. It pickles as ``make`` alone (a picklable object holding only
    configuration), so each process builds its own client."""

    def __init__(self, make: Callable[[], Any]) -> None:
        self.make = make
        self._lock = threading.Lock()
        self._client: Any = None
        self._leases = 0

    def __reduce__(self) -> tuple[Any, ...]:
        return (PerProcess, (self.make,))

    def __repr__(self) -> str:
        return f"PerProcess({self.make!r})"

    def __call__(self) -> Lease:
        with self._lock:
            if self._client is None:
                self._client = self.make()
            self._leases += 1
            return Lease(self, self._client)

    def _release(self) -> None:
        with self._lock:
            self._leases -= 1
            if self._leases > 0 or self._client is None:
                return
            client, self._client = self._client, None
        client.close()


class Lease:
    """A worker thread's use of its process's client (``.client``); ``close()`` gives it back."""

    __slots__ = ("_owner", "client")

    def __init__(self, owner: PerProcess, client: Any) -> None:
        self._owner: PerProcess | None = owner
        self.client = client

    def close(self) -> None:
        owner, self._owner = self._owner, None
        if owner is not None:
            owner._release()


@dataclass(frozen=True)
class _MakeFetch:
    """Builds a process's ``HttpFetch`` (a Session per worker thread inside it)."""

    url: str
    timeout: tuple[float, float]

    def __call__(self) -> HttpFetch:
        return HttpFetch(self.url, timeout=self.timeout)


@dataclass(frozen=True)
class _MakeLLM:
    """Builds a process's ``LLMAnalyze``, its connection pool sized to the process's share."""

    config: SyncConfig  # its repr hides the key
    concurrency: int
    timeout: float

    def __call__(self) -> LLMAnalyze:
        c = self.config
        return LLMAnalyze(base_url=c.openai_base_url, api_key=c.openai_api_key,
                          model=c.openai_model, concurrency=self.concurrency,
                          timeout=self.timeout)


@dataclass
class _MakeStore:
    """Builds a process's ``PostgresStore``: a pool sized to the process's share of the save
    and assign slots; the schema is the parent's to create. ``run_id`` tags the rows: the
    parent's ``start_run`` sets it before the run starts its worker processes, which get it
    with this object."""

    config: SyncConfig  # its repr hides the DSN
    concurrency: int
    run_id: int | None = None

    def __call__(self) -> PostgresStore:
        store = PostgresStore(self.config.database_url, concurrency=self.concurrency,
                              create_schema=False)
        store.run_id = self.run_id
        return store


# The stages of a job with processes > 1: module-level functions (they pickle by name), called
# with the worker's lease on its process's client.
def fetch_leased(item: Contact | BadRecord | int, lease: Lease) -> Any:
    if isinstance(item, BadRecord):
        raise PermanentError(item.reason)
    return lease.client(item)


def analyze_leased(fetched: Any, lease: Lease) -> Analyzed:
    return lease.client(fetched)


def save_leased(analyzed: Analyzed, lease: Lease) -> Analyzed:
    return lease.client.save(analyzed)


def assign_leased(analyzed: Analyzed, lease: Lease) -> Any:
    return lease.client.assign(analyzed)


class _Bookkeeping(PostgresStore):
    """The parent's store of a job with worker processes: the run's own statements on a small
    pool; ``start_run`` also hands the run's id to the worker processes' stores (through their
    maker, which they get when the run starts them)."""

    def __init__(self, dsn: str, maker: _MakeStore) -> None:
        super().__init__(dsn, concurrency=1)
        self._maker = maker

    def start_run(self, strategy: str, params: dict[str, Any]) -> int:
        self._maker.run_id = run_id = super().start_run(strategy, params)
        return run_id


def _share(limit: int, processes: int) -> int:
    """The most slots of a stage one of ``processes`` worker processes holds (the engine
    splits a limit as evenly as it can)."""
    return max(1, -(-limit // processes))


class SyncJob:
    """The four-stage pipeline and the clients it owns. ``close()`` (or ``with``) frees them.

    ``processes=1``: the clients are built here and the stages are their bound methods, run on
    threads in this process. ``processes=N > 1``: each stage gets an ``init`` that builds its
    client in each worker process (``PerProcess``), and this process keeps only a small
    PostgreSQL pool for the run's bookkeeping (``sync_runs``, ``sync_failures``)."""

    def __init__(self, config: SyncConfig, *, concurrency: Mapping[str, int] | None = None,
                 time_scale: float = 1.0, attempts: int = 4,
                 http_timeout: tuple[float, float] = (3.05, 30.0),
                 llm_timeout: float = 60.0, processes: int = 1) -> None:
        limits = {**DEFAULT_CONCURRENCY, **(concurrency or {})}
        unknown = set(limits) - set(DEFAULT_CONCURRENCY)
        if unknown:
            raise ConfigError(f"concurrency: unknown stage(s) {sorted(unknown)}; expected "
                              f"{list(DEFAULT_CONCURRENCY)}")
        if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
            raise ConfigError(f"processes: expected an int >= 1, got {processes!r}")
        self.config = config
        self.limits = limits
        self.processes = processes
        net, db = retry_policies(attempts, time_scale)
        self.fetch: HttpFetch | None = None
        self.llm: LLMAnalyze | None = None
        self.store: PostgresStore
        if processes > 1:
            maker = _MakeStore(config, _share(limits["save"], processes)
                               + _share(limits["assign"], processes))
            self.store = _Bookkeeping(config.database_url, maker)
            store = PerProcess(maker)  # save and assign share a process's pool
            stages = [
                Stage("fetch", fetch_leased, concurrency=limits["fetch"], retry=net,
                      init=PerProcess(_MakeFetch(config.messages_api_url, http_timeout))),
                Stage("analyze", analyze_leased, concurrency=limits["analyze"], retry=net,
                      checkpoint=True, codec=AnalyzedCodec(),
                      init=PerProcess(_MakeLLM(config, _share(limits["analyze"], processes),
                                               llm_timeout))),
                Stage("save", save_leased, concurrency=limits["save"], retry=db, init=store),
                Stage("assign", assign_leased, concurrency=limits["assign"], retry=db,
                      init=store),
            ]
        else:
            self.fetch = HttpFetch(config.messages_api_url, timeout=http_timeout)
            self.llm = LLMAnalyze(base_url=config.openai_base_url,
                                  api_key=config.openai_api_key, model=config.openai_model,
                                  concurrency=limits["analyze"], timeout=llm_timeout)
            try:
                # One pool for both database stages, sized to the sum of their limits.
                self.store = PostgresStore(config.database_url,
                                           concurrency=limits["save"] + limits["assign"])
            except BaseException:
                self.fetch.close()
                self.llm.close()
                raise
            fetch = self.fetch

            def fetch_contact(item: Contact | BadRecord | int) -> Any:
                if isinstance(item, BadRecord):
                    raise PermanentError(item.reason)
                return fetch(item)

            stages = [
                Stage("fetch", fetch_contact, concurrency=limits["fetch"], retry=net),
                # checkpointed: with a ledger, a paid-for analysis is never asked for again
                Stage("analyze", self.llm, concurrency=limits["analyze"], retry=net,
                      checkpoint=True, codec=AnalyzedCodec()),
                Stage("save", self.store.save, concurrency=limits["save"], retry=db),
                Stage("assign", self.store.assign, concurrency=limits["assign"], retry=db),
            ]
        self.pipeline = Pipeline(stages, key=item_key, name=PIPELINE_NAME)

    def stream(self, items: Iterable[Any], strategy: Any = None,
               **options: Any) -> Iterator[ItemResult]:
        """``self.pipeline.stream`` in the job's worker processes (``processes > 1``)."""
        return self.pipeline.stream(items, strategy, processes=_processes_of(self), **options)

    def run(self, items: Iterable[Any], strategy: Any = None, **options: Any) -> RunReport:
        """``self.pipeline.run`` in the job's worker processes (``processes > 1``)."""
        return self.pipeline.run(items, strategy, processes=_processes_of(self), **options)

    def close(self) -> None:
        if self.fetch is not None:
            self.fetch.close()
        if self.llm is not None:
            self.llm.close()
        self.store.close()

    def __enter__(self) -> SyncJob:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _processes_of(job: Any) -> int | None:
    """The engine's ``processes=`` for a job: None (threads here) unless it has more than one.
    (A job of ``SyncJob``'s interface without ``processes`` runs on threads.)"""
    n = getattr(job, "processes", 1)
    return n if n > 1 else None


def retry_policies(attempts: int, time_scale: float) -> tuple[RetryPolicy, RetryPolicy]:
    """The network stages' and the database stages' retry policies (the latter at least 6
    attempts). Backoff is in engine-clock seconds: a benchmark running its services at
    ``time_scale`` scales it too; Retry-After hints from the servers are real seconds."""
    net = RetryPolicy(attempts=attempts, backoff=0.5 * time_scale,
                      max_backoff=8.0 * time_scale, retry_on=RETRYABLE)
    db = RetryPolicy(attempts=max(attempts, 6), backoff=0.2 * time_scale,
                     max_backoff=5.0 * time_scale, retry_on=RETRYABLE)
    return net, db


def build_pipeline(config: SyncConfig, *, concurrency: Mapping[str, int] | None = None,
                   time_scale: float = 1.0, attempts: int = 4,
                   http_timeout: tuple[float, float] = (3.05, 30.0),
                   llm_timeout: float = 60.0, processes: int = 1) -> SyncJob:
    """The sync job's ``Pipeline`` over real clients, for this CLI and for the benchmark.

    ``concurrency`` overrides the stage limits (``DEFAULT_CONCURRENCY``); ``time_scale``
    scales retry backoff for services that run at a benchmark's time scale; ``attempts`` is
    the retry budget of the network stages (the database stages get at least 6);
    ``processes`` > 1 runs the stages' calls in that many worker processes, each with its own
    clients (run it with ``job.run``/``job.stream``, which pass ``processes`` on). Use::

        with build_pipeline(cfg, time_scale=0.02) as job:
            report = job.run(range(1, 1001), strategy=Continuous())
    """
    return SyncJob(config, concurrency=concurrency, time_scale=time_scale, attempts=attempts,
                   http_timeout=http_timeout, llm_timeout=llm_timeout, processes=processes)


# -- input ---------------------------------------------------------------------------------------
def read_contacts(path: Path) -> Iterator[Contact | BadRecord]:
    """Contacts from a file, lazily. A line that is not a usable contact becomes a
    ``BadRecord`` (it fails with its reason and is counted), never a crash."""
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            key = f"line {n}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield BadRecord(key, f"{path.name}:{n}: not valid UTF-8 ({exc.reason} at byte "
                                     f"{exc.start})")
                continue
            yield _parse_contact(text, key, f"{path.name}:{n}")


def _parse_contact(text: str, key: str, where: str) -> Contact | BadRecord:
    try:
        data = json.loads(text)
    except ValueError:
        return BadRecord(key, f"{where}: expected a contact id or a JSON object")
    if isinstance(data, int) and not isinstance(data, bool):
        data = {"id": data}
    if not isinstance(data, dict):
        return BadRecord(key, f"{where}: expected a contact id or a JSON object")
    cid = data.get("id")
    if isinstance(cid, bool) or not isinstance(cid, int) or not 0 < cid < 2**63:
        return BadRecord(key, f"{where}: 'id' must be a positive integer, got {cid!r}"[:200])
    fields: dict[str, str | None] = {}
    for name in ("name", "email"):
        value = data.get(name)
        if value is not None and not isinstance(value, str):
            return BadRecord(key, f"{where}: '{name}' must be a string")
        if value is not None and "\x00" in value:
            return BadRecord(key, f"{where}: '{name}' contains a NUL character")
        fields[name] = value
    attributes = {k: v for k, v in data.items() if k not in ("id", "name", "email")}
    return Contact(cid, name=fields["name"], email=fields["email"], attributes=attributes)


# -- output --------------------------------------------------------------------------------------
class Console:
    """Every line the job prints goes through here, with every secret replaced by ``***``.

    The job never prints a secret itself; this catches secrets that services echo back in
    error messages. A "secret" shorter than ``MIN_SECRET`` characters (a test key like "k") is
    not searched for: it would match ordinary words ("ok") and garble the output.
    """

    MIN_SECRET = 6

    def __init__(self, secrets: Iterable[str], out: IO[str], err: IO[str],
                 quiet: bool = False) -> None:
        self._secrets = sorted({s for s in secrets if len(s) >= self.MIN_SECRET}, key=len,
                               reverse=True)
        self.out, self.err, self.quiet = out, err, quiet

    def redact(self, text: str) -> str:
        for s in self._secrets:
            text = text.replace(s, "***")
        return text

    def say(self, text: str = "") -> None:
        print(self.redact(text), file=self.out, flush=True)

    def note(self, text: str, end: str = "\n") -> None:
        if not self.quiet:
            print(self.redact(text), file=self.err, end=end, flush=True)


def engine_progress(console: Console) -> Any:
    """What the job passes as the engine's ``progress=``: nothing with ``--quiet``, else the
    console's stderr, where the engine draws its own display (a tqdm bar on a terminal, a
    plain line now and then otherwise). It shows stage names and counts only, never a value
    or a secret."""
    return False if console.quiet else console.err


class Tally:
    """Counts results as they stream by, for the summary (the engine draws the progress).

    Keeps counters only (per stage, and at most ``MAX_REASONS`` distinct failure reasons):
    memory does not grow with the number of contacts."""

    MAX_REASONS = 200

    def __init__(self) -> None:
        self.ok = self.failed = self.cancelled = 0
        self.already_done = 0  # ok from the ledger: every stage restored, nothing run
        self.restored = 0  # resumed past a recorded analysis: no second LLM call
        self.t0 = time.perf_counter()
        self.busy: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.reasons: dict[tuple[str, str, str], int] = {}

    @property
    def done(self) -> int:
        return self.ok + self.failed + self.cancelled

    def add(self, r: ItemResult) -> None:
        if r.status == "ok":
            self.ok += 1
        elif r.status == "failed":
            self.failed += 1
        else:
            self.cancelled += 1
        if r.stages and r.stages[0].resumed:
            if r.stages[-1].resumed:
                self.already_done += 1
            else:
                self.restored += 1
        for span in r.stages:
            for a in span.attempts:
                self.busy[span.name] = self.busy.get(span.name, 0.0) + (a.end - a.start)
                self.calls[span.name] = self.calls.get(span.name, 0) + 1
        if r.error is not None:
            msg = r.error.message
            if isinstance(r.key, int):  # group "contact 7" and "contact 8" under one reason
                msg = msg.replace(f"/{r.key}/", "/{id}/")
            reason = (r.error.stage, r.error.type, msg[:160])
            if reason not in self.reasons and len(self.reasons) >= self.MAX_REASONS:
                reason = (r.error.stage, r.error.type, "(other reasons)")  # memory stays O(1)
            self.reasons[reason] = self.reasons.get(reason, 0) + 1


# -- the run -------------------------------------------------------------------------------------
STRATEGIES = ("continuous", "batched", "parallel-batches")


def make_strategy(name: str, batch_size: int, lanes: int) -> Any:
    params: dict[str, Any] = {"batched": {"size": batch_size},
                              "parallel-batches": {"lanes": lanes, "size": batch_size}
                              }.get(name, {})
    return strategy_from_name(name, **params)  # the engine's one factory


def run_sync(job: Any, contacts: Iterable[Contact | BadRecord | int], *, strategy: Any,
             resume: bool, console: Console, total: int | None = None,
             cancel: CancelToken | None = None, ledger: Ledger | None = None,
             retry_failed: bool = False) -> int:
    """Run the job, record every outcome durably, print the summary; return the exit status.

    With a ``ledger`` the run is durable: ``resume`` goes on from what it recorded (else the
    run starts over: the ledger forgets the job first), ``retry_failed`` replays its dead
    letters too. ``job``: a ``SyncJob``, or anything with its ``config``, ``limits``,
    ``pipeline`` and ``store`` (and optionally ``processes``). Progress is the engine's
    (``engine_progress``), on the console's stderr; it counts the total itself when
    ``contacts`` is a range or a list (``total`` is accepted for older callers, not needed)."""
    store = job.store
    resume = resume or retry_failed
    if resume and ledger is None:
        console.note("contact_sync.py: error: --resume and --retry-failed need a ledger "
                     "(--ledger db or a file, not none)")
        return 2
    if ledger is not None and not resume:
        try:
            forget(ledger, store, job.pipeline.name or PIPELINE_NAME)
        except LedgerBusy as exc:
            console.note(f"contact_sync.py: error: cannot start: {exc}")
            return 2
        except LedgerError as exc:
            console.note(f"contact_sync.py: error: cannot start: the ledger: {exc}")
            return 2
    run_id = store.start_run(strategy.name, dict(strategy.params))  # before the workers start
    processes = _processes_of(job)
    where = ("none" if ledger is None else "the job's database"
             if isinstance(ledger, PostgresLedger) else str(ledger))
    console.note(f"sync run {run_id}: strategy {strategy.name} {dict(strategy.params)}, "
                 f"limits {job.limits}"
                 f"{f', {processes} worker processes' if processes else ''}, "
                 f"database {redact_dsn(job.config.database_url)}, "
                 f"ledger {where}{' (resuming)' if resume else ''}")
    tally = Tally()
    status = "crashed"  # until the loop ends one way or another
    try:
        for r in job.pipeline.stream(contacts, strategy, cancel=cancel, ledger=ledger,
                                     retry_failed=retry_failed, processes=processes,
                                     progress=engine_progress(console)):
            tally.add(r)
            if r.status != "ok":
                err = r.error
                store.record_failure(str(r.key), r.key if isinstance(r.key, int) else None,
                                     r.status, err.stage if err else None,
                                     err.type if err else None, err.message if err else None)
        status = "ok" if tally.failed == tally.cancelled == 0 else "failed"
    except KeyboardInterrupt:
        status = "cancelled"
    except LedgerBusy as exc:
        console.note(f"contact_sync.py: error: cannot start: {exc}")
        status = "busy"
    except Exception as exc:  # the input or the bookkeeping failed (e.g. the database is gone)
        status = "crashed"
        console.note(f"contact_sync.py: error: the run stopped: {type(exc).__name__}: {exc}")
    finally:
        with contextlib.suppress(Exception):
            store.finish_run(status="failed" if status == "busy" else status,
                             total=tally.done, ok=tally.ok, failed=tally.failed,
                             cancelled=tally.cancelled, skipped=tally.already_done)
    summarize(console, job, tally, strategy, status)
    if status == "cancelled":
        return 130
    if status == "busy":
        return 2
    return 0 if status == "ok" else 1


def forget(ledger: Ledger, store: PostgresStore, name: str) -> None:
    """Start over: delete what ``ledger`` holds for pipeline ``name``, holding the name's lock
    meanwhile (``LedgerBusy`` if a run of the job is going on). The engine's ``Ledger`` has no
    such method yet: this deletes the rows of its documented table (``conveyor_ledger``)."""
    ledger.open(name)  # creates the table if missing; exclusive use of the name
    try:
        if isinstance(ledger, PostgresLedger):  # the job's own database: the store's pool
            store.execute(f'DELETE FROM "{ledger.table}" WHERE pipeline = %s', (name,))
        elif isinstance(ledger, SqliteLedger):
            import sqlite3

            conn = sqlite3.connect(ledger.path, timeout=ledger.timeout)
            try:
                with conn:
                    conn.execute("DELETE FROM conveyor_ledger WHERE pipeline = ?", (name,))
            finally:
                conn.close()
        else:  # pragma: no cover - open_ledger makes only those two
            raise LedgerError(f"cannot start over with {ledger!r}: use --resume")
    finally:
        ledger.release(name)


def summarize(console: Console, job: SyncJob, p: Tally, strategy: Any,
              status: str) -> None:
    wall = time.perf_counter() - p.t0
    notes = []
    if p.already_done:
        notes.append(f"{p.already_done} skipped: already done")
    if p.restored:
        notes.append(f"{p.restored} analyses restored from the ledger")
    said = f" ({'; '.join(notes)})" if notes else ""
    console.say(f"contact sync {status}: {p.done} contacts with strategy {strategy.name}{said}")
    console.say(f"  ok {p.ok}, failed {p.failed}, cancelled {p.cancelled}")
    console.say(f"  wall {wall:.2f} s, throughput {p.ok / wall if wall > 0 else 0:.1f} "
                f"contacts/s")
    if p.busy:
        # The busiest stage relative to its slots is the one that bounds throughput.
        def share(name: str) -> float:
            return p.busy[name] / (job.limits[name] * wall) if wall > 0 else 0.0

        slow = max(p.busy, key=share)
        mean = p.busy[slow] / max(p.calls[slow], 1)
        console.say(f"  slowest stage: {slow} ({share(slow):.0%} of its {job.limits[slow]} "
                    f"slots busy, {mean * 1000:.0f} ms per call)")
    if p.reasons:
        console.say("  failures by reason:")
        for (stage, kind, msg), n in sorted(p.reasons.items(), key=lambda kv: -kv[1])[:8]:
            console.say(f"    {n:>5} x {stage} {kind}: {msg}")


# -- CLI -----------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="contact_sync.py",
        description="Sync CRM contacts: fetch messages, analyze with an LLM, save, assign. "
                    f"Config from the environment: {', '.join(ENV_VARS)}.")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--contacts", type=_positive_int, metavar="N", help="contact ids 1..N")
    src.add_argument("--contacts-file", type=Path, metavar="F",
                     help="one contact per line: an id or a JSON object with 'id'")
    ap.add_argument("--strategy", choices=STRATEGIES, default="continuous")
    ap.add_argument("--batch-size", type=_positive_int, default=50, metavar="N")
    ap.add_argument("--lanes", type=_positive_int, default=3, metavar="N")
    ap.add_argument("--processes", type=_positive_int, default=1, metavar="N",
                    help="run the stages' calls in N worker processes, each with its own "
                         "clients and a share of every stage's slots (default: 1, threads in "
                         "this process)")
    ap.add_argument("--async", dest="use_async", action="store_true",
                    help="every stage as an async def call on one event loop (AsyncHttpFetch, "
                         "AsyncLLMAnalyze, AsyncPostgresStore: pip install 'conveyor[async]') "
                         "instead of clients on worker threads")
    ap.add_argument("--resume", action="store_true",
                    help="go on from what the ledger recorded: skip contacts already done, "
                         "never analyse a contact twice")
    ap.add_argument("--retry-failed", action="store_true",
                    help="--resume, and replay the failures the ledger recorded")
    ap.add_argument("--ledger", default="db", metavar="db|none|PATH",
                    help="where the run's progress is recorded: db (the job's PostgreSQL "
                         "database, the default), a SQLite file, or none")
    ap.add_argument("--demo", action="store_true",
                    help="start fake servers and a throwaway PostgreSQL, then run against them")
    ap.add_argument("--quiet", action="store_true",
                    help="no progress on stderr (the engine's: a bar on a terminal, a line "
                         "now and then otherwise)")
    args = ap.parse_args(argv)
    if args.use_async and args.processes != 1:
        ap.error("--async runs every call on one event loop, in one process: not with "
                 "--processes")
    if args.contacts_file is not None and not args.contacts_file.is_file():
        ap.error(f"--contacts-file: no such file: {args.contacts_file}")
    if args.contacts is None and args.contacts_file is None:
        if not args.demo:
            ap.error("one of --contacts N or --contacts-file F is required")
        args.contacts = 200
    return args


def _close_ledger(ledger: Ledger, console: Console) -> None:
    try:
        ledger.close()
    except LedgerError as exc:  # a write that failed: said once, the run's status stands
        console.note(f"contact_sync.py: error: the ledger: {exc}")


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return n


#: the demo's services: tens of milliseconds per call, a few percent of faults
DEMO_FETCH_LATENCY = {"dist": "lognormal", "median": 0.05, "p99": 0.3}
DEMO_ANALYZE_LATENCY = {"dist": "lognormal", "median": 0.1, "p99": 0.6}


@contextlib.contextmanager
def local_services(*, fetch_latency: Any = DEMO_FETCH_LATENCY,
                   analyze_latency: Any = DEMO_ANALYZE_LATENCY, faults: Any = "demo",
                   seed: int = 1, time_scale: float = 1.0,
                   console: Console | None = None) -> Iterator[SyncConfig]:
    """Everything the job needs, on this machine: the simulators' fake messages and OpenAI
    servers (latency specs in scenario seconds, slept ``* time_scale``; ``faults`` a
    ``simulators.servers.ServerFaults``, None, or "demo" for a few percent of 5xx, 429 and
    dropped connections) and a throwaway PostgreSQL. Yields the ``SyncConfig`` pointing at
    them; stops and deletes everything on exit. Used by ``--demo`` and by the benchmark."""
    import secrets as _secrets

    from examples._throwaway_pg import ThrowawayPostgres
    from simulators.servers import MessagesServer, OpenAIServer, ServerFaults

    if faults == "demo":
        faults = ServerFaults(error_rate=0.02, throttle_rate=0.01, drop_rate=0.005,
                              retry_after=0.2)
    with contextlib.ExitStack() as stack:
        if console is not None:
            console.note("starting a throwaway PostgreSQL and the fake servers ...")
        pg = stack.enter_context(ThrowawayPostgres())
        msgs = stack.enter_context(MessagesServer(latency=fetch_latency, seed=seed,
                                                  time_scale=time_scale, faults=faults))
        llm = stack.enter_context(OpenAIServer(latency=analyze_latency, seed=seed + 1,
                                               time_scale=time_scale, faults=faults))
        yield SyncConfig(pg.dsn, msgs.url, llm.url + "/v1", "demo-" + _secrets.token_hex(8),
                         "gpt-4o-mini")


def main(argv: list[str] | None = None, *, env: Mapping[str, str] = os.environ,
         out: IO[str] = sys.stdout, err: IO[str] = sys.stderr) -> int:
    args = parse_args(argv)
    with contextlib.ExitStack() as stack:
        plain = Console((), out, err, args.quiet)
        try:
            if args.demo:
                config = stack.enter_context(local_services(console=plain))
            else:
                config = SyncConfig.from_env(env)
        except ConfigError as exc:
            plain.note(f"contact_sync.py: error: {exc}")
            return 2
        console = Console(config.secrets, out, err, args.quiet)
        try:
            if args.use_async:  # imported here: the async example imports this module
                from examples.contact_sync_async import build_async_pipeline

                job: Any = stack.enter_context(build_async_pipeline(config))
            else:
                job = stack.enter_context(build_pipeline(config, processes=args.processes))
        except Exception as exc:  # unreachable database and the like: one clear line
            console.note(f"contact_sync.py: error: cannot start: {exc}")
            return 2
        # a range: the engine knows the total (its progress shows "120/500")
        contacts: Iterable[Any] = (read_contacts(args.contacts_file)
                                   if args.contacts_file is not None
                                   else range(1, args.contacts + 1))
        strategy = make_strategy(args.strategy, args.batch_size, args.lanes)
        try:
            ledger = open_ledger(args.ledger, config)
        except (ValueError, LedgerError) as exc:
            console.note(f"contact_sync.py: error: --ledger: {exc}")
            return 2
        if ledger is not None:
            stack.callback(_close_ledger, ledger, console)
        return run_sync(job, contacts, strategy=strategy, resume=args.resume,
                        console=console, ledger=ledger, retry_failed=args.retry_failed)
    return 2  # pragma: no cover -- ExitStack does not swallow; keeps type checkers content


if __name__ == "__main__":
    # Run the job from the importable module when there is one (a checkout): with --processes
    # the stages and their init are pickled by reference to their module, and a worker process
    # can import ``examples.contact_sync`` but not a ``__main__`` that ``runpy`` or ``-c`` made.
    try:
        from examples.contact_sync import main as _main
    except ImportError:  # the script copied out of the checkout: __main__ it is
        _main = main
    sys.exit(_main())
