#!/usr/bin/env bash
# Prepares everything the tests and benchmarks need, idempotently, on a fresh machine:
#   .venv with torch 2.14.1 (the CUDA-13 build: it also runs on CPU-only machines, and lets the
#   CUDA sources compile and link), the packages of requirements-dev.txt, and lowrank_kernels
#   installed in editable mode with its extension built (CPU sources always, CUDA sources when
#   nvcc is found). Rebuilds only when csrc/ or setup.py changed since the last build.
# Knobs: PYTHON (interpreter for the venv), LOWRANK_VENV, LOWRANK_SKIP_CUDA_BUILD=1,
#        TORCH_CUDA_ARCH_LIST (default "8.9;9.0+PTX"), MAX_JOBS, CUDA_HOME.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${LOWRANK_VENV:-$ROOT/.venv}
log() { printf '[setup_env] %s\n' "$*" >&2; }
# pip, minus the machine-local index warnings ("Location ... is ignored") that bury real errors.
pip_q() {
  python -m pip install -q --disable-pip-version-check "$@" 2>&1 | { grep -v "is ignored: it is neither" || true; }
}

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  "${PYTHON:-python3}" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"

if ! python -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.14.1")' 2>/dev/null; then
  log "installing torch 2.14.1 (a few minutes)"
  pip_q "torch==2.14.1"
fi
stamp_deps="$VENV/.lowrank-deps-$(sha1sum "$ROOT/requirements-dev.txt" | cut -c1-12)"
if [ ! -f "$stamp_deps" ]; then
  log "installing requirements-dev.txt"
  pip_q -r "$ROOT/requirements-dev.txt"
  # ista-daslab-optimizers imports wandb and assumes CUDA: only its DCT utilities are used.
  pip_q --no-deps "ista-daslab-optimizers==1.1.15" \
    || log "ista-daslab-optimizers unavailable: its comparison tests will skip"
  touch "$stamp_deps"
fi

# nvcc may sit outside the toolkit root (e.g. /usr/local/bin/nvcc beside /usr/local/cuda).
if [ -z "${CUDA_HOME:-}" ] && [ -f /usr/local/cuda/include/cuda_runtime.h ]; then
  export CUDA_HOME=/usr/local/cuda
fi
src_hash=$(cd "$ROOT" && cat setup.py $(find csrc -type f | sort) | sha1sum | cut -c1-12)
stamp_build="$VENV/.lowrank-build-$src_hash-${LOWRANK_SKIP_CUDA_BUILD:-0}"
if [ ! -f "$stamp_build" ] || ! python -c 'import lowrank_kernels._C' 2>/dev/null; then
  log "building lowrank_kernels._C (CUDA_HOME=${CUDA_HOME:-none}, MAX_JOBS=${MAX_JOBS:-auto})"
  rm -f "$VENV"/.lowrank-build-*
  pip_q --no-build-isolation --no-deps -e "$ROOT"
  touch "$stamp_build"
fi
python - <<'PY'
import torch, lowrank_kernels as lk
cuda = lk._dispatch.CUDA_CXX_AVAILABLE
print(f"[setup_env] torch {torch.__version__}, extension loaded: {lk.EXTENSION_AVAILABLE}, "
      f"CUDA kernels built: {cuda}, GPU present: {torch.cuda.is_available()}")
if not lk.EXTENSION_AVAILABLE:
    raise SystemExit(lk.EXTENSION_LOAD_ERROR)
PY
