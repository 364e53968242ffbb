"""PostgresLedger against a real PostgreSQL 15 (throwaway cluster, a fresh database per test)."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest
from test_engine_ledger_store import hold_writer

from engine._ledger import Done, Entry, Failed, LedgerBusy, LedgerError, Output
from engine.adapters._ledger_pg import PostgresLedger

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(60)]

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def ledger(pg_dsn: str) -> Iterator[PostgresLedger]:
    led = PostgresLedger(pg_dsn)
    led.open("p")
    try:
        yield led
    finally:
        led.close()


def test_round_trip_grouping_and_reopen(pg_dsn: str, ledger: PostgresLedger) -> None:
    gate = hold_writer(ledger, "first")
    durable: list[LedgerError | None] = []
    for i in range(500):  # queued while the writer is held: one transaction
        ledger.put(Output("p", str(i), "fetch", f'{{"i": {i}}}'), durable.append)
        ledger.put(Output("p", str(i), "analyze", '"hot"'), durable.append)
        ledger.put(Done("p", str(i)), durable.append)
    ledger.put(Output("p", "x", "fetch", "[]"))
    ledger.put(Failed("p", "y", "fetch", "TimeoutError", "slow", "Traceback ..."))
    gate.set()
    ledger.flush()
    assert ledger.commits == 2 and durable == [None] * 1500
    got = ledger.lookup("p", [str(i) for i in range(0, 600, 7)] + ["x", "y"])
    assert got["7"] == Entry(True, {"fetch": '{"i": 7}', "analyze": '"hot"'}, None)
    assert got["x"] == Entry(False, {"fetch": "[]"}, None)
    assert got["y"].failure is not None and got["y"].failure.type == "TimeoutError"
    assert "595" not in got
    ledger.close()
    again = PostgresLedger(pg_dsn)
    try:
        assert again.counts("p") == {"done": 501, "failed": 1, "in_progress": 1,
                                     "outputs": {"fetch": 501, "analyze": 500},
                                     "failed_at": {"fetch": 1}}
        assert len(again.lookup("p", [str(i) for i in range(2000)])) == 500  # > max_keys
    finally:
        again.close()


def test_failures_cleared_by_a_later_success(ledger: PostgresLedger) -> None:
    ledger.put(Failed("p", "a", "analyze", "ValueError", "bad \x00 json", "tb"))
    ledger.put(Failed("p", "b", "fetch", "KeyError", "'x'"))
    ledger.flush()
    assert {f.key: f.message for f in ledger.failures("p")} == {"a": "bad \\x00 json",
                                                                 "b": "'x'"}
    ledger.put(Output("p", "a", "analyze", "1"))
    ledger.put(Done("p", "b"))
    ledger.flush()
    assert ledger.failures("p") == []
    with pytest.raises(ValueError, match="NUL"):
        ledger.put(Output("p", "k\x00", "fetch", "1"))


def test_a_second_opener_is_busy(pg_dsn: str) -> None:
    first, second = PostgresLedger(pg_dsn), PostgresLedger(pg_dsn)
    first.open("p")
    errors: list[BaseException] = []
    t = threading.Thread(target=lambda: _capture(errors, second.open, "p"))
    t.start()
    t.join(10)
    assert len(errors) == 1 and isinstance(errors[0], LedgerBusy), errors
    second.open("q")
    first.close()  # releases "p"
    second.open("p")
    other_table = PostgresLedger(pg_dsn, table="other_ledger")
    other_table.open("p")  # the lock is per table and name
    other_table.close()
    second.close()


def test_a_dead_holder_frees_the_name(pg_dsn: str) -> None:
    code = ("import sys\nfrom engine.adapters._ledger_pg import PostgresLedger\n"
            f"led = PostgresLedger({pg_dsn!r}); led.open('p'); print('holding', flush=True)\n"
            "sys.stdin.read()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "holding", proc.stderr
        led = PostgresLedger(pg_dsn)
        with pytest.raises(LedgerBusy):
            led.open("p")
        proc.kill()
        proc.wait(10)
        for _ in range(100):  # the server notices the closed socket at once, or nearly
            try:
                led.open("p")
                break
            except LedgerBusy:
                threading.Event().wait(0.05)
        assert led.held == {"p"}
        led.close()
    finally:
        proc.kill()
        proc.communicate()


def test_a_dropped_writer_connection_is_replayed(pg_dsn: str, ledger: PostgresLedger) -> None:
    ledger.put(Done("p", "1"))
    ledger.flush()
    pid = ledger._wconn.get_backend_pid()
    with psycopg2.connect(pg_dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(%s)", (pid,))
    conn.close()
    got: list[LedgerError | None] = []
    ledger.put(Done("p", "2"), got.append)
    ledger.flush()
    assert got == [None]
    assert set(ledger.lookup("p", ["1", "2"])) == {"1", "2"}


def test_no_password_in_errors_and_checked_table_names(pg_dsn: str) -> None:
    params = psycopg2.extensions.parse_dsn(pg_dsn)
    password = params["password"]
    wrong = pg_dsn.replace(password, password + "-wrong")
    with pytest.raises(LedgerError) as info:
        PostgresLedger(wrong).open("p")
    assert password not in str(info.value)
    with pytest.raises(ValueError, match="identifier"):
        PostgresLedger(pg_dsn, table="x; DROP TABLE y")
    assert password not in repr(PostgresLedger(pg_dsn))


def test_cli_reads_a_postgres_ledger(pg_dsn: str, ledger: PostgresLedger) -> None:
    ledger.put(Output("p", "1", "fetch", "1"))
    ledger.put(Failed("p", "2", "fetch", "ValueError", "nope"))
    ledger.flush()
    url = pg_dsn if pg_dsn.startswith("postgres") else _url(pg_dsn)
    out = subprocess.run([sys.executable, "-m", "engine.ledger", url, "--name", "p"], cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "key '2' at stage 'fetch': ValueError: nope" in out.stdout
    assert psycopg2.extensions.parse_dsn(pg_dsn)["password"] not in out.stdout


def _url(dsn: str) -> str:
    p = psycopg2.extensions.parse_dsn(dsn)
    return (f"postgresql://{p['user']}:{p['password']}@{p.get('host', '127.0.0.1')}:"
            f"{p.get('port', 5432)}/{p['dbname']}")


def _capture(errors: list[BaseException], fn: object, *args: object) -> None:
    try:
        fn(*args)  # type: ignore[operator]
    except BaseException as exc:
        errors.append(exc)
