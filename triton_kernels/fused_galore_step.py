"""fused_galore_step in Triton: two launches, project + Adam, then back-project + update (or
requantize INT8 weights). The kernel of ``torch.ops.lowrank.fused_galore_step`` on CUDA tensors.

What it computes (DESIGN.md §4.1-4.5), R the projected gradient and N the normalized update:

    right (m >= n, proj Q r×n):  R = G Qᵀ (m×r),  back(N) = N Q
    left  (m <  n, proj P m×r):  R = Pᵀ G (r×n),  back(N) = P N
    M ← β1·M + (1−β1)·R      V ← β2·V + (1−β2)·R²      N = M / (√V + ε)
    W ← decay·W − update_scale·back(N)      decay = 1 − lr·wd,  update_scale = decay·α_t·scale

with the scalars of csrc/include/lowrank/adam.h ``make_adam_coeffs`` (host double, rounded once).
The basis Q or P is read through _common._basis_tile in every format: dense values (any
strides); packed INT4 codes, Q[k, i] = s[g]·(q − z[g]) with g the group of the element in the
stored row-major order; DCT frequencies, C[k, i] = c_k·cos(π(2i+1)k/(2d)) evaluated in the tile.
No dequantized or generated copy of the basis exists in memory. G is read through both of its
strides: a transposed gradient costs no copy.

Where it wins (bench/results, H100, bf16 weights and gradients, fp32 moments): it is the only
Triton step on a default path. Against the one-pass kernel (experimental/
fused_galore_step_onepass.py) in one run (gpu_step_h100.csv) it was faster at every 7B shape
(4096×11008, 11008×4096: 1.4-3.6× at r = 128-512) and slower only at 4096×4096, r ≤ 256 (0.18-0.22
vs 0.13-0.18 ms, with an IQR as large as the gap); its tuned tables (tune_triton_step_h100.txt,
1.22-1.39× faster than the table of that run) then took 4096×4096 to 0.065-0.075 ms at r ≤ 256.
Against the CUDA C++ kernel: 4-12× faster at every measured shape and rank (gpu_step_h100.csv).

Tiling ("own" is the rows of W, G, M, V on the right and their columns on the left -- the left
side is the right side of the transposed problem; "long" the other axis):
  A. _project_adam_kernel: one program per BLOCK_OWN × BLOCK_R tile of R (own × rank), which it
     reduces over the WHOLE long axis in BLOCK_LONG chunks with tl.dot (no split-K: the Adam
     epilogue is nonlinear in the complete sum). Epilogue: M and V of the tile read and written
     once, N = M/(√V+ε) stored to the low-rank workspace (m×r right, r×n left). The r-tiles
     of one owned strip are neighbours in launch order, so the strip of G they all read is
     fetched from DRAM once and re-read from L2.
  B. _back_project_kernel: one program per BLOCK_OWN × BLOCK_LONG tile of W, K = r in BLOCK_R
     chunks: acc = N[own, :] · basis[:, long] (N·Q right, P·N left), then
     W ← decay·W − update_scale·acc, W read and written once in its dtype. The long-tiles of one
     owned strip are neighbours, so they share the N strip in L2.
Both launches are 2-D tilings like an ordinary matmul: any rank (the rank is tiled, not held
whole in registers), enough programs at every shape. The workspace N is allocated per call
(torch.empty of the low-rank shape) in the type the back projection multiplies in: W's type when
W is 16-bit, else fp32. N is rounded to that type once, on store, instead of on every load in B:
the same numbers, half the bytes and no conversion between B's loads and its tensor-core dot.
r·own·s(N) bytes, e.g. 5.6 MB at 11008×4096 bf16, r=256, against 270 MB of G and W traffic.

DRAM bytes per call, s(X) the element size of X (the DESIGN.md §5 floor, plus the N round trip
and a second basis read):
    G read once, W read and written once:   m·n·(s(G) + 2·s(W))
    M and V read and written once:          4·r·own·s(state)
    basis read once per launch:             2·(basis bytes)  (each launch re-reads it from L2
                                                              ⌈own/BLOCK_OWN⌉ times)
    N written once and read once:           2·r·own·s(N)
with basis bytes: dense r·long·s(proj); packed INT4 ⌈r·long/2⌉ code bytes + 8·⌈r·long/g⌉ bytes of
fp32 scales and zeros (each element's pair is gathered, from L1/L2); DCT 4·r bytes of frequencies
(values computed, nothing else read). G is re-read from L2 ⌈r/BLOCK_R⌉ times in A, N
⌈long/BLOCK_LONG⌉ times in B; each is fetched from DRAM once as long as the neighbouring programs
that share it run together (launch order above).

INT8 weights (DESIGN.md §4.4; param uint8 codes with fp32 scales/zeros of row-major groups of
g = param_group_size): launch A is unchanged and writes N in fp32; launch B becomes the
requantizing update of _int8_update_rows_kernel or _int8_update_groups_kernel:
    T = back(N) (fp32 "ieee" dot: the CPU kernel's fp32 numbers),
    per group: W' = decay·s(q − z) − update_scale·T,  s', z' from min/max of W',
               q' = clamp(SR(W'/s') + z', 0, 255),  u = tl.rand(seed + 2**32·step, row·n + col)
the same fp32 operations as csrc/cpu/fused_galore_step.cpp's update_int8_rows (quant.py's
helpers, FMA contraction off in both launches), so codes, scales and zeros equal the CPU kernel's
bit for bit wherever R and back(N) do (the tests build such inputs). Tiling of launch B:
  rows   (n % g == 0, g a power of two ≤ 256): one program per BLOCK_M × BLOCK_N tile of W in
         its own row/column coordinates (either side), BLOCK_N a multiple of g; the tile is
         reshaped to (BLOCK_M, BLOCK_N/g, g) for the group min/max;
  groups (otherwise: groups straddle rows or g is odd-sized): one program per BLOCK_GROUPS
         whole groups of the flattened index space; back(N) per element as a chunked dot over
         r from gathers of N and the basis (no tensor tile exists when rows change inside a
         group) -- O(m·n·r) L1/L2 loads and FMAs, several times slower than rows, correct.
Nothing is written before validation (lowrank_kernels._checks, in the launcher), and a group's
codes, scale and zero are written by the one program that read them.
DRAM bytes with INT8 weights: G read m·n·s(G); codes read and written 2·m·n; scales and zeros
read and written 16·⌈m·n/g⌉; M, V as above; N 8·r·own (fp32, the term that keeps this step
above the floor: bench/traffic.py "fused-triton-q" vs "floor-q"); the basis once per launch.

Factored second moment (a 1-D exp_avg_sq = [a (r) | b (own)], DESIGN.md §4.12, reference
.factored_normalized): a_i needs Σ_j R_ij² over every own-line, i.e. over all programs of
launch A, so the step is four launches, none with atomics (fixed summation orders: the bits
repeat run to run):
  A  (_project_adam_kernel, FACTORED; the fp32-moment tables of pick_configs): the tile of R into
     an fp32 low-rank workspace, Σ_own R² per rank column into Partials[own tile, r] and Σ_rank R²
     per own-line into Partials[rank tile, own] (_store_factored_partials). No moment is read.
  F  _factored_finalize_kernel, 1 + ⌈own/1024⌉ programs: program 0 sums the column partials in
     tile order, a ← β2·a + (1−β2)·Σ/own, ā = Σ a/r (clamped at FACTORED_FLOOR) into a scalar;
     the others the line partials, b ← β2·b + (1−β2)·Σ/r. FMA contraction off.
  C  _factored_adam_kernel, one program per 64×32 tile of the low-rank shape: M updated and
     stored (fp32, bf16 SR, 8-bit codes + block scales: _common's helpers and Philox words, as
     launch A's Adam), c = b/ā, V̂ = c·a, N = M/(√V̂ + ε) into the workspace of the plain step's
     type (in place over R when that is fp32; a second r·own workspace in W's type otherwise).
  B  unchanged (float or INT8 weights).
DRAM bytes beyond the plain step's (a model, own×r = r·own elements; BLOCK_OWN × BLOCK_R of
launch A): R written and read in fp32 8·r·own; partials written and read
8·r·own·(1/BLOCK_OWN + 1/BLOCK_R) (r·own/4 with 64×64 tiles); factors 12·(r + own); V's
r·own values are neither read nor written. Against 8-bit V (2 bytes per element and
8·own·⌈r/32⌉ of scales): +6·r·own bytes per step, e.g. +17 MB at own 11008, r = 256 beside
~270 MB of bf16 G and W traffic; against fp32 V (8·r·own): +r·own/4.

Precision: R accumulates in fp32; tensor cores when G and a dense basis share a 16-bit type,
else an exact "ieee" fp32 dot (TF32 would miss the 1e-5 fp32 tolerance); a generated (INT4, DCT)
basis enters as hi + lo in G's type (_common.py). The Adam epilogue and N are fp32. In B, N and
the basis are in W's type when W is 16-bit (the back projection galore-torch does in bf16),
fp32 "ieee" otherwise.

GPU verification: the dense path ran on an H100 (session 2: its tests and gpu_step_h100.csv);
the INT4/DCT bases, INT8 weights and bf16 moments have run in the interpreter and compile for
sm_89/sm_90 without spills (tests/test_triton_aot.py); their GPU tests run whenever a GPU is
present.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import triton
import triton.language as tl

from lowrank_kernels import _checks, reference
from lowrank_kernels.reference import is_right_side, rounding_philox_seed

from ._common import (
    MOMENT_STREAM,
    BasisArgs,
    _adam_tile,
    _basis_tile,
    _basis_values,
    _dot,
    _grid_tile,
    _load_moment,
    _moment_blocks,
    _own_long,
    _project_tile,
    _project_tile_stats,
    _round_to,
    _store_moment,
    _tile_offsets,
    _weight_tile_back,
    adam_coeffs,
    basis_args,
    dot_kind,
    needs_index_64,
    needs_wide_phase,
)
from .full_rank import (
    FULL_RANK_MODES,
    _store_line_sums_of_r,
    finalize_full_rank,
    full_rank_buffers,
    grad_scale,
)
from .quant import dequantize_codes, group_quant_params, stochastic_round_codes

FACTORED_FLOOR = tl.constexpr(reference.FACTORED_FLOOR)


@triton.jit
def _project_adam_kernel(
    G_ptr, Proj_ptr, ProjScales_ptr, ProjZeros_ptr, ExpAvg_ptr, ExpAvgSq_ptr, ExpAvgScales_ptr,
    ExpAvgSqScales_ptr, Normalized_ptr, LowRank_ptr, LineSums_ptr,
    stride_gm, stride_gn, stride_pr, stride_pl, stride_statem, stride_normm,
    M, N, R, num_blocks,
    beta1, beta2, one_minus_beta1, one_minus_beta2, eps, philox_seed,
    RIGHT: tl.constexpr, BLOCK_OWN: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_LONG: tl.constexpr, BASIS: tl.constexpr, PROJ_GROUP: tl.constexpr,
    INDEX_64: tl.constexpr, INTERPRETED: tl.constexpr, ADAGRAD: tl.constexpr,
    MOMENT_BLOCK: tl.constexpr, FULL_RANK: tl.constexpr = 0, FACTORED: tl.constexpr = 0,
):
    """Launch A: R[own, r] = Σ_long G[own, long]·basis[long, r] for one BLOCK_OWN × BLOCK_R tile,
    then Adam (AdaGrad when ADAGRAD) on that tile of M and V and N = M/(√V+ε) into the workspace
    (rounded to its type). 8-bit moments (int8/uint8 pointers): num_blocks = ⌈R/MOMENT_BLOCK⌉
    scales per own-line, blocks of MOMENT_BLOCK ranks inside the tile (_common._adam_tile).
    FULL_RANK (full_rank.FIRA / APOLLO; Adam with fp32/bf16 moments only, the checks refuse the
    rest): also the per-line partial sums of this rank tile (full_rank.py: ν = Σ N², ρ = Σ R²,
    and γ = ‖G_own‖² from the first rank tile) and, for Fira, R itself into the fp32 LowRank
    workspace (LowRank_ptr, LineSums_ptr are unused otherwise). FACTORED (a factored V; Adam
    runs in launch C, _factored_adam_kernel): R itself into the fp32 Normalized workspace and
    the tile's sums of R² into LineSums (_store_factored_partials); no moment is touched."""
    OWN, LONG = _own_long(M, N, RIGHT)
    offs_own, offs_r, own_mask, r_mask = _grid_tile(OWN, R, BLOCK_OWN, BLOCK_R, INDEX_64)

    proj_low = tl.zeros((BLOCK_OWN, BLOCK_R), dtype=tl.float32)
    if FULL_RANK != 0:
        grad_sq = tl.zeros((BLOCK_OWN,), dtype=tl.float32)
        proj_low, grad_sq = _project_tile_stats(
            G_ptr, Proj_ptr, ProjScales_ptr, ProjZeros_ptr, offs_own, offs_r, own_mask, r_mask,
            LONG, stride_gm, stride_gn, stride_pr, stride_pl, proj_low, grad_sq, RIGHT,
            BLOCK_LONG, BASIS, PROJ_GROUP, INDEX_64, INTERPRETED, True)
    else:
        proj_low = _project_tile(G_ptr, Proj_ptr, ProjScales_ptr, ProjZeros_ptr, offs_own, offs_r,
                                 own_mask, r_mask, LONG, stride_gm, stride_gn, stride_pr,
                                 stride_pl, proj_low, RIGHT,
                                 BLOCK_LONG, BASIS, PROJ_GROUP, INDEX_64, INTERPRETED)
    state_offs = _tile_offsets(offs_own, offs_r, stride_statem, 1, RIGHT)
    state_mask = own_mask[:, None] & r_mask[None, :]
    if FACTORED:
        _store_factored_partials(Normalized_ptr, LineSums_ptr,
                                 _tile_offsets(offs_own, offs_r, stride_normm, 1, RIGHT),
                                 state_mask, offs_own, offs_r, own_mask, r_mask, proj_low, OWN, R,
                                 BLOCK_OWN, BLOCK_R)
    else:
        if FULL_RANK != 0:
            norm_offs = _tile_offsets(offs_own, offs_r, stride_normm, 1, RIGHT)
            line_sums = _store_line_sums_of_r(LowRank_ptr, LineSums_ptr, norm_offs, state_mask,
                                              offs_own, own_mask, proj_low, grad_sq, OWN, R,
                                              BLOCK_R, FULL_RANK, INDEX_64)
        # only the real rank is stored; launch B reads the padding as 0 through its mask
        normalized = _adam_tile(ExpAvg_ptr, ExpAvgSq_ptr, ExpAvgScales_ptr, ExpAvgSqScales_ptr,
                                state_offs, state_mask, offs_own, offs_r, own_mask, num_blocks,
                                proj_low, beta1, beta2, one_minus_beta1, one_minus_beta2, eps,
                                philox_seed, ADAGRAD, BLOCK_OWN, BLOCK_R, MOMENT_BLOCK)
        tl.store(Normalized_ptr + _tile_offsets(offs_own, offs_r, stride_normm, 1, RIGHT),
                 _round_to(normalized, Normalized_ptr.dtype.element_ty, INTERPRETED),
                 mask=state_mask)
        if FULL_RANK != 0:
            tl.store(line_sums,
                     tl.sum(tl.where(state_mask, normalized * normalized, 0.0), axis=1),
                     mask=own_mask)


@triton.jit
def _store_factored_partials(LowRank_ptr, Partials_ptr, low_offs, mask, offs_own, offs_r,
                             own_mask, r_mask, low_rank, OWN, R, BLOCK_OWN: tl.constexpr,
                             BLOCK_R: tl.constexpr):
    """Launch A's epilogue for a factored V: the tile of R (fp32) into the low-rank workspace,
    Σ_own R² of each rank column into Partials[own tile, rank] and Σ_rank R² of each own-line
    into Partials[own_tiles·R + rank tile·OWN + line]: every element of Partials is written by
    exactly one program (no atomics); _factored_finalize_kernel sums them in tile order."""
    r_tiles = tl.cdiv(R, BLOCK_R)
    own_tile = tl.program_id(0) // r_tiles
    r_tile = tl.program_id(0) % r_tiles
    squares = tl.where(mask, low_rank * low_rank, 0.0)
    tl.store(LowRank_ptr + low_offs, low_rank, mask=mask)
    tl.store(Partials_ptr + own_tile * R + offs_r, tl.sum(squares, axis=0), mask=r_mask)
    tl.store(Partials_ptr + tl.cdiv(OWN, BLOCK_OWN) * R + r_tile * OWN + offs_own,
             tl.sum(squares, axis=1), mask=own_mask)


@triton.jit
def _factored_finalize_kernel(Factors_ptr, Partials_ptr, Mean_ptr, OWN, R, OWN_TILES, R_TILES,
                              beta2, one_minus_beta2, BLOCK: tl.constexpr):
    """The factors' EMA (DESIGN.md §4.12) from launch A's partial sums, each summed over the
    tiles in tile order (fixed: run-to-run identical): program 0 updates a (r values) and stores
    max(ā, FACTORED_FLOOR) into Mean; program p ≥ 1 updates b for own-lines
    [(p−1)·BLOCK, p·BLOCK). Factors = [a | b] in place (fp32)."""
    pid = tl.program_id(0)
    if pid == 0:
        total = tl.zeros((), dtype=tl.float32)
        for start in range(0, R, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < R
            col = tl.zeros((BLOCK,), dtype=tl.float32)
            for t in range(OWN_TILES):
                col += tl.load(Partials_ptr + t * R + offs, mask=mask, other=0.0)
            a = (beta2 * tl.load(Factors_ptr + offs, mask=mask, other=0.0)
                 + one_minus_beta2 * tl.div_rn(col, OWN * 1.0))
            tl.store(Factors_ptr + offs, a, mask=mask)
            total += tl.sum(tl.where(mask, a, 0.0), axis=0)
        mean = tl.div_rn(total, R * 1.0)
        # torch.clamp(min=)'s rule, as the reference and C++: NaN stays NaN (tl.maximum drops it)
        tl.store(Mean_ptr, tl.where(mean < FACTORED_FLOOR, FACTORED_FLOOR, mean))
    else:
        offs = (pid - 1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < OWN
        line = tl.zeros((BLOCK,), dtype=tl.float32)
        for t in range(R_TILES):
            line += tl.load(Partials_ptr + OWN_TILES * R + t * OWN + offs, mask=mask, other=0.0)
        b = (beta2 * tl.load(Factors_ptr + R + offs, mask=mask, other=0.0)
             + one_minus_beta2 * tl.div_rn(line, R * 1.0))
        tl.store(Factors_ptr + R + offs, b, mask=mask)


@triton.jit
def _factored_adam_kernel(
    LowRank_ptr, Normalized_ptr, ExpAvg_ptr, ExpAvgScales_ptr, Factors_ptr, Mean_ptr,
    stride_statem, stride_lowm, stride_normm, OWN, R, num_blocks,
    beta1, one_minus_beta1, eps, philox_seed,
    RIGHT: tl.constexpr, BLOCK_OWN: tl.constexpr, BLOCK_R: tl.constexpr,
    MOMENT_BLOCK: tl.constexpr, INDEX_64: tl.constexpr, INTERPRETED: tl.constexpr,
):
    """Launch C of a factored V, one program per BLOCK_OWN × BLOCK_R tile of the low-rank shape:
    M ← β1·M + (1−β1)·R (M fp32, bf16 or 8-bit codes, stored rounded once with the first Philox
    word of its row-major index, as _common._adam_tile), c = b_own/Mean, V̂ = c·a_r,
    N = M/(√V̂ + ε) into the Normalized workspace in its type (it may alias LowRank: each
    element is read before it is written, by the same program)."""
    offs_own, offs_r, own_mask, r_mask = _grid_tile(OWN, R, BLOCK_OWN, BLOCK_R, INDEX_64)
    mask = own_mask[:, None] & r_mask[None, :]
    low_rank = tl.load(LowRank_ptr + _tile_offsets(offs_own, offs_r, stride_lowm, 1, RIGHT),
                       mask=mask, other=0.0)
    state_offs = _tile_offsets(offs_own, offs_r, stride_statem, 1, RIGHT)
    scale_offs, block_offs, block_mask = _moment_blocks(offs_own, offs_r, own_mask, num_blocks,
                                                        BLOCK_R, MOMENT_BLOCK)
    exp_avg = _load_moment(ExpAvg_ptr, ExpAvgScales_ptr, state_offs, scale_offs, mask, True)
    exp_avg = beta1 * exp_avg + one_minus_beta1 * low_rank
    if ExpAvg_ptr.dtype.element_ty != tl.float32:
        word, _, _, _ = tl.randint4x(philox_seed, state_offs.to(tl.int64) + MOMENT_STREAM)
    else:
        word = 0
    _store_moment(ExpAvg_ptr, ExpAvgScales_ptr, state_offs, mask, block_offs, block_mask,
                  exp_avg, word, True, BLOCK_OWN, BLOCK_R, MOMENT_BLOCK)
    col = tl.load(Factors_ptr + offs_r, mask=r_mask, other=0.0)
    line = tl.div_rn(tl.load(Factors_ptr + R + offs_own, mask=own_mask, other=0.0),
                     tl.load(Mean_ptr))
    v_hat = line[:, None] * col[None, :]
    normalized = tl.div_rn(exp_avg, tl.sqrt_rn(v_hat) + eps)
    tl.store(Normalized_ptr + _tile_offsets(offs_own, offs_r, stride_normm, 1, RIGHT),
             _round_to(normalized, Normalized_ptr.dtype.element_ty, INTERPRETED), mask=mask)


@triton.jit
def _back_project_kernel(
    W_ptr, Proj_ptr, ProjScales_ptr, ProjZeros_ptr, Normalized_ptr,
    G_ptr, LowRank_ptr, LineCoef_ptr, GradCoef_ptr,
    stride_wm, stride_pr, stride_pl, stride_normm, stride_gm, stride_gn,
    M, N, R,
    decay, update_scale,
    RIGHT: tl.constexpr, BLOCK_OWN: tl.constexpr, BLOCK_LONG: tl.constexpr,
    BLOCK_R: tl.constexpr, BASIS: tl.constexpr, PROJ_GROUP: tl.constexpr,
    INDEX_64: tl.constexpr, INTERPRETED: tl.constexpr, FULL_RANK: tl.constexpr = 0,
):
    """Launch B: W[own, long] ← decay·W − update_scale·Σ_r N[own, r]·basis[r, long] for one
    BLOCK_OWN × BLOCK_LONG tile of W. FULL_RANK (full_rank.py): Fira takes N' = N − c ⊙ R
    (fp32 workspaces, c = LineCoef per own-line) as the N operand; Fira and APOLLO then subtract
    GradCoef_own·G (G read through its strides); APOLLO skips the back projection."""
    # GaLore: N is already in W's type (the workspace), only the basis is rounded to it
    offs_own, offs_long, own_mask, long_mask, w_offs, w_mask, w, back = _weight_tile_back(
        W_ptr, Proj_ptr, ProjScales_ptr, ProjZeros_ptr, Normalized_ptr, stride_wm, stride_pr,
        stride_pl, stride_normm, M, N, R, RIGHT, BLOCK_OWN, BLOCK_LONG, BLOCK_R, BASIS,
        PROJ_GROUP, INDEX_64, INTERPRETED, LowRank_ptr, LineCoef_ptr, FULL_RANK)
    w = decay * w - update_scale * back
    if FULL_RANK != 0:
        g = tl.load(G_ptr + _tile_offsets(offs_own, offs_long, stride_gm, stride_gn, RIGHT),
                    mask=w_mask, other=0.0).to(tl.float32)
        grad_coef = tl.load(GradCoef_ptr + offs_own, mask=own_mask, other=0.0)
        w = w - grad_coef[:, None] * g
    tl.store(W_ptr + w_offs, _round_to(w, W_ptr.dtype.element_ty, INTERPRETED), mask=w_mask)


@triton.jit
def _int8_update_rows_kernel(
    Codes_ptr, Scales_ptr, Zeros_ptr, Proj_ptr, ProjScales_ptr, ProjZeros_ptr, Normalized_ptr,
    G_ptr, LowRank_ptr, LineCoef_ptr, GradCoef_ptr,
    stride_pr, stride_pl, stride_normm, stride_gm, stride_gn,
    M, N, R,
    decay, update_scale, philox_seed,
    RIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP: tl.constexpr, BASIS: tl.constexpr, PROJ_GROUP: tl.constexpr,
    INDEX_64: tl.constexpr, INTERPRETED: tl.constexpr, FULL_RANK: tl.constexpr = 0,
):
    """Launch B for INT8 weights whose groups lie inside rows (N % GROUP == 0, BLOCK_N a multiple
    of GROUP): one program per BLOCK_M × BLOCK_N tile of W in its own row/column coordinates
    (either side), i.e. BLOCK_M × BLOCK_N/GROUP whole groups.

    T = back(N) for the tile (fp32 "ieee" dot, K = r in BLOCK_R chunks: N·Q right, P·N left);
    per group: W' = decay·s(q − z) − update_scale·T, s', z' from min/max of W',
    q' = clamp(SR(W'/s') + z', 0, 255) with u = tl.rand(philox_seed, row-major index).
    FULL_RANK (full_rank.py): Fira's N operand is N − c ⊙ R; then T ← update_scale·T + gc·G
    (APOLLO: T = gc·G, no back projection) and W' = decay·s(q − z) − 1·T, as the CPU kernel's
    fold_grad_term_rows."""
    num_col_tiles = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    offs_m = (pid // num_col_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    first_col = (pid % num_col_tiles) * BLOCK_N
    offs_n = first_col + tl.arange(0, BLOCK_N)
    if INDEX_64:
        offs_m = offs_m.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
    m_mask = offs_m < M
    n_mask = offs_n < N

    back = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FULL_RANK == 1:  # c of the own-lines: rows (right) or columns (left)
        line_coef = tl.load(LineCoef_ptr + (offs_m if RIGHT else offs_n),
                            mask=m_mask if RIGHT else n_mask, other=0.0)
    if FULL_RANK != 2:
        for start in range(0, R, BLOCK_R):
            offs_r = start + tl.arange(0, BLOCK_R)
            if INDEX_64:
                offs_r = offs_r.to(tl.int64)
            r_mask = offs_r < R
            if RIGHT:  # N (m×r) · Q[:, cols]
                low_offs = offs_m[:, None] * stride_normm + offs_r[None, :]
                low_mask = m_mask[:, None] & r_mask[None, :]
                a = tl.load(Normalized_ptr + low_offs, mask=low_mask, other=0.0)
                if FULL_RANK == 1:
                    a = a - line_coef[:, None] * tl.load(LowRank_ptr + low_offs, mask=low_mask,
                                                         other=0.0)
                b = _basis_tile(Proj_ptr, ProjScales_ptr, ProjZeros_ptr, offs_r, offs_n, r_mask,
                                n_mask, stride_pr, stride_pl, N, False, BASIS, PROJ_GROUP)
            else:  # P[rows, :] · N (r×n)
                a = _basis_tile(Proj_ptr, ProjScales_ptr, ProjZeros_ptr, offs_r, offs_m, r_mask,
                                m_mask, stride_pr, stride_pl, M, True, BASIS, PROJ_GROUP)
                low_offs = offs_r[:, None] * stride_normm + offs_n[None, :]
                low_mask = r_mask[:, None] & n_mask[None, :]
                b = tl.load(Normalized_ptr + low_offs, mask=low_mask, other=0.0)
                if FULL_RANK == 1:
                    b = b - line_coef[None, :] * tl.load(LowRank_ptr + low_offs, mask=low_mask,
                                                         other=0.0)
            back = _dot(a, b, back, INTERPRETED)
    back_scale = update_scale
    if FULL_RANK != 0:
        g = tl.load(G_ptr + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn,
                    mask=m_mask[:, None] & n_mask[None, :], other=0.0).to(tl.float32)
        if RIGHT:
            grad_coef = tl.load(GradCoef_ptr + offs_m, mask=m_mask, other=0.0)[:, None]
        else:
            grad_coef = tl.load(GradCoef_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
        back = _fold_grad_term(back, g, grad_coef, update_scale, FULL_RANK)
        back_scale = 1.0

    # the epilogue on (rows, groups, GROUP): group (i, j) is W[i, first_col + j·GROUP + lane]
    col_groups = first_col // GROUP + tl.arange(0, BLOCK_N // GROUP)
    group = offs_m[:, None] * (N // GROUP) + col_groups[None, :]
    group_mask = m_mask[:, None] & (col_groups * GROUP < N)[None, :]
    elem = group[:, :, None] * GROUP + tl.arange(0, GROUP)[None, None, :]
    elem_mask = group_mask[:, :, None]
    _int8_requantize_groups(Codes_ptr, Scales_ptr, Zeros_ptr, group, group_mask, elem,
                            elem_mask, tl.reshape(back, (BLOCK_M, BLOCK_N // GROUP, GROUP)),
                            decay, back_scale, philox_seed, 2)


@triton.jit
def _fold_grad_term(back, g, grad_coef, update_scale, FULL_RANK: tl.constexpr):
    """The whole INT8 update T of the full-rank modes: update_scale·back + gc·G (Fira) or gc·G
    (APOLLO), the operations of the CPU's fold_grad_term_rows."""
    if FULL_RANK == 1:
        return update_scale * back + grad_coef * g
    else:
        return grad_coef * g


@triton.jit
def _int8_update_groups_kernel(
    Codes_ptr, Scales_ptr, Zeros_ptr, Proj_ptr, ProjScales_ptr, ProjZeros_ptr, Normalized_ptr,
    G_ptr, LowRank_ptr, LineCoef_ptr, GradCoef_ptr,
    stride_pr, stride_pl, stride_normm, stride_gm, stride_gn,
    M, N, R, numel, num_groups,
    decay, update_scale, philox_seed,
    RIGHT: tl.constexpr, BLOCK_GROUPS: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP: tl.constexpr, BASIS: tl.constexpr, PROJ_GROUP: tl.constexpr,
    INDEX_64: tl.constexpr, INTERPRETED: tl.constexpr, FULL_RANK: tl.constexpr = 0,
):
    """Launch B for INT8 weights in general (groups straddle rows, or GROUP is not a power of two
    up to 256): one program per BLOCK_GROUPS whole groups of the flattened m·n index space.
    Element e = row·N + col needs back(N)[row, col] = Σ_r A[row, r]·B[r, col] with rows that
    change inside a group, so no tile of it is a matrix product: it is computed per element as a
    chunked dot over r (gathers of N and the basis, fp32 FMAs, BLOCK_R ranks at a time) --
    O(m·n·r) loads from L1/L2 instead of tensor-core tiles: correct, several times slower than
    the row-aligned kernel, and used only for such layouts. Epilogue as there, FULL_RANK as in
    _int8_update_rows_kernel (N, R and the coefficients gathered per element)."""
    groups = tl.program_id(0) * BLOCK_GROUPS + tl.arange(0, BLOCK_GROUPS)
    lane = tl.arange(0, BLOCK_G)
    if INDEX_64:
        groups = groups.to(tl.int64)
    group_mask = groups < num_groups
    elem = groups[:, None] * GROUP + lane[None, :]
    elem_mask = group_mask[:, None] & (lane < GROUP)[None, :] & (elem < numel)
    row = elem // N
    col = elem - row * N
    line = row if RIGHT else col  # the element's own-line

    back = tl.zeros((BLOCK_GROUPS, BLOCK_G), dtype=tl.float32)
    if FULL_RANK == 1:
        line_coef = tl.load(LineCoef_ptr + line, mask=elem_mask, other=0.0)[:, :, None]
    if FULL_RANK != 2:
        for start in range(0, R, BLOCK_R):
            offs_r = start + tl.arange(0, BLOCK_R)
            if INDEX_64:
                offs_r = offs_r.to(tl.int64)
            rank3 = offs_r[None, None, :]
            r_mask3 = rank3 < R
            mask3 = elem_mask[:, :, None] & r_mask3
            if RIGHT:  # N[row, r] · Q[r, col]
                low_offs = row[:, :, None] * stride_normm + rank3
                a = tl.load(Normalized_ptr + low_offs, mask=mask3, other=0.0)
                if FULL_RANK == 1:
                    a = a - line_coef * tl.load(LowRank_ptr + low_offs, mask=mask3, other=0.0)
                b = _basis_values(Proj_ptr, ProjScales_ptr, ProjZeros_ptr, rank3, r_mask3,
                                  col[:, :, None], mask3, stride_pr, stride_pl, N, BASIS,
                                  PROJ_GROUP)
            else:  # P[row, r] · N[r, col]
                a = _basis_values(Proj_ptr, ProjScales_ptr, ProjZeros_ptr, rank3, r_mask3,
                                  row[:, :, None], mask3, stride_pr, stride_pl, M, BASIS,
                                  PROJ_GROUP)
                low_offs = rank3 * stride_normm + col[:, :, None]
                b = tl.load(Normalized_ptr + low_offs, mask=mask3, other=0.0)
                if FULL_RANK == 1:
                    b = b - line_coef * tl.load(LowRank_ptr + low_offs, mask=mask3, other=0.0)
            back += tl.sum(a.to(tl.float32) * b, axis=2)
    back_scale = update_scale
    if FULL_RANK != 0:
        g = tl.load(G_ptr + row * stride_gm + col * stride_gn, mask=elem_mask,
                    other=0.0).to(tl.float32)
        grad_coef = tl.load(GradCoef_ptr + line, mask=elem_mask, other=0.0)
        back = _fold_grad_term(back, g, grad_coef, update_scale, FULL_RANK)
        back_scale = 1.0

    _int8_requantize_groups(Codes_ptr, Scales_ptr, Zeros_ptr, groups, group_mask, elem,
                            elem_mask, back, decay, back_scale, philox_seed, 1)


@triton.jit
def _int8_requantize_groups(Codes_ptr, Scales_ptr, Zeros_ptr, group, group_mask, elem, elem_mask,
                            back, decay, update_scale, philox_seed, LANE_AXIS: tl.constexpr):
    """The INT8 epilogue (DESIGN.md §4.4, the CPU's update_int8_rows): ``elem``/``back`` have one
    more axis (LANE_AXIS, the last) than ``group``: the lanes of each group. Same fp32 operations
    in the same order as lowrank/quant.h (the launcher turns off FMA contraction), so the codes
    equal the CPU kernel's wherever back(N) does."""
    scale = tl.load(Scales_ptr + group, mask=group_mask, other=1.0)
    zero = tl.load(Zeros_ptr + group, mask=group_mask, other=0.0)
    codes = tl.load(Codes_ptr + elem, mask=elem_mask, other=0)
    weight = decay * dequantize_codes(codes, tl.expand_dims(scale, LANE_AXIS),
                                      tl.expand_dims(zero, LANE_AXIS)) - update_scale * back
    lo = tl.min(tl.where(elem_mask, weight, float("inf")), axis=LANE_AXIS)
    hi = tl.max(tl.where(elem_mask, weight, float("-inf")), axis=LANE_AXIS)
    # groups outside the weight: any finite range (nothing of them is stored)
    new_scale, new_zero = group_quant_params(tl.where(group_mask, lo, 0.0),
                                             tl.where(group_mask, hi, 1.0), 255)
    new_codes = stochastic_round_codes(weight, tl.expand_dims(new_scale, LANE_AXIS),
                                       tl.expand_dims(new_zero, LANE_AXIS), philox_seed, elem, 255)
    tl.store(Codes_ptr + elem, new_codes, mask=elem_mask)
    tl.store(Scales_ptr + group, new_scale, mask=group_mask)
    tl.store(Zeros_ptr + group, new_zero, mask=group_mask)


# --------------------------------------------------------------------------------------------
# launch configuration
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Block sizes and launch shape of one compiled variant of launch A or B."""

    block_own: int
    block_r: int
    block_long: int
    num_warps: int
    num_stages: int


# Launch A per (dot kind, BLOCK_R). Its Adam epilogue holds R, M, V and N of the tile at once
# (4·BLOCK_OWN·BLOCK_R / threads fp32 registers), hence 8 warps for the 128×128 tile. Shared memory
# is num_stages × (G chunk + basis chunk), kept under sm_89's 99 KiB so one table serves Ada and
# Hopper. The fp32 ("ieee" FMA) dot, the slow exact path, keeps one small tile (its operands live
# in registers; one configuration keeps the AOT test short) at 8 warps (at 4, the bf16-G/fp32-basis
# variant with 64-bit offsets spills a few bytes).
# Launch B per W's dtype class ("16bit": tensor cores, "fp32": FMA): a 128×128 W tile (64 fp32
# accumulators per thread at 8 warps), K = r in chunks of 64.
# Tuned on an H100 (bf16, bench/tune_triton_step.py, bench/results/tune_triton_step_h100.txt):
# 64×64 rank tiles win up to r = 256 and 128×128 above, 1.2-1.4x faster than the first, untuned
# table at 4096×11008, 11008×4096 and 4096×4096, r = 128-1024. Every entry is checked spill-free
# for sm_89 and sm_90 by tests/test_triton_aot.py.
_PROJECT_BLOCKS: dict[tuple[str, int], TileConfig] = {
    ("tc", 32): TileConfig(block_own=64, block_r=32, block_long=128, num_warps=4, num_stages=3),
    ("tc", 64): TileConfig(block_own=64, block_r=64, block_long=64, num_warps=4, num_stages=4),
    ("tc", 128): TileConfig(block_own=128, block_r=128, block_long=64, num_warps=8, num_stages=3),
    ("fp32", 32): TileConfig(block_own=64, block_r=32, block_long=32, num_warps=8, num_stages=2),
}
_BACK_BLOCKS: dict[str, TileConfig] = {
    "16bit": TileConfig(block_own=128, block_r=64, block_long=128, num_warps=8, num_stages=3),
    "fp32": TileConfig(block_own=64, block_r=32, block_long=64, num_warps=4, num_stages=2),
}
MIN_BLOCK_R = 32
MAX_BLOCK_R = {"tc": 128, "fp32": 32}  # per dot kind
# A generated (INT4 or DCT) basis is built in registers (INT4: codes plus per-element gathers of
# the group scale and zero, which the pipeliner stages in shared memory too; DCT: cos/sin) and
# hi/lo-split for tensor cores: the dense tiles above spill or overflow sm_89's shared memory
# with it (AOT test), so it has its own, the rank in tiles of at most 64.
_GENERATED_PROJECT_BLOCKS: dict[tuple[str, int], TileConfig] = {
    ("tc", 32): TileConfig(block_own=64, block_r=32, block_long=64, num_warps=4, num_stages=2),
    ("tc", 64): TileConfig(block_own=64, block_r=64, block_long=64, num_warps=8, num_stages=2),
    ("fp32", 32): TileConfig(block_own=32, block_r=32, block_long=32, num_warps=8, num_stages=2),
}
_GENERATED_BACK_BLOCKS: dict[str, TileConfig] = {
    "16bit": TileConfig(block_own=128, block_r=32, block_long=128, num_warps=8, num_stages=3),
    "fp32": TileConfig(block_own=64, block_r=32, block_long=64, num_warps=8, num_stages=2),
}
MAX_GENERATED_BLOCK_R = {"tc": 64, "fp32": 32}
# bf16 moments: launch A also makes one Philox call per state element for their stochastic
# rounding (_common._adam_tile). The dense 128×128 tile then spills on sm_89 and sm_90 (AOT);
# 64×128 (32 elements per thread at 8 warps, ≤ 243 registers) does not. With a generated basis
# the 64-wide rank tile spills 4 bytes on sm_89 (DCT), none with 32-wide basis chunks. The other
# entries serve bf16 moments as they are.
_BF16_MOMENT_PROJECT_BLOCKS: dict[tuple[str, int], TileConfig] = {
    **_PROJECT_BLOCKS,
    ("tc", 128): TileConfig(block_own=64, block_r=128, block_long=64, num_warps=8, num_stages=3),
}
_BF16_MOMENT_GENERATED_PROJECT_BLOCKS: dict[tuple[str, int], TileConfig] = {
    **_GENERATED_PROJECT_BLOCKS,
    ("tc", 64): TileConfig(block_own=64, block_r=64, block_long=32, num_warps=8, num_stages=2),
}
# 64-bit offsets (INDEX_64: a tensor spanning 2**31+ elements, r·d ≥ 2**31, or a DCT size ≥ 32768)
# hold every offset in two registers. The dense 128×128 tensor-core tile of launch A then spills
# 36-124 bytes on sm_89 and sm_90 at 255 registers (AOT, fp32 moments, either G layout); its
# 64-row form, the bf16-moment entry above, does not. Every other entry compiles spill-free with
# 64-bit offsets as it is, so this is the one difference.
_INDEX_64_PROJECT_BLOCKS: dict[tuple[str, int], TileConfig] = {
    **_PROJECT_BLOCKS,
    ("tc", 128): _BF16_MOMENT_PROJECT_BLOCKS[("tc", 128)],
}
# 8-bit moments: launch A decodes M and V (a gather of the block scale per element), draws the
# same Philox words as bf16 moments and re-encodes them with a block absmax over the rank axis
# of the tile (a reshape to (own, BLOCK_R/B, B)), which holds more values at once. The bf16
# tables' dense tensor-core tiles then spill on sm_89 and sm_90 (AOT: 64×64 at 4 warps 36-364
# bytes, 64×128 24-556 bytes, more under AdaGrad than Adam); 64×64 at 8 warps (≤ 206 registers)
# and 32×128 at 8 warps (≤ 212) do not (64×128 with 32-wide long chunks at 2 stages still
# spills 16 bytes). The fp32-dot and generated-basis entries serve 8-bit moments as they are.
_MOMENT8_PROJECT_BLOCKS: dict[tuple[str, int], TileConfig] = {
    **_BF16_MOMENT_PROJECT_BLOCKS,
    ("tc", 64): TileConfig(block_own=64, block_r=64, block_long=64, num_warps=8, num_stages=3),
    ("tc", 128): TileConfig(block_own=32, block_r=128, block_long=64, num_warps=8, num_stages=3),
}
_MOMENT8_GENERATED_PROJECT_BLOCKS: dict[tuple[str, int], TileConfig] = {
    **_BF16_MOMENT_GENERATED_PROJECT_BLOCKS}
# The full-rank modes (Fira, APOLLO; full_rank.py): launch A also sums G², R² and N² per line
# and stores R (Fira), launch B also holds a tile of G and the per-line coefficients. Their
# own tables, compiled by the AOT test with FULL_RANK 1 and 2 (both sides, offset widths, G
# layouts) and launched with .maxnreg 255 (full_rank_options): the 128×128 tensor-core tile of A
# becomes the 64×128 one; with bf16 moments the 64-wide rank tiles get 8 warps and the 128-wide
# ones 32 rows; generated bases with bf16 moments and 16-bit G take 32×32×32 tiles, Fira's
# launch B 64 rows (128 spilled) and, generated, a 64-long tile. Not tuned on a GPU (none was
# available): chosen for no spills with the plain tables' block shapes otherwise.
_FULL_RANK_PROJECT_BLOCKS: dict[tuple[str, int], TileConfig] = {
    **_PROJECT_BLOCKS,
    ("tc", 128): _BF16_MOMENT_PROJECT_BLOCKS[("tc", 128)],
}
_FULL_RANK_BF16_MOMENT_PROJECT_BLOCKS: dict[tuple[str, int], TileConfig] = {
    **_PROJECT_BLOCKS,
    ("tc", 64): TileConfig(block_own=64, block_r=64, block_long=64, num_warps=8, num_stages=3),
    ("tc", 128): TileConfig(block_own=32, block_r=128, block_long=64, num_warps=8, num_stages=3),
}
_FULL_RANK_GENERATED_PROJECT_BLOCKS: dict[tuple[str, int], TileConfig] = {
    **_GENERATED_PROJECT_BLOCKS,  # 64×64×64: 88 bytes (INT4, G^T, 64-bit offsets, sm_89)
    ("tc", 64): TileConfig(block_own=64, block_r=64, block_long=32, num_warps=8, num_stages=2),
}
_FULL_RANK_BF16_MOMENT_GENERATED_PROJECT_BLOCKS: dict[tuple[str, int], TileConfig] = {
    **_BF16_MOMENT_GENERATED_PROJECT_BLOCKS,
    # 64×32×64: 4 bytes (DCT, bf16 G transposed, sm_89); 32×32×64: 8-16 (INT4, G^T)
    ("tc", 32): TileConfig(block_own=32, block_r=32, block_long=32, num_warps=4, num_stages=2),
    ("fp32", 32): TileConfig(block_own=32, block_r=32, block_long=32, num_warps=4, num_stages=2),
}
_FULL_RANK_BACK_BLOCKS: dict[str, TileConfig] = {
    "16bit": TileConfig(block_own=64, block_r=64, block_long=128, num_warps=8, num_stages=3),
    "fp32": TileConfig(block_own=64, block_r=32, block_long=64, num_warps=8, num_stages=2),
}
_FULL_RANK_GENERATED_BACK_BLOCKS: dict[str, TileConfig] = {  # 128 long: 16 bytes (INT4, G^T)
    "16bit": TileConfig(block_own=64, block_r=32, block_long=64, num_warps=8, num_stages=3),
    "fp32": _GENERATED_BACK_BLOCKS["fp32"],
}
# The full-rank modes' launches let ptxas use every register (.maxnreg 255): without it ptxas
# stops at 128 on several of them (a DCT or INT4 basis generated in the tile, 64-bit offsets)
# and spills 4-16 bytes, with it they compile spill-free (AOT test); the plain step keeps its
# tuned defaults.
FULL_RANK_MAXNREG = 255


def full_rank_options(mode: int) -> dict[str, int]:
    """The extra launch (and AOT compile) options of a step in full-rank ``mode``."""
    return {"maxnreg": FULL_RANK_MAXNREG} if mode else {}


WIDE_RANK_TILE_FROM = 512  # dense tensor-core launch A: 64-wide rank tiles below this rank


def project_block_r(rank: int, kind: str, generated: bool = False) -> int:
    """Launch A's rank tile: the next power of two of r, clamped to [32, MAX_BLOCK_R[kind]]
    (MAX_GENERATED_BLOCK_R for an INT4 or DCT basis), and 64 for dense tensor-core ranks
    65..511 (measured faster than 128 there on an H100: twice the programs)."""
    limit = (MAX_GENERATED_BLOCK_R if generated else MAX_BLOCK_R)[kind]
    block = min(limit, max(MIN_BLOCK_R, triton.next_power_of_2(rank)))
    if kind == "tc" and rank < WIDE_RANK_TILE_FROM:
        block = min(block, 64)
    return block


def weight_kind(weight_dtype: torch.dtype) -> str:
    return "16bit" if weight_dtype in (torch.bfloat16, torch.float16) else "fp32"


def workspace_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """N's type: what launch B multiplies in (see the module docstring); fp32 for fp32 and INT8
    weights."""
    return weight_dtype if weight_dtype in (torch.bfloat16, torch.float16) else torch.float32


def _project_blocks(generated: bool, bf16_moments: bool, index_64: bool = False,
                    moments_8bit: bool = False, full_rank: bool = False
                    ) -> dict[tuple[str, int], TileConfig]:
    if full_rank:  # one table for both offset widths: it has no 128-row tile
        if generated:
            return (_FULL_RANK_BF16_MOMENT_GENERATED_PROJECT_BLOCKS if bf16_moments
                    else _FULL_RANK_GENERATED_PROJECT_BLOCKS)
        return _FULL_RANK_BF16_MOMENT_PROJECT_BLOCKS if bf16_moments else _FULL_RANK_PROJECT_BLOCKS
    if moments_8bit:
        return _MOMENT8_GENERATED_PROJECT_BLOCKS if generated else _MOMENT8_PROJECT_BLOCKS
    if generated:
        return _BF16_MOMENT_GENERATED_PROJECT_BLOCKS if bf16_moments else _GENERATED_PROJECT_BLOCKS
    if bf16_moments:
        return _BF16_MOMENT_PROJECT_BLOCKS
    return _INDEX_64_PROJECT_BLOCKS if index_64 else _PROJECT_BLOCKS


def _back_blocks(generated: bool, full_rank: bool = False) -> dict[str, TileConfig]:
    if full_rank:
        return _FULL_RANK_GENERATED_BACK_BLOCKS if generated else _FULL_RANK_BACK_BLOCKS
    return _GENERATED_BACK_BLOCKS if generated else _BACK_BLOCKS


def pick_configs(rank: int, weight_dtype: torch.dtype, grad_dtype: torch.dtype,
                 proj_dtype: torch.dtype, *, generated: bool = False, bf16_moments: bool = False,
                 index_64: bool = False, moments_8bit: bool = False, full_rank: bool = False
                 ) -> tuple[TileConfig, TileConfig]:
    """(launch A, launch B) configurations; any rank ≥ 1 (the rank is tiled, not held whole).
    proj_dtype is the type the basis enters launch A's dot in (BasisArgs.dot_dtype);
    ``generated``: an INT4 or DCT basis; ``bf16_moments``: M and V in bf16 (stochastic rounding
    in launch A); ``moments_8bit``: 8-bit codes (decoded and re-encoded in launch A);
    ``index_64``: 64-bit offsets; ``full_rank``: Fira or APOLLO (their own tables; never with
    8-bit moments). The AdaGrad rule takes its moment format's table (it holds one moment
    fewer). Launch B of INT8 weights is configured by int8_config instead."""
    kind = dot_kind(grad_dtype, proj_dtype)
    project = _project_blocks(generated, bf16_moments, index_64, moments_8bit, full_rank)
    return (project[(kind, project_block_r(rank, kind, generated))],
            _back_blocks(generated, full_rank)[weight_kind(weight_dtype)])


# Launch B of INT8 weights. Row-aligned groups (n % GROUP == 0, GROUP a power of two ≤ 256): a
# BLOCK_M × BLOCK_N tile of 4K elements with BLOCK_N = max(GROUP, 128) (16 fp32 accumulators per
# thread at 8 warps; 8K spills on sm_89 with a DCT basis, whose cos/sin tile is built in
# registers, and so do 512-wide tiles and a 64 × 64 one), K = r in chunks of 16 (fp32 FMA dot:
# the operands live in registers). Otherwise one program per BLOCK_GROUPS groups of
# next_power_of_2(GROUP) lanes, about 256 elements, times BLOCK_R ranks per gather chunk (a 4K
# element 3-D tile, 16 ranks for groups up to 256); with 64-bit offsets about 128 elements of
# groups (the 4K tile spills 128 bytes on sm_89 and sm_90 with an INT4 basis and groups of 6,
# AOT), the same rank chunks: the sums over r keep their order, so the bits do not change.
INT8_ROWS_MAX_GROUP = 256


@dataclasses.dataclass(frozen=True)
class Int8Config:
    """Launch B of INT8 weights: 'rows' (block_m × block_n tiles) or 'groups' (block_groups
    groups of block_g lanes)."""

    path: str
    group_size: int
    block_m: int = 0
    block_n: int = 0
    block_groups: int = 0
    block_g: int = 0
    block_r: int = 16
    num_warps: int = 8
    num_stages: int = 2


def int8_config(n: int, group_size: int, index_64: bool = False) -> Int8Config:
    """The INT8 launch B for an m×n weight with groups of ``group_size`` and 32- or 64-bit
    offsets (see above)."""
    pow2 = group_size & (group_size - 1) == 0
    if n % group_size == 0 and pow2 and group_size <= INT8_ROWS_MAX_GROUP:
        block_n = max(group_size, 128)
        return Int8Config("rows", group_size, block_m=4096 // block_n, block_n=block_n)
    block_g = triton.next_power_of_2(group_size)
    block_groups = max(1, (128 if index_64 else 256) // block_g)
    return Int8Config("groups", group_size, block_groups=block_groups, block_g=block_g,
                      block_r=max(1, min(16, 4096 // (max(1, 256 // block_g) * block_g))),
                      num_warps=4)


def int8_candidate_configs(index_64: bool = False) -> list[Int8Config]:
    """INT8 launch B configurations the AOT test compiles (per offset width): the row-aligned
    path for every power of two from 64 to INT8_ROWS_MAX_GROUP (smaller ones share the 64-wide
    tile's shape class), the general path for group 256 (a row length it does not divide), a
    tiny and a non-power-of-two group. Other group sizes compile on first use unchecked (groups
    of 512 and more spill a few bytes in the general kernel with a DCT basis)."""
    return [int8_config(n, g, index_64) for n, g in ((64, 64), (128, 128), (256, 256),
                                                     (257, 256), (7, 6), (97, 96))]


def candidate_configs(generated: bool = False, index_64: bool = False, full_rank: bool = False
                      ) -> list[tuple[str, str, TileConfig]]:
    """Every (kernel, dtype class, configuration) ``pick_configs`` can return for a dense basis,
    or with ``generated`` an INT4/DCT one, with 32- or 64-bit offsets, for GaLore or (with
    ``full_rank``) the Fira/APOLLO modes (the AOT test compiles them): kernel 'project' (A,
    class = dot kind) or 'back' (B, class = W's kind)."""
    project = _project_blocks(generated, bf16_moments=False, index_64=index_64,
                              full_rank=full_rank)
    return ([("project", kind, c) for (kind, _), c in project.items()]
            + [("back", kind, c) for kind, c in _back_blocks(generated, full_rank).items()])


def bf16_moment_candidate_configs(generated: bool = False, index_64: bool = False,
                                  full_rank: bool = False) -> list[tuple[str, str, TileConfig]]:
    """The launch A configurations ``pick_configs`` returns with bf16 moments (launch B does not
    touch the moments: candidate_configs covers it)."""
    return [("project", kind, c) for (kind, _), c in
            _project_blocks(generated, bf16_moments=True, index_64=index_64,
                            full_rank=full_rank).items()]


def moment8_candidate_configs(generated: bool = False, index_64: bool = False
                              ) -> list[tuple[str, str, TileConfig]]:
    """The launch A configurations ``pick_configs`` returns with 8-bit moments."""
    return [("project", kind, c) for (kind, _), c in
            _project_blocks(generated, False, index_64, moments_8bit=True).items()]


@dataclasses.dataclass(frozen=True)
class MomentArgs:
    """The moment arguments of launch A: the inner rule, and for 8-bit codes their fp32 block
    scales and block size (``scales``/``sq_scales`` point at exp_avg_sq when unused)."""

    adagrad: bool = False
    scales: torch.Tensor | None = None
    sq_scales: torch.Tensor | None = None
    block: int = reference.MOMENT_BLOCK_SIZE


def moment_kind(exp_avg_sq: torch.Tensor) -> str:
    """'fp32', 'bf16' or '8bit': which launch A table serves these moments."""
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.uint8: "8bit"}[exp_avg_sq.dtype]


def fused_galore_step(param: torch.Tensor, grad: torch.Tensor, proj: torch.Tensor,
                      exp_avg: torch.Tensor | None, exp_avg_sq: torch.Tensor, *, lr: float,
                      beta1: float, beta2: float, eps: float, weight_decay: float, scale: float,
                      step: int, proj_scales: torch.Tensor | None = None,
                      proj_zeros: torch.Tensor | None = None, proj_group_size: int = 256,
                      param_scales: torch.Tensor | None = None,
                      param_zeros: torch.Tensor | None = None, param_group_size: int = 256,
                      seed: int = 0, inner: str = "adam",
                      exp_avg_scales: torch.Tensor | None = None,
                      exp_avg_sq_scales: torch.Tensor | None = None,
                      state_block_size: int = reference.MOMENT_BLOCK_SIZE,
                      right: bool | None = None, full_rank: str = "none",
                      full_rank_norm: str = "channel", limiter: torch.Tensor | None = None,
                      limiter_growth: float = 1.01, scale_front: bool = False) -> None:
    """One fused step in place, with the op's schema signature (lowrank_kernels.ops
    .fused_galore_step documents the contract): validates, then launches A and B (with the
    full-rank modes' kernels of full_rank.py between them). proj: a dense float basis (any
    strides), a packed INT4 basis (uint8) or DCT frequencies (int32); param: float or INT8 codes
    (uint8); moments fp32, bf16 or 8-bit codes, exp_avg None for AdaGrad, a 1-D fp32 exp_avg_sq
    the factored V (launches A, F, C, B: module docstring); ``right`` overrides the side rule.
    CUDA tensors, or CPU tensors under TRITON_INTERPRET=1."""
    rank = _checks.check_fused_galore_step(
        param, grad, proj, exp_avg, exp_avg_sq, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
        weight_decay=weight_decay, scale=scale, step=step, proj_scales=proj_scales,
        proj_zeros=proj_zeros, proj_group_size=proj_group_size, param_scales=param_scales,
        param_zeros=param_zeros, param_group_size=param_group_size, seed=seed, inner=inner,
        exp_avg_scales=exp_avg_scales, exp_avg_sq_scales=exp_avg_sq_scales,
        state_block_size=state_block_size, right=right, full_rank=full_rank,
        full_rank_norm=full_rank_norm, limiter=limiter, limiter_growth=limiter_growth,
        scale_front=scale_front)
    if param.device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError(f"param: the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1), "
                         f"got device {param.device}")
    side = _checks.step_side(*param.shape, right)
    adagrad = inner == "adagrad"
    basis = basis_args(proj, *param.shape, rank, grad.dtype, proj_scales, proj_zeros,
                       proj_group_size, right=side)
    full = None
    if full_rank != "none":
        mode = FULL_RANK_MODES[full_rank]
        full = FullRankStep(mode, full_rank_norm == "tensor", limiter, limiter_growth,
                            scale_front, scale,
                            grad_scale(lr, beta1, beta2, weight_decay, scale, step, mode))
    launch(param, grad, proj, exp_avg, exp_avg_sq, rank,
           adam_coeffs(lr, beta1, beta2, eps, weight_decay, scale, step, adagrad=adagrad),
           basis=basis, param_scales=param_scales, param_zeros=param_zeros,
           param_group_size=param_group_size, philox_seed=rounding_philox_seed(seed, step),
           right=side, moments=MomentArgs(adagrad, exp_avg_scales, exp_avg_sq_scales,
                                          state_block_size), full_rank=full)


@dataclasses.dataclass(frozen=True)
class FullRankStep:
    """The full-rank arguments of one validated step (full_rank.py)."""

    mode: int  # full_rank.FIRA or APOLLO
    tensor_norm: bool
    limiter: torch.Tensor | None
    growth: float
    scale_front: bool
    scale: float
    grad_scale: float


def index_64_needed(param: torch.Tensor, grad: torch.Tensor, moment: torch.Tensor,
                    basis: BasisArgs, rank: int, right: bool | None = None) -> bool:
    """Whether a step's int32 offsets overflow past 2**31 (any tensor's span, the r·long
    elements of a generated basis, or a DCT phase): its launches then take INDEX_64. ``moment``:
    a low-rank state (V: AdaGrad has no M); ``right``: the side (None: the side rule)."""
    m, n = param.shape
    long = n if (is_right_side(m, n) if right is None else right) else m
    return (needs_index_64(param, grad, moment, basis.tensor)
            or needs_wide_phase(basis.kind, m, n)
            or (basis.kind != 0 and rank * long >= 2**31))


def launch(param, grad, proj, exp_avg, exp_avg_sq, rank: int, coeffs: dict[str, float],
           index_64: bool | None = None, *, basis: BasisArgs | None = None,
           param_scales: torch.Tensor | None = None, param_zeros: torch.Tensor | None = None,
           param_group_size: int = 256, philox_seed: int = 0,
           configs: tuple[TileConfig, TileConfig] | None = None, right: bool | None = None,
           moments: MomentArgs = MomentArgs(), full_rank: FullRankStep | None = None) -> None:
    """Launches A then B for one validated step (``coeffs`` from _common.adam_coeffs). ``basis``
    describes an INT4 or DCT proj (default: proj is a dense basis); a uint8 ``param`` holds INT8
    codes with their scales/zeros, requantized with u = tl.rand(philox_seed, index);
    ``philox_seed`` also keys the stochastic rounding of bf16 and 8-bit moments in launch A.
    ``right``: the side (None: the side rule); ``moments``: AdaGrad (exp_avg None) and the
    scales of 8-bit moments. ``configs``: (launch A, launch B) in place of ``pick_configs``
    (bench/tune_triton_step.py). ``full_rank``: Fira or APOLLO (full_rank.py runs its kernels
    between A and B; Adam with fp32/bf16 moments only). A 1-D ``exp_avg_sq`` (the factored V):
    launch A stores R and its partial sums, _launch_factored_adam runs the finalize and launch C,
    then launch B as for any V."""
    m, n = param.shape
    right = is_right_side(m, n) if right is None else right
    own, long = (m, n) if right else (n, m)
    if basis is None:
        basis = basis_args(proj, m, n, rank, grad.dtype, right=right)
    int8_weight = param.dtype == torch.uint8
    mode = full_rank.mode if full_rank is not None else 0
    factored = reference.is_factored(exp_avg_sq)
    state = exp_avg if factored else exp_avg_sq  # a moment of the low-rank shape
    if index_64 is None:
        index_64 = index_64_needed(param, grad, state, basis, rank, right)
    # a factored launch A touches no moment: the fp32 tables (launch C updates M)
    kind = "fp32" if factored else moment_kind(exp_avg_sq)
    project, back = configs or pick_configs(rank, param.dtype, grad.dtype, basis.dot_dtype,
                                            generated=basis.kind != 0,
                                            bf16_moments=kind == "bf16",
                                            index_64=index_64, moments_8bit=kind == "8bit",
                                            full_rank=mode != 0)
    # Fira folds N − c ⊙ R before rounding, so the full-rank modes keep N in fp32; a factored V
    # holds R there (launch C then writes N, in place or into W's type)
    normalized = torch.empty(state.shape, dtype=torch.float32 if mode or factored else
                             workspace_dtype(param.dtype), device=param.device)
    buffers = (full_rank_buffers(mode, own, exp_avg_sq.shape, triton.cdiv(rank, project.block_r),
                                 param.device) if mode else None)
    interpreted = param.device.type == "cpu"
    # INT8 weights and 8-bit moments: no FMA contraction, so that every fp32 operation rounds as
    # on the CPU (lowrank/adam.h, quant.h, moments8.h) and the codes are the CPU kernel's
    # wherever the fp32 values agree. A factored launch A rounds nothing (launch C does).
    exact = ({"enable_fp_fusion": False} if (int8_weight or kind == "8bit") and not factored
             else {})
    registers = full_rank_options(mode)
    basis_strides = (basis.stride_rank, basis.stride_long)
    grid_a = (triton.cdiv(own, project.block_own) * triton.cdiv(rank, project.block_r),)
    if factored:  # R into the fp32 workspace; moment pointers unused (one variant for all M)
        moment_ptrs = (normalized,) * 4
        partials = torch.empty(factored_partials_numel(own, rank, project), dtype=torch.float32,
                               device=param.device)
        extra_ptrs = (normalized, partials)
    else:
        moment_ptrs = (exp_avg if exp_avg is not None else exp_avg_sq, exp_avg_sq,
                       moments.scales if moments.scales is not None else exp_avg_sq,
                       moments.sq_scales if moments.sq_scales is not None else exp_avg_sq)
        extra_ptrs = _full_rank_pointers(buffers, normalized)[:2]
    _project_adam_kernel[grid_a](
        grad, *basis.pointers, *moment_ptrs, normalized, *extra_ptrs,
        *grad.stride(), *basis_strides, moment_ptrs[1].stride(0), normalized.stride(0),
        m, n, rank, triton.cdiv(rank, moments.block),
        coeffs["beta1"], coeffs["beta2"], coeffs["one_minus_beta1"], coeffs["one_minus_beta2"],
        coeffs["eps"], philox_seed,
        RIGHT=right, BLOCK_OWN=project.block_own, BLOCK_R=project.block_r,
        BLOCK_LONG=project.block_long, BASIS=basis.kind, PROJ_GROUP=basis.group_size,
        INDEX_64=index_64, INTERPRETED=interpreted, ADAGRAD=moments.adagrad,
        MOMENT_BLOCK=moments.block if kind == "8bit" else reference.MOMENT_BLOCK_SIZE,
        FULL_RANK=mode, FACTORED=int(factored), num_warps=project.num_warps,
        num_stages=project.num_stages, **exact, **registers,
    )
    if factored:
        normalized = _launch_factored_adam(normalized, partials, exp_avg, exp_avg_sq, moments,
                                           coeffs, philox_seed, right, own, rank, project,
                                           workspace_dtype(param.dtype), index_64, interpreted)
    if mode:
        finalize_full_rank(buffers, basis, rank, long, right,
                           tensor_norm=full_rank.tensor_norm, limiter=full_rank.limiter,
                           scale=full_rank.scale, scale_front=full_rank.scale_front,
                           growth=full_rank.growth, grad_scale_=full_rank.grad_scale,
                           index_64=index_64, interpreted=interpreted)
    full_rank_args = (grad, *_full_rank_pointers(buffers, normalized)[2:])
    if int8_weight:
        _launch_int8_update(param, param_scales, param_zeros, param_group_size, philox_seed,
                            basis, normalized, rank, coeffs, index_64, interpreted, right,
                            full_rank_args, mode)
        return
    grid_b = (triton.cdiv(own, back.block_own) * triton.cdiv(long, back.block_long),)
    _back_project_kernel[grid_b](
        param, *basis.pointers, normalized, *full_rank_args,
        param.stride(0), *basis_strides, normalized.stride(0), *grad.stride(),
        m, n, rank,
        coeffs["decay"], coeffs["update_scale"],
        RIGHT=right, BLOCK_OWN=back.block_own, BLOCK_LONG=back.block_long,
        BLOCK_R=back.block_r, BASIS=basis.kind, PROJ_GROUP=basis.group_size,
        INDEX_64=index_64, INTERPRETED=interpreted, FULL_RANK=mode,
        num_warps=back.num_warps, num_stages=back.num_stages, **registers,
    )


# Launch C of a factored V: elementwise, no dot; a 64×32 tile (2048 elements, 16 per thread at
# 4 warps) keeps the 8-bit M's block absmax in registers; the rank tile of 32 is a multiple of
# every state_block_size (_checks.MAX_MOMENT_BLOCK).
FACTORED_ADAM_CONFIG = TileConfig(block_own=64, block_r=32, block_long=0, num_warps=4,
                                  num_stages=1)
FACTORED_FINALIZE_BLOCK = 1024  # own-lines per program of the finalize (the rank too, program 0)
FACTORED_FINALIZE_WARPS = 4


def factored_partials_numel(own: int, rank: int, project: TileConfig) -> int:
    """fp32 elements of launch A's partial sums with a factored V: ⌈own/BLOCK_OWN⌉·r column
    partials, ⌈r/BLOCK_R⌉·own line partials and the clamped mean ā."""
    return (triton.cdiv(own, project.block_own) * rank + triton.cdiv(rank, project.block_r) * own
            + 1)


def _launch_factored_adam(low_rank, partials, exp_avg, factors, moments, coeffs, philox_seed,
                          right, own, rank, project, n_dtype, index_64, interpreted):
    """The finalize and launch C of a factored V after launch A (which wrote R into
    ``low_rank`` and its partial sums into ``partials``); returns N in ``n_dtype`` (``low_rank``
    itself, overwritten in place, when that is fp32)."""
    own_tiles, r_tiles = triton.cdiv(own, project.block_own), triton.cdiv(rank, project.block_r)
    mean = partials[-1:]
    # FMA contraction off in both: the fp32 operations of the reference, rounded one by one
    _factored_finalize_kernel[(1 + triton.cdiv(own, FACTORED_FINALIZE_BLOCK),)](
        factors, partials, mean, own, rank, own_tiles, r_tiles,
        coeffs["beta2"], coeffs["one_minus_beta2"], BLOCK=FACTORED_FINALIZE_BLOCK,
        num_warps=FACTORED_FINALIZE_WARPS, enable_fp_fusion=False)
    normalized = (low_rank if n_dtype == torch.float32
                  else torch.empty(low_rank.shape, dtype=n_dtype, device=low_rank.device))
    eight_bit = exp_avg.dtype == torch.int8
    config = FACTORED_ADAM_CONFIG
    grid = (triton.cdiv(own, config.block_own) * triton.cdiv(rank, config.block_r),)
    _factored_adam_kernel[grid](
        low_rank, normalized, exp_avg, moments.scales if eight_bit else exp_avg, factors, mean,
        exp_avg.stride(0), low_rank.stride(0), normalized.stride(0), own, rank,
        triton.cdiv(rank, moments.block), coeffs["beta1"], coeffs["one_minus_beta1"],
        coeffs["eps"], philox_seed,
        RIGHT=right, BLOCK_OWN=config.block_own, BLOCK_R=config.block_r,
        MOMENT_BLOCK=moments.block if eight_bit else reference.MOMENT_BLOCK_SIZE,
        INDEX_64=index_64, INTERPRETED=interpreted, num_warps=config.num_warps,
        num_stages=config.num_stages, enable_fp_fusion=False)
    return normalized


def _full_rank_pointers(buffers, normalized: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(LowRank, LineSums, LowRank, LineCoef, GradCoef) kernel arguments: the full-rank
    workspaces, or ``normalized`` (a valid pointer, never read) where a mode does not use one."""
    if buffers is None:
        return (normalized,) * 5
    low_rank = buffers.low_rank if buffers.low_rank is not None else normalized
    return low_rank, buffers.line_sums, low_rank, buffers.line_coef, buffers.grad_coef


def _launch_int8_update(codes, scales, zeros, group_size, philox_seed, basis, normalized, rank,
                        coeffs, index_64, interpreted, right, full_rank_args, mode):
    m, n = codes.shape
    config = int8_config(n, group_size, index_64)
    if interpreted and config.path == "groups":  # the interpreter pays per program
        config = dataclasses.replace(config, block_groups=max(1, 4096 // config.block_g))
    common = {"RIGHT": right, "BLOCK_R": config.block_r, "GROUP": group_size,
              "BASIS": basis.kind, "PROJ_GROUP": basis.group_size, "INDEX_64": index_64,
              "INTERPRETED": interpreted, "FULL_RANK": mode, "num_warps": config.num_warps,
              "num_stages": config.num_stages, "enable_fp_fusion": False,
              **full_rank_options(mode)}
    grad = full_rank_args[0]
    args = (codes, scales, zeros, *basis.pointers, normalized, *full_rank_args,
            basis.stride_rank, basis.stride_long, normalized.stride(0), *grad.stride())
    if config.path == "rows":
        grid = (triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n),)
        _int8_update_rows_kernel[grid](
            *args, m, n, rank, coeffs["decay"], coeffs["update_scale"], philox_seed,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, **common)
    else:
        groups = triton.cdiv(m * n, group_size)
        grid = (triton.cdiv(groups, config.block_groups),)
        _int8_update_groups_kernel[grid](
            *args, m, n, rank, m * n, groups, coeffs["decay"], coeffs["update_scale"],
            philox_seed, BLOCK_GROUPS=config.block_groups, BLOCK_G=config.block_g, **common)
