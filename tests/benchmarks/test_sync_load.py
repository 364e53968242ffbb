"""Load (issue 6): 20,000 contacts through the fake servers into PostgreSQL in one run, and
2,000 for comparison: throughput and the job's peak RSS (figures, not asserts; peak RSS must not
grow with the count: input and results are streamed, nothing is kept per contact).

The fake servers run in their own processes (uniform 5-20 ms latency), the job is
``examples/contact_sync.py`` in a subprocess that reports its own peak RSS (VmHWM).
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
sys.argv = ["contact_sync.py", "--contacts", sys.argv[1], "--quiet"]
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


@pytest.mark.timeout(900)
@pytest.mark.parametrize("n", [2_000, 20_000])
def test_sync_job_load(benchmark, services, n: int) -> None:
    def run() -> tuple[float, int, str]:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", WRAPPER, str(n)], cwd=ROOT,
                              env={**os.environ, **services}, capture_output=True, text=True,
                              timeout=880)
        wall = time.perf_counter() - t0
        m = re.search(r"VMHWM_KB=(\d+)", proc.stderr)
        assert m, proc.stderr[-2000:]
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        return wall, int(m.group(1)), proc.stdout

    benchmark.group = "sync job load: fake servers -> PostgreSQL"
    wall, hwm_kb, out = benchmark.pedantic(run, rounds=1, warmup_rounds=0)
    benchmark.extra_info.update(contacts=n, contacts_per_s=round(n / wall, 1),
                                peak_rss_mb=round(hwm_kb / 1024, 1))
    print(f"\n{n} contacts: {n / wall:.1f}/s, peak RSS {hwm_kb / 1024:.1f} MB\n{out[:400]}")
