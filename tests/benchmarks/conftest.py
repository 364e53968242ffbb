"""Shared by the benchmarks: ``services`` (the load benchmarks' fake messages and OpenAI
servers in their own processes at 5-20 ms latency, and a throwaway PostgreSQL), one per module."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # engine_helpers

ROOT = Path(__file__).resolve().parents[2]


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
