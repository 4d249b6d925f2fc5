"""bf16 moments: stored with stochastic rounding in every backend (lowrank/adam.h).

A nearest-rounded bf16 V never decays with β2 = 0.999 (0.999·V rounds back to V), which is
what plain torch in bf16 (galore-torch with bf16 states) does; stochastic rounding keeps
E[stored] = the fp32 value. The words come from one Philox call per element under key
rounding_philox_seed(seed, step) at counter (row-major index, 1, 0, 0), the first for M and the
second for V: the same bits in the reference, the C++ kernel, Triton and CUDA wherever the fp32
moments agree (exact inputs below).
"""

import importlib.util

import pytest
import torch
from cases import EXACT_HYPER, StepInputs, step_inputs

import lowrank_kernels as lk
from lowrank_kernels import reference

needs_extension = pytest.mark.skipif(not lk.EXTENSION_AVAILABLE, reason="extension not built")
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton is not installed")
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: the interpreter



def test_stochastic_rounding_keeps_bf16_values_and_rounds_to_a_neighbour_without_bias():
    words = reference.philox_uint32(7, torch.arange(200_000))
    exact = torch.tensor([1.0, -3.5, 2.0**-130, 0.0, float("inf"), -float("inf")])
    for value in exact:  # representable in bf16: every word leaves it unchanged
        rounded = reference.stochastic_round_bf16(value.expand(1000), words[:1000])
        assert torch.equal(rounded.float(), value.expand(1000))
    assert torch.isnan(reference.stochastic_round_bf16(torch.tensor([float("nan")]),
                                                       words[:1])).all()
    x = torch.tensor(1.0 + 2.0**-9 + 2.0**-20)  # 0.25 + 2^-13 of an ulp (2^-7) above 1
    rounded = reference.stochastic_round_bf16(x.expand(words.numel()), words).float()
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + 2.0**-7}
    up = (rounded > 1).double().mean().item()
    p = 0.25 + 2.0**-13
    assert abs(up - p) < 4 * (p * (1 - p) / words.numel()) ** 0.5
    negative = reference.stochastic_round_bf16(-x.expand(words.numel()), words).float()
    assert torch.equal(negative, -rounded)  # magnitude rounding: symmetric in the sign


def _decay_run(op, steps, nearest=False):
    """V = 1 (bf16), R = 0: V ← 0.999·V each step; returns the mean of V after ``steps``."""
    m, n, r = 64, 96, 16
    param = torch.zeros(m, n)
    grad = torch.zeros(m, n)
    proj = torch.eye(m, r)  # left side: m < n
    exp_avg = torch.zeros(r, n, dtype=torch.bfloat16)
    exp_avg_sq = torch.ones(r, n, dtype=torch.bfloat16)
    for step in range(1, steps + 1):
        if nearest:  # plain torch in bf16, as galore-torch keeps its moments
            exp_avg_sq.mul_(0.999).addcmul_(exp_avg_sq * 0, exp_avg_sq * 0, value=0.001)
        else:
            op(param, grad, proj, exp_avg, exp_avg_sq, lr=1e-3, beta1=0.9, beta2=0.999,
               eps=1e-6, weight_decay=0.0, scale=1.0, step=step, seed=11)
    return exp_avg_sq.float().mean().item()


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_extension)])
def test_bf16_second_moment_decays_with_stochastic_rounding_and_freezes_with_nearest(backend):
    steps = 300
    expected = 0.999**steps  # 0.741

    def op(*args, **kwargs):
        lk.ops.fused_galore_step(*args, **kwargs, backend=backend)

    assert _decay_run(op, steps, nearest=True) == 1.0  # frozen: 0.999 rounds back to 1
    mean = _decay_run(op, steps)
    assert abs(mean - expected) < 0.01, (mean, expected)


def exact_inputs(m, n, rank, seed=0):
    """fp32 weight and gradient, bf16 moments; a dyadic basis with one nonzero rank per basis
    column and an integer G, so R is exact in any summation order, and bf16 moments of a few
    bits, so that with EXACT_HYPER M' = M/2 + R/2 and V' = 3V/4 + R²/4 are exact fp32 values
    (mostly not bf16 values: the rounding is exercised)."""
    gen = torch.Generator().manual_seed(seed)
    right = reference.is_right_side(m, n)
    d = n if right else m
    values = torch.randint(1, 8, (d,), generator=gen) * (1 - 2 * torch.randint(0, 2, (d,),
                                                                               generator=gen))
    rows = torch.zeros(rank, d)
    rows[torch.arange(d) % rank, torch.arange(d)] = values.float() / 8
    inputs = step_inputs(m, n, rank, state_dtype=torch.bfloat16, seed=seed)
    inputs.grad = torch.randint(-4, 5, (m, n), generator=gen).float()
    inputs.proj = rows if right else rows.T.contiguous()
    return inputs


def _run(inputs, device="cpu", **kwargs):
    out = StepInputs(*(t.clone().to(device) for t in inputs.args()))
    lk.ops.fused_galore_step(*out.args(), **EXACT_HYPER, seed=21, **kwargs)
    return out


def _assert_same_moments(a, b):
    for name in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(getattr(a, name).cpu(), getattr(b, name).cpu()), name


SHAPES = [(67, 131, 5), (131, 67, 17)]  # left, right
# several CPU tiles (each tile's first state index: column `start` left, row `start`·r right):
# 512 lines in 8 tiles of 64; 520 lines (on 2 threads) in 10 tiles of 48 to 64 (a tile count that
# is a multiple of the thread count, lengths in whole 16-line units)
MULTI_TILE_SHAPES = [(256, 512, 64), (512, 256, 64), (256, 520, 64), (520, 256, 64)]


@pytest.mark.parametrize("m,n,rank", SHAPES, ids=["left", "right"])
def test_reference_moments_are_the_stochastically_rounded_fp32_update(m, n, rank):
    inputs = exact_inputs(m, n, rank)
    ref = _run(inputs, backend="reference")
    right = reference.is_right_side(m, n)
    low = inputs.grad @ inputs.proj.T if right else inputs.proj.T @ inputs.grad
    exp_avg = inputs.exp_avg.float() / 2 + low / 2
    exp_avg_sq = 3 * inputs.exp_avg_sq.float() / 4 + low * low / 4
    key = reference.rounding_philox_seed(21, EXACT_HYPER["step"])
    index = torch.arange(low.numel()).view(low.shape)
    words = reference.philox_uint32x2(key, index + reference.MOMENT_STREAM)
    for name, value, word in (("exp_avg", exp_avg, words[0]), ("exp_avg_sq", exp_avg_sq, words[1])):
        want = reference.stochastic_round_bf16(value, word)
        assert torch.equal(getattr(ref, name), want), name
        nearest = value.to(torch.bfloat16)
        assert not torch.equal(want, nearest)  # some elements rounded away from the nearest
        assert (want.float() != value).any()  # and the fp32 values were not bf16 values


@needs_extension
@pytest.mark.parametrize("m,n,rank", SHAPES + MULTI_TILE_SHAPES,
                         ids=["left", "right", "left-tiles", "right-tiles", "left-uneven",
                              "right-uneven"])
def test_cpu_kernel_moments_equal_the_reference_bit_for_bit(m, n, rank):
    inputs = exact_inputs(m, n, rank)
    _assert_same_moments(_run(inputs, backend="cpu"), _run(inputs, backend="reference"))


@needs_triton
@pytest.mark.parametrize("m,n,rank", SHAPES, ids=["left", "right"])
def test_triton_moments_equal_the_reference_bit_for_bit(m, n, rank):
    inputs = exact_inputs(m, n, rank)
    _assert_same_moments(_run(inputs, TRITON_DEVICE, backend="triton"),
                         _run(inputs, backend="reference"))


@needs_triton
@pytest.mark.parametrize("m,n,rank", [(67, 131, 5), (131, 67, 65)], ids=["left", "right-r65"])
def test_triton_moments_with_a_packed_int4_basis_and_bf16_grad_equal_the_reference(m, n, rank):
    """A generated basis (INT4 codes dequantized in the tile: scales 1/8, zeros 8, so the values
    are the dyadic basis) and a bf16 G (integers): the tensor-core launch A with the bf16-moment
    tile table (rank 65: 64-wide rank tiles)."""
    inputs = exact_inputs(m, n, rank)
    inputs.grad = inputs.grad.to(torch.bfloat16)
    codes = (inputs.proj * 8 + 8).round().to(torch.uint8).reshape(-1)
    groups = reference.num_groups(codes.numel(), 256)
    packed = dict(proj_scales=torch.full((groups,), 0.125), proj_zeros=torch.full((groups,), 8.0))
    dense = _run(inputs, backend="reference")
    on_device = StepInputs(*(t.clone().to(TRITON_DEVICE) for t in inputs.args()))
    on_device.proj = reference.pack_int4(codes).to(TRITON_DEVICE)
    lk.ops.fused_galore_step(*on_device.args(), **EXACT_HYPER, seed=21, backend="triton",
                             **{k: v.to(TRITON_DEVICE) for k, v in packed.items()})
    _assert_same_moments(on_device, dense)


@pytest.mark.skipif(not torch.cuda.is_available() or not lk.EXTENSION_AVAILABLE,
                    reason="needs a GPU and the CUDA kernel")
@pytest.mark.parametrize("m,n,rank", SHAPES, ids=["left", "right"])
def test_cuda_moments_equal_the_reference_bit_for_bit(m, n, rank, cuda_paths):
    """The CUDA C++ kernel (and the experimental 16-bit path where built) through
    torch.ops.lowrank with the CUDA switch on them (cuda_paths, tests/conftest.py)."""
    inputs = exact_inputs(m, n, rank)
    _assert_same_moments(_run(inputs, "cuda"), _run(inputs, backend="reference"))


@needs_extension
def test_streams_depend_on_seed_and_step_and_differ_between_moments():
    inputs = exact_inputs(131, 67, 17)
    base = _run(inputs, backend="cpu")
    other_seed = StepInputs(*(t.clone() for t in inputs.args()))
    lk.ops.fused_galore_step(*other_seed.args(), **EXACT_HYPER, seed=22, backend="cpu")
    other_step = StepInputs(*(t.clone() for t in inputs.args()))
    lk.ops.fused_galore_step(*other_step.args(), **{**EXACT_HYPER, "step": 4}, seed=21,
                             backend="cpu")
    assert not torch.equal(base.exp_avg, other_seed.exp_avg)
    assert not torch.equal(base.exp_avg_sq, other_step.exp_avg_sq)
    key = reference.rounding_philox_seed(21, EXACT_HYPER["step"])
    index = torch.arange(1000)
    words_m, words_v = reference.philox_uint32x2(key, index + reference.MOMENT_STREAM)
    assert not torch.equal(words_m, words_v)  # M and V round independently
    # and neither is the INT8 weights' stream (counter word 1 = 0) at the same index
    assert not torch.equal(words_m, reference.philox_uint32(key, index))


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_extension)])
def test_fp32_moments_ignore_the_seed(backend):
    inputs = step_inputs(67, 131, 5)
    a, b = (StepInputs(*(t.clone() for t in inputs.args())) for _ in range(2))
    lk.ops.fused_galore_step(*a.args(), **EXACT_HYPER, seed=1, backend=backend)
    lk.ops.fused_galore_step(*b.args(), **EXACT_HYPER, seed=2, backend=backend)
    assert torch.equal(a.exp_avg, b.exp_avg) and torch.equal(a.param, b.param)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_extension)])
def test_bf16_moments_need_a_valid_seed_and_step(backend):
    inputs = exact_inputs(67, 131, 5)
    before = [t.clone() for t in inputs.args()]
    with pytest.raises((ValueError, RuntimeError), match="seed: expected a value in"):
        lk.ops.fused_galore_step(*inputs.args(), **EXACT_HYPER, seed=2**32, backend=backend)
    with pytest.raises((ValueError, RuntimeError), match="step: expected a value <= 2"):
        lk.ops.fused_galore_step(*inputs.args(), **{**EXACT_HYPER, "step": 2**31}, seed=0,
                                 backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(inputs.args(), before))  # nothing written


def _int8_weight(inputs):
    """The inputs with W as INT8 codes (groups of 64 straddling rows) and their scales/zeros."""
    codes, scales, zeros = reference.quantize_int8(inputs.param, 64)
    return inputs.args()[1:], dict(param=codes, param_scales=scales, param_zeros=zeros,
                                   param_group_size=64)


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_extension),
                                     pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("m,n,rank", SHAPES, ids=["left", "right"])
def test_int8_weights_with_bf16_moments_round_them_as_the_reference(m, n, rank, backend):
    """The INT8-weight step (moments in its launch A / low-rank pass): the same moment bits."""
    inputs = exact_inputs(m, n, rank)
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    results = {}
    for name, where in (("reference", "cpu"), (backend, device)):
        (grad, proj, exp_avg, exp_avg_sq), w = _int8_weight(inputs)
        args = [t.clone().to(where) for t in (w["param"], grad, proj, exp_avg, exp_avg_sq)]
        extra = {k: (v.clone().to(where) if torch.is_tensor(v) else v) for k, v in w.items()
                 if k != "param"}
        lk.ops.fused_galore_step(*args, **EXACT_HYPER, seed=21, backend=name, **extra)
        results[name] = args
    for got, want in zip(results[backend][3:], results["reference"][3:]):
        assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_extension),
                                     pytest.param("triton", marks=needs_triton)])
def test_nan_moments_are_stored_as_the_same_quiet_nan(backend):
    inputs = exact_inputs(131, 67, 17)
    inputs.grad[3, :] = float("nan")  # right side: row 3 of R, M and V
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    out = _run(inputs, device, backend=backend)
    for state in (out.exp_avg.cpu(), out.exp_avg_sq.cpu()):
        bits = state.view(torch.int16)
        assert torch.isnan(state[3]).all() and (bits[3] == 0x7FC0).all()
        assert not torch.isnan(state[4:]).any()


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_extension),
                                     pytest.param("triton", marks=needs_triton)])
def test_moments_of_different_dtypes_are_an_error(backend):
    inputs = exact_inputs(67, 131, 5)
    inputs.exp_avg = inputs.exp_avg.float()
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    args = [t.to(device) for t in inputs.args()]
    before = [t.clone() for t in args]
    with pytest.raises((ValueError, RuntimeError), match="exp_avg_sq: expected the dtype of "
                                                         "exp_avg"):
        lk.ops.fused_galore_step(*args, **EXACT_HYPER, seed=1, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(args, before))
