"""Triton dct_select (DESIGN.md §4.5): the DCT-II rows best aligned with G, without the m×n
coefficient matrix.

    lines = rows of G (right, m >= n, d = n)  or  columns of G (left, m < n, d = m)
    X[l, k] = sum_j line_l[j] * C[k, j]                    (C: orthonormal DCT-II, lowrank/dct.h)
    score_k = sum_l |X[l, k]|  (norm=1)  or  sum_l X[l, k]^2  (norm=2: the order of the l2 norm)
    idx = the r largest scores, ties to the lower k (reference.top_r_indices), increasing
    R = G Q^T (m×r, right)  or  P^T G (r×n, left), Q = C[idx, :], P = Q^T

One kernel, two uses. Program (f, i) owns BLOCK_LINES lines × BLOCK_FREQ frequencies and forms
that tile of X as a sum over the d axis in BLOCK_J chunks: a (lines × j) tile of G times a
(j × freq) tile of C^T that is formed in registers, never loaded. Scores mode reduces the tile
over its lines and stores one partial row per line tile into a (line tiles × d) fp32 buffer; the
host sums it in float64 in tile order (deterministic: no atomics). Coefficient mode is given the
r selected frequencies instead of 0..d-1 and stores its tile of R.

Basis: with A = (2 j0 + 1) k and T = 2 t k (phases in units of pi/(2d), reduced mod 4d in
integers as in dct.h), C[k, j0 + t] = c_k cos A cos T - c_k sin A sin T. The launcher evaluates
the two factors in float64 (rounded once to fp32) as small tables: c_k·(cos A, sin A) per
(chunk, frequency), d/BLOCK_J × nfreq × 2, and (cos T, sin T) per (t, frequency), BLOCK_J × nfreq
× 2 (1.5 MiB at d = 2048, against 16 MiB for C). A program loads its T block once and 2·BLOCK_FREQ
floats per chunk, then pays two multiply-adds per basis value against BLOCK_LINES multiply-adds of
the product. Evaluating cos/sin in the kernel instead (the first version) costs, by count, ~4
libdevice calls per frequency and chunk in every thread that holds that frequency (a 1-D operand
is replicated across the 2-D tile's layout): estimated above the chunk's tensor-core work. A
cached d×d C would be re-read from L2 by every line tile (16 MiB × 43 tiles at 5504×2048) and
held per distinct d.

DRAM bytes: the grid walks frequency tiles fastest, so the d/BLOCK_FREQ programs of one line tile
run together and share its G rows through L2: G is read from DRAM about once per pass. Scores
write (line tiles × d)·4 bytes; the R pass reads G once more and writes R. Total ≈ 2·|G| + |R|,
no m×n or d×d temporary.

Precision: the products run as "tf32x3" on GPUs (three TF32 tensor-core products, about fp32
accuracy: the dropped lo·lo term is ~2^-22 relative) and as plain fp32 in the interpreter.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import torch
import triton
import triton.language as tl

from lowrank_kernels import _checks, reference
from lowrank_kernels.triton_kernels._common import (
    BASIS_DCT,
    _dct_value,
    _tile_offsets,
    needs_index_64,
    needs_wide_phase,
)

# MODE values of _dct_kernel
COEFFICIENTS, SCORES_L1, SCORES_L2 = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class DctConfig:
    block_lines: int
    block_freq: int
    block_j: int
    num_warps: int
    num_stages: int


# GPUs: 128×64 tiles of X, 32-wide chunks of d, 8 warps. With TF32x3 the basis tile and the hi/lo
# operand splits live in registers: this tile takes up to 250 of them on sm_89 (no spills, see
# aot.py); 128×128 tiles or 4 warps spilled there.
GPU_CONFIG = DctConfig(block_lines=128, block_freq=64, block_j=32, num_warps=8, num_stages=3)
# The interpreter pays per program and per operation, not per element: few, large programs.
INTERPRETER_CONFIG = DctConfig(block_lines=512, block_freq=512, block_j=512, num_warps=4,
                               num_stages=1)
GPU_PRECISION = "tf32x3"


def candidate_configs() -> list[DctConfig]:
    """Every configuration the launcher can pick on a GPU (compiled ahead of time by aot.py)."""
    return [GPU_CONFIG]


@triton.jit
def _dct_kernel(G_ptr, Chunk_ptr, Rot_ptr, Out_ptr, LINES, D, NFREQ, stride_gm, stride_gn,
                stride_out,
                RIGHT: tl.constexpr, MODE: tl.constexpr, BLOCK_LINES: tl.constexpr,
                BLOCK_FREQ: tl.constexpr, BLOCK_J: tl.constexpr, PRECISION: tl.constexpr,
                INDEX_64: tl.constexpr):
    """X[lines, freqs] for this program's tile (freqs: the frequencies the tables were built
    for); MODE COEFFICIENTS stores it (R), MODE SCORES_L1/L2 stores the sum over the tile's lines
    of |X| or X^2 into row program_id(1) of Out."""
    pid_freq = tl.program_id(0)
    pid_lines = tl.program_id(1)
    offs_line = pid_lines * BLOCK_LINES + tl.arange(0, BLOCK_LINES)
    offs_t = tl.arange(0, BLOCK_J)
    if INDEX_64:
        offs_line = offs_line.to(tl.int64)
    line_mask = offs_line < LINES
    offs_f = pid_freq * BLOCK_FREQ + tl.arange(0, BLOCK_FREQ)
    freq_mask = offs_f < NFREQ
    # (cos T, sin T) for this block of frequencies: 0 past NFREQ, so those columns of X are 0
    rot_offs = offs_t[:, None] * NFREQ + offs_f[None, :]
    rot_mask = freq_mask[None, :]
    rot_cos = tl.load(Rot_ptr + rot_offs, mask=rot_mask, other=0.0)
    rot_sin = tl.load(Rot_ptr + BLOCK_J * NFREQ + rot_offs, mask=rot_mask, other=0.0)
    chunk_sin_ptr = Chunk_ptr + tl.cdiv(D, BLOCK_J) * NFREQ
    acc = tl.zeros((BLOCK_LINES, BLOCK_FREQ), dtype=tl.float32)
    for j0 in range(0, D, BLOCK_J):
        offs_j = j0 + offs_t
        if INDEX_64:
            offs_j = offs_j.to(tl.int64)
        g = tl.load(G_ptr + _tile_offsets(offs_line, offs_j, stride_gm, stride_gn, RIGHT),
                    mask=line_mask[:, None] & (offs_j < D)[None, :], other=0.0).to(tl.float32)
        chunk_offs = (j0 // BLOCK_J) * NFREQ + offs_f
        cos_a = tl.load(Chunk_ptr + chunk_offs, mask=freq_mask, other=0.0)
        sin_a = tl.load(chunk_sin_ptr + chunk_offs, mask=freq_mask, other=0.0)
        basis_t = cos_a[None, :] * rot_cos - sin_a[None, :] * rot_sin  # C[k, j0 + t] as (t, k)
        acc = tl.dot(g, basis_t, acc, input_precision=PRECISION)
    if MODE == 0:
        offs_out = _tile_offsets(offs_line, offs_f, stride_out, 1, RIGHT)
        tl.store(Out_ptr + offs_out, acc, mask=line_mask[:, None] & freq_mask[None, :])
    else:
        # lines past LINES read zeros, so their X rows are exactly 0 and add nothing
        if MODE == 1:
            partial = tl.sum(tl.abs(acc), axis=0)
        else:
            partial = tl.sum(acc * acc, axis=0)
        tl.store(Out_ptr + pid_lines.to(tl.int64) * stride_out + offs_f, partial, mask=freq_mask)


def basis_tables(d: int, freqs: torch.Tensor, block_j: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's two factor tables for frequencies ``freqs`` (int32, length F), fp32 rounded
    once from float64: chunk (2, ceil(d / block_j), F) = c_k·(cos, sin)(pi·A/(2d)) with
    A = (2·j0 + 1)·k mod 4d, j0 = 0, block_j, ...; rotation (2, block_j, F) = (cos, sin)(pi·T/(2d))
    with T = 2·t·k mod 4d. The phases are exact integers (< 2d² in int64)."""
    k = freqs.to(torch.int64)[None, :]
    period = 4 * d
    step = math.pi / (2 * d)
    j0 = torch.arange(0, d, block_j, dtype=torch.int64, device=freqs.device)[:, None]
    chunk_angle = (((2 * j0 + 1) * k) % period).double() * step
    scale = torch.where(k == 0, math.sqrt(1.0 / d), math.sqrt(2.0 / d)).double()
    chunk = torch.stack([scale * torch.cos(chunk_angle), scale * torch.sin(chunk_angle)])
    t = torch.arange(block_j, dtype=torch.int64, device=freqs.device)[:, None]
    rot_angle = ((2 * t * k) % period).double() * step
    rotation = torch.stack([torch.cos(rot_angle), torch.sin(rot_angle)])
    return chunk.float().contiguous(), rotation.float().contiguous()


def _launch(grad: torch.Tensor, freqs: torch.Tensor, out: torch.Tensor, mode: int,
            stride_out: int, grid_lines: int, config: DctConfig, precision: str) -> None:
    m, n = grad.shape
    right = reference.is_right_side(m, n)
    d, lines = (n, m) if right else (m, n)
    chunk, rotation = basis_tables(d, freqs, config.block_j)
    grid = (triton.cdiv(freqs.numel(), config.block_freq), grid_lines)
    _dct_kernel[grid](grad, chunk, rotation, out, lines, d, freqs.numel(), *grad.stride(),
                      stride_out, RIGHT=right, MODE=mode, BLOCK_LINES=config.block_lines,
                      BLOCK_FREQ=config.block_freq, BLOCK_J=config.block_j, PRECISION=precision,
                      INDEX_64=needs_index_64(grad, out),
                      num_warps=config.num_warps, num_stages=config.num_stages)


def dct_select(grad: torch.Tensor, rank: int, norm: int = 1, *, method: str = "auto"
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher, with the op's schema signature: validates (lowrank_kernels._checks), then scores
    and projects. G of any strides is read in place. ``method`` selects the CPU kernel's
    algorithm; this kernel has one."""
    _checks.check_dct_select(grad, rank, norm, method=method)
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


# (gradient type, right side, mode) of the reduced AOT run: the most register-hungry launch
# measured (250 registers on sm_89: right-side coefficients in fp32) and a left-side scores one.
MAIN_AOT_LAUNCHES = (("fp32", True, COEFFICIENTS), ("fp32", False, SCORES_L1))


def aot_variants(main_only: bool = False):
    """(variant, signature, constexprs, num_warps, num_stages) of every launch the GPU path makes:
    both sides, scores (l1, l2) and coefficients, fp32 and bf16 gradients (only
    MAIN_AOT_LAUNCHES with ``main_only``), each with 32- and 64-bit offsets and G row-major or
    transposed (the unit stride the JIT makes a constant)."""
    ints = dict.fromkeys(("LINES", "D", "NFREQ", "stride_gm", "stride_gn", "stride_out"), "i32")
    launches = MAIN_AOT_LAUNCHES if main_only else [
        (grad_type, right, mode) for grad_type in ("fp32", "bf16") for right in (True, False)
        for mode in (COEFFICIENTS, SCORES_L1, SCORES_L2)]
    for config in candidate_configs():
        for (grad_type, right, mode), index_64, layout in itertools.product(
                launches, (False, True), ("row", "column")):
            unit = {"stride_gn" if layout == "row" else "stride_gm": 1}
            signature = {"G_ptr": f"*{grad_type}", "Chunk_ptr": "*fp32", "Rot_ptr": "*fp32",
                         "Out_ptr": "*fp32", **{k: v for k, v in ints.items() if k not in unit}}
            constexprs = {"RIGHT": right, "MODE": mode, "BLOCK_LINES": config.block_lines,
                          "BLOCK_FREQ": config.block_freq, "BLOCK_J": config.block_j,
                          "PRECISION": GPU_PRECISION, "INDEX_64": index_64, **unit}
            variant = {"kernel": "dct_select", "side": "right" if right else "left",
                       "grad": grad_type, "mode": mode, "index_64": index_64,
                       "grad_layout": layout, **dataclasses.asdict(config)}
            yield variant, signature, constexprs, config.num_warps, config.num_stages
    # dct_basis (its one configuration; 64-bit phases and offsets past d = 32767 or r·d = 2**31)
    for wide in (False, True):
        signature = {"Idx_ptr": "*i32", "Out_ptr": "*fp32", "R": "i32", "D": "i32"}
        constexprs = {"BLOCK_R": BASIS_BLOCK_R, "BLOCK_D": BASIS_BLOCK_D, "WIDE": wide}
        variant = {"kernel": "dct_basis", "wide": wide, "block_r": BASIS_BLOCK_R,
                   "block_d": BASIS_BLOCK_D}
        yield variant, signature, constexprs, 4, 1


# --------------------------------------------------------------------------------------------
# dct_basis: C[indices, :] (r×d fp32), for users and tests; the fused step generates the same
# values inside its tiles (_common._dct_value), so this kernel is that generator written out.
# --------------------------------------------------------------------------------------------
BASIS_BLOCK_R, BASIS_BLOCK_D = 16, 256


@triton.jit
def _dct_basis_kernel(Idx_ptr, Out_ptr, R, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                      WIDE: tl.constexpr):
    """One BLOCK_R × BLOCK_D tile of the rows; WIDE: 64-bit phases and offsets (the launcher's
    bound on (2i+1)·k and r·d, as _common.needs_wide_phase)."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    r_mask, d_mask = offs_r < R, offs_d < D
    freq = tl.load(Idx_ptr + offs_r, mask=r_mask, other=0)
    if WIDE:
        freq = freq.to(tl.int64)
        offs_d = offs_d.to(tl.int64)
        offs_r = offs_r.to(tl.int64)
    values = _dct_value(freq[:, None], offs_d[None, :], D)
    tl.store(Out_ptr + offs_r[:, None] * D + offs_d[None, :], values,
             mask=r_mask[:, None] & d_mask[None, :])


def dct_basis(d: int, indices: torch.Tensor) -> torch.Tensor:
    """Rows ``indices`` (int32, distinct, in [0, d); validated, values on CPU only) of the
    orthonormal DCT-II of size d as an r×d fp32 tensor, on the indices' device (CPU tensors under
    TRITON_INTERPRET=1)."""
    _checks.check_dct_basis(d, indices)
    r = indices.numel()
    out = torch.empty((r, d), dtype=torch.float32, device=indices.device)
    if r == 0:
        return out
    grid = (triton.cdiv(r, BASIS_BLOCK_R), triton.cdiv(d, BASIS_BLOCK_D))
    wide = needs_wide_phase(int(BASIS_DCT), d, d) or r * d >= 2**31
    _dct_basis_kernel[grid](indices.contiguous(), out, r, d, BLOCK_R=BASIS_BLOCK_R,
                            BLOCK_D=BASIS_BLOCK_D, WIDE=wide)
    return out
