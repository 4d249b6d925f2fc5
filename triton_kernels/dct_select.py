"""Triton dct_select (DESIGN.md §4.5): the DCT-II rows best aligned with G, without the m×n
coefficient matrix.

    lines = rows of G (right, m >= n, d = n)  or  columns of G (left, m < n, d = m)
    X[l, k] = sum_j line_l[j] * C[k, j]                    (C: orthonormal DCT-II, lowrank/dct.h)
    score_k = sum_l |X[l, k]|  (norm=1)  or  sum_l X[l, k]^2  (norm=2: the order of the l2 norm)
    idx = the r largest scores, ties to the lower k (reference.top_r_indices), increasing
    R = G Q^T (m×r, right)  or  P^T G (r×n, left), Q = C[idx, :], P = Q^T

One kernel, two uses. Program (i, f) owns BLOCK_LINES lines × BLOCK_FREQ frequencies and forms
that tile of X as a sum over the d axis in BLOCK_J chunks: a (lines × j) tile of G times a
(j × freq) tile of C^T that is generated in registers, never loaded. Scores mode reduces the tile
over its lines and stores one partial row per line tile into a (line tiles × d) fp32 buffer; the
host sums it in float64 in tile order (deterministic: no atomics). Coefficient mode is given the
r selected frequencies instead of 0..d-1 and stores its tile of R.

Basis generation: with A_k = (2 j0 + 1) k and T[t, k] = 2 t k (phases in units of pi/(2d), reduced
mod 4d in integers as in dct.h), C[k, j0 + t] = c_k (cos A_k cos T - sin A_k sin T). The T table
(BLOCK_J × BLOCK_FREQ cos and sin) is computed once per program; each chunk then costs 2·BLOCK_FREQ
cos/sin and two multiply-adds per basis value, against BLOCK_LINES multiply-adds of the product
per value: a few % of the dot. A cached d×d C would instead be re-read from L2 by every line tile
(d²·4 bytes each: 16 MiB × 43 tiles at 5504×2048) and cost d²·4 bytes of memory per distinct d.

DRAM bytes: the grid walks frequency tiles fastest, so the d/BLOCK_FREQ programs of one line tile
run together and share its G rows through L2: G is read from DRAM about once per pass. Scores
write (line tiles × d)·4 bytes; the R pass reads G once more and writes R. Total ≈ 2·|G| + |R|,
no m×n or d×d temporary.

Precision: the products run as "tf32x3" on GPUs (three TF32 tensor-core products, about fp32
accuracy: the dropped lo·lo term is ~2^-22 relative) and as plain fp32 in the interpreter.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import triton
import triton.language as tl

from lowrank_kernels import reference
from lowrank_kernels.triton_kernels._common import _tile_offsets, needs_index_64

# SCORES modes of _dct_kernel
COEFFICIENTS, SCORES_L1, SCORES_L2 = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class DctConfig:
    block_lines: int
    block_freq: int
    block_j: int
    num_warps: int
    num_stages: int


# GPUs: 128×64 tiles of X, 32-wide chunks of d, 8 warps: 128×128 (or 4 warps) spills on sm_89
# with TF32x3 (the generated basis tile and the hi/lo operand splits live in registers).
GPU_CONFIG = DctConfig(block_lines=128, block_freq=64, block_j=32, num_warps=8, num_stages=3)
# The interpreter pays per program and per operation, not per element: few, large programs.
INTERPRETER_CONFIG = DctConfig(block_lines=512, block_freq=512, block_j=512, num_warps=4,
                               num_stages=1)
GPU_PRECISION = "tf32x3"


def candidate_configs() -> list[DctConfig]:
    """Every configuration the launcher can pick on a GPU (compiled ahead of time by aot.py)."""
    return [GPU_CONFIG]


@triton.jit
def _cos_phase(phase, D, half_pi_over_d):
    """cos(pi * phase / (2d)) for integer phases in [0, 4d): the quadrant is chosen exactly and
    only the remainder in [0, d) becomes a float (lowrank/dct.h dct_cos_phase)."""
    quadrant = (phase >= D).to(tl.int32) + (phase >= 2 * D).to(tl.int32) \
        + (phase >= 3 * D).to(tl.int32)
    phi = (phase - quadrant * D).to(tl.float32) * half_pi_over_d
    c = tl.cos(phi)
    s = tl.sin(phi)
    return tl.where(quadrant == 0, c, tl.where(quadrant == 1, -s, tl.where(quadrant == 2, -c, s)))


@triton.jit
def _sin_phase(phase, D, half_pi_over_d):
    """sin(pi * phase / (2d)) = cos(pi * (phase - d) / (2d)), phase in [0, 4d)."""
    shifted = phase + 3 * D
    return _cos_phase(tl.where(shifted >= 4 * D, shifted - 4 * D, shifted), D, half_pi_over_d)


@triton.jit
def _dct_kernel(G_ptr, Freq_ptr, Out_ptr, LINES, D, NFREQ, stride_g, stride_out, half_pi_over_d,
                scale_zero, scale_rest, RIGHT: tl.constexpr, MODE: tl.constexpr,
                BLOCK_LINES: tl.constexpr, BLOCK_FREQ: tl.constexpr, BLOCK_J: tl.constexpr,
                PRECISION: tl.constexpr, INDEX_64: tl.constexpr):
    """X[lines, Freq[freqs]] for this program's tile; MODE COEFFICIENTS stores it (R), MODE
    SCORES_L1/L2 stores sum over the tile's lines of |X| or X^2 into row program_id(1) of Out."""
    pid_freq = tl.program_id(0)
    pid_lines = tl.program_id(1)
    offs_line = pid_lines * BLOCK_LINES + tl.arange(0, BLOCK_LINES)
    offs_t = tl.arange(0, BLOCK_J)
    if INDEX_64:
        offs_line = offs_line.to(tl.int64)
    line_mask = offs_line < LINES
    offs_f = pid_freq * BLOCK_FREQ + tl.arange(0, BLOCK_FREQ)
    freq_mask = offs_f < NFREQ
    k = tl.load(Freq_ptr + offs_f, mask=freq_mask, other=0)  # int32 frequencies in [0, d)
    period = 4 * D
    # T[t, k] = 2tk mod 4d: < 2·BLOCK_J·d before the reduction, so int32 holds it for d < 2^24
    rotation = (offs_t[:, None] * (2 * k)[None, :]) % period
    rot_cos = _cos_phase(rotation, D, half_pi_over_d)
    rot_sin = _sin_phase(rotation, D, half_pi_over_d)
    scale = tl.where(k == 0, scale_zero, scale_rest)
    # A_k = (2 j0 + 1) k mod 4d, advanced by 2·BLOCK_J·k per chunk (no product of two ~d values)
    start_phase = k
    advance = (2 * BLOCK_J * k) % period
    acc = tl.zeros((BLOCK_LINES, BLOCK_FREQ), dtype=tl.float32)
    for j0 in range(0, D, BLOCK_J):
        offs_j = j0 + offs_t
        if INDEX_64:
            offs_j = offs_j.to(tl.int64)
        g = tl.load(G_ptr + _tile_offsets(offs_line, offs_j, stride_g, RIGHT),
                    mask=line_mask[:, None] & (offs_j < D)[None, :], other=0.0).to(tl.float32)
        cos_a = scale * _cos_phase(start_phase, D, half_pi_over_d)
        sin_a = scale * _sin_phase(start_phase, D, half_pi_over_d)
        basis_t = cos_a[None, :] * rot_cos - sin_a[None, :] * rot_sin  # C[k, j0 + t] as (t, k)
        acc = tl.dot(g, basis_t, acc, input_precision=PRECISION)
        start_phase += advance
        start_phase = tl.where(start_phase >= period, start_phase - period, start_phase)
    if MODE == 0:
        offs_out = _tile_offsets(offs_line, offs_f, stride_out, RIGHT)
        tl.store(Out_ptr + offs_out, acc, mask=line_mask[:, None] & freq_mask[None, :])
    else:
        # lines past LINES read zeros, so their X rows are exactly 0 and add nothing
        if MODE == 1:
            partial = tl.sum(tl.abs(acc), axis=0)
        else:
            partial = tl.sum(acc * acc, axis=0)
        tl.store(Out_ptr + pid_lines.to(tl.int64) * stride_out + offs_f, partial, mask=freq_mask)


def basis_scalars(d: int) -> dict[str, float]:
    """pi/(2d), sqrt(1/d) and sqrt(2/d), each rounded to fp32 as dct.h computes them."""
    f32 = np.float32
    return {"half_pi_over_d": float(f32(1.5707963267948966) / f32(d)),
            "scale_zero": float(np.sqrt(f32(1.0) / f32(d))),
            "scale_rest": float(np.sqrt(f32(2.0) / f32(d)))}


def _launch(grad: torch.Tensor, freqs: torch.Tensor, out: torch.Tensor, mode: int,
            stride_out: int, grid_lines: int, config: DctConfig, precision: str) -> None:
    m, n = grad.shape
    right = reference.is_right_side(m, n)
    d, lines = (n, m) if right else (m, n)
    grid = (triton.cdiv(freqs.numel(), config.block_freq), grid_lines)
    _dct_kernel[grid](grad, freqs, out, lines, d, freqs.numel(), grad.stride(0), stride_out,
                      **basis_scalars(d), RIGHT=right, MODE=mode,
                      BLOCK_LINES=config.block_lines, BLOCK_FREQ=config.block_freq,
                      BLOCK_J=config.block_j, PRECISION=precision,
                      INDEX_64=needs_index_64(grad, out),
                      num_warps=config.num_warps, num_stages=config.num_stages)


def dct_select(grad: torch.Tensor, rank: int, norm: int = 1, method: str = "auto"
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher (arguments checked by lowrank_kernels.ops.check_dct_select). ``method`` selects
    the CPU kernel's algorithm; this kernel has one."""
    del method
    if grad.stride(1) != 1:
        grad = grad.contiguous()
    m, n = grad.shape
    right = reference.is_right_side(m, n)
    d, lines = (n, m) if right else (m, n)
    config = GPU_CONFIG if grad.is_cuda else INTERPRETER_CONFIG
    precision = GPU_PRECISION if grad.is_cuda else "ieee"
    line_tiles = triton.cdiv(lines, config.block_lines)
    partials = torch.empty((line_tiles, d), dtype=torch.float32, device=grad.device)
    all_freqs = torch.arange(d, dtype=torch.int32, device=grad.device)
    _launch(grad, all_freqs, partials, SCORES_L1 if norm == 1 else SCORES_L2, d,
            line_tiles, config, precision)
    scores = partials.sum(dim=0, dtype=torch.float64)
    indices = reference.top_r_indices(scores, rank)
    low_rank = torch.empty((m, rank) if right else (rank, n), dtype=torch.float32,
                           device=grad.device)
    _launch(grad, indices, low_rank, COEFFICIENTS, low_rank.stride(0), line_tiles, config,
            precision)
    return indices, low_rank


# (gradient type, right side, mode) of the reduced AOT run: the two most register-hungry launches
# measured (242 registers on sm_89: left-side scores in fp32, left-side coefficients in bf16).
MAIN_AOT_LAUNCHES = (("fp32", False, SCORES_L1), ("bf16", False, COEFFICIENTS))


def aot_variants(main_only: bool = False):
    """(variant, signature, constexprs, num_warps, num_stages) of every launch the GPU path makes:
    both sides, scores (l1, l2) and coefficients, fp32 and bf16 gradients, 32-bit offsets (only
    MAIN_AOT_LAUNCHES with ``main_only``)."""
    scalars = dict.fromkeys(("half_pi_over_d", "scale_zero", "scale_rest"), "fp32")
    ints = dict.fromkeys(("LINES", "D", "NFREQ", "stride_g", "stride_out"), "i32")
    launches = MAIN_AOT_LAUNCHES if main_only else [
        (grad_type, right, mode) for grad_type in ("fp32", "bf16") for right in (True, False)
        for mode in (COEFFICIENTS, SCORES_L1, SCORES_L2)]
    for config in candidate_configs():
        for grad_type, right, mode in launches:
            signature = {"G_ptr": f"*{grad_type}", "Freq_ptr": "*i32", "Out_ptr": "*fp32",
                         **ints, **scalars}
            constexprs = {"RIGHT": right, "MODE": mode, "BLOCK_LINES": config.block_lines,
                          "BLOCK_FREQ": config.block_freq, "BLOCK_J": config.block_j,
                          "PRECISION": GPU_PRECISION, "INDEX_64": False}
            variant = {"kernel": "dct_select", "side": "right" if right else "left",
                       "grad": grad_type, "mode": mode, **dataclasses.asdict(config)}
            yield variant, signature, constexprs, config.num_warps, config.num_stages
