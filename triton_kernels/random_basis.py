"""random_basis in Triton: APOLLO's Gaussian basis (DESIGN.md §4.7), the kernel of
``torch.ops.lowrank.random_basis`` on CUDA devices.

What it computes (lowrank_kernels.reference.random_basis, csrc/include/lowrank/gaussian.h):
rank×d fp32 rows of N(0, 1/rank) values. Element (k, i) belongs to the Philox-4x32-10 call under
key seed + 2**32·refresh at counter (k·⌈d/4⌉ + ⌊i/4⌋, 2, 0, 0) (``tl.randint4x`` with a 64-bit
offset whose high word is 2); lanes 0, 1 are ρ·cos θ and ρ·sin θ of Box-Muller on the words
(w0, w1), lanes 2, 3 those of (w2, w3): u = (⌊w_r/2⁸⌋ + 1)·2⁻²⁴, θ = 2π·⌊w_θ/2⁸⌋·2⁻²⁴,
ρ = √(−2·ln u) with Cephes' logf, cos/sin by integer quadrant/octant folding and Cephes' octant
polynomials (_common._cos_sin_octant); then divided by √rank. Only IEEE-exact operations, compiled
with enable_fp_fusion=False, tl.div_rn and tl.sqrt_rn: the same bits as the C++ kernel and the
reference (tests/test_random_basis.py).

Tiling: one program per BLOCK_RANK × BLOCK_CALLS tile of (row, Philox call); each call yields the
four consecutive elements 4c…4c+3 of its row, stored with four strided stores (the last call of a
row masks the lanes past d). DRAM: the output only, 4·rank·d bytes, written once; no input.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
import triton
import triton.language as tl

from lowrank_kernels import _checks
from lowrank_kernels.reference import BASIS_STREAM, rounding_philox_seed

from ._common import _cos_sin_octant

_STREAM = tl.constexpr(BASIS_STREAM)
_OCTANT_STEP = tl.constexpr(math.pi / 2 / 2**22)  # θ of one unit of the 24-bit angle, rounded once
BLOCK_RANK, BLOCK_CALLS, NUM_WARPS = 8, 128, 4  # 1024 Philox calls (4096 elements) per program


@triton.jit
def _log_of_units(k, exponent):
    """ln(k·2^exponent) in fp32 for integer tensors 1 ≤ k ≤ 2^24 (reference.log_of_units)."""
    bits = k.to(tl.float32).to(tl.uint32, bitcast=True)
    e = ((bits >> 23) & 0xFF).to(tl.int32) - 126
    f = ((bits & 0x807FFFFF) | 0x3F000000).to(tl.float32, bitcast=True)
    small = f < 0.70710678118654752440
    e = tl.where(small, e - 1, e)
    x = tl.where(small, (f + f) - 1.0, f - 1.0)
    z = x * x
    y = x * 7.0376836292e-2 - 1.1514610310e-1
    y = y * x + 1.1676998740e-1
    y = y * x - 1.2420140846e-1
    y = y * x + 1.4249322787e-1
    y = y * x - 1.6668057665e-1
    y = y * x + 2.0000714765e-1
    y = y * x - 2.4999993993e-1
    y = y * x + 3.3333331174e-1
    y = (y * x) * z
    big_e = (e + exponent).to(tl.float32)
    y = y + (-2.12194440e-4) * big_e
    y = y + (-0.5) * z
    x = x + y
    return x + 0.693359375 * big_e


@triton.jit
def _cos_sin_turn(t):
    """(cos θ, sin θ) of θ = 2π·t/2^24 for integer tensors 0 ≤ t < 2^24 (reference.cos_sin_turn)."""
    quadrant = t >> 22
    rem = t & ((1 << 22) - 1)
    upper = 2 * rem > (1 << 22)
    folded = tl.where(upper, (1 << 22) - rem, rem)
    cos_oct, sin_oct = _cos_sin_octant(folded.to(tl.float32) * _OCTANT_STEP)
    cos_phi = tl.where(upper, sin_oct, cos_oct)
    sin_phi = tl.where(upper, cos_oct, sin_oct)
    cos_t = tl.where(quadrant == 0, cos_phi, tl.where(quadrant == 1, -sin_phi,
                                                      tl.where(quadrant == 2, -cos_phi, sin_phi)))
    sin_t = tl.where(quadrant == 0, sin_phi, tl.where(quadrant == 1, cos_phi,
                                                      tl.where(quadrant == 2, -sin_phi, -cos_phi)))
    return cos_t, sin_t


@triton.jit
def _gaussian_pair(radius_word, angle_word):
    """Box-Muller on two uint32 words (reference.gaussian_pair): (ρ·cos θ, ρ·sin θ)."""
    log_u = _log_of_units(((radius_word >> 8) + 1).to(tl.int32), -24)
    radius = tl.sqrt_rn(-2.0 * log_u)
    cos_t, sin_t = _cos_sin_turn((angle_word >> 8).to(tl.int32))
    return radius * cos_t, radius * sin_t


@triton.jit
def _random_basis_kernel(Out_ptr, D, RANK, philox_seed, root_rank,
                         BLOCK_RANK: tl.constexpr, BLOCK_CALLS: tl.constexpr):
    """One BLOCK_RANK × BLOCK_CALLS tile of (row, Philox call): four elements per call."""
    calls = (D + 3) // 4
    num_call_tiles = tl.cdiv(calls, BLOCK_CALLS)
    pid = tl.program_id(0)
    rows = (pid // num_call_tiles) * BLOCK_RANK + tl.arange(0, BLOCK_RANK)
    call = (pid % num_call_tiles) * BLOCK_CALLS + tl.arange(0, BLOCK_CALLS)
    rows64 = rows.to(tl.int64)
    counter = rows64[:, None] * calls + call[None, :] + _STREAM
    w0, w1, w2, w3 = tl.randint4x(philox_seed, counter)
    lane0, lane1 = _gaussian_pair(w0, w1)
    lane2, lane3 = _gaussian_pair(w2, w3)
    row_ok = (rows < RANK)[:, None]
    base = Out_ptr + rows64[:, None] * D + 4 * call[None, :]
    first = 4 * call[None, :]
    tl.store(base, tl.div_rn(lane0, root_rank), mask=row_ok & (first < D))
    tl.store(base + 1, tl.div_rn(lane1, root_rank), mask=row_ok & (first + 1 < D))
    tl.store(base + 2, tl.div_rn(lane2, root_rank), mask=row_ok & (first + 2 < D))
    tl.store(base + 3, tl.div_rn(lane3, root_rank), mask=row_ok & (first + 3 < D))


def random_basis(d: int, rank: int, seed: int, refresh: int, *,
                 device: torch.device | None = None) -> torch.Tensor:
    """The rank×d fp32 basis on ``device`` (CUDA, or CPU under TRITON_INTERPRET=1; None: the
    current CUDA device, or the CPU when interpreted), with the op's schema signature:
    validates, allocates, launches."""
    _checks.check_random_basis(d, rank, seed, refresh)
    interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if device is None:  # the op's default device is the CPU, which only the interpreter serves
        device = "cpu" if interpreted else "cuda"
    device = torch.device(device)
    if device.type != "cuda" and not interpreted:
        raise ValueError(f"device: the Triton kernel needs a CUDA device (or TRITON_INTERPRET=1), "
                         f"got {device}")
    out = torch.empty((rank, d), dtype=torch.float32, device=device)
    root_rank = float(np.float32(math.sqrt(rank)))  # √r correctly rounded to fp32 (r < 2^24 exact)
    grid = (triton.cdiv(rank, BLOCK_RANK) * triton.cdiv((d + 3) // 4, BLOCK_CALLS),)
    _random_basis_kernel[grid](out, d, rank, rounding_philox_seed(seed, refresh), root_rank,
                               BLOCK_RANK=BLOCK_RANK, BLOCK_CALLS=BLOCK_CALLS,
                               num_warps=NUM_WARPS, enable_fp_fusion=False)
    return out


def aot_variants():
    """The one launch configuration, for triton_kernels/aot.py --kernels full_rank."""
    signature = {"Out_ptr": "*fp32", "D": "i32", "RANK": "i32", "philox_seed": "i64",
                 "root_rank": "fp32"}
    constexprs = {"BLOCK_RANK": BLOCK_RANK, "BLOCK_CALLS": BLOCK_CALLS}
    yield ({"kernel": "random_basis"}, signature, constexprs, NUM_WARPS, 1,
           {"enable_fp_fusion": False})


AOT_KERNELS = {"random_basis": "_random_basis_kernel"}
