#!/usr/bin/env bash
# Set up (once) and run the test suite. Needs only Python 3.11; PostgreSQL 15's binaries must be
# at /usr/lib/postgresql/15/bin (the tests start a throwaway cluster themselves). The engine's
# hot path is compiled with mypyc when gcc is there (setup.py); CONVEYOR_PURE=1 tests the
# pure-Python sources instead.
set -euo pipefail
cd "$(dirname "$0")"
. scripts/venv.sh
ensure_venv "[dev]" "engine pytest hypothesis pytest_timeout stagepipe"
exec .venv/bin/python -m pytest "$@"
