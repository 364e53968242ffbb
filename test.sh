#!/usr/bin/env bash
# Set up (once) and run the test suite. Needs only Python 3.11; PostgreSQL 15's binaries must be
# at /usr/lib/postgresql/15/bin (the tests start a throwaway cluster themselves). The install
# is editable and never compiled: the tests run the sources as written (the compiled hot path
# is built and measured by ./bench.sh; tests/test_engine_build.py checks it decides the same).
set -euo pipefail
cd "$(dirname "$0")"
. scripts/venv.sh
ensure_venv "[dev]" "engine pytest hypothesis pytest_timeout stagepipe"
exec .venv/bin/python -m pytest "$@"
