"""Inspect a ledger: ``python -m engine.ledger DB_OR_DSN --name NAME``.

Prints the counts of pipeline ``NAME`` by stage and status (checkpointed outputs and failures
per stage; items done, failed and in progress), then its failures with their reasons
(``--traceback`` adds the tracebacks). ``DB_OR_DSN`` is a ``postgresql://``/``postgres://`` URL
(a ``PostgresLedger``; ``--table`` names its table) or the path of a SQLite ledger, opened
read-only: a missing file is an error, never a new empty database. It never takes the name's
lock, so it may watch a run in progress.

Exit status: 0, or 2 for a usage error or a ledger that cannot be read.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ._ledger import Counts, Failure, Ledger, LedgerError, SqliteLedger

__all__ = ["format_report", "main"]

PROG = "python -m engine.ledger"


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(t))


def format_report(where: str, name: str, counts: Counts, failures: Sequence[Failure], *,
                  tracebacks: bool = False) -> str:
    """The CLI's text: counts by stage and status, then the failures."""
    lines = [f"ledger {where}, pipeline {name!r}"]
    stages = list(counts["outputs"])
    stages += [s for s in counts["failed_at"] if s not in counts["outputs"]]
    if stages:
        width = max(len("stage"), *(len(s) for s in stages))
        lines.append(f"  {'stage':<{width}}  {'checkpointed':>12}  {'failed':>6}")
        for s in stages:
            lines.append(f"  {s:<{width}}  {counts['outputs'].get(s, 0):>12}  "
                         f"{counts['failed_at'].get(s, 0):>6}")
    lines.append(f"items: {counts['done']} done, {counts['failed']} failed, "
                 f"{counts['in_progress']} in progress (checkpointed, neither done nor failed)")
    lines.append(f"failures: {len(failures)}")
    for f in failures:
        lines.append(f"  key {f.key!r} at stage {f.stage!r}: {f.type}: {f.message}  "
                     f"({_when(f.recorded_at)})")
        if tracebacks and f.traceback:
            lines.extend(f"      {line}" for line in f.traceback.rstrip().splitlines())
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=(
        "Counts by stage and status, then the failures, of one pipeline in a ledger."))
    p.add_argument("ledger", metavar="DB_OR_DSN",
                   help="a SQLite ledger file, or a postgresql:// DSN")
    p.add_argument("--name", required=True, help="the pipeline name (Pipeline(name=...))")
    p.add_argument("--table", default="conveyor_ledger",
                   help="PostgreSQL: the ledger's table (default: %(default)s)")
    p.add_argument("--traceback", action="store_true", help="print each failure's traceback")
    return p


def _error(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)  # exits 2 on a usage error
    target: str = args.ledger
    ledger: Ledger
    if target.startswith(("postgresql://", "postgres://")):
        try:
            from .adapters._ledger_pg import PostgresLedger
        except ImportError as exc:
            return _error(f"a PostgreSQL ledger needs psycopg2: {exc}")
        try:
            pg = PostgresLedger(target, table=args.table, connect_timeout=10)
        except ValueError as exc:
            return _error(str(exc))
        ledger, where = pg, pg.where
    else:
        path = Path(target)
        if not path.is_file():
            return _error(f"no SQLite ledger at {target} (not a file)")
        ledger = SqliteLedger(path, readonly=True)
        where = str(path)
    try:
        counts = ledger.counts(args.name)
        failures = ledger.failures(args.name)
    except LedgerError as exc:
        return _error(str(exc))
    finally:
        with contextlib.suppress(LedgerError):  # a read-only ledger has nothing to flush
            ledger.close()
    print(format_report(where, args.name, counts, failures, tracebacks=args.traceback))
    return 0


if __name__ == "__main__":
    sys.exit(main())
