#!/usr/bin/env bash
# Set up (once) and run the main job: the default benchmark suite (python -m bench), which
# writes results/latest/ (git-ignored: the checkout stays clean) and prints the comparison table.
# `./run.sh --out results` rewrites the committed reference results instead. Extra arguments go
# to `python -m bench`.
set -euo pipefail
cd "$(dirname "$0")"
. scripts/venv.sh
ensure_venv "" "engine simulators bench numpy matplotlib"
exec .venv/bin/python -m bench "$@"
