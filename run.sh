#!/usr/bin/env bash
# Set up (once) and run the main job: the default benchmark suite (python -m bench), which
# writes results/ and prints the comparison table. Extra arguments go to `python -m bench`.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import engine, simulators, bench, numpy, matplotlib" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.installed-run ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -e .
  touch .venv/.installed-run
fi
exec .venv/bin/python -m bench "$@"
