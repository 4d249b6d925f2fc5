"""Typed Python entry points of the ``lowrank`` ops: one function per op, with its maths.

Each function calls ``torch.ops.lowrank.<op>`` (schemas in csrc/lowrank.cpp): the C++ kernel on
CPU tensors, the Triton kernel on CUDA tensors (lowrank_kernels/_dispatch.py says how it is
registered, and ``lowrank_kernels.set_cuda_backend`` switches CUDA tensors to the CUDA C++
kernels). So ``ops.<op>(...)``, ``torch.ops.lowrank.<op>(...)`` and ``torch.compile`` run the same
kernel. ``backend=`` names one implementation instead, for tests and benchmarks:

========== ==================================================================================
backend    implementation
========== ==================================================================================
None       ``torch.ops.lowrank.<op>`` (the default; see above)
cpu        C++ kernel (csrc/cpu), CPU tensors
cuda       CUDA C++ kernel (csrc/cuda, ``torch.ops.lowrank_cuda.<op>``), CUDA tensors
triton     Triton launcher (lowrank_kernels.triton_kernels); CPU tensors need TRITON_INTERPRET=1
reference  plain torch (lowrank_kernels.reference) after validation, any device
========== ==================================================================================

Asking for a backend that cannot serve the tensors raises. Validation lives in
lowrank_kernels._checks (the fake kernels, the Triton launchers and the reference path share
it); the C++ kernels check in csrc/include/lowrank/checks.h with the same messages. Read-only
tensors may have any strides; tensors written in place must be dense row-major.
"""

from __future__ import annotations

import torch

from lowrank_kernels import _dispatch
from lowrank_kernels._checks import (  # noqa: F401  (validation helpers for the optimizers)
    FLOAT_DTYPES,
    MAX_ROUNDING_SEED,
    MAX_ROUNDING_STEP,
    STATE_DTYPES,
    check_group_params,
    check_group_size,
    check_hyperparameters,
    low_rank_shape,
    moment_scales_shape,
)
from lowrank_kernels._dispatch import BACKENDS, cuda_backend, set_cuda_backend  # noqa: F401


# --------------------------------------------------------------------------------------------
# dense projection (DESIGN.md §4.1)
# --------------------------------------------------------------------------------------------
def project(grad: torch.Tensor, proj: torch.Tensor, *, backend: str | None = None
            ) -> torch.Tensor:
    """Projects a gradient into the low-rank space, in fp32 (DESIGN.md §4.1).

    R = G Qᵀ (m×r) when m ≥ n (proj Q is r×n), else R = Pᵀ G (r×n) (proj P is m×r).
    Differentiable in both arguments.
    """
    return _dispatch.call("project", backend, grad, proj)


def project_back(low_rank: torch.Tensor, proj: torch.Tensor, m: int, n: int, scale: float = 1.0,
                 *, backend: str | None = None) -> torch.Tensor:
    """Maps a low-rank tensor back to the m×n weight space, in fp32: scale·N Q or scale·P N."""
    return _dispatch.call("project_back", backend, low_rank, proj, m, n, scale)


# --------------------------------------------------------------------------------------------
# the fused step (DESIGN.md §4.2-§4.5)
# --------------------------------------------------------------------------------------------
def fused_galore_step(param: torch.Tensor, grad: torch.Tensor, proj: torch.Tensor,
                      exp_avg: torch.Tensor | None, exp_avg_sq: torch.Tensor, *, lr: float,
                      beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-6,
                      weight_decay: float = 0.0, scale: float = 1.0, step: int,
                      proj_scales: torch.Tensor | None = None,
                      proj_zeros: torch.Tensor | None = None, proj_group_size: int = 256,
                      param_scales: torch.Tensor | None = None,
                      param_zeros: torch.Tensor | None = None, param_group_size: int = 256,
                      seed: int = 0, inner: str = "adam",
                      exp_avg_scales: torch.Tensor | None = None,
                      exp_avg_sq_scales: torch.Tensor | None = None,
                      state_block_size: int = 32, right: bool | None = None,
                      full_rank: str = "none", full_rank_norm: str = "channel",
                      limiter: torch.Tensor | None = None, limiter_growth: float = 1.01,
                      scale_front: bool = False, backend: str | None = None) -> None:
    """One fused GaLore AdamW step on an m×n weight, in place (DESIGN.md §4.2).

    With R = project(G, proj) (side by §4.1; proj is r×n when m ≥ n, else m×r):

        M ← β1·M + (1−β1)·R          V ← β2·V + (1−β2)·R²          N = M / (√V + ε)
        W ← (1 − lr·wd)·(W − α_t·scale·back(N)),     α_t = lr·√(1−β2ᵗ)/(1−β1ᵗ)

    ε is not bias-corrected and decay is applied after the update, as in galore-torch's
    ``GaLoreAdamW``. ``step`` is the step count after incrementing (1 on the first step).
    ``param``/``grad`` may be fp32, bf16 or fp16, ``exp_avg``/``exp_avg_sq`` fp32 or bf16; all
    arithmetic is fp32 and every stored value is rounded once. No m×n temporary is materialised
    by the cpu, cuda and triton backends.

    Layouts: ``grad``, ``proj`` and ``proj_scales``/``proj_zeros`` may have any strides (as
    galore-torch holds its basis, or a transposed gradient view): the CPU and Triton kernels read
    G through its strides, never copying it, and copy at most the r×d basis; the CUDA C++ kernel
    copies strided inputs. The tensors written in place (param, moments, param_scales/zeros)
    must be dense row-major.

    bf16 moments are stored with stochastic rounding (unbiased: a nearest-rounded V cannot decay
    at β2 = 0.999), |x| rounded up with probability (dropped bits)/2^16 from the words of one
    Philox call per element under key seed + 2**32·step at counter (row-major index, 1, 0, 0),
    the first for exp_avg and the second for exp_avg_sq (``reference.store_moments_``); N uses
    the fp32 moments. seed in [0, 2**32) and step < 2**31 then, as for INT8 codes.

    Q-GaLore formats (DESIGN.md §4.3-§4.4, see :func:`quantize_int4` / :func:`quantize_int8`):
    a uint8 ``proj`` is a packed INT4 basis (1-D, with ``proj_scales``/``proj_zeros`` and
    ``proj_group_size``; the rank is that of ``exp_avg``); a uint8 ``param`` holds INT8 codes
    whose ``param_scales``/``param_zeros`` are rewritten in place: W' is computed in fp32 from
    the dequantized weight and stochastically rounded with u = tl.rand(seed + 2**32·step,
    row-major index), seed in [0, 2**32).

    AdaGrad (``inner="adagrad"``, DESIGN.md §4.10; ``exp_avg`` must be None, β1/β2 unused but
    validated): V ← V + R², N = R/(√V + ε), W ← (1 − lr·wd)·(W − lr·scale·back(N)): no bias
    correction, no decay of V (torch.optim.Adagrad's rule in the projected space, with
    decoupled weight decay).

    8-bit moments (DESIGN.md §4.9, ``reference.quantize_moment``): ``exp_avg`` int8 codes of M
    (E4M3, sign apart) and ``exp_avg_sq`` uint8 codes of √V (unsigned E4M4), with fp32 block
    scales ``exp_avg_scales``/``exp_avg_sq_scales`` of shape (own, ⌈r/B⌉) — own = m on the
    right side, n on the left; B = ``state_block_size`` (a power of two ≤ 32) consecutive
    rank-axis elements of one own-line share a scale s = absmax/480 (M) or absmax/496 (√V).
    They are decoded to fp32, updated, N is computed from the fp32 values, and they are stored
    re-encoded with stochastic rounding from the bf16 moments' Philox words; scales rewritten in
    place. AdaGrad takes an 8-bit V too (exp_avg None).

    Factored second moment (DESIGN.md §4.12, ``reference.factored_normalized``): a 1-D fp32
    ``exp_avg_sq`` of r + own values holds Adafactor's factors of V — a (one per rank), then b
    (one per own-line) — updated in place: a_i ← β2·a_i + (1−β2)·mean_j R_ij², b_j ← β2·b_j +
    (1−β2)·mean_i R_ij², and N = M/(√(a_i·b_j/max(mean(a), 1e-30)) + ε). ``exp_avg`` in any
    format (fp32, bf16, 8-bit with ``exp_avg_scales``); inner="adam" and full_rank="none" only.
    The sums' order is the backend's (tiles): backends agree to rounding, not bit for bit.

    ``right`` overrides the side rule: True projects from the right (proj r×n, moments m×r),
    False from the left (proj m×r, moments r×n), whatever the shape; the rank must then lie in
    [1, n] (right) or [1, m] (left). For library authors whose weights are pieces of a larger
    one: a row shard (FSDP2) of a right-side weight may be wider than tall.

    ``lr`` and ``weight_decay`` are ``Scalar`` and ``step`` ``SymInt`` in the schema: under
    ``torch.compile`` new values are graph inputs, not recompilations.

    Fira and APOLLO (DESIGN.md §4.6-§4.7, docs/methods.md §3-§4): ``full_rank="fira"`` or
    ``"apollo"`` adds the scaled full-rank term. With φ = ‖N‖/(‖R‖ + 1e-8) per own-line (a row
    of R on the right side, a column on the left; ``full_rank_norm="channel"``) or over the
    tensor (``"tensor"``, APOLLO-Mini), a = ``scale`` and d = 1 − lr·wd::

        fira:    S = φ ⊙ (G − a·back(R)),  W ← d·(W − α_t·(a·back(N) + ℓ·S))
        apollo:  S = c·φ ⊙ G (c = √a if scale_front else 1),  W ← d·(W − α_t·√a·ℓ·φ ⊙ G)

    ℓ is the norm-growth limiter's factor: ``limiter`` (fp32, shape [1], updated in place on
    the device) holds ‖S_prev‖, negative before the first step (that step stores ‖S‖ and is not
    limited); otherwise f = max(‖S‖/(‖S_prev‖ + 1e-8), γ)/γ with γ = ``limiter_growth``,
    ℓ = 1/f, and ‖S‖/f is stored. ``limiter=None``: ℓ = 1 (APOLLO's ``disable_nl``).
    ``scale_front`` (APOLLO only) decides only whether the S that is limited and stored carries
    √a. The kernels compute ‖S‖ and φ from per-line sums gathered while projecting (Fira's
    residual norm by the Gram form ‖G_i‖² − 2a‖R_i‖² + a²·R_i K R_iᵀ, K = QQᵀ), finalize on the
    device in a fixed order (no host synchronisation; a resumed run is bit for bit), and read G
    twice and W once (G once with channel φ and no limiter on CPU); no m×n temporary. Every
    basis and weight format (INT8 codes included) and fp32/bf16 moments; a full-rank mode
    with ``inner='adagrad'``, 8-bit moments or a ``right`` other than the side rule's raises.
    """
    _dispatch.call("fused_galore_step", backend, param, grad, proj, exp_avg, exp_avg_sq, lr=lr,
                   beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, scale=scale,
                   step=step, proj_scales=proj_scales, proj_zeros=proj_zeros,
                   proj_group_size=proj_group_size, param_scales=param_scales,
                   param_zeros=param_zeros, param_group_size=param_group_size, seed=seed,
                   inner=inner, exp_avg_scales=exp_avg_scales,
                   exp_avg_sq_scales=exp_avg_sq_scales, state_block_size=state_block_size,
                   right=right, full_rank=full_rank, full_rank_norm=full_rank_norm,
                   limiter=limiter, limiter_growth=limiter_growth, scale_front=scale_front)


def random_basis(d: int, rank: int, seed: int, refresh: int, *,
                 device: torch.device | str | None = None, backend: str | None = None
                 ) -> torch.Tensor:
    """APOLLO's Gaussian basis: rank×d fp32 rows of N(0, 1/rank) values generated from
    (``seed``, ``refresh``) alone (DESIGN.md §4.7), identical bits on every backend.

    Element (k, i): Philox-4x32-10 under key seed + 2**32·refresh at counter
    (k·⌈d/4⌉ + ⌊i/4⌋, 2, 0, 0), lane i mod 4 of Box-Muller on the words (w0, w1) or (w2, w3)
    (cos for even lanes, sin for odd), divided by √rank (``reference.random_basis``).
    seed ∈ [0, 2**32), refresh ∈ [0, 2**31), rank·⌈d/4⌉ ≤ 2**32. The fused step's dense basis
    is this tensor on the right side (Q, r×n) and its transpose on the left (P, m×r).
    """
    return _dispatch.call("random_basis", backend, d, rank, seed, refresh,
                          device=None if device is None else torch.device(device))


def fused_gradnorm_step(param: torch.Tensor, grad: torch.Tensor, proj: torch.Tensor,
                        exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                        row_scale: torch.Tensor, row_norm: torch.Tensor,
                        scale_exp_avg: torch.Tensor, scale_exp_avg_sq: torch.Tensor, *,
                        lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-6,
                        weight_decay: float = 0.0, scale: float = 1.0, step: int,
                        proj_scales: torch.Tensor | None = None,
                        proj_zeros: torch.Tensor | None = None, proj_group_size: int = 256,
                        seed: int = 0, exp_avg_scales: torch.Tensor | None = None,
                        exp_avg_sq_scales: torch.Tensor | None = None,
                        state_block_size: int = 32, backend: str | None = None) -> None:
    """One fused GradNormLoRP step on an m×n weight, in place (DESIGN.md §4.8): the authors'
    ``LowRankWeightNormAdamW`` with W = g ⊙ v/‖v‖ (row norms) kept as W itself.

    Per-row fp32 states (length m): ``row_scale`` = g, ``row_norm`` = ‖v‖ (so v = c ⊙ W with
    c_i = row_norm_i/row_scale_i), ``scale_exp_avg``/``scale_exp_avg_sq`` = g's Adam moments.
    With R = project(G, proj) (side by §4.1), d = 1 − lr·wd, a = ``scale`` and
    α_t = lr·√(1−β2ᵗ)/(1−β1ᵗ)::

        ∇g_i = (Σ_j G_ij·W_ij)/row_scale_i
        N = Adam(R; exp_avg, exp_avg_sq),   N_g = Adam(∇g; scale_exp_avg, scale_exp_avg_sq)
        v' = d·(c ⊙ W − α_t·a·back(N)),     g' = d·(row_norm − α_t·N_g)
        W ← (g'/‖v'‖) ⊙ v',   row_scale ← g',   row_norm ← ‖v'‖   (‖v'_i‖ the row norms)

    Adam as in :func:`fused_galore_step` (ε not bias-corrected, fp32 arithmetic, bf16 moments
    stochastically rounded with ``seed``; 8-bit moments — int8 ``exp_avg``, uint8
    ``exp_avg_sq`` codes with their fp32 ``exp_avg_scales``/``exp_avg_sq_scales`` of
    ``state_block_size`` ranks, DESIGN.md §4.9 — decoded, updated and re-encoded in the step);
    g's moments are fp32. Initial states:
    ``reference.gradnorm_init_state(W)`` (g = ‖v‖ = ‖W_i‖, the authors' v = W).

    ``proj`` is a dense basis, a packed INT4 basis (uint8, with ``proj_scales``/``proj_zeros``)
    or DCT indices (int32), as for fused_galore_step; ``param`` fp32, bf16 or fp16 (INT8 codes
    raise: the renormalisation needs each row in fp32). No m×n temporary and no host sync: the
    C++ CPU kernel holds whole rows (right side) or takes a low-rank pass then row tiles (left
    side); the Triton kernel takes ‖v'‖ from per-row sums streamed with G and W (right side:
    a Gram form, DESIGN.md §4.8; left side: partial row sums). CUDA tensors always run the
    Triton kernel (the CUDA C++ library has none: ``backend="cuda"`` raises
    NotImplementedError).
    """
    _dispatch.call("fused_gradnorm_step", backend, param, grad, proj, exp_avg, exp_avg_sq,
                   row_scale, row_norm, scale_exp_avg, scale_exp_avg_sq, lr=lr, beta1=beta1,
                   beta2=beta2, eps=eps, weight_decay=weight_decay, scale=scale, step=step,
                   proj_scales=proj_scales, proj_zeros=proj_zeros,
                   proj_group_size=proj_group_size, seed=seed, exp_avg_scales=exp_avg_scales,
                   exp_avg_sq_scales=exp_avg_sq_scales, state_block_size=state_block_size)


# --------------------------------------------------------------------------------------------
# DCT projection (DESIGN.md §4.5)
# --------------------------------------------------------------------------------------------
def dct_select(grad: torch.Tensor, rank: int, norm: int = 1, *, method: str = "auto",
               backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Picks the rank rows of the orthonormal DCT-II basis (size d = min(m, n)) best aligned with G
    and projects G onto them (DESIGN.md §4.5). Side by §4.1.

    right (m ≥ n): X = G Cᵀ (m×d), score_k = ‖X[:, k]‖_norm, R = X[:, idx] (m×r)
    left  (m < n): X = C G (d×n), score_k = ‖X[k, :]‖_norm, R = X[idx, :] (r×n)

    Returns ``(idx, R)``: idx int32 (length r, increasing; ties go to the lower index), R fp32.
    ``method`` (CPU kernel): "fft" (Makhoul rfft, O(m·n·log d)), "dense" (GEMM with C) or
    "auto" (by d); the Triton and CUDA kernels have one method (tiled products with C generated
    on the fly, no m×n coefficient matrix) and accept any valid value. The result is the dense
    basis' projection: ``project(G, dct_basis(d, idx))`` on the right, with
    ``dct_basis(d, idx).T`` on the left. G may have any strides (a transposed view is read in
    place by the CPU and Triton kernels).
    """
    return _dispatch.call("dct_select", backend, grad, rank, norm, method=method)


def dct_basis(d: int, indices: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Rows ``indices`` (int32, distinct, in [0, d)) of the orthonormal DCT-II basis of size d:
    C[k, i] = c_k·cos(π(2i+1)k/(2d)), an r×d fp32 tensor (rows of
    ``scipy.fft.dct(eye(d), norm="ortho", axis=0)``)."""
    return _dispatch.call("dct_basis", backend, d, indices)


# --------------------------------------------------------------------------------------------
# Q-GaLore formats (DESIGN.md §4.3-§4.4): Philox uniforms, INT4/INT8 group quantization.
# A group is `group_size` consecutive row-major elements of the flattened tensor (the last may be
# partial; groups may straddle rows); scales and zeros are fp32, one per group.
# --------------------------------------------------------------------------------------------
def philox_uniform(seed: int, offsets: torch.Tensor, *, backend: str | None = None
                   ) -> torch.Tensor:
    """u ∈ [0, 1) in fp32, equal bit for bit to Triton's ``tl.rand(seed, offsets)``.

    Philox-4x32-10: key = (low, high) 32-bit words of seed ∈ [0, 2**63); counter = (low, high
    words of the offset, 0, 0). These are the numbers every backend's stochastic rounding uses,
    with seed = seed + 2**32·step and offset = the element's row-major index.
    """
    return _dispatch.call("philox_uniform", backend, seed, offsets)


def quantize_int4(x: torch.Tensor, group_size: int = 256, *, backend: str | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed INT4 codes of x's row-major groups, with fp32 scales and zeros (DESIGN.md §4.3).

    Per group: s = max(max − min, 1e-5)/15, z = clamp(−round(min/s), 0, 15),
    q = clamp(round(x/s) + z, 0, 15); two codes per byte, element 2k in the low nibble.
    Returns (packed uint8 [ceil(numel/2)], scales [groups], zeros [groups]); group_size even.
    A group that does not contain 0 saturates (as q-galore-torch's quantizer).
    """
    return _dispatch.call("quantize_int4", backend, x, group_size)


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    shape: list[int], group_size: int = 256, *, backend: str | None = None
                    ) -> torch.Tensor:
    """x̃ = s·(q − z) of a packed INT4 buffer, an fp32 tensor of ``shape``."""
    return _dispatch.call("dequantize_int4", backend, packed, scales, zeros, list(shape),
                          group_size)


def quantize_int8(x: torch.Tensor, group_size: int = 256, stochastic: bool = False,
                  seed: int = 0, *, backend: str | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """INT8 codes (uint8, x's shape) of x's row-major groups, fp32 scales and zeros (§4.4).

    As :func:`quantize_int4` with 255 levels. ``stochastic``: q = clamp(SR(x/s) + z, 0, 255),
    SR(y) = ⌊y⌋ + [u < y − ⌊y⌋], u = philox_uniform(seed, row-major index), seed ∈ [0, 2**32)
    (the stream of ``fused_galore_step`` at step 0).
    """
    return _dispatch.call("quantize_int8", backend, x, group_size, stochastic, seed)


def dequantize_int8(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    group_size: int = 256, *, backend: str | None = None) -> torch.Tensor:
    """x̃ = s·(q − z) of INT8 codes, an fp32 tensor of the codes' shape."""
    return _dispatch.call("dequantize_int8", backend, codes, scales, zeros, group_size)
