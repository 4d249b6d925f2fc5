"""fused_galore_step: the Triton kernel (triton_kernels/fused_galore_step.py, two launches, the
kernel of torch.ops.lowrank.fused_galore_step on CUDA tensors) against the reference
(DESIGN.md §4.2, §6). The experimental one-pass kernel has its own opt-in tests
(tests/test_experimental.py).

Without a GPU the kernel runs in Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1). The interpreter is slow, so shapes are small and the cases below cover every
side, rank (1, 17, 64, 130), weight dtype, state dtype and dot path at least once instead of their
full product. With a GPU the same cases run compiled, on CUDA tensors.
"""

import importlib.util

import pytest
import torch
from cases import (
    HYPER,
    SMALL_ODD_SHAPES,
    QGaLoreInputs,
    StepInputs,
    assert_step_matches,
    qgalore_inputs,
    step_inputs,
)
from test_fused_qgalore_step import SMALL_LR, assert_int8_step_matches

import lowrank_kernels as lk
from lowrank_kernels import reference

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed")
triton = pytest.importorskip("triton")
tl = triton.language
from lowrank_kernels.triton_kernels._common import _basis_tile

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LEFT, RIGHT = SMALL_ODD_SHAPES  # (67, 131): m < n, left projection; (131, 67): right
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16

# (m, n, rank, weight dtype, state dtype, proj dtype). proj in the weight's 16-bit dtype takes
# the tensor-core path; an fp32 basis takes the exact fp32 projection.
CASES = [
    (*LEFT, 1, F32, F32, F32),
    (*RIGHT, 1, BF16, BF16, BF16),
    (*LEFT, 17, BF16, F32, F32),
    (*RIGHT, 17, F16, F32, F16),
    (*LEFT, 17, F16, BF16, F16),
    (*RIGHT, 17, F32, BF16, F32),
    (*LEFT, 64, BF16, F32, BF16),
    (*RIGHT, 64, F32, F32, F32),
    (*RIGHT, 64, F16, BF16, F32),
    (131, 200, 130, BF16, F32, BF16),  # left, rank padded to 256
    (200, 131, 130, F32, F32, F32),  # right
]


def _ids(case):
    m, n, rank, weight, state, proj = case
    return f"{m}x{n}-r{rank}-w{str(weight)[6:]}-s{str(state)[6:]}-p{str(proj)[6:]}"


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_triton_matches_reference(case):
    m, n, rank, weight, state, proj = case
    inputs = step_inputs(m, n, rank, weight_dtype=weight, state_dtype=state, proj_dtype=proj,
                         device=DEVICE)
    out = inputs.clone()
    lk.ops.fused_galore_step(*out.args(), **HYPER, backend="triton")
    assert_step_matches(out, inputs, **HYPER)


@pytest.mark.filterwarnings("ignore:invalid value encountered in divide")  # the padding's 0/0
def test_zero_eps_leaves_padding_out():
    """eps = 0 makes the padded rank columns 0/0; they must not reach W (rank 17 pads to 32)."""
    hyper = {**HYPER, "eps": 0.0}
    inputs = step_inputs(*LEFT, 17, device=DEVICE)
    out = inputs.clone()
    lk.ops.fused_galore_step(*out.args(), **hyper, backend="triton")
    assert torch.isfinite(out.param).all()
    assert_step_matches(out, inputs, **hyper)


def test_steps_track_reference():
    """Three consecutive steps (new gradient each) stay on the reference trajectory."""
    inputs = step_inputs(*RIGHT, 5, device=DEVICE)
    ours, ref = inputs.clone(), inputs.clone()
    gen = torch.Generator().manual_seed(2)
    for step in range(1, 4):
        grad = torch.randn(RIGHT, generator=gen).to(DEVICE)
        hyper = {**HYPER, "step": step}
        lk.ops.fused_galore_step(ours.param, grad, ours.proj, ours.exp_avg, ours.exp_avg_sq,
                                 **hyper, backend="triton")
        lk.ops.fused_galore_step(ref.param, grad, ref.proj, ref.exp_avg, ref.exp_avg_sq,
                                 **hyper, backend="reference")
    for name in ("param", "exp_avg", "exp_avg_sq"):
        got, want = getattr(ours, name).cpu(), getattr(ref, name).cpu()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("m,n", SMALL_ODD_SHAPES, ids=["left", "right"])
def test_64_bit_offsets_match(m, n):
    """The 64-bit offset variant (chosen past 2**31 elements) on a small weight, forced."""
    fgs = _triton_module()
    inputs = step_inputs(m, n, 17, weight_dtype=BF16, proj_dtype=BF16, device=DEVICE)
    out = inputs.clone()
    fgs.launch(*out.args(), 17, fgs.adam_coeffs(**HYPER), index_64=True)
    assert_step_matches(out, inputs, **HYPER)


@pytest.mark.skipif(DEVICE == "cpu", reason="a minute in the interpreter; rank tiling is covered "
                    "by r=130 (several rank tiles) above")
def test_rank_above_512_runs():
    inputs = step_inputs(540, 520, 513, weight_dtype=BF16, proj_dtype=BF16, device=DEVICE)
    out = inputs.clone()
    _triton_module().fused_galore_step(*out.args(), **HYPER)
    assert_step_matches(out, inputs, **HYPER)


# --------------------------------------------------------------------------------------------
# launch configuration
# --------------------------------------------------------------------------------------------
def _triton_module():
    return importlib.import_module("lowrank_kernels.triton_kernels.fused_galore_step")


CONFIG_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (67, 131), (1, 5000), (100000, 64)]


@pytest.mark.parametrize("m,n,rank", [(m, n, r) for m, n in CONFIG_SHAPES
                                      for r in (1, 17, 33, 64, 128, 130, 256, 512, 1000)
                                      if r <= min(m, n)], ids=str)
@pytest.mark.parametrize("dtypes", [(BF16, BF16, BF16), (F32, F32, F32), (F16, BF16, F32)],
                         ids=str)
@pytest.mark.parametrize("index_64", [False, True], ids=["i32", "i64"])
def test_picked_configs_are_candidates(m, n, rank, dtypes, index_64):
    """Both launches' picked configurations, with either offset width and either moment dtype,
    are among those the AOT test compiles."""
    fgs = _triton_module()
    project, back = fgs.pick_configs(rank, *dtypes, index_64=index_64)
    candidates = fgs.candidate_configs(index_64=index_64)
    assert ("project", fgs.dot_kind(*dtypes[1:]), project) in candidates
    assert ("back", fgs.weight_kind(dtypes[0]), back) in candidates
    project, _ = fgs.pick_configs(rank, *dtypes, bf16_moments=True, index_64=index_64)
    assert ("project", fgs.dot_kind(*dtypes[1:]), project) in fgs.bf16_moment_candidate_configs(
        index_64=index_64)
    project, _ = fgs.pick_configs(rank, *dtypes, moments_8bit=True, index_64=index_64)
    assert ("project", fgs.dot_kind(*dtypes[1:]), project) in fgs.moment8_candidate_configs(
        index_64=index_64)


def test_adam_coeffs_follow_make_adam_coeffs():
    """Host scalars as in adam.h: double arithmetic, one rounding to fp32 (checked in fp64)."""
    fgs = _triton_module()
    lr, beta1, beta2, wd, scale, step = 0.5, 0.9, 0.999, 0.1, 0.25, 3
    coeffs = fgs.adam_coeffs(lr, beta1, beta2, 1e-6, wd, scale, step)
    decay = 1.0 - lr * wd
    alpha = lr * (1.0 - beta2**step) ** 0.5 / (1.0 - beta1**step)
    expected = dict(decay=decay, update_scale=decay * alpha * scale, one_minus_beta2=1 - beta2,
                    step_size=alpha)
    for name, value in expected.items():
        assert coeffs[name] == torch.tensor(value, dtype=torch.float32).item(), name


# --------------------------------------------------------------------------------------------
# bad input through the Triton backend: clear error, nothing written
# --------------------------------------------------------------------------------------------
def _bad(inputs, **changes):
    args = dict(zip(("param", "grad", "proj", "exp_avg", "exp_avg_sq"), inputs.args()))
    args.update(changes)
    return args


@pytest.mark.parametrize("change,match", [
    (lambda i: dict(grad=i.grad.to(torch.int32)), "grad: expected dtype"),
    (lambda i: dict(grad=i.grad[:, :-1]), "grad: expected the shape"),
    (lambda i: dict(proj=i.proj[:, :-1]), "proj: expected shape"),
    (lambda i: dict(exp_avg=i.exp_avg[:-1]), "exp_avg: expected shape"),
    (lambda i: dict(exp_avg_sq=i.exp_avg_sq.half()), "exp_avg_sq: expected dtype"),
    (lambda i: dict(exp_avg_sq=i.exp_avg), "exp_avg_sq: must not alias"),
    (lambda i: dict(param=i.param.T.contiguous().T), "param: expected a contiguous"),
], ids=["grad-dtype", "grad-shape", "proj-shape", "state-shape", "state-dtype", "alias",
        "param-stride"])
def test_bad_input_raises_before_writing(change, match):
    inputs = step_inputs(*RIGHT, 4, device=DEVICE)
    out = inputs.clone()
    with pytest.raises(ValueError, match=match):
        lk.ops.fused_galore_step(**_bad(out, **change(out)), **HYPER, backend="triton")
    for got, before in zip(out.args(), inputs.args()):
        assert torch.equal(got, before)


def test_rank_above_min_dim_raises():
    inputs = step_inputs(*RIGHT, 4, device=DEVICE)
    proj = torch.zeros(68, 67, device=DEVICE)  # rank 68 > min(131, 67)
    with pytest.raises(ValueError, match=r"proj: rank r=68 must lie in \[1, min\(m, n\)=67\]"):
        lk.ops.fused_galore_step(inputs.param, inputs.grad, proj, inputs.exp_avg,
                                 inputs.exp_avg_sq, **HYPER, backend="triton")


def test_bad_hyperparameter_raises():
    inputs = step_inputs(*RIGHT, 4, device=DEVICE)
    with pytest.raises(ValueError, match="step: expected the already-incremented step"):
        lk.ops.fused_galore_step(*inputs.clone().args(), **{**HYPER, "step": 0},
                                 backend="triton")


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU tensors only")
def test_cpu_tensors_without_interpreter_raise(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    inputs = step_inputs(*RIGHT, 4)
    out = inputs.clone()
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        lk.ops.fused_galore_step(*out.args(), **HYPER, backend="triton")
    with pytest.raises(ValueError, match="param: the Triton kernel needs CUDA tensors"):
        _triton_module().fused_galore_step(*out.args(), **HYPER)
    for got, before in zip(out.args(), inputs.args()):
        assert torch.equal(got, before)


# --------------------------------------------------------------------------------------------
# every projection and weight format (DESIGN.md §4.3-§4.5): packed INT4 and DCT bases generated
# inside the kernels, INT8 weight codes requantized by launch B; against the reference on the
# dense basis they stand for, and the INT8 codes against the CPU kernel bit for bit
# --------------------------------------------------------------------------------------------
def _generated_inputs(m, n, rank, basis, *, weight=F32, grad=None, int8_group=None,
                      proj_group=256, seed=0):
    """(QGaLoreInputs on DEVICE, the dense fp32 basis proj stands for). basis: 'dense', 'int4'
    (the orthonormal basis quantized) or 'dct' (rank spread-out frequencies incl. 0 and d-1)."""
    inputs = qgalore_inputs(m, n, rank, int4_proj=basis == "int4",
                            int8_weight=int8_group is not None, proj_group_size=proj_group,
                            param_group_size=int8_group or 256, grad_dtype=grad or weight,
                            seed=seed)
    if int8_group is None:
        inputs.param = inputs.param.to(weight)
    if basis == "dct":
        d = min(m, n)
        freqs = torch.linspace(0, d - 1, rank).round().to(torch.int32).unique()
        extra = torch.tensor([f for f in range(d) if f not in set(freqs.tolist())][:rank],
                             dtype=torch.int32)
        inputs.proj = torch.cat([freqs, extra])[:rank].sort().values
        dense = reference.dct_projection(inputs.proj, m, n)
    elif basis == "int4":
        dense = reference.dequantize_int4(inputs.proj, inputs.proj_scales, inputs.proj_zeros,
                                          reference.quantized_basis_shape(m, n, rank), proj_group)
    else:
        dense = inputs.proj
    moved = QGaLoreInputs(*(None if t is None else t.to(DEVICE) for t in inputs.tensors()))
    return moved, dense


def _step(inputs, hyper, proj_group, int8_group, backend="triton", seed=7):
    out = inputs.clone()
    fmt = out.formats(proj_group, int8_group or 256, seed)
    lk.ops.fused_galore_step(*out.args(), **hyper, **fmt, backend=backend)
    return out


# (basis, m, n, rank, weight dtype): both sides, r in {1, 17, 64, 65}, fp32 and bf16 (G and W in
# the same dtype; the 16-bit generated basis enters the projection dot in G's type).
GENERATED_FLOAT_CASES = [
    ("int4", *LEFT, 17, F32),
    ("int4", *RIGHT, 17, BF16),
    ("int4", *RIGHT, 64, F32),
    ("int4", *LEFT, 1, BF16),
    ("dct", *LEFT, 17, F32),
    ("dct", *RIGHT, 64, BF16),
    ("dct", *RIGHT, 1, F32),
    ("dct", 131, 200, 65, BF16),  # left, two rank tiles of 64 in launch A
]


@pytest.mark.parametrize("case", GENERATED_FLOAT_CASES,
                         ids=lambda c: f"{c[0]}-{c[1]}x{c[2]}-r{c[3]}-{str(c[4])[6:]}")
def test_generated_basis_float_weight_matches_reference(case):
    basis, m, n, rank, weight = case
    inputs, dense = _generated_inputs(m, n, rank, basis, weight=weight)
    out = _step(inputs, HYPER, 256, None)
    before = StepInputs(inputs.param, inputs.grad, dense.to(DEVICE), inputs.exp_avg,
                        inputs.exp_avg_sq)
    after = StepInputs(out.param, out.grad, dense.to(DEVICE), out.exp_avg, out.exp_avg_sq)
    assert_step_matches(after, before, **HYPER)


# (basis, m, n, rank, INT8 group, grad dtype, hyper): 'rows' when n % group == 0 and the group is
# a power of two ≤ 256, else 'groups' (groups straddling rows, a partial last group)
INT8_CASES = [
    ("dense", *RIGHT, 17, 256, F32, HYPER),  # groups: 131·67 = 34·256 + 73
    ("dense", 48, 256, 33, 128, BF16, HYPER),  # rows, left, bf16 G and basis
    ("int4", *LEFT, 1, 256, F32, HYPER),
    ("int4", 96, 64, 17, 64, F32, HYPER),  # rows, right (a 128-wide tile, half masked)
    ("int4", 45, 70, 17, 6, F32, HYPER),  # a tiny group that is no power of two
    ("int4", *LEFT, 17, 256, BF16, SMALL_LR),  # bf16 G: hi/lo tensor-core projection
    ("dct", 70, 66, 17, 256, F32, HYPER),  # groups, right
    ("dct", 96, 64, 64, 64, F32, HYPER),  # rows, right
    ("dct", 64, 128, 17, 64, F32, SMALL_LR),  # rows, left
]


@pytest.mark.parametrize("case", INT8_CASES, ids=lambda c: f"{c[0]}-{c[1]}x{c[2]}-r{c[3]}-g{c[4]}"
                         f"-{str(c[5])[6:]}-lr{c[6]['lr']}")
def test_int8_weight_matches_reference(case):
    """Against the reference on the dense fp32 basis (a bf16 dense basis: those same values)."""
    basis, m, n, rank, group, grad, hyper = case
    inputs, dense = _generated_inputs(m, n, rank, basis, grad=grad, int8_group=group)
    if basis == "dense":
        inputs.proj = inputs.proj.to(grad)
    config = _triton_module().int8_config(n, group)
    assert config.path == ("rows" if n % group == 0 and group in (64, 128, 256) else "groups")
    ours = _step(inputs, hyper, 256, group)
    ref = inputs.clone()
    if basis != "dense":
        ref.proj, ref.proj_scales, ref.proj_zeros = dense.to(DEVICE), None, None
    reference.fused_qgalore_step(*ref.args(), **hyper, **ref.formats(256, group, 7))
    assert_int8_step_matches(ours, ref, inputs, group)


def _exact_inputs(m, n, rank, basis, group):
    """Inputs on which every fp32 operation of the step is exact or done in the same order by
    the CPU kernel and the Triton kernels: integer G, a basis of dyadic values with one nonzero
    rank per basis column (so R's sums are exact in any order and back(N) has one term), INT4
    scales 1/8 and zeros 8 set directly."""
    gen = torch.Generator().manual_seed(5)
    right = reference.is_right_side(m, n)
    d = n if right else m
    nonzero = torch.arange(d) % rank
    values = torch.randint(1, 8, (d,), generator=gen) * (1 - 2 * torch.randint(0, 2, (d,),
                                                                               generator=gen))
    rows = torch.zeros(rank, d)
    rows[nonzero, torch.arange(d)] = values.float() / 8
    dense = rows if right else rows.T.contiguous()
    inputs = qgalore_inputs(m, n, rank, int4_proj=False, int8_weight=True,
                            param_group_size=group, seed=3)
    inputs.grad = torch.randint(-4, 5, (m, n), generator=gen).float()
    inputs.proj = dense
    if basis == "int4":
        codes = (dense * 8 + 8).round().to(torch.uint8).reshape(-1)
        groups = reference.num_groups(codes.numel(), 256)
        inputs.proj = reference.pack_int4(codes)
        inputs.proj_scales = torch.full((groups,), 0.125)
        inputs.proj_zeros = torch.full((groups,), 8.0)
    return inputs


@pytest.mark.skipif(not lk.EXTENSION_AVAILABLE, reason="needs the C++ CPU kernel")
@pytest.mark.parametrize("m,n,rank,group,basis", [
    (*RIGHT, 5, 256, "dense"), (*LEFT, 3, 256, "int4"), (96, 64, 7, 64, "int4"),
    (64, 128, 4, 64, "dense")], ids=["groups-right", "groups-left", "rows-right", "rows-left"])
def test_int8_codes_equal_the_cpu_kernel_bit_for_bit(m, n, rank, group, basis):
    """Same u (tl.rand == lowrank/philox.h), same fp32 operations in the same order, no FMA
    contraction (launcher): where every input of the requantization agrees exactly, so do the
    codes, scales and zeros. On general inputs R and back(N) are sums in different orders
    (BLAS vs tiles), so a code differs where u falls within that rounding (compared above with
    the reference's tolerance); DCT values are never dyadic, so the DCT basis is not among these
    cases."""
    inputs = _exact_inputs(m, n, rank, basis, group)
    cpu = _step(inputs, HYPER, 256, group, backend="cpu")
    on_device = QGaLoreInputs(*(None if t is None else t.to(DEVICE) for t in inputs.tensors()))
    ours = _step(on_device, HYPER, 256, group)
    for name in ("param", "param_scales", "param_zeros", "exp_avg", "exp_avg_sq"):
        assert torch.equal(getattr(ours, name).cpu(), getattr(cpu, name)), name
    assert not torch.equal(cpu.param, inputs.param)


# ---- the basis loader itself: generated values against the dense rows they stand for -------
@triton.jit
def _basis_rows_kernel(Out_ptr, Proj_ptr, ProjScales_ptr, ProjZeros_ptr, R, LONG, stride_pr,
                       stride_pl, LONG_MAJOR: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_LONG: tl.constexpr, BASIS: tl.constexpr, PROJ_GROUP: tl.constexpr):
    """Out (r × long) = the basis in (rank, long) coordinates, through _basis_tile in either
    orientation (one program per BLOCK_LONG columns)."""
    offs_r = tl.arange(0, BLOCK_R)
    offs_long = tl.program_id(0) * BLOCK_LONG + tl.arange(0, BLOCK_LONG)
    r_mask = offs_r < R
    long_mask = offs_long < LONG
    tile = _basis_tile(Proj_ptr, ProjScales_ptr, ProjZeros_ptr, offs_r, offs_long, r_mask,
                       long_mask, stride_pr, stride_pl, LONG, LONG_MAJOR, BASIS, PROJ_GROUP)
    if LONG_MAJOR:
        tile = tl.trans(tile)
    tl.store(Out_ptr + offs_r[:, None] * LONG + offs_long[None, :], tile,
             mask=r_mask[:, None] & long_mask[None, :])


def _common():
    return importlib.import_module("lowrank_kernels.triton_kernels._common")


def _basis_rows(inputs, m, n, rank, long_major):
    common = _common()
    args = common.basis_args(inputs.proj, m, n, rank, F32, inputs.proj_scales, inputs.proj_zeros,
                             256)
    long = n if reference.is_right_side(m, n) else m
    out = torch.empty(rank, long, device=DEVICE)
    _basis_rows_kernel[(triton.cdiv(long, 256),)](
        out, *args.pointers, rank, long, args.stride_rank, args.stride_long,
        LONG_MAJOR=long_major,
        BLOCK_R=max(16, triton.next_power_of_2(rank)), BLOCK_LONG=256, BASIS=args.kind,
        PROJ_GROUP=args.group_size)
    return out.cpu()


@pytest.mark.parametrize("long_major", [False, True], ids=["r-major", "long-major"])
@pytest.mark.parametrize("m,n,rank", [(*LEFT, 17), (*RIGHT, 9), (3000, 1531, 5)], ids=str)
def test_basis_tiles_equal_the_rows_they_stand_for(m, n, rank, long_major):
    """INT4: bit for bit the reference dequantization. DCT: the rows of C to fp32 rounding (the
    integer phase reduction of lowrank/dct.h keeps k = d − 1 of a large d within a few ulps)."""
    for basis in ("int4", "dct"):
        inputs, dense = _generated_inputs(m, n, rank, basis)
        rows = dense if reference.is_right_side(m, n) else dense.T
        got = _basis_rows(inputs, m, n, rank, long_major)
        if basis == "int4":
            assert torch.equal(got, rows), basis
        else:
            assert int(inputs.proj[-1]) == min(m, n) - 1
            torch.testing.assert_close(got, rows, rtol=0, atol=4 * 2**-24, msg=basis)


# ---- launch configuration of the generated bases and INT8 weights --------------------------
@pytest.mark.parametrize("m,n,rank", [(m, n, r) for m, n in CONFIG_SHAPES
                                      for r in (1, 17, 33, 64, 128, 130, 256, 512, 1000)
                                      if r <= min(m, n)], ids=str)
@pytest.mark.parametrize("grad_dtype", [BF16, F16, F32], ids=str)
def test_generated_basis_configs_are_candidates(m, n, rank, grad_dtype):
    """What an INT4/DCT basis gets is among the configurations the AOT test compiles for
    generated bases."""
    fgs = _triton_module()
    dot_dtype = F32 if grad_dtype == F32 else grad_dtype
    for weight in (grad_dtype, torch.uint8):
        project, back = fgs.pick_configs(rank, weight, grad_dtype, dot_dtype, generated=True)
        candidates = fgs.candidate_configs(generated=True)
        assert ("project", fgs.dot_kind(grad_dtype, dot_dtype), project) in candidates
        project8, _ = fgs.pick_configs(rank, weight, grad_dtype, dot_dtype, generated=True,
                                       moments_8bit=True)
        assert ("project", fgs.dot_kind(grad_dtype, dot_dtype),
                project8) in fgs.moment8_candidate_configs(generated=True)
        if weight != torch.uint8:
            assert ("back", fgs.weight_kind(weight), back) in candidates


@pytest.mark.parametrize("n,group,path", [(4096, 256, "rows"), (11008, 256, "rows"),
                                          (4096, 64, "rows"), (4096, 512, "groups"),
                                          (5461, 256, "groups"), (4096, 96, "groups"),
                                          (4096, 1024, "groups"), (70, 6, "groups")])
@pytest.mark.parametrize("index_64", [False, True], ids=["i32", "i64"])
def test_int8_path_and_configs(n, group, path, index_64):
    """The row-aligned kernel exactly when n % g == 0 and g is a power of two ≤ 256; the
    typical configurations are AOT candidates, for either offset width."""
    fgs = _triton_module()
    config = fgs.int8_config(n, group, index_64)
    assert config.path == path
    if path == "rows":
        assert config.block_n % group == 0
    if group <= 256:  # group sizes beyond the AOT set compile on first use, unchecked
        assert config in fgs.int8_candidate_configs(index_64)


@pytest.mark.parametrize("basis,int8_group", [("int4", None), ("dct", None), ("int4", 256),
                                              ("dct", 64)], ids=str)
def test_64_bit_offsets_of_every_format_give_the_same_step(basis, int8_group):
    """The 64-bit offset variants (weights of 2**31+ elements, DCT sizes ≥ 32768) forced on a
    small weight: same arithmetic, so the same bits as the 32-bit variant."""
    fgs = _triton_module()
    m, n = (96, 64) if int8_group == 64 else LEFT
    inputs, _ = _generated_inputs(m, n, 17, basis, weight=BF16, grad=BF16, int8_group=int8_group)
    coeffs = fgs.adam_coeffs(**HYPER)
    results = []
    for index_64 in (False, True):
        out = inputs.clone()
        args = fgs.basis_args(out.proj, m, n, 17, out.grad.dtype, out.proj_scales,
                              out.proj_zeros, 256)
        fgs.launch(*out.args(), 17, coeffs, index_64=index_64, basis=args,
                   param_scales=out.param_scales, param_zeros=out.param_zeros,
                   param_group_size=int8_group or 256, philox_seed=2**33 + 5)
        results.append(out)
    for a, b in zip(results[0].tensors(), results[1].tensors()):
        assert a is None or torch.equal(a, b)
    assert not torch.equal(results[0].param, inputs.param)
