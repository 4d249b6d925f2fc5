"""EXPERIMENTAL (on no default path, in no default test or AOT matrix): fused_galore_step in
Triton as one kernel and one pass over W.

Why it left the default path (bench/results/gpu_step_h100.csv, H100, bf16, fp32 moments, one
run): against the two-launch kernel (triton_kernels/fused_galore_step.py, then untuned) it lost
1.4-3.6× at every 7B shape (4096×11008 and 11008×4096, r = 128-512: e.g. 0.415 vs 0.240 ms at
4096×11008, r = 256) and won only at 4096×4096 with r ≤ 256 (0.134-0.182 vs 0.184-0.224 ms, each
with an IQR as large as the gap); the two-launch tables were then tuned 1.22-1.39× faster
(tune_triton_step_h100.txt: 0.065-0.075 ms at 4096×4096, r ≤ 256, a different run). Its INT4 and
DCT modes never ran on a GPU. What would earn it a return: beating the tuned two-launch kernel in
one bench/bench_gpu_step.py run (provider "triton-onepass") at some shape by more than the IQRs,
then its GPU tests and the AOT spill check for sm_89/sm_90 with 64-bit offsets (its tables below
were checked with 32-bit offsets only) -- and then only in that measured regime.
Run it: ``fused_galore_step(...)`` below (float weights), its tests with
LOWRANK_TEST_EXPERIMENTAL=1 (tests/test_experimental.py).

What it computes (DESIGN.md §4.1-4.2, float weights; the basis dense, packed INT4 or DCT
frequencies, §4.3 and §4.5), R being the projected gradient:

    right (m >= n, proj Q r×n):  R = G Qᵀ (m×r),  back(N) = N Q
    left  (m <  n, proj P m×r):  R = Pᵀ G (r×n),  back(N) = P N
    M ← β1·M + (1−β1)·R      V ← β2·V + (1−β2)·R²      N = M / (√V + ε)
    W ← decay·W − update_scale·back(N)      decay = 1 − lr·wd,  update_scale = decay·α_t·scale

with the scalars of csrc/include/lowrank/adam.h ``make_adam_coeffs`` (host double, rounded once).
The basis Q or P is read through _common._basis_tile in every format: dense values; packed INT4
codes, Q[k, i] = s[g]·(q − z[g]) with g the group of the element in the stored row-major order;
DCT frequencies, C[k, i] = c_k·cos(π(2i+1)k/(2d)) evaluated in the tile. No dequantized or
generated copy of the basis exists in memory. INT8 weights are served by the two-launch variant
only (its second launch requantizes; this kernel's single pass owns strips that cut groups).

Tiling. A row of R (right side) depends only on the same row of G, so a program owns BLOCK_OWN
rows of G, W, M and V -- the "owned" axis -- and the whole rank, padded to R_PAD (a power of two,
32 ≤ R_PAD ≤ 512). It
  1. streams its BLOCK_OWN × n strip of G in BLOCK_LONG-wide chunks along the "long" axis and
     accumulates its BLOCK_OWN × R_PAD tile of R with tl.dot (fp32 accumulator in registers),
  2. updates its rows of M and V in place and keeps N = M/(√V+ε) in registers,
  3. streams the same strip of W once, chunk by chunk: W ← decay·W − update_scale·(N · Q[:, chunk]).
There is no split along the long axis (N is a nonlinear function of the complete sum) and no m×n
temporary. The left side is the right side of the transposed problem (Wᵀ, Gᵀ, Pᵀ, Mᵀ, Vᵀ), so one
kernel serves both: the constexpr RIGHT only changes address arithmetic, and a program then owns
BLOCK_OWN columns of W and G and streams rows.

Dot precision: both operands of the same 16-bit type use tensor cores with fp32 accumulation;
anything involving fp32 runs as an fp32 "ieee" dot (TF32 would miss the 1e-5 fp32 tolerance). The
back projection runs in W's type when W is 16-bit (N and the basis rounded to it, fp32 accumulate),
else in fp32. Keep the basis in the gradient's dtype (as galore-torch does) for the fast path.
A generated basis enters the projection dot as hi + lo in G's type when G is 16-bit (two
tensor-core dots, R within ~2^-16 of fp32; _common.py explains why not a single rounding), else
fp32 "ieee"; rank ≤ 64 here (MAX_GENERATED_RANK_PAD), with its own spill-free block table.

DRAM bytes per call, with s(X) the element size of X and own/long the owned/streamed dimensions:
    G read once, W read and written once:   m·n·(s(G) + 2·s(W))
    M and V read and written once:          4·r·own·s(state)
    basis read once from DRAM:              r·long·s(proj)  (re-read from L2 by every program,
                                                             twice: ⌈own/BLOCK_OWN⌉·2·r·long)
which is the DESIGN.md §5 floor. The basis term by format: dense r·long·s(proj); packed INT4
⌈r·long/2⌉ code bytes + 8·⌈r·long/g⌉ bytes of fp32 scales and zeros (each element's pair is
gathered, from L1/L2); DCT 4·r bytes of frequencies (values computed, nothing else read).

Limits of this tiling (H100, bf16 G/W/basis, fp32 states): the grid has only ⌈own/BLOCK_OWN⌉
programs and each streams its whole strip twice, so r ≤ 32 reaches 1.3-2.3 TB/s of the floor,
r = 128 about 1.0 TB/s, r = 256 0.8 TB/s and r = 512 0.3 TB/s (the R tile then leaves room for
only 16 rows per program without spilling). The fp32 path (FMA dots) is 5-10× slower than the
tensor-core path. The two-launch kernel (2-D grids, N through a low-rank workspace) has neither
limit. INT8 weights are served by the two-launch kernel only (its second launch requantizes;
this kernel's single pass owns strips that cut groups). bf16 moments: the Philox words of their
stochastic rounding, drawn for the whole BLOCK_OWN × R_PAD tile at once, take this kernel to
236-255 registers at R_PAD = 64 (4 bytes spilled on sm_90 with an fp32 dot, AOT).
"""

from __future__ import annotations

import dataclasses
import os

import torch
import triton
import triton.language as tl

from lowrank_kernels import _checks
from lowrank_kernels.reference import is_right_side, rounding_philox_seed

from .._common import (
    DEFAULT_NUM_SMS,
    BasisArgs,
    _adam_tile,
    _basis_tile,
    _dot,
    _own_long,
    _project_tile,
    _round_to,
    _tile_offsets,
    adam_coeffs,
    basis_args,
    dot_kind,
    needs_index_64,
    needs_wide_phase,
)
from .._common import num_sms as _num_sms

MAX_RANK_PAD = 512  # R_PAD limit: the R/N tile lives in registers (see candidate_configs)
# R_PAD limit of a generated (INT4 or DCT) basis: its (BLOCK_LONG × R_PAD) tile is built in
# registers rather than copied to shared memory (see _GENERATED_BLOCKS); the two-launch variant
# tiles the rank and serves every rank.
MAX_GENERATED_RANK_PAD = 64


@triton.jit
def _fused_galore_step_kernel(
    W_ptr, G_ptr, Proj_ptr, ProjScales_ptr, ProjZeros_ptr, ExpAvg_ptr, ExpAvgSq_ptr,
    stride_wm, stride_gm, stride_gn, stride_pr, stride_pl, stride_statem,
    M, N, R,
    beta1, beta2, one_minus_beta1, one_minus_beta2, eps, decay, update_scale, philox_seed,
    RIGHT: tl.constexpr, BLOCK_OWN: tl.constexpr, BLOCK_LONG: tl.constexpr,
    R_PAD: tl.constexpr, BASIS: tl.constexpr, PROJ_GROUP: tl.constexpr,
    INDEX_64: tl.constexpr, INTERPRETED: tl.constexpr,
):
    """One GaLore AdamW step on BLOCK_OWN rows (RIGHT) or columns (left) of an M×N weight.

    R_tile = Σ_chunks G[own, chunk] · proj[chunk, :]  (owned × R_PAD, fp32), Adam on M, V of the
    owned slice, then W[own, chunk] ← decay·W − update_scale·(N · proj[:, chunk]) chunk by chunk.
    """
    OWN, LONG = _own_long(M, N, RIGHT)
    offs_own = tl.program_id(0) * BLOCK_OWN + tl.arange(0, BLOCK_OWN)
    offs_r = tl.arange(0, R_PAD)
    if INDEX_64:  # every offset product (row × stride) in 64 bits
        offs_own = offs_own.to(tl.int64)
        offs_r = offs_r.to(tl.int64)
    own_mask = offs_own < OWN
    r_mask = offs_r < R

    # 1. R for the owned slice, reduced over the whole long axis by this program alone.
    proj_low = tl.zeros((BLOCK_OWN, R_PAD), dtype=tl.float32)
    proj_low = _project_tile(G_ptr, Proj_ptr, ProjScales_ptr, ProjZeros_ptr, offs_own, offs_r,
                             own_mask, r_mask, LONG, stride_gm, stride_gn, stride_pr, stride_pl,
                             proj_low, RIGHT,
                             BLOCK_LONG, BASIS, PROJ_GROUP, INDEX_64, INTERPRETED)

    # 2. Adam on the owned slice of M and V (fp32 arithmetic, one rounding on store).
    state_offs = _tile_offsets(offs_own, offs_r, stride_statem, 1, RIGHT)
    state_mask = own_mask[:, None] & r_mask[None, :]
    normalized = _adam_tile(ExpAvg_ptr, ExpAvgSq_ptr, state_offs, state_mask, proj_low, beta1,
                            beta2, one_minus_beta1, one_minus_beta2, eps, philox_seed)
    # padding must be exactly 0 (not 0/(0+eps), NaN when eps = 0): it multiplies the basis below
    normalized = tl.where(state_mask, normalized, 0.0)
    w_type = W_ptr.dtype.element_ty
    if w_type != tl.float32:
        normalized = _round_to(normalized, w_type, INTERPRETED)

    # 3. One pass over the owned strip of W, with the decay folded into the same store.
    for start in range(0, LONG, BLOCK_LONG):
        offs_long = start + tl.arange(0, BLOCK_LONG)
        if INDEX_64:
            offs_long = offs_long.to(tl.int64)
        long_mask = offs_long < LONG
        basis = _basis_tile(Proj_ptr, ProjScales_ptr, ProjZeros_ptr, offs_r, offs_long, r_mask,
                            long_mask, stride_pr, stride_pl, LONG, False, BASIS, PROJ_GROUP)
        if w_type != tl.float32 and basis.dtype != w_type:
            basis = _round_to(basis.to(tl.float32), w_type, INTERPRETED)
        back = _dot(normalized, basis, tl.zeros((BLOCK_OWN, BLOCK_LONG), dtype=tl.float32),
                    INTERPRETED)
        w_offs = _tile_offsets(offs_own, offs_long, stride_wm, 1, RIGHT)
        w_mask = own_mask[:, None] & long_mask[None, :]
        w = tl.load(W_ptr + w_offs, mask=w_mask, other=0.0).to(tl.float32)
        tl.store(W_ptr + w_offs, _round_to(decay * w - update_scale * back, w_type, INTERPRETED),
                 mask=w_mask)


# --------------------------------------------------------------------------------------------
# launch configuration
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Block sizes and launch shape of one compiled variant of the kernel."""

    block_own: int  # rows (right side) or columns (left side) of W owned by one program
    block_long: int  # width of one streamed chunk along the other axis
    r_pad: int  # rank padded to a power of two (the register tile of R and N)
    num_warps: int
    num_stages: int


# Block sizes per padded rank and dot kind ("tc": both projection operands 16-bit, tensor cores;
# "fp32": exact fp32 FMA dot), measured on an H100 (bf16, 4096×4096, 4096×11008, 11008×4096) among
# the variants that do not spill. What limits them is registers: the R/N tile (block_own × r_pad
# fp32) plus the dot operands that mma.sync keeps in registers; every entry was checked
# spill-free for sm_89 and sm_90 with 32-bit offsets while this kernel was in the AOT test, and
# its shared memory (num_stages × the G and basis chunks) stays under sm_89's 99 KiB.
# block_own_small_grid replaces block_own when the grid would not cover half the SMs: the
# reduction over the long axis cannot be split (nonlinear epilogue), so narrower blocks are the
# only way to more programs (a 4096-row weight at r=128: 0.116 ms with 32 rows, 0.136 with 64).
_BLOCKS: dict[tuple[int, str], tuple[int, int, int, int, int]] = {
    # (r_pad, kind): (block_own, block_own_small_grid, block_long, num_warps, num_stages)
    (32, "tc"): (64, 64, 128, 4, 3),
    (64, "tc"): (64, 64, 128, 4, 2),
    (128, "tc"): (64, 32, 64, 8, 3),
    (256, "tc"): (32, 32, 64, 8, 3),
    (512, "tc"): (16, 16, 64, 8, 2),
    (32, "fp32"): (64, 64, 32, 4, 2),
    (64, "fp32"): (64, 64, 32, 4, 2),
    (128, "fp32"): (16, 16, 32, 4, 2),
    (256, "fp32"): (16, 16, 16, 8, 1),
    (512, "fp32"): (16, 16, 16, 8, 1),
}
MIN_RANK_PAD = 32
# A generated (INT4 or DCT) basis is built in registers (codes, group scales and zeros gathered,
# or cos/sin evaluated), then hi/lo-split for tensor cores: the dense entries above spill or
# exceed sm_89's shared memory with it (measured by the AOT test), so it has its own narrower
# entries, same layout; r_pad ≤ MAX_GENERATED_RANK_PAD. Known from the exhaustive AOT run: with
# 64-bit offsets (2**31+ elements, or a DCT size ≥ 32768) the DCT tc entries spilled 4-8 bytes on
# sm_89 (ptxas lowers 64-bit integer division, the phase reduction, to a called subroutine).
_GENERATED_BLOCKS: dict[tuple[int, str], tuple[int, int, int, int, int]] = {
    (32, "tc"): (64, 64, 64, 4, 3),
    (64, "tc"): (32, 32, 64, 8, 2),
    (32, "fp32"): (32, 32, 32, 8, 2),
    (64, "fp32"): (32, 32, 16, 8, 2),
}


def rank_pad(rank: int) -> int:
    """The register tile width for ``rank``: the next power of two, at least MIN_RANK_PAD (tl.dot
    needs 16; 32 halves the number of compiled variants at no measurable cost)."""
    return max(MIN_RANK_PAD, triton.next_power_of_2(rank))


def pick_config(m: int, n: int, rank: int, grad_dtype: torch.dtype, proj_dtype: torch.dtype,
                num_sms: int = DEFAULT_NUM_SMS, *, generated: bool = False) -> KernelConfig:
    """The launch configuration for an m×n weight at rank ``rank`` (the table above, by padded
    rank and dot kind, with the narrower block when the grid would cover < half the SMs).
    proj_dtype is the type the basis enters the dot in; ``generated``: an INT4 or DCT basis."""
    r_pad = rank_pad(rank)
    if r_pad > MAX_RANK_PAD:
        raise ValueError(f"proj: rank r={rank} exceeds the one-pass kernel's limit of "
                         f"{MAX_RANK_PAD}")
    if generated and r_pad > MAX_GENERATED_RANK_PAD:
        raise ValueError(f"proj: rank r={rank} exceeds the one-pass kernel's limit of "
                         f"{MAX_GENERATED_RANK_PAD} for an INT4 or DCT basis")
    kind = dot_kind(grad_dtype, proj_dtype)
    table = _GENERATED_BLOCKS if generated else _BLOCKS
    block_own, block_own_small_grid, block_long, num_warps, num_stages = table[(r_pad, kind)]
    own = m if is_right_side(m, n) else n
    if triton.cdiv(own, block_own) < num_sms // 2:
        block_own = block_own_small_grid
    return KernelConfig(block_own, block_long, r_pad, num_warps, num_stages)


def candidate_configs(generated: bool = False) -> list[tuple[str, KernelConfig]]:
    """Every (dot kind, configuration) ``pick_config`` can return for a dense basis, or with
    ``generated`` for an INT4 or DCT one (the AOT test compiles them)."""
    configs = []
    table = _GENERATED_BLOCKS if generated else _BLOCKS
    for (r_pad, kind), (own, own_small, block_long, warps, stages) in table.items():
        for block_own in dict.fromkeys((own, own_small)):
            configs.append((kind, KernelConfig(block_own, block_long, r_pad, warps, stages)))
    return configs


def fused_galore_step(param: torch.Tensor, grad: torch.Tensor, proj: torch.Tensor,
                      exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *, lr: float, beta1: float,
                      beta2: float, eps: float, weight_decay: float, scale: float,
                      step: int, proj_scales: torch.Tensor | None = None,
                      proj_zeros: torch.Tensor | None = None, proj_group_size: int = 256,
                      param_scales: torch.Tensor | None = None,
                      param_zeros: torch.Tensor | None = None, param_group_size: int = 256,
                      seed: int = 0) -> None:
    """One fused step in place with this kernel (the op's schema signature; see the module
    docstring): float weights, rank ≤ MAX_RANK_PAD (MAX_GENERATED_RANK_PAD for an INT4 or DCT
    basis). CUDA tensors, or CPU tensors under TRITON_INTERPRET=1."""
    rank = _checks.check_fused_galore_step(
        param, grad, proj, exp_avg, exp_avg_sq, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
        weight_decay=weight_decay, scale=scale, step=step, proj_scales=proj_scales,
        proj_zeros=proj_zeros, proj_group_size=proj_group_size, param_scales=param_scales,
        param_zeros=param_zeros, param_group_size=param_group_size, seed=seed)
    if param.device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError(f"param: the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1), "
                         f"got device {param.device}")
    if param.dtype == torch.uint8:
        raise ValueError("param: INT8 (uint8) codes need the two-launch kernel (this one has no "
                         "requantizing epilogue)")
    m, n = param.shape
    basis = basis_args(proj, m, n, rank, grad.dtype, proj_scales, proj_zeros, proj_group_size)
    config = pick_config(m, n, rank, grad.dtype, basis.dot_dtype, _num_sms(param.device),
                         generated=basis.kind != 0)
    _launch(config, param, grad, proj, exp_avg, exp_avg_sq, rank,
            adam_coeffs(lr, beta1, beta2, eps, weight_decay, scale, step), basis=basis,
            philox_seed=rounding_philox_seed(seed, step))


def _launch(config: KernelConfig, param, grad, proj, exp_avg, exp_avg_sq, rank: int,
            coeffs: dict[str, float], index_64: bool | None = None, *,
            basis: BasisArgs | None = None, philox_seed: int = 0):
    """Launches one validated step with a given configuration (benchmarks try others); returns
    Triton's handle of the launched kernel (registers, spills) when compiled. ``basis``
    describes an INT4 or DCT proj (default: proj is a dense basis); ``philox_seed`` keys the
    stochastic rounding of bf16 moments (rounding_philox_seed(seed, step))."""
    m, n = param.shape
    right = is_right_side(m, n)
    if basis is None:
        basis = basis_args(proj, m, n, rank, grad.dtype)
    grid = (triton.cdiv(m if right else n, config.block_own),)
    if index_64 is None:  # int32 offsets overflow past 2**31 (any tensor's span, or r·long)
        index_64 = (needs_index_64(param, grad, proj, exp_avg)
                    or needs_wide_phase(basis.kind, m, n)
                    or (basis.kind != 0 and rank * min(m, n) >= 2**31))
    return _fused_galore_step_kernel[grid](
        param, grad, *basis.pointers, exp_avg, exp_avg_sq,
        param.stride(0), *grad.stride(), basis.stride_rank, basis.stride_long, exp_avg.stride(0),
        m, n, rank, **coeffs, philox_seed=philox_seed,
        RIGHT=right, BLOCK_OWN=config.block_own, BLOCK_LONG=config.block_long,
        R_PAD=config.r_pad, BASIS=basis.kind, PROJ_GROUP=basis.group_size, INDEX_64=index_64,
        INTERPRETED=param.device.type == "cpu",
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
