"""Test-session setup: Triton runs in its interpreter when no GPU is present."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before any @triton.jit runs; the kernels then execute on CPU tensors.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import lowrank_kernels as lk  # after TRITON_INTERPRET


@pytest.fixture(scope="module")
def one_thread():
    """Tiny shapes: intra-op threads only add scheduling noise (and minutes on a busy machine).
    Modules opt in with ``pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _experimental_fast16_built() -> bool:
    """Whether the extension was built with LOWRANK_EXPERIMENTAL_CUDA=1 (csrc/experimental)."""
    try:
        torch.ops.lowrank_experimental.fused_galore_step  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


@pytest.fixture(params=["cuda_cxx", pytest.param("experimental_fast16", marks=pytest.mark.skipif(
    not _experimental_fast16_built(), reason="csrc/experimental is not built "
                                             "(LOWRANK_EXPERIMENTAL_CUDA=1)"))])
def cuda_paths(request, monkeypatch):
    """Runs a test of the CUDA C++ kernels through ``torch.ops.lowrank.<op>``: the one switch
    set to them (``set_cuda_backend("cuda_cxx")``) and, where the extension was built with
    LOWRANK_EXPERIMENTAL_CUDA=1, once more with the registered CUDA kernel of fused_galore_step
    pointed at the experimental 16-bit path (torch.ops.lowrank_experimental, which hands the
    inputs it does not serve to the general path)."""
    if not lk._dispatch.CUDA_CXX_AVAILABLE:
        pytest.skip("the extension was built without its CUDA kernels")
    previous = lk.cuda_backend()
    lk.set_cuda_backend("cuda_cxx")
    if request.param == "experimental_fast16":
        if not lk._dispatch.register_cuda_kernels():
            pytest.skip("needs the Triton registration to reroute the CUDA key")
        monkeypatch.setitem(lk._dispatch._CUDA_TARGETS, "fused_galore_step",
                            torch.ops.lowrank_experimental.fused_galore_step)
    yield request.param
    lk.set_cuda_backend(previous)
