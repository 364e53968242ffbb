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
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest

from contract import ROOT

pytestmark = pytest.mark.postgres

WRAPPER = r"""
import runpy, sys
sys.argv = ["contact_sync.py", "--contacts", sys.argv[1], "--ledger", sys.argv[2], "--quiet"]
try:
    runpy.run_path("examples/contact_sync.py", run_name="__main__")
finally:
    with open("/proc/self/status") as f:
        hwm = [line.split()[1] for line in f if line.startswith("VmHWM:")][0]
    print(f"VMHWM_KB={hwm}", file=sys.stderr)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def services():
    sys.path.insert(0, str(ROOT))
    from examples._throwaway_pg import ThrowawayPostgres

    ports = {"messages": _free_port(), "openai": _free_port()}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "simulators.servers", kind, "--port", str(port), "--latency",
         json.dumps({"dist": "uniform", "low": 0.005, "high": 0.02})],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        for kind, port in ports.items()]
    try:
        for p in procs:
            assert p.stdout is not None
            assert "http://" in p.stdout.readline()  # serving
        with ThrowawayPostgres() as pg:
            yield {"DATABASE_URL": pg.dsn,
                   "MESSAGES_API_URL": f"http://127.0.0.1:{ports['messages']}",
                   "OPENAI_BASE_URL": f"http://127.0.0.1:{ports['openai']}/v1",
                   "OPENAI_API_KEY": "bench-key", "OPENAI_MODEL": "gpt-4o-mini"}
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)


#: contacts/s of the 20,000-contact runs, by ledger (filled in order: "none" first)
_THROUGHPUT: dict[str, float] = {}


@pytest.mark.timeout(900)
@pytest.mark.parametrize(("n", "ledger"), [(2_000, "db"), (20_000, "none"), (20_000, "sqlite"),
                                           (20_000, "db")],
                         ids=["2000", "20000-no-ledger", "20000-sqlite", "20000-postgres"])
def test_sync_job_load(benchmark, services, tmp_path, n: int, ledger: str) -> None:
    where = str(tmp_path / "ledger.db") if ledger == "sqlite" else ledger

    def run() -> tuple[float, int, str]:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", WRAPPER, str(n), where], cwd=ROOT,
                              env={**os.environ, **services}, capture_output=True, text=True,
                              timeout=880)
        wall = time.perf_counter() - t0
        m = re.search(r"VMHWM_KB=(\d+)", proc.stderr)
        assert m, proc.stderr[-2000:]
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        return wall, int(m.group(1)), proc.stdout

    benchmark.group = "sync job load: fake servers -> PostgreSQL"
    wall, hwm_kb, out = benchmark.pedantic(run, rounds=1, warmup_rounds=0)
    rate = n / wall
    benchmark.extra_info.update(contacts=n, contacts_per_s=round(rate, 1),
                                peak_rss_mb=round(hwm_kb / 1024, 1), ledger=ledger)
    overhead = ""
    if n == 20_000:
        _THROUGHPUT[ledger] = rate
        base = _THROUGHPUT.get("none")
        if ledger != "none" and base:
            pct = (base - rate) / base * 100
            benchmark.extra_info["overhead_pct_vs_no_ledger"] = round(pct, 1)
            overhead = f", {pct:+.1f}% throughput overhead vs no ledger ({base:.1f}/s)"
    print(f"\n{n} contacts, ledger {ledger}: {rate:.1f}/s{overhead}, peak RSS "
          f"{hwm_kb / 1024:.1f} MB\n{out[:400]}")
