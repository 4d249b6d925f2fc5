#!/usr/bin/env bash
# The GPU check (README "GPU"): on a machine with one NVIDIA GPU, builds the extension for that
# GPU only, runs every GPU test and the benchmarks that decide defaults, and writes
# bench/results/gpu_<device>_<commit>.csv and .log, all within 8 minutes (bench/gpu_check.py).
#   bash scripts/gpu_check.sh --dry-run           # CPU: print and check the plan (CI runs this)
#   bash scripts/gpu_check.sh --commit 1a2b3c4    # on the GPU machine (the copied tree's commit)
# No package index is needed: it uses the python that holds torch (PYTHON, else this checkout's
# .venv, else python3) and installs nothing but a carried .whl/galore_torch-*.whl.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
  if [ -x "${LOWRANK_VENV:-$ROOT/.venv}/bin/python" ]; then
    PYTHON="${LOWRANK_VENV:-$ROOT/.venv}/bin/python"
  else
    PYTHON=python3
  fi
fi
cd "$ROOT"
exec "$PYTHON" bench/gpu_check.py "$@"
