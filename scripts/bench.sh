#!/usr/bin/env bash
# The main job (README): sets up the environment if needed, then runs the benchmarks that fit
# this machine (CPU-sized without a GPU) and writes bench/out/ (git-ignored); `--refresh`
# rewrites the committed bench/results/ instead.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/scripts/setup_env.sh"
# shellcheck disable=SC1091
. "${LOWRANK_VENV:-$ROOT/.venv}/bin/activate"
cd "$ROOT"
python bench/run_all.py "$@"
