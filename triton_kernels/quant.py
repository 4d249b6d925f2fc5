"""Triton kernels of the Q-GaLore formats (DESIGN.md §4.3-§4.4).

    philox_uniform   u[i] = tl.rand(seed, offsets[i])           (the stochastic-rounding stream)
    quantize_int4/8  per group: s, z from min/max; codes nearest or stochastic (INT4 packed)
    dequantize_*     x~ = s (q - z)

The @triton.jit helpers `group_quant_params`, `stochastic_round_codes` and `dequantize_codes`
are the Triton form of csrc/include/lowrank/quant.h, for fused kernels to reuse (same fp32
operations, IEEE divisions, exact round-half-even), so that every backend writes the same codes.

Tiling: philox and dequantize: one program per BLOCK consecutive elements; quantize: one program
per group (see the section below). DRAM traffic: each input once, each output once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowrank_kernels import _checks

PHILOX_BLOCK = 1024
# The interpreter pays per program, not per element: it runs CPU tensors in far fewer programs.
INTERPRETER_BLOCK = 65536


@triton.jit
def _philox_uniform_kernel(out_ptr, offsets_ptr, seed, numel, BLOCK: tl.constexpr):
    """out[i] = tl.rand(seed, offsets[i]) for i in this program's BLOCK."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < numel
    offsets = tl.load(offsets_ptr + idx, mask=mask, other=0)
    tl.store(out_ptr + idx, tl.rand(seed, offsets), mask=mask)


def philox_uniform(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """Launcher of :func:`_philox_uniform_kernel`; the launchers below validate their arguments
    (lowrank_kernels._checks) and take the ops' schema signatures."""
    _checks.check_philox_uniform(seed, offsets)
    offsets = offsets.contiguous()
    out = torch.empty(offsets.shape, dtype=torch.float32, device=offsets.device)
    numel = offsets.numel()
    if numel:
        block = PHILOX_BLOCK if offsets.is_cuda else INTERPRETER_BLOCK
        grid = (triton.cdiv(numel, block),)
        _philox_uniform_kernel[grid](out, offsets, seed, numel, BLOCK=block)
    return out


# ---- quantize / dequantize ---------------------------------------------------------------------
# quantize:   one program per group: min/max, s, z, codes (nearest, or stochastic with
#             u = tl.rand(seed, row-major index)); INT4 codes packed in pairs. DRAM: x once, codes
#             once, s and z once.
# dequantize: one program per BLOCK elements: codes (and their group's s, z) once, output once.
@triton.jit
def _round_half_even(y):
    """torch.round in fp32 without libdevice (unsupported by the interpreter): adding and removing
    1.5·2^23 rounds to an integer under round-to-nearest-even, exactly; floats at or above 2^23
    already are integers."""
    rounded = (y + 12582912.0) - 12582912.0
    return tl.where(tl.abs(y) < 8388608.0, rounded, y)


@triton.jit
def group_quant_params(lo, hi, MAX_CODE: tl.constexpr):
    """(s, z) of a group spanning [lo, hi] (lowrank/quant.h). IEEE divisions (tl.div_rn): `/`
    lowers to an approximate division on GPUs, which would give codes that differ from the
    CPU's and the reference's. Shared with the fused Q-GaLore step."""
    scale = tl.div_rn(tl.maximum(hi - lo, 1e-5), MAX_CODE * 1.0)
    zero = tl.minimum(tl.maximum(-_round_half_even(tl.div_rn(lo, scale)), 0.0), MAX_CODE)
    return scale, zero


@triton.jit
def stochastic_round_codes(x, scale, zero, philox_seed, offsets, MAX_CODE: tl.constexpr):
    """clamp(⌊x/s⌋ + [u < frac(x/s)] + z, 0, MAX_CODE) as uint8, u = tl.rand(philox_seed,
    offsets); philox_seed = seed + 2**32·step and offsets = row-major indices (DESIGN.md §4.4).
    Shared with the fused Q-GaLore step."""
    y = tl.div_rn(x, scale)
    down = tl.floor(y)
    rounded = down + tl.where(tl.rand(philox_seed, offsets) < y - down, 1.0, 0.0)
    return tl.minimum(tl.maximum(rounded + zero, 0.0), MAX_CODE).to(tl.uint8)


@triton.jit
def dequantize_codes(q, scale, zero):
    """s·(q − z) in fp32."""
    return scale * (q.to(tl.float32) - zero)


@triton.jit
def _quantize_kernel(x_ptr, codes_ptr, scales_ptr, zeros_ptr, numel, seed, GROUP: tl.constexpr,
                     BLOCK_G: tl.constexpr, MAX_CODE: tl.constexpr, STOCHASTIC: tl.constexpr,
                     PACK_INT4: tl.constexpr):
    """Group g = program_id: s = max(max−min, 1e-5)/MAX_CODE, z = clamp(−round(min/s)),
    q = clamp(round(x/s) + z) or clamp(⌊x/s⌋ + [u < frac] + z) (DESIGN.md §4.3-§4.4)."""
    group = tl.program_id(0).to(tl.int64)
    lane = tl.arange(0, BLOCK_G)
    offs = group * GROUP + lane
    mask = (lane < GROUP) & (offs < numel)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    lo = tl.min(tl.where(mask, x, float("inf")), axis=0)
    hi = tl.max(tl.where(mask, x, float("-inf")), axis=0)
    scale, zero = group_quant_params(lo, hi, MAX_CODE)
    if STOCHASTIC:
        codes = stochastic_round_codes(x, scale, zero, seed, offs, MAX_CODE)
    else:
        rounded = _round_half_even(tl.div_rn(x, scale))
        codes = tl.minimum(tl.maximum(rounded + zero, 0.0), MAX_CODE).to(tl.uint8)
    codes = tl.where(mask, codes, 0)
    tl.store(scales_ptr + group, scale)
    tl.store(zeros_ptr + group, zero)
    if PACK_INT4:  # GROUP is even: a group's pairs are whole bytes
        low, high = tl.split(tl.reshape(codes, (BLOCK_G // 2, 2)))
        pair = tl.arange(0, BLOCK_G // 2)
        byte_offs = group * (GROUP // 2) + pair
        tl.store(codes_ptr + byte_offs, low | (high << 4),
                 mask=(2 * pair < GROUP) & (group * GROUP + 2 * pair < numel))
    else:
        tl.store(codes_ptr + offs, codes, mask=mask)


@triton.jit
def _dequantize_kernel(codes_ptr, scales_ptr, zeros_ptr, out_ptr, numel, GROUP: tl.constexpr,
                       PACKED_INT4: tl.constexpr, BLOCK: tl.constexpr):
    """out[i] = s[g]·(q[i] − z[g]), g = i // GROUP, q unpacked low nibble first."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    if PACKED_INT4:
        byte = tl.load(codes_ptr + offs // 2, mask=mask, other=0)
        q = (byte >> ((offs % 2) * 4).to(tl.uint8)) & 0x0F
    else:
        q = tl.load(codes_ptr + offs, mask=mask, other=0)
    group = offs // GROUP
    scale = tl.load(scales_ptr + group, mask=mask, other=0.0)
    zero = tl.load(zeros_ptr + group, mask=mask, other=0.0)
    tl.store(out_ptr + offs, dequantize_codes(q, scale, zero), mask=mask)


DEQUANT_BLOCK = 1024


def _quantize(x: torch.Tensor, group_size: int, max_code: int, stochastic: bool, seed: int,
              pack_int4: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    src = x.contiguous().view(-1)
    numel = src.numel()
    groups = triton.cdiv(numel, group_size)
    if pack_int4:
        codes = torch.empty((numel + 1) // 2, dtype=torch.uint8, device=x.device)
    else:
        codes = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    scales = torch.empty(groups, dtype=torch.float32, device=x.device)
    zeros = torch.empty(groups, dtype=torch.float32, device=x.device)
    _quantize_kernel[(groups,)](src, codes, scales, zeros, numel, seed, GROUP=group_size,
                                BLOCK_G=max(2, triton.next_power_of_2(group_size)),
                                MAX_CODE=max_code, STOCHASTIC=stochastic, PACK_INT4=pack_int4)
    return codes, scales, zeros


def quantize_int4(x: torch.Tensor, group_size: int = 256):
    """Packed INT4 codes, scales, zeros."""
    _checks.check_quantize_int4(x, group_size)
    return _quantize(x, group_size, 15, False, 0, pack_int4=True)


def quantize_int8(x: torch.Tensor, group_size: int = 256, stochastic: bool = False,
                  seed: int = 0):
    """INT8 codes, scales, zeros; stochastic rounding draws tl.rand(seed, row-major index)."""
    _checks.check_quantize_int8(x, group_size, stochastic, seed)
    return _quantize(x, group_size, 255, stochastic, seed, pack_int4=False)


def _dequantize(codes, scales, zeros, shape, group_size, packed_int4):
    out = torch.empty(shape, dtype=torch.float32, device=codes.device)
    numel = out.numel()
    _dequantize_kernel[(triton.cdiv(numel, DEQUANT_BLOCK),)](
        codes.contiguous(), scales.contiguous(), zeros.contiguous(), out, numel, GROUP=group_size,
        PACKED_INT4=packed_int4, BLOCK=DEQUANT_BLOCK)
    return out


def dequantize_int4(packed, scales, zeros, shape, group_size: int = 256):
    _checks.check_dequantize_int4(packed, scales, zeros, shape, group_size)
    return _dequantize(packed, scales, zeros, list(shape), group_size, packed_int4=True)


def dequantize_int8(codes, scales, zeros, group_size: int = 256):
    _checks.check_dequantize_int8(codes, scales, zeros, group_size)
    return _dequantize(codes, scales, zeros, list(codes.shape), group_size, packed_int4=False)
