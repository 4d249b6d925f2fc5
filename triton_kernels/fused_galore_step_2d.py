"""fused_galore_step in Triton, two launches: project + Adam, then back-project + update.

What it computes: the same step as fused_galore_step.py (DESIGN.md §4.1-4.2), R the projected
gradient and N the normalized update:

    right (m >= n, proj Q r×n):  R = G Qᵀ (m×r),  back(N) = N Q
    left  (m <  n, proj P m×r):  R = Pᵀ G (r×n),  back(N) = P N
    M ← β1·M + (1−β1)·R      V ← β2·V + (1−β2)·R²      N = M / (√V + ε)
    W ← decay·W − update_scale·back(N)

Why a second variant: the one-pass kernel has only ⌈own/BLOCK_OWN⌉ programs, each holding an
R_PAD-wide tile in registers, which starves the GPU at r ≥ 128. Here both launches are 2-D tilings
like an ordinary matmul, at the price of writing N (low rank) once and reading it once.

Tiling (as in the one-pass kernel, the left side is the right side of the transposed problem, so
"own" is the rows of W, G, M, V on the right and their columns on the left; "long" the other axis):
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
The workspace N is allocated per call (torch.empty of the low-rank shape) in the type the back
projection multiplies in: W's type when W is 16-bit, else fp32. N is rounded to that type once, on
store, instead of on every load in B: the same numbers, half the bytes and no conversion between
B's loads and its tensor-core dot. r·own·s(N) bytes, e.g. 5.6 MB at 11008×4096 bf16, r=256,
against 270 MB of G and W traffic.

DRAM bytes per call, s(X) the element size of X (the one-pass floor, plus the N round trip and a
second basis read):
    G read once, W read and written once:   m·n·(s(G) + 2·s(W))
    M and V read and written once:          4·r·own·s(state)
    basis read once per launch:             2·r·long·s(proj)  (each launch re-reads it from L2
                                                              ⌈own/BLOCK_OWN⌉ times)
    N written once and read once:           2·r·own·s(N)
G is re-read from L2 ⌈r/BLOCK_R⌉ times in A, N ⌈long/BLOCK_LONG⌉ times in B; each is fetched from
DRAM once as long as the neighbouring programs that share it run together (launch order above).

Precision: R and the Adam epilogue as in the one-pass kernel (fp32 accumulate; tensor cores when G
and the basis share a 16-bit type, else an exact "ieee" fp32 dot), N computed in fp32. In B, N and
the basis are in W's type when W is 16-bit (the back projection galore-torch does in bf16; the
one-pass kernel rounds the same way), fp32 "ieee" otherwise.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from lowrank_kernels.reference import is_right_side

from ._common import (_adam_tile, _dot, _project_tile, _round_to, _tile_offsets, dot_kind,
                      needs_index_64)


@triton.jit
def _project_adam_kernel(
    G_ptr, Proj_ptr, ExpAvg_ptr, ExpAvgSq_ptr, Normalized_ptr,
    stride_gm, stride_projm, stride_statem, stride_normm,
    M, N, R,
    beta1, beta2, one_minus_beta1, one_minus_beta2, eps,
    RIGHT: tl.constexpr, BLOCK_OWN: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_LONG: tl.constexpr, INDEX_64: tl.constexpr, INTERPRETED: tl.constexpr,
):
    """Launch A: R[own, r] = Σ_long G[own, long]·basis[long, r] for one BLOCK_OWN × BLOCK_R tile,
    then Adam on that tile of M and V and N = M/(√V+ε) into the workspace (rounded to its type)."""
    if RIGHT:
        OWN = M
        LONG = N
    else:
        OWN = N
        LONG = M
    num_r_tiles = tl.cdiv(R, BLOCK_R)
    pid = tl.program_id(0)
    offs_own = (pid // num_r_tiles) * BLOCK_OWN + tl.arange(0, BLOCK_OWN)
    offs_r = (pid % num_r_tiles) * BLOCK_R + tl.arange(0, BLOCK_R)
    if INDEX_64:  # every offset product (row × stride) in 64 bits
        offs_own = offs_own.to(tl.int64)
        offs_r = offs_r.to(tl.int64)
    own_mask = offs_own < OWN
    r_mask = offs_r < R

    proj_low = tl.zeros((BLOCK_OWN, BLOCK_R), dtype=tl.float32)
    proj_low = _project_tile(G_ptr, Proj_ptr, offs_own, offs_r, own_mask, r_mask, LONG,
                             stride_gm, stride_projm, proj_low, RIGHT, BLOCK_LONG, INDEX_64,
                             INTERPRETED)
    state_offs = _tile_offsets(offs_own, offs_r, stride_statem, RIGHT)
    state_mask = own_mask[:, None] & r_mask[None, :]
    # only the real rank is stored; launch B reads the padding as 0 through its mask
    normalized = _adam_tile(ExpAvg_ptr, ExpAvgSq_ptr, state_offs, state_mask, proj_low, beta1,
                            beta2, one_minus_beta1, one_minus_beta2, eps, INTERPRETED)
    tl.store(Normalized_ptr + _tile_offsets(offs_own, offs_r, stride_normm, RIGHT),
             _round_to(normalized, Normalized_ptr.dtype.element_ty, INTERPRETED), mask=state_mask)


@triton.jit
def _back_project_kernel(
    W_ptr, Proj_ptr, Normalized_ptr,
    stride_wm, stride_projm, stride_normm,
    M, N, R,
    decay, update_scale,
    RIGHT: tl.constexpr, BLOCK_OWN: tl.constexpr, BLOCK_LONG: tl.constexpr,
    BLOCK_R: tl.constexpr, INDEX_64: tl.constexpr, INTERPRETED: tl.constexpr,
):
    """Launch B: W[own, long] ← decay·W − update_scale·Σ_r N[own, r]·basis[r, long] for one
    BLOCK_OWN × BLOCK_LONG tile of W."""
    if RIGHT:
        OWN = M
        LONG = N
    else:
        OWN = N
        LONG = M
    num_long_tiles = tl.cdiv(LONG, BLOCK_LONG)
    pid = tl.program_id(0)
    offs_own = (pid // num_long_tiles) * BLOCK_OWN + tl.arange(0, BLOCK_OWN)
    offs_long = (pid % num_long_tiles) * BLOCK_LONG + tl.arange(0, BLOCK_LONG)
    if INDEX_64:
        offs_own = offs_own.to(tl.int64)
        offs_long = offs_long.to(tl.int64)
    own_mask = offs_own < OWN
    long_mask = offs_long < LONG
    w_type = W_ptr.dtype.element_ty

    back = tl.zeros((BLOCK_OWN, BLOCK_LONG), dtype=tl.float32)
    for start in range(0, R, BLOCK_R):
        offs_r = start + tl.arange(0, BLOCK_R)
        if INDEX_64:
            offs_r = offs_r.to(tl.int64)
        r_mask = offs_r < R
        normalized = tl.load(Normalized_ptr + _tile_offsets(offs_own, offs_r, stride_normm, RIGHT),
                             mask=own_mask[:, None] & r_mask[None, :], other=0.0)
        basis = tl.load(Proj_ptr + _tile_offsets(offs_r, offs_long, stride_projm, RIGHT),
                        mask=r_mask[:, None] & long_mask[None, :], other=0.0)
        if w_type != tl.float32 and basis.dtype != w_type:  # N is already in W's type
            basis = _round_to(basis.to(tl.float32), w_type, INTERPRETED)
        back = _dot(normalized, basis, back, INTERPRETED)

    w_offs = _tile_offsets(offs_own, offs_long, stride_wm, RIGHT)
    w_mask = own_mask[:, None] & long_mask[None, :]
    w = tl.load(W_ptr + w_offs, mask=w_mask, other=0.0).to(tl.float32)
    tl.store(W_ptr + w_offs, _round_to(decay * w - update_scale * back, w_type, INTERPRETED),
             mask=w_mask)


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
WIDE_RANK_TILE_FROM = 512  # tensor-core launch A: 64-wide rank tiles below this rank, 128 from it


def project_block_r(rank: int, kind: str) -> int:
    """Launch A's rank tile: the next power of two of r, clamped to [32, MAX_BLOCK_R[kind]],
    and 64 for tensor-core ranks 65..511 (measured faster than 128 there: twice the programs)."""
    block = min(MAX_BLOCK_R[kind], max(MIN_BLOCK_R, triton.next_power_of_2(rank)))
    if kind == "tc" and rank < WIDE_RANK_TILE_FROM:
        block = min(block, 64)
    return block


def weight_kind(weight_dtype: torch.dtype) -> str:
    return "fp32" if weight_dtype == torch.float32 else "16bit"


def workspace_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """N's type: what launch B multiplies in (see the module docstring)."""
    return torch.float32 if weight_dtype == torch.float32 else weight_dtype


def pick_configs(rank: int, weight_dtype: torch.dtype, grad_dtype: torch.dtype,
                 proj_dtype: torch.dtype) -> tuple[TileConfig, TileConfig]:
    """(launch A, launch B) configurations; any rank ≥ 1 (the rank is tiled, not held whole)."""
    kind = dot_kind(grad_dtype, proj_dtype)
    return (_PROJECT_BLOCKS[(kind, project_block_r(rank, kind))],
            _BACK_BLOCKS[weight_kind(weight_dtype)])


def candidate_configs() -> list[tuple[str, str, TileConfig]]:
    """Every (kernel, dtype class, configuration) ``pick_configs`` can return (the AOT test
    compiles them): kernel 'project' (A, class = dot kind) or 'back' (B, class = W's kind)."""
    return ([("project", kind, c) for (kind, _), c in _PROJECT_BLOCKS.items()]
            + [("back", kind, c) for kind, c in _BACK_BLOCKS.items()])


def launch(param, grad, proj, exp_avg, exp_avg_sq, rank: int, coeffs: dict[str, float],
           index_64: bool | None = None,
           configs: tuple[TileConfig, TileConfig] | None = None) -> None:
    """Launches A then B for one validated step (``coeffs`` from _common.adam_coeffs).
    ``configs``: (launch A, launch B) in place of ``pick_configs`` (bench/tune_triton_step.py)."""
    m, n = param.shape
    right = is_right_side(m, n)
    own, long = (m, n) if right else (n, m)
    project, back = configs or pick_configs(rank, param.dtype, grad.dtype, proj.dtype)
    normalized = torch.empty(exp_avg.shape, dtype=workspace_dtype(param.dtype),
                             device=param.device)
    if index_64 is None:
        index_64 = needs_index_64(param, proj, exp_avg)
    interpreted = param.device.type == "cpu"
    grid_a = (triton.cdiv(own, project.block_own) * triton.cdiv(rank, project.block_r),)
    _project_adam_kernel[grid_a](
        grad, proj, exp_avg, exp_avg_sq, normalized,
        grad.stride(0), proj.stride(0), exp_avg.stride(0), normalized.stride(0),
        m, n, rank,
        coeffs["beta1"], coeffs["beta2"], coeffs["one_minus_beta1"], coeffs["one_minus_beta2"],
        coeffs["eps"],
        RIGHT=right, BLOCK_OWN=project.block_own, BLOCK_R=project.block_r,
        BLOCK_LONG=project.block_long, INDEX_64=index_64, INTERPRETED=interpreted,
        num_warps=project.num_warps, num_stages=project.num_stages,
    )
    grid_b = (triton.cdiv(own, back.block_own) * triton.cdiv(long, back.block_long),)
    _back_project_kernel[grid_b](
        param, proj, normalized,
        param.stride(0), proj.stride(0), normalized.stride(0),
        m, n, rank,
        coeffs["decay"], coeffs["update_scale"],
        RIGHT=right, BLOCK_OWN=back.block_own, BLOCK_LONG=back.block_long,
        BLOCK_R=back.block_r, INDEX_64=index_64, INTERPRETED=interpreted,
        num_warps=back.num_warps, num_stages=back.num_stages,
    )
