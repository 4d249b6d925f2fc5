#!/usr/bin/env bash
# Builds the extension with CMake from the same sources as setup.py (CI runs this too).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck disable=SC1091
. "${LOWRANK_VENV:-$ROOT/.venv}/bin/activate"
if [ -z "${CUDA_HOME:-}" ] && [ -f /usr/local/cuda/include/cuda_runtime.h ]; then
  export CUDA_HOME=/usr/local/cuda
fi
[ -n "${CUDA_HOME:-}" ] && export PATH="$CUDA_HOME/bin:$PATH"
# LOWRANK_CMAKE_CUDA_ARCHS (default "89;90") sets CMAKE_CUDA_ARCHITECTURES.
cmake -S "$ROOT" -B "$ROOT/build/cmake" -DPython3_EXECUTABLE="$(command -v python)" \
  -DCMAKE_CUDA_ARCHITECTURES="${LOWRANK_CMAKE_CUDA_ARCHS:-89;90}" \
  -DCMAKE_PREFIX_PATH="$(python -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')"
cmake --build "$ROOT/build/cmake" -j "${MAX_JOBS:-2}"
python - "$ROOT/build/cmake/lowrank_kernels/_C.so" <<'PY'
import sys, torch
torch.ops.load_library(sys.argv[1])
print("[cmake_build] loaded", sys.argv[1], "->", torch.ops.lowrank.fused_galore_step.default.name())
PY
