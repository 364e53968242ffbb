#!/usr/bin/env bash
# Set up (once) and run the test suite. Needs only Python 3.11; PostgreSQL 15's binaries must be
# at /usr/lib/postgresql/15/bin (the tests start a throwaway cluster themselves).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import engine, pytest, hypothesis, pytest_timeout, stagepipe" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.installed ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
  touch .venv/.installed
fi
exec .venv/bin/python -m pytest "$@"
