"""Load (issue 6): 20,000 contacts through the fake servers into PostgreSQL in one run, and
2,000 for comparison: throughput and the job's peak RSS (figures, not asserts; peak RSS must not
grow with the count: input and results are streamed, nothing is kept per contact).

The fake servers run in their own processes (uniform 5-20 ms latency), the job is
``examples/contact_sync.py`` in a subprocess that reports its own peak RSS (VmHWM).

Ledger variants (issue 13): the 20,000-contact run with no ledger (``--ledger none``), a
``SqliteLedger`` (``--ledger PATH``) and the job's default ``PostgresLedger`` in its own database
(``--ledger db``), the analyze stage checkpointed; each ledger variant reports its throughput
overhead against the no-ledger run (target: at most 5%). One run each: on a shared 2-core
machine a single run's noise is of the order of that target, so read the figures as such.

More cores (issue 14): the 20,000-contact no-ledger run again with ``--processes 2`` (the
job's stages in two worker processes, each with its own clients). Every variant reports the
job's CPU per contact: user + sys of the job's process and of its worker processes (reaped by
the end of the run: ``RUSAGE_CHILDREN`` in the job's process), divided by the contacts; the
``processes=2`` run also reports its throughput and CPU per contact as ratios to the
``processes=1`` run of the same session (``-k no-ledger`` runs the pair).

``CONVEYOR_BENCH_QUICK=1`` runs every 20,000-contact variant on 2,000 contacts instead (CI sets
it to keep CI short; the ids keep their names, ``extra_info`` says ``contacts`` and ``quick``).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from contract import ROOT

pytestmark = pytest.mark.postgres

#: QUICK: every 20,000-contact variant on 2,000 contacts (CI)
QUICK = os.environ.get("CONVEYOR_BENCH_QUICK") == "1"
BIG = 2_000 if QUICK else 20_000

WRAPPER = r"""
import resource, runpy, sys
sys.argv = ["contact_sync.py", "--contacts", sys.argv[1], "--ledger", sys.argv[2],
            "--processes", sys.argv[3], "--quiet"]
try:
    runpy.run_path("examples/contact_sync.py", run_name="__main__")
finally:
    with open("/proc/self/status") as f:
        hwm = [line.split()[1] for line in f if line.startswith("VmHWM:")][0]
    me, kids = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    cpu = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime  # + the reaped workers
    print(f"VMHWM_KB={hwm} CPU_S={cpu:.3f} CHILD_MAXRSS_KB={kids.ru_maxrss}", file=sys.stderr)
"""


#: contacts/s and CPU s per contact of the big runs, by (ledger, processes)
_RUNS: dict[tuple[str, int], tuple[float, float]] = {}


@pytest.mark.timeout(900)
@pytest.mark.parametrize(("n", "ledger", "processes"), [
    (2_000, "db", 1), (BIG, "none", 1), (BIG, "none", 2), (BIG, "sqlite", 1), (BIG, "db", 1)],
    ids=["2000", "20000-no-ledger", "20000-no-ledger-processes-2", "20000-sqlite",
         "20000-postgres"])
def test_sync_job_load(benchmark, services, tmp_path, n: int, ledger: str,
                       processes: int) -> None:
    where = str(tmp_path / "ledger.db") if ledger == "sqlite" else ledger

    def run() -> tuple[float, dict[str, float], str]:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", WRAPPER, str(n), where, str(processes)],
                              cwd=ROOT, env={**os.environ, **services}, capture_output=True,
                              text=True, timeout=880)
        wall = time.perf_counter() - t0
        m = re.search(r"VMHWM_KB=(\d+) CPU_S=([\d.]+) CHILD_MAXRSS_KB=(\d+)", proc.stderr)
        assert m, proc.stderr[-2000:]
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        return wall, {"hwm_kb": int(m.group(1)), "cpu_s": float(m.group(2)),
                      "child_maxrss_kb": int(m.group(3))}, proc.stdout

    benchmark.group = "sync job load: fake servers -> PostgreSQL"
    wall, got, out = benchmark.pedantic(run, rounds=1, warmup_rounds=0)
    rate = n / wall
    cpu_per = got["cpu_s"] / n
    info = benchmark.extra_info
    info.update(contacts=n, contacts_per_s=round(rate, 1), ledger=ledger, processes=processes,
                cpu_s=round(got["cpu_s"], 2), cpu_ms_per_contact=round(cpu_per * 1000, 3),
                peak_rss_mb=round(got["hwm_kb"] / 1024, 1), quick=QUICK)
    if processes > 1:  # the largest worker process (the job's own process is peak_rss_mb)
        info["worker_peak_rss_mb"] = round(got["child_maxrss_kb"] / 1024, 1)
    notes = ""
    if n == BIG:
        _RUNS[(ledger, processes)] = (rate, cpu_per)
        base = _RUNS.get(("none", 1))
        if ledger != "none" and processes == 1 and base:
            pct = (base[0] - rate) / base[0] * 100
            info["overhead_pct_vs_no_ledger"] = round(pct, 1)
            notes = f", {pct:+.1f}% throughput overhead vs no ledger ({base[0]:.1f}/s)"
        one, two = _RUNS.get(("none", 1)), _RUNS.get(("none", 2))
        if ledger == "none" and one and two:  # the second of the pair to finish says it
            info["processes_2_vs_1"] = {"throughput": round(two[0] / one[0], 3),
                                        "cpu_per_contact": round(two[1] / one[1], 3)}
            notes = (f", processes=2 / processes=1: throughput {two[0] / one[0]:.2f}x, CPU per "
                     f"contact {two[1] / one[1]:.2f}x")
    print(f"\n{n} contacts, ledger {ledger}, processes {processes}: {rate:.1f}/s, CPU "
          f"{cpu_per * 1000:.2f} ms per contact{notes}, peak RSS {got['hwm_kb'] / 1024:.1f} MB"
          f"\n{out[:400]}")
