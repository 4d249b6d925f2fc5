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


def project(grad: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """R = G Qᵀ (m×r; right, proj r×n) or R = Pᵀ G (r×n; left, proj m×r), in fp32."""
    g, p = grad.float(), proj.float()
    return g @ p.T if is_right_side(*grad.shape) else p.T @ g


def project_back(low_rank: torch.Tensor, proj: torch.Tensor, m: int, n: int, scale: float
                 ) -> torch.Tensor:
    """scale · N Q (right, N m×r) or scale · P N (left, N r×n), an m×n fp32 tensor."""
    lr_, p = low_rank.float(), proj.float()
    return (lr_ @ p if is_right_side(m, n) else p @ lr_) * scale


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
                      beta2: float, eps: float, weight_decay: float, scale: float, step: int
                      ) -> None:
    """One GaLore AdamW step (DESIGN.md §4.2), galore-torch ``GaLoreAdamW`` semantics.

    M ← β1·M + (1−β1)·R,  V ← β2·V + (1−β2)·R²,  N = M / (√V + ε),
    W ← W − α_t·scale·back(N),  then  W ← W − lr·wd·W  (decoupled decay after the update).
    """
    m, n = param.shape
    exp_avg32, exp_avg_sq32 = exp_avg.float(), exp_avg_sq.float()
    normalized = adam_normalized(project(grad, proj), exp_avg32, exp_avg_sq32, beta1, beta2, eps)
    w = param.float()
    w.sub_(project_back(normalized, proj, m, n, scale), alpha=adam_step_size(lr, beta1, beta2, step))
    if weight_decay != 0.0:
        w.mul_(1.0 - lr * weight_decay)
    param.copy_(w)
    exp_avg.copy_(exp_avg32)
    exp_avg_sq.copy_(exp_avg_sq32)


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


def dct_coefficients(grad: torch.Tensor) -> torch.Tensor:
    """G's DCT-II coefficients along its short side, fp32: G Cᵀ (m×d, right) or C G (d×n, left)."""
    m, n = grad.shape
    right = is_right_side(m, n)
    d = n if right else m
    basis = dct_basis(d, torch.arange(d, device=grad.device))
    g = grad.float()
    return g @ basis.T if right else basis @ g


def dct_scores(grad: torch.Tensor, norm: int = 1) -> torch.Tensor:
    """Per-frequency alignment: the ℓ1 (norm=1) or ℓ2 (norm=2) norm of each column (right) or row
    (left) of dct_coefficients(grad), length d = min(m, n)."""
    coeffs = dct_coefficients(grad)
    return torch.linalg.vector_norm(coeffs, ord=norm, dim=0 if is_right_side(*grad.shape) else 1)


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
