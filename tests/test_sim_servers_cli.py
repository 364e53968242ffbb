"""`python -m simulators.servers`: prints the URL it serves, stops cleanly on SIGTERM/Ctrl-C."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(30)


@contextmanager
def serve(*args: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "simulators.servers", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(5)
        if proc.stdout:
            proc.stdout.close()
        if proc.stderr:
            proc.stderr.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_messages_serves_then_stops_on_signal(sig: signal.Signals) -> None:
    spec = json.dumps({"dist": "constant", "value": 0.01})
    with serve("messages", "--port", "0", "--latency", spec, "--seed", "3") as (proc, url):
        assert url.startswith("http://127.0.0.1:")
        from simulators.servers import messages_for

        assert requests.get(f"{url}/contacts/5/messages", timeout=5).json() == messages_for("5", 3)
        proc.send_signal(sig)
        assert proc.wait(10) == 0
        assert proc.stderr is not None and "stopped" in proc.stderr.read()
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{url}/health", timeout=2)


def test_openai_on_a_given_port_with_faults() -> None:
    port = free_port()
    with serve("openai", "--port", str(port), "--error-rate", "1.0") as (proc, url):
        assert url == f"http://127.0.0.1:{port}"
        r = requests.post(
            f"{url}/v1/chat/completions",
            timeout=5,
            json={"model": "m", "messages": [{"role": "user", "content": "x"}]},
        )
        assert r.status_code >= 500
        proc.terminate()
        assert proc.wait(10) == 0


def test_rate_limit_flag() -> None:
    with serve("messages", "--rate-limit", "1") as (proc, url):
        with requests.Session() as s:
            codes = [s.get(f"{url}/contacts/{i}/messages", timeout=5).status_code for i in range(3)]
        assert codes[0] == 200 and 429 in codes
        proc.terminate()
        assert proc.wait(10) == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["messages", "--latency", '{"dist": "lognormal", "median": 2, "p99": 1}'], "latency.p99"),
        (["messages", "--error-rate", "3"], "error_rate"),
        (["ftp"], "invalid choice"),
        (["messages", "--latency", "{not json"], "--latency"),
    ],
)
def test_bad_arguments_exit_2(args: list[str], message: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "simulators.servers", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert proc.returncode == 2
    assert message in proc.stderr
    assert proc.stdout == ""


def test_port_in_use_fails_cleanly() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "simulators.servers", "messages", "--port", str(port)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=20,
        )
    assert proc.returncode == 1
    assert "cannot listen" in proc.stderr
