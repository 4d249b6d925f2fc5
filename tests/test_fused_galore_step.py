"""fused_galore_step: the C++ CPU kernel against the reference (DESIGN.md §4.2, §6)."""

import pytest
import torch
from cases import (
    HYPER,
    ODD_SHAPES,
    RANKS,
    STATE_DTYPES,
    WEIGHT_DTYPES,
    assert_step_matches,
    step_inputs,
)

import lowrank_kernels as lk

pytestmark = pytest.mark.skipif(not lk.EXTENSION_AVAILABLE, reason="extension not built")


@pytest.mark.parametrize("m,n", ODD_SHAPES, ids=str)
@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("weight_dtype", WEIGHT_DTYPES, ids=str)
def test_cpu_matches_reference(m, n, rank, weight_dtype):
    inputs = step_inputs(m, n, rank, weight_dtype=weight_dtype)
    out = inputs.clone()
    torch.ops.lowrank.fused_galore_step(*out.args(), **HYPER)
    assert_step_matches(out, inputs, **HYPER)


@pytest.mark.parametrize("m,n", [(257, 1000), (1000, 257)], ids=["left", "right"])
@pytest.mark.parametrize("state_dtype", STATE_DTYPES, ids=str)
@pytest.mark.parametrize("proj_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_state_and_basis_dtypes(m, n, state_dtype, proj_dtype):
    inputs = step_inputs(m, n, 33, weight_dtype=torch.bfloat16, state_dtype=state_dtype,
                         proj_dtype=proj_dtype)
    out = inputs.clone()
    lk.ops.fused_galore_step(*out.args(), **HYPER, backend="cpu")
    assert_step_matches(out, inputs, **HYPER)


@pytest.mark.parametrize("m,n", [(64, 64), (1, 5), (5, 1)], ids=str)
def test_cpu_full_rank_and_degenerate_shapes(m, n):
    rank = min(m, n)
    inputs = step_inputs(m, n, rank)
    out = inputs.clone()
    torch.ops.lowrank.fused_galore_step(*out.args(), **HYPER)
    assert_step_matches(out, inputs, **HYPER)


def test_cpu_many_steps_track_reference():
    """Ten consecutive steps stay on the reference trajectory (errors do not accumulate)."""
    inputs = step_inputs(300, 211, 40)
    ours, ref = inputs.clone(), inputs.clone()
    gen = torch.Generator().manual_seed(1)
    for step in range(1, 11):
        grad = torch.randn(300, 211, generator=gen)
        hyper = {**HYPER, "step": step}
        torch.ops.lowrank.fused_galore_step(ours.param, grad, ours.proj, ours.exp_avg,
                                            ours.exp_avg_sq, **hyper)
        lk.reference.fused_galore_step(ref.param, grad, ref.proj, ref.exp_avg, ref.exp_avg_sq,
                                       **hyper)
    for a, b in zip(ours.args(), ref.args()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_zero_weight_decay_and_unit_scale_match():
    inputs = step_inputs(150, 90, 8)
    hyper = {**HYPER, "weight_decay": 0.0, "scale": 1.0, "step": 1}
    out = inputs.clone()
    torch.ops.lowrank.fused_galore_step(*out.args(), **hyper)
    assert_step_matches(out, inputs, **hyper)


@pytest.mark.parametrize("m,n", [(90, 40), (40, 90)], ids=["right", "left"])
def test_cpu_updates_a_parameter_that_requires_grad(m, n):
    """Optimizers pass nn.Parameters (requires_grad=True) under torch.no_grad()."""
    inputs = step_inputs(m, n, 4)
    out = inputs.clone()
    param = torch.nn.Parameter(out.param)
    with torch.no_grad():
        torch.ops.lowrank.fused_galore_step(param, out.grad, out.proj, out.exp_avg,
                                            out.exp_avg_sq, **HYPER)
    out.param = param.detach()
    assert_step_matches(out, inputs, **HYPER)
