"""8-bit moments of reference.py (DESIGN.md §4.9): the FP8 block format (M as E4M3 codes, √V as
unsigned E4M4 codes, fp32 absmax scales per block of B rank-axis elements of an own-line), its
stochastic rounding (unbiased, Philox words of the bf16 moments), an independent scalar encoder
agreeing bit for bit, and fused_galore_step on 8-bit states."""

import math
import struct

import pytest
import torch

from lowrank_kernels import reference

pytestmark = pytest.mark.usefixtures("one_thread")

FORMATS = {True: reference.EXP_AVG_FORMAT, False: reference.EXP_AVG_SQ_FORMAT}


def words_for(shape, seed=0, second=False):
    index = torch.arange(math.prod(shape)).view(shape) + reference.MOMENT_STREAM
    return reference.philox_uint32x2(seed, index)[1 if second else 0]


def roundtrip(x, block, right, signed, seed=0):
    codes, scales = reference.quantize_moment(x, words_for(x.shape, seed, not signed), block,
                                              right, signed=signed)
    return codes, scales, reference.dequantize_moment(codes, scales, block, right, signed=signed)


@pytest.mark.parametrize("rank,block", [(1, 32), (7, 32), (45, 16), (64, 32), (70, 32)])
@pytest.mark.parametrize("right", [True, False], ids=["right", "left"])
def test_block_layout_scales_are_rank_axis_absmax(rank, block, right):
    """scales[i, k] = max|x| over line i's rank indices [kB, (k+1)B) / max_value: rows of the
    m×r state on the right side, columns of the r×n state on the left; partial last block."""
    own = 11
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn((own, rank) if right else (rank, own), generator=gen)
    x *= torch.logspace(-3, 3, x.numel()).view(x.shape)  # every block its own scale
    for signed in (True, False):
        values = x if signed else x * x
        codes, scales, _ = roundtrip(values, block, right, signed)
        assert codes.dtype == (torch.int8 if signed else torch.uint8)
        assert codes.shape == x.shape
        assert scales.shape == reference.moment_scales_shape(*((own, 1) if right else (1, own)),
                                                             rank, block)
        assert scales.shape == (own, -(-rank // block))
        lines = x if right else x.T
        for i in range(own):
            for k in range(scales.shape[1]):
                block_max = lines[i, k * block:(k + 1) * block].abs().max()
                expected = block_max / torch.tensor(FORMATS[signed].max_value)
                assert scales[i, k] == expected, (i, k)


@pytest.mark.parametrize("right", [True, False], ids=["right", "left"])
@pytest.mark.parametrize("signed", [True, False], ids=["exp_avg", "exp_avg_sq"])
def test_roundtrip_error_is_within_one_grid_step(signed, right):
    """|x̃ − x| ≤ one grid step: 2^-mb relative in the normal range (12.5 % for M's E4M3, 6.25 %
    for √V's E4M4), 2^(−6−mb)·s absolute below it; the block maximum is kept to fp32 rounding."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(9, 37, generator=gen) * torch.logspace(-4, 1, 37)
    mb = FORMATS[signed].mantissa_bits
    values = x if signed else x * x
    _, scales, back = roundtrip(values, 32, right, signed)
    exact = x if signed else x.abs()
    got = back if signed else back.sqrt()
    lines_scale = scales.repeat_interleave(32, dim=1)[:, :37] if right else \
        scales.repeat_interleave(32, dim=1)[:, :9].T
    step = torch.maximum(exact.abs() * 2.0**-mb, lines_scale * 2.0 ** (-6 - mb))
    assert ((got - exact).abs() <= step * (1 + 1e-6)).all()
    assert (got - exact).abs().max() > 0  # it is a lossy format: the test can fail


def test_rank_one_is_exact_up_to_fp32_rounding():
    """One element per block: it is the block maximum, coded as max_value·s."""
    gen = torch.Generator().manual_seed(2)
    m_state = torch.randn(50, 1, generator=gen)
    v_state = torch.rand(50, 1, generator=gen) + 1e-3
    _, _, m_back = roundtrip(m_state, 32, True, True)
    _, _, v_back = roundtrip(v_state, 32, True, False)
    torch.testing.assert_close(m_back, m_state, rtol=3e-7, atol=0)
    torch.testing.assert_close(v_back, v_state, rtol=6e-7, atol=0)


@pytest.mark.parametrize("signed", [True, False], ids=["exp_avg", "exp_avg_sq"])
def test_stochastic_rounding_is_unbiased(signed):
    """Values a third and two thirds of the way between grid points, repeated on 4000 lines (each
    its own block and Philox counters): the mean of the decoded values equals x within 4
    standard errors, while nearest rounding would be off by a third of a step (which the same
    check rejects)."""
    fmt = FORMATS[signed]
    mb = fmt.mantissa_bits
    # one block: its max fixes s = 1 (max_value itself), the rest lie between grid points
    grid = torch.tensor([1.0, 3.0, 0.1, 2.0**-8, 2.0**-9 * 0.7, 100.0])
    spacing = torch.where(grid >= 2.0**-6, 2.0 ** (torch.floor(torch.log2(grid)) - mb),
                          torch.full_like(grid, 2.0 ** (-6 - mb)))
    x = torch.cat([torch.tensor([fmt.max_value]), grid + spacing / 3, grid + 2 * spacing / 3])
    seeds = 4000
    values = (x if signed else x * x).expand(seeds, -1).contiguous()
    decoded = roundtrip(values, 64, True, signed, seed=5)[2]
    if not signed:
        decoded = decoded.sqrt()
    mean, std = decoded.mean(0), decoded.std(0)
    error = (mean - x).abs()
    assert (error <= 4 * std / math.sqrt(seeds) + 1e-6 * x).all(), (error, std)
    nearest_bias = torch.cat([torch.zeros(1), spacing / 3, spacing / 3])
    assert (nearest_bias[1:] > 4 * std[1:] / math.sqrt(seeds)).all()


def scalar_encode(y: float, word: int, mantissa_bits: int) -> int:
    """fp8_encode for one fp32 magnitude, written independently with struct and integers."""
    bits = struct.unpack("<I", struct.pack("<f", y))[0]
    exponent = max(((bits >> 23) & 0xFF) - 127, -6)
    z = y * 2.0 ** (mantissa_bits - exponent)  # exact: a power of two times an fp32
    down = math.floor(z)
    u = (word >> 8) * 2.0**-24
    k = down + (1 if u < z - down else 0)
    return (exponent + 6) * 2**mantissa_bits + k


@pytest.mark.parametrize("signed", [True, False], ids=["exp_avg", "exp_avg_sq"])
def test_encoder_matches_an_independent_scalar_encoder(signed):
    fmt = FORMATS[signed]
    gen = torch.Generator().manual_seed(3)
    y = torch.cat([torch.rand(3000, generator=gen) * fmt.max_value,
                   torch.rand(1000, generator=gen) * 2.0**-6,  # subnormal range
                   torch.tensor([0.0, 2.0**-6, fmt.max_value, 2.0**-6 * (1 - 2**-24), 1e-40])])
    words = reference.philox_uint32(9, torch.arange(y.numel()))
    codes = reference.fp8_encode(y, words, fmt)
    expected = [scalar_encode(float(a), int(w), fmt.mantissa_bits)
                for a, w in zip(y.tolist(), words.tolist(), strict=True)]
    assert codes.tolist() == expected
    assert int(codes.max()) <= fmt.max_code
    # decoding is exact and monotone in the code
    values = reference.fp8_decode(torch.arange(fmt.max_code + 1), fmt)
    assert values[0] == 0 and values[-1] == fmt.max_value
    assert (values[1:] > values[:-1]).all()


def test_positive_v_is_never_stored_as_zero():
    """The failure an 8-bit V must not have: V > 0 stored as 0 makes N = M/ε. A block whose
    maximum is 1e12 times its smallest V (√V: 1e6, far below E4M4's 2^-10 subnormal step): with
    the floor every positive V keeps code ≥ 1, so |N| ≤ (M's subnormal step)/(√V's) =
    2·s_M/s_V (2^-9·s_M over 2^-10·s_V) instead of up to 2^-9·s_M/ε."""
    v = torch.tensor([[1.0, 1e-12, 3e-13, 0.0] + [1e-6] * 4])
    m_state = torch.tensor([[1.0, 1e-6, -5e-7, 0.0] + [1e-3] * 4])
    v_codes, v_scales, v_back = roundtrip(v, 32, True, False)
    assert (v_codes[0, :3] > 0).all() and v_codes[0, 3] == 0
    assert (v_back[0, :3] > 0).all() and v_back[0, 3] == 0
    worst = None
    for seed in range(64):  # M's tiny entries round up to its subnormal step in some seeds
        _, m_scales, m_back = roundtrip(m_state, 32, True, True, seed=seed)
        normalized = (m_back / (v_back.sqrt() + 1e-8)).abs().max()  # ε of torch/bnb Adam
        worst = normalized if worst is None else max(worst, normalized)
    bound = 2 * m_scales[0, 0] / v_scales[0, 0]
    assert worst <= bound * (1 + 1e-6)
    unfloored = 2.0**-9 * m_scales[0, 0] / 1e-8  # what a zero code would give: M̃/ε
    assert unfloored > 100 * bound and worst > 1.0  # the case is real; the bound holds


def test_non_finite_block_decodes_to_nan():
    x = torch.tensor([[1.0, float("nan"), 2.0], [1.0, 2.0, 3.0]])
    for signed in (True, False):
        _, _, back = roundtrip(x.abs(), 32, True, signed)
        assert back[0].isnan().all() and back[1].isfinite().all()


@pytest.mark.parametrize("m,n,rank,block", [(30, 20, 7, 4), (20, 30, 9, 32), (24, 24, 24, 16)],
                         ids=["right", "left", "full-rank"])
def test_fused_step_on_8bit_moments(m, n, rank, block):
    """N comes from the dequantized fp32 moments updated in fp32; the stored codes are the
    quantization of the updated moments with the words of rounding_philox_seed(seed, step)."""
    gen = torch.Generator().manual_seed(4)
    right = reference.is_right_side(m, n)
    shape = (m, rank) if right else (rank, n)
    d = n if right else m
    q = torch.linalg.qr(torch.randn(d, rank, generator=gen))[0]
    basis = q.T.contiguous() if right else q.contiguous()
    param, grad = torch.randn(m, n, generator=gen), torch.randn(m, n, generator=gen)
    m_codes, m_scales = reference.quantize_moment(0.1 * torch.randn(shape, generator=gen),
                                                  words_for(shape), block, right, signed=True)
    v_codes, v_scales = reference.quantize_moment(0.1 * torch.rand(shape, generator=gen),
                                                  words_for(shape, second=True), block, right,
                                                  signed=False)
    hyper = {"lr": 0.01, "beta1": 0.9, "beta2": 0.999, "eps": 1e-6, "weight_decay": 0.1,
             "scale": 0.25, "step": 5}
    m32 = reference.dequantize_moment(m_codes, m_scales, block, right, signed=True)
    v32 = reference.dequantize_moment(v_codes, v_scales, block, right, signed=False)
    expected = param.clone()
    reference.fused_galore_step(expected, grad, basis, m32, v32, **hyper)
    reference.fused_galore_step(param, grad, basis, m_codes, v_codes, **hyper, seed=11,
                                exp_avg_scales=m_scales, exp_avg_sq_scales=v_scales,
                                state_block_size=block)
    assert torch.equal(param, expected)
    key = reference.rounding_philox_seed(11, 5)
    index = torch.arange(m32.numel()).view(shape) + reference.MOMENT_STREAM
    words_m, words_v = reference.philox_uint32x2(key, index)
    for codes, scales, value, words, signed in ((m_codes, m_scales, m32, words_m, True),
                                                (v_codes, v_scales, v32, words_v, False)):
        want_codes, want_scales = reference.quantize_moment(value, words, block, right,
                                                            signed=signed)
        assert torch.equal(codes, want_codes) and torch.equal(scales, want_scales)
