"""Memory: 1,000,000 items from a generator through 4 no-op stages with stream().

Measured in a fresh subprocess (peak RSS from /proc, sampled), reported as extra_info:
peak RSS growth over the process's RSS after warm-up. Target: <= 20 MB.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from contract import ROOT

# CONVEYOR_BENCH_QUICK=1 (CI): 200,000 items instead of 1,000,000, to keep CI short
QUICK = os.environ.get("CONVEYOR_BENCH_QUICK", "") not in ("", "0")

SCRIPT = textwrap.dedent("""
    import json, sys, threading, time
    sys.path.insert(0, {root!r})
    from engine import Pipeline, Stage

    def rss_kb():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])

    def noop(x):
        return x

    p = Pipeline([Stage(f"s{{i}}", noop, concurrency=2) for i in range(4)])
    for _ in p.stream(range(20_000)):   # warm-up: threads, caches, allocator arenas
        pass
    base = rss_kb()
    peak = base
    stop = False
    def sample():
        global peak
        while not stop:
            peak = max(peak, rss_kb())
            time.sleep(0.01)
    t = threading.Thread(target=sample); t.start()
    t0 = time.perf_counter()
    n = 0
    for _ in p.stream(x for x in range({n})):
        n += 1
    wall = time.perf_counter() - t0
    stop = True; t.join()
    print(json.dumps({{"items": n, "base_kb": base, "peak_kb": peak, "wall_s": wall}}))
""")


@pytest.mark.timeout(600)
def test_stream_million_items_memory(benchmark) -> None:
    n = 200_000 if QUICK else 1_000_000

    def run() -> dict:
        out = subprocess.run([sys.executable, "-c", SCRIPT.format(root=str(ROOT), n=n)],
                             capture_output=True, text=True, check=True, timeout=580)
        return json.loads(out.stdout)

    res = benchmark.pedantic(run, rounds=1, warmup_rounds=0)
    assert res["items"] == n
    growth_mb = (res["peak_kb"] - res["base_kb"]) / 1024
    benchmark.extra_info.update(rss_growth_mb=round(growth_mb, 2), items=n,
                                items_per_s=round(n / res["wall_s"]))
    print(f"\n1M items: peak RSS growth {growth_mb:.1f} MB, {n / res['wall_s']:,.0f} items/s")
