#!/usr/bin/env bash
# The test command (README): sets up the environment if needed, then runs the whole test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k triton -x`.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/scripts/setup_env.sh"
# shellcheck disable=SC1091
. "${LOWRANK_VENV:-$ROOT/.venv}/bin/activate"
cd "$ROOT"
python -m pytest -q --timeout=900 tests "$@"
