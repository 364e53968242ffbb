"""PostgreSQL for the tests: one throwaway cluster per session, a fresh database per test.

The cluster helper lives in ``examples/_throwaway_pg.py`` so ``examples/contact_sync.py --demo``
uses the same code. If the PostgreSQL 15 binaries are missing, every test that asks for these
fixtures fails with a message naming the missing binaries: the tests run in CI, they are never
skipped silently.
"""
from __future__ import annotations

import itertools
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

try:
    from examples._throwaway_pg import PostgresUnavailable, ThrowawayPostgres
except ModuleNotFoundError:  # `pytest` run without the checkout on sys.path (`python -m` adds it)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from examples._throwaway_pg import PostgresUnavailable, ThrowawayPostgres

__all__ = ["PostgresUnavailable", "ThrowawayPostgres", "pg_cluster", "pg_dsn"]

_names = itertools.count(1)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[ThrowawayPostgres]:
    """The session's PostgreSQL 15 cluster (started once, removed at the end)."""
    try:
        cluster = ThrowawayPostgres().start()
    except PostgresUnavailable as exc:
        pytest.fail(f"cannot start the throwaway PostgreSQL cluster: {exc}", pytrace=False)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def pg_dsn(pg_cluster: ThrowawayPostgres) -> str:
    """A DSN to an empty database of its own (isolation: row counts are the test's own)."""
    return pg_cluster.create_database(f"test_{next(_names)}")
