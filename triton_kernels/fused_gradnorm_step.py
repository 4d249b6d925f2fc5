"""fused_gradnorm_step in Triton: the GradNormLoRP step (DESIGN.md §4.8), the kernel of
``torch.ops.lowrank.fused_gradnorm_step`` on CUDA tensors.

What it computes, per row i of the m×n weight (W = g ⊙ v/‖v‖ kept as W with the fp32 row states
row_scale = g, row_norm = ‖v‖ and g's Adam moments), R the projected gradient (side by §4.1),
d = decay = 1 − lr·wd, us = update_scale = d·α_t·scale (csrc/include/lowrank/adam.h):

    a_i = d·row_norm_i/row_scale_i     γ_i = Σ_j G_ij·W_ij     ∇g_i = γ_i/row_scale_i
    N = Adam(R; M, V)                  N_g = Adam(∇g; M_g, V_g)   g'_i = d·(row_norm_i − α_t·N_g,i)
    v'_i = a_i·W_i − us·back(N)_i      W_i ← (g'_i/‖v'_i‖)·v'_i,  row_scale ← g', row_norm ← ‖v'‖

‖v'_i‖ needs a whole row of back(N) before any of the row is written, and a row is not one
program's. So the step runs as small launches around the two of the GaLore step (fused_galore_step
.py, whose tiling and basis formats it shares: dense values of any strides, packed INT4, DCT):

  right side (m ≥ n; rows are the owned axis, R = G Qᵀ is m×r):
    K.  _gram_kernel: K = Q Qᵀ (r×r fp32), BLOCK_R × BLOCK_R tiles reduced over n.
    A.  _gradnorm_project_kernel: per BLOCK_OWN × BLOCK_R tile, streaming G and W once over the
        whole long axis: R = G Qᵀ and U = W Qᵀ (two dots on one basis chunk), γ_i and
        ω_i = ‖W_i‖² (whole rows: each program reduces the whole axis); Adam on R → N (M, V
        stored); N and U into fp32 workspaces (m×r), γ and ω by the first rank tile.
    F.  _gradnorm_rows_kernel: per BLOCK_M rows, s_i = N_i·U_i and q_i = N_i K N_iᵀ from the
        workspaces (all r, in BLOCK_R chunks), the Gram form
            ‖v'_i‖² = a_i²·ω_i − 2·a_i·us·s_i + us²·q_i
        (exact for any basis: v'_i = a_i W_i − us·N_i Q); then g's Adam step, g', the row
        states, and the two row coefficients f_i·a_i and f_i·us, f_i = g'_i/‖v'_i‖.
    B.  _gradnorm_update_kernel: W ← (f·a)_i·W − (f·us)_i·back(N), tiles as GaLore's launch B.
  left side (m < n; columns are the owned axis, R = Pᵀ G is r×n, the rows' sums cross programs):
    A.  _gradnorm_project_kernel: R = Pᵀ G, Adam → N into the workspace (r×n), and per (row,
        column strip) partial sums of γ_i (first rank tile only: W is read once).
    V.  _gradnorm_vnorm_kernel: per (column, row) tile, back(N) and the partial sums of ‖v'_i‖²
        over the tile's columns (direct: v' needs only a_i).
    F.  _gradnorm_rows_kernel: the partials summed over strips in index order, then as above.
    B.  as above.

DRAM bytes per call (s(X) the element size of X; the GaLore step's §5 floor is
m·n·(s(G) + 2·s(W)) + the states):
    right: G read once, W read twice (A, B) and written once: m·n·(s(G) + 3·s(W)); the fp32
           workspaces N and U written once and read once more (F; B reads N again):
           4·m·r·4 + m·r·4; K: r²·4 written, read ⌈m/BLOCK_M⌉ times from L2.
    left:  G read once, W read three times (A, V, B) and written once: m·n·(s(G) + 4·s(W));
           N written once and read twice (3·r·n·4); partials 2·m·⌈n/strip⌉·4 bytes.
    both:  M, V read and written once (4·r·own·s(state); 8-bit codes: s = 1, plus their fp32
           block scales, 4·own·⌈r/B⌉·4); the row states 4·m·4 read and written.
Launch A's moment epilogue is GaLore's (_common._adam_tile: fp32, bf16 or 8-bit moments, the
same Philox words and codes; launched with enable_fp_fusion=False for 8-bit codes).
Nothing is synchronised with the host; every temporary is low-rank or per-row sized.

Precision: R and U accumulate in fp32 (tensor cores when both operands share a 16-bit type,
else exact "ieee" dots; a generated basis enters as hi + lo in the other operand's type,
_common._dot_basis). N, U, K, the row sums and the row arithmetic are fp32. The back projection
of launches V and B multiplies in W's type when W is 16-bit (N and the basis rounded once, as in
the GaLore step and in galore-torch), exactly in fp32 otherwise; V and B share that code, so the
‖v'‖ of the left side is the norm of the row B writes before its final rounding. The right
side's Gram form uses the fp32 N: it differs from that row's norm by the 16-bit rounding of
back(N), ≤ 2⁻⁸ of the update's share of v' (docs/methods.md measures the Gram form against the
direct sum). W is rounded once to its dtype.

GPU verification: interpreter runs on CPU tensors (tests/test_fused_gradnorm_step.py) and AOT
compilation for sm_89/sm_90 without spills (tests/test_triton_aot.py); it has not run on a GPU.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import triton
import triton.language as tl

from lowrank_kernels import _checks
from lowrank_kernels.reference import is_right_side, rounding_philox_seed

from ._common import (
    BasisArgs,
    _adam_tile,
    _basis_tile,
    _dot_basis,
    _gram_kernel,
    _grid_tile,
    _own_long,
    _round_to,
    _tile_offsets,
    _weight_tile_back,
    adam_coeffs,
    basis_args,
    dot_kind,
)
from .fused_galore_step import _BACK_BLOCKS as _GALORE_BACK_BLOCKS
from .fused_galore_step import _GENERATED_BACK_BLOCKS as _GALORE_GENERATED_BACK_BLOCKS
from .fused_galore_step import (
    MomentArgs,
    TileConfig,
    index_64_needed,
    weight_kind,
)


@triton.jit
def _gradnorm_project_kernel(
    G_ptr, W_ptr, Proj_ptr, ProjScales_ptr, ProjZeros_ptr, ExpAvg_ptr, ExpAvgSq_ptr,
    ExpAvgScales_ptr, ExpAvgSqScales_ptr, Normalized_ptr, ProjW_ptr, RowSums_ptr,
    stride_gm, stride_gn, stride_wm, stride_pr, stride_pl, stride_statem,
    M, N, R, num_blocks,
    beta1, beta2, one_minus_beta1, one_minus_beta2, eps, philox_seed,
    RIGHT: tl.constexpr, BLOCK_OWN: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_LONG: tl.constexpr, BASIS: tl.constexpr, PROJ_GROUP: tl.constexpr,
    INDEX_64: tl.constexpr, INTERPRETED: tl.constexpr, MOMENT_BLOCK: tl.constexpr,
):
    """Launch A: R = project(G) for one BLOCK_OWN × BLOCK_R tile, Adam → N (fp32 workspace),
    and the row sums of G⊙W. Right: also U = W Qᵀ (fp32 workspace) and, by the first rank
    tile, γ (RowSums[0:m]) and ω = ‖W_i‖² (RowSums[m:2m]). Left: by the first rank tile, the
    partial γ of every row over this column strip, RowSums[row·strips + strip]."""
    OWN, LONG = _own_long(M, N, RIGHT)
    offs_own, offs_r, own_mask, r_mask = _grid_tile(OWN, R, BLOCK_OWN, BLOCK_R, INDEX_64)
    num_r_tiles = tl.cdiv(R, BLOCK_R)
    first_r_tile = tl.program_id(0) % num_r_tiles == 0
    strip = tl.program_id(0) // num_r_tiles
    num_strips = tl.cdiv(OWN, BLOCK_OWN)

    proj_low = tl.zeros((BLOCK_OWN, BLOCK_R), dtype=tl.float32)
    proj_w = tl.zeros((BLOCK_OWN, BLOCK_R), dtype=tl.float32)
    gamma = tl.zeros((BLOCK_OWN,), dtype=tl.float32)
    omega = tl.zeros((BLOCK_OWN,), dtype=tl.float32)
    for start in range(0, LONG, BLOCK_LONG):
        offs_long = start + tl.arange(0, BLOCK_LONG)
        if INDEX_64:
            offs_long = offs_long.to(tl.int64)
        long_mask = offs_long < LONG
        tile_mask = own_mask[:, None] & long_mask[None, :]
        g = tl.load(G_ptr + _tile_offsets(offs_own, offs_long, stride_gm, stride_gn, RIGHT),
                    mask=tile_mask, other=0.0)
        basis = _basis_tile(Proj_ptr, ProjScales_ptr, ProjZeros_ptr, offs_r, offs_long, r_mask,
                            long_mask, stride_pr, stride_pl, LONG, True, BASIS, PROJ_GROUP)
        proj_low = _dot_basis(g, basis, proj_low, BASIS, INTERPRETED)
        w_offs = _tile_offsets(offs_own, offs_long, stride_wm, 1, RIGHT)
        if RIGHT:
            w = tl.load(W_ptr + w_offs, mask=tile_mask, other=0.0)
            proj_w = _dot_basis(w, basis, proj_w, BASIS, INTERPRETED)
            w32 = w.to(tl.float32)
            gamma += tl.sum(g.to(tl.float32) * w32, axis=1)
            omega += tl.sum(w32 * w32, axis=1)
        elif first_r_tile:
            w = tl.load(W_ptr + w_offs, mask=tile_mask, other=0.0)
            # the tile is (columns, rows): sum over this strip's columns, for each row
            part = tl.sum(g.to(tl.float32) * w.to(tl.float32), axis=0)
            tl.store(RowSums_ptr + offs_long * num_strips + strip, part, mask=long_mask)

    state_offs = _tile_offsets(offs_own, offs_r, stride_statem, 1, RIGHT)
    state_mask = own_mask[:, None] & r_mask[None, :]
    normalized = _adam_tile(ExpAvg_ptr, ExpAvgSq_ptr, ExpAvgScales_ptr, ExpAvgSqScales_ptr,
                            state_offs, state_mask, offs_own, offs_r, own_mask, num_blocks,
                            proj_low, beta1, beta2, one_minus_beta1, one_minus_beta2, eps,
                            philox_seed, False, BLOCK_OWN, BLOCK_R, MOMENT_BLOCK)
    tl.store(Normalized_ptr + state_offs, normalized, mask=state_mask)
    if RIGHT:
        tl.store(ProjW_ptr + state_offs, proj_w, mask=state_mask)
        row_mask = own_mask & first_r_tile
        tl.store(RowSums_ptr + offs_own, gamma, mask=row_mask)
        tl.store(RowSums_ptr + OWN + offs_own, omega, mask=row_mask)


@triton.jit
def _row_factor(RowScale_ptr, RowNorm_ptr, rows, mask, decay):
    """a_i = d·row_norm_i/row_scale_i (v = (row_norm/row_scale)·W) and row_scale_i."""
    scale = tl.load(RowScale_ptr + rows, mask=mask, other=1.0)
    norm = tl.load(RowNorm_ptr + rows, mask=mask, other=1.0)
    return decay * tl.div_rn(norm, scale), scale, norm


@triton.jit
def _gradnorm_rows_kernel(
    RowScale_ptr, RowNorm_ptr, ScaleExpAvg_ptr, ScaleExpAvgSq_ptr, RowSums_ptr, VnormParts_ptr,
    Normalized_ptr, ProjW_ptr, Gram_ptr, Coeffs_ptr,
    M, R, strips_a, strips_v,
    beta1, beta2, one_minus_beta1, one_minus_beta2, eps, decay, update_scale, step_size,
    RIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_PARTS: tl.constexpr, INDEX_64: tl.constexpr,
):
    """Launch F, per BLOCK_M rows: γ_i and ‖v'_i‖² (right: γ, ω from launch A and the Gram form
    from N, U, K; left: the strips' partial sums, in index order), then ∇g_i = γ_i/g_i, Adam
    on g (fp32 moments), g' = d·(row_norm − α_t·N_g), ‖v'‖, the row states, and the update's
    row coefficients Coeffs[0:m] = f·a, Coeffs[m:2m] = f·us with f = g'/‖v'‖."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    if INDEX_64:
        rows = rows.to(tl.int64)
    row_mask = rows < M
    a, scale, norm = _row_factor(RowScale_ptr, RowNorm_ptr, rows, row_mask, decay)
    if RIGHT:
        gamma = tl.load(RowSums_ptr + rows, mask=row_mask, other=0.0)
        omega = tl.load(RowSums_ptr + M + rows, mask=row_mask, other=0.0)
        cross = tl.zeros((BLOCK_M,), dtype=tl.float32)  # N_i·U_i
        quad = tl.zeros((BLOCK_M,), dtype=tl.float32)  # N_i K N_iᵀ
        for k_start in range(0, R, BLOCK_R):
            offs_k = k_start + tl.arange(0, BLOCK_R)
            mask_k = row_mask[:, None] & (offs_k < R)[None, :]
            n_k = tl.load(Normalized_ptr + rows[:, None] * R + offs_k[None, :], mask=mask_k,
                          other=0.0)
            u_k = tl.load(ProjW_ptr + rows[:, None] * R + offs_k[None, :], mask=mask_k,
                          other=0.0)
            cross += tl.sum(n_k * u_k, axis=1)
            nk = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for j_start in range(0, R, BLOCK_R):
                offs_j = j_start + tl.arange(0, BLOCK_R)
                n_j = tl.load(Normalized_ptr + rows[:, None] * R + offs_j[None, :],
                              mask=row_mask[:, None] & (offs_j < R)[None, :], other=0.0)
                k_jk = tl.load(Gram_ptr + offs_j[:, None] * R + offs_k[None, :],
                               mask=(offs_j < R)[:, None] & (offs_k < R)[None, :], other=0.0)
                nk = tl.dot(n_j, k_jk, nk, input_precision="ieee")
            quad += tl.sum(nk * n_k, axis=1)
        vsq = a * a * omega - 2.0 * a * update_scale * cross + update_scale * update_scale * quad
        vsq = tl.maximum(vsq, 0.0)
    else:
        gamma = _sum_parts(RowSums_ptr, rows, row_mask, strips_a, BLOCK_M, BLOCK_PARTS)
        vsq = _sum_parts(VnormParts_ptr, rows, row_mask, strips_v, BLOCK_M, BLOCK_PARTS)
    grad_scale = tl.div_rn(gamma, scale)
    exp_avg = tl.load(ScaleExpAvg_ptr + rows, mask=row_mask, other=0.0)
    exp_avg_sq = tl.load(ScaleExpAvgSq_ptr + rows, mask=row_mask, other=0.0)
    exp_avg = beta1 * exp_avg + one_minus_beta1 * grad_scale
    exp_avg_sq = beta2 * exp_avg_sq + one_minus_beta2 * grad_scale * grad_scale
    normalized = tl.div_rn(exp_avg, tl.sqrt_rn(exp_avg_sq) + eps)
    new_scale = (norm - step_size * normalized) * decay
    new_norm = tl.sqrt_rn(tl.where(row_mask, vsq, 1.0))  # rows past m: no 0/0 below
    factor = tl.div_rn(new_scale, new_norm)
    tl.store(ScaleExpAvg_ptr + rows, exp_avg, mask=row_mask)
    tl.store(ScaleExpAvgSq_ptr + rows, exp_avg_sq, mask=row_mask)
    tl.store(RowScale_ptr + rows, new_scale, mask=row_mask)
    tl.store(RowNorm_ptr + rows, new_norm, mask=row_mask)
    tl.store(Coeffs_ptr + rows, factor * a, mask=row_mask)
    tl.store(Coeffs_ptr + M + rows, factor * update_scale, mask=row_mask)


@triton.jit
def _sum_parts(Parts_ptr, rows, row_mask, num_parts, BLOCK_M: tl.constexpr,
               BLOCK_PARTS: tl.constexpr):
    """Σ_p Parts[row·num_parts + p] per row, chunk after chunk of BLOCK_PARTS in index order."""
    total = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start in range(0, num_parts, BLOCK_PARTS):
        offs = start + tl.arange(0, BLOCK_PARTS)
        parts = tl.load(Parts_ptr + rows[:, None] * num_parts + offs[None, :],
                        mask=row_mask[:, None] & (offs < num_parts)[None, :], other=0.0)
        total += tl.sum(parts, axis=1)
    return total


@triton.jit
def _row_vector(Ptr, offs_own, offs_long, own_mask, long_mask, RIGHT: tl.constexpr):
    """Per-row values broadcast over an (own, long) tile: rows are the owned axis on the right
    side, the long one on the left."""
    if RIGHT:
        values = tl.load(Ptr + offs_own, mask=own_mask, other=0.0)[:, None]
    else:
        values = tl.load(Ptr + offs_long, mask=long_mask, other=0.0)[None, :]
    return values


@triton.jit
def _gradnorm_vnorm_kernel(
    W_ptr, Proj_ptr, ProjScales_ptr, ProjZeros_ptr, Normalized_ptr, RowScale_ptr, RowNorm_ptr,
    VnormParts_ptr,
    stride_wm, stride_pr, stride_pl, stride_normm,
    M, N, R,
    decay, update_scale,
    BLOCK_OWN: tl.constexpr, BLOCK_LONG: tl.constexpr, BLOCK_R: tl.constexpr,
    BASIS: tl.constexpr, PROJ_GROUP: tl.constexpr, INDEX_64: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    """Launch V (left side only): for one BLOCK_OWN (columns) × BLOCK_LONG (rows) tile,
    v' = a_i·W − us·back(N) and Σ over the tile's columns of v'² per row, into
    VnormParts[row·strips + column strip]."""
    _, offs_long, _, long_mask, _, w_mask, w, back = _weight_tile_back(
        W_ptr, Proj_ptr, ProjScales_ptr, ProjZeros_ptr, Normalized_ptr, stride_wm, stride_pr,
        stride_pl, stride_normm, M, N, R, False, BLOCK_OWN, BLOCK_LONG, BLOCK_R, BASIS,
        PROJ_GROUP, INDEX_64, INTERPRETED)
    a, _, _ = _row_factor(RowScale_ptr, RowNorm_ptr, offs_long, long_mask, decay)
    v = a[None, :] * w - update_scale * back
    part = tl.sum(tl.where(w_mask, v * v, 0.0), axis=0)
    # the tile is (columns, rows) of W: its column strip is the owned tile index (_grid_tile)
    strip = tl.program_id(0) // tl.cdiv(M, BLOCK_LONG)
    tl.store(VnormParts_ptr + offs_long * tl.cdiv(N, BLOCK_OWN) + strip, part, mask=long_mask)


@triton.jit
def _gradnorm_update_kernel(
    W_ptr, Proj_ptr, ProjScales_ptr, ProjZeros_ptr, Normalized_ptr, Coeffs_ptr,
    stride_wm, stride_pr, stride_pl, stride_normm,
    M, N, R,
    RIGHT: tl.constexpr, BLOCK_OWN: tl.constexpr, BLOCK_LONG: tl.constexpr,
    BLOCK_R: tl.constexpr, BASIS: tl.constexpr, PROJ_GROUP: tl.constexpr,
    INDEX_64: tl.constexpr, INTERPRETED: tl.constexpr,
):
    """Launch B: W ← Coeffs[i]·W − Coeffs[m + i]·back(N) on one BLOCK_OWN × BLOCK_LONG tile,
    rounded once to W's dtype."""
    offs_own, offs_long, own_mask, long_mask, w_offs, w_mask, w, back = _weight_tile_back(
        W_ptr, Proj_ptr, ProjScales_ptr, ProjZeros_ptr, Normalized_ptr, stride_wm, stride_pr,
        stride_pl, stride_normm, M, N, R, RIGHT, BLOCK_OWN, BLOCK_LONG, BLOCK_R, BASIS,
        PROJ_GROUP, INDEX_64, INTERPRETED)
    coeff_w = _row_vector(Coeffs_ptr, offs_own, offs_long, own_mask, long_mask, RIGHT)
    coeff_back = _row_vector(Coeffs_ptr + M, offs_own, offs_long, own_mask, long_mask, RIGHT)
    tl.store(W_ptr + w_offs, _round_to(coeff_w * w - coeff_back * back, W_ptr.dtype.element_ty,
                                       INTERPRETED), mask=w_mask)


# --------------------------------------------------------------------------------------------
# launch configuration
# --------------------------------------------------------------------------------------------
# Launch A holds two fp32 accumulators (R and U on the right side) besides the Adam epilogue's
# R, M, V and N, so its tiles are at most 64 ranks wide, per dot kind; generated bases (INT4,
# DCT: values built in registers, hi/lo split) have their own entries. Launches V and B are
# GaLore's launch B plus a per-row epilogue, with N read in fp32 (rounded to a 16-bit W's type
# after the load): GaLore's tiles with a 32-rank chunk for 16-bit weights (its 64-rank chunk
# stages 128 KiB of fp32 N and basis in shared memory, above sm_89's 99 KiB); with a generated
# basis its 3-stage 128×128 tile overflows too (INT4: 104 KiB) and spills 40 bytes with 64-bit
# offsets, so 64 rows and 2 stages there (the AOT test). The fp32 launch A on a generated basis
# spills 8-64 bytes with 32-long chunks (64-bit offsets, DCT and INT4): 16-long ones.
_PROJECT_BLOCKS: dict[tuple[str, int], TileConfig] = {
    ("tc", 32): TileConfig(block_own=64, block_r=32, block_long=64, num_warps=4, num_stages=3),
    ("tc", 64): TileConfig(block_own=64, block_r=64, block_long=64, num_warps=8, num_stages=3),
    ("fp32", 32): TileConfig(block_own=32, block_r=32, block_long=32, num_warps=8, num_stages=2),
}
_GENERATED_PROJECT_BLOCKS: dict[tuple[str, int], TileConfig] = {
    ("tc", 32): TileConfig(block_own=64, block_r=32, block_long=32, num_warps=4, num_stages=2),
    ("tc", 64): TileConfig(block_own=64, block_r=64, block_long=32, num_warps=8, num_stages=2),
    ("fp32", 32): TileConfig(block_own=32, block_r=32, block_long=16, num_warps=8, num_stages=2),
}
_BACK_BLOCKS = {
    "16bit": TileConfig(block_own=128, block_r=32, block_long=128, num_warps=8, num_stages=3),
    "fp32": _GALORE_BACK_BLOCKS["fp32"],
}
_GENERATED_BACK_BLOCKS = {
    "16bit": TileConfig(block_own=64, block_r=32, block_long=128, num_warps=8, num_stages=2),
    "fp32": _GALORE_GENERATED_BACK_BLOCKS["fp32"],
}
MAX_BLOCK_R = {"tc": 64, "fp32": 32}


@dataclasses.dataclass(frozen=True)
class SmallConfig:
    """Launches K and F: block sizes and warps."""

    block_a: int
    block_b: int
    block_c: int = 0
    num_warps: int = 4


# BLOCK_R, BLOCK_LONG: a 64-long chunk spills 8 bytes with a DCT basis and 64-bit offsets
GRAM_CONFIG = SmallConfig(block_a=32, block_b=32)
ROWS_CONFIG = SmallConfig(block_a=32, block_b=32, block_c=32)  # BLOCK_M, BLOCK_R, BLOCK_PARTS


def project_config(rank: int, grad_dtype: torch.dtype, proj_dtype: torch.dtype,
                   generated: bool) -> TileConfig:
    """Launch A: the next power of two of r in [32, MAX_BLOCK_R[kind]]."""
    kind = dot_kind(grad_dtype, proj_dtype)
    block = min(MAX_BLOCK_R[kind], max(32, triton.next_power_of_2(rank)))
    return (_GENERATED_PROJECT_BLOCKS if generated else _PROJECT_BLOCKS)[(kind, block)]


def back_config(weight_dtype: torch.dtype, generated: bool) -> TileConfig:
    """Launches V and B: GaLore's launch B table."""
    return (_GENERATED_BACK_BLOCKS if generated else _BACK_BLOCKS)[weight_kind(weight_dtype)]


def candidate_configs(generated: bool = False) -> list[tuple[str, str, TileConfig]]:
    """Every (kernel, dtype class, configuration) the launcher can pick for launches A, V and B
    (the AOT test compiles them; K and F have one configuration each)."""
    project = _GENERATED_PROJECT_BLOCKS if generated else _PROJECT_BLOCKS
    back = _GENERATED_BACK_BLOCKS if generated else _BACK_BLOCKS
    return ([("gn_project", kind, c) for (kind, _), c in project.items()]
            + [(k, kind, c) for k in ("gn_vnorm", "gn_update") for kind, c in back.items()])


def fused_gradnorm_step(param: torch.Tensor, grad: torch.Tensor, proj: torch.Tensor,
                        exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                        row_scale: torch.Tensor, row_norm: torch.Tensor,
                        scale_exp_avg: torch.Tensor, scale_exp_avg_sq: torch.Tensor, *,
                        lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                        scale: float, step: int, proj_scales: torch.Tensor | None = None,
                        proj_zeros: torch.Tensor | None = None, proj_group_size: int = 256,
                        seed: int = 0, exp_avg_scales: torch.Tensor | None = None,
                        exp_avg_sq_scales: torch.Tensor | None = None,
                        state_block_size: int = 32) -> None:
    """One GradNormLoRP step in place, with the op's schema signature
    (lowrank_kernels.ops.fused_gradnorm_step documents the contract): validates, then launches.
    CUDA tensors, or CPU tensors under TRITON_INTERPRET=1."""
    rank = _checks.check_fused_gradnorm_step(
        param, grad, proj, exp_avg, exp_avg_sq, row_scale, row_norm, scale_exp_avg,
        scale_exp_avg_sq, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
        scale=scale, step=step, proj_scales=proj_scales, proj_zeros=proj_zeros,
        proj_group_size=proj_group_size, seed=seed, exp_avg_scales=exp_avg_scales,
        exp_avg_sq_scales=exp_avg_sq_scales, state_block_size=state_block_size)
    if param.device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError(f"param: the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1), "
                         f"got device {param.device}")
    basis = basis_args(proj, *param.shape, rank, grad.dtype, proj_scales, proj_zeros,
                       proj_group_size)
    launch(param, grad, exp_avg, exp_avg_sq, (row_scale, row_norm, scale_exp_avg,
                                              scale_exp_avg_sq), rank,
           adam_coeffs(lr, beta1, beta2, eps, weight_decay, scale, step), basis,
           philox_seed=rounding_philox_seed(seed, step),
           moments=MomentArgs(False, exp_avg_scales, exp_avg_sq_scales, state_block_size))


def launch(param, grad, exp_avg, exp_avg_sq, rows: tuple[torch.Tensor, ...], rank: int,
           coeffs: dict[str, float], basis: BasisArgs, *, philox_seed: int = 0,
           index_64: bool | None = None, moments: MomentArgs | None = None) -> None:
    """Launches the step's kernels for one validated call (module docstring); ``rows`` are
    (row_scale, row_norm, scale_exp_avg, scale_exp_avg_sq); ``moments``: the block scales of
    8-bit M and V (fused_galore_step.MomentArgs; None: fp32/bf16 moments)."""
    if moments is None or moments.scales is None:
        moments = MomentArgs(scales=exp_avg_sq, sq_scales=exp_avg_sq)
    m, n = param.shape
    right = is_right_side(m, n)
    own, long = (m, n) if right else (n, m)
    if index_64 is None:
        index_64 = index_64_needed(param, grad, exp_avg, basis, rank)
    generated = basis.kind != 0
    interpreted = param.device.type == "cpu"
    common = {"BASIS": basis.kind, "PROJ_GROUP": basis.group_size, "INDEX_64": index_64,
              "INTERPRETED": interpreted}
    basis_strides = (basis.stride_rank, basis.stride_long)
    f32 = {"dtype": torch.float32, "device": param.device}
    adam = [coeffs[k] for k in ("beta1", "beta2", "one_minus_beta1", "one_minus_beta2", "eps")]

    project = project_config(rank, grad.dtype, basis.dot_dtype, generated)
    back = back_config(param.dtype, generated)
    strips_a = triton.cdiv(own, project.block_own)
    strips_v = 0 if right else triton.cdiv(own, back.block_own)
    normalized = torch.empty(exp_avg.shape, **f32)
    proj_w = torch.empty(exp_avg.shape, **f32) if right else normalized
    row_sums = torch.empty(2 * m if right else m * strips_a, **f32)
    vnorm_parts = row_sums if right else torch.empty(m * strips_v, **f32)
    gram = torch.empty((rank, rank) if right else (1,), **f32)
    row_coeffs = torch.empty(2 * m, **f32)

    if right:
        grid_k = (triton.cdiv(rank, GRAM_CONFIG.block_a) ** 2,)
        _gram_kernel[grid_k](
            *basis.pointers, gram, *basis_strides, rank, long,
            BLOCK_R=GRAM_CONFIG.block_a, BLOCK_LONG=GRAM_CONFIG.block_b,
            num_warps=GRAM_CONFIG.num_warps, **common)
    grid_a = (strips_a * triton.cdiv(rank, project.block_r),)
    _gradnorm_project_kernel[grid_a](
        grad, param, *basis.pointers, exp_avg, exp_avg_sq, moments.scales, moments.sq_scales,
        normalized, proj_w, row_sums,
        *grad.stride(), param.stride(0), *basis_strides, exp_avg.stride(0),
        m, n, rank, triton.cdiv(rank, moments.block), *adam, philox_seed,
        RIGHT=right, BLOCK_OWN=project.block_own, BLOCK_R=project.block_r,
        BLOCK_LONG=project.block_long, num_warps=project.num_warps,
        num_stages=project.num_stages, MOMENT_BLOCK=moments.block, **common,
        # 8-bit moments: no FMA contraction, the CPU kernel's codes (fused_galore_step.launch)
        **({"enable_fp_fusion": False} if exp_avg_sq.dtype == torch.uint8 else {}))
    back_args = (*basis.pointers, normalized, param.stride(0), *basis_strides,
                 normalized.stride(0), m, n, rank)
    back_blocks = {"BLOCK_OWN": back.block_own, "BLOCK_LONG": back.block_long,
                   "BLOCK_R": back.block_r, "num_warps": back.num_warps,
                   "num_stages": back.num_stages, **common}
    grid_b = (triton.cdiv(own, back.block_own) * triton.cdiv(long, back.block_long),)
    if not right:
        _gradnorm_vnorm_kernel[grid_b](
            param, *back_args[:4], rows[0], rows[1], vnorm_parts, *back_args[4:],
            coeffs["decay"], coeffs["update_scale"], **back_blocks)
    _gradnorm_rows_kernel[(triton.cdiv(m, ROWS_CONFIG.block_a),)](
        *rows, row_sums, vnorm_parts, normalized, proj_w, gram, row_coeffs,
        m, rank, strips_a, strips_v, *adam, coeffs["decay"], coeffs["update_scale"],
        coeffs["step_size"], RIGHT=right, BLOCK_M=ROWS_CONFIG.block_a,
        BLOCK_R=ROWS_CONFIG.block_b, BLOCK_PARTS=ROWS_CONFIG.block_c, INDEX_64=index_64,
        num_warps=ROWS_CONFIG.num_warps)
    _gradnorm_update_kernel[grid_b](
        param, *back_args[:4], row_coeffs, *back_args[4:], RIGHT=right, **back_blocks)
