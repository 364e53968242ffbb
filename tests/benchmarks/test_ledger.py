"""Ledger write rate on SQLite (a figure, not an assert; the target is >= 20,000 items/s).

20,000 items x (one checkpointed Output + Done) put, then one flush: the writer thread's group
commit against the puts of the calling thread, WAL with synchronous=NORMAL (the default).
"""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from engine._ledger import Done, Output, SqliteLedger

N = 20_000
PAYLOAD = '{"stage":"qualified","score":0.42,"summary":"a contact who asked for a demo"}'


@pytest.mark.timeout(300)
def test_sqlite_ledger_writes(benchmark, tmp_path: Path) -> None:
    benchmark.group = f"ledger writes, {N} items (Output + Done each)"
    runs = itertools.count()
    ledgers: list[SqliteLedger] = []

    def setup():
        for old in ledgers:  # the previous round's: stop its writer thread
            old.close()
        led = SqliteLedger(tmp_path / f"bench-{next(runs)}.db")
        led.open("bench")
        ledgers[:] = [led]
        return (led,), {}

    def run(led: SqliteLedger) -> SqliteLedger:
        put = led.put
        for i in range(N):
            key = str(i)
            put(Output("bench", key, "analyze", PAYLOAD))
            put(Done("bench", key))
        led.flush()
        return led

    led = benchmark.pedantic(run, setup=setup, rounds=5, warmup_rounds=0)
    commits = led.commits
    assert led.counts("bench")["done"] == N
    led.close()
    rate = N / benchmark.stats.stats.median
    benchmark.extra_info.update(items_per_s=round(rate), commits_last_round=commits)
    print(f"\nledger writes: {rate:,.0f} items/s ({2 * N} ops, {commits} commits)")
