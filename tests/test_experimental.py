"""Experimental kernels, out of the default test matrix: run with LOWRANK_TEST_EXPERIMENTAL=1.

The Triton one-pass step (triton_kernels/experimental/fused_galore_step_onepass.py) against the
reference, dense and generated bases, both sides (Triton's interpreter without a GPU). The CUDA
16-bit path (csrc/experimental) runs in the CUDA test modules when it is built (the cuda_paths
fixture, tests/conftest.py).
"""

import os

import pytest
import torch
from cases import (
    HYPER,
    SMALL_ODD_SHAPES,
    StepInputs,
    assert_step_matches,
    qgalore_inputs,
    step_inputs,
)

from lowrank_kernels import _dispatch, reference

pytestmark = [
    pytest.mark.skipif(os.environ.get("LOWRANK_TEST_EXPERIMENTAL", "0") != "1",
                       reason="experimental kernels: LOWRANK_TEST_EXPERIMENTAL=1"),
    pytest.mark.skipif(not _dispatch.TRITON_AVAILABLE, reason="triton not installed"),
]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F32, BF16 = torch.float32, torch.bfloat16
LEFT, RIGHT = SMALL_ODD_SHAPES


def onepass():
    from lowrank_kernels.triton_kernels.experimental import fused_galore_step_onepass

    return fused_galore_step_onepass


@pytest.mark.parametrize("m,n,rank,dtype", [(*LEFT, 17, F32), (*RIGHT, 64, BF16),
                                            (*RIGHT, 1, F32), (200, 131, 130, BF16)], ids=str)
def test_onepass_dense_matches_reference(m, n, rank, dtype):
    inputs = step_inputs(m, n, rank, weight_dtype=dtype, proj_dtype=dtype, device=DEVICE)
    out = inputs.clone()
    onepass().fused_galore_step(*out.args(), **HYPER)
    assert_step_matches(out, inputs, **HYPER)


@pytest.mark.parametrize("basis", ["int4", "dct"])
@pytest.mark.parametrize("m,n", SMALL_ODD_SHAPES, ids=["left", "right"])
def test_onepass_generated_basis_matches_reference(m, n, basis):
    q = qgalore_inputs(m, n, 17, int4_proj=basis == "int4", int8_weight=False)
    if basis == "int4":
        dense_basis = reference.dequantize_int4(q.proj, q.proj_scales, q.proj_zeros,
                                                reference.quantized_basis_shape(m, n, 17), 256)
    else:
        q.proj = torch.arange(0, 3 * 17, 3, dtype=torch.int32)
        dense_basis = reference.dct_projection(q.proj, m, n)
    out = type(q)(*(None if t is None else t.to(DEVICE, copy=True) for t in q.tensors()))
    onepass().fused_galore_step(*out.args(), **HYPER, proj_scales=out.proj_scales,
                                proj_zeros=out.proj_zeros)
    before = StepInputs(q.param, q.grad, dense_basis, q.exp_avg, q.exp_avg_sq)
    after = StepInputs(out.param.cpu(), q.grad, dense_basis, out.exp_avg.cpu(),
                       out.exp_avg_sq.cpu())
    assert_step_matches(after, before, **HYPER)


def test_onepass_refuses_int8_weights_and_large_ranks():
    inputs = step_inputs(540, 520, 513, device=DEVICE)
    with pytest.raises(ValueError, match="proj: rank r=513 exceeds"):
        onepass().fused_galore_step(*inputs.clone().args(), **HYPER)
    q = qgalore_inputs(*RIGHT, 5, int4_proj=False, int8_weight=True)
    with pytest.raises(ValueError, match="INT8"):
        onepass().fused_galore_step(*q.args(), **HYPER, param_scales=q.param_scales,
                                    param_zeros=q.param_zeros)
