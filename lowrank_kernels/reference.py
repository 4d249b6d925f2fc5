"""Plain-torch reference of every ``lowrank`` op: the executable spec and the fallback backend.

Each function computes exactly what DESIGN.md §4 states, in fp32 whatever the storage dtype, and
writes results back to the caller's tensors in their own dtype (rounding once). Kernels are tested
against these functions; these functions are tested against the peer packages (galore-torch,
q-galore-torch, fira, apollo-torch), torch.optim.Adagrad and a restatement of GradNormLoRP's
update rules. Nothing here validates arguments (lowrank_kernels.ops does that) and nothing here
imports from the rest of the package. docs/methods.md collects the equations.
"""

from __future__ import annotations

import dataclasses
import math

import torch

INNER_RULES = ("adam", "adagrad")
FULL_RANK_MODES = ("none", "fira", "apollo")
FULL_RANK_NORMS = ("channel", "tensor")
LIMITER_GROWTH = 1.01  # γ of Fira's norm-growth limiter (both peers hard-code it)
NORM_GUARD = 1e-8  # the peers' "+ 1e-8" in φ's and in the limiter's denominators
MOMENT_BLOCK_SIZE = 32  # default 8-bit moment block along the rank axis (quantize_moment)


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


def adagrad_normalized(low_rank_grad: torch.Tensor, exp_avg_sq: torch.Tensor, eps: float
                       ) -> torch.Tensor:
    """AdaGrad in the projected space (DESIGN.md §4.10): updates the fp32 accumulator in place,
    V ← V + R·R, and returns N = R / (√V + ε). No bias correction, no decay of V.

    This is :func:`adam_normalized`'s arithmetic with the coefficients (β1, 1−β1, β2, 1−β2) =
    (0, 1, 1, 1) -- make_adam_coeffs' beta1, one_minus_beta1, beta2, one_minus_beta2 -- and M
    starting at 0, operation for operation in fp32: M = 0·0 + 1·R = R and V = 1·V + (1·R)·R =
    V + R·R (multiplying by 1 and adding 0 are exact). A kernel runs its Adam code with those
    coefficients, M held as 0 in registers and never loaded or stored. R·R is rounded before
    the addition (no fused multiply-add), as in the kernels (-ffp-contract=off)."""
    exp_avg_sq.add_(low_rank_grad * low_rank_grad)
    return low_rank_grad / (exp_avg_sq.sqrt() + eps)


FACTORED_FLOOR = 1e-30  # lower bound of mean(a) in the factored V: 0/0 only when R was all 0


def is_factored(exp_avg_sq: torch.Tensor) -> bool:
    """A 1-D ``exp_avg_sq`` is the factored second moment (r + own fp32 factors); the full V is
    2-D (the low-rank shape)."""
    return exp_avg_sq.dim() == 1


def factored_shape(m: int, n: int, rank: int, right: bool | None = None) -> tuple[int]:
    """Shape of a factored ``exp_avg_sq``: (r + own,), own = m (right side) or n (left)."""
    return (rank + (m if _side(m, n, right) else n),)


def factored_normalized(low_rank_grad: torch.Tensor, exp_avg: torch.Tensor,
                        factors: torch.Tensor, beta1: float, beta2: float, eps: float,
                        right: bool) -> torch.Tensor:
    """Adam with Adafactor's factored second moment (DESIGN.md §4.12; Shazeer & Stern 2018,
    with Adam's EMA and bias correction): updates M and the fp32 factors in place and returns N.

    With R the r×own low-rank gradient seen along its rank axis i and own axis j (R = G Qᵀ is
    m×r on the right side: i its columns, j its rows; R = Pᵀ G is r×n on the left) and
    ``factors`` = [a (r values) | b (own values)]:

      a_i ← β2·a_i + (1−β2)·(Σ_j R_ij²)/own      b_j ← β2·b_j + (1−β2)·(Σ_i R_ij²)/r
      ā = (Σ_i a_i)/r,  c_j = b_j / max(ā, 1e-30),  V̂_ij = a_i·c_j
      M ← β1·M + (1−β1)·R,  N = M / (√V̂ + ε)

    V̂ is the rank-1 matrix with the row and column means of the EMA of R² (exact when that
    EMA is rank 1), so the state is r + own fp32 values instead of r·own. Both factors start at
    0 and decay by β2, so V̂ carries V's bias (1 − β2ᵗ) and α_t's correction stays Adam's. The
    sums are fp32 in an order each backend chooses (the kernels reduce tile by tile): the
    backends agree to rounding, not bit for bit."""
    rank = low_rank_grad.shape[1] if right else low_rank_grad.shape[0]
    lines = low_rank_grad if right else low_rank_grad.T  # own × r
    squares = lines * lines
    own = lines.shape[0]
    a, b = factors[:rank], factors[rank:]
    a.mul_(beta2).add_(squares.sum(dim=0) / own, alpha=1.0 - beta2)
    b.mul_(beta2).add_(squares.sum(dim=1) / rank, alpha=1.0 - beta2)
    c = b / torch.clamp(a.sum() / rank, min=FACTORED_FLOOR)
    v_hat = c[:, None] * a[None, :]  # own × r
    exp_avg.mul_(beta1).add_(low_rank_grad, alpha=1.0 - beta1)
    return exp_avg / ((v_hat if right else v_hat.T).sqrt() + eps)


def fused_galore_step(param: torch.Tensor, grad: torch.Tensor, proj: torch.Tensor,
                      exp_avg: torch.Tensor | None, exp_avg_sq: torch.Tensor, *, lr: float,
                      beta1: float, beta2: float, eps: float, weight_decay: float, scale: float,
                      step: int, seed: int = 0, inner: str = "adam",
                      exp_avg_scales: torch.Tensor | None = None,
                      exp_avg_sq_scales: torch.Tensor | None = None,
                      state_block_size: int = MOMENT_BLOCK_SIZE, right: bool | None = None,
                      full_rank: str = "none", full_rank_norm: str = "channel",
                      limiter: torch.Tensor | None = None, limiter_growth: float = LIMITER_GROWTH,
                      scale_front: bool = False) -> None:
    """One low-rank step on an m×n weight, in place: GaLore AdamW (DESIGN.md §4.2) by default,
    galore-torch ``GaLoreAdamW`` semantics; the keyword-only modes below default to it.

    With R = project(G) (§4.1: right, Q r×n, R = G Qᵀ m×r, back(X) = X Q; left, P m×r,
    R = Pᵀ G r×n, back(X) = P X), a = ``scale`` and d = 1 − lr·wd:

      inner="adam":     M ← β1·M + (1−β1)·R,  V ← β2·V + (1−β2)·R²,  N = M/(√V + ε),
                        α_t = lr·√(1−β2ᵗ)/(1−β1ᵗ)  (ε not bias-corrected)
      inner="adagrad":  V ← V + R²,  N = R/(√V + ε),  α_t = lr  (§4.10; ``exp_avg`` is None,
                        ``beta1``/``beta2`` are ignored): :func:`adagrad_normalized`
      full_rank="none":   W ← d·(W − α_t·a·back(N))
      full_rank="fira":   W ← d·(W − α_t·(a·back(N) + ℓ·φ⊙(G − a·back(R))))
      full_rank="apollo": W ← d·(W − α_t·√a·ℓ·φ⊙G)   (no back projection at all)

    φ (one factor per own-line, or per tensor with ``full_rank_norm="tensor"``), the limiter's
    factor ℓ ≤ 1 and ``scale_front``: :func:`full_rank_update`. ``limiter`` (fp32, one element,
    updated in place) holds ‖S_prev‖; a negative value means no previous step (that step stores
    ‖S‖ and is not limited); None turns the limiter off (APOLLO's ``disable_nl``; ℓ = 1).

    Moments: fp32, bf16 (stochastic rounding on store) or 8-bit codes (``exp_avg`` int8,
    ``exp_avg_sq`` uint8, with ``exp_avg_scales``/``exp_avg_sq_scales`` and
    ``state_block_size``; :func:`quantize_moment` gives the format). A 1-D fp32 ``exp_avg_sq``
    of r + own values is the factored second moment (:func:`factored_normalized`; inner="adam",
    full_rank="none"; M in any of the three formats). They are loaded to fp32,
    updated, N is computed from the fp32 values, and they are stored rounded once
    (:func:`store_moments_`, Philox key rounding_philox_seed(seed, step)).

    The kernel contract (what a tiled kernel computes instead of these m×n temporaries):
    AdaGrad is the Adam code with coefficients (β1, 1−β1, β2, 1−β2) = (0, 1, 1, 1), M never
    loaded or stored, and update_scale = fl32(d·lr·a); Fira and APOLLO in
    :func:`full_rank_update`. ``right`` overrides the side rule (a row shard of a weight under
    FSDP2 keeps the whole weight's side, see :func:`_side`).

    The formulas compose every mode, but the kernels (and lowrank_kernels._checks, which every
    backend runs first) take a full-rank mode only with inner="adam", fp32/bf16 moments and the
    side rule's side; the other combinations have no peer to match and are refused there.
    """
    m, n = param.shape
    right = _side(m, n, right)
    low_rank_grad = project(grad, proj, right)
    exp_avg32, exp_avg_sq32 = load_moments(exp_avg, exp_avg_sq, exp_avg_scales,
                                           exp_avg_sq_scales, state_block_size, right)
    if inner == "adagrad":
        normalized = adagrad_normalized(low_rank_grad, exp_avg_sq32, eps)
        step_size = lr
    elif is_factored(exp_avg_sq):
        normalized = factored_normalized(low_rank_grad, exp_avg32, exp_avg_sq32, beta1, beta2,
                                         eps, right)
        step_size = adam_step_size(lr, beta1, beta2, step)
    else:
        normalized = adam_normalized(low_rank_grad, exp_avg32, exp_avg_sq32, beta1, beta2, eps)
        step_size = adam_step_size(lr, beta1, beta2, step)
    if full_rank == "none":
        update = project_back(normalized, proj, m, n, scale, right)
    else:
        update = full_rank_update(grad, proj, normalized, low_rank_grad, scale=scale,
                                  mode=full_rank, norm=full_rank_norm, limiter=limiter,
                                  growth=limiter_growth, scale_front=scale_front, right=right)
    w = param.float()
    w.sub_(update, alpha=step_size)
    if weight_decay != 0.0:
        w.mul_(1.0 - lr * weight_decay)
    param.copy_(w)
    store_moments_(exp_avg, exp_avg_sq, exp_avg32, exp_avg_sq32, rounding_philox_seed(seed, step),
                   exp_avg_scales=exp_avg_scales, exp_avg_sq_scales=exp_avg_sq_scales,
                   block_size=state_block_size, right=right)


def galore_update_(param: torch.Tensor, normalized: torch.Tensor, proj: torch.Tensor, *,
                   lr: float, beta1: float, beta2: float, weight_decay: float, scale: float,
                   step: int, right: bool | None = None, inner: str = "adam") -> None:
    """The weight half of :func:`fused_galore_step`, given N:
    W ← W − α_t·scale·back(N) (α_t = lr for inner="adagrad"), then W ← W − lr·wd·W."""
    m, n = param.shape
    w = param.float()
    step_size = lr if inner == "adagrad" else adam_step_size(lr, beta1, beta2, step)
    w.sub_(project_back(normalized, proj, m, n, scale, right), alpha=step_size)
    if weight_decay != 0.0:
        w.mul_(1.0 - lr * weight_decay)
    param.copy_(w)


# --------------------------------------------------------------------------------------------
# Fira and APOLLO: the scaled full-rank term (DESIGN.md §4.6-§4.7)
# --------------------------------------------------------------------------------------------


def own_line_norms(low_rank: torch.Tensor, right: bool) -> torch.Tensor:
    """‖X_i‖ of every own-line of a low-rank tensor -- row i of the m×r X on the right side,
    column i of the r×n X on the left -- shaped to broadcast over the m×n W: (m, 1) or (1, n)."""
    return torch.linalg.vector_norm(low_rank, dim=1 if right else 0, keepdim=True)


def full_rank_factor(normalized: torch.Tensor, low_rank_grad: torch.Tensor, right: bool,
                     norm: str) -> torch.Tensor:
    """φ = ‖N‖/(‖R‖ + 1e-8) per own-line (norm="channel") or over the whole tensor ("tensor")."""
    if norm == "tensor":
        return (torch.linalg.vector_norm(normalized)
                / (torch.linalg.vector_norm(low_rank_grad) + NORM_GUARD))
    return own_line_norms(normalized, right) / (own_line_norms(low_rank_grad, right) + NORM_GUARD)


def limit_norm_growth_(term: torch.Tensor, limiter: torch.Tensor, growth: float
                       ) -> torch.Tensor:
    """Fira's norm-growth limiter: ``term`` S scaled so that ‖S‖ grows by at most ``growth``
    per step; ``limiter`` (one fp32 element, in place) holds ‖S_prev‖, negative when there is
    no previous step. With p = limiter and γ = growth:
      p < 0:  S unchanged, limiter ← ‖S‖;
      else:   f = max(‖S‖/(p + 1e-8), γ)/γ,  S ← S/f,  limiter ← ‖S‖/f  (‖S‖ before scaling).
    f is exactly 1 when ‖S‖ ≤ γ·(p + 1e-8) (γ/γ in fp32)."""
    norm = torch.linalg.vector_norm(term)
    previous = limiter.reshape(())
    if previous.item() < 0:
        limiter.copy_(norm.reshape(limiter.shape))
        return term
    gamma = torch.tensor(growth, dtype=torch.float32)
    factor = torch.maximum(norm / (previous + NORM_GUARD), gamma) / gamma
    limiter.copy_((norm / factor).reshape(limiter.shape))
    return term / factor


def full_rank_update(grad: torch.Tensor, proj: torch.Tensor, normalized: torch.Tensor,
                     low_rank_grad: torch.Tensor, *, scale: float, mode: str,
                     norm: str = "channel", limiter: torch.Tensor | None = None,
                     growth: float = LIMITER_GROWTH, scale_front: bool = False,
                     right: bool | None = None) -> torch.Tensor:
    """The m×n update U of W ← d·(W − α_t·U) for Fira (mode="fira", fira 1.0.2 ``FiraAdamW``)
    and APOLLO (mode="apollo", apollo-torch 1.0.3 ``APOLLOAdamW``), in fp32 as the peers
    compute it (DESIGN.md §4.6-§4.7); a = ``scale``, R the projected gradient, N = M/(√V+ε).

    φ (:func:`full_rank_factor`): ‖N_i‖/(‖R_i‖ + 1e-8) per own-line i (norm="channel": a row
    of the m×r R on the right side, a column of the r×n R on the left; both peers' ``norm_dim``
    rules pick exactly this axis for every shape, r = min(m, n) included), or ‖N‖/(‖R‖ + 1e-8)
    over the tensor (norm="tensor": APOLLO-Mini; fira has no such option).

      fira:    S = φ ⊙ (G − a·back(R)),  S ← limited(S),  U = a·back(N) + S
      apollo:  S = c·φ ⊙ G,              S ← limited(S),  U = (√a/c)·S,
               c = √a if scale_front else 1

    limited: :func:`limit_norm_growth_` (``limiter`` None: S unchanged, APOLLO's
    ``disable_nl``). ``scale_front`` is apollo-torch's flag of that name: it decides only
    whether the S that is limited and whose norm is stored carries √a, so the stored value (and
    the +1e-8) match the peer's exactly; the update is the same up to that +1e-8. Fira's a
    (its ``alpha``) enters both back projections.

    Kernel form: G read twice, W read and written once, nothing m×n, no host synchronisation.
    Right side, line i = row i (the left side is the same on the transposed problem: line =
    column, R_i = Pᵀ G_i, K = PᵀP):
      pass 1 (the projection stream of G): R_i = G_i Qᵀ and γ_i = ‖G_i‖² (per-line partial sums
        of G², gathered while G streams). Then per line, Adam on R_i → N_i (M, V stored),
        ν_i = ‖N_i‖², ρ_i = ‖R_i‖², φ_i = √ν_i/(√ρ_i + 1e-8) (channel), and the line's share of
        ‖S‖² before limiting:
          fira:    s_i = φ_i²·max(γ_i − 2a·ρ_i + a²·R_i K R_iᵀ, 0),   K = Q Qᵀ (r×r)
          apollo:  s_i = c²·φ_i²·γ_i
        Fira's form is exact for ANY basis (INT4-dequantized, random, orthonormal): G_i·(R_i Q)
        = R_i·(G_i Qᵀ) = ‖R_i‖², so ‖G_i − a·R_i Q‖² = ‖G_i‖² − 2a‖R_i‖² + a²·R_i K R_iᵀ; K = I
        only for an orthonormal basis. Tensor φ: √Σ_i ν_i/(√Σ_i ρ_i + 1e-8), one for all lines.
      finalize (on the device, one program, the per-line or per-program partials summed in a
        fixed order): ‖S‖ = √Σ_i s_i; f and the limiter's new value as in limit_norm_growth_;
        ℓ = 1/f (ℓ = 1 without a limiter or on the first step).
      pass 2 (streams G and W once):
          fira:    W' = d·W − d·α_t·(a·back(N − ℓ·φ⊙R) + ℓ·φ⊙G)   (one back-projection GEMM)
          apollo:  W' = d·W − d·α_t·√a·ℓ·φ⊙G                        (no GEMM at all)
        with φ⊙R scaling line i of R by φ_i (back projection is linear and acts within a line).
    The Gram form cancels when G lies almost inside the subspace (‖S_i‖ ≪ ‖G_i‖): its absolute
    error is a few ulps of γ_i, a relative error ≈ 2⁻²³·γ_i/‖G_i − a·R_i Q‖² in s_i
    (tests/test_reference_fira_apollo.py measures it on gradients mostly inside the subspace).
    """
    m, n = grad.shape
    right = _side(m, n, right)
    phi = full_rank_factor(normalized, low_rank_grad, right, norm)
    if mode == "fira":
        term = phi * (grad.float() - project_back(low_rank_grad, proj, m, n, scale, right))
        if limiter is not None:
            term = limit_norm_growth_(term, limiter, growth)
        return project_back(normalized, proj, m, n, scale, right) + term
    root_scale = math.sqrt(scale)
    term = grad.float() * phi
    if scale_front:
        term = term * root_scale
    if limiter is not None:
        term = limit_norm_growth_(term, limiter, growth)
    return term if scale_front else term * root_scale


def full_rank_line_sums(grad: torch.Tensor, proj: torch.Tensor, low_rank_grad: torch.Tensor,
                        scale: float) -> torch.Tensor:
    """‖G_i − a·back(R)_i‖² of every own-line from per-line sums and the r×r Gram (Fira's
    kernel form, :func:`full_rank_update`): max(‖G_i‖² − 2a‖R_i‖² + a²·R_i K R_iᵀ, 0) in fp32,
    K = Q Qᵀ (right) or PᵀP (left). The spec of a kernel's pass-1 partial sums; shaped like
    :func:`own_line_norms`."""
    m, n = grad.shape
    right = is_right_side(m, n)
    g, p, r = grad.float(), proj.float(), low_rank_grad.float()
    if right:
        gram = p @ p.T
        grad_sq = (g * g).sum(1, keepdim=True)
        cross = (r * r).sum(1, keepdim=True)
        quad = ((r @ gram) * r).sum(1, keepdim=True)
    else:
        gram = p.T @ p
        grad_sq = (g * g).sum(0, keepdim=True)
        cross = (r * r).sum(0, keepdim=True)
        quad = ((gram @ r) * r).sum(0, keepdim=True)
    return (grad_sq - 2.0 * scale * cross + scale * scale * quad).clamp(min=0.0)


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


def dct_projection(indices: torch.Tensor, m: int, n: int, right: bool | None = None
                   ) -> torch.Tensor:
    """The dense basis that DCT indices stand for in fused_galore_step: Q = C[idx, :] (r×n, right)
    or P = C[idx, :]ᵀ (m×r, left); ``right`` overrides the side rule (:func:`_side`)."""
    right = _side(m, n, right)
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


def _f32(x: float) -> torch.Tensor:
    """A Python float rounded to fp32 once: how every constant below enters the arithmetic."""
    return torch.tensor(x, dtype=torch.float32)


def _fp32_bits(x: torch.Tensor) -> torch.Tensor:
    """The IEEE bits of fp32 values, as non-negative int64."""
    return x.contiguous().view(torch.int32).to(torch.int64) & _U32


def _fp32_from_bits(bits: torch.Tensor) -> torch.Tensor:
    bits = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32)
    return bits.view(torch.float32)


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


def philox_uint32x4(seed: int, offsets: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The four output words of Philox-4x32-10 (int64 tensors holding uint32s), as Triton's
    ``tl.randint4x(seed, offsets)``: key = (low, high) words of seed; counter = (low, high
    words of the offset, 0, 0). An int32 offset is its 32 bits (high word 0), as in Triton."""
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
    return c0, c1, c2, c3


def philox_uint32x2(seed: int, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The first two output words of :func:`philox_uint32x4` (``tl.randint4x(...)[:2]``)."""
    return philox_uint32x4(seed, offsets)[:2]


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


def load_moments(exp_avg: torch.Tensor | None, exp_avg_sq: torch.Tensor,
                 exp_avg_scales: torch.Tensor | None, exp_avg_sq_scales: torch.Tensor | None,
                 block_size: int, right: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The stored moments as fp32 tensors the step may update in place: fp32 moments are
    returned as themselves, bf16 widened, 8-bit codes dequantized (:func:`dequantize_moment`).
    ``exp_avg`` None (AdaGrad) stays None."""
    def load(codes, scales, signed):
        if codes is None:
            return None
        if codes.dtype in (torch.int8, torch.uint8):
            return dequantize_moment(codes, scales, block_size, right, signed=signed)
        return codes.float()

    return load(exp_avg, exp_avg_scales, True), load(exp_avg_sq, exp_avg_sq_scales, False)


def store_moments_(exp_avg: torch.Tensor | None, exp_avg_sq: torch.Tensor, m: torch.Tensor | None,
                   v: torch.Tensor, philox_seed: int, *,
                   exp_avg_scales: torch.Tensor | None = None,
                   exp_avg_sq_scales: torch.Tensor | None = None,
                   block_size: int = MOMENT_BLOCK_SIZE, right: bool = True) -> None:
    """exp_avg ← m, exp_avg_sq ← v (fp32 values) in their storage format, rounded once: fp32 as
    is; bf16 rounded stochastically (:func:`stochastic_round_bf16`); 8-bit codes (int8 M,
    uint8 V) with their block scales (:func:`quantize_moment`, ``right``: the projection side,
    which fixes the blocks). The random words of element i (row-major index in the low-rank
    state) are philox_uint32x2(philox_seed, i + MOMENT_STREAM): the first for M, the second
    for V. exp_avg None (AdaGrad): only V."""
    if all(t is None or t.dtype == torch.float32 for t in (exp_avg, exp_avg_sq)):
        words_m = words_v = None  # nothing is rounded: no random words needed
    else:
        shaped = m if m is not None else v  # a factored V (1-D) has no words of its own
        index = torch.arange(shaped.numel(), device=v.device).view(shaped.shape)
        words_m, words_v = philox_uint32x2(philox_seed, index + MOMENT_STREAM)
    for stored, value, words, scales, signed in ((exp_avg, m, words_m, exp_avg_scales, True),
                                                 (exp_avg_sq, v, words_v, exp_avg_sq_scales,
                                                  False)):
        if stored is None:
            continue
        if stored.dtype == torch.bfloat16:
            stored.copy_(stochastic_round_bf16(value, words))
        elif stored.dtype in (torch.int8, torch.uint8):
            codes, new_scales = quantize_moment(value, words, block_size, right, signed=signed)
            stored.copy_(codes)
            scales.copy_(new_scales)
        else:
            stored.copy_(value)


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


def quantized_basis_shape(m: int, n: int, rank: int, right: bool | None = None) -> list[int]:
    """Logical shape of the basis a packed INT4 proj holds: r×n (right) or m×r (left)."""
    return [rank, n] if _side(m, n, right) else [m, rank]


def fused_qgalore_step(param: torch.Tensor, grad: torch.Tensor, proj: torch.Tensor,
                       exp_avg: torch.Tensor | None, exp_avg_sq: torch.Tensor, *, lr: float,
                       beta1: float, beta2: float, eps: float, weight_decay: float, scale: float,
                       step: int, proj_scales: torch.Tensor | None = None,
                       proj_zeros: torch.Tensor | None = None, proj_group_size: int = 256,
                       param_scales: torch.Tensor | None = None,
                       param_zeros: torch.Tensor | None = None, param_group_size: int = 256,
                       seed: int = 0, **modes) -> None:
    """The step of ``fused_galore_step`` on a packed INT4 basis and/or INT8 weight codes.

    proj uint8: the basis is dequantize_int4(proj) with the rank of the moments. param uint8:
    Ŵ = dequantize_int8(param); W' = (1 − lr·wd)(Ŵ − α_t·scale·back(N)) in fp32 (or the update of
    the chosen ``modes``); then param, param_scales, param_zeros ← quantize_int8 of W' with
    stochastic rounding, Philox seed rounding_philox_seed(seed, step). ``modes``: the
    keyword-only modes of :func:`fused_galore_step` (inner rule, 8-bit moments, Fira/APOLLO),
    passed through unchanged.
    """
    m, n = param.shape
    hyper = {"lr": lr, "beta1": beta1, "beta2": beta2, "eps": eps,
             "weight_decay": weight_decay, "scale": scale, "step": step, "seed": seed, **modes}
    basis = proj
    if proj.dtype == torch.uint8:
        right = _side(m, n, modes.get("right"))
        ranked = exp_avg if exp_avg is not None else exp_avg_sq  # M: V may be factored (1-D)
        rank = ranked.shape[1] if right else ranked.shape[0]
        basis = dequantize_int4(proj, proj_scales, proj_zeros,
                                quantized_basis_shape(m, n, rank, right), proj_group_size)
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


# --------------------------------------------------------------------------------------------
# 8-bit moments (DESIGN.md §4.9): blockwise-scaled FP8 codes with stochastic rounding
#
# Blocks: B = block_size consecutive elements along the RANK axis of one own-line -- row i of the
# m×r M on the right side (elements (i, kB … kB+B−1)), column j of the r×n M on the left (elements
# (kB … kB+B−1, j)) -- the last block of a line partial when B ∤ r; scales are (own, ⌈r/B⌉) fp32,
# own = m (right) or n (left). M is stored as E4M3 codes of M, V as unsigned E4M4 codes of √V
# (an FP8 grid: uniform relative precision, so every coordinate's N = M/(√V+ε) -- all of them
# O(1) whatever the gradient's scale -- is equally well kept, and 2^17 (M) / 2^36 (V) of dynamic
# range inside a block; bench/quality_8bit_moments.py measured it against linear and dynamic-map
# codes). Every operation is IEEE-exact (bits, ×2^k, one division, comparisons), so C++ and Triton
# produce the same codes bit for bit from the same words.
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MomentFormat:
    """An 8-bit FP8-like grid without inf/NaN: a code c = 2^mb·f + t (f the 4-bit exponent
    field, t the mb-bit mantissa) has value (2^mb + t)·2^(f − 7 − mb) for f ≥ 1 and
    t·2^(−6 − mb) for f = 0 (subnormal, 0 included); max_value is the largest (c_max)."""

    mantissa_bits: int
    max_code: int

    @property
    def max_value(self) -> float:
        return float((2 * 2**self.mantissa_bits - 1) * 2.0 ** (8 - self.mantissa_bits))


EXP_AVG_FORMAT = MomentFormat(mantissa_bits=3, max_code=127)  # E4M3, sign apart: int8 ±c, max 480
EXP_AVG_SQ_FORMAT = MomentFormat(mantissa_bits=4, max_code=255)  # E4M4 of √V: uint8 c, max 496
_MIN_NORMAL_EXP = -6


def moment_scales_shape(m: int, n: int, rank: int, block_size: int = MOMENT_BLOCK_SIZE
                        ) -> tuple[int, int]:
    """Shape of exp_avg_scales / exp_avg_sq_scales: (own, ⌈r/B⌉), own = m (right) or n (left)."""
    return (m if is_right_side(m, n) else n), -(-rank // block_size)


def moment_blocks(x: torch.Tensor, block_size: int, right: bool) -> torch.Tensor:
    """The low-rank state as (own, ⌈r/B⌉, B) blocks along the rank axis, zero-padded."""
    lines = x if right else x.T
    own, rank = lines.shape
    blocks = -(-rank // block_size)
    padded = lines.new_zeros(own, blocks * block_size)
    padded[:, :rank] = lines
    return padded.view(own, blocks, block_size)


def from_moment_blocks(blocks: torch.Tensor, rank: int, right: bool) -> torch.Tensor:
    """The inverse of :func:`moment_blocks`: (own, ⌈r/B⌉, B) blocks back to the m×r or r×n state."""
    lines = blocks.reshape(blocks.shape[0], -1)[:, :rank]
    return (lines if right else lines.T).contiguous()


def sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """√x of fp32 values, correctly rounded (IEEE sqrt, the kernels' sqrtf / tl.sqrt_rn):
    computed in float64 and rounded once, which is exact for sqrt (53 ≥ 2·24 + 2 bits). torch's
    vectorized fp32 sqrt on CPU is not always correctly rounded (√75.2373046875 comes out one ulp
    low with torch 2.14 on AVX-512, 1.0946693 gives 1.0462644 for 1.0462645), which would change
    a code of √V or a bit of the Gaussian basis."""
    return x.double().sqrt().float()


def div_rn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a / b of fp32 values, correctly rounded (IEEE division, tl.div_rn): in float64, rounded
    once (exact for division as for sqrt), whatever path torch's fp32 division takes."""
    return (a.double() / b.double()).float()


def _power_of_two(exponent: torch.Tensor) -> torch.Tensor:
    """2^e in fp32 for integer tensors e in the normal range, built from its bits (exact)."""
    return _fp32_from_bits((exponent + 127) << 23)


def fp8_encode(y: torch.Tensor, words: torch.Tensor, fmt: MomentFormat) -> torch.Tensor:
    """Codes c (int64) of magnitudes 0 ≤ y ≤ fmt.max_value (fp32), rounded stochastically:
    e = max(⌊log2 y⌋, −6) (from y's exponent bits), z = y·2^(mb − e) (exact),
    k = ⌊z⌋ + [u < z − ⌊z⌋] with u = ⌊word/2^8⌋·2^-24, c = 2^mb·(e + 6) + k.
    E[value(c)] = y (to 2^-24 of a grid step): one spacing 2^(e − mb) apart, up or down."""
    mb = fmt.mantissa_bits
    exponent = (((_fp32_bits(y) >> 23) & 0xFF) - 127).clamp(min=_MIN_NORMAL_EXP)
    z = y * _power_of_two(mb - exponent)
    down = torch.floor(z)
    u = (words >> 8).to(torch.float32) * _f32(2.0**-24)
    k = down.to(torch.int64) + (u < z - down).to(torch.int64)
    return (exponent - _MIN_NORMAL_EXP) * 2**mb + k


def fp8_decode(codes: torch.Tensor, fmt: MomentFormat) -> torch.Tensor:
    """Values (fp32, exact) of codes c ≥ 0: f = max(c >> mb, 1),
    value = (c − 2^mb·(f − 1))·2^(f − 7 − mb)."""
    mb = fmt.mantissa_bits
    c = codes.to(torch.int64)
    field = (c >> mb).clamp(min=1)
    return (c - (field - 1) * 2**mb).to(torch.float32) * _power_of_two(field - 7 - mb)


def quantize_moment(x: torch.Tensor, words: torch.Tensor, block_size: int, right: bool, *,
                    signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scales) of an fp32 moment in the 8-bit format; ``signed``: exp_avg (M itself,
    E4M3, int8 codes ±c) else exp_avg_sq (√V, unsigned E4M4, uint8 codes, V = √V² on load).

    Per block (:func:`moment_scales_shape`), with x the block's values (M, or √V = sqrt(V)):
        a = max|x|;  s = a / max_value  (480 for M, 496 for √V; IEEE division)  → the scale
        y = min(|x| / s, max_value)  (0 where s is not a positive finite number)
        c = fp8_encode(y, word)      (the element's Philox word: the first for M, the second V)
        M: code = −c if x < 0 else c (int8, |code| ≤ 127)
        √V: code = c, raised to 1 where x > 0 and c = 0 (uint8): a positive V is never stored
            as 0, which would turn N = M/(√V+ε) into M/ε.
    words: int64 tensor shaped like x (uint32 values)."""
    fmt = EXP_AVG_FORMAT if signed else EXP_AVG_SQ_FORMAT
    rank = x.shape[1] if right else x.shape[0]
    values = moment_blocks(x.float() if signed else sqrt_rn(x.float()), block_size, right)
    word_blocks = moment_blocks(words, block_size, right)
    magnitude = values.abs()
    scales = div_rn(magnitude.amax(dim=2), _f32(fmt.max_value))
    usable = (scales > 0) & torch.isfinite(scales)
    y = torch.where(usable.unsqueeze(2), div_rn(magnitude, scales.unsqueeze(2)), _f32(0.0))
    y = y.clamp(max=fmt.max_value)
    codes = fp8_encode(y, word_blocks, fmt)
    if signed:
        codes = torch.where(values < 0, -codes, codes)
        dtype = torch.int8
    else:
        codes = torch.where((values > 0) & (codes == 0), torch.ones_like(codes), codes)
        dtype = torch.uint8
    return from_moment_blocks(codes, rank, right).to(dtype), scales


def dequantize_moment(codes: torch.Tensor, scales: torch.Tensor, block_size: int, right: bool,
                      *, signed: bool) -> torch.Tensor:
    """fp32 moment of :func:`quantize_moment`'s codes: x̃ = ±fp8_decode(|code|)·s (rounded once);
    exp_avg_sq: V = x̃·x̃ (x̃ = √V, rounded once more)."""
    fmt = EXP_AVG_FORMAT if signed else EXP_AVG_SQ_FORMAT
    rank = codes.shape[1] if right else codes.shape[0]
    blocks = moment_blocks(codes.to(torch.int64), block_size, right)
    values = fp8_decode(blocks.abs(), fmt) * scales.unsqueeze(2)
    if signed:
        return from_moment_blocks(torch.where(blocks < 0, -values, values), rank, right)
    return from_moment_blocks(values * values, rank, right)


# --------------------------------------------------------------------------------------------
# APOLLO's random basis (DESIGN.md §4.7): N(0, 1/r) values generated from (seed, refresh count)
#
# Every operation below is IEEE-exact (integer/bit operations, +, −, ×, /, sqrt, comparisons on
# fp32 with round-to-nearest-even, evaluated in the order written, no FMA contraction), so the
# C++ kernels (-ffp-contract=off) and Triton (enable_fp_fusion=False; tl.div_rn, tl.sqrt_rn)
# reproduce these values bit for bit.
# --------------------------------------------------------------------------------------------
BASIS_STREAM = 2 << 32  # Philox counter word 1 = 2: apart from INT8 weights (0) and moments (1)
_TWO_POW_24 = 1 << 24
_QUARTER_TURN = 1 << 22  # a 24-bit angle t stands for θ = 2π·t/2^24: 2^22 per quadrant
# ln 2 split for Cephes' logf reduction: _LN2_HI·e is exact for |e| < 2^15
_LN2_HI, _LN2_LO = 0.693359375, -2.12194440e-4
# Cephes logf: ln(1+x) = x − x²/2 + x³·P(x) for x ∈ [√½−1, √2−1), P's coefficients from x⁸ down
_LOG_POLY = (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1,
             1.4249322787e-1, -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1,
             3.3333331174e-1)
_SQRT_HALF = 0.70710678118654752440


def log_of_units(k: torch.Tensor, exponent: int) -> torch.Tensor:
    """ln(k·2^exponent) in fp32 for integers 1 ≤ k ≤ 2^24 (int64 tensor): Cephes' logf.

    fp32(k) is exact; its bits give k = f·2^e, f ∈ [½, 1) (frexp). If f < √½: e ← e − 1,
    x = (f + f) − 1, else x = f − 1 (both exact). With z = x·x and E = fp32(e + exponent):
        y = (…((P0·x + P1)·x + P2)…)·x + P8     (Horner, _LOG_POLY)
        y = (y·x)·z;  y = y + (−2.12194440e-4·E);  y = y + (−0.5·z);  x = x + y;
        ln = x + 0.693359375·E
    Accurate to ~2 fp32 ulps of the result."""
    bits = _fp32_bits(k.to(torch.float32))
    e = ((bits >> 23) & 0xFF) - 126
    f = _fp32_from_bits((bits & 0x807FFFFF) | 0x3F000000)
    small = f < _f32(_SQRT_HALF)
    e = torch.where(small, e - 1, e)
    x = torch.where(small, (f + f) - _f32(1.0), f - _f32(1.0))
    z = x * x
    y = _f32(_LOG_POLY[0])
    for coeff in _LOG_POLY[1:]:
        y = y * x + _f32(coeff)
    y = (y * x) * z
    big_e = (e + exponent).to(torch.float32)
    y = y + _f32(_LN2_LO) * big_e
    y = y + _f32(-0.5) * z
    x = x + y
    return x + _f32(_LN2_HI) * big_e


def cos_sin_octant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos x, sin x) for fp32 x ∈ [0, π/4]: Cephes' single-precision polynomials, evaluated
    exactly as triton_kernels/_common._cos_sin_octant writes them (≈1-2 ulp):
        z = x·x
        sin = x + (x·z)·(((−1.9515295891e-4·z) + 8.3321608736e-3)·z − 1.6666654611e-1)
        cos = (1 − 0.5·z) + (z·z)·(((2.443315711809948e-5·z) − 1.388731625493765e-3)·z
                                   + 4.166664568298827e-2)"""
    z = x * x
    sin_x = x + (x * z) * ((_f32(-1.9515295891e-4) * z + _f32(8.3321608736e-3)) * z
                           - _f32(1.6666654611e-1))
    cos_x = (_f32(1.0) - _f32(0.5) * z) + (z * z) * (
        (_f32(2.443315711809948e-5) * z - _f32(1.388731625493765e-3)) * z
        + _f32(4.166664568298827e-2))
    return cos_x, sin_x


def cos_sin_turn(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos θ, sin θ) in fp32 of θ = 2π·t/2^24 for integers 0 ≤ t < 2^24: the quadrant
    q = t >> 22 and the folding at π/4 are exact integer operations; only the octant angle
    fp32(ρ)·fp32(π/2·2^-22), ρ ≤ 2^21, is rounded (once) before :func:`cos_sin_octant`."""
    quadrant = t >> 22
    rem = t & (_QUARTER_TURN - 1)
    upper = 2 * rem > _QUARTER_TURN  # φ > π/4: cos φ = sin(π/2 − φ), sin φ = cos(π/2 − φ)
    folded = torch.where(upper, _QUARTER_TURN - rem, rem)
    angle = folded.to(torch.float32) * _f32(math.pi / 2 / _QUARTER_TURN)
    cos_oct, sin_oct = cos_sin_octant(angle)
    cos_phi = torch.where(upper, sin_oct, cos_oct)
    sin_phi = torch.where(upper, cos_oct, sin_oct)
    # θ = q·π/2 + φ
    cos_t = torch.stack([cos_phi, -sin_phi, -cos_phi, sin_phi])
    sin_t = torch.stack([sin_phi, cos_phi, -sin_phi, -cos_phi])
    pick = quadrant.unsqueeze(0)
    return cos_t.gather(0, pick).squeeze(0), sin_t.gather(0, pick).squeeze(0)


def gaussian_pair(radius_word: torch.Tensor, angle_word: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent N(0, 1) fp32 values from two 32-bit words (int64 tensors) by Box-Muller:
    u = (⌊w_r/2^8⌋ + 1)·2^-24 ∈ (0, 1], θ = 2π·⌊w_θ/2^8⌋·2^-24,
    ρ = √(−2·ln u) (:func:`log_of_units`, then ×(−2), :func:`sqrt_rn`), values (ρ·cos θ,
    ρ·sin θ)."""
    log_u = log_of_units((radius_word >> 8) + 1, -24)
    radius = sqrt_rn(_f32(-2.0) * log_u)
    cos_t, sin_t = cos_sin_turn(angle_word >> 8)
    return radius * cos_t, radius * sin_t


def philox_gaussian(seed: int, counters: torch.Tensor, lane: torch.Tensor) -> torch.Tensor:
    """N(0, 1) values, four per Philox call: lane ∈ {0, 1, 2, 3} of the call at ``counters``
    with words (w0, w1, w2, w3) is the cos (even lane) or sin (odd lane) value of
    gaussian_pair(w0, w1) (lanes 0, 1) or gaussian_pair(w2, w3) (lanes 2, 3)."""
    w0, w1, w2, w3 = philox_uint32x4(seed, counters)
    first = lane < 2
    cos_t, sin_t = gaussian_pair(torch.where(first, w0, w2), torch.where(first, w1, w3))
    return torch.where(lane % 2 == 0, cos_t, sin_t)


def random_basis(d: int, rank: int, seed: int, refresh: int, device=None) -> torch.Tensor:
    """APOLLO's Gaussian basis as rank×d fp32 rows, values N(0, 1/r), regenerated at every
    refresh from (per-parameter seed, refresh count) alone -- nothing else is stored.

    Element (k, i), k < rank, i < d: its Philox call is under key rounding_philox_seed(seed,
    refresh) (seed < 2^32, refresh < 2^31) at counter (k·⌈d/4⌉ + ⌊i/4⌋, 2, 0, 0) -- four
    consecutive elements of a row share one call and a call never spans two rows -- and its
    value is philox_gaussian(…, lane i mod 4) / sqrt(fp32(rank)) (IEEE division and square
    root). A tiled kernel computes any (k, i) tile independently, with the same bits.

    Distribution: u's 2^24 levels cut the tails at |z| ≤ √(48·ln 2) = 5.77 (a mass of 8e-9
    lost) and θ's 2^24 angles are uniform; log, cos and sin are within a few fp32 ulps, so the
    values' CDF differs from the Gaussian's by less than 1e-6 (tests/test_random_basis.py
    compares with the float64 transform of the same words and runs a KS test)."""
    groups = -(-d // 4)
    k = torch.arange(rank, dtype=torch.int64, device=device).view(-1, 1)
    i = torch.arange(d, dtype=torch.int64, device=device).view(1, -1)
    counters = k * groups + (i >> 2) + BASIS_STREAM
    values = philox_gaussian(rounding_philox_seed(seed, refresh), counters,
                             (i & 3).expand(rank, d))
    return div_rn(values, sqrt_rn(_f32(float(rank))))


def random_projection(seed: int, refresh: int, m: int, n: int, rank: int, device=None
                      ) -> torch.Tensor:
    """The dense basis a generated random basis stands for in fused_galore_step (the parity
    path): Q = random_basis(n, r) (r×n, right) or P = random_basis(m, r)ᵀ (m×r, left)."""
    right = is_right_side(m, n)
    rows = random_basis(n if right else m, rank, seed, refresh, device)
    return rows if right else rows.T.contiguous()


# --------------------------------------------------------------------------------------------
# GradNormLoRP (DESIGN.md §4.8)
# --------------------------------------------------------------------------------------------
def gradnorm_init_state(param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row_scale, row_norm) of a fresh weight: both ‖W_i‖ (fp32, length m), since the
    authors start with v = W and g = ‖v‖ (a zero row makes their step 0/0, and ours)."""
    norms = torch.linalg.vector_norm(param.float(), dim=1)
    return norms.clone(), norms


def gradnorm_vnorm_sq_gram(param: torch.Tensor, proj: torch.Tensor, normalized: torch.Tensor,
                           factor: torch.Tensor, update_scale: float) -> torch.Tensor:
    """‖v'_i‖² of the right side's kernel form (:func:`fused_gradnorm_step`) from per-row sums
    and the r×r Gram, in fp32: v'_i = a_i·W_i − us·N_i Q with a = ``factor`` (length m) and
    us = ``update_scale``, so
        ‖v'_i‖² = a_i²·ω_i − 2·a_i·us·N_i·U_i + us²·N_i K N_iᵀ,
        ω_i = ‖W_i‖²,  U = W Qᵀ (m×r),  K = Q Qᵀ (r×r),
    clamped at 0 (exact for any basis). The spec of the Triton kernel's per-row sums; its
    error against the direct sum is measured in tests/test_fused_gradnorm_step.py."""
    w, q, n_ = param.float(), proj.float(), normalized.float()
    omega = (w * w).sum(1)
    cross = (n_ * (w @ q.T)).sum(1)
    quad = ((n_ @ (q @ q.T)) * n_).sum(1)
    a = factor.float()
    return (a * a * omega - 2.0 * a * update_scale * cross
            + update_scale * update_scale * quad).clamp(min=0.0)


def fused_gradnorm_step(param: torch.Tensor, grad: torch.Tensor, proj: torch.Tensor,
                        exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, row_scale: torch.Tensor,
                        row_norm: torch.Tensor, scale_exp_avg: torch.Tensor,
                        scale_exp_avg_sq: torch.Tensor, *, lr: float, beta1: float, beta2: float,
                        eps: float, weight_decay: float, scale: float, step: int, seed: int = 0,
                        exp_avg_scales: torch.Tensor | None = None,
                        exp_avg_sq_scales: torch.Tensor | None = None,
                        state_block_size: int = MOMENT_BLOCK_SIZE) -> None:
    """One GradNormLoRP step (the authors' ``LowRankWeightNormAdamW``) on an m×n weight, in
    place, keeping W itself instead of their full copy v of every weight.

    Their state per weight: v (m×n), g (one per row), the weight W = g ⊙ v/‖v‖ (row norms).
    Their step: g ← ‖v‖ (reset at the start of every step, so the learned g lives for one
    forward only); ∇v = G·g/‖v‖ (= G, since g = ‖v‖ there); ∇g_i = Σ_j G_ij·v_ij/‖v_i‖; ∇v
    projected (GaLore, side rule §4.1), Adam (ε 1e-6 not bias-corrected, one α_t) on R and on
    ∇g; v ← d·(v − α_t·a·back(N)), g ← d·(g − α_t·N_g); W = g ⊙ v/‖v‖ (d = 1 − lr·wd, a =
    ``scale``).

    Ours: ``row_scale`` holds g (after its step; fp32, length m), ``row_norm`` ‖v‖ (same), so
    v = c ⊙ W with c_i = ‖v_i‖/g_i, and v/‖v‖ = W/g. One step, in fp32:
        c_i = row_norm_i/row_scale_i;   ∇g_i = (Σ_j G_ij·W_ij)/row_scale_i;   R = project(G)
        N = Adam(R; exp_avg, exp_avg_sq);   N_g = Adam(∇g; scale_exp_avg, scale_exp_avg_sq)
        v' = d·(c ⊙ W − α_t·a·back(N));   g' = d·(row_norm − α_t·N_g);   ‖v'_i‖ its row norms
        W ← (g'/‖v'‖) ⊙ v';   row_scale ← g';   row_norm ← ‖v'‖
    Moments of R as :func:`fused_galore_step` (fp32, bf16 or 8-bit); the per-row moments of g
    are fp32. Init: :func:`gradnorm_init_state`.

    Kernel form (no m×n temporary, no host sync); rows are the norm's lines on both sides:
      right side (m ≥ n; a program owns whole rows, as for GaLore):
        pass 1, streams G and W once: R_i = G_i Qᵀ, U_i = W_i Qᵀ, γ_i = Σ_j G_ij W_ij,
          ω_i = ‖W_i‖²; then per row Adam → N_i, ∇g_i = γ_i/g_i → N_g,i → g'_i, and
          ‖v'_i‖² = d²·(c_i²·ω_i − 2·α_t·a·c_i·N_i·U_i + (α_t·a)²·N_i K N_iᵀ),  K = Q Qᵀ
          (exact for any basis; no cancellation unless the update rivals v itself);
        pass 2, streams W again: W'_ij = (g'_i/‖v'_i‖)·d·(c_i·W_ij − α_t·a·(N_i Q)_j).
        DRAM: G read once, W read twice and written once (the §5 floor + one read of W).
      left side (m < n; R's lines are columns, the norms' lines are rows, so row sums cross
        programs): kernel 1 (column strips, streams G and W once): R = PᵀG, Adam → N (an r×n
        fp32 workspace), per (row, strip) partials of γ_i and ω_i; kernel 2 (column strips,
        streams W): per (row, strip) partials of ‖v'_i‖² = Σ_j (d·(c_i·W_ij − α_t·a·(P N)_ij))²
        (direct, needs only c_i); finalize (rows, fixed order over strips): ∇g, N_g, g', ‖v'‖,
        the row factor g'/‖v'‖ and the per-row states; kernel 3: W' as on the right side.
        DRAM: G read once, W read three times and written once, N written once and read twice
        (r·n·4 bytes each), partials 3·m·⌈n/strip⌉·4 bytes.
    """
    m, n = param.shape
    right = is_right_side(m, n)
    w = param.float()
    ratio = (row_norm / row_scale).unsqueeze(1)
    grad_scale = (grad.float() * w).sum(1) / row_scale
    low_rank_grad = project(grad, proj)
    exp_avg32, exp_avg_sq32 = load_moments(exp_avg, exp_avg_sq, exp_avg_scales,
                                           exp_avg_sq_scales, state_block_size, right)
    normalized = adam_normalized(low_rank_grad, exp_avg32, exp_avg_sq32, beta1, beta2, eps)
    normalized_scale = adam_normalized(grad_scale, scale_exp_avg, scale_exp_avg_sq, beta1, beta2,
                                       eps)
    step_size = adam_step_size(lr, beta1, beta2, step)
    direction = w * ratio
    direction.sub_(project_back(normalized, proj, m, n, scale), alpha=step_size)
    new_scale = row_norm - step_size * normalized_scale
    if weight_decay != 0.0:
        direction.mul_(1.0 - lr * weight_decay)
        new_scale.mul_(1.0 - lr * weight_decay)
    new_norm = torch.linalg.vector_norm(direction, dim=1)
    param.copy_(direction * (new_scale / new_norm).unsqueeze(1))
    row_scale.copy_(new_scale)
    row_norm.copy_(new_norm)
    store_moments_(exp_avg, exp_avg_sq, exp_avg32, exp_avg_sq32, rounding_philox_seed(seed, step),
                   exp_avg_scales=exp_avg_scales, exp_avg_sq_scales=exp_avg_sq_scales,
                   block_size=state_block_size, right=right)
