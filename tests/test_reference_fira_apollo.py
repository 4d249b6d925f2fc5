"""reference.fused_galore_step's Fira and APOLLO modes (DESIGN.md §4.6-§4.7) against fira 1.0.2
and apollo-torch 1.0.3 (DESIGN.md §8): 20 steps side by side on the same gradients, the peer's basis
(SVD or APOLLO's Gaussian) handed to ours after each of its refreshes, weight decay on, gradients
whose norm swings so that the norm-growth limiter both cuts and lets through; and the Gram form
of Fira's residual norm (the kernels' per-line sums) against a float64 residual."""

import pytest
import torch
from cases import assert_fp32_close, orthonormal_basis

from lowrank_kernels import reference

fira = pytest.importorskip("fira")


@pytest.fixture(scope="module")
def apollo_torch():
    """apollo-torch 1.0.3 (requirements-dev.txt); its tests skip without it, the rest still run."""
    return pytest.importorskip("apollo_torch")


pytestmark = pytest.mark.usefixtures("one_thread")

STEPS, LR, WD, SCALE, GAP = 20, 1e-2, 0.1, 0.25, 7
BETAS, EPS = (0.9, 0.999), 1e-6
# (m, n, rank): right side, left side, and r = min(m, n) on both sides
SHAPES = [(40, 24, 5), (24, 40, 5), (24, 16, 16), (12, 30, 12)]
SHAPE_IDS = ["right", "left", "right-full", "left-full"]


def gradients(m: int, n: int, seed: int) -> list[torch.Tensor]:
    """A fixed direction whose sign runs + + + − − (plus as much noise): ‖S‖ (∝ ‖N‖, which the
    gradient's scale does not move) grows on the runs, so the limiter cuts there, and falls when
    M cancels after a sign flip, so it lets S through there."""
    gen = torch.Generator().manual_seed(seed)
    direction = torch.randn(m, n, generator=gen)
    signs = (1.0, 1.0, 1.0, -1.0, -1.0)
    return [signs[t % 5] * direction + torch.randn(m, n, generator=gen) for t in range(STEPS)]


def run_side_by_side(peer_opt, peer_param, w0, grads, *, state_key, scale=SCALE, **modes):
    """Steps the peer and reference.fused_galore_step on the same gradients; returns ours and the
    number of (limited, unlimited) steps our limiter saw."""
    m, n = w0.shape
    ours = w0.clone()
    rank = modes.pop("rank")
    shape = (m, rank) if reference.is_right_side(m, n) else (rank, n)
    exp_avg, exp_avg_sq = torch.zeros(shape), torch.zeros(shape)
    limiter = torch.full((1,), -1.0) if modes.get("limiter", True) else None
    modes.pop("limiter", None)
    counts = [0, 0]
    for step, grad in enumerate(grads, start=1):
        peer_param.grad = grad.clone()
        peer_opt.step()
        state = peer_opt.state[peer_param]
        basis = state["projector"].ortho_matrix  # the peer's basis, after its refresh
        previous = None if limiter is None else limiter.item()
        reference.fused_galore_step(ours, grad, basis, exp_avg, exp_avg_sq, lr=LR,
                                    beta1=BETAS[0], beta2=BETAS[1], eps=EPS, weight_decay=WD,
                                    scale=scale, step=step, limiter=limiter, **modes)
        assert_fp32_close(ours, peer_param.detach())
        if limiter is not None:
            assert_fp32_close(limiter, state[state_key].reshape(1))
            if previous >= 0:
                bound = reference.LIMITER_GROWTH * (previous + reference.NORM_GUARD)
                counts[0 if abs(limiter.item() - bound) <= 1e-6 * bound else 1] += 1
    assert_fp32_close(exp_avg, state["exp_avg"])
    assert_fp32_close(exp_avg_sq, state["exp_avg_sq"])
    return ours, counts


@pytest.mark.parametrize("m,n,rank", SHAPES, ids=SHAPE_IDS)
def test_fira_matches_fira_adamw(m, n, rank):
    gen = torch.Generator().manual_seed(1)
    w0 = torch.randn(m, n, generator=gen)
    peer_param = torch.nn.Parameter(w0.clone())
    peer = fira.FiraAdamW([{"params": [peer_param], "rank": rank, "update_proj_gap": GAP,
                            "alpha": SCALE, "proj_type": "std"}], lr=LR, betas=BETAS, eps=EPS,
                          weight_decay=WD, no_deprecation_warning=True)
    _, (limited, passed) = run_side_by_side(peer, peer_param, w0, gradients(m, n, 2),
                                            state_key="scaling_grad", rank=rank,
                                            full_rank="fira")
    if rank < min(m, n):  # at r = min(m, n) the residual is rounding noise: no claim on it
        assert limited >= 3 and passed >= 3, (limited, passed)


@pytest.mark.parametrize("scale_front", [False, True], ids=["scale_back", "scale_front"])
@pytest.mark.parametrize("norm", ["channel", "tensor"])
@pytest.mark.parametrize("proj", ["svd", "random"])
@pytest.mark.parametrize("m,n,rank", SHAPES, ids=SHAPE_IDS)
def test_apollo_matches_apollo_adamw(apollo_torch, m, n, rank, proj, norm, scale_front):
    gen = torch.Generator().manual_seed(3)
    w0 = torch.randn(m, n, generator=gen)
    peer_param = torch.nn.Parameter(w0.clone())
    peer = apollo_torch.APOLLOAdamW(
        [{"params": [peer_param], "rank": rank, "proj": proj, "scale_type": norm,
          "update_proj_gap": GAP, "scale": SCALE, "proj_type": "std"}],
        lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, scale_front=scale_front)
    _, (limited, passed) = run_side_by_side(peer, peer_param, w0, gradients(m, n, 4),
                                            state_key="scaled_grad", rank=rank,
                                            full_rank="apollo", full_rank_norm=norm,
                                            scale_front=scale_front)
    assert limited >= 3 and passed >= 3, (limited, passed)


@pytest.mark.parametrize("m,n", [(40, 24), (24, 40)], ids=["right", "left"])
def test_apollo_mini_without_limiter_matches(apollo_torch, m, n):
    """APOLLO-Mini (rank 1, tensor scale) with ``disable_nl``: our limiter=None."""
    gen = torch.Generator().manual_seed(5)
    w0 = torch.randn(m, n, generator=gen)
    peer_param = torch.nn.Parameter(w0.clone())
    peer = apollo_torch.APOLLOAdamW(
        [{"params": [peer_param], "rank": 1, "proj": "random", "scale_type": "tensor",
          "update_proj_gap": GAP, "scale": 128.0, "proj_type": "std"}],
        lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, disable_nl=True)
    run_side_by_side(peer, peer_param, w0, gradients(m, n, 6), state_key="scaled_grad", rank=1,
                     scale=128.0, limiter=False, full_rank="apollo", full_rank_norm="tensor")


def test_limiter_first_step_stores_the_unscaled_norm_and_later_steps_cap_growth():
    term = torch.full((4, 4), 2.0)  # ‖S‖ = 8
    limiter = torch.tensor([-1.0])
    out = reference.limit_norm_growth_(term, limiter, 1.01)
    assert torch.equal(out, term) and limiter.item() == 8.0
    out = reference.limit_norm_growth_(2 * term, limiter, 1.01)  # ‖S‖ = 16: capped to 8·1.01
    expected = 1.01 * (8.0 + 1e-8)
    assert abs(torch.linalg.vector_norm(out).item() - expected) < 1e-5
    assert abs(limiter.item() - expected) < 1e-5
    out = reference.limit_norm_growth_(0.5 * term, limiter, 1.01)  # shrinking: unchanged
    assert torch.equal(out, 0.5 * term) and limiter.item() == 4.0


def residual_case(m, n, rank, inside, basis_kind, seed):
    """A gradient whose energy lies mostly inside the basis' span (fraction ``inside`` of its
    norm off it is 1 − inside), as right after an SVD refresh, with an orthonormal, an INT4-
    dequantized or a Gaussian basis."""
    gen = torch.Generator().manual_seed(seed)
    right = reference.is_right_side(m, n)
    basis = orthonormal_basis(m, n, rank, generator=gen)
    if basis_kind == "int4":
        packed, scales, zeros = reference.quantize_int4(basis)
        basis = reference.dequantize_int4(packed, scales, zeros, list(basis.shape))
    elif basis_kind == "gaussian":
        basis = reference.random_projection(seed, 0, m, n, rank)
    # G = (a low-rank part inside the span) + (1 − inside)·(noise)
    coeffs = torch.randn((m, rank) if right else (rank, n), generator=gen, dtype=torch.float64)
    signal = coeffs @ basis.double() if right else basis.double() @ coeffs
    noise = torch.randn(m, n, generator=gen, dtype=torch.float64)
    noise *= signal.norm() / noise.norm()
    return (signal + (1 - inside) * noise).float(), basis


@pytest.mark.parametrize("basis_kind", ["orthonormal", "int4", "gaussian"])
@pytest.mark.parametrize("m,n", [(96, 64), (64, 96)], ids=["right", "left"])
def test_gram_form_of_the_residual_norm(m, n, basis_kind):
    """Σ_i max(‖G_i‖² − 2a‖R_i‖² + a²R_i K R_iᵀ, 0) (fp32, per-line sums and the r×r Gram) against
    ‖G − a·back(R)‖² computed in float64 from the same fp32 R. Its error is the cancellation
    of a few ulps of ‖G‖²: relative ≈ 2⁻²³·‖G‖²/‖S‖², here bounded by 20× that."""
    for inside in (0.0, 0.9, 0.99, 0.999):
        grad, basis = residual_case(m, n, 16, inside, basis_kind, seed=7)
        low_rank = reference.project(grad, basis)
        for a in (1.0, 0.25):
            gram = reference.full_rank_line_sums(grad, basis, low_rank, a).sum().double()
            back = (low_rank.double() @ basis.double() if m >= n
                    else basis.double() @ low_rank.double())
            exact = (grad.double() - a * back).pow(2).sum()
            cancellation = grad.double().pow(2).sum() / exact
            rel = abs(gram - exact) / exact
            assert rel <= 20 * 2**-23 * cancellation + 1e-6, (inside, a, rel.item(),
                                                             cancellation.item())
