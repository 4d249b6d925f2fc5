"""fused_galore_step: the C++/CUDA kernel (csrc/cuda) against the reference (DESIGN.md §4.2, §6).

The same cases as the CPU kernel's tests, on CUDA tensors, through torch.ops.lowrank with the
CUDA switch on the C++ kernels (the cuda_paths fixture, tests/conftest.py: also the experimental
16-bit path when it is built); skipped without a GPU.
"""

import pytest
import torch
from cases import (
    HYPER,
    ODD_SHAPES,
    STATE_DTYPES,
    WEIGHT_DTYPES,
    StepInputs,
    assert_step_matches,
    qgalore_inputs,
    step_inputs,
)

import lowrank_kernels as lk

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not lk.EXTENSION_AVAILABLE, reason="extension not built"),
    pytest.mark.usefixtures("cuda_paths"),  # CUDA C++ kernels, + experimental (conftest.py)
]

# Beyond tests/cases.RANKS: ranks off the kernel's 64-wide tiles (130 = 2 tiles + 2), up to 512.
CUDA_RANKS = [1, 17, 64, 130, 512]


def run_cuda(inputs, **hyper):
    out = inputs.clone()
    torch.ops.lowrank.fused_galore_step(*out.args(), **hyper)
    return out


def assert_cuda_step_matches(out, inputs, **hyper):
    """assert_step_matches with the expected values computed on CPU: cuBLAS's own fp32 rounding
    would otherwise eat into the 1e-5 budget where Adam amplifies errors of R (small V)."""
    assert out.param.is_cuda
    assert_step_matches(out.to(device="cpu"), inputs.to(device="cpu"), **hyper)


@pytest.mark.parametrize("m,n", ODD_SHAPES, ids=str)
@pytest.mark.parametrize("rank", CUDA_RANKS)
@pytest.mark.parametrize("weight_dtype", WEIGHT_DTYPES, ids=str)
def test_cuda_matches_reference(m, n, rank, weight_dtype):
    inputs = step_inputs(m, n, rank, weight_dtype=weight_dtype, device="cuda")
    assert_cuda_step_matches(run_cuda(inputs, **HYPER), inputs, **HYPER)


@pytest.mark.parametrize("m,n", [(257, 1000), (1000, 257)], ids=["left", "right"])
@pytest.mark.parametrize("weight_dtype", WEIGHT_DTYPES, ids=str)
@pytest.mark.parametrize("state_dtype", STATE_DTYPES, ids=str)
@pytest.mark.parametrize("proj_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_state_and_basis_dtypes(m, n, weight_dtype, state_dtype, proj_dtype):
    inputs = step_inputs(m, n, 33, weight_dtype=weight_dtype, state_dtype=state_dtype,
                         proj_dtype=proj_dtype, device="cuda")
    assert_cuda_step_matches(run_cuda(inputs, **HYPER), inputs, **HYPER)


@pytest.mark.parametrize("m,n", [(257, 1000), (1000, 257)], ids=["left", "right"])
def test_cuda_fp32_weight_with_bf16_grad(m, n):
    """Master weights in fp32 stepped with a bf16 gradient (the kernel types G and W apart)."""
    inputs = step_inputs(m, n, 40, device="cuda")
    inputs.grad = inputs.grad.bfloat16()
    assert_cuda_step_matches(run_cuda(inputs, **HYPER), inputs, **HYPER)


@pytest.mark.parametrize("m,n", [(64, 64), (1, 5), (5, 1)], ids=str)
def test_cuda_full_rank_and_degenerate_shapes(m, n):
    inputs = step_inputs(m, n, min(m, n), device="cuda")
    assert_cuda_step_matches(run_cuda(inputs, **HYPER), inputs, **HYPER)


def test_cuda_zero_weight_decay_and_unit_scale_match():
    inputs = step_inputs(150, 90, 8, device="cuda")
    hyper = {**HYPER, "weight_decay": 0.0, "scale": 1.0, "step": 1}
    assert_cuda_step_matches(run_cuda(inputs, **hyper), inputs, **hyper)


def test_cuda_many_steps_track_reference():
    """Ten consecutive steps stay on the reference trajectory (errors do not accumulate)."""
    inputs = step_inputs(300, 211, 40, device="cuda")
    ours, ref = inputs.clone(), inputs.to(device="cpu")
    gen = torch.Generator().manual_seed(1)
    for step in range(1, 11):
        grad = torch.randn(300, 211, generator=gen)
        hyper = {**HYPER, "step": step}
        torch.ops.lowrank.fused_galore_step(ours.param, grad.cuda(), ours.proj, ours.exp_avg,
                                            ours.exp_avg_sq, **hyper)
        lk.reference.fused_galore_step(ref.param, grad, ref.proj, ref.exp_avg, ref.exp_avg_sq,
                                       **hyper)
    for a, b in zip(ours.args(), ref.args()):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize("m,n", [(1000, 3001), (3001, 1000)], ids=["left", "right"])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_is_deterministic(m, n, weight_dtype):
    inputs = step_inputs(m, n, 130, weight_dtype=weight_dtype, device="cuda")
    first, second = run_cuda(inputs, **HYPER), run_cuda(inputs, **HYPER)
    for a, b in zip(first.args(), second.args()):
        assert torch.equal(a, b)


def test_explicit_cuda_backend_runs_the_same_kernel(cuda_paths):
    """ops.fused_galore_step(backend="cuda") calls lowrank_cuda::fused_galore_step directly: the
    bits of torch.ops.lowrank on the switched CUDA key (the general path)."""
    if cuda_paths != "cuda_cxx":
        pytest.skip("backend='cuda' is the general path")
    inputs = step_inputs(131, 67, 9, device="cuda")
    out = inputs.clone()
    lk.ops.fused_galore_step(*out.args(), **HYPER, backend="cuda")
    for a, b in zip(out.args(), run_cuda(inputs, **HYPER).args()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("layout", ["transposed", "sliced"])
def test_cuda_strided_grad_and_galore_basis(layout):
    """Read-only inputs of any strides (copied by this kernel) give the dense inputs' step."""
    inputs = step_inputs(300, 211, 17, device="cuda")
    strided = inputs.clone()
    if layout == "transposed":
        strided.grad = inputs.grad.t().contiguous().t()
        strided.proj = inputs.proj.t().contiguous().t()
    else:
        strided.grad = torch.cat([inputs.grad, inputs.grad], dim=1)[:, :211]
        strided.proj = torch.cat([inputs.proj, inputs.proj], dim=1)[:, :211]
    assert not strided.grad.is_contiguous() and not strided.proj.is_contiguous()
    got, want = run_cuda(strided, **HYPER), run_cuda(inputs, **HYPER)
    for name in ("param", "exp_avg", "exp_avg_sq"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name


def _bad(inputs, **changes):
    bad = inputs.clone()
    for name, value in changes.items():
        setattr(bad, name, value)
    return bad


@pytest.mark.parametrize("case,pattern", [
    ("grad_on_cpu", "grad: expected device"),
    ("proj_on_cpu", "proj: expected device"),
    ("state_on_cpu", "exp_avg: expected device"),
    ("param_on_cpu", "grad: expected device"),
    # This case once crashed on the torch 2.11 GPU image inside c10's ArrayRef formatting;
    # messages now format shapes with lowrank::shape_str (csrc/include/lowrank/checks.h).
    ("wrong_state_shape", "exp_avg_sq: expected shape"),
    ("rank_too_large", "proj: "),
    ("int_grad", "grad: expected dtype"),
])
def test_cuda_bad_input_raises_before_writing(case, pattern):
    inputs = step_inputs(70, 40, 8, device="cuda")
    n = inputs.param.shape[1]
    bad = {
        "grad_on_cpu": lambda: _bad(inputs, grad=inputs.grad.cpu()),
        "proj_on_cpu": lambda: _bad(inputs, proj=inputs.proj.cpu()),
        "state_on_cpu": lambda: _bad(inputs, exp_avg=inputs.exp_avg.cpu()),
        "param_on_cpu": lambda: _bad(inputs, param=inputs.param.cpu()),
        "wrong_state_shape": lambda: _bad(inputs, exp_avg_sq=inputs.exp_avg_sq[:-1].clone()),
        "rank_too_large": lambda: _bad(inputs, proj=torch.randn(n + 1, n, device="cuda")),
        "int_grad": lambda: _bad(inputs, grad=inputs.grad.to(torch.int32)),
    }[case]()
    before = bad.clone()
    with pytest.raises(ValueError, match=pattern):
        torch.ops.lowrank.fused_galore_step(*bad.args(), **HYPER)
    for a, b in zip(bad.args(), before.args()):
        assert torch.equal(a.cpu(), b.cpu())


def test_cuda_opcheck():
    inputs = step_inputs(131, 67, 9, device="cuda")
    torch.library.opcheck(torch.ops.lowrank.fused_galore_step.default, inputs.clone().args(),
                          HYPER)


# --------------------------------------------------------------------------------------------
# the 16-bit fast path: G and the basis in one 16-bit type (and W too for launch 2)
# --------------------------------------------------------------------------------------------
# Rows of 16 bytes (n, r multiples of 8) take the cp.async loader; the others its plain-load
# fallback; small shapes leave most of every tile empty (1x1-sized ones are in the fragment
# mapping test, whose tolerance does not depend on a handful of roundings).
FAST_SHAPES = [(1000, 3000), (3000, 1000), (1000, 3001), (3001, 1000), (64, 64), (37, 45),
               (45, 37)]
HALF_DTYPES = [torch.bfloat16, torch.float16]


def fast_inputs(m, n, rank, dtype, *, weight_dtype=None, state_dtype=torch.float32, seed=0):
    """step_inputs with G and the basis in `dtype` (W too, unless `weight_dtype`)."""
    inputs = step_inputs(m, n, rank, weight_dtype=weight_dtype or dtype, state_dtype=state_dtype,
                         proj_dtype=dtype, seed=seed, device="cuda")
    inputs.grad = inputs.grad.to(dtype)
    return inputs


@pytest.mark.parametrize("m,n", FAST_SHAPES, ids=str)
@pytest.mark.parametrize("rank", CUDA_RANKS)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_cuda_fast_path_matches_reference(m, n, rank, dtype):
    if rank > min(m, n):
        pytest.skip("rank above min(m, n)")
    inputs = fast_inputs(m, n, rank, dtype)
    assert_cuda_step_matches(run_cuda(inputs, **HYPER), inputs, **HYPER)


@pytest.mark.parametrize("m,n", [(1000, 3000), (3001, 1000)], ids=["left", "right"])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("state_dtype", STATE_DTYPES, ids=str)
@pytest.mark.parametrize("weight_dtype", [None, torch.float32], ids=["same", "fp32_weight"])
def test_cuda_fast_projection_with_other_weights_and_states(m, n, dtype, state_dtype,
                                                            weight_dtype):
    """fp32 master weights take the fast launch 1 (N then stays fp32) and the general launch 2."""
    inputs = fast_inputs(m, n, 130, dtype, weight_dtype=weight_dtype, state_dtype=state_dtype)
    assert_cuda_step_matches(run_cuda(inputs, **HYPER), inputs, **HYPER)


@pytest.mark.parametrize("m,n", [(257, 1000), (1000, 257)], ids=["left", "right"])
@pytest.mark.parametrize("grad_dtype,proj_dtype", [(torch.bfloat16, torch.float16),
                                                   (torch.float16, torch.bfloat16),
                                                   (torch.float32, torch.bfloat16)], ids=str)
def test_cuda_mixed_16bit_dtypes_take_the_general_path(m, n, grad_dtype, proj_dtype):
    inputs = step_inputs(m, n, 33, weight_dtype=proj_dtype, proj_dtype=proj_dtype, device="cuda")
    inputs.grad = inputs.grad.to(grad_dtype)
    assert_cuda_step_matches(run_cuda(inputs, **HYPER), inputs, **HYPER)


@pytest.mark.parametrize("m,n,rank", [(200, 136, 64), (136, 200, 64), (131, 67, 20),
                                      (67, 131, 20), (300, 260, 130), (1, 1, 1), (3, 5, 3),
                                      (5, 3, 2), (1, 9, 1)], ids=str)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_cuda_fast_path_fragment_mapping(m, n, rank, dtype):
    """Pinpoints a wrong tile/fragment mapping of the 16-bit GEMMs: small-integer G and basis make
    R exact, beta1 = 0 makes M = R, so launch 1 must match a float64 product EXACTLY; launch 2 is
    checked against W - us*back(N) recomputed from the kernel's own N to within rounding. The
    message names the first bad element and its position inside the mma tiles."""
    gen = torch.Generator().manual_seed(5)
    right = m >= n
    basis_shape = (rank, n) if right else (m, rank)
    low_shape = (m, rank) if right else (rank, n)
    grad = torch.randint(-3, 4, (m, n), generator=gen).to(torch.float64)
    proj = torch.randint(-2, 3, basis_shape, generator=gen).to(torch.float64)
    param = torch.randint(-64, 65, (m, n), generator=gen).to(torch.float64) / 64
    exp_avg = torch.zeros(low_shape, dtype=torch.float32)
    exp_avg_sq = torch.ones(low_shape, dtype=torch.float32)
    hyper = {"lr": 2.0**-6, "beta1": 0.0, "beta2": 0.5, "eps": 1e-3, "weight_decay": 0.0,
             "scale": 1.0, "step": 1}
    args = [param.to(dtype).cuda(), grad.to(dtype).cuda(), proj.to(dtype).cuda(),
            exp_avg.cuda(), exp_avg_sq.cuda()]
    torch.ops.lowrank.fused_galore_step(*args, **hyper)
    new_param, _, _, new_m, new_v = (a.cpu() for a in args)

    def first(bad):
        return tuple(bad[0].tolist())

    expected_r = grad @ proj.T if right else proj.T @ grad  # exact: small integers
    bad = (new_m.double() != expected_r).nonzero()
    assert bad.numel() == 0, (
        f"launch 1 (project): {len(bad)} wrong values of R; first at {first(bad)} "
        f"(row % 16 = {first(bad)[0] % 16}, col % 8 = {first(bad)[1] % 8}): got "
        f"{new_m[first(bad)].item()}, want {expected_r[first(bad)].item()}")

    # N as the kernel computes it (fp32 Adam arithmetic, then rounded to W's type)
    coeffs_n = new_m / (new_v.sqrt() + torch.tensor(hyper["eps"], dtype=torch.float32))
    normalized = coeffs_n.to(dtype).double()
    back = normalized @ proj if right else proj @ normalized
    step_size = lk.reference.adam_step_size(hyper["lr"], 0.0, 0.5, 1)
    expected_w = param - step_size * back
    err = (new_param.double() - expected_w).abs()
    ulp = expected_w.abs().clamp_min(2.0**-10) * 2.0**-7  # 1 ulp of bf16 (2 of fp16), + slack
    bad = (err > ulp).nonzero()
    assert bad.numel() == 0, (
        f"launch 2 (back-project): {len(bad)} wrong values of W; first at {first(bad)} "
        f"(row % 16 = {first(bad)[0] % 16}, col % 8 = {first(bad)[1] % 8}): "
        f"got {new_param[first(bad)].item()}, want {expected_w[first(bad)].item()}")


@pytest.mark.parametrize("m,n", [(1000, 3000), (3000, 1000)], ids=["left", "right"])
def test_cuda_fast_path_is_deterministic(m, n):
    inputs = fast_inputs(m, n, 130, torch.bfloat16)
    first, second = run_cuda(inputs, **HYPER), run_cuda(inputs, **HYPER)
    for a, b in zip(first.args(), second.args()):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# generated bases: packed INT4 (proj uint8 + scales, zeros) and DCT row indices (proj int32)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("m,n,group_size", [(1000, 301, 256), (301, 1000, 256), (131, 67, 6)],
                         ids=str)
@pytest.mark.parametrize("rank", [1, 17, 130])
@pytest.mark.parametrize("grad_dtype,weight_dtype", [
    (torch.float32, torch.float32),    # general path (fp32 dequantized copy)
    (torch.bfloat16, torch.bfloat16),  # fast path, INT4 dequantized in the tile loaders
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.float32),   # fast launch 1, general launch 2
], ids=str)
def test_cuda_int4_basis_matches_dense_step_on_dequantized_basis(m, n, group_size, rank,
                                                                 grad_dtype, weight_dtype):
    """The reference's definition of an INT4 basis: the dense step on its dequantized values."""
    rank = min(rank, m, n)
    inputs = qgalore_inputs(m, n, rank, int4_proj=True, int8_weight=False,
                            proj_group_size=group_size, grad_dtype=grad_dtype)
    inputs.param = inputs.param.to(weight_dtype)
    basis = lk.reference.dequantize_int4(inputs.proj, inputs.proj_scales, inputs.proj_zeros,
                                         lk.reference.quantized_basis_shape(m, n, rank),
                                         group_size)
    ours = inputs.clone()
    cuda_args = [t.cuda() for t in ours.args()]
    torch.ops.lowrank.fused_galore_step(
        *cuda_args, **HYPER, proj_scales=ours.proj_scales.cuda(),
        proj_zeros=ours.proj_zeros.cuda(), proj_group_size=group_size)
    param, _, _, exp_avg, exp_avg_sq = cuda_args
    dense = StepInputs(inputs.param, inputs.grad, basis, inputs.exp_avg, inputs.exp_avg_sq)
    assert_cuda_step_matches(StepInputs(param, inputs.grad.cuda(), basis.cuda(), exp_avg,
                                        exp_avg_sq), dense, **HYPER)


@pytest.mark.parametrize("m,n,rank", [(1000, 301, 1), (301, 1000, 17), (131, 67, 67),
                                      (67, 131, 17), (3000, 1000, 130)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_dct_indices_match_dense_step_on_dct_rows(m, n, rank, dtype):
    """int32 indices stand for rows of the orthonormal DCT-II (reference.dct_projection)."""
    d = n if lk.reference.is_right_side(m, n) else m
    gen = torch.Generator().manual_seed(m * n + rank)
    indices = torch.randperm(d, generator=gen)[:rank].to(torch.int32)
    dense = step_inputs(m, n, rank, weight_dtype=dtype)
    dense.proj = lk.reference.dct_projection(indices, m, n)
    ours = dense.to(device="cuda")
    ours.proj = indices.cuda()
    torch.ops.lowrank.fused_galore_step(*ours.args(), **HYPER)
    assert torch.equal(ours.proj.cpu(), indices)
    ours.proj = dense.proj.cuda()
    assert_cuda_step_matches(ours, dense, **HYPER)
