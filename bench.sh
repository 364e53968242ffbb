#!/usr/bin/env bash
# Engine overhead micro-benchmarks (pytest-benchmark); JSON saved under results/benchmarks/.
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p results/benchmarks
exec ./test.sh tests/benchmarks -p no:randomly --benchmark-enable --benchmark-only \
  --benchmark-json=results/benchmarks/engine.json "$@"
