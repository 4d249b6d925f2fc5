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
# The build takes minutes (about 5 on 2 cores with the CUDA sources): a line per compiled
# source as it finishes, the whole log in $build_log, its tail when the build fails.
build_progress() {
  local start=$SECONDS line
  while IFS= read -r line; do
    printf '%s\n' "$line" >> "$build_log"
    if [[ $line =~ ^\[([0-9]+)/([0-9]+)\].*[[:space:]]-c[[:space:]]+([^[:space:]]+) ]]; then
      log "  compiled ${BASH_REMATCH[3]#"$ROOT"/} [${BASH_REMATCH[1]}/${BASH_REMATCH[2]}]," \
        "$((SECONDS - start)) s"
    fi
  done
}
if [ ! -f "$stamp_build" ] || ! python -c 'import lowrank_kernels._C' 2>/dev/null; then
  log "building lowrank_kernels._C (CUDA_HOME=${CUDA_HOME:-none}, MAX_JOBS=${MAX_JOBS:-auto};" \
    "minutes: one line per compiled source)"
  rm -f "$VENV"/.lowrank-build-*
  build_log="$VENV/.lowrank-build.log"
  : > "$build_log"
  if ! python -m pip install -v --disable-pip-version-check --no-build-isolation --no-deps \
      -e "$ROOT" 2>&1 | build_progress; then
    log "build failed; the end of $build_log:"
    tail -n 40 "$build_log" >&2
    exit 1
  fi
  log "built in $SECONDS s since set-up started"
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
