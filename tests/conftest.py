"""Test-session setup: Triton runs in its interpreter when no GPU is present."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before any @triton.jit runs; the kernels then execute on CPU tensors.
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.pop("LOWRANK_BACKEND", None)  # tests choose backends explicitly


@pytest.fixture(scope="module")
def one_thread():
    """Tiny shapes: intra-op threads only add scheduling noise (and minutes on a busy machine).
    Modules opt in with ``pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["general", "fast"])
def cuda_paths(request, monkeypatch):
    """Runs a CUDA test on both paths of the CUDA fused step: the general (fp32-staged) GEMM and
    the opt-in 16-bit fast path (LOWRANK_CUDA_FAST_PATH=1, csrc/cuda/fused_galore_step.cu)."""
    monkeypatch.setenv("LOWRANK_CUDA_FAST_PATH", "1" if request.param == "fast" else "0")
    return request.param
