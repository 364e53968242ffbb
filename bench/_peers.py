"""``peers``: the same workload through other ways of writing the sync job, side by side.

Every peer runs the scenario's stages as blocking (or async) calls that sleep the *same* per-item
latencies as the engine's simulated services (``SimulatedService.outcome_of(index, attempt)``,
times ``time_scale``), fail the same items, and retry them the same number of times. Rate limits
and outage windows are not emulated for peers (they depend on the caller's clock); use a
scenario without them for a like-for-like comparison.

* ``engine continuous`` / ``engine batched`` -- this project, live;
* ``stagepipe`` 0.3.0 -- thread stages with per-stage workers, no barrier (a PyPI peer);
* ``pypeln thread`` -- ``pl.thread.map`` stages, workers = the stage limit;
* ``asyncio + Semaphore`` -- one coroutine per item (the seed's ``Promise.all``), a semaphore
  per stage;
* ``ThreadPoolExecutor batches`` -- the seed's loop: batches of 50, ``pool.map`` per stage
  (a barrier after every stage).

Each peer runs in its own spawned process. A peer's items are *visible* when the consumer gets
them (stagepipe's ``on_done``, pypeln's output iterator, the coroutine's end, the batch's end).
Results go to ``<out>/peers.json`` (visible times) and, read back from it, ``peers.csv``,
``peers.md`` and ``peers.png``.
"""
from __future__ import annotations

import asyncio
import csv
import json
import multiprocessing as mp
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bench._build import gc_paused
from bench._scenario import Scenario, parse_scenario

__all__ = ["PEERS", "run_peers"]

PEERS = ("engine continuous", "stagepipe", "pypeln thread", "asyncio + Semaphore",
         "engine batched", "ThreadPoolExecutor batches")
BATCH = 50


class _Failed(Exception):
    pass


def _calls(sc: Scenario, ts: float) -> tuple[list[Callable[[int], None]], list[Any]]:
    """Per stage: a blocking call(index) that sleeps and retries like the simulated service
    and the scenario's retry policy; and the per-stage plan for async peers."""
    from simulators import Faults, SimulatedService

    plans = []
    for st in sc.stages:
        svc = SimulatedService(st.name, st.latency,
                               Faults(error_rate=st.error_rate, timeout=st.timeout),
                               seed=sc.seed, time_scale=ts)
        attempts = st.retry.attempts if st.retry else 1
        backoff = st.retry.backoff if st.retry else 0.0
        max_backoff = st.retry.max_backoff if st.retry else 0.0
        plans.append((svc, attempts, backoff, max_backoff))

    def make(svc: Any, attempts: int, backoff: float, max_backoff: float
             ) -> Callable[[int], None]:
        def call(index: int) -> None:
            for a in range(1, attempts + 1):
                duration, kind = svc.outcome_of(index, a)
                time.sleep(duration * ts)
                if kind == "ok":
                    return
                if a < attempts:  # the mean of full jitter: deterministic across peers
                    time.sleep(min(max_backoff, backoff * 2 ** (a - 1)) * 0.5 * ts)
            raise _Failed(f"{svc.name}: item {index} failed {attempts} attempts")
        return call

    return [make(*p) for p in plans], plans


def _peer_stagepipe(sc: Scenario, n: int, ts: float, mark: Callable[[int, bool], None]) -> None:
    import stagepipe

    calls, _ = _calls(sc, ts)
    stages = [stagepipe.Stage(st.name, _sp_fn(c), workers=st.concurrency)
              for st, c in zip(sc.stages, calls, strict=True)]
    window = max(64, 4 * sum(st.concurrency for st in sc.stages))  # the engine's default bound

    def on_done(index: int, value: Any) -> None:
        mark(index, not isinstance(value, stagepipe.Failed))

    stagepipe.run(range(n), stages, max_in_flight=window, on_done=on_done, on_error="collect",
                  keep_results=False)


def _sp_fn(call: Callable[[int], None]) -> Callable[[int, int], int]:
    def fn(value: int, index: int) -> int:
        call(value)
        return value
    return fn


def _peer_pypeln(sc: Scenario, n: int, ts: float, mark: Callable[[int, bool], None]) -> None:
    import pypeln as pl

    calls, _ = _calls(sc, ts)

    def wrap(call: Callable[[int], None]) -> Callable[[Any], Any]:
        def fn(x: Any) -> Any:
            if isinstance(x, _Failed):
                return x
            try:
                call(x)
            except _Failed as exc:
                exc.index = x  # type: ignore[attr-defined]
                return exc
            return x
        return fn

    stage: Any = range(n)
    window = max(64, 4 * sum(st.concurrency for st in sc.stages))
    for st, c in zip(sc.stages, calls, strict=True):
        stage = pl.thread.map(wrap(c), stage, workers=st.concurrency, maxsize=window)
    for x in stage:
        if isinstance(x, _Failed):
            mark(x.index, False)  # type: ignore[attr-defined]
        else:
            mark(x, True)


def _peer_asyncio(sc: Scenario, n: int, ts: float, mark: Callable[[int, bool], None]) -> None:
    _, plans = _calls(sc, ts)

    async def item(index: int, sems: list[asyncio.Semaphore]) -> None:
        for (svc, attempts, backoff, max_backoff), sem in zip(plans, sems, strict=True):
            ok = False
            for a in range(1, attempts + 1):
                duration, kind = svc.outcome_of(index, a)
                async with sem:
                    await asyncio.sleep(duration * ts)
                if kind == "ok":
                    ok = True
                    break
                if a < attempts:
                    await asyncio.sleep(min(max_backoff, backoff * 2 ** (a - 1)) * 0.5 * ts)
            if not ok:
                mark(index, False)
                return
        mark(index, True)

    async def main() -> None:
        sems = [asyncio.Semaphore(st.concurrency) for st in sc.stages]
        await asyncio.gather(*(item(i, sems) for i in range(n)))

    asyncio.run(main())


def _peer_tpe_batches(sc: Scenario, n: int, ts: float, mark: Callable[[int, bool], None]
                      ) -> None:
    calls, _ = _calls(sc, ts)
    pools = [ThreadPoolExecutor(st.concurrency) for st in sc.stages]

    def guarded(call: Callable[[int], None]) -> Callable[[int], bool]:
        def fn(i: int) -> bool:
            try:
                call(i)
            except _Failed:
                return False
            return True
        return fn

    fns = [guarded(c) for c in calls]
    try:
        for b in range(0, n, BATCH):
            alive = list(range(b, min(b + BATCH, n)))
            failed = []
            for pool, fn in zip(pools, fns, strict=True):  # a barrier after every stage
                oks = list(pool.map(fn, alive))
                failed += [i for i, ok in zip(alive, oks, strict=True) if not ok]
                alive = [i for i, ok in zip(alive, oks, strict=True) if ok]
            for i in alive:
                mark(i, True)
            for i in failed:
                mark(i, False)
    finally:
        for p in pools:
            p.shutdown()


def _peer_engine(strategy: str) -> Callable[[Scenario, int, float, Callable[[int, bool], None]],
                                             None]:
    def run(sc: Scenario, n: int, ts: float, mark: Callable[[int, bool], None]) -> None:
        from bench._build import build_pipeline, build_strategy

        pipeline, services = build_pipeline(sc, clock="live", time_scale=ts)
        for svc in services:
            svc.start()
        strat = build_strategy(sc.strategy(strategy))
        pipeline.run(range(n), strat, on_result=lambda r: mark(r.index, r.status == "ok"),
                     clock="live")
    return run


_RUNNERS = {"engine continuous": _peer_engine("continuous"), "stagepipe": _peer_stagepipe,
            "pypeln thread": _peer_pypeln, "asyncio + Semaphore": _peer_asyncio,
            "engine batched": _peer_engine("batched"),
            "ThreadPoolExecutor batches": _peer_tpe_batches}


def _child(peer: str, raw: Mapping[str, Any], source: str, n: int, ts: float, path: str) -> None:
    try:
        sc = parse_scenario(raw, source=source)
        visible: list[float | None] = [None] * n
        ok = [False] * n
        lock = threading.Lock()
        t0 = time.perf_counter()

        def mark(index: int, good: bool) -> None:
            t = time.perf_counter() - t0
            with lock:
                visible[index], ok[index] = t / ts, good

        with gc_paused():  # the same for every peer (see bench._build.gc_paused)
            _RUNNERS[peer](sc, n, ts, mark)
        wall = time.perf_counter() - t0
        Path(path).write_text(json.dumps({"peer": peer, "wall_s": wall, "visible": visible,
                                          "ok": ok}), encoding="utf-8")
    except BaseException:
        Path(path + ".error").write_text(traceback.format_exc(), encoding="utf-8")
        raise


def _stats(rec: Mapping[str, Any]) -> dict[str, Any]:
    vis = [v for v in rec["visible"] if v is not None]
    ok_v = np.sort([v for v, g in zip(rec["visible"], rec["ok"], strict=True)
                    if v is not None and g])
    makespan = max(vis, default=0.0)
    row: dict[str, Any] = {"peer": rec["peer"], "makespan_s": makespan,
                           "throughput_per_s": len(ok_v) / makespan if makespan else 0.0,
                           "ok": len(ok_v), "failed": len(vis) - len(ok_v),
                           "missing": len(rec["visible"]) - len(vis), "wall_s": rec["wall_s"]}
    if ok_v.size:
        p50, p99 = np.percentile(ok_v, [50, 99])
        row.update(first_visible_s=float(ok_v[0]), visible_p50_s=float(p50),
                   visible_p99_s=float(p99))
    else:
        row.update(first_visible_s=0.0, visible_p50_s=0.0, visible_p99_s=0.0)
    return row


def run_peers(sc: Scenario, *, items: int | None, time_scale: float | None, out: Path) -> int:
    n = min(items or sc.items, sc.items)
    ts = time_scale or sc.time_scale
    if any(st.rate_limit or st.outages for st in sc.stages):
        print(f"note: {sc.name} has rate limits or outages; peers run without them")
    out.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    records = []
    for k, peer in enumerate(PEERS, 1):
        path = out / f".peer-{k}.json"
        err = Path(str(path) + ".error")
        err.unlink(missing_ok=True)
        proc = ctx.Process(target=_child, args=(peer, dict(sc.raw), sc.source, n, ts, str(path)),
                           name=f"bench peer {peer}")
        proc.start()
        proc.join()
        if proc.exitcode != 0 or not path.exists():
            detail = err.read_text().strip().splitlines()[-1:] if err.exists() else []
            print(f"[{k}/{len(PEERS)}] {peer}: FAILED (exit {proc.exitcode}) {' '.join(detail)}")
            continue
        rec = json.loads(path.read_text())
        path.unlink()
        records.append(rec)
        s = _stats(rec)
        print(f"[{k}/{len(PEERS)}] {peer}: makespan {s['makespan_s']:.1f} s, p50 visible "
              f"{s['visible_p50_s']:.1f} s, ok {s['ok']}, failed {s['failed']} "
              f"({s['wall_s']:.1f} s)")
    # "format", not "version": this is not a results document of DESIGN.md section 6
    doc = {"format": "conveyor-peers/1", "scenario": sc.name, "items": n, "time_scale": ts,
           "seed": sc.seed,
           "stages": [{"name": st.name, "concurrency": st.concurrency} for st in sc.stages],
           "peers": records}
    (out / "peers.json").write_text(json.dumps(doc, separators=(",", ":")), encoding="utf-8")
    return write_peer_report(out)


def write_peer_report(out: Path) -> int:
    """peers.csv, peers.md and peers.png from the saved peers.json."""
    from bench._plots import plot_peers

    doc = json.loads((out / "peers.json").read_text())
    rows = [_stats(r) for r in doc["peers"]]
    fields = ["peer", "makespan_s", "throughput_per_s", "first_visible_s", "visible_p50_s",
              "visible_p99_s", "ok", "failed", "missing", "wall_s"]
    with (out / "peers.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
                    for r in rows)
    base = next((r for r in rows if r["peer"] == "engine continuous"), None)
    lines = [f"# Peers on `{doc['scenario']}`", "",
             f"{doc['items']} items, live at time_scale {doc['time_scale']:g} (times in scenario "
             "seconds), the same per-item latencies, errors and retries for every peer; each "
             "peer in its own process.", "",
             "| peer | makespan s | items/s | vs engine continuous | first vis. s | "
             "p50 vis. s | p99 vis. s | ok | failed |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        rel = (f"{r['makespan_s'] / base['makespan_s']:.2f}x makespan"
               if base and base["makespan_s"] else "-")
        lines.append(f"| {r['peer']} | {r['makespan_s']:.1f} | {r['throughput_per_s']:.2f} | "
                     f"{rel} | {r['first_visible_s']:.1f} | {r['visible_p50_s']:.1f} | "
                     f"{r['visible_p99_s']:.1f} | {r['ok']} | {r['failed']} |")
    lines += ["", "![peers](peers.png)", ""]
    (out / "peers.md").write_text("\n".join(lines), encoding="utf-8")
    plot_peers(doc, out / "peers.png")
    print("\n" + "\n".join(lines[4:-3]))
    print(f"\nwrote {out / 'peers.json'}, peers.csv, peers.md and peers.png")
    return 0 if all(r["missing"] == 0 for r in rows) and len(rows) == len(PEERS) else 1
