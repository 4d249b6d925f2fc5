"""Pieces shared by the Triton kernels of the fused step (fused_galore_step.py; the experimental
one-pass kernel, experimental/fused_galore_step_onepass.py) and dct_select.py: the addressing of
the two projection sides, the basis loader of every projection format, the dot and rounding
helpers that also work around Triton 3.8 interpreter bugs, and the host Adam scalars.

Strides. Every matrix is addressed through both of its strides (``_tile_offsets``): read-only
inputs (G, a dense basis) may have any layout -- a transposed gradient or galore-torch's strided
SVD basis is read in place, never copied. The launchers pass the dense tensors' unit strides as
the integer 1, which the JIT specialises to a constant: a row-major operand compiles to the same
code as with one stride (aot.py compiles those specialisations).

Projection formats (DESIGN.md §4.1, §4.3, §4.5; the constexpr BASIS of every kernel). The basis is
r×n on the right side (Q) and m×r on the left (P); a kernel reads it as tiles of (rank, long)
coordinates, long being the basis' size-d axis (n right, m left), and never materialises it.
Element (k, i) sits at k·stride_pr + i·stride_pl (BasisArgs: the strides along rank and long):
  BASIS_DENSE  a float tensor (its own dtype, any strides), loaded as is;
  BASIS_INT4   packed codes, two per byte, low nibble first, of the row-major basis as stored
               (r×n right, m×r left); group g = PROJ_GROUP consecutive elements of that order,
               value s[g]·(q − z[g]) in fp32 (quant.dequantize_codes, as lowrank/quant.h).
               PROJ_GROUP is a constexpr (divisions become shifts for powers of two): each
               group size compiles its own kernels; the AOT test checks q-galore's 256;
  BASIS_DCT    int32 frequencies k of the orthonormal DCT-II of size d; the value at (k, i) is
               c_k·cos(π(2i+1)k/(2d)) with the integer phase reduction of lowrank/dct.h.
Which type a generated (INT4 or DCT) basis enters tl.dot in. Its values are fp32 numbers (s·(q−z),
c_k·cos φ). In the projection R = G·basis with a 16-bit G, rounding them once to G's type (what
q-galore-torch does, dequantizing P to the gradient's dtype before its matmul) would put a
2^-9 relative error into R and the fp32 moments, 20× the 1e-4 that tests/cases.py allows fp32
states fed by low-precision inputs (DESIGN.md §4: the arithmetic is fp32 on the stored values).
So each value v enters as the pair hi = rn(v), lo = rn(v − hi) in G's type and R accumulates
G·hi + G·lo in fp32: two tensor-core dots, R within ~2^-16 relative of the fp32 product, at the
cost of one more MMA per tile in a kernel bound by DRAM (G's products with hi and lo are exact).
With an fp32 G the dot is the exact fp32 ("ieee") one. The back projection multiplies in W's
type when W is 16-bit (N and the basis rounded once, as for a dense basis and as galore-torch
does; judged by the low-precision rule), else in exact fp32 (fp32 and INT8 weights)."""

from __future__ import annotations

import dataclasses
import math

import torch
import triton
import triton.language as tl

from lowrank_kernels import reference

from .quant import dequantize_codes

# The Philox stream (counter word 1 = 1) of bf16 moments' stochastic rounding (lowrank/adam.h)
MOMENT_STREAM = tl.constexpr(reference.MOMENT_STREAM)
DEFAULT_NUM_SMS = 132  # H100 SXM; used when no GPU can be queried (interpreter, AOT)

# Projection formats: the constexpr BASIS of the kernels (see the module docstring).
BASIS_DENSE: tl.constexpr = tl.constexpr(0)
BASIS_INT4: tl.constexpr = tl.constexpr(1)
BASIS_DCT: tl.constexpr = tl.constexpr(2)
BASIS_NAMES = {0: "dense", 1: "int4", 2: "dct"}


@triton.jit
def _own_long(M, N, RIGHT: tl.constexpr):
    """(own, long) extents: the owned axis is the rows on the right side, the columns on the left
    (the left side is the right side of the transposed problem)."""
    if RIGHT:
        return M, N
    else:
        return N, M


@triton.jit
def _grid_tile(ROWS, COLS, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
               INDEX_64: tl.constexpr):
    """(row offsets, column offsets, row mask, column mask) of this program's tile of a 2-D grid
    launched as one axis, column tiles fastest (so the programs of one row strip are neighbours
    and share it through L2); INDEX_64 makes every later offset product 64-bit."""
    num_col_tiles = tl.cdiv(COLS, BLOCK_COLS)
    pid = tl.program_id(0)
    offs_rows = (pid // num_col_tiles) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    offs_cols = (pid % num_col_tiles) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    if INDEX_64:
        offs_rows = offs_rows.to(tl.int64)
        offs_cols = offs_cols.to(tl.int64)
    return offs_rows, offs_cols, offs_rows < ROWS, offs_cols < COLS


@triton.jit
def _tile_offsets(offs_own, offs_other, stride_row, stride_col, RIGHT: tl.constexpr):
    """Element offsets of an (owned, other) tile of a matrix with strides (stride_row,
    stride_col) whose rows are the owned axis on the right side and the other axis on the left
    side. A unit stride passed as 1 is a compile-time constant (module docstring)."""
    if RIGHT:
        return offs_own[:, None] * stride_row + offs_other[None, :] * stride_col
    else:
        return offs_own[:, None] * stride_col + offs_other[None, :] * stride_row


@triton.jit
def _dot(a, b, acc, INTERPRETED: tl.constexpr):
    """acc + a·b: tensor cores when both operands share a 16-bit type, else an exact fp32 dot.

    Triton's interpreter multiplies bfloat16 bit patterns in tl.dot (triton-lang/triton#11584,
    "not supported yet"), so there bfloat16 operands are widened first: products of bf16 values
    are exact in fp32, so this is the tensor-core arithmetic up to summation order."""
    if a.dtype != b.dtype or a.dtype == tl.float32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif INTERPRETED and a.dtype == tl.bfloat16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _round_to(x, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
    """fp32 ``x`` rounded to nearest even in ``dtype`` (what a cast does on the GPU).

    Triton's interpreter truncates fp32 -> bfloat16 casts, so there the rounding is done on the
    bits first and the cast then only drops zero bits."""
    if INTERPRETED and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _cos_sin_octant(x):
    """(cos x, sin x) for x ∈ [0, π/4] in fp32: Cephes' single-precision minimax polynomials
    (≈1-2 ulp there). No argument reduction is needed in this range, so unlike tl.cos/tl.sin
    (libdevice on GPUs) there is no call and no slow-path stack frame, and the interpreter and
    the GPU evaluate the same operations."""
    z = x * x
    sin_x = x + x * z * ((-1.9515295891e-4 * z + 8.3321608736e-3) * z - 1.6666654611e-1)
    cos_x = 1.0 - 0.5 * z + z * z * ((2.443315711809948e-5 * z - 1.388731625493765e-3) * z
                                      + 4.166664568298827e-2)
    return cos_x, sin_x


@triton.jit
def _dct_value(freq, pos, d):
    """C[freq, pos] of the orthonormal DCT-II of size d, reduced as lowrank/dct.h reduces it: the
    phase (2·pos+1)·freq mod 4d in integers picks the quadrant exactly, and only the remainder
    φ = rem·(π/2)/d ∈ [0, π/2) is rounded to fp32 -- here further folded to [0, π/4] in integers
    (rem or d − rem) for the polynomials of _cos_sin_octant, so values agree with the CPU's
    cosf/sinf to a few fp32 ulps. (2·pos+1)·freq < 2d²: the launchers give the indices 64 bits
    (INDEX_64) when that reaches 2**31."""
    phase = ((2 * pos + 1) * freq) % (4 * d)
    quadrant = phase // d
    rem = phase - quadrant * d
    d_float = d * 1.0  # int -> fp32, rounded to nearest as static_cast<float>
    step = tl.div_rn(tl.full((), 1.5707963267948966, tl.float32), d_float)
    upper = 2 * rem > d  # φ > π/4: cos φ = sin(π/2 − φ), sin φ = cos(π/2 − φ)
    cos_oct, sin_oct = _cos_sin_octant(tl.where(upper, d - rem, rem).to(tl.float32) * step)
    cos_phi = tl.where(upper, sin_oct, cos_oct)
    sin_phi = tl.where(upper, cos_oct, sin_oct)
    value = tl.where(quadrant == 0, cos_phi,
                     tl.where(quadrant == 1, -sin_phi, tl.where(quadrant == 2, -cos_phi, sin_phi)))
    one = tl.full((), 1.0, tl.float32)
    scale = tl.where(freq == 0, tl.sqrt_rn(tl.div_rn(one, d_float)),
                     tl.sqrt_rn(tl.div_rn(one + one, d_float)))
    return scale * value


@triton.jit
def _basis_values(Proj_ptr, ProjScales_ptr, ProjZeros_ptr, rank_idx, rank_mask, long_idx, mask,
                  stride_pr, stride_pl, LONG, BASIS: tl.constexpr, PROJ_GROUP: tl.constexpr):
    """Basis values at (rank_idx, long_idx), broadcastable integer tensors of any rank (rank_mask
    broadcasts like rank_idx, mask like the result); 0 where masked. Dense: the stored dtype;
    INT4 and DCT: fp32 (module docstring). (stride_pr, stride_pl): the element strides along
    rank and long (of the logical row-major basis for the 1-D packed INT4 buffer)."""
    if BASIS == BASIS_DCT:
        freq = tl.load(Proj_ptr + rank_idx, mask=rank_mask, other=0)
        if long_idx.dtype == tl.int64:
            freq = freq.to(tl.int64)
        values = tl.where(mask, _dct_value(freq, long_idx, LONG), 0.0)
    else:
        elem = rank_idx * stride_pr + long_idx * stride_pl  # Q[rank, long] or P[long, rank]
        if BASIS == BASIS_INT4:
            byte = tl.load(Proj_ptr + (elem >> 1), mask=mask, other=0)
            code = (byte >> ((elem & 1) * 4).to(tl.uint8)) & 0x0F
            group = elem // PROJ_GROUP
            scale = tl.load(ProjScales_ptr + group, mask=mask, other=0.0)
            zero = tl.load(ProjZeros_ptr + group, mask=mask, other=0.0)
            values = dequantize_codes(code, scale, zero)  # 0·(0 − 0) where masked
        else:
            values = tl.load(Proj_ptr + elem, mask=mask, other=0.0)
    return values


@triton.jit
def _basis_tile(Proj_ptr, ProjScales_ptr, ProjZeros_ptr, offs_r, offs_long, r_mask, long_mask,
                stride_pr, stride_pl, LONG, LONG_MAJOR: tl.constexpr, BASIS: tl.constexpr,
                PROJ_GROUP: tl.constexpr):
    """A tile of the basis: (long, r) when LONG_MAJOR (Qᵀ right, P left: the project operand),
    else (r, long) (Q right, Pᵀ left: the back-project operand)."""
    if LONG_MAJOR:
        values = _basis_values(Proj_ptr, ProjScales_ptr, ProjZeros_ptr, offs_r[None, :],
                               r_mask[None, :], offs_long[:, None],
                               long_mask[:, None] & r_mask[None, :], stride_pr, stride_pl, LONG,
                               BASIS, PROJ_GROUP)
    else:
        values = _basis_values(Proj_ptr, ProjScales_ptr, ProjZeros_ptr, offs_r[:, None],
                               r_mask[:, None], offs_long[None, :],
                               r_mask[:, None] & long_mask[None, :], stride_pr, stride_pl, LONG,
                               BASIS, PROJ_GROUP)
    return values


@triton.jit
def _project_tile(G_ptr, Proj_ptr, ProjScales_ptr, ProjZeros_ptr, offs_own, offs_r, own_mask,
                  r_mask, LONG, stride_gm, stride_gn, stride_pr, stride_pl, acc,
                  RIGHT: tl.constexpr, BLOCK_LONG: tl.constexpr, BASIS: tl.constexpr,
                  PROJ_GROUP: tl.constexpr, INDEX_64: tl.constexpr, INTERPRETED: tl.constexpr):
    """acc + Σ_long G[own, long]·basis[long, r]: a tile of R reduced over the whole long axis by
    one program (no split-K: the Adam epilogue that follows is nonlinear). A generated basis
    enters the dot as hi + lo in G's type when G is 16-bit (module docstring)."""
    acc, _ = _project_tile_stats(G_ptr, Proj_ptr, ProjScales_ptr, ProjZeros_ptr, offs_own,
                                 offs_r, own_mask, r_mask, LONG, stride_gm, stride_gn, stride_pr,
                                 stride_pl, acc, acc, RIGHT, BLOCK_LONG, BASIS, PROJ_GROUP,
                                 INDEX_64, INTERPRETED, False)
    return acc


@triton.jit
def _project_tile_stats(G_ptr, Proj_ptr, ProjScales_ptr, ProjZeros_ptr, offs_own, offs_r,
                        own_mask, r_mask, LONG, stride_gm, stride_gn, stride_pr, stride_pl, acc,
                        grad_sq, RIGHT: tl.constexpr, BLOCK_LONG: tl.constexpr,
                        BASIS: tl.constexpr, PROJ_GROUP: tl.constexpr, INDEX_64: tl.constexpr,
                        INTERPRETED: tl.constexpr, GRAD_SQ: tl.constexpr):
    """_project_tile, and with GRAD_SQ also grad_sq + ‖G_own‖² per own-line (a BLOCK_OWN fp32
    vector: the full-rank modes' γ_i, gathered while G streams); returns (acc, grad_sq)."""
    for start in range(0, LONG, BLOCK_LONG):
        offs_long = start + tl.arange(0, BLOCK_LONG)
        if INDEX_64:
            offs_long = offs_long.to(tl.int64)
        long_mask = offs_long < LONG
        g = tl.load(G_ptr + _tile_offsets(offs_own, offs_long, stride_gm, stride_gn, RIGHT),
                    mask=own_mask[:, None] & long_mask[None, :], other=0.0)
        if GRAD_SQ:
            g32 = g.to(tl.float32)
            grad_sq += tl.sum(g32 * g32, axis=1)
        # the basis as a (long, r) tile: Qᵀ on the right, P on the left
        basis = _basis_tile(Proj_ptr, ProjScales_ptr, ProjZeros_ptr, offs_r, offs_long, r_mask,
                            long_mask, stride_pr, stride_pl, LONG, True, BASIS, PROJ_GROUP)
        acc = _dot_basis(g, basis, acc, BASIS, INTERPRETED)
    return acc, grad_sq


@triton.jit
def _dot_basis(x, basis, acc, BASIS: tl.constexpr, INTERPRETED: tl.constexpr):
    """acc + x·basis for a basis tile of _basis_tile: a generated (INT4, DCT) basis enters as
    hi + lo in x's type when x is 16-bit, two tensor-core dots (module docstring)."""
    if BASIS != BASIS_DENSE and x.dtype != tl.float32:
        basis_hi = _round_to(basis, x.dtype, INTERPRETED)
        basis_lo = _round_to(basis - basis_hi.to(tl.float32), x.dtype, INTERPRETED)
        acc = _dot(x, basis_hi, acc, INTERPRETED)
        acc = _dot(x, basis_lo, acc, INTERPRETED)
    else:
        acc = _dot(x, basis, acc, INTERPRETED)
    return acc


@triton.jit
def _weight_tile_back(W_ptr, Proj_ptr, ProjScales_ptr, ProjZeros_ptr, Normalized_ptr, stride_wm,
                      stride_pr, stride_pl, stride_normm, M, N, R, RIGHT: tl.constexpr,
                      BLOCK_OWN: tl.constexpr, BLOCK_LONG: tl.constexpr, BLOCK_R: tl.constexpr,
                      BASIS: tl.constexpr, PROJ_GROUP: tl.constexpr, INDEX_64: tl.constexpr,
                      INTERPRETED: tl.constexpr, LowRank_ptr=None, LineCoef_ptr=None,
                      FULL_RANK: tl.constexpr = 0):
    """This program's BLOCK_OWN × BLOCK_LONG tile of W in a launch tiled like the back
    projection (_grid_tile over (own, long)): (offs_own, offs_long, own_mask, long_mask, w_offs,
    w_mask, W's tile in fp32, back(N) of the tile in fp32 (_back_project_tile in W's type;
    FULL_RANK as there))."""
    OWN, LONG = _own_long(M, N, RIGHT)
    offs_own, offs_long, own_mask, long_mask = _grid_tile(OWN, LONG, BLOCK_OWN, BLOCK_LONG,
                                                          INDEX_64)
    back = _back_project_tile(Normalized_ptr, Proj_ptr, ProjScales_ptr, ProjZeros_ptr, offs_own,
                              offs_long, own_mask, long_mask, stride_pr, stride_pl, stride_normm,
                              LONG, R, W_ptr.dtype.element_ty, RIGHT, BLOCK_OWN, BLOCK_LONG,
                              BLOCK_R, BASIS, PROJ_GROUP, INDEX_64, INTERPRETED, LowRank_ptr,
                              LineCoef_ptr, FULL_RANK)
    w_offs = _tile_offsets(offs_own, offs_long, stride_wm, 1, RIGHT)
    w_mask = own_mask[:, None] & long_mask[None, :]
    w = tl.load(W_ptr + w_offs, mask=w_mask, other=0.0).to(tl.float32)
    return offs_own, offs_long, own_mask, long_mask, w_offs, w_mask, w, back


@triton.jit
def _back_project_tile(Normalized_ptr, Proj_ptr, ProjScales_ptr, ProjZeros_ptr, offs_own,
                       offs_long, own_mask, long_mask, stride_pr, stride_pl, stride_normm, LONG,
                       R, DOT_TYPE: tl.constexpr, RIGHT: tl.constexpr, BLOCK_OWN: tl.constexpr,
                       BLOCK_LONG: tl.constexpr, BLOCK_R: tl.constexpr, BASIS: tl.constexpr,
                       PROJ_GROUP: tl.constexpr, INDEX_64: tl.constexpr,
                       INTERPRETED: tl.constexpr, LowRank_ptr=None, LineCoef_ptr=None,
                       FULL_RANK: tl.constexpr = 0):
    """back(N) of one BLOCK_OWN × BLOCK_LONG tile in fp32: Σ_r N[own, r]·basis[r, long] (N·Q
    right, P·N left; N of the low-rank shape, row stride stride_normm), K = r in BLOCK_R chunks.
    A 16-bit DOT_TYPE (the weight's) rounds both operands to it (tensor cores; the numbers
    galore-torch's bf16 back projection uses); fp32 multiplies exactly. FULL_RANK
    (full_rank.py): 1 (Fira) folds N' = N − c ⊙ R in fp32 (LowRank: R, same layout as N;
    LineCoef: c per own-line) before that rounding; 2 (APOLLO) has no back projection (0)."""
    back = tl.zeros((BLOCK_OWN, BLOCK_LONG), dtype=tl.float32)
    if FULL_RANK == 2:
        return back
    if FULL_RANK == 1:
        line_coef = tl.load(LineCoef_ptr + offs_own, mask=own_mask, other=0.0)
    for start in range(0, R, BLOCK_R):
        offs_r = start + tl.arange(0, BLOCK_R)
        if INDEX_64:
            offs_r = offs_r.to(tl.int64)
        r_mask = offs_r < R
        low_offs = _tile_offsets(offs_own, offs_r, stride_normm, 1, RIGHT)
        low_mask = own_mask[:, None] & r_mask[None, :]
        normalized = tl.load(Normalized_ptr + low_offs, mask=low_mask, other=0.0)
        if FULL_RANK == 1:
            low = tl.load(LowRank_ptr + low_offs, mask=low_mask, other=0.0)
            normalized = normalized - line_coef[:, None] * low
        basis = _basis_tile(Proj_ptr, ProjScales_ptr, ProjZeros_ptr, offs_r, offs_long, r_mask,
                            long_mask, stride_pr, stride_pl, LONG, False, BASIS, PROJ_GROUP)
        if DOT_TYPE != tl.float32:
            if normalized.dtype != DOT_TYPE:
                normalized = _round_to(normalized.to(tl.float32), DOT_TYPE, INTERPRETED)
            if basis.dtype != DOT_TYPE:
                basis = _round_to(basis.to(tl.float32), DOT_TYPE, INTERPRETED)
        back = _dot(normalized, basis, back, INTERPRETED)
    return back


@triton.jit
def _gram_kernel(
    Proj_ptr, ProjScales_ptr, ProjZeros_ptr, Gram_ptr,
    stride_pr, stride_pl,
    R, LONG,
    BLOCK_R: tl.constexpr, BLOCK_LONG: tl.constexpr, BASIS: tl.constexpr,
    PROJ_GROUP: tl.constexpr, INDEX_64: tl.constexpr, INTERPRETED: tl.constexpr,
):
    """One BLOCK_R × BLOCK_R tile of the Gram K = Q Qᵀ of any basis format (fp32, r×r, row-major;
    Q r×long as _basis_tile reads it), reduced over the long axis: GradNormLoRP's launch K and
    Fira's (full_rank.py)."""
    offs_a, offs_b, mask_a, mask_b = _grid_tile(R, R, BLOCK_R, BLOCK_R, INDEX_64)
    gram = tl.zeros((BLOCK_R, BLOCK_R), dtype=tl.float32)
    for start in range(0, LONG, BLOCK_LONG):
        offs_long = start + tl.arange(0, BLOCK_LONG)
        if INDEX_64:
            offs_long = offs_long.to(tl.int64)
        long_mask = offs_long < LONG
        rows = _basis_tile(Proj_ptr, ProjScales_ptr, ProjZeros_ptr, offs_a, offs_long, mask_a,
                           long_mask, stride_pr, stride_pl, LONG, False, BASIS, PROJ_GROUP)
        cols = _basis_tile(Proj_ptr, ProjScales_ptr, ProjZeros_ptr, offs_b, offs_long, mask_b,
                           long_mask, stride_pr, stride_pl, LONG, True, BASIS, PROJ_GROUP)
        gram = _dot(rows, cols, gram, INTERPRETED)
    tl.store(Gram_ptr + offs_a[:, None] * R + offs_b[None, :], gram,
             mask=mask_a[:, None] & mask_b[None, :])


@triton.jit
def _stochastic_round_bf16(x, word):
    """fp32 x rounded to bf16 stochastically with uint32 ``word`` (lowrank/adam.h): the top 16
    bits of the word added to the 16 dropped bits; returned as the fp32 value, whose cast to
    bf16 then only drops zero bits (exactly also in the interpreter). NaN becomes the quiet NaN
    0x7FC0 (bf16 bits), as in the C++ kernels and the reference."""
    bits = (x.to(tl.uint32, bitcast=True) + (word >> 16)) & 0xFFFF0000
    bits = tl.where(x != x, 0x7FC00000, bits)  # noqa: PLR0124 (NaN: the quiet NaN of the CPU)
    return bits.to(tl.float32, bitcast=True)


# ---- 8-bit moments (DESIGN.md §4.9, csrc/include/lowrank/moments8.h, reference.quantize_moment)
# M as int8 ±c (E4M3 codes of |M|/s, max 480), V as uint8 c (unsigned E4M4 codes of √V/s, max
# 496), one fp32 scale s = absmax/max per block of MOMENT_BLOCK rank-axis elements of an
# own-line. Only IEEE-exact operations besides the rounded divisions (tl.div_rn) and products,
# so the launcher's enable_fp_fusion=False gives the CPU kernel's codes.
EXP_AVG_MANTISSA, EXP_AVG_MAX = tl.constexpr(3), tl.constexpr(480.0)
EXP_AVG_SQ_MANTISSA, EXP_AVG_SQ_MAX = tl.constexpr(4), tl.constexpr(496.0)
FLOAT32_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _power_of_two(e):
    """2^e (fp32, exact) of int32 exponents in the normal range, from the bits."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _fp8_encode(y, word, MANTISSA: tl.constexpr):
    """Codes (int32) of magnitudes 0 ≤ y ≤ max, rounded stochastically with uint32 ``word``:
    e = max(⌊log2 y⌋, −6), z = y·2^(mb−e), k = ⌊z⌋ + [u < z − ⌊z⌋], u = (word >> 8)·2^-24."""
    e = ((y.to(tl.uint32, bitcast=True) >> 23) & 0xFF).to(tl.int32) - 127
    e = tl.maximum(e, -6)
    z = y * _power_of_two(-e + MANTISSA)  # tensor first: the interpreter's constexpr - tensor
    #                                        is a constexpr
    down = tl.floor(z)
    u = (word >> 8).to(tl.float32) * 5.9604644775390625e-08
    k = down.to(tl.int32) + (u < z - down).to(tl.int32)
    return ((e + 6) << MANTISSA) + k


@triton.jit
def _fp8_decode(code, MANTISSA: tl.constexpr):
    """The exact value (fp32) of int32 codes c ≥ 0: f = max(c >> mb, 1),
    (c − 2^mb·(f − 1))·2^(f − 7 − mb)."""
    field = tl.maximum(code >> MANTISSA, 1)
    return (code - ((field - 1) << MANTISSA)).to(tl.float32) * _power_of_two(field - 7 - MANTISSA)


@triton.jit
def _block_scales(magnitude, MAX: tl.constexpr, BLOCK_OWN: tl.constexpr, BLOCK_R: tl.constexpr,
                  MOMENT_BLOCK: tl.constexpr):
    """(scales per block (BLOCK_OWN, BLOCK_R/B), the same broadcast to the tile): absmax/MAX of
    every B = MOMENT_BLOCK rank-adjacent entries of a row of the (own, rank) tile of magnitudes
    (padding is 0). A NaN makes its block's scale NaN (tl.max alone would drop it on a GPU)."""
    blocks = tl.reshape(magnitude, (BLOCK_OWN, BLOCK_R // MOMENT_BLOCK, MOMENT_BLOCK))
    amax = tl.max(blocks, axis=2)
    has_nan = tl.max((blocks != blocks).to(tl.int32), axis=2) > 0  # noqa: PLR0124
    scales = tl.div_rn(tl.where(has_nan, float("nan"), amax), tl.full((), MAX, tl.float32))
    wide = tl.broadcast_to(tl.expand_dims(scales, 2),
                           (BLOCK_OWN, BLOCK_R // MOMENT_BLOCK, MOMENT_BLOCK))
    return scales, tl.reshape(wide, (BLOCK_OWN, BLOCK_R))


@triton.jit
def _scaled_magnitude(magnitude, scale, MAX: tl.constexpr):
    """min(|x|/s, MAX), or 0 where s is not a positive finite number."""
    usable = (scale > 0.0) & (scale <= FLOAT32_MAX)
    y = tl.div_rn(magnitude, tl.where(usable, scale, 1.0))
    return tl.where(usable, tl.minimum(y, MAX), 0.0)


@triton.jit
def _load_moment(Ptr, Scales_ptr, state_offs, scale_offs, state_mask, SIGNED: tl.constexpr):
    """A moment tile in fp32: as stored (fp32/bf16), or decoded from 8-bit codes (M = ±value·s,
    V = (value·s)², the code holding √V)."""
    stored = tl.load(Ptr + state_offs, mask=state_mask, other=0)
    if Ptr.dtype.element_ty == tl.int8 or Ptr.dtype.element_ty == tl.uint8:
        scale = tl.load(Scales_ptr + scale_offs, mask=state_mask, other=0.0)
        code = stored.to(tl.int32)
        if SIGNED:
            value = _fp8_decode(tl.abs(code), EXP_AVG_MANTISSA) * scale
            moment = tl.where(code < 0, -value, value)
        else:
            root = _fp8_decode(code, EXP_AVG_SQ_MANTISSA) * scale
            moment = root * root
    else:
        moment = stored.to(tl.float32)
    return moment


@triton.jit
def _store_moment(Ptr, Scales_ptr, state_offs, state_mask, block_offs, block_mask, moment, word,
                  SIGNED: tl.constexpr, BLOCK_OWN: tl.constexpr, BLOCK_R: tl.constexpr,
                  MOMENT_BLOCK: tl.constexpr):
    """Stores an fp32 moment tile rounded once: fp32 as is; bf16 stochastically (``word``);
    8-bit: block scales (absmax of M, or of √V) and codes rounded stochastically with ``word``
    (M: sign apart; √V: a positive value never gets code 0)."""
    if Ptr.dtype.element_ty == tl.int8 or Ptr.dtype.element_ty == tl.uint8:
        if SIGNED:
            scales, scale = _block_scales(tl.abs(moment), EXP_AVG_MAX, BLOCK_OWN, BLOCK_R,
                                          MOMENT_BLOCK)
            code = _fp8_encode(_scaled_magnitude(tl.abs(moment), scale, EXP_AVG_MAX), word,
                               EXP_AVG_MANTISSA)
            code = tl.where(moment < 0.0, -code, code)
        else:
            root = tl.sqrt_rn(moment)
            scales, scale = _block_scales(root, EXP_AVG_SQ_MAX, BLOCK_OWN, BLOCK_R, MOMENT_BLOCK)
            code = _fp8_encode(_scaled_magnitude(root, scale, EXP_AVG_SQ_MAX), word,
                               EXP_AVG_SQ_MANTISSA)
            code = tl.where((root > 0.0) & (code == 0), 1, code)
        tl.store(Scales_ptr + block_offs, scales, mask=block_mask)
        tl.store(Ptr + state_offs, code.to(Ptr.dtype.element_ty), mask=state_mask)
    elif Ptr.dtype.element_ty == tl.bfloat16:
        tl.store(Ptr + state_offs, _stochastic_round_bf16(moment, word).to(tl.bfloat16),
                 mask=state_mask)
    else:
        tl.store(Ptr + state_offs, moment, mask=state_mask)


@triton.jit
def _moment_blocks(offs_own, offs_r, own_mask, num_blocks, BLOCK_R: tl.constexpr,
                   MOMENT_BLOCK: tl.constexpr):
    """The 8-bit moment blocks of an (own, rank) tile whose rank range starts on a block
    boundary (B divides BLOCK_R): (each element's scale offset, the tile's (own, BLOCK_R/B)
    block offsets, their mask) in the (own, num_blocks) row-major scales."""
    scale_offs = offs_own[:, None] * num_blocks + (offs_r // MOMENT_BLOCK)[None, :]
    block_idx = tl.min(offs_r, axis=0) // MOMENT_BLOCK + tl.arange(0, BLOCK_R // MOMENT_BLOCK)
    block_offs = offs_own[:, None] * num_blocks + block_idx[None, :]
    block_mask = own_mask[:, None] & (block_idx < num_blocks)[None, :]
    return scale_offs, block_offs, block_mask


@triton.jit
def _adam_tile(ExpAvg_ptr, ExpAvgSq_ptr, ExpAvgScales_ptr, ExpAvgSqScales_ptr, state_offs,
               state_mask, offs_own, offs_r, own_mask, num_blocks, proj_low, beta1, beta2,
               one_minus_beta1, one_minus_beta2, eps, philox_seed, ADAGRAD: tl.constexpr,
               BLOCK_OWN: tl.constexpr, BLOCK_R: tl.constexpr, MOMENT_BLOCK: tl.constexpr):
    """Adam (AdaGrad) on one (own, rank) tile of M and V (fp32 arithmetic); returns N =
    M/(√V+ε) in fp32 from the fp32 moments (masked-out entries are not meaningful). state_offs:
    the tile's row-major indices in M and V. Rounded moments (bf16, 8-bit) are stored with the
    first (M) and second (V) words of tl.randint4x(philox_seed, index + MOMENT_STREAM), as
    lowrank/adam.h does. ADAGRAD (coefficients (0, 1, 1, 1) from the host): M = 0 in registers,
    never loaded or stored (ExpAvg_ptr and its scales are not read). 8-bit moments: the scales
    are (own, num_blocks) row-major, blocks of MOMENT_BLOCK (which divides BLOCK_R) ranks."""
    scale_offs, block_offs, block_mask = _moment_blocks(offs_own, offs_r, own_mask, num_blocks,
                                                        BLOCK_R, MOMENT_BLOCK)
    if ADAGRAD:
        exp_avg = tl.zeros_like(proj_low)
    else:
        exp_avg = _load_moment(ExpAvg_ptr, ExpAvgScales_ptr, state_offs, scale_offs, state_mask,
                               True)
    exp_avg_sq = _load_moment(ExpAvgSq_ptr, ExpAvgSqScales_ptr, state_offs, scale_offs,
                              state_mask, False)
    exp_avg = beta1 * exp_avg + one_minus_beta1 * proj_low
    exp_avg_sq = beta2 * exp_avg_sq + one_minus_beta2 * proj_low * proj_low
    # stores first, N last: fewer tiles alive at once (the 128×128 launch A tile spills otherwise)
    if ExpAvgSq_ptr.dtype.element_ty != tl.float32:
        word_m, word_v, _, _ = tl.randint4x(philox_seed, state_offs.to(tl.int64) + MOMENT_STREAM)
    else:  # fp32 moments are stored as they are: no words
        word_m = 0
        word_v = 0
    if not ADAGRAD:
        _store_moment(ExpAvg_ptr, ExpAvgScales_ptr, state_offs, state_mask, block_offs,
                      block_mask, exp_avg, word_m, True, BLOCK_OWN, BLOCK_R, MOMENT_BLOCK)
    _store_moment(ExpAvgSq_ptr, ExpAvgSqScales_ptr, state_offs, state_mask, block_offs,
                  block_mask, exp_avg_sq, word_v, False, BLOCK_OWN, BLOCK_R, MOMENT_BLOCK)
    return tl.div_rn(exp_avg, tl.sqrt_rn(exp_avg_sq) + eps)


def dot_kind(grad_dtype: torch.dtype, proj_dtype: torch.dtype) -> str:
    """'tc' when the projection dot runs on tensor cores, else 'fp32'."""
    return "tc" if grad_dtype == proj_dtype and grad_dtype != torch.float32 else "fp32"


def _round_to_fp32(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float64).to(torch.float32))


def adam_coeffs(lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                scale: float, step: int, adagrad: bool = False) -> dict[str, float]:
    """The per-step scalars of adam.h ``make_adam_coeffs``: computed in double (Python floats),
    rounded to fp32 once. ``adagrad``: coefficients (β1, 1−β1, β2, 1−β2) = (0, 1, 1, 1) and the
    step size lr (no bias correction): update_scale = fl32(d·lr·scale)."""
    lr, weight_decay = float(lr), float(weight_decay)
    if adagrad:
        beta1, beta2 = 0.0, 1.0
    bias1 = 1.0 - math.pow(beta1, float(step))
    bias2 = 1.0 - math.pow(beta2, float(step))
    alpha_t = lr if adagrad else lr * math.sqrt(bias2) / bias1
    decay = 1.0 - lr * weight_decay
    coeffs = dict(beta1=beta1, beta2=beta2, one_minus_beta1=1.0 - beta1,
                  one_minus_beta2=1.0 if adagrad else 1.0 - beta2, eps=eps, decay=decay,
                  update_scale=decay * alpha_t * scale, step_size=alpha_t)
    return {k: _round_to_fp32(v) for k, v in coeffs.items()}


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_NUM_SMS


def needs_index_64(*tensors: torch.Tensor) -> bool:
    """int32 offsets overflow in some tensor: its largest element offset (its span through its
    strides: a strided view reaches beyond its element count) is 2**31 or more."""
    return max(sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
               for t in tensors) >= 2**31 - 1


# --------------------------------------------------------------------------------------------
# host side: the projection as the kernels read it
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BasisArgs:
    """The kernel arguments of one projection: ``tensor`` (dense values, packed INT4 codes or
    DCT frequencies), the INT4 scales/zeros (``tensor`` itself when unused: a valid pointer),
    ``kind`` (BASIS_*), ``stride_rank``/``stride_long`` (element strides along the rank and the
    size-d axis; module docstring), ``group_size`` and ``dot_dtype``: the type its values enter
    the projection dot in (module docstring)."""

    tensor: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    kind: int
    stride_rank: int
    stride_long: int
    group_size: int
    dot_dtype: torch.dtype

    @property
    def pointers(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.tensor, self.scales, self.zeros


def basis_args(proj: torch.Tensor, m: int, n: int, rank: int, grad_dtype: torch.dtype,
               proj_scales: torch.Tensor | None = None, proj_zeros: torch.Tensor | None = None,
               proj_group_size: int = 256, right: bool | None = None) -> BasisArgs:
    """BasisArgs of a validated proj (float: dense, any strides; uint8: packed INT4; int32:
    DCT) on the side ``right`` (None: the side rule). The 1-D packed codes, scales, zeros and
    DCT indices are made dense (a copy of at most r·d/2 bytes when strided); a dense basis is
    read through its strides."""
    right = m >= n if right is None else right
    generated_dtype = torch.float32 if grad_dtype == torch.float32 else grad_dtype
    if proj.dtype == torch.uint8:
        return BasisArgs(proj.contiguous(), proj_scales.contiguous(), proj_zeros.contiguous(),
                         int(BASIS_INT4), n if right else 1, 1 if right else rank,
                         proj_group_size, generated_dtype)
    if proj.dtype == torch.int32:
        proj = proj.contiguous()
        return BasisArgs(proj, proj, proj, int(BASIS_DCT), 0, 0, 1, generated_dtype)
    # Q[rank, long] (right, r×n) or P[long, rank] (left, m×r)
    stride_rank, stride_long = proj.stride() if right else proj.stride()[::-1]
    return BasisArgs(proj, proj, proj, int(BASIS_DENSE), stride_rank, stride_long, 1,
                     proj.dtype)


def needs_wide_phase(kind: int, m: int, n: int) -> bool:
    """The DCT phase (2i+1)·k < 2d² overflows int32 from d = 32768 (see _dct_value)."""
    d = min(m, n)
    return kind == int(BASIS_DCT) and 2 * d * d >= 2**31
