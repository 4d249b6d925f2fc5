"""fused_galore_step in the Q-GaLore formats (packed INT4 basis × INT8 weight, DESIGN.md §4.3-§4.4):
the C++ CPU kernel against the reference, every combination, both sides, odd shapes."""

import pytest
import torch
from cases import (
    HYPER,
    SMALL_ODD_SHAPES,
    StepInputs,
    assert_fp32_close,
    assert_step_matches,
    qgalore_inputs,
)

import lowrank_kernels as lk
from lowrank_kernels import reference

pytestmark = pytest.mark.skipif(not lk.EXTENSION_AVAILABLE, reason="extension not built")

# (m, n, group size): groups straddling rows and a partial last group (67·131 = 34·256 + 73),
# a group dividing the rows, and a tiny group.
GROUP_CASES = [(*SMALL_ODD_SHAPES[0], 256), (*SMALL_ODD_SHAPES[1], 256), (300, 211, 256),
               (256, 96, 256), (45, 70, 6)]
SMALL_LR = {**HYPER, "lr": 2e-3}  # updates below one INT8 step: stochastic rounding decides


def run_both(inputs, hyper, proj_group_size, param_group_size, seed=11, backend="cpu"):
    ours, ref = inputs.clone(), inputs.clone()
    lk.ops.fused_galore_step(*ours.args(), **hyper,
                             **ours.formats(proj_group_size, param_group_size, seed),
                             backend=backend)
    reference.fused_qgalore_step(*ref.args(), **hyper,
                                 **ref.formats(proj_group_size, param_group_size, seed))
    return ours, ref


def assert_int8_step_matches(ours, ref, before, group_size):
    """States as the fp32 rule. INT8 weights: the kernel's W' differs from the reference's by
    GEMM rounding only, so scales agree to fp32 accuracy (of the group's values: s =
    (max − min)/255 inherits their rounding, which dominates in tiny groups of close values), a
    zero may flip by one where −min/s sits on a .5 (rare), and a code may differ by one where u
    falls within that rounding of the fractional part (rare); dequantized weights then agree to
    one step."""
    assert_fp32_close(ours.exp_avg, ref.exp_avg)
    assert_fp32_close(ours.exp_avg_sq, ref.exp_avg_sq)
    w_ref = reference.dequantize_int8(ref.param, ref.param_scales, ref.param_zeros, group_size)
    w_before = reference.dequantize_int8(before.param, before.param_scales, before.param_zeros,
                                         group_size)
    # |W'| per group, bounded from the weights before and after (codes clamped at 0 or 255,
    # as in a group that does not contain 0, hide |W'| from the latter)
    flat = torch.maximum(w_ref.abs(), w_before.abs()).reshape(-1)
    padded = torch.cat([flat, flat.new_zeros(-flat.numel() % group_size)])
    group_absmax = padded.view(-1, group_size).amax(1)
    scale_err = (ours.param_scales - ref.param_scales).abs()
    scale_tol = 1e-5 * ref.param_scales.abs() + 2**-18 * group_absmax / 255
    assert (scale_err <= scale_tol).all(), f"scales differ by up to {scale_err.max().item():.3e}"
    zero_diff = (ours.param_zeros - ref.param_zeros).abs()
    assert zero_diff.max().item() <= 1
    assert zero_diff.bool().sum().item() <= max(1, 0.01 * zero_diff.numel())
    same_zero = (zero_diff == 0).repeat_interleave(group_size)[:ours.param.numel()]
    code_diff = (ours.param.int() - ref.param.int()).abs().view(-1)[same_zero]
    assert code_diff.max().item() <= 1
    assert code_diff.bool().float().mean().item() <= 1e-3
    w_ours = reference.dequantize_int8(ours.param, ours.param_scales, ours.param_zeros,
                                       group_size)
    step = ref.param_scales.repeat_interleave(group_size)[:w_ref.numel()].view(w_ref.shape)
    assert ((w_ours - w_ref).abs() <= step * (1 + 1e-4)).all()
    assert not torch.equal(ours.param, before.param), "the weight did not move"
    assert not torch.equal(ours.param_scales, before.param_scales)


@pytest.mark.parametrize("m,n,group_size", GROUP_CASES, ids=str)
@pytest.mark.parametrize("rank", [1, 17])
@pytest.mark.parametrize("int4_proj", [False, True], ids=["dense_proj", "int4_proj"])
@pytest.mark.parametrize("hyper", [HYPER, SMALL_LR], ids=["lr0.5", "lr2e-3"])
def test_int8_weight_matches_reference(m, n, group_size, rank, int4_proj, hyper):
    rank = min(rank, m, n)
    inputs = qgalore_inputs(m, n, rank, int4_proj=int4_proj, int8_weight=True,
                            proj_group_size=group_size, param_group_size=group_size)
    ours, ref = run_both(inputs, hyper, group_size, group_size)
    assert_int8_step_matches(ours, ref, inputs, group_size)


@pytest.mark.parametrize("m,n,group_size", [(600, 1024, 256), (700, 411, 256)],
                         ids=["whole-rows", "straddling"])
def test_int8_weight_several_update_tiles(m, n, group_size):
    """More than 2^18 elements: the CPU kernel's requantizing pass runs in several row tiles, cut
    on group boundaries (every row when n % g == 0: 4 tiles of 150 rows; every 256 rows when
    groups straddle rows: 256 + 444), each tile's Philox offsets continuing the row-major index."""
    inputs = qgalore_inputs(m, n, 9, int4_proj=True, int8_weight=True,
                            proj_group_size=group_size, param_group_size=group_size)
    ours, ref = run_both(inputs, SMALL_LR, group_size, group_size)
    assert_int8_step_matches(ours, ref, inputs, group_size)


@pytest.mark.parametrize("m,n,group_size", GROUP_CASES, ids=str)
@pytest.mark.parametrize("rank", [1, 17])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_int4_proj_float_weight_matches_reference(m, n, group_size, rank, weight_dtype):
    """Against the dense step on the dequantized basis (the reference's definition)."""
    rank = min(rank, m, n)
    inputs = qgalore_inputs(m, n, rank, int4_proj=True, int8_weight=False,
                            proj_group_size=group_size)
    inputs.param = inputs.param.to(weight_dtype)
    basis = reference.dequantize_int4(inputs.proj, inputs.proj_scales, inputs.proj_zeros,
                                      reference.quantized_basis_shape(m, n, rank), group_size)
    ours = inputs.clone()
    lk.ops.fused_galore_step(*ours.args(), **HYPER, **ours.formats(group_size, 256, 0),
                             backend="cpu")
    dense = StepInputs(inputs.param, inputs.grad, basis, inputs.exp_avg, inputs.exp_avg_sq)
    assert_step_matches(StepInputs(ours.param, ours.grad, basis, ours.exp_avg, ours.exp_avg_sq),
                        dense, **HYPER)
    # and the reference backend of the op itself takes the same path
    via_ref = inputs.clone()
    lk.ops.fused_galore_step(*via_ref.args(), **HYPER, **via_ref.formats(group_size, 256, 0),
                             backend="reference")
    assert_step_matches(StepInputs(via_ref.param, via_ref.grad, basis, via_ref.exp_avg,
                                   via_ref.exp_avg_sq), dense, **HYPER)


@pytest.mark.parametrize("m,n", [(257, 140), (140, 257)], ids=["right", "left"])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_int8_weight_low_precision_grad_and_state(m, n, state_dtype):
    inputs = qgalore_inputs(m, n, 33, int4_proj=True, int8_weight=True,
                            grad_dtype=torch.bfloat16, state_dtype=state_dtype)
    ours, ref = run_both(inputs, HYPER, 256, 256)
    if state_dtype == torch.float32:
        assert_int8_step_matches(ours, ref, inputs, 256)
    else:  # bf16 moments: one bf16 rounding apart at most
        for a, b in ((ours.exp_avg, ref.exp_avg), (ours.exp_avg_sq, ref.exp_avg_sq)):
            torch.testing.assert_close(a.float(), b.float(), rtol=2**-7, atol=0)
        diff = (ours.param.int() - ref.param.int()).abs()
        assert diff.max().item() <= 1 and diff.bool().float().mean().item() <= 1e-3


def test_int8_rounding_stream_depends_on_seed_and_step():
    inputs = qgalore_inputs(131, 67, 8, int4_proj=True, int8_weight=True)
    a, _ = run_both(inputs, SMALL_LR, 256, 256, seed=1)
    b, _ = run_both(inputs, SMALL_LR, 256, 256, seed=2)
    c, _ = run_both(inputs, {**SMALL_LR, "step": SMALL_LR["step"] + 1}, 256, 256, seed=1)
    assert not torch.equal(a.param, b.param)
    assert not torch.equal(a.param, c.param)


def test_int8_many_steps_track_reference_in_expectation():
    """Ten steps with fresh gradients: the dequantized kernel weights stay within a few INT8
    steps of the reference trajectory (both round stochastically from the same stream)."""
    inputs = qgalore_inputs(200, 90, 12, int4_proj=True, int8_weight=True)
    ours, ref = inputs.clone(), inputs.clone()
    gen = torch.Generator().manual_seed(3)
    for step in range(1, 11):
        grad = torch.randn(200, 90, generator=gen)
        hyper = {**SMALL_LR, "step": step}
        lk.ops.fused_galore_step(ours.param, grad, ours.proj, ours.exp_avg, ours.exp_avg_sq,
                                 **hyper, **ours.formats(256, 256, 4), backend="cpu")
        reference.fused_qgalore_step(ref.param, grad, ref.proj, ref.exp_avg, ref.exp_avg_sq,
                                     **hyper, **ref.formats(256, 256, 4))
    w_ours = reference.dequantize_int8(ours.param, ours.param_scales, ours.param_zeros, 256)
    w_ref = reference.dequantize_int8(ref.param, ref.param_scales, ref.param_zeros, 256)
    step_size = ref.param_scales.max().item()
    assert (w_ours - w_ref).abs().max().item() <= 2 * step_size
    assert (ours.param != ref.param).float().mean().item() <= 1e-2


def test_opcheck_int8_step():
    inputs = qgalore_inputs(70, 45, 5, int4_proj=True, int8_weight=True, proj_group_size=64,
                            param_group_size=64)
    torch.library.opcheck(torch.ops.lowrank.fused_galore_step.default, inputs.args(),
                          {**HYPER, **inputs.formats(64, 64, 3)})


# ---- bad input: clear errors naming the argument, nothing written ----------------------------
def _bad_step_cases():
    base = qgalore_inputs(67, 131, 9, int4_proj=True, int8_weight=True)

    def case(name, edit, **fmt):
        inputs = base.clone()
        edit(inputs)
        formats = {**inputs.formats(256, 256, 5), **fmt}
        return name, inputs, formats

    def set_(field, value):
        return lambda i: setattr(i, field, value(i))

    return [
        case("param_group_size", lambda i: None, param_group_size=0),
        case("proj_group_size", lambda i: None, proj_group_size=255),
        case("param_scales", lambda i: None, param_group_size=128),  # wrong group count
        case("param_scales", set_("param_scales", lambda i: None)),
        case("param_zeros", set_("param_zeros", lambda i: None)),
        case("proj_scales", set_("proj_scales", lambda i: None)),
        case("proj_zeros", set_("proj_zeros", lambda i: i.proj_zeros.double())),
        case("param", set_("param", lambda i: i.param.to(torch.int8))),
        case("proj", set_("proj", lambda i: i.proj[:-1])),
        case("proj", set_("proj", lambda i: i.proj.view(torch.int8))),
        case("seed", lambda i: None, seed=2**32),
        case("seed", lambda i: None, seed=-1),
        case("exp_avg", set_("exp_avg", lambda i: i.exp_avg.T.contiguous())),
        case("param_zeros", set_("param_zeros", lambda i: i.param_scales)),
    ]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_bad_input_raises_before_writing(backend):
    for name, inputs, formats in _bad_step_cases():
        before = inputs.clone()
        with pytest.raises(ValueError, match=name):
            lk.ops.fused_galore_step(*inputs.args(), **HYPER, **formats, backend=backend)
        for a, b in zip(inputs.tensors(), before.tensors()):
            assert a is None or torch.equal(a, b), f"{name}: a tensor was written"
