"""Shared fixtures. Keep this file small: put helpers in their own modules and import here."""
from pg import pg_cluster, pg_dsn  # noqa: F401 -- PostgreSQL fixtures (see tests/pg.py)
