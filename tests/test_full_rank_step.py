"""Fira and APOLLO in fused_galore_step (full_rank="fira"|"apollo", DESIGN.md §4.6-§4.7) and the
random_basis op: the C++ CPU kernel and the Triton kernels (interpreter on CPU tensors without a
GPU) against lowrank_kernels.reference, which tests/test_reference_fira_apollo.py checks against
the peer packages.

Covered: both sides on odd shapes, ranks 1, 17 and min(m, n), fp32 and bf16 weights and moments,
channel and tensor φ, the limiter off, on its first step (stored, not applied) and active (the
stored norm shows the cut to γ·‖S_prev‖), APOLLO's scale_front, several steps carrying the
limiter, random_basis bit for bit across backends, bad input (argument named, nothing written).
"""

import importlib.util

import pytest
import torch
from cases import (
    HYPER,
    SMALL_ODD_SHAPES,
    StepInputs,
    assert_lowp_close,
    mode_args,
    run_mode_step,
    step_inputs,
)

import lowrank_kernels as lk
from lowrank_kernels import reference

pytestmark = [pytest.mark.skipif(not lk.EXTENSION_AVAILABLE, reason="extension not built"),
              pytest.mark.usefixtures("one_thread")]
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F32, BF16 = torch.float32, torch.bfloat16
LEFT, RIGHT = (257, 1000), (1000, 257)
LIMITER_STATES = ("off", "first", "active")


def _limiter(inputs: StepInputs, state: str, mode: str, **kwargs) -> torch.Tensor | None:
    """None (off), [-1] (no previous step) or half of this step's ‖S‖ (the limiter cuts)."""
    if state == "off":
        return None
    first = torch.full((1,), -1.0)
    if state == "first":
        return first.to(inputs.param.device)
    probe = inputs.to(device="cpu")
    reference.fused_galore_step(*probe.args(), **HYPER, full_rank=mode, limiter=first, **kwargs)
    return (0.5 * first).to(inputs.param.device)


def _run(inputs: StepInputs, limiter, backend: str | None, **kwargs):
    out = inputs.clone()
    lim = None if limiter is None else limiter.clone()
    if backend is None:
        reference.fused_galore_step(*out.args(), **HYPER, limiter=lim, **kwargs)
    else:
        lk.ops.fused_galore_step(*out.args(), **HYPER, limiter=lim, **kwargs, backend=backend)
    return out, lim


def _assert_close(got: torch.Tensor, want: torch.Tensor, before: torch.Tensor,
                  atol: float = 1e-5) -> None:
    """fp32: ``atol`` of the tensor's scale. 16-bit: one ulp of each element (the kernel and the
    reference round fp32 values that differ in the last bits) plus that. The update itself must
    exceed the tolerance, so an untouched tensor fails."""
    rtol = 1e-5 if before.dtype == F32 and got.dtype == F32 else 2.0**-7
    got, want, before = got.float().cpu(), want.float().cpu(), before.float().cpu()
    scale = want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol * scale)
    assert (want - before).abs().max().item() > 10 * atol * scale


def assert_full_rank_matches(inputs: StepInputs, backend: str, mode: str, limiter_state: str,
                             **kwargs) -> None:
    limiter = _limiter(inputs, limiter_state, mode, **kwargs)
    want, want_lim = _run(inputs.to(device="cpu"), None if limiter is None else limiter.cpu(),
                          None, full_rank=mode, **kwargs)
    got, got_lim = _run(inputs, limiter, backend, full_rank=mode, **kwargs)
    if inputs.param.dtype == F32:
        _assert_close(got.param, want.param, inputs.param)
    else:  # 16-bit W (§6's rule): its error against fp32 within 2× the reference's own rounding
        exact, _ = _run(inputs.to(device="cpu", dtype=F32),
                        None if limiter is None else limiter.cpu(), None, full_rank=mode,
                        **kwargs)
        assert_lowp_close(got.param, exact.param, want.param, before=inputs.param)
    for name in ("exp_avg", "exp_avg_sq"):
        if getattr(inputs, name).dtype == F32:
            _assert_close(getattr(got, name), getattr(want, name), getattr(inputs, name))
        else:  # bf16 moments: stochastic rounding with the same Philox words
            torch.testing.assert_close(getattr(got, name).float().cpu(),
                                       getattr(want, name).float().cpu(), rtol=2.0**-7, atol=0)
    if limiter is None:
        return
    torch.testing.assert_close(got_lim.cpu(), want_lim, rtol=1e-5, atol=0)
    if limiter_state == "active":  # stored ‖S‖/f = γ·(‖S_prev‖ + 1e-8)
        torch.testing.assert_close(want_lim, limiter.cpu() * reference.LIMITER_GROWTH,
                                   rtol=1e-6, atol=0)
    else:
        assert want_lim.item() > 0


# ---- C++ CPU kernel ----------------------------------------------------------------------------
@pytest.mark.parametrize("m,n", [LEFT, RIGHT], ids=["left", "right"])
@pytest.mark.parametrize("mode", ["fira", "apollo"])
@pytest.mark.parametrize("norm", ["channel", "tensor"])
@pytest.mark.parametrize("limiter_state", LIMITER_STATES)
def test_cpu_matches_reference(m, n, mode, norm, limiter_state):
    inputs = step_inputs(m, n, 17)
    assert_full_rank_matches(inputs, "cpu", mode, limiter_state, full_rank_norm=norm)


@pytest.mark.parametrize("m,n,rank", [(*LEFT, 1), (*RIGHT, 1), (64, 64, 64), (5, 1, 1),
                                      (1, 5, 1)], ids=str)
@pytest.mark.parametrize("mode", ["fira", "apollo"])
def test_cpu_ranks_and_degenerate_shapes(m, n, rank, mode):
    """Rank 1 and rank = min(m, n) (Fira's residual is then rounding noise: Gram cancellation).
    At rank 1 a line whose projection R_i nearly cancels (|R_i| ~ 1e-3 of the median here) has
    φ_i = |N_i|/|R_i| with a relative error ~1e-7·‖G_i‖/|R_i| in any summation order: 1e-4."""
    inputs = step_inputs(m, n, rank)
    limiter = _limiter(inputs, "active", mode)
    want, want_lim = _run(inputs, limiter, None, full_rank=mode)
    got, got_lim = _run(inputs, limiter, "cpu", full_rank=mode)
    _assert_close(got.param, want.param, inputs.param, atol=1e-4 if rank == 1 else 1e-5)
    if mode == "apollo" or rank < min(m, n):
        torch.testing.assert_close(got_lim, want_lim, rtol=1e-5, atol=0)
    else:  # ‖S‖ is ~ulps of ‖G‖: the limiter's state is noise in both, its effect negligible
        assert got_lim.item() >= 0


@pytest.mark.parametrize("m,n", [LEFT, RIGHT], ids=["left", "right"])
@pytest.mark.parametrize("mode,norm", [("fira", "channel"), ("apollo", "tensor")])
@pytest.mark.parametrize("state_dtype", [F32, BF16], ids=str)
def test_cpu_bf16_weights(m, n, mode, norm, state_dtype):
    inputs = step_inputs(m, n, 17, weight_dtype=BF16, state_dtype=state_dtype, proj_dtype=BF16)
    assert_full_rank_matches(inputs, "cpu", mode, "active", full_rank_norm=norm)


@pytest.mark.parametrize("m,n", [LEFT, RIGHT], ids=["left", "right"])
@pytest.mark.parametrize("limiter_state", ["first", "active"])
def test_cpu_apollo_scale_front(m, n, limiter_state):
    """scale_front changes the stored norm (it carries √a) but not the update."""
    inputs = step_inputs(m, n, 17)
    assert_full_rank_matches(inputs, "cpu", "apollo", limiter_state, scale_front=True)


@pytest.mark.parametrize("mode", ["fira", "apollo"])
def test_cpu_steps_carry_the_limiter(mode):
    """Six steps with fresh gradients: the limiter state goes from its first value to cutting
    growth (gradients doubling each step), and W, M, V and the state track the reference."""
    inputs = step_inputs(300, 211, 20)
    ours, ref = inputs.clone(), inputs.clone()
    lim_ours, lim_ref = torch.full((1,), -1.0), torch.full((1,), -1.0)
    gen = torch.Generator().manual_seed(5)
    for step in range(1, 7):
        grad = torch.randn(300, 211, generator=gen) * 2.0**step
        hyper = {**HYPER, "step": step, "full_rank": mode}
        lk.ops.fused_galore_step(ours.param, grad, ours.proj, ours.exp_avg, ours.exp_avg_sq,
                                 **hyper, limiter=lim_ours, backend="cpu")
        before = lim_ref.clone()
        reference.fused_galore_step(ref.param, grad, ref.proj, ref.exp_avg, ref.exp_avg_sq,
                                    **hyper, limiter=lim_ref)
        torch.testing.assert_close(lim_ours, lim_ref, rtol=1e-5, atol=0)
        if step > 2:  # the limiter is active: the norm grows by exactly γ
            torch.testing.assert_close(lim_ref, before * reference.LIMITER_GROWTH, rtol=1e-6,
                                       atol=0)
    for a, b in zip(ours.args(), ref.args()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


# ---- Triton (interpreter on CPU tensors without a GPU: small shapes) ----------------------------
TRITON_CASES = [  # (m, n, rank, weight and basis dtype, state dtype, mode, norm, limiter)
    (*SMALL_ODD_SHAPES[0], 17, F32, F32, "fira", "channel", "active"),
    (*SMALL_ODD_SHAPES[1], 17, F32, F32, "fira", "tensor", "first"),
    (*SMALL_ODD_SHAPES[0], 1, BF16, F32, "fira", "channel", "off"),
    (*SMALL_ODD_SHAPES[1], 17, BF16, BF16, "fira", "channel", "active"),
    (*SMALL_ODD_SHAPES[0], 17, BF16, F32, "apollo", "tensor", "active"),
    (*SMALL_ODD_SHAPES[1], 17, F32, F32, "apollo", "channel", "active"),
    (*SMALL_ODD_SHAPES[0], 1, F32, BF16, "apollo", "tensor", "first"),
    (*SMALL_ODD_SHAPES[1], 1, BF16, F32, "apollo", "channel", "off"),
]


def _triton_id(case):
    m, n, rank, weight, state, mode, norm, limiter = case
    return f"{m}x{n}-r{rank}-w{str(weight)[6:]}-s{str(state)[6:]}-{mode}-{norm}-{limiter}"


@needs_triton
@pytest.mark.parametrize("case", TRITON_CASES, ids=_triton_id)
def test_triton_matches_reference(case):
    m, n, rank, weight, state, mode, norm, limiter_state = case
    inputs = step_inputs(m, n, rank, weight_dtype=weight, state_dtype=state, proj_dtype=weight,
                         device=DEVICE)
    assert_full_rank_matches(inputs, "triton", mode, limiter_state, full_rank_norm=norm)


@needs_triton
def test_triton_apollo_scale_front():
    inputs = step_inputs(*SMALL_ODD_SHAPES[0], 17, device=DEVICE)
    assert_full_rank_matches(inputs, "triton", "apollo", "active", scale_front=True)


# ---- random_basis --------------------------------------------------------------------------
BASIS_SHAPES = [(1, 1), (5, 1), (131, 17), (1000, 3)]


@pytest.mark.parametrize("d,rank", BASIS_SHAPES, ids=str)
def test_random_basis_cpu_is_the_reference_bit_for_bit(d, rank):
    for seed, refresh in [(0, 0), (3, 7), (2**32 - 1, 2**31 - 1)]:
        want = reference.random_basis(d, rank, seed, refresh)
        got = lk.ops.random_basis(d, rank, seed, refresh, backend="cpu")
        assert got.dtype == F32 and got.shape == (rank, d)
        assert torch.equal(got, want), (d, rank, seed, refresh)
    assert torch.equal(lk.ops.random_basis(d, rank, 3, 7), reference.random_basis(d, rank, 3, 7))


@needs_triton
@pytest.mark.parametrize("d,rank", BASIS_SHAPES[1:3], ids=str)
def test_random_basis_triton_is_the_reference_bit_for_bit(d, rank):
    from lowrank_kernels.triton_kernels.random_basis import random_basis

    for seed, refresh in [(3, 7), (2**32 - 1, 2**31 - 1)]:
        got = random_basis(d, rank, seed, refresh, device=DEVICE)
        assert torch.equal(got.cpu(), reference.random_basis(d, rank, seed, refresh))


def test_random_basis_statistics_from_the_kernel():
    """The kernel's values (equal to the reference's, whose distribution
    tests/test_reference_random_basis.py checks in depth): mean 0 and variance 1/r, and
    uncorrelated across seeds and refresh counts."""
    rank, d = 64, 2000
    basis = lk.ops.random_basis(d, rank, 11, 0, backend="cpu").double()
    count = basis.numel()
    assert abs(basis.mean().item()) * rank**0.5 < 4 / count**0.5
    assert abs(basis.var().item() * rank - 1) < 4 * (2 / count) ** 0.5
    for other in (lk.ops.random_basis(d, rank, 12, 0, backend="cpu"),
                  lk.ops.random_basis(d, rank, 11, 1, backend="cpu")):
        other = other.double()
        corr = ((basis - basis.mean()) * (other - other.mean())).mean() / (basis.std()
                                                                           * other.std())
        assert abs(corr.item()) < 4 / count**0.5


@pytest.mark.parametrize("kwargs,match", [
    (dict(d=0), "d: expected"), (dict(rank=0), "rank: expected"),
    (dict(seed=-1), "seed: expected"), (dict(seed=2**32), "seed: expected"),
    (dict(refresh=-1), "refresh: expected"), (dict(refresh=2**31), "refresh: expected"),
    (dict(d=2**34, rank=2**3), "d, rank:")])
def test_random_basis_bad_input(kwargs, match):
    args = {"d": 10, "rank": 2, "seed": 0, "refresh": 0, **kwargs}
    with pytest.raises((ValueError, RuntimeError), match=match):
        lk.ops.random_basis(args["d"], args["rank"], args["seed"], args["refresh"],
                            backend="cpu")


# ---- bad input: named, nothing written --------------------------------------------------------
BAD = [
    (dict(full_rank="galore"), "full_rank: expected"),
    (dict(full_rank="fira", full_rank_norm="row"), "full_rank_norm: expected"),
    (dict(full_rank="fira", scale_front=True), "scale_front: only valid"),
    (dict(limiter=torch.ones(1)), "limiter/full_rank_norm/scale_front"),
    (dict(full_rank_norm="tensor"), "limiter/full_rank_norm/scale_front"),
    (dict(full_rank="fira", limiter=torch.ones(1, dtype=torch.float64)), "limiter: expected dtype"),
    (dict(full_rank="apollo", limiter=torch.ones(2)), "limiter: expected shape"),
    (dict(full_rank="apollo", limiter=torch.ones(1, 1)), "limiter: expected shape"),
    (dict(full_rank="fira", limiter_growth=0.0), "limiter_growth: expected"),
    (dict(full_rank="apollo", scale=-1.0), "scale: expected"),
]


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=needs_triton), None])
@pytest.mark.parametrize("kwargs,match", BAD, ids=lambda v: v if isinstance(v, str) else None)
def test_bad_input_is_named_and_nothing_is_written(backend, kwargs, match):
    inputs = step_inputs(40, 30, 4)
    out = inputs.clone()
    limiter = kwargs.get("limiter")
    before = None if limiter is None else limiter.clone()
    with pytest.raises((ValueError, RuntimeError), match=match):
        lk.ops.fused_galore_step(*out.args(), **{**HYPER, **kwargs}, backend=backend)
    for a, b in zip(out.args(), inputs.args()):
        assert torch.equal(a, b)
    if limiter is not None:
        assert torch.equal(limiter, before)


# ---- full_rank with the other modes of the op (AdaGrad, 8-bit moments, right=) ------------------
# (m, n, mode_args options, the message): 40x30 is a right-side shape (m >= n), 30x40 a left one
COMBINATIONS = [
    (40, 30, {"inner": "adagrad"},
     "inner: full_rank='{}' supports only inner='adam', got 'adagrad'"),
    (40, 30, {"moments": "8bit"},
     "exp_avg_sq: full_rank='{}' supports fp32/bf16 moments only, got 8-bit moments (uint8 codes)"),
    (30, 40, {"moments": "8bit", "inner": "adagrad"}, "inner: full_rank='{}' supports only"),
    (40, 30, {"right": False},
     ("right: full_rank='{}' supports only the side rule's side (right=True for this shape), "
      "got right=False")),
    (30, 40, {"right": True},
     ("right: full_rank='{}' supports only the side rule's side (right=False for this shape), "
      "got right=True")),
]


@pytest.mark.parametrize("mode", ["fira", "apollo"])
@pytest.mark.parametrize("m,n,options,message", COMBINATIONS,
                         ids=lambda v: str(v) if isinstance(v, dict) else None)
def test_full_rank_with_adagrad_8bit_moments_or_other_side_is_refused(m, n, options, message,
                                                                      mode):
    """Every backend raises the same message, naming the argument, before writing anything
    (the limiter included); the CUDA C++ kernel shares checks.h with the CPU one."""
    args = mode_args(m, n, 4, **options)
    limiter = torch.full((1,), 0.5)
    messages = set()
    for backend in ("cpu", "reference", *(("triton",) if HAS_TRITON else ())):
        moved = {k: v.clone() if torch.is_tensor(v) else v for k, v in args.items()}
        lim = limiter.clone()
        with pytest.raises((ValueError, RuntimeError)) as err:
            lk.ops.fused_galore_step(**moved, **HYPER, full_rank=mode, limiter=lim,
                                     backend=backend)
        assert message.format(mode) in str(err.value), backend
        messages.add(str(err.value).splitlines()[0])
        for k, v in args.items():
            if torch.is_tensor(v):
                assert torch.equal(moved[k], v), f"{backend} wrote {k}"
        assert torch.equal(lim, limiter)
    assert len(messages) == 1, messages  # one message, whichever backend raised it


@pytest.mark.parametrize("m,n,right", [(40, 30, True), (30, 40, False)])
def test_full_rank_accepts_right_equal_to_the_side_rule(m, n, right):
    """right= naming the side the rule picks anyway (what the FSDP2 path passes) is the same
    step, bit for bit, in the C++ kernel, and matches the reference."""
    args = {**mode_args(m, n, 4), "full_rank": "fira", "limiter": torch.full((1,), 0.5)}
    runs = {side: run_mode_step({**args, "right": side}, "cpu") for side in (None, right)}
    for k in ("param", "exp_avg", "exp_avg_sq", "limiter"):
        assert torch.equal(runs[None][k], runs[right][k]), k
    want = run_mode_step({**args, "right": right}, "reference")
    _assert_close(runs[right]["param"], want["param"], args["param"])
    assert not torch.equal(runs[right]["limiter"], args["limiter"])  # the limiter ran


def test_cuda_cxx_routes_the_full_rank_modes_and_random_basis_to_triton():
    """Under set_cuda_backend("cuda_cxx") the CUDA C++ kernel serves GaLore only; a call with
    full_rank set, and every random_basis call, run the Triton kernel (_dispatch)."""
    serves = lk._dispatch.cuda_cxx_serves
    assert serves("fused_galore_step", {}) and serves("fused_galore_step", {"full_rank": "none"})
    assert not serves("fused_galore_step", {"full_rank": "fira"})
    assert not serves("fused_galore_step", {"full_rank": "apollo", "limiter": None})
    assert not serves("random_basis", {})


@needs_triton
@pytest.mark.parametrize("mode,basis", [("fira", "dct"), ("apollo", "int4"), ("fira", "int4")])
def test_triton_generated_bases_match_the_reference(mode, basis):
    """DCT indices and a packed INT4 basis (generated inside the tiles; bf16 G and moments):
    the Triton step against the reference of the same format (its dense rows / dequantized
    basis), limiter active."""
    m, n, rank = *SMALL_ODD_SHAPES[1], 17
    inputs = step_inputs(m, n, rank, weight_dtype=BF16, state_dtype=BF16, proj_dtype=BF16,
                         device=DEVICE)
    extra = {}
    if basis == "dct":
        inputs.proj = torch.randperm(n, generator=torch.Generator().manual_seed(3))[:rank] \
            .sort().values.to(torch.int32).to(DEVICE)
    else:
        packed, scales, zeros = lk.ops.quantize_int4(inputs.proj.float().cpu())
        inputs.proj = packed.to(DEVICE)
        extra = dict(proj_scales=scales.to(DEVICE), proj_zeros=zeros.to(DEVICE))
    limiter = torch.full((1,), 1.0)
    outs = {}
    for backend in ("reference", "triton"):
        out, lim = inputs.clone(), limiter.clone().to(DEVICE)
        lk.ops.fused_galore_step(*out.args(), **HYPER, **extra, full_rank=mode, limiter=lim,
                                 backend=backend)
        outs[backend] = (out, lim)
    (ref, ref_lim), (got, got_lim) = outs["reference"], outs["triton"]
    torch.testing.assert_close(got_lim.cpu(), ref_lim.cpu(), rtol=1e-5, atol=0)
    assert ref_lim.item() == pytest.approx(reference.LIMITER_GROWTH * (1.0 + 1e-8))  # active
    change = (ref.param.float() - inputs.param.float()).abs().max().item()
    err = (got.param.float() - ref.param.float()).abs().max().item()
    assert err <= 2 * torch.finfo(BF16).eps * ref.param.float().abs().max().item() < change
