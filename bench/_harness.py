"""Running jobs: one strategy of one scenario on one clock, written to one results file.

Virtual runs take a fraction of a second and run in this process. Each live run is isolated in
its own freshly spawned process (DESIGN.md section 7), so one run's threads, caches and garbage
never disturb the next one's timing; the child writes its results file and counts visible
items into a shared integer that the parent reads for the progress bar.

    parent ── spawn ──> child: parse scenario, build pipeline, run live, write JSON
       └─ polls child's item counter every 0.1 s for the bar; joins; reads the file back
"""
from __future__ import annotations

import multiprocessing as mp
import os
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench._build import Clock, run_once
from bench._metrics import validate
from bench._progress import Progress
from bench._results import read_doc, result_path, write_doc
from bench._scenario import Scenario, parse_scenario

__all__ = ["Job", "Outcome", "execute", "plan", "run_in_child"]


@dataclass(frozen=True)
class Job:
    scenario: Scenario
    strategy: str
    clock: Clock
    path: Path
    time_scale: float | None = None  #: live only; default: the scenario's
    repeat: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        clock = "virtual" if self.clock == "virtual" else \
            f"live x{self.time_scale or self.scenario.time_scale:g}"
        rep = f" r{self.repeat}" if self.repeat is not None else ""
        var = f" [{self.scenario.variant}]" if self.scenario.variant else ""
        return f"{self.scenario.name}{var} {clock} {self.strategy}{rep}"


@dataclass(frozen=True)
class Outcome:
    job: Job
    ok: bool
    message: str  #: one line: the headline figures, or what went wrong
    problems: tuple[str, ...] = ()
    wall_s: float = 0.0


def plan(sc: Scenario, *, strategies: Sequence[str] | None, clock: Clock, repeats: int,
         time_scale: float | None, out: Path, extra: Mapping[str, Any] | None = None
         ) -> list[Job]:
    """The jobs of ``run``: ``<out>/<scenario>/<strategy>.json``, or ``-rN`` per repeat; a
    variant's under ``<out>/<scenario>/<variant>/``.

    Live runs are always numbered (``-r1`` ...), so they never overwrite the virtual run of the
    same strategy. Live repeats use the same seed (the spread is the live engine's noise);
    virtual runs are deterministic, so virtual repeats use seeds ``seed``, ``seed + 1``, ...
    (the spread is the workload's).
    """
    names = list(strategies) if strategies else [s.name for s in sc.strategies]
    jobs = []
    for r in range(1, repeats + 1):
        numbered = clock == "live" or repeats > 1
        rsc = sc
        if clock == "virtual" and r > 1:
            rsc = parse_scenario(dict(sc.raw, seed=sc.seed + r - 1), source=sc.source)
        for name in names:
            path = result_path(out, sc.name, name, r if numbered else None, sc.variant)
            jobs.append(Job(rsc, name, clock, path, time_scale, r if numbered else None,
                            dict(extra or {})))
    return jobs


def _live_child(raw: Mapping[str, Any], source: str, strategy: str, time_scale: float | None,
                repeat: int | None, path: str, extra: Mapping[str, Any], counter: Any) -> None:
    """Runs in a spawned process: one live run, written to ``path``."""
    try:
        sc = parse_scenario(raw, source=source)

        def on_result(_: object) -> None:
            counter.value += 1

        # the engine's progress, drawn on this process's stderr (the parent's: inherited)
        doc = run_once(sc, strategy, clock="live", time_scale=time_scale, repeat=repeat,
                       on_result=on_result, extra=extra, progress=True)
        write_doc(doc, Path(path))
    except BaseException:
        Path(path + ".error").write_text(traceback.format_exc(), encoding="utf-8")
        raise


def _run_live(job: Job, progress: Progress) -> None:
    run_in_child(_live_child, (dict(job.scenario.raw), job.scenario.source, job.strategy,
                               job.time_scale, job.repeat, str(job.path), dict(job.extra)),
                 name=f"bench {job.label}", path=job.path, progress=progress)


def run_in_child(target: Callable[..., None], args: tuple[Any, ...], *, name: str, path: Path,
                 progress: Progress) -> None:
    """Run ``target(*args, counter)`` in a freshly spawned process that writes ``path``.

    ``counter`` is a shared integer the child bumps per visible item (the parent polls it for
    the progress bar). On failure the child leaves its traceback in ``<path>.error``; its last
    line becomes this function's ``RuntimeError``.
    """
    ctx = mp.get_context("spawn")
    counter = ctx.RawValue("i", 0)  # one writer (the child); the parent only reads
    err = Path(str(path) + ".error")
    err.unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    proc = ctx.Process(target=target, name=name, args=(*args, counter))
    proc.start()
    try:
        while proc.is_alive():
            proc.join(0.1)
            progress.update(counter.value)
    except KeyboardInterrupt:
        proc.join(10)  # the child got the Ctrl-C too: it cancels, settles and exits
        if proc.is_alive():
            proc.terminate()
            proc.join(5)
        raise
    if proc.exitcode != 0:
        detail = err.read_text(encoding="utf-8").strip().splitlines() if err.exists() else []
        err.unlink(missing_ok=True)
        raise RuntimeError(f"live run exited with code {proc.exitcode}"
                           + (f": {detail[-1]}" if detail else ""))


def _remove_stale(job: Job) -> None:
    """A previous run of the same scenario, strategy and clock with other repeat numbers would
    be mixed into the report: remove it (files of the other clock stay)."""
    d = job.path.parent
    for p in [d / f"{job.strategy}.json", *d.glob(f"{job.strategy}-r*.json")]:
        if not p.exists():
            continue
        try:
            clock = read_doc(p).get("metadata", {}).get("clock")
        except (OSError, ValueError):
            continue
        if clock == job.clock:
            p.unlink()


def execute(jobs: Sequence[Job], progress: Progress | None = None) -> list[Outcome]:
    """Run the jobs in order, writing and then re-checking each results file."""
    progress = progress or Progress(len(jobs))
    cleaned: set[tuple[Path, str, str]] = set()
    outcomes = []
    for job in jobs:
        key = (job.path.parent, job.strategy, job.clock)
        if key not in cleaned:
            _remove_stale(job)
            cleaned.add(key)
        progress.start(job.label, job.scenario.items, announce=job.clock == "live")
        t0 = time.perf_counter()
        try:
            if job.clock == "live":
                _run_live(job, progress)
            else:
                doc = run_once(job.scenario, job.strategy, clock="virtual", repeat=job.repeat,
                               extra=job.extra)
                write_doc(doc, job.path)
            doc = read_doc(job.path)  # check what was saved, not what was in memory
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # one failing run must not lose the others
            msg = f"{job.label}: FAILED: {type(exc).__name__}: {exc}".replace("\n", " ")
            outcomes.append(Outcome(job, False, msg, wall_s=time.perf_counter() - t0))
            progress.done(msg)
            continue
        wall = time.perf_counter() - t0
        problems = tuple(validate(doc))
        s = doc["summary"]
        msg = (f"{job.label}: makespan {s['makespan_s']:.1f} s, {s['throughput_per_s']:.2f} "
               f"items/s, p99 visible {s['visible_p99_s'] or 0:.1f} s, ok {s['ok']}, "
               f"failed {s['failed']} ({wall:.1f} s) -> {_rel(job.path)}")
        if problems:
            msg += f"  INVALID: {problems[0]}" + (f" (+{len(problems) - 1} more)"
                                                   if len(problems) > 1 else "")
        outcomes.append(Outcome(job, not problems, msg, problems, wall))
        progress.done(msg)
    return outcomes


def _rel(p: Path) -> str:
    try:
        rel = os.path.relpath(p)
    except ValueError:
        return str(p)
    return str(p) if rel.startswith("..") else rel
