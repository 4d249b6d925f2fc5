"""fused_galore_step: the Triton kernels against the reference (DESIGN.md §4.2, §6).

Both variants (one pass, triton_kernels/fused_galore_step.py; two launches,
triton_kernels/fused_galore_step_2d.py) run every numerical test, chosen through
LOWRANK_TRITON_VARIANT so the public launcher's override is exercised too.

Without a GPU the kernel runs in Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1). The interpreter is slow, so shapes are small and the cases below cover every
side, rank (1, 17, 64, 130), weight dtype, state dtype and dot path at least once instead of their
full product. With a GPU the same cases run compiled, on CUDA tensors.
"""

import importlib.util

import pytest
import torch

import lowrank_kernels as lk
from cases import HYPER, SMALL_ODD_SHAPES, assert_step_matches, step_inputs

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed")

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


VARIANTS = ["onepass", "twolaunch"]


@pytest.fixture(params=VARIANTS)
def variant(request, monkeypatch):
    """Forces one Triton variant for lk.ops.fused_galore_step(..., backend='triton')."""
    monkeypatch.setenv("LOWRANK_TRITON_VARIANT", request.param)
    return request.param


def _ids(case):
    m, n, rank, weight, state, proj = case
    return f"{m}x{n}-r{rank}-w{str(weight)[6:]}-s{str(state)[6:]}-p{str(proj)[6:]}"


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_triton_matches_reference(case, variant):
    m, n, rank, weight, state, proj = case
    inputs = step_inputs(m, n, rank, weight_dtype=weight, state_dtype=state, proj_dtype=proj,
                         device=DEVICE)
    out = inputs.clone()
    lk.ops.fused_galore_step(*out.args(), **HYPER, backend="triton")
    assert_step_matches(out, inputs, **HYPER)


def test_backend_from_environment(monkeypatch):
    monkeypatch.setenv("LOWRANK_BACKEND", "triton")
    assert lk.ops.resolve_backend("fused_galore_step", torch.device(DEVICE)) == "triton"
    inputs = step_inputs(*RIGHT, 9, weight_dtype=BF16, device=DEVICE)
    out = inputs.clone()
    lk.fused_galore_step(*out.args(), **HYPER)
    assert_step_matches(out, inputs, **HYPER)


@pytest.mark.filterwarnings("ignore:invalid value encountered in divide")  # the padding's 0/0
def test_zero_eps_leaves_padding_out(variant):
    """eps = 0 makes the padded rank columns 0/0; they must not reach W (rank 17 pads to 32)."""
    hyper = {**HYPER, "eps": 0.0}
    inputs = step_inputs(*LEFT, 17, device=DEVICE)
    out = inputs.clone()
    lk.ops.fused_galore_step(*out.args(), **hyper, backend="triton")
    assert torch.isfinite(out.param).all()
    assert_step_matches(out, inputs, **hyper)


def test_steps_track_reference(variant):
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
@pytest.mark.parametrize("variant_name", VARIANTS)
def test_64_bit_offsets_match(m, n, variant_name):
    """The 64-bit offset variant (chosen for 2**31+ elements) on a small weight, forced."""
    fgs = _triton_module()
    inputs = step_inputs(m, n, 17, weight_dtype=BF16, proj_dtype=BF16, device=DEVICE)
    out = inputs.clone()
    coeffs = fgs.adam_coeffs(**HYPER)
    if variant_name == "onepass":
        config = fgs.pick_config(m, n, 17, BF16, BF16)
        fgs._launch(config, *out.args(), 17, coeffs, index_64=True)
    else:
        fgs.fused_galore_step_2d.launch(*out.args(), 17, coeffs, index_64=True)
    assert_step_matches(out, inputs, **HYPER)


def test_ranks_above_the_one_pass_limit_go_to_two_launches():
    """Rank 513 > MAX_RANK_PAD: 'auto' picks the two-launch variant (it tiles the rank), an
    explicit 'onepass' raises before writing."""
    fgs = _triton_module()
    assert fgs.choose_variant(540, 520, 513, F32, F32) == "twolaunch"
    inputs = step_inputs(540, 520, 513, device=DEVICE)
    out = inputs.clone()
    with pytest.raises(ValueError, match="proj: rank r=513"):
        fgs.fused_galore_step(*out.args(), **HYPER, variant="onepass")
    for got, before in zip(out.args(), inputs.args()):
        assert torch.equal(got, before)


@pytest.mark.skipif(DEVICE == "cpu", reason="a minute in the interpreter; rank tiling is covered "
                    "by r=130 (several rank tiles) above")
def test_two_launch_variant_runs_ranks_above_the_one_pass_limit():
    inputs = step_inputs(540, 520, 513, weight_dtype=BF16, proj_dtype=BF16, device=DEVICE)
    out = inputs.clone()
    _triton_module().fused_galore_step(*out.args(), **HYPER, variant="auto")
    assert_step_matches(out, inputs, **HYPER)


# --------------------------------------------------------------------------------------------
# launch configuration
# --------------------------------------------------------------------------------------------
def _triton_module():
    return importlib.import_module("lowrank_kernels.triton_kernels.fused_galore_step")


CONFIG_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (67, 131), (1, 5000), (100000, 64)]


@pytest.mark.parametrize("m,n,rank", [(m, n, r) for m, n in CONFIG_SHAPES
                                      for r in (1, 17, 33, 64, 128, 130, 256, 512)
                                      if r <= min(m, n)], ids=str)
@pytest.mark.parametrize("dtypes", [(BF16, BF16), (F32, F32), (BF16, F32)], ids=str)
def test_picked_config_is_a_candidate(m, n, rank, dtypes):
    """The AOT test compiles candidate_configs(); whatever the heuristic picks must be in it."""
    fgs = _triton_module()
    config = fgs.pick_config(m, n, rank, *dtypes)
    assert (fgs.dot_kind(*dtypes), config) in fgs.candidate_configs()
    assert config.r_pad >= rank


@pytest.mark.parametrize("m,n,rank", [(m, n, r) for m, n in CONFIG_SHAPES
                                      for r in (1, 17, 33, 64, 128, 130, 256, 512, 1000)
                                      if r <= min(m, n)], ids=str)
@pytest.mark.parametrize("dtypes", [(BF16, BF16, BF16), (F32, F32, F32), (F16, BF16, F32)],
                         ids=str)
def test_two_launch_configs_are_candidates(m, n, rank, dtypes):
    """Both launches' picked configurations are among those the AOT test compiles."""
    fgs2d = _triton_module().fused_galore_step_2d
    project, back = fgs2d.pick_configs(rank, *dtypes)
    candidates = fgs2d.candidate_configs()
    assert ("project", fgs2d.dot_kind(*dtypes[1:]), project) in candidates
    assert ("back", fgs2d.weight_kind(dtypes[0]), back) in candidates


@pytest.mark.parametrize("m,n,rank,expected", [
    (4096, 11008, 256, "twolaunch"),  # rank >= 128
    (11008, 4096, 128, "twolaunch"),
    (11008, 4096, 32, "onepass"),  # 11008/64 = 172 programs >= 132 SMs
    (4096, 4096, 32, "twolaunch"),  # 4096/64 = 64 programs < 132 SMs
    (5000, 11008, 1, "onepass"),  # left side: 11008 owned columns
])
def test_auto_variant_heuristic(m, n, rank, expected):
    assert _triton_module().choose_variant(m, n, rank, BF16, BF16, num_sms=132) == expected


def test_bad_variant_raises(monkeypatch):
    fgs = _triton_module()
    inputs = step_inputs(*RIGHT, 4, device=DEVICE)
    with pytest.raises(ValueError, match="variant: expected one of"):
        fgs.fused_galore_step(*inputs.clone().args(), **HYPER, variant="fast")
    monkeypatch.setenv("LOWRANK_TRITON_VARIANT", "fast")
    with pytest.raises(ValueError, match="LOWRANK_TRITON_VARIANT"):
        fgs.fused_galore_step(*inputs.clone().args(), **HYPER)


def test_rank_above_the_kernel_limit_raises():
    fgs = _triton_module()
    with pytest.raises(ValueError, match="proj: rank r=513"):
        fgs.pick_config(600, 600, 513, BF16, BF16)


def test_adam_coeffs_follow_make_adam_coeffs():
    """Host scalars as in adam.h: double arithmetic, one rounding to fp32 (checked in fp64)."""
    fgs = _triton_module()
    lr, beta1, beta2, wd, scale, step = 0.5, 0.9, 0.999, 0.1, 0.25, 3
    coeffs = fgs.adam_coeffs(lr, beta1, beta2, 1e-6, wd, scale, step)
    decay = 1.0 - lr * wd
    alpha = lr * (1.0 - beta2**step) ** 0.5 / (1.0 - beta1**step)
    expected = dict(decay=decay, update_scale=decay * alpha * scale, one_minus_beta2=1 - beta2)
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
