"""The ``live-services`` benchmark: the example sync job on real clients and a real database.

    python -m bench live-services [--items N] [--strategies A,B] [--time-scale X]
                                  [--processes N] [--out DIR]

The four-stage pipeline of ``examples/contact_sync.py`` -- fetch over ``requests`` -> analyze
over the ``openai`` client -> save and assign over ``psycopg2`` -- against the simulators' fake
messages and OpenAI servers on 127.0.0.1 and a throwaway PostgreSQL 15: 1,000 contacts; fetch
50 concurrent at a 300 ms median, analyze 50 concurrent at 500 ms, each with a 2% slow tail at
10x the median (98% lognormal median m, p99 3m; 2% a constant 10m); save and assign 10
concurrent, whatever PostgreSQL takes. Latencies are scenario seconds, slept ``* time_scale``.

It is not a scenario file: the schema of DESIGN.md section 5 describes simulated stages, and
this workload's save/assign latency is whatever the database does, so its parameters live here
and on the command line. It is not part of the default suite either: it needs PostgreSQL's
binaries (the default suite needs no service) and takes about 80 s.

Each strategy runs in its own spawned process (like the harness's live runs), which starts the
two fake servers as *separate processes* (``python -m simulators.servers``: their CPU is theirs,
and they do not compete with the pipeline for its GIL) and a throwaway PostgreSQL cluster, runs
the pipeline once, and writes ``<out>/live-services/<strategy>.json`` (DESIGN.md section 6,
clock "live", times divided by ``time_scale``). The CPU of the run window -- user + sys of the
pipeline process (with its worker processes under ``--processes N``), of the two server
processes and of the whole PostgreSQL process tree -- and the row counts in the database after
the run go into the file's metadata (``cpu_s``, ``rows``).

``--processes N`` runs the job's stages in N worker processes (``build_pipeline(...,
processes=N)``: each builds its own clients, the scheduler stays in the pipeline process) and
records ``processes`` in the metadata; the files keep their names, so a run with another N
replaces them. The run's progress is the engine's own (``progress=True`` in the run's process:
a tqdm bar on a terminal, a plain line now and then otherwise, on this command's stderr).

Choosing ``time_scale`` (measured on this 2-core machine, continuous, 1,000 contacts): one
contact costs ~9-10 ms of CPU across the pipeline process, the servers and PostgreSQL (~5.5 ms
once the PostgreSQL pool keeps its connections -- see the note in ``report.md``), so the run
must be long enough in real time that the CPUs keep up; otherwise the measured time is CPU
queueing, not scheduling. The makespan (scenario seconds) at time_scale 0.3 / 0.4 / 0.5 / 0.6 /
1.0 was 20.0-22.5 / 15.3-16.0 / 15.2 / 15.4 / 15.6: from 0.4 on it no longer depends on the
scale (latency-bound), at 0.3 it does (CPU-bound). Efficiency stayed 0.87-0.93 throughout,
because the lower bound is computed from the measured call durations, which stretch with the
CPU queueing too. 0.4 (real medians 120 ms / 200 ms) keeps the three runs at ~80 s.
"""
from __future__ import annotations

import contextlib
import json
import os
import resource
import select
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from bench._build import gc_paused
from bench._harness import run_in_child
from bench._metrics import validate
from bench._progress import Progress
from bench._results import REPO_ROOT, git_commit, read_doc, result_path, write_doc

__all__ = [
    "DEFAULT_ITEMS",
    "DEFAULT_TIME_SCALE",
    "NAME",
    "LiveServicesSpec",
    "run_live_services",
]

NAME = "live-services"
DEFAULT_ITEMS = 1000
#: real sleep = scenario latency x this: 120 ms / 200 ms medians; ~6 s for a continuous run,
#: ~50 s batched (the smallest scale at which the continuous makespan stops depending on it)
DEFAULT_TIME_SCALE = 0.4
SEED = 7
CONCURRENCY: Mapping[str, int] = {"fetch": 50, "analyze": 50, "save": 10, "assign": 10}
STRATEGY_PARAMS: Mapping[str, Mapping[str, Any]] = {
    "continuous": {},
    "batched": {"size": 50},
    "parallel-batches": {"lanes": 3, "size": 50},
}


def slow_tail(median: float) -> dict[str, Any]:
    """98% lognormal (median m, p99 3m), 2% a constant 10m: the scenario's latency spec."""
    return {"dist": "mixture", "parts": [
        {"weight": 0.98, "dist": "lognormal", "median": median, "p99": round(3 * median, 9)},
        {"weight": 0.02, "dist": "constant", "value": round(10 * median, 9)}]}


@dataclass(frozen=True)
class LiveServicesSpec:
    items: int = DEFAULT_ITEMS
    time_scale: float = DEFAULT_TIME_SCALE
    seed: int = SEED
    fetch_latency: Mapping[str, Any] = field(default_factory=lambda: slow_tail(0.3))
    analyze_latency: Mapping[str, Any] = field(default_factory=lambda: slow_tail(0.5))
    concurrency: Mapping[str, int] = field(default_factory=lambda: dict(CONCURRENCY))
    processes: int = 1  #: worker processes of the job (1: threads in the pipeline process)

    @property
    def description(self) -> str:
        return (f"the sync job on real services: {self.items:,} contacts; fetch over requests "
                f"({self.concurrency['fetch']} concurrent, 300 ms median) and analyze over "
                f"openai ({self.concurrency['analyze']}, 500 ms) against the fake servers on "
                f"loopback, 2% of each at 10x the median; save and assign "
                f"({self.concurrency['save']}/{self.concurrency['assign']}) into a throwaway "
                "PostgreSQL 15"
                + (f"; the stages in {self.processes} worker processes" if self.processes > 1
                   else ""))

    def to_dict(self) -> dict[str, Any]:
        return {"items": self.items, "time_scale": self.time_scale, "seed": self.seed,
                "fetch_latency": dict(self.fetch_latency),
                "analyze_latency": dict(self.analyze_latency),
                "concurrency": dict(self.concurrency), "processes": self.processes}


# --------------------------------------------------------------------------- CPU accounting

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_cpu(pid: int, *, children: bool = False) -> float:
    """user + sys seconds of ``pid`` (with ``children``: plus its reaped children's)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rpartition(")")[2].split()
    # fields[0] is field 3 (state): utime is field 14, stime 15, cutime 16, cstime 17
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / _TICK


def _tree_cpu(root: int) -> float:
    """user + sys seconds of ``root``, its reaped children and its live children (one level:
    PostgreSQL's postmaster and its backends and workers)."""
    total = _proc_cpu(root, children=True)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", encoding="ascii") as f:
                fields = f.read().rpartition(")")[2].split()
            if int(fields[1]) == root:  # field 4: ppid
                total += (int(fields[11]) + int(fields[12])) / _TICK
        except (OSError, ValueError, IndexError):
            continue  # it exited meanwhile: its time moved into the root's cutime
    return total


def _self_cpu() -> float:
    """user + sys seconds of this process and of its children reaped so far (during a run:
    the job's worker processes, which the run joins before it returns)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        ru = resource.getrusage(who)
        total += ru.ru_utime + ru.ru_stime
    return total


# --------------------------------------------------------------------------- the child


@contextlib.contextmanager
def _server(kind: str, latency: Mapping[str, Any], seed: int, time_scale: float
            ) -> Iterator[tuple[str, int]]:
    """``python -m simulators.servers KIND`` in its own process; yields (url, pid)."""
    with tempfile.TemporaryFile("w+", encoding="utf-8") as log:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT),
                                                        env.get("PYTHONPATH")) if p)
        proc = subprocess.Popen(
            [sys.executable, "-m", "simulators.servers", kind, "--port", "0",
             "--latency", json.dumps(latency), "--seed", str(seed),
             "--time-scale", repr(time_scale)],
            stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, text=True, env=env)
        try:
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], 60)
            url = proc.stdout.readline().strip() if ready else ""
            if not url.startswith("http"):
                proc.kill()
                proc.wait(10)
                log.seek(0)
                raise RuntimeError(f"fake {kind} server did not start: {log.read()[-500:]}")
            yield url, proc.pid
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
            if proc.stdout is not None:
                proc.stdout.close()


def _count_rows(dsn: str) -> dict[str, int]:
    import psycopg2  # the adapters' driver; only the child (which has PostgreSQL) needs it

    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            out = {}
            for table in ("contacts", "analyses", "pipeline_assignments"):
                cur.execute(f"SELECT count(*) FROM {table}")  # fixed table names, no input
                row = cur.fetchone()
                out[table] = int(row[0]) if row else 0
            return out
    finally:
        conn.close()


def _sessions(dsn: str) -> int:
    """``pg_stat_database.sessions`` of the database (PostgreSQL 14+): connections opened so
    far, this probe's own included."""
    import psycopg2

    conn = psycopg2.connect(dsn)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT pg_stat_force_next_flush()")
            cur.execute("SELECT sessions FROM pg_stat_database WHERE datname = "
                        "current_database()")
            row = cur.fetchone()
            return int(row[0]) if row else 0
    finally:
        conn.close()


def _postmaster_pid(data_dir: Path) -> int:
    return int((data_dir / "postmaster.pid").read_text().splitlines()[0])


def _child(spec_doc: Mapping[str, Any], strategy: str, path: str, counter: Any) -> None:
    """Runs in a spawned process: servers, PostgreSQL, one run of ``strategy``, its file.
    (``counter``, ``run_in_child``'s count of visible items, is not needed: the run draws the
    engine's progress itself.)"""
    try:
        doc = _run_one(spec_doc, strategy)
        write_doc(doc, Path(path))
    except BaseException:
        Path(path + ".error").write_text(traceback.format_exc(), encoding="utf-8")
        raise


def _run_one(spec_doc: Mapping[str, Any], strategy: str) -> dict[str, Any]:
    # Why bench imports `examples` here, and only here: the live-services benchmark *is* the
    # example sync job (its pipeline, adapters and throwaway PostgreSQL), and the bench package
    # must still import where `examples` is absent (it is not installed, only in the checkout).
    # This function runs only in the spawned child of a live-services run.
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from engine import strategy_from_name
    from examples._throwaway_pg import ThrowawayPostgres
    from examples.contact_sync import SyncConfig, build_pipeline

    spec = LiveServicesSpec(**spec_doc)
    ts = spec.time_scale
    strat: Any = strategy_from_name(strategy, **dict(STRATEGY_PARAMS[strategy]))
    with contextlib.ExitStack() as stack:
        pg = stack.enter_context(ThrowawayPostgres())
        msgs_url, msgs_pid = stack.enter_context(
            _server("messages", spec.fetch_latency, spec.seed, ts))
        llm_url, llm_pid = stack.enter_context(
            _server("openai", spec.analyze_latency, spec.seed + 1, ts))
        cfg = SyncConfig(pg.dsn, msgs_url, llm_url + "/v1", "bench-not-a-secret",
                         "gpt-4o-mini")
        job = stack.enter_context(build_pipeline(cfg, concurrency=spec.concurrency,
                                                 time_scale=ts, processes=spec.processes))
        pm = _postmaster_pid(pg.data_dir)
        sessions0 = _sessions(pg.dsn)
        load = os.getloadavg()[0]
        cpu0 = (_self_cpu(), _proc_cpu(msgs_pid) + _proc_cpu(llm_pid), _tree_cpu(pm))
        t0 = time.perf_counter()
        with gc_paused():  # see bench._build.gc_paused
            report = job.run(range(1, spec.items + 1), strat, progress=True)
        wall = time.perf_counter() - t0
        cpu1 = (_self_cpu(), _proc_cpu(msgs_pid) + _proc_cpu(llm_pid), _tree_cpu(pm))
        rows = _count_rows(pg.dsn)
        # minus the second probe's own session
        pg_connections = _sessions(pg.dsn) - sessions0 - 1
    cpu = {k: round(b - a, 3) for k, a, b in zip(("pipeline", "servers", "postgres"), cpu0,
                                                   cpu1, strict=True)}
    cpu["total"] = round(sum(cpu.values()), 3)
    meta: dict[str, Any] = {
        "scenario": NAME, "seed": spec.seed, "time_scale": ts, "processes": spec.processes,
        "git_commit": git_commit(),
        "description": spec.description, "source": "bench/_live_services.py",
        "wall_s": round(wall, 4), "load_avg_1m": round(load, 2),
        "services": {"fetch_latency": dict(spec.fetch_latency),
                     "analyze_latency": dict(spec.analyze_latency),
                     "servers": "python -m simulators.servers, one process each",
                     "database": "throwaway PostgreSQL 15 cluster"},
        #: user + sys seconds during the run (pipeline.run), per process group; "pipeline"
        #: includes the job's worker processes (--processes N)
        "cpu_s": cpu,
        "cpu_share_of_machine": round(cpu["total"] / (wall * (os.cpu_count() or 1)), 3)
        if wall > 0 else None,
        "rows": rows,
        #: PostgreSQL connections the pipeline opened during the run (its pool's size: 21;
        #: with N worker processes, each process's pool and the bookkeeping one)
        "pg_connections_opened": pg_connections,
    }
    return report.to_json(metadata=meta, time_scale=ts)


# --------------------------------------------------------------------------- the parent


@dataclass(frozen=True)
class LiveOutcome:
    strategy: str
    path: Path
    ok: bool
    message: str
    problems: tuple[str, ...] = ()


def run_live_services(spec: LiveServicesSpec, *, strategies: Sequence[str] | None, out: Path,
                      progress: Progress | None = None, plots: bool = True,
                      stream: IO[str] | None = None) -> tuple[list[LiveOutcome], Path | None]:
    """Run each strategy in its own process, then write the report; returns the outcomes and
    the report's path (None when no run produced a file)."""
    names = list(strategies) if strategies else list(STRATEGY_PARAMS)
    progress = progress or Progress(len(names))
    outcomes = []
    for name in names:
        path = result_path(out, NAME, name)
        path.unlink(missing_ok=True)
        procs = f" processes={spec.processes}" if spec.processes > 1 else ""
        label = f"{NAME} live x{spec.time_scale:g}{procs} {name}"
        progress.start(label, spec.items, announce=True)
        t0 = time.perf_counter()
        try:
            run_in_child(_child, (spec.to_dict(), name, str(path)), name=f"bench {label}",
                         path=path, progress=progress)
            doc = read_doc(path)
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            msg = f"{label}: FAILED: {type(exc).__name__}: {exc}".replace("\n", " ")
            outcomes.append(LiveOutcome(name, path, False, msg))
            progress.done(msg)
            continue
        problems = tuple(validate(doc))
        s, m = doc["summary"], doc["metadata"]
        msg = (f"{label}: makespan {s['makespan_s']:.1f} s, {s['throughput_per_s']:.2f} items/s,"
               f" efficiency {s['efficiency']:.3f}, ok {s['ok']}, failed {s['failed']}, CPU "
               f"{m['cpu_s']['total']:.1f} s ({time.perf_counter() - t0:.1f} s)")
        if problems:
            msg += f"  INVALID: {problems[0]}"
        outcomes.append(LiveOutcome(name, path, not problems, msg, problems))
        progress.done(msg)
    report = None
    if any(p.path.exists() for p in outcomes):
        from bench._live_report import write_live_report

        report = write_live_report(out, plots=plots)
    return outcomes, report
