"""Fira and APOLLO in the Triton step: the kernels between launch A and launch B of
fused_galore_step.py (DESIGN.md §4.6-§4.7, docs/methods.md §3-§4).

What the full-rank modes add (a = scale, d = 1 − lr·wd, "own-line" i = row i of the m×r R on
the right side, column i of the r×n R on the left):

    φ_i = ‖N_i‖/(‖R_i‖ + 1e-8)  (channel)  or  φ = ‖N‖/(‖R‖ + 1e-8)  (tensor)
    fira:    ‖S‖² = Σ_i φ_i²·max(γ_i − 2a·ρ_i + a²·R_i K R_iᵀ, 0),  K = Q Qᵀ (PᵀP left)
             W' = d·W − us·back(N − c ⊙ R) − gc_i·G_i
    apollo:  ‖S‖² = Σ_i a^[scale_front]·φ_i²·γ_i
             W' = d·W − gc_i·G_i
    limiter: p = stored ‖S_prev‖; p < 0: store ‖S‖, f = 1; else f = max(‖S‖/(p + 1e-8), γ)/γ,
             store ‖S‖/f.   c_i = φ_i/f,  gc_i = grad_scale·c_i

with γ_i = ‖G_i‖², ρ_i = ‖R_i‖², ν_i = ‖N_i‖², us = fl(d·α_t·a) (the GaLore update scale) and
grad_scale = fl(d·α_t) (Fira) or fl(d·α_t·√a) (APOLLO), host scalars in double rounded once.

Kernels and tiling (launch order A → [Gram → quadratic] → finalize → B):
  A  (fused_galore_step._project_adam_kernel, FULL_RANK): per BLOCK_OWN × BLOCK_R tile of R,
     the partial sums of ν and ρ over its rank columns and, from the first rank tile, γ (summed
     while G streams for the projection) into LineSums (3, ⌈r/BLOCK_R⌉, own) fp32; Fira also
     stores R into an fp32 low-rank workspace. N's workspace is fp32 in these modes.
  _common._gram_kernel (Fira): K = basis·basisᵀ, one program per 32×32 tile of K, the long axis in
     chunks, any basis format through _common._basis_tile (INT4 and DCT generated in the tile).
  _gram_quadratic_kernel (Fira): R_i K R_iᵀ per own-line, one program per BLOCK_OWN lines.
  _finalize_kernel: ONE program. Per-line sums over the rank tiles in tile order, then sums over
     lines in blocks, in index order: a fixed order, so the limiter state (carried across steps)
     resumes bit for bit. Reads and writes the limiter on the device (no host synchronisation).
  B  (fused_galore_step._back_project_kernel / INT8 kernels, FULL_RANK): Fira folds
     N' = N − c ⊙ R into the back projection's N operand; both modes read the tile of G again
     and subtract gc_i·G_i.

DRAM bytes beyond GaLore's step (per call, s(X) the element size): G read a second time
m·n·s(G); N in fp32 4·r·own written and read (GaLore: s(W)); Fira: R written and read 8·r·own,
the basis once more (the Gram) and K (4·r²); line sums 16·own·⌈r/BLOCK_R⌉ + 8·own of
coefficients. APOLLO's launch B does no GEMM and reads no basis. bench/traffic.py counts these.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import torch
import triton
import triton.language as tl

from ._common import BASIS_NAMES, _gram_kernel, _tile_offsets

NONE, FIRA, APOLLO = 0, 1, 2
FULL_RANK_MODES = {"none": NONE, "fira": FIRA, "apollo": APOLLO}
NORM_GUARD = 1e-8  # the peers' "+ 1e-8"
GRAM_BLOCK, GRAM_BLOCK_LONG = 32, 64


def gram_warps(basis_kind: int) -> int:
    """The Gram's warps: 8 for a DCT basis (4 spill 8 bytes on sm_89 with 64-bit offsets),
    4 otherwise (8 spill with a packed INT4 basis)."""
    return 8 if BASIS_NAMES[int(basis_kind)] == "dct" else 4

QUAD_BLOCK_OWN, QUAD_BLOCK_K = 64, 32
FINALIZE_BLOCK = 1024


@triton.jit
def _store_line_sums_of_r(LowRank_ptr, LineSums_ptr, norm_offs, state_mask, offs_own, own_mask,
                          proj_low, grad_sq, OWN, R, BLOCK_R: tl.constexpr,
                          FULL_RANK: tl.constexpr, INDEX_64: tl.constexpr):
    """Launch A's partial sums of one BLOCK_OWN × BLOCK_R tile of R (see the module docstring):
    ρ into LineSums[1, rank tile], γ into LineSums[2, 0] (first rank tile only), R into the
    LowRank workspace (Fira). Returns the pointers of LineSums[0, rank tile] (ν, stored by the
    caller after Adam)."""
    tiles = tl.cdiv(R, BLOCK_R)
    r_tile = tl.program_id(0) % tiles
    if INDEX_64:
        r_tile = r_tile.to(tl.int64)
    nu_ptrs = LineSums_ptr + r_tile * OWN + offs_own
    tl.store(nu_ptrs + tiles * OWN,
             tl.sum(tl.where(state_mask, proj_low * proj_low, 0.0), axis=1), mask=own_mask)
    tl.store(LineSums_ptr + 2 * tiles * OWN + offs_own, grad_sq, mask=own_mask & (r_tile == 0))
    if FULL_RANK == 1:
        tl.store(LowRank_ptr + norm_offs, proj_low, mask=state_mask)
    return nu_ptrs


@triton.jit
def _gram_quadratic_kernel(LowRank_ptr, Gram_ptr, Quad_ptr, stride_lowm, OWN, R,
                           RIGHT: tl.constexpr, BLOCK_OWN: tl.constexpr, BLOCK_K: tl.constexpr,
                           INDEX_64: tl.constexpr):
    """quad_i = R_i K R_iᵀ for BLOCK_OWN own-lines: Σ over output rank chunks k of
    Σ_k (R_i K)[k]·R_i[k], (R_i K) a chunked fp32 dot over the rank."""
    offs_own = tl.program_id(0) * BLOCK_OWN + tl.arange(0, BLOCK_OWN)
    if INDEX_64:
        offs_own = offs_own.to(tl.int64)
    own_mask = offs_own < OWN
    quad = tl.zeros((BLOCK_OWN,), dtype=tl.float32)
    for k_start in range(0, R, BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K)
        k_mask = offs_k < R
        acc = tl.zeros((BLOCK_OWN, BLOCK_K), dtype=tl.float32)
        for l_start in range(0, R, BLOCK_K):
            offs_l = l_start + tl.arange(0, BLOCK_K)
            l_mask = offs_l < R
            low_l = tl.load(LowRank_ptr + _tile_offsets(offs_own, offs_l, stride_lowm, 1, RIGHT),
                            mask=own_mask[:, None] & l_mask[None, :], other=0.0)
            gram = tl.load(Gram_ptr + offs_l[:, None] * R + offs_k[None, :],
                           mask=l_mask[:, None] & k_mask[None, :], other=0.0)
            acc = tl.dot(low_l, gram, acc, input_precision="ieee")
        low_k = tl.load(LowRank_ptr + _tile_offsets(offs_own, offs_k, stride_lowm, 1, RIGHT),
                        mask=own_mask[:, None] & k_mask[None, :], other=0.0)
        quad += tl.sum(acc * low_k, axis=1)
    tl.store(Quad_ptr + offs_own, quad, mask=own_mask)


@triton.jit
def _line_sums(LineSums_ptr, offs, mask, OWN, R_TILES, KIND: tl.constexpr):
    """Σ over the rank tiles, in tile order, of LineSums[KIND, t, offs] (ν: 0, ρ: 1)."""
    total = tl.zeros(offs.shape, dtype=tl.float32)
    for t in range(0, R_TILES):
        total += tl.load(LineSums_ptr + (KIND * R_TILES + t) * OWN + offs, mask=mask, other=0.0)
    return total


@triton.jit
def _finalize_kernel(LineSums_ptr, Quad_ptr, Limiter_ptr, LineCoef_ptr, GradCoef_ptr,
                     OWN, R_TILES, scale, front, growth, grad_scale,
                     FULL_RANK: tl.constexpr, TENSOR: tl.constexpr,
                     HAS_LIMITER: tl.constexpr, BLOCK: tl.constexpr):
    """φ, ‖S‖, the limiter and the per-line coefficients c_i (LineCoef) and gc_i (GradCoef):
    one program, lines in blocks of BLOCK in index order (module docstring). ``front``: a with
    APOLLO's scale_front, else 1."""
    phi_all = tl.zeros((), dtype=tl.float32)
    if TENSOR:
        nu_all = tl.zeros((), dtype=tl.float32)
        rho_all = tl.zeros((), dtype=tl.float32)
        for start in range(0, OWN, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < OWN
            nu_all += tl.sum(_line_sums(LineSums_ptr, offs, mask, OWN, R_TILES, 0), axis=0)
            rho_all += tl.sum(_line_sums(LineSums_ptr, offs, mask, OWN, R_TILES, 1), axis=0)
        phi_all = tl.div_rn(tl.sqrt_rn(nu_all), tl.sqrt_rn(rho_all) + 1e-8)
    total = tl.zeros((), dtype=tl.float32)
    for start in range(0, OWN, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < OWN
        rho = _line_sums(LineSums_ptr, offs, mask, OWN, R_TILES, 1)
        if TENSOR:
            phi = tl.zeros((BLOCK,), dtype=tl.float32) + phi_all
        else:
            nu = _line_sums(LineSums_ptr, offs, mask, OWN, R_TILES, 0)
            phi = tl.div_rn(tl.sqrt_rn(nu), tl.sqrt_rn(rho) + 1e-8)
        gamma = tl.load(LineSums_ptr + 2 * R_TILES * OWN + offs, mask=mask, other=0.0)
        if FULL_RANK == 1:
            quad = tl.load(Quad_ptr + offs, mask=mask, other=0.0)
            residual = tl.maximum(gamma - (2.0 * scale) * rho + (scale * scale) * quad, 0.0)
        else:
            residual = front * gamma
        total += tl.sum(tl.where(mask, (phi * phi) * residual, 0.0), axis=0)
        tl.store(LineCoef_ptr + offs, phi, mask=mask)
    divisor = tl.full((), 1.0, tl.float32)
    if HAS_LIMITER:
        norm = tl.sqrt_rn(total)
        previous = tl.load(Limiter_ptr)
        first = previous < 0.0
        divisor = tl.where(first, 1.0,
                           tl.div_rn(tl.maximum(tl.div_rn(norm, previous + 1e-8), growth), growth))
        tl.store(Limiter_ptr, tl.where(first, norm, tl.div_rn(norm, divisor)))
    for start in range(0, OWN, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < OWN
        coef = tl.div_rn(tl.load(LineCoef_ptr + offs, mask=mask, other=0.0), divisor)
        tl.store(LineCoef_ptr + offs, coef, mask=mask)
        tl.store(GradCoef_ptr + offs, grad_scale * coef, mask=mask)


# --------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------
def _fp32(x: float) -> float:
    return float(np.float32(x))


def grad_scale(lr: float, beta1: float, beta2: float, weight_decay: float, scale: float,
               step: int, mode: int) -> float:
    """fl(d·α_t) (Fira) or fl(d·α_t·√a) (APOLLO), in double then rounded once (the C++
    kernel's full_rank_grad_scale)."""
    alpha_t = lr * math.sqrt(1.0 - math.pow(beta2, float(step))) / (1.0 - math.pow(beta1,
                                                                                  float(step)))
    decay = 1.0 - lr * weight_decay
    return _fp32(decay * alpha_t * (1.0 if mode == FIRA else math.sqrt(scale)))


@dataclasses.dataclass
class FullRankBuffers:
    """The workspaces of one full-rank step (allocated per call: low-rank or per-line sized)."""

    mode: int
    line_sums: torch.Tensor  # (3, rank tiles, own): ν and ρ partials, γ
    line_coef: torch.Tensor  # (own,) c_i
    grad_coef: torch.Tensor  # (own,) gc_i
    low_rank: torch.Tensor | None  # R (Fira), fp32, the low-rank shape

    @property
    def r_tiles(self) -> int:
        return self.line_sums.shape[1]


def full_rank_buffers(mode: int, own: int, low_rank_shape, r_tiles: int, device
                      ) -> FullRankBuffers:
    f32 = dict(dtype=torch.float32, device=device)
    return FullRankBuffers(
        mode, torch.empty((3, r_tiles, own), **f32), torch.empty(own, **f32),
        torch.empty(own, **f32), torch.empty(low_rank_shape, **f32) if mode == FIRA else None)


def finalize_full_rank(buffers: FullRankBuffers, basis, rank: int, long: int, right: bool, *,
                       tensor_norm: bool, limiter: torch.Tensor | None, scale: float,
                       scale_front: bool, growth: float, grad_scale_: float, index_64: bool,
                       interpreted: bool) -> None:
    """Between launches A and B: (Fira) the Gram of ``basis`` (a _common.BasisArgs) and the
    per-line quadratic, then the one-program finalize (module docstring)."""
    own = buffers.line_coef.shape[0]
    quad = buffers.line_coef  # a valid pointer, unread unless Fira
    if buffers.mode == FIRA:
        device = buffers.line_coef.device
        gram = torch.empty((rank, rank), dtype=torch.float32, device=device)
        _gram_kernel[(triton.cdiv(rank, GRAM_BLOCK) ** 2,)](
            *basis.pointers, gram, basis.stride_rank, basis.stride_long, rank, long,
            BLOCK_R=GRAM_BLOCK, BLOCK_LONG=GRAM_BLOCK_LONG, BASIS=basis.kind,
            PROJ_GROUP=basis.group_size, INDEX_64=index_64, INTERPRETED=interpreted,
            num_warps=gram_warps(basis.kind), num_stages=2)
        quad = torch.empty(own, dtype=torch.float32, device=device)
        _gram_quadratic_kernel[(triton.cdiv(own, QUAD_BLOCK_OWN),)](
            buffers.low_rank, gram, quad, buffers.low_rank.stride(0), own, rank, RIGHT=right,
            BLOCK_OWN=QUAD_BLOCK_OWN, BLOCK_K=QUAD_BLOCK_K, INDEX_64=index_64, num_warps=4,
            num_stages=2)
    _finalize_kernel[(1,)](
        buffers.line_sums, quad, buffers.line_coef if limiter is None else limiter,
        buffers.line_coef, buffers.grad_coef, own, buffers.r_tiles, _fp32(scale),
        _fp32(scale) if scale_front else 1.0, _fp32(growth), grad_scale_,
        FULL_RANK=buffers.mode, TENSOR=tensor_norm, HAS_LIMITER=limiter is not None,
        BLOCK=FINALIZE_BLOCK, num_warps=4, enable_fp_fusion=False)


def aot_variants():
    """(variant, signature, constexprs, num_warps, num_stages, options) of every launch of this
    module (triton_kernels/aot.py --kernels full_rank): the Gram for each basis format (dense in
    bf16 and fp32, packed INT4, DCT), side (the unit stride of a dense or INT4 basis) and offset
    width; the quadratic per side and offset width; the finalize per mode, φ kind and limiter."""
    from .aot import _basis_constexprs, _basis_pointers

    for (basis, proj), right, index_64 in itertools.product(
            (("dense", "bf16"), ("dense", "fp32"), ("int4", "int4"), ("dct", "dct")),
            (True, False), (False, True)):
        unit = {} if basis == "dct" else {"stride_pl" if right else "stride_pr": 1}
        signature = {**_basis_pointers(basis, proj), "Gram_ptr": "*fp32",
                     **{k: "i32" for k in ("stride_pr", "stride_pl", "R", "LONG") if k not in unit}}
        constexprs = {"BLOCK_R": GRAM_BLOCK, "BLOCK_LONG": GRAM_BLOCK_LONG, "INDEX_64": index_64,
                      "INTERPRETED": False, **_basis_constexprs(basis), **unit}
        variant = {"kernel": "gram", "basis": basis, "proj": proj,
                   "side": "right" if right else "left", "index_64": index_64}
        yield variant, signature, constexprs, gram_warps(constexprs["BASIS"]), 2, {}
    for right, index_64 in itertools.product((True, False), (False, True)):
        signature = {"LowRank_ptr": "*fp32", "Gram_ptr": "*fp32", "Quad_ptr": "*fp32",
                     "stride_lowm": "i32", "OWN": "i32", "R": "i32"}
        constexprs = {"RIGHT": right, "BLOCK_OWN": QUAD_BLOCK_OWN, "BLOCK_K": QUAD_BLOCK_K,
                      "INDEX_64": index_64}
        variant = {"kernel": "gram_quadratic", "side": "right" if right else "left",
                   "index_64": index_64}
        yield variant, signature, constexprs, 4, 2, {}
    for mode, tensor, limiter in itertools.product((FIRA, APOLLO), (False, True), (False, True)):
        signature = {**dict.fromkeys(("LineSums_ptr", "Quad_ptr", "Limiter_ptr", "LineCoef_ptr",
                                      "GradCoef_ptr"), "*fp32"),
                     "OWN": "i32", "R_TILES": "i32",
                     **dict.fromkeys(("scale", "front", "growth", "grad_scale"), "fp32")}
        constexprs = {"FULL_RANK": mode, "TENSOR": tensor, "HAS_LIMITER": limiter,
                      "BLOCK": FINALIZE_BLOCK}
        variant = {"kernel": "finalize", "full_rank": mode, "tensor": tensor, "limiter": limiter}
        yield variant, signature, constexprs, 4, 1, {"enable_fp_fusion": False}


AOT_KERNELS = {"gram": "_gram_kernel", "gram_quadratic": "_gram_quadratic_kernel",
               "finalize": "_finalize_kernel"}
