"""Plain-torch reference of every ``lowrank`` op: the executable spec and the fallback backend.

Each function computes exactly what DESIGN.md §4 states, in fp32 whatever the storage dtype, and
writes results back to the caller's tensors in their own dtype (rounding once). Kernels are tested
against these functions; these functions are tested against the peer packages (galore-torch,
q-galore-torch, fira). Nothing here validates arguments (lowrank_kernels.ops does that) and nothing
here imports from the rest of the package.
"""

from __future__ import annotations

import math

import torch


def is_right_side(m: int, n: int) -> bool:
    """GaLore's "std" side rule (DESIGN.md §4.1): project from the right when m >= n."""
    return m >= n


def _side(m: int, n: int, right: bool | None) -> bool:
    """``right`` if given, else the side rule. A row shard of a weight (FSDP2) keeps the side of
    the whole weight, which its own shape may not show (a 512×4096 shard of a 4096×4096 one)."""
    return is_right_side(m, n) if right is None else right


def project(grad: torch.Tensor, proj: torch.Tensor, right: bool | None = None) -> torch.Tensor:
    """R = G Qᵀ (m×r; right, proj r×n) or R = Pᵀ G (r×n; left, proj m×r), in fp32."""
    g, p = grad.float(), proj.float()
    return g @ p.T if _side(*grad.shape, right) else p.T @ g


def project_back(low_rank: torch.Tensor, proj: torch.Tensor, m: int, n: int, scale: float,
                 right: bool | None = None) -> torch.Tensor:
    """scale · N Q (right, N m×r) or scale · P N (left, N r×n), an m×n fp32 tensor."""
    lr_, p = low_rank.float(), proj.float()
    return (lr_ @ p if _side(m, n, right) else p @ lr_) * scale


def adam_step_size(lr: float, beta1: float, beta2: float, step: int) -> float:
    """α_t = lr·√(1−β2ᵗ)/(1−β1ᵗ): bias correction folded into the step size (ε not corrected)."""
    return lr * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)


def adam_normalized(low_rank_grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                    beta1: float, beta2: float, eps: float) -> torch.Tensor:
    """Updates fp32 moments in place and returns N = M / (√V + ε)."""
    exp_avg.mul_(beta1).add_(low_rank_grad, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(low_rank_grad, low_rank_grad, value=1.0 - beta2)
    return exp_avg / (exp_avg_sq.sqrt() + eps)


def fused_galore_step(param: torch.Tensor, grad: torch.Tensor, proj: torch.Tensor,
                      exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *, lr: float, beta1: float,
                      beta2: float, eps: float, weight_decay: float, scale: float, step: int,
                      seed: int = 0, right: bool | None = None) -> None:
    """One GaLore AdamW step (DESIGN.md §4.2), galore-torch ``GaLoreAdamW`` semantics.

    M ← β1·M + (1−β1)·R,  V ← β2·V + (1−β2)·R²,  N = M / (√V + ε),
    W ← W − α_t·scale·back(N),  then  W ← W − lr·wd·W  (decoupled decay after the update).
    N uses the fp32 moments; bf16 moments are then stored with stochastic rounding
    (:func:`store_moments_`, Philox key rounding_philox_seed(seed, step)). ``right`` overrides
    the side rule (see :func:`_side`).
    """
    exp_avg32, exp_avg_sq32 = exp_avg.float(), exp_avg_sq.float()
    normalized = adam_normalized(project(grad, proj, right), exp_avg32, exp_avg_sq32, beta1, beta2,
                                 eps)
    galore_update_(param, normalized, proj, lr=lr, beta1=beta1, beta2=beta2,
                   weight_decay=weight_decay, scale=scale, step=step, right=right)
    store_moments_(exp_avg, exp_avg_sq, exp_avg32, exp_avg_sq32, rounding_philox_seed(seed, step))


def galore_update_(param: torch.Tensor, normalized: torch.Tensor, proj: torch.Tensor, *,
                   lr: float, beta1: float, beta2: float, weight_decay: float, scale: float,
                   step: int, right: bool | None = None) -> None:
    """The weight half of :func:`fused_galore_step`, given N:
    W ← W − α_t·scale·back(N), then W ← W − lr·wd·W."""
    m, n = param.shape
    w = param.float()
    w.sub_(project_back(normalized, proj, m, n, scale, right),
           alpha=adam_step_size(lr, beta1, beta2, step))
    if weight_decay != 0.0:
        w.mul_(1.0 - lr * weight_decay)
    param.copy_(w)


# --------------------------------------------------------------------------------------------
# DCT projection (DESIGN.md §4.5)
# --------------------------------------------------------------------------------------------
def dct_basis(d: int, indices: torch.Tensor) -> torch.Tensor:
    """Rows ``indices`` of the orthonormal DCT-II basis of size d, an r×d fp32 tensor:
    C[k, i] = c_k·cos(π(2i+1)k/(2d)), c_0 = √(1/d), c_k = √(2/d) (= scipy.fft.dct(eye(d),
    norm="ortho", axis=0)). Computed in float64 with the phase (2i+1)k reduced mod 4d exactly."""
    k = indices.to(torch.int64).reshape(-1, 1)
    i = torch.arange(d, dtype=torch.int64, device=indices.device).reshape(1, -1)
    phase = ((2 * i + 1) * k) % (4 * d)
    scale = torch.where(k == 0, math.sqrt(1.0 / d), math.sqrt(2.0 / d)).to(torch.float64)
    return (scale * torch.cos(phase.to(torch.float64) * (math.pi / (2 * d)))).float()


def dct_coefficients(grad: torch.Tensor, right: bool | None = None) -> torch.Tensor:
    """G's DCT-II coefficients along its short side, fp32: G Cᵀ (m×d, right) or C G (d×n, left).
    ``right`` overrides the side rule (see :func:`_side`)."""
    m, n = grad.shape
    right = _side(m, n, right)
    d = n if right else m
    basis = dct_basis(d, torch.arange(d, device=grad.device))
    g = grad.float()
    return g @ basis.T if right else basis @ g


def dct_scores(grad: torch.Tensor, norm: int = 1, right: bool | None = None) -> torch.Tensor:
    """Per-frequency alignment: the ℓ1 (norm=1) or ℓ2 (norm=2) norm of each column (right) or row
    (left) of dct_coefficients(grad), length d = min(m, n) (n right, m left when ``right`` is
    given)."""
    right = _side(*grad.shape, right)
    coeffs = dct_coefficients(grad, right)
    return torch.linalg.vector_norm(coeffs, ord=norm, dim=0 if right else 1)


def top_r_indices(scores: torch.Tensor, rank: int) -> torch.Tensor:
    """The r highest scores (ties to the lower index, NaN highest), as int32 in increasing order."""
    best = torch.sort(scores, descending=True, stable=True).indices[:rank]
    return torch.sort(best).values.to(torch.int32)


def dct_select(grad: torch.Tensor, rank: int, norm: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx, R): the rank DCT-II rows best aligned with G and the projection onto them,
    R = (G Cᵀ)[:, idx] (m×r, right) or (C G)[idx, :] (r×n, left), taken from the same
    coefficients that were scored (no second GEMM)."""
    coeffs = dct_coefficients(grad)
    right = is_right_side(*grad.shape)
    scores = torch.linalg.vector_norm(coeffs, ord=norm, dim=0 if right else 1)
    idx = top_r_indices(scores, rank)
    low_rank = coeffs[:, idx.long()] if right else coeffs[idx.long(), :]
    return idx, low_rank.contiguous()


def dct_projection(indices: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """The dense basis that DCT indices stand for in fused_galore_step: Q = C[idx, :] (r×n, right)
    or P = C[idx, :]ᵀ (m×r, left)."""
    right = is_right_side(m, n)
    rows = dct_basis(n if right else m, indices)
    return rows if right else rows.T.contiguous()


def fused_galore_step_dct(param: torch.Tensor, grad: torch.Tensor, indices: torch.Tensor,
                          exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, **hyper) -> None:
    """fused_galore_step with DCT row indices in place of the dense basis (DESIGN.md §4.5)."""
    fused_galore_step(param, grad, dct_projection(indices, *param.shape), exp_avg, exp_avg_sq,
                      **hyper)


# --------------------------------------------------------------------------------------------
# Q-GaLore formats (DESIGN.md §4.3-§4.4): Philox uniforms, INT4/INT8 group quantization, and the
# fused step on a packed INT4 basis and/or INT8 weight codes.
#
# A group is ``group_size`` consecutive elements of the row-major flattened tensor; the last one
# may be partial and groups may straddle rows. Scales and zeros are fp32, one per group.
# Stochastic rounding draws u = philox_uniform(seed + 2**32·step, row-major index) (step = 0 for
# quantize_int8), the numbers Triton's ``tl.rand(seed + 2**32·step, index)`` returns.
# --------------------------------------------------------------------------------------------
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_PHILOX_ROUNDS = 10
_UINT31_TO_UNIT = 4.6566127342e-10  # Triton's scale: (2^31 - 1)·scale < 1 in fp32
_U32 = 0xFFFFFFFF
INT4_MAX_CODE, INT8_MAX_CODE = 15, 255
MIN_QUANT_RANGE = 1e-5


def rounding_philox_seed(seed: int, step: int) -> int:
    """The Philox seed of step ``step`` of the stochastic-rounding stream ``seed``: key (seed, step)."""
    return seed + (step << 32)


def _mul_u32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of the 64-bit product of the constant a and uint32 values b (held
    in int64), computed from 16-bit halves of b so that no int64 product overflows."""
    b_hi, b_lo = b >> 16, b & 0xFFFF
    prod_hi, prod_lo = a * b_hi, a * b_lo  # each < 2^48
    high = (prod_hi + (prod_lo >> 16)) >> 16
    low = (((prod_hi & 0xFFFF) << 16) + prod_lo) & _U32
    return high, low


def philox_uint32x2(seed: int, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The first two output words of Philox-4x32-10 (int64 tensors holding uint32s), as
    Triton's ``tl.randint4x(seed, offsets)[:2]``: key = (low, high) words of seed; counter =
    (low, high words of the offset, 0, 0). An int32 offset is its 32 bits (high word 0), as in
    Triton."""
    off = offsets.to(torch.int64)
    if offsets.dtype == torch.int32:
        off = off & _U32
    c0, c1 = off & _U32, (off >> 32) & _U32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _U32, (seed >> 32) & _U32
    for _ in range(_PHILOX_ROUNDS):
        hi_b, lo_b = _mul_u32(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul_u32(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_KEY_A) & _U32, (k1 + _PHILOX_KEY_B) & _U32
    return c0, c1


def philox_uint32(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """The first output word, Triton's ``tl.randint(seed, offsets)``."""
    return philox_uint32x2(seed, offsets)[0]


def philox_uniform(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """u ∈ [0, 1) of Philox-4x32-10 as Triton's ``tl.rand(seed, offsets)``, in fp32: the word
    of :func:`philox_uint32`, read as int32 and bit-inverted when negative, times
    4.6566127342e-10 in fp32."""
    c0 = philox_uint32(seed, offsets)
    x = torch.where(c0 >= 2**31, _U32 - c0, c0)  # ~x of the int32 reading, for negative ones
    return x.to(torch.float32) * torch.tensor(_UINT31_TO_UNIT, dtype=torch.float32)


# bf16 moments (lowrank/adam.h): stored with stochastic rounding from one Philox call per element
# at counter (row-major index, 1, 0, 0): the first word rounds M, the second V
MOMENT_STREAM = 1 << 32


def stochastic_round_bf16(x: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """x (fp32) rounded to bf16 stochastically with 32-bit random words (int64 holding uint32):
    the top 16 bits of the word are added to the 16 bits rounding drops, so |x| rounds up with
    probability (dropped bits)/2^16 and E[result] = x. NaN stays NaN."""
    bits = x.float().contiguous().view(torch.int32).to(torch.int64) & _U32
    rounded = ((bits + (words >> 16)) >> 16) << 16
    rounded = torch.where(rounded >= 2**31, rounded - 2**32, rounded).to(torch.int32)
    out = rounded.view(torch.float32).to(torch.bfloat16)  # exact: the low 16 bits are zero
    return torch.where(torch.isnan(x), torch.full_like(out, float("nan")), out)


def store_moments_(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, m: torch.Tensor,
                   v: torch.Tensor, philox_seed: int) -> None:
    """exp_avg ← m, exp_avg_sq ← v (fp32 values) in their dtype: fp32 as is; bf16 rounded
    stochastically with the words philox_uint32x2(philox_seed, row-major index + MOMENT_STREAM),
    the first for M and the second for V."""
    if exp_avg.dtype != torch.bfloat16:
        exp_avg.copy_(m)
        exp_avg_sq.copy_(v)
        return
    index = torch.arange(m.numel(), device=m.device).view(m.shape)
    words_m, words_v = philox_uint32x2(philox_seed, index + MOMENT_STREAM)
    exp_avg.copy_(stochastic_round_bf16(m, words_m))
    exp_avg_sq.copy_(stochastic_round_bf16(v, words_v))


def num_groups(numel: int, group_size: int) -> int:
    return -(-numel // group_size)


def group_quant_params(lo: torch.Tensor, hi: torch.Tensor, max_code: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """s = max(hi − lo, 1e-5)/max_code, z = clamp(−round(lo/s), 0, max_code), fp32."""
    scales = (hi - lo).clamp(min=MIN_QUANT_RANGE) / max_code
    zeros = (-torch.round(lo / scales)).clamp(0, max_code)
    return scales, zeros


def quantize_codes(x: torch.Tensor, group_size: int, max_code: int, *, stochastic: bool = False,
                   philox_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat codes (uint8, one per element, unpacked), scales and zeros of x's row-major groups.

    Nearest: q = clamp(round(x/s) + z). Stochastic: q = clamp(⌊x/s⌋ + [u < x/s − ⌊x/s⌋] + z)
    with u = philox_uniform(philox_seed, row-major index).
    """
    flat = x.detach().reshape(-1).float()
    numel, groups = flat.numel(), num_groups(flat.numel(), group_size)
    # The partial last group is padded with its own last element: min/max are unchanged.
    padded = torch.cat([flat, flat[-1:].expand(groups * group_size - numel)])
    padded = padded.view(groups, group_size)
    scales, zeros = group_quant_params(padded.amin(1), padded.amax(1), max_code)
    y = padded / scales[:, None]
    if stochastic:
        u = philox_uniform(philox_seed, torch.arange(groups * group_size, device=x.device))
        down = torch.floor(y)
        rounded = torch.where(u.view_as(y) < y - down, down + 1, down)
    else:
        rounded = torch.round(y)
    codes = (rounded + zeros[:, None]).clamp(0, max_code)
    return codes.reshape(-1)[:numel].to(torch.uint8), scales, zeros


def dequantize_codes(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     group_size: int) -> torch.Tensor:
    """x̃ = s·(q − z) of flat codes, fp32, flat."""
    numel = codes.numel()
    s = scales.repeat_interleave(group_size)[:numel]
    z = zeros.repeat_interleave(group_size)[:numel]
    return s * (codes.reshape(-1).float() - z)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Two codes per byte: element 2k in the low nibble, 2k+1 in the high nibble (an odd count
    leaves the last high nibble 0)."""
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_int4(packed: torch.Tensor, numel: int) -> torch.Tensor:
    return torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)[:numel]


def quantize_int4(x: torch.Tensor, group_size: int = 256
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed INT4 codes (uint8, ceil(numel/2)), fp32 scales and zeros (DESIGN.md §4.3)."""
    codes, scales, zeros = quantize_codes(x, group_size, INT4_MAX_CODE)
    return pack_int4(codes), scales, zeros


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    shape: list[int], group_size: int = 256) -> torch.Tensor:
    numel = math.prod(shape)
    codes = unpack_int4(packed, numel)
    return dequantize_codes(codes, scales, zeros, group_size).view(shape)


def quantize_int8(x: torch.Tensor, group_size: int = 256, stochastic: bool = False,
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """INT8 codes (uint8, x's shape), fp32 scales and zeros (DESIGN.md §4.4)."""
    codes, scales, zeros = quantize_codes(x, group_size, INT8_MAX_CODE, stochastic=stochastic,
                                          philox_seed=rounding_philox_seed(seed, 0))
    return codes.view(x.shape), scales, zeros


def dequantize_int8(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    group_size: int = 256) -> torch.Tensor:
    return dequantize_codes(codes, scales, zeros, group_size).view(codes.shape)


def quantized_basis_shape(m: int, n: int, rank: int) -> list[int]:
    """Logical shape of the basis a packed INT4 proj holds: r×n (right) or m×r (left)."""
    return [rank, n] if is_right_side(m, n) else [m, rank]


def fused_qgalore_step(param: torch.Tensor, grad: torch.Tensor, proj: torch.Tensor,
                       exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *, lr: float,
                       beta1: float, beta2: float, eps: float, weight_decay: float, scale: float,
                       step: int, proj_scales: torch.Tensor | None = None,
                       proj_zeros: torch.Tensor | None = None, proj_group_size: int = 256,
                       param_scales: torch.Tensor | None = None,
                       param_zeros: torch.Tensor | None = None, param_group_size: int = 256,
                       seed: int = 0) -> None:
    """The GaLore step of ``fused_galore_step`` on a packed INT4 basis and/or INT8 weight codes.

    proj uint8: the basis is dequantize_int4(proj) with the rank of exp_avg. param uint8:
    Ŵ = dequantize_int8(param); W' = (1 − lr·wd)(Ŵ − α_t·scale·back(N)) in fp32; then param,
    param_scales, param_zeros ← quantize_int8 of W' with stochastic rounding, Philox seed
    rounding_philox_seed(seed, step).
    """
    m, n = param.shape
    hyper = {"lr": lr, "beta1": beta1, "beta2": beta2, "eps": eps,
             "weight_decay": weight_decay, "scale": scale, "step": step, "seed": seed}
    basis = proj
    if proj.dtype == torch.uint8:
        rank = exp_avg.shape[1] if is_right_side(m, n) else exp_avg.shape[0]
        basis = dequantize_int4(proj, proj_scales, proj_zeros, quantized_basis_shape(m, n, rank),
                                proj_group_size)
    if param.dtype != torch.uint8:
        fused_galore_step(param, grad, basis, exp_avg, exp_avg_sq, **hyper)
        return
    weight = dequantize_int8(param, param_scales, param_zeros, param_group_size)
    fused_galore_step(weight, grad, basis, exp_avg, exp_avg_sq, **hyper)
    codes, scales, zeros = quantize_codes(weight, param_group_size, INT8_MAX_CODE,
                                          stochastic=True,
                                          philox_seed=rounding_philox_seed(seed, step))
    param.copy_(codes.view(m, n))
    param_scales.copy_(scales)
    param_zeros.copy_(zeros)
