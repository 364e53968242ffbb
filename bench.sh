#!/usr/bin/env bash
# The pytest-benchmark suite, twice where the build matters:
#   1. everything on the sources as written (.venv, what ./test.sh tests)
#        -> results/benchmarks/engine.json
#   2. the engine's own overhead (no-op throughput, virtual clock, flow control) on the
#      compiled hot path (.venv-compiled, CONVEYOR_COMPILE=1: see setup.py)
#        -> results/benchmarks/engine-compiled.json
# Extra arguments go to both pytest runs (e.g. -k virtual). CONVEYOR_BENCH_COMPILED=0 skips 2.
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p results/benchmarks
. scripts/venv.sh
. scripts/compiled.sh
ensure_venv "[dev]" "engine pytest hypothesis pytest_timeout stagepipe"
.venv/bin/python -m pytest tests/benchmarks -p no:randomly --benchmark-enable --benchmark-only \
  --benchmark-json=results/benchmarks/engine.json "$@"
if [ "${CONVEYOR_BENCH_COMPILED:-1}" != "0" ]; then
  ensure_compiled_venv || echo "bench: building the compiled venv failed" >&2
  # -P: the checkout is not on sys.path (with it, `import engine` would find the sources)
  if .venv-compiled/bin/python -P -c "import engine, sys; sys.exit(0 if engine.COMPILED else 1)" \
       2>/dev/null; then
    # -P: the checkout is not put on sys.path, so `import engine` is the compiled install
    .venv-compiled/bin/python -P -m pytest tests/benchmarks/test_overhead.py \
      tests/benchmarks/test_virtual.py tests/benchmarks/test_flow.py -p no:randomly \
      -p no:cacheprovider --benchmark-enable --benchmark-only \
      --benchmark-json=results/benchmarks/engine-compiled.json "$@"
  else  # mypyc refused or no compiler: setup.py fell back to pure Python (a warning, not a failure)
    echo "bench: the compiled build did not compile (setup.py fell back to pure Python);" \
         "skipping the compiled benchmarks" >&2
  fi
fi
