"""The ledger's storage layer on SQLite: ops, group commit, on_durable, exclusive use, crash
durability, failures, the codec and the ``python -m engine.ledger`` CLI."""
from __future__ import annotations

import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine._ledger import (
    CodecError,
    Done,
    Entry,
    Failed,
    JsonCodec,
    Ledger,
    LedgerBusy,
    LedgerError,
    Output,
    SqliteLedger,
)

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "ledger.db"


@pytest.fixture
def ledger(db: Path) -> Iterator[SqliteLedger]:
    led = SqliteLedger(db)
    led.open("p")
    try:
        yield led
    finally:
        led.close()


def hold_writer(ledger: Ledger, key: str = "held") -> threading.Event:
    """Park the writer thread in an on_durable callback (after committing ``Done(p, key)``)
    until the returned event is set: everything put meanwhile is one batch."""
    gate, entered = threading.Event(), threading.Event()

    def hold(error: LedgerError | None) -> None:
        entered.set()
        gate.wait(10)

    ledger.put(Done("p", key), hold)
    assert entered.wait(10)
    return gate


def writer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.endswith("Ledger-writer")]


def child(code: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "engine.ledger", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=30)


# -- codec and ops ------------------------------------------------------------------------------
def test_json_codec_round_trips_and_names_unencodable_types() -> None:
    codec = JsonCodec()
    value = {"id": 7, "name": "Zoë", "scores": [0.5, None, True], "nested": {"a": "b"}}
    assert codec.decode(codec.encode(value)) == value
    assert codec.decode(codec.encode((1, 2))) == [1, 2]  # documented: a tuple comes back a list
    with pytest.raises(CodecError, match="type set"):
        codec.encode({1, 2})

    class Contact:
        pass

    with pytest.raises(CodecError, match=r"type dict.*Contact"):
        codec.encode({"c": Contact()})
    loop: list[object] = []
    loop.append(loop)
    with pytest.raises(CodecError, match="type list"):
        codec.encode(loop)
    with pytest.raises(CodecError, match="cannot decode"):
        codec.decode("{not json")
    assert isinstance(CodecError("x"), ValueError)


def test_ops_are_validated() -> None:
    with pytest.raises(TypeError, match=r"Output\.key"):
        Output("p", 1, "s", "x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"Output\.stage"):
        Output("p", "1", "", "x")
    with pytest.raises(ValueError, match=r"Done\.name"):
        Done("", "1")
    with pytest.raises(ValueError, match="surrogate"):
        Output("p", "\udc80", "s", "x")
    with pytest.raises(TypeError, match=r"Failed\.message"):
        Failed("p", "1", "s", "E", None)  # type: ignore[arg-type]
    Failed("p", "1", "s", "E", "bad \udc80 text")  # free text: stored escaped, not refused
    with pytest.raises(ValueError, match="max_batch"):
        SqliteLedger("x.db", max_batch=0)
    with pytest.raises(ValueError, match="in-memory"):
        SqliteLedger(":memory:")


# -- round trips ---------------------------------------------------------------------------------
def test_round_trip_and_reopen(db: Path) -> None:
    led = SqliteLedger(db)
    led.open("p")
    led.put(Output("p", "1", "fetch", '{"m": 1}'))
    led.put(Output("p", "1", "analyze", '"hot"'))
    led.put(Done("p", "1"))
    led.put(Output("p", "2", "fetch", "[]"))
    led.put(Failed("p", "3", "fetch", "TimeoutError", "slow", "Traceback ...\nTimeoutError"))
    led.flush()
    expected = {
        "1": Entry(True, {"fetch": '{"m": 1}', "analyze": '"hot"'}, None),
        "2": Entry(False, {"fetch": "[]"}, None),
    }
    got = led.lookup("p", ["1", "2", "3", "missing"])
    assert {k: got[k] for k in ("1", "2")} == expected
    assert set(got) == {"1", "2", "3"}
    f = got["3"].failure
    assert f is not None and (f.key, f.stage, f.type, f.message) == ("3", "fetch",
                                                                      "TimeoutError", "slow")
    assert not got["3"].done and got["3"].outputs == {}
    assert led.lookup("other-pipeline", ["1"]) == {}
    assert led.lookup("p", []) == {}
    led.close()
    led.close()  # idempotent
    assert not writer_threads()

    again = SqliteLedger(db)
    try:
        assert again.lookup("p", ["1", "2", "3"]) == got
        assert again.counts("p") == {"done": 1, "failed": 1, "in_progress": 1,
                                     "outputs": {"fetch": 2, "analyze": 1},
                                     "failed_at": {"fetch": 1}}
    finally:
        again.close()
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_last_op_wins_within_and_across_batches(ledger: SqliteLedger) -> None:
    ledger.put(Output("p", "k", "s", "1"))
    ledger.put(Output("p", "k", "s", "2"))
    ledger.flush()
    ledger.put(Output("p", "k", "s", "3"))
    ledger.flush()
    assert ledger.lookup("p", ["k"])["k"].outputs == {"s": "3"}


def test_lookup_in_chunks(ledger: SqliteLedger) -> None:
    for i in range(2500):
        ledger.put(Output("p", str(i), "fetch", str(i)))
        if i % 3 == 0:
            ledger.put(Done("p", str(i)))
    ledger.flush()
    keys = [str(i) for i in range(0, 3000)]  # 500 of them absent
    seen: dict[str, Entry] = {}
    for start in range(0, len(keys), 250):
        chunk = ledger.lookup("p", keys[start:start + 250])
        assert set(chunk) == {k for k in keys[start:start + 250] if int(k) < 2500}
        seen.update(chunk)
    assert len(seen) == 2500
    assert all(e.outputs == {"fetch": k} and e.done == (int(k) % 3 == 0)
               for k, e in seen.items())
    big = ledger.lookup("p", keys)  # more than max_keys: split into several queries
    assert big == seen
    with pytest.raises(TypeError, match="keys must be str"):
        ledger.lookup("p", [1])  # type: ignore[list-item]


# -- group commit and on_durable -------------------------------------------------------------------
def test_many_ops_per_transaction(ledger: SqliteLedger) -> None:
    gate = hold_writer(ledger)  # commit 1
    durable: list[LedgerError | None] = []
    for i in range(1000):  # queued while the writer is held: one batch
        ledger.put(Output("p", str(i), "s", "x"), durable.append)
        ledger.put(Done("p", str(i)), durable.append)
    assert ledger.commits == 1
    gate.set()
    ledger.flush()
    assert ledger.commits == 2
    assert ledger.written == 2001
    assert durable == [None] * 2000
    assert ledger.counts("p")["done"] == 1001  # with the held one


def test_max_batch_bounds_a_transaction(db: Path) -> None:
    led = SqliteLedger(db, max_batch=100)
    led.open("p")
    gate = hold_writer(led, "x")
    for i in range(1000):
        led.put(Done("p", str(i)))
    gate.set()
    led.close()
    assert led.commits >= 10 + 1
    again = SqliteLedger(db)
    assert again.counts("p")["done"] == 1001
    again.close()


def test_on_durable_runs_after_the_commit(ledger: SqliteLedger, db: Path) -> None:
    seen: list[tuple[LedgerError | None, object]] = []

    def check(error: LedgerError | None) -> None:
        other = sqlite3.connect(db)  # another connection sees the committed row
        try:
            row = other.execute("SELECT payload FROM conveyor_ledger WHERE item_key = 'k' "
                                "AND stage = 's'").fetchone()
        finally:
            other.close()
        seen.append((error, row))

    ledger.put(Output("p", "k", "s", '"v"'), check)
    ledger.flush()
    assert seen == [(None, ('"v"',))]


def test_a_raising_callback_is_logged_and_the_writer_goes_on(
        ledger: SqliteLedger, caplog: pytest.LogCaptureFixture) -> None:
    def boom(error: LedgerError | None) -> None:
        raise RuntimeError("callback bug")

    with caplog.at_level(logging.ERROR, logger="engine.ledger"):
        ledger.put(Done("p", "1"), boom)
        ledger.flush()
    assert "on_durable callback raised" in caplog.text
    got: list[LedgerError | None] = []
    ledger.put(Done("p", "2"), got.append)
    ledger.flush()
    assert got == [None]


def test_flush_from_a_callback_is_refused(ledger: SqliteLedger) -> None:
    errors: list[BaseException] = []

    def bad(error: LedgerError | None) -> None:
        try:
            ledger.flush()
        except LedgerError as exc:
            errors.append(exc)

    ledger.put(Done("p", "1"), bad)
    ledger.flush()
    assert len(errors) == 1 and "wait for itself" in str(errors[0])


def test_a_failed_write_is_surfaced_not_lost(ledger: SqliteLedger, db: Path) -> None:
    ledger.flush()
    conn = sqlite3.connect(db)  # make the database refuse one key
    conn.execute("CREATE TRIGGER poison BEFORE INSERT ON conveyor_ledger "
                 "WHEN NEW.item_key = 'poison' BEGIN SELECT RAISE(ABORT, 'poisoned'); END")
    conn.commit()
    conn.close()
    gate = hold_writer(ledger, "ok")
    got: list[LedgerError | None] = []
    ledger.put(Done("p", "fine"), got.append)  # same batch as the poison: rolled back
    ledger.put(Done("p", "poison"), got.append)
    gate.set()
    with pytest.raises(LedgerError, match="poisoned") as info:
        ledger.flush()
    assert isinstance(info.value.__cause__, LedgerError)
    assert len(got) == 2 and all(isinstance(e, LedgerError) for e in got)
    assert "poisoned" in str(got[0])
    with pytest.raises(LedgerError, match="earlier write failed"):
        ledger.put(Done("p", "later"))  # sticky: nothing more is written
    assert set(ledger.lookup("p", ["ok", "fine", "poison"])) == {"ok"}
    ledger.close()  # already raised once: close does not raise it again


def test_close_raises_an_unreported_write_failure(db: Path) -> None:
    led = SqliteLedger(db)
    led.open("p")
    led.flush()
    conn = sqlite3.connect(db)
    conn.execute("CREATE TRIGGER poison BEFORE INSERT ON conveyor_ledger "
                 "BEGIN SELECT RAISE(ABORT, 'poisoned'); END")
    conn.commit()
    conn.close()
    led.put(Done("p", "x"))
    with pytest.raises(LedgerError, match="poisoned"):
        led.close()
    led.close()
    assert not writer_threads()


def test_put_needs_an_open_name_and_an_open_ledger(db: Path) -> None:
    led = SqliteLedger(db)
    with pytest.raises(LedgerError, match="not open"):
        led.put(Done("p", "1"))
    with pytest.raises(TypeError, match="Output, Done or Failed"):
        led.put("op")  # type: ignore[arg-type]
    led.open("p")
    led.put(Done("p", "1"))
    led.release("p")  # flushes first
    assert led.lookup("p", ["1"])["1"].done
    with pytest.raises(LedgerError, match="not open"):
        led.put(Done("p", "2"))
    led.close()
    with pytest.raises(LedgerError, match="closed"):
        led.put(Done("p", "3"))
    with pytest.raises(LedgerError, match="closed"):
        led.open("p")
    led.flush()  # nothing pending: returns
    assert not writer_threads()


# -- failures --------------------------------------------------------------------------------
def test_failures_are_listed_and_cleared_by_a_later_success(ledger: SqliteLedger) -> None:
    ledger.put(Output("p", "a", "fetch", "1"))
    ledger.put(Failed("p", "a", "analyze", "ValueError", "bad json", "Traceback\n  ...\n"))
    ledger.put(Failed("p", "b", "fetch", "TimeoutError", "slow"))
    ledger.put(Failed("p", "c", "fetch", "KeyError", "'x'"))
    ledger.put(Failed("p", "d", "fetch", "E", "nul \x00 and \udc80 survive"))
    ledger.flush()
    failures = {f.key: f for f in ledger.failures("p")}
    assert set(failures) == {"a", "b", "c", "d"}
    assert (failures["a"].stage, failures["a"].type, failures["a"].message,
            failures["a"].traceback) == ("analyze", "ValueError", "bad json",
                                         "Traceback\n  ...\n")
    assert failures["a"].recorded_at > 1e9
    assert "\\udc80" in failures["d"].message
    assert ledger.counts("p")["failed_at"] == {"fetch": 3, "analyze": 1}

    ledger.put(Output("p", "a", "analyze", "2"))  # a retry succeeded: the dead letter goes
    ledger.put(Done("p", "b"))
    ledger.put(Failed("p", "c", "fetch", "KeyError", "'y'"))  # failed again: replaced
    ledger.put(Output("p", "c", "fetch", "3"))  # ... then, in the same batch, succeeded
    ledger.flush()
    assert [f.key for f in ledger.failures("p")] == ["d"]
    got = ledger.lookup("p", ["a", "b", "c"])
    assert got["a"] == Entry(False, {"fetch": "1", "analyze": "2"}, None)
    assert got["b"] == Entry(True, {}, None)
    assert got["c"] == Entry(False, {"fetch": "3"}, None)
    counts = ledger.counts("p")
    assert counts["failed"] == 1 and counts["done"] == 1 and counts["in_progress"] == 2


def test_a_failure_after_an_output_in_one_batch_is_kept(ledger: SqliteLedger) -> None:
    gate = hold_writer(ledger, "x")
    ledger.put(Output("p", "k", "fetch", "1"))
    ledger.put(Failed("p", "k", "analyze", "E", "m"))
    gate.set()
    ledger.flush()
    assert [(f.key, f.stage) for f in ledger.failures("p")] == [("k", "analyze")]


# -- exclusive use ----------------------------------------------------------------------------
def test_a_second_opener_is_busy_threads(db: Path) -> None:
    first, second = SqliteLedger(db), SqliteLedger(db)
    first.open("p")
    errors: list[BaseException] = []

    def other() -> None:
        try:
            second.open("p")
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=other)
    t.start()
    t.join(10)
    assert len(errors) == 1 and isinstance(errors[0], LedgerBusy)
    assert errors[0].name == "p" and "in use by another run" in str(errors[0])
    assert f"pid {os.getpid()}" in str(errors[0])
    with pytest.raises(LedgerBusy, match="already holds"):
        first.open("p")
    second.open("q")  # another name is free
    first.release("p")
    second.open("p")
    assert second.held == {"p", "q"}
    first.close()
    second.close()
    third = SqliteLedger(db)
    third.open("p")  # close released them
    third.close()


def test_a_second_opener_is_busy_across_processes_until_the_holder_dies(db: Path) -> None:
    proc = child(f"""
        import sys
        from engine._ledger import SqliteLedger
        led = SqliteLedger({str(db)!r})
        led.open("p")
        print("holding", flush=True)
        sys.stdin.read()
    """)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "holding", proc.stderr
        led = SqliteLedger(db)
        with pytest.raises(LedgerBusy, match=f"pid {proc.pid}"):
            led.open("p")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        led.open("p")  # the kernel released the dead holder's lock
        led.close()
    finally:
        proc.kill()
        proc.communicate()


# -- durability ----------------------------------------------------------------------------------
def test_kill_9_after_flush_loses_nothing_flushed(db: Path) -> None:
    proc = child(f"""
        import itertools
        from engine._ledger import Done, Output, SqliteLedger
        led = SqliteLedger({str(db)!r})
        led.open("p")
        for i in range(3000):
            led.put(Output("p", str(i), "fetch", '{{"i": %d}}' % i))
            led.put(Done("p", str(i)))
        led.flush()
        print("flushed", flush=True)
        for i in itertools.count(3000):  # still writing when the kill comes
            led.put(Output("p", str(i), "fetch", "0"))
    """)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "flushed", proc.stderr
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
    finally:
        proc.kill()
        proc.communicate()
    led = SqliteLedger(db)
    try:
        led.open("p")  # not busy: the lock died with the process
        got = led.lookup("p", [str(i) for i in range(3000)])
        assert len(got) == 3000
        assert all(e.done and e.outputs == {"fetch": f'{{"i": {k}}}'}
                   for k, e in got.items())
    finally:
        led.close()


# -- the CLI -----------------------------------------------------------------------------------
def test_cli_prints_counts_and_failures(db: Path) -> None:
    led = SqliteLedger(db)
    led.open("sync")
    for i in range(5):
        led.put(Output("sync", str(i), "fetch", "1"))
    for i in range(3):
        led.put(Output("sync", str(i), "analyze", "2"))
        led.put(Done("sync", str(i)))
    led.put(Failed("sync", "3", "analyze", "ValueError", "model said no",
                   "Traceback (most recent call last):\nValueError: model said no\n"))
    led.close()

    out = cli(str(db), "--name", "sync")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"ledger {db}, pipeline 'sync'"
    assert lines[1].split() == ["stage", "checkpointed", "failed"]
    assert lines[2].split() == ["fetch", "5", "0"]
    assert lines[3].split() == ["analyze", "3", "1"]
    assert lines[4].startswith("items: 3 done, 1 failed, 1 in progress")
    assert lines[5] == "failures: 1"
    assert lines[6].startswith("  key '3' at stage 'analyze': ValueError: model said no")
    assert "Traceback" not in out.stdout

    tb = cli(str(db), "--name", "sync", "--traceback")
    assert tb.returncode == 0 and "      Traceback (most recent call last):" in tb.stdout

    empty = cli(str(db), "--name", "nothing-here")
    assert empty.returncode == 0
    assert "items: 0 done, 0 failed, 0 in progress" in empty.stdout


def test_cli_errors_exit_2(tmp_path: Path) -> None:
    missing = tmp_path / "missing.db"
    out = cli(str(missing), "--name", "sync")
    assert out.returncode == 2
    assert "no SQLite ledger" in out.stderr and not missing.exists()
    assert cli(str(missing)).returncode == 2  # --name is required
    junk = tmp_path / "junk.db"
    junk.write_text("not a database\n" * 100)
    bad = cli(str(junk), "--name", "sync")
    assert bad.returncode == 2 and "error" in bad.stderr
    plain = tmp_path / "plain.db"
    sqlite3.connect(plain).execute("CREATE TABLE t (x)").connection.close()
    assert cli(str(plain), "--name", "sync").returncode == 0  # no ledger table: empty
    assert sqlite3.connect(plain).execute(
        "SELECT COUNT(*) FROM sqlite_master WHERE name = 'conveyor_ledger'").fetchone() == (0,)
