"""fused_gradnorm_step (DESIGN.md §4.8): the C++ CPU kernel and the Triton kernel (its
interpreter on CPU tensors without a GPU) against reference.fused_gradnorm_step, on odd shapes,
both sides, ranks 1 to min(m, n), fp32/bf16/fp16 weights, fp32/bf16 moments and every basis
format (dense of any strides, packed INT4, DCT); 8-bit moments bit for bit on exact inputs (the
GaLore step's codes, tests/test_fused_step_modes.py); the Gram form of ‖v'‖² against the direct sum;
bad input; registration, fakes and the CUDA routing (Triton only)."""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import pytest
import torch
from cases import (
    EXACT_HYPER,
    HYPER,
    SMALL_ODD_SHAPES,
    assert_8bit_moments_within_a_grid_step,
    assert_fp32_close,
    assert_lowp_close,
    assert_states_equal,
    mode_args,
    orthonormal_basis,
)

import lowrank_kernels as lk
from lowrank_kernels import _dispatch, reference

pytestmark = [pytest.mark.skipif(not lk.EXTENSION_AVAILABLE, reason="extension not built"),
              pytest.mark.usefixtures("one_thread")]
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
ROWS = ("row_scale", "row_norm", "scale_exp_avg", "scale_exp_avg_sq")


@dataclasses.dataclass
class GradNormInputs:
    param: torch.Tensor
    grad: torch.Tensor
    proj: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    row_scale: torch.Tensor
    row_norm: torch.Tensor
    scale_exp_avg: torch.Tensor
    scale_exp_avg_sq: torch.Tensor
    proj_scales: torch.Tensor | None = None
    proj_zeros: torch.Tensor | None = None
    dense_basis: torch.Tensor | None = None  # the fp32 basis proj stands for

    def tensors(self) -> list[torch.Tensor | None]:
        return [getattr(self, f.name) for f in dataclasses.fields(self)]

    def args(self) -> tuple[torch.Tensor, ...]:
        """The op's nine positional tensors."""
        return tuple(self.tensors()[:9])

    def formats(self) -> dict:
        return ({} if self.proj_scales is None else
                {"proj_scales": self.proj_scales, "proj_zeros": self.proj_zeros})

    def clone(self) -> GradNormInputs:
        return GradNormInputs(*[None if t is None else t.clone() for t in self.tensors()])

    def to(self, device) -> GradNormInputs:
        return GradNormInputs(*[None if t is None else t.to(device) for t in self.tensors()])


def gradnorm_inputs(m: int, n: int, rank: int, *, weight_dtype=F32, state_dtype=F32,
                    proj_dtype=F32, basis: str = "dense", seed: int = 0) -> GradNormInputs:
    """A step after a few earlier ones: weights ~0.02 (LLaMA init), a gradient pushing the
    row scales, g ≠ ‖v‖ (as after a step), nonzero moments; basis "dense" (orthonormal),
    "int4" (packed) or "dct" (indices)."""
    gen = torch.Generator().manual_seed(seed)
    right = reference.is_right_side(m, n)
    shape = (m, rank) if right else (rank, n)
    weight = (0.02 * torch.randn(m, n, generator=gen)).to(weight_dtype)
    norms = torch.linalg.vector_norm(weight.float(), dim=1)
    scales, zeros, dense = None, None, None
    if basis == "dct":
        d = n if right else m
        proj = torch.sort(torch.randperm(d, generator=gen)[:rank]).values.to(torch.int32)
        dense = reference.dct_projection(proj, m, n)
    else:
        proj = orthonormal_basis(m, n, rank, generator=gen)
        if basis == "int4":
            proj, scales, zeros = reference.quantize_int4(proj, 64)
            dense = reference.dequantize_int4(proj, scales, zeros,
                                              reference.quantized_basis_shape(m, n, rank), 64)
        else:
            proj = proj.to(proj_dtype)
            dense = proj.float()
    return GradNormInputs(
        param=weight,
        grad=(torch.randn(m, n, generator=gen) + 3.0 * weight.float()).to(weight_dtype),
        proj=proj,
        exp_avg=(0.1 * torch.randn(shape, generator=gen)).to(state_dtype),
        exp_avg_sq=(0.1 * torch.rand(shape, generator=gen)).to(state_dtype),
        row_scale=norms * (1.0 + 0.2 * torch.rand(m, generator=gen)),
        row_norm=norms * (1.0 + 0.1 * torch.rand(m, generator=gen)),
        scale_exp_avg=0.01 * torch.randn(m, generator=gen),
        scale_exp_avg_sq=1e-4 * torch.rand(m, generator=gen),
        proj_scales=scales, proj_zeros=zeros, dense_basis=dense)


def run(inputs: GradNormInputs, backend: str | None, **hyper) -> GradNormInputs:
    out = inputs.clone()
    group = {"proj_group_size": 64} if out.proj_scales is not None else {}
    lk.ops.fused_gradnorm_step(*out.args(), **{**HYPER, **hyper}, **out.formats(), **group,
                               backend=backend)
    return out


def exact_step(inputs: GradNormInputs, **hyper) -> GradNormInputs:
    """The reference on fp32 copies (dense basis), left in fp32."""
    out = inputs.clone()
    for f in ("param", "grad", "exp_avg", "exp_avg_sq"):
        setattr(out, f, getattr(out, f).float())
    reference.fused_gradnorm_step(out.param, out.grad, out.dense_basis, *out.args()[3:],
                                  **{**HYPER, **hyper})
    return out


def plain_torch_step(inputs: GradNormInputs, **hyper) -> GradNormInputs:
    """The authors' step done by plain torch in the weight's dtype (their v and g take the
    parameter's dtype): the baseline low-precision weights are judged against."""
    hyper = {**HYPER, **hyper}
    out = inputs.clone()
    dtype, (m, n) = out.param.dtype, out.param.shape
    q = out.dense_basis.to(dtype)
    right = reference.is_right_side(m, n)
    v = out.param * (out.row_norm / out.row_scale).to(dtype).unsqueeze(1)
    grad_g = (out.grad * v).sum(1).float() / out.row_norm
    low = out.grad @ q.T if right else q.T @ out.grad
    out.exp_avg.mul_(hyper["beta1"]).add_(low.to(out.exp_avg.dtype), alpha=1 - hyper["beta1"])
    out.exp_avg_sq.mul_(hyper["beta2"]).addcmul_(low.to(out.exp_avg.dtype),
                                                 low.to(out.exp_avg.dtype),
                                                 value=1 - hyper["beta2"])
    normalized = (out.exp_avg / (out.exp_avg_sq.sqrt() + hyper["eps"])).to(dtype)
    back = normalized @ q if right else q @ normalized
    alpha = reference.adam_step_size(hyper["lr"], hyper["beta1"], hyper["beta2"], hyper["step"])
    decay = 1.0 - hyper["lr"] * hyper["weight_decay"]
    v = (v - alpha * hyper["scale"] * back) * decay
    n_g = reference.adam_normalized(grad_g, out.scale_exp_avg, out.scale_exp_avg_sq,
                                    hyper["beta1"], hyper["beta2"], hyper["eps"])
    out.row_scale = (out.row_norm - alpha * n_g) * decay
    out.row_norm = torch.linalg.vector_norm(v, dim=1).float()
    out.param = v * (out.row_scale / out.row_norm).to(dtype).unsqueeze(1)
    return out


def assert_gradnorm_matches(actual: GradNormInputs, inputs: GradNormInputs, **hyper) -> None:
    """fp32 inputs: every tensor within 1e-5 of the reference (relative to its scale). 16-bit
    weights: W and ‖v‖ by the low-precision rule against plain torch in that dtype (cases.py),
    the fp32 states fed by them within 1e-4; bf16 moments by the low-precision rule."""
    exact = exact_step(inputs, **hyper)
    lowp_weight = inputs.param.dtype != F32
    plain = plain_torch_step(inputs, **hyper) if lowp_weight else None
    lowp_state = inputs.exp_avg.dtype != F32
    plain_state = plain_torch_step(inputs, **hyper) if lowp_state else None
    for name in ("param", "exp_avg", "exp_avg_sq", *ROWS):
        got, want = getattr(actual, name), getattr(exact, name)
        if name in ("exp_avg", "exp_avg_sq") and lowp_state:
            assert_lowp_close(got, want, getattr(plain_state, name), before=getattr(inputs, name))
        elif name in ("param", "row_norm") and lowp_weight:
            assert_lowp_close(got, want, getattr(plain, name), before=getattr(inputs, name))
        elif lowp_weight or lowp_state:
            assert_fp32_close(got, want, rtol=1e-4)
        else:
            assert_fp32_close(got, want)
    # a real comparison: W moved, and g' ≠ ‖v'‖ (the two row states are distinct quantities)
    assert (actual.param.float() - inputs.param.float()).abs().max() > 1e-3
    assert not torch.allclose(actual.row_scale, actual.row_norm, rtol=1e-3)


# --------------------------------------------------------------------------------------------
# C++ CPU kernel
# --------------------------------------------------------------------------------------------
CPU_SHAPES = [(1000, 257), (257, 1000)]


@pytest.mark.parametrize("m,n", CPU_SHAPES, ids=["right", "left"])
@pytest.mark.parametrize("rank", [1, 17])
@pytest.mark.parametrize("weight_dtype", [F32, BF16, F16], ids=str)
def test_cpu_matches_reference(m, n, rank, weight_dtype):
    inputs = gradnorm_inputs(m, n, rank, weight_dtype=weight_dtype, proj_dtype=weight_dtype)
    assert_gradnorm_matches(run(inputs, "cpu"), inputs)


@pytest.mark.parametrize("m,n", [(64, 64), (90, 40), (40, 90), (1, 5), (5, 1)], ids=str)
def test_cpu_full_rank_and_degenerate_shapes(m, n):
    inputs = gradnorm_inputs(m, n, min(m, n))
    out = run(inputs, None)  # torch.ops.lowrank.fused_gradnorm_step
    if min(m, n) > 1:
        assert_gradnorm_matches(out, inputs)
    else:  # one row or one column: nothing moves far enough for the "moved" checks
        exact = exact_step(inputs)
        for name in ("param", "exp_avg", "exp_avg_sq", *ROWS):
            assert_fp32_close(getattr(out, name), getattr(exact, name))


@pytest.mark.parametrize("m,n", CPU_SHAPES, ids=["right", "left"])
@pytest.mark.parametrize("basis", ["int4", "dct"])
def test_cpu_quantized_and_dct_bases(m, n, basis):
    inputs = gradnorm_inputs(m, n, 33, basis=basis)
    assert_gradnorm_matches(run(inputs, "cpu"), inputs)


@pytest.mark.parametrize("m,n", CPU_SHAPES, ids=["right", "left"])
def test_cpu_bf16_moments_and_strided_inputs(m, n):
    """bf16 moments (stochastic rounding); G a transposed view and the basis strided, as
    other libraries hold them (read in place)."""
    inputs = gradnorm_inputs(m, n, 20, weight_dtype=BF16, state_dtype=BF16, proj_dtype=BF16)
    inputs.grad = inputs.grad.T.contiguous().T
    inputs.proj = inputs.proj.T.contiguous().T
    assert not inputs.grad.is_contiguous() and not inputs.proj.is_contiguous()
    assert_gradnorm_matches(run(inputs, "cpu"), inputs)


def test_cpu_many_steps_track_reference():
    """Ten steps (new gradient each) stay on the reference trajectory, both sides."""
    for m, n in [(300, 211), (211, 300)]:
        inputs = gradnorm_inputs(m, n, 40)
        ours, ref = inputs.clone(), exact_step(inputs, step=1)
        ours = run(ours, None, step=1)
        gen = torch.Generator().manual_seed(3)
        for step in range(2, 11):
            grad = torch.randn(m, n, generator=gen) + 3.0 * ours.param
            ours.grad, ref.grad = grad, grad.clone()
            ours = run(ours, None, step=step)
            ref = exact_step(ref, step=step)
        for name in ("param", "exp_avg", "exp_avg_sq", *ROWS):
            assert_fp32_close(getattr(ours, name), getattr(ref, name), rtol=2e-5)


def test_cpu_updates_a_parameter_that_requires_grad():
    inputs = gradnorm_inputs(90, 40, 4)
    out = inputs.clone()
    param = torch.nn.Parameter(out.param)
    with torch.no_grad():
        torch.ops.lowrank.fused_gradnorm_step(param, *out.args()[1:], **HYPER)
    out.param = param.detach()
    assert_gradnorm_matches(out, inputs)


# --------------------------------------------------------------------------------------------
# Triton kernel (interpreter on CPU tensors; compiled on a GPU)
# --------------------------------------------------------------------------------------------
LEFT, RIGHT = SMALL_ODD_SHAPES  # (67, 131): left; (131, 67): right
TRITON_CASES = [  # (m, n, rank, weight dtype, state dtype, proj dtype, basis)
    (*LEFT, 1, F32, F32, F32, "dense"),
    (*RIGHT, 1, BF16, BF16, BF16, "dense"),
    (*LEFT, 17, BF16, F32, BF16, "dense"),
    (*RIGHT, 17, F16, F32, F16, "dense"),
    (*RIGHT, 64, F32, F32, F32, "dense"),
    (*LEFT, 17, F32, F32, F32, "int4"),
    (*RIGHT, 17, BF16, F32, F32, "dct"),
    (*LEFT, 17, BF16, BF16, F32, "dct"),
    (*RIGHT, 17, F32, F32, F32, "int4"),
    (131, 200, 130, F32, F32, F32, "dense"),  # left, several rank tiles
    (200, 131, 70, BF16, F32, BF16, "dense"),  # right, several rank tiles (launch A and F)
]


def _triton_id(case):
    m, n, rank, weight, state, proj, basis = case
    return f"{m}x{n}-r{rank}-w{str(weight)[6:]}-s{str(state)[6:]}-p{str(proj)[6:]}-{basis}"


@needs_triton
@pytest.mark.parametrize("case", TRITON_CASES, ids=_triton_id)
def test_triton_matches_reference(case):
    m, n, rank, weight, state, proj, basis = case
    inputs = gradnorm_inputs(m, n, rank, weight_dtype=weight, state_dtype=state,
                             proj_dtype=proj, basis=basis).to(DEVICE)
    assert_gradnorm_matches(run(inputs, "triton"), inputs)


def _launch_64(inputs: GradNormInputs, **hyper) -> None:
    """The Triton launch with 64-bit offsets forced (chosen past 2**31 elements)."""
    from lowrank_kernels.triton_kernels import fused_gradnorm_step as gns
    from lowrank_kernels.triton_kernels._common import adam_coeffs, basis_args

    m, n = inputs.param.shape
    rank = inputs.exp_avg.shape[1 if m >= n else 0]
    hyper = {**HYPER, **hyper}
    gns.launch(inputs.param, inputs.grad, inputs.exp_avg, inputs.exp_avg_sq, inputs.args()[5:],
               rank, adam_coeffs(**hyper), basis_args(inputs.proj, m, n, rank, inputs.grad.dtype),
               index_64=True)


@needs_triton
@pytest.mark.parametrize("m,n", SMALL_ODD_SHAPES, ids=["left", "right"])
def test_triton_64_bit_offsets_and_steps_track_reference(m, n):
    """The 64-bit offset variant, forced: one bf16 step, then three fp32 steps (a new gradient
    each) on the reference trajectory."""
    inputs = gradnorm_inputs(m, n, 9, weight_dtype=BF16, proj_dtype=BF16).to(DEVICE)
    out = inputs.clone()
    _launch_64(out)
    assert_gradnorm_matches(out, inputs)
    ours = gradnorm_inputs(m, n, 9).to(DEVICE)
    ref = ours.clone()
    gen = torch.Generator().manual_seed(4)
    for step in range(1, 4):
        grad = (torch.randn(m, n, generator=gen) + 3.0 * ours.param.cpu()).to(DEVICE)
        ours.grad, ref.grad = grad, grad.clone()
        _launch_64(ours, step=step)
        ref = exact_step(ref, step=step)
    for name in ("param", "exp_avg", "exp_avg_sq", *ROWS):
        assert_fp32_close(getattr(ours, name), getattr(ref, name), rtol=2e-5)


# --------------------------------------------------------------------------------------------
# the Gram form of ‖v'‖² (right side of the Triton kernel) against the direct sum
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lr", [1e-3, 1e-2, 0.5])
def test_gram_form_error_is_that_of_the_direct_sum(lr):
    """On LLaMA-scale rows (W ~ 0.02, N ~ Adam-normalized, scale 0.25) the Gram form's
    relative error against a float64 direct sum stays at fp32 rounding (≤ 1e-6, as the fp32
    direct sum's), whether the update is 0.3% or 150% of v (bench/gradnorm_gram_error.py
    measures larger shapes and the aligned worst case)."""
    gen = torch.Generator().manual_seed(0)
    m, n, rank = 512, 256, 64
    weight = 0.02 * torch.randn(m, n, generator=gen)
    basis = torch.linalg.qr(torch.randn(n, rank, generator=gen))[0].T.contiguous()
    normalized = 0.5 * torch.randn(m, rank, generator=gen)
    factor = 1.0 + 0.1 * torch.rand(m, generator=gen)
    update_scale = lr * 0.25
    gram = reference.gradnorm_vnorm_sq_gram(weight, basis, normalized, factor, update_scale)
    direct = ((factor.double().unsqueeze(1) * weight.double()
               - update_scale * normalized.double() @ basis.double()) ** 2).sum(1)
    assert ((gram.double() - direct) / direct).abs().max() < 1e-6


# --------------------------------------------------------------------------------------------
# 8-bit moments (DESIGN.md §4.9): GaLore's codes, bit for bit
# --------------------------------------------------------------------------------------------
EIGHT_BIT_BACKENDS = ["cpu", pytest.param("triton", marks=[needs_triton, pytest.mark.skipif(
    DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
    reason="CPU tensors need the Triton interpreter")])]


def gradnorm_8bit_args(m: int, n: int, rank: int, *, basis: str = "dense", block: int = 32,
                       exact: bool = True, seed: int = 0) -> dict:
    """fused_gradnorm_step's arguments with 8-bit moments: cases.mode_args' GaLore inputs
    (``exact``: integer G, dyadic basis, codes with power-of-two block scales, so every
    backend's fp32 moments agree) and per-row states after a step (g ≠ ‖v‖)."""
    args = mode_args(m, n, rank, basis=basis, moments="8bit", block=block, exact=exact,
                     seed=seed)
    del args["inner"], args["right"]
    gen = torch.Generator().manual_seed(seed)
    row_scale, row_norm = reference.gradnorm_init_state(args["param"])
    args.update(row_scale=row_scale * (1.0 + 0.2 * torch.rand(m, generator=gen)),
                row_norm=row_norm, scale_exp_avg=0.01 * torch.randn(m, generator=gen),
                scale_exp_avg_sq=1e-4 * torch.rand(m, generator=gen))
    return args


def run_8bit(args: dict, backend: str, **hyper) -> dict:
    device = DEVICE if backend == "triton" else "cpu"
    moved = {k: v.clone().to(device) if torch.is_tensor(v) else v for k, v in args.items()}
    lk.ops.fused_gradnorm_step(**moved, **{**EXACT_HYPER, "weight_decay": 0.1, **hyper},
                               seed=21, backend=backend)
    return {k: v.cpu() if torch.is_tensor(v) else v for k, v in moved.items()}


@pytest.mark.parametrize("backend", EIGHT_BIT_BACKENDS)
@pytest.mark.parametrize("m,n,rank,basis,block", [
    (*SMALL_ODD_SHAPES[1], 17, "dense", 32),   # right side, a partial block
    (*SMALL_ODD_SHAPES[0], 40, "dense", 8),    # left side, a full and a partial block of 32
    (*SMALL_ODD_SHAPES[1], 5, "int4", 4),
    (*SMALL_ODD_SHAPES[0], 1, "int4", 32),
], ids=["right-r17", "left-r40-b8", "right-int4-b4", "left-int4-r1"])
def test_8bit_moments_equal_the_reference_bit_for_bit(m, n, rank, basis, block, backend):
    """The codes and block scales of M and √V are the reference's exactly (the stochastic
    rounding included); W and the row states by the fp32 rule."""
    args = gradnorm_8bit_args(m, n, rank, basis=basis, block=block, seed=rank)
    ref = run_8bit(args, "reference")
    out = run_8bit(args, backend)
    assert_states_equal(out, ref)
    for name in ("exp_avg", "exp_avg_sq", "exp_avg_sq_scales"):
        assert not torch.equal(ref[name], args[name]), f"{name} did not move"
    for name in ("param", *ROWS):
        assert_fp32_close(out[name], ref[name])
    assert not torch.equal(out["param"], args["param"])


@pytest.mark.parametrize("m,n", [(520, 256), (256, 520)], ids=["right", "left"])
def test_8bit_moments_on_cpu_tiles_and_general_inputs(m, n):
    """Several CPU tiles, exact inputs: the codes are the reference's; general inputs (an
    orthonormal basis, random codes): the moments decode within one grid step of the
    reference's, W and the row states by the fp32 rule."""
    exact = gradnorm_8bit_args(m, n, 40, seed=3)
    assert_states_equal(run_8bit(exact, "cpu"), run_8bit(exact, "reference"))
    args = gradnorm_8bit_args(m, n, 40, exact=False, seed=4)
    out, ref = run_8bit(args, "cpu", **HYPER), run_8bit(args, "reference", **HYPER)
    assert_8bit_moments_within_a_grid_step(out, ref, reference.is_right_side(m, n), 32)
    for name in ("param", *ROWS):
        assert_fp32_close(out[name], ref[name], rtol=1e-4)


# --------------------------------------------------------------------------------------------
# bad input: a clear error naming the argument, nothing written
# --------------------------------------------------------------------------------------------
def _bad_cases():
    def change(**fields):
        return lambda x: dataclasses.replace(x, **{k: f(x) for k, f in fields.items()})

    return [
        ("int8-param", change(param=lambda x: torch.zeros(x.param.shape, dtype=torch.uint8)),
         "param: INT8 weight codes"),
        ("row-scale-dtype", change(row_scale=lambda x: x.row_scale.double()),
         "row_scale: expected dtype float32"),
        ("row-norm-shape", change(row_norm=lambda x: x.row_norm[:-1].contiguous()),
         "row_norm: expected shape"),
        ("scale-moment-noncontig", change(scale_exp_avg=lambda x: torch.zeros(
            2 * x.param.shape[0])[::2]), "scale_exp_avg: expected a contiguous"),
        ("row-alias", change(scale_exp_avg_sq=lambda x: x.scale_exp_avg),
         "scale_exp_avg_sq: must not alias scale_exp_avg"),
        ("proj-shape", change(proj=lambda x: x.proj[:, :-1].contiguous()),
         "proj: expected shape"),
        ("state-dtype", change(exp_avg_sq=lambda x: x.exp_avg_sq.half()),
         "exp_avg_sq: expected dtype"),
        ("8bit-without-scales", change(
            exp_avg=lambda x: torch.zeros(x.exp_avg.shape, dtype=torch.int8),
            exp_avg_sq=lambda x: torch.zeros(x.exp_avg_sq.shape, dtype=torch.uint8)),
         "exp_avg_scales: required with 8-bit"),
    ]


BAD = _bad_cases()
BAD_BACKENDS = ["cpu", "reference", "torch.ops",
                pytest.param("triton", marks=[needs_triton, pytest.mark.skipif(
                    DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="CPU tensors need the Triton interpreter")])]


@pytest.mark.parametrize("backend", BAD_BACKENDS)
@pytest.mark.parametrize("case,mutate,message", BAD, ids=[c[0] for c in BAD])
def test_bad_input_raises_and_writes_nothing(case, mutate, message, backend):
    inputs = mutate(gradnorm_inputs(60, 40, 8))
    before = [t.clone() for t in inputs.args()]
    with pytest.raises((ValueError, RuntimeError), match=message.replace("(", r"\(")):
        if backend == "torch.ops":
            torch.ops.lowrank.fused_gradnorm_step(*inputs.args(), **HYPER)
        else:
            lk.ops.fused_gradnorm_step(*inputs.args(), **HYPER, backend=backend)
    for t, b in zip(inputs.args(), before, strict=True):
        assert torch.equal(t, b), "a tensor was written before validation failed"


# --------------------------------------------------------------------------------------------
# registration: fake kernel, opcheck, torch.compile, the CUDA key (Triton only)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("m,n", [(40, 23), (23, 40)], ids=["right", "left"])
def test_opcheck(m, n):
    inputs = gradnorm_inputs(m, n, 5, weight_dtype=BF16)
    torch.library.opcheck(torch.ops.lowrank.fused_gradnorm_step.default, inputs.args(), HYPER)


def test_opcheck_8bit_moments():
    """The schema's mutation annotations for the block scales (written in place)."""
    args = gradnorm_8bit_args(40, 23, 5, exact=False)
    names = ("param", "grad", "proj", "exp_avg", "exp_avg_sq", *ROWS)
    kwargs = {**HYPER, "exp_avg_scales": args["exp_avg_scales"],
              "exp_avg_sq_scales": args["exp_avg_sq_scales"], "state_block_size": 32}
    torch.library.opcheck(torch.ops.lowrank.fused_gradnorm_step.default,
                          tuple(args[k] for k in names), kwargs)


def test_fake_kernel_validates_and_compile_traces_the_step():
    meta = gradnorm_inputs(60, 40, 8).to("meta")
    with pytest.raises((ValueError, RuntimeError), match="row_norm: expected shape"):
        torch.ops.lowrank.fused_gradnorm_step(*meta.args()[:6], meta.row_norm[:-1],
                                              *meta.args()[7:], **HYPER)
    inputs = gradnorm_inputs(48, 30, 6)
    eager, compiled_in = inputs.clone(), inputs.clone()

    def step(*args):
        torch.ops.lowrank.fused_gradnorm_step(*args, **HYPER)
        return args[0].sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*compiled_in.args()), step(*eager.args()))
    for a, b in zip(compiled_in.args(), eager.args(), strict=True):
        torch.testing.assert_close(a, b)


def test_cuda_cxx_backend_routes_gradnorm_to_triton(monkeypatch):
    """The CUDA C++ library has no GradNormLoRP kernel: under set_cuda_backend("cuda_cxx") the
    registered CUDA kernel keeps running Triton for this op (TRITON_ONLY_OPS in
    lowrank_kernels/_dispatch.py), while fused_galore_step goes to the CUDA C++ kernel; and
    backend="cuda" says so."""
    assert not _dispatch.cuda_cxx_serves("fused_gradnorm_step", {})
    assert _dispatch.cuda_cxx_serves("fused_galore_step", {"seed": 3})
    targets = {}
    monkeypatch.setattr(_dispatch, "_CUDA_TARGETS", targets)
    monkeypatch.setattr(torch.ops, "lowrank_cuda", type("Stub", (), {
        op: f"lowrank_cuda::{op}" for op in _dispatch.TRITON_OPS}), raising=False)
    _dispatch._set_targets("cuda_cxx")
    assert targets["fused_gradnorm_step"].__name__ == "load_and_run"  # Triton, on first call
    assert targets["fused_galore_step"] == "lowrank_cuda::fused_galore_step"
    if _dispatch.CUDA_CXX_AVAILABLE:
        with pytest.raises(NotImplementedError, match="fused_gradnorm_step has no CUDA C"):
            _dispatch.kernel("fused_gradnorm_step", "cuda", torch.device("cuda"))


@needs_triton
@pytest.mark.skipif(not _dispatch.CUDA_CXX_AVAILABLE or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs the CUDA C++ build (its switch) and the Triton interpreter")
@pytest.mark.parametrize("m,n", [(40, 23), (23, 40)], ids=["right", "left"])
def test_cuda_key_runs_triton_under_both_backends(m, n):
    """The dispatcher's CUDA kernel of lowrank::fused_gradnorm_step called on CPU tensors (the
    interpreter runs Triton): the Triton launcher's bits under set_cuda_backend("triton") and
    ("cuda_cxx"); backend="cuda" reaches lowrank_cuda::fused_gradnorm_step, which says that it
    is not implemented in CUDA C++."""
    key = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    inputs = gradnorm_inputs(m, n, 5, weight_dtype=BF16, proj_dtype=BF16)
    want = run(inputs, "triton")
    for backend in ("triton", "cuda_cxx"):
        lk.set_cuda_backend(backend)
        try:
            out = inputs.clone()
            torch.ops.lowrank.fused_gradnorm_step.default.redispatch(key, *out.args(), **HYPER)
        finally:
            lk.set_cuda_backend("triton")
        for a, b in zip(out.args(), want.args(), strict=True):
            assert torch.equal(a, b), backend
    with pytest.raises(NotImplementedError, match="not implemented in CUDA C\\+\\+"):
        torch.ops.lowrank_cuda.fused_gradnorm_step.default.redispatch(key, *inputs.args(),
                                                                      **HYPER)  # the stub
