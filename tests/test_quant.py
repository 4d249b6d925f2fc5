"""Q-GaLore formats (DESIGN.md §4.3-§4.4): Philox uniforms, INT4/INT8 quantizers, stochastic
rounding, against the reference, Triton's tl.rand and q-galore-torch's quantizer."""

import math
import os
import subprocess
import sys

import pytest
import torch

import lowrank_kernels as lk
from lowrank_kernels import reference

pytestmark = pytest.mark.skipif(not lk.EXTENSION_AVAILABLE, reason="extension not built")

# Seeds covering both key words: the stream of step 0, a step's stream (seed + 2^32·step), and
# a seed with the top bits set.
PHILOX_SEEDS = [0, 1, 0xDEADBEEF, 0xFFFFFFFF + (7 << 32), 2**62 + 11]
# (shape, group size): groups straddling rows, a partial last group, a single partial group.
QUANT_CASES = [((67, 131), 256), ((131, 67), 64), ((3, 1001), 256), ((5,), 256), ((4, 512), 256)]


def straddling_zero(shape, seed=0):
    """Normal data (every group of any size ≥ 2 here contains both signs, checked by callers)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def group_rows(x: torch.Tensor, group_size: int) -> list[torch.Tensor]:
    flat = x.reshape(-1)
    return [flat[i:i + group_size] for i in range(0, flat.numel(), group_size)]


# ---- Philox ---------------------------------------------------------------------------------
@pytest.mark.parametrize("offset_dtype", [torch.int64, torch.int32], ids=str)
def test_philox_cpu_equals_triton_tl_rand_bit_for_bit(offset_dtype):
    """10^6 offsets (past 2^32 for int64, wrapping negative for int32), several seeds."""
    triton_quant = pytest.importorskip("lowrank_kernels.triton_kernels.quant")
    count = 10**6
    stride = 7919 if offset_dtype == torch.int64 else 4099
    offsets = (torch.arange(count, dtype=torch.int64) * stride + (2**32 - 3)).to(offset_dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for seed in PHILOX_SEEDS:
        ours = torch.ops.lowrank.philox_uniform(seed, offsets)
        theirs = triton_quant.philox_uniform(seed, offsets.to(device)).cpu()
        assert torch.equal(ours, theirs), f"seed {seed}: C++ Philox differs from tl.rand"
        if torch.cuda.is_available() and lk._dispatch.CUDA_CXX_AVAILABLE:
            assert torch.equal(torch.ops.lowrank_cuda.philox_uniform(seed, offsets.cuda()).cpu(),
                               ours)


@pytest.mark.parametrize("seed", PHILOX_SEEDS)
def test_philox_reference_equals_cpu(seed):
    offsets = torch.randint(0, 2**40, (20000,), generator=torch.Generator().manual_seed(seed % 97))
    torch.testing.assert_close(reference.philox_uniform(seed, offsets),
                               torch.ops.lowrank.philox_uniform(seed, offsets), rtol=0, atol=0)


def test_philox_is_uniform_on_unit_interval():
    u = torch.ops.lowrank.philox_uniform(12345, torch.arange(10**6))
    assert 0.0 <= u.min().item() and u.max().item() < 1.0
    # mean 1/2 and variance 1/12 of U(0, 1), to 5 standard errors
    assert abs(u.double().mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / u.numel())
    assert abs(u.double().var().item() - 1 / 12) < 5 * math.sqrt(1 / 180 / u.numel())
    counts = torch.histc(u, bins=16, min=0.0, max=1.0)
    expected = u.numel() / 16
    assert ((counts - expected).abs() < 5 * math.sqrt(expected)).all()


# ---- quantizers against the reference (bit for bit: same fp32 formulas) ---------------------
@pytest.mark.parametrize("shape,group_size", QUANT_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_quantize_int4_matches_reference(shape, group_size, dtype):
    x = straddling_zero(shape).to(dtype)
    x.view(-1)[:group_size].add_(3.0)  # one saturating group (all positive), as in the spec
    got = torch.ops.lowrank.quantize_int4(x, group_size)
    want = reference.quantize_int4(x, group_size)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    back = torch.ops.lowrank.dequantize_int4(*got, list(shape), group_size)
    assert torch.equal(back, reference.dequantize_int4(*want, list(shape), group_size))


@pytest.mark.parametrize("shape,group_size", QUANT_CASES, ids=str)
@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
def test_quantize_int8_matches_reference(shape, group_size, stochastic):
    x = straddling_zero(shape, seed=1)
    got = torch.ops.lowrank.quantize_int8(x, group_size, stochastic, 77)
    want = reference.quantize_int8(x, group_size, stochastic, 77)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    back = torch.ops.lowrank.dequantize_int8(*got, group_size)
    assert torch.equal(back, reference.dequantize_int8(*want, group_size))


def test_stochastic_codes_are_floor_or_ceil_and_depend_on_seed():
    x = straddling_zero((40, 256), seed=2)
    nearest, scales, zeros = torch.ops.lowrank.quantize_int8(x, 256)
    a, s_a, z_a = torch.ops.lowrank.quantize_int8(x, 256, True, 1)
    b, _, _ = torch.ops.lowrank.quantize_int8(x, 256, True, 2)
    assert torch.equal(s_a, scales) and torch.equal(z_a, zeros)
    y = x / scales.view(-1, 1) + zeros.view(-1, 1)
    assert ((a.float() == y.floor()) | (a.float() == y.ceil())).all()
    assert not torch.equal(a, b)
    assert not torch.equal(a, nearest)


@pytest.mark.parametrize("shape,group_size", QUANT_CASES, ids=str)
def test_int4_round_trip_within_half_a_step(shape, group_size):
    x = straddling_zero(shape, seed=3)
    assert all(g.min() < 0 < g.max() for g in group_rows(x, group_size)), "precondition"
    packed, scales, zeros = torch.ops.lowrank.quantize_int4(x, group_size)
    back = torch.ops.lowrank.dequantize_int4(packed, scales, zeros, list(shape), group_size)
    step = scales.repeat_interleave(group_size)[:x.numel()].view(shape)
    # half a step, plus the fp32 rounding of x/s and s·(q − z)
    assert ((back - x).abs() <= 0.5 * step * (1 + 1e-5) + 1e-7).all()


def test_int4_packing_low_nibble_first():
    x = torch.tensor([-1.0, 1.0, 0.0, 0.5, -0.5])  # one group: s = 2/15, z = 8 (round(7.5))
    packed, scales, zeros = torch.ops.lowrank.quantize_int4(x, 256)
    codes = torch.clamp(torch.round(x / scales) + zeros, 0, 15).to(torch.uint8)
    assert packed.shape == (3,)
    assert packed.tolist() == [int(codes[0]) | int(codes[1]) << 4,
                               int(codes[2]) | int(codes[3]) << 4, int(codes[4])]


# ---- the reference against q-galore-torch's quantizer ---------------------------------------
@pytest.fixture(scope="module")
def qgalore():
    return pytest.importorskip("q_galore_torch")


@pytest.mark.parametrize("n_bit", [4, 8])
def test_reference_quantizer_matches_q_galore_torch(qgalore, n_bit):
    """Same codes, scales and zeros as q-galore-torch's projector / weight quantizers (they
    require numel divisible by the group size and store unpacked codes)."""
    from q_galore_torch.q_galore_projector import GaLoreProjector

    x = straddling_zero((96, 160), seed=4)
    x.view(-1)[:256].add_(2.0)  # a saturating group
    if n_bit == 4:
        theirs_q, theirs_s, theirs_z, _ = GaLoreProjector(4)._quantize(x, 256, 4)
        packed, scales, zeros = reference.quantize_int4(x, 256)
        codes = reference.unpack_int4(packed, x.numel())
    else:
        theirs_q, theirs_s, theirs_z = qgalore.QGaLoreAdamW8bit._quantize(None, x, 256, 8)
        codes, scales, zeros = reference.quantize_int8(x, 256)
    assert torch.equal(codes.view(-1), theirs_q.view(-1))
    assert torch.equal(scales, theirs_s.view(-1))
    assert torch.equal(zeros, theirs_z.view(-1))
    if n_bit == 8:
        theirs_back = qgalore.QGaLoreAdamW8bit._dequantize(None, theirs_q, torch.float32, 256,
                                                            theirs_s, theirs_z)
        assert torch.equal(reference.dequantize_int8(codes, scales, zeros, 256), theirs_back)


def test_reference_stochastic_rounding_matches_q_galore_torch_rule(qgalore):
    """q-galore-torch's SR with its u replaced by ours gives our codes (same rule, same order)."""
    x = straddling_zero((8, 256), seed=5)
    codes, scales, _ = reference.quantize_int8(x, 256, stochastic=True, seed=9)
    u = reference.philox_uniform(9, torch.arange(x.numel())).view(8, 256)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "rand_like", lambda t: u.to(t.dtype))
        theirs, s, _ = qgalore.QGaLoreAdamW8bit._quantize_stochastic_round(None, x, 256, 8)
    assert torch.equal(theirs, codes) and torch.equal(s.view(-1), scales)


# ---- stochastic rounding: unbiased in fp32, biased in q-galore-torch's bf16 path -------------
TRIALS = 10**5
DELTA = 0.1  # of a quantization step


def shifted_group(trials: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """`trials` copies of one 256-element group on the INT8 grid (s = 2^-10, z = 128), its
    interior moved by DELTA of a step while min and max stay, so that s and z are unchanged.
    Returns (values, grid values, step)."""
    step = 2.0**-10
    levels = torch.arange(256, dtype=torch.float32)  # codes 0..255, min and max included
    grid = step * (levels - 128)
    shifted = grid.clone()
    shifted[1:-1] += DELTA * step
    return shifted.repeat(trials, 1), grid.repeat(trials, 1), step


def interior_mean_shift(back: torch.Tensor, grid: torch.Tensor, step: float) -> float:
    return ((back[:, 1:-1].double() - grid[:, 1:-1].double()) / step).mean().item()


def test_stochastic_rounding_is_unbiased_for_tenth_of_a_step_updates():
    """Adding 0.1 of a step to one group 10^5 times moves its dequantized mean by 0.1 ± 3σ."""
    values, grid, step = shifted_group(TRIALS)
    codes, scales, zeros = torch.ops.lowrank.quantize_int8(values, 256, True, 2024)
    assert torch.all(scales == step) and torch.all(zeros == 128), "grid moved: test is vacuous"
    # with s and z unchanged, (x~ − grid)/s is the code minus the grid's code (0..255)
    moved = codes[:, 1:-1].sum(dtype=torch.int64).item() - TRIALS * sum(range(1, 255))
    shift = moved / (TRIALS * 254)
    # exact expectation from the fp32 inputs (0.1 up to their rounding), Bernoulli spread
    frac = values[0, 1:-1].double() / step - grid[0, 1:-1].double() / step
    expected = frac.mean().item()
    sigma = math.sqrt((frac * (1 - frac)).mean().item() / (TRIALS * 254))
    assert abs(expected - DELTA) < 1e-5
    assert abs(shift - expected) < 3 * sigma, f"mean moved by {shift:.5f}, expected {expected:.5f}"


def test_q_galore_torch_bf16_stochastic_rounding_is_biased(qgalore):
    """q-galore-torch rounds in bf16 (its weights' dtype): the same 0.1-step update moves the
    mean by far less than 0.1 — small updates are lost. In fp32 its rule is unbiased."""
    trials = 4000
    values, grid, step = shifted_group(trials)
    sigma = math.sqrt(DELTA * (1 - DELTA) / (trials * 254))

    def their_shift(dtype):
        q, s, z = qgalore.QGaLoreAdamW8bit._quantize_stochastic_round(None, values.to(dtype),
                                                                      256, 8)
        back = qgalore.QGaLoreAdamW8bit._dequantize(None, q, torch.float32, 256, s.float(),
                                                    z.float())
        return interior_mean_shift(back, grid, step)

    torch.manual_seed(0)
    bf16_shift, fp32_shift = their_shift(torch.bfloat16), their_shift(torch.float32)
    assert abs(fp32_shift - DELTA) < 4 * sigma
    assert DELTA - bf16_shift > 20 * sigma, f"bf16 mean moved by {bf16_shift:.4f}"


# ---- opcheck (registration, fake kernels, schemas); the maths is checked above --------------
def test_opcheck_quant_ops():
    x = straddling_zero((9, 70))
    packed, s4, z4 = torch.ops.lowrank.quantize_int4(x, 64)
    codes, s8, z8 = torch.ops.lowrank.quantize_int8(x, 64, True, 3)
    cases = [
        (torch.ops.lowrank.philox_uniform.default, (5, torch.arange(100))),
        (torch.ops.lowrank.quantize_int4.default, (x, 64)),
        (torch.ops.lowrank.dequantize_int4.default, (packed, s4, z4, [9, 70], 64)),
        (torch.ops.lowrank.quantize_int8.default, (x, 64, True, 3)),
        (torch.ops.lowrank.dequantize_int8.default, (codes, s8, z8, 64)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


# ---- bad input: clear errors naming the argument ---------------------------------------------
def _bad_quant_calls():
    x = straddling_zero((4, 100))
    packed, s4, z4 = reference.quantize_int4(x, 64)
    codes, s8, z8 = reference.quantize_int8(x, 64)
    return [
        ("group_size", lambda b: lk.ops.quantize_int4(x, 63, backend=b)),
        ("group_size", lambda b: lk.ops.quantize_int8(x, 0, backend=b)),
        ("seed", lambda b: lk.ops.quantize_int8(x, 64, True, 2**32, backend=b)),
        ("seed", lambda b: lk.ops.quantize_int8(x, 64, True, -1, backend=b)),
        ("seed", lambda b: lk.ops.philox_uniform(-5, torch.arange(3), backend=b)),
        ("offsets", lambda b: lk.ops.philox_uniform(5, torch.arange(3.0), backend=b)),
        ("x", lambda b: lk.ops.quantize_int8(codes, 64, backend=b)),
        ("codes", lambda b: lk.ops.dequantize_int8(codes.to(torch.int8), s8, z8, 64,
                                                   backend=b)),
        ("scales", lambda b: lk.ops.dequantize_int8(codes, s8[:-1], z8, 64, backend=b)),
        ("zeros", lambda b: lk.ops.dequantize_int8(codes, s8, z8.double(), 64, backend=b)),
        ("scales", lambda b: lk.ops.dequantize_int8(codes, s8, z8, 32, backend=b)),
        ("packed", lambda b: lk.ops.dequantize_int4(codes.view(-1), s4, z4, [4, 100], 64,
                                                    backend=b)),
        ("packed", lambda b: lk.ops.dequantize_int4(packed.view(torch.int8), s4, z4, [4, 100],
                                                    64, backend=b)),
        ("group_size", lambda b: lk.ops.dequantize_int4(packed, s4, z4, [4, 100], 5, backend=b)),
    ]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_bad_quant_input_raises_naming_the_argument(backend):
    for name, call in _bad_quant_calls():
        with pytest.raises(ValueError, match=name):
            call(backend)


# ---- Triton kernels: interpreter against the reference, AOT compile for sm_89 / sm_90 ---------
@pytest.mark.parametrize("shape,group_size", QUANT_CASES, ids=str)
def test_triton_quantizers_match_reference_bit_for_bit(shape, group_size):
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = straddling_zero(shape, seed=6)
    cases = [("quantize_int4", (group_size,)), ("quantize_int8", (group_size,)),
             ("quantize_int8", (group_size, True, 123))]
    for name, args in cases:
        got = getattr(lk.ops, name)(x.to(device), *args, backend="triton")
        want = getattr(reference, name)(x, *args)
        for a, b in zip(got, want):
            assert torch.equal(a.cpu(), b), name
    packed = [t.to(device) for t in reference.quantize_int4(x, group_size)]
    assert torch.equal(lk.ops.dequantize_int4(*packed, list(shape), group_size,
                                              backend="triton").cpu(),
                       reference.dequantize_int4(*[t.cpu() for t in packed], list(shape),
                                                 group_size))
    codes = [t.to(device) for t in reference.quantize_int8(x, group_size)]
    assert torch.equal(lk.ops.dequantize_int8(*codes, group_size, backend="triton").cpu(),
                       reference.dequantize_int8(*[t.cpu() for t in codes], group_size))


def _aot_configurations():
    """Every configuration the launchers in triton_kernels/quant.py and int8_matmul.py use on
    GPUs: (kernel, signature, constexprs)."""
    quant = pytest.importorskip("lowrank_kernels.triton_kernels.quant")
    matmul = pytest.importorskip("lowrank_kernels.triton_kernels.int8_matmul")
    ptr = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}
    configs = []
    for dtype, max_code, stochastic, pack in [(torch.float32, 15, False, True),
                                              (torch.bfloat16, 255, True, False),
                                              (torch.float32, 255, False, False)]:
        configs.append((quant._quantize_kernel,
                        {"x_ptr": ptr[dtype], "codes_ptr": "*u8", "scales_ptr": "*fp32",
                         "zeros_ptr": "*fp32", "numel": "i64", "seed": "i64"},
                        {"GROUP": 256, "BLOCK_G": 256, "MAX_CODE": max_code,
                         "STOCHASTIC": stochastic, "PACK_INT4": pack}))
    for packed in (True, False):
        configs.append((quant._dequantize_kernel,
                        {"codes_ptr": "*u8", "scales_ptr": "*fp32", "zeros_ptr": "*fp32",
                         "out_ptr": "*fp32", "numel": "i64"},
                        {"GROUP": 256, "PACKED_INT4": packed, "BLOCK": quant.DEQUANT_BLOCK}))
    configs.append((quant._philox_uniform_kernel,
                    {"out_ptr": "*fp32", "offsets_ptr": "*i64", "seed": "i64", "numel": "i64"},
                    {"BLOCK": quant.PHILOX_BLOCK}))
    block_m, block_n, block_k = matmul._blocks(torch.device("cuda"))
    for dtype in (torch.bfloat16, torch.float32):
        for transposed in (True, False):
            configs.append((matmul._int8_matmul_kernel,
                            {"a_ptr": ptr[dtype], "codes_ptr": "*u8", "scales_ptr": "*fp32",
                             "zeros_ptr": "*fp32", "bias_ptr": ptr[dtype], "out_ptr": ptr[dtype],
                             "M": "i32", "N": "i32", "K": "i32", "W_COLS": "i32"},
                            {"GROUP": 256, "TRANSPOSED_W": transposed, "HAS_BIAS": transposed,
                             "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k}))
    return configs


def compile_ahead_of_time(capability: int) -> None:
    """Compiles every configuration for sm_<capability>; run without TRITON_INTERPRET (the
    interpreter replaces @triton.jit functions by objects the compiler cannot take)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for kernel, signature, constexprs in _aot_configurations():
        signature = {**signature, **dict.fromkeys(constexprs, "constexpr")}
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature,
                                            constexprs=constexprs),
                                  target=GPUTarget("cuda", capability, 32))
        assert compiled.asm["cubin"], kernel.__name__
        if kernel.__name__ == "_quantize_kernel":  # IEEE division, as on the CPU
            assert "div.full" not in compiled.asm["ptx"] and "div.rn.f32" in compiled.asm["ptx"]


def test_triton_kernels_compile_ahead_of_time():
    """The interpreter accepts code the compiler rejects: every GPU configuration of the quant
    and INT8-matmul kernels compiles for sm_89 and sm_90 (in a process without the interpreter)."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    script = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]; import test_quant; "
              "[test_quant.compile_ahead_of_time(c) for c in (89, 90)]")
    result = subprocess.run([sys.executable, "-c", script, tests_dir,
                             os.path.dirname(tests_dir)], check=False, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
