"""reference.fused_gradnorm_step (DESIGN.md §4.8) against a restatement, in fp32, of the update
rules of GradNormLoRP's ``LowRankWeightNormAdamW`` (github Jhhuangkay/Gradient-Weight-normalized-
Low-rank-Projection-for-Efficient-LLM-Training, GradNormLoRP/LowRankWeightNormAdamW.py): the
authors keep a full copy v of every weight; ours keeps W and two floats per row, and must follow
the same W, g and ‖v‖ trajectory to fp32 rounding for 20 steps, with refreshes and decay."""

import pytest
import torch
from cases import assert_fp32_close

from lowrank_kernels import reference

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS, GAP = 20, 7
HYPER = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-6, "weight_decay": 0.1,
         "scale": 0.25}


class AuthorsRule:
    """The authors' per-weight step, written out with their full-precision v (m×n) and g."""

    def __init__(self, weight: torch.Tensor, rank: int):
        self.v = weight.clone()
        self.g = torch.linalg.vector_norm(self.v, dim=1, keepdim=True)
        self.rank, self.steps, self.basis = rank, 0, None
        self.moments = None

    def step(self, grad: torch.Tensor) -> torch.Tensor:
        lr, beta1, beta2, eps = (HYPER[k] for k in ("lr", "beta1", "beta2", "eps"))
        norm_v = torch.linalg.vector_norm(self.v, dim=1, keepdim=True)
        self.g = norm_v.clone()  # g is reset to ‖v‖ at the start of every step
        grad_v = grad * self.g / norm_v
        grad_g = torch.sum(grad * (self.v / norm_v), dim=1, keepdim=True)
        m, n = grad.shape
        if self.basis is None or self.steps % GAP == 0:  # GaLore's SVD of the projected gradient
            u, _, vh = torch.linalg.svd(grad_v, full_matrices=False)
            self.basis = vh[:self.rank] if m >= n else u[:, :self.rank]
        low_rank = grad_v @ self.basis.T if m >= n else self.basis.T @ grad_v
        if self.moments is None:
            self.moments = [torch.zeros_like(low_rank), torch.zeros_like(low_rank),
                            torch.zeros_like(self.g), torch.zeros_like(self.g)]
        self.steps += 1
        exp_avg_v, exp_avg_sq_v, exp_avg_g, exp_avg_sq_g = self.moments
        exp_avg_v.mul_(beta1).add_(low_rank, alpha=1 - beta1)
        exp_avg_sq_v.mul_(beta2).addcmul_(low_rank, low_rank, value=1 - beta2)
        exp_avg_g.mul_(beta1).add_(grad_g, alpha=1 - beta1)
        exp_avg_sq_g.mul_(beta2).addcmul_(grad_g, grad_g, value=1 - beta2)
        step_size = lr * (1 - beta2**self.steps) ** 0.5 / (1 - beta1**self.steps)
        normalized = exp_avg_v / (exp_avg_sq_v.sqrt() + eps)
        back = (normalized @ self.basis if m >= n else self.basis @ normalized) * HYPER["scale"]
        self.v.add_(back, alpha=-step_size)
        self.g.add_(exp_avg_g / (exp_avg_sq_g.sqrt() + eps), alpha=-step_size)
        self.v.add_(self.v, alpha=-lr * HYPER["weight_decay"])
        self.g.add_(self.g, alpha=-lr * HYPER["weight_decay"])
        return self.g * (self.v / torch.linalg.vector_norm(self.v, dim=1, keepdim=True))


@pytest.mark.parametrize("m,n,rank", [(40, 24, 5), (24, 40, 5), (16, 16, 16)],
                         ids=["right", "left", "full-rank"])
def test_matches_the_authors_update_rules(m, n, rank):
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(m, n, generator=gen) * torch.linspace(0.5, 2.0, m).unsqueeze(1)
    authors = AuthorsRule(w0, rank)
    ours = w0.clone()
    row_scale, row_norm = reference.gradnorm_init_state(ours)
    right = reference.is_right_side(m, n)
    shape = (m, rank) if right else (rank, n)
    exp_avg, exp_avg_sq = torch.zeros(shape), torch.zeros(shape)
    scale_exp_avg, scale_exp_avg_sq = torch.zeros(m), torch.zeros(m)
    for step in range(1, STEPS + 1):
        # the gradient a forward pass through the current W would give, plus a row-scale push
        grad = torch.randn(m, n, generator=gen) + 0.3 * ours
        expected = authors.step(grad)
        reference.fused_gradnorm_step(ours, grad, authors.basis, exp_avg, exp_avg_sq, row_scale,
                                      row_norm, scale_exp_avg, scale_exp_avg_sq, **HYPER,
                                      step=step)
        assert_fp32_close(ours, expected)
        assert_fp32_close(row_scale, authors.g.squeeze(1))
        assert_fp32_close(row_norm, torch.linalg.vector_norm(authors.v, dim=1))
    assert_fp32_close(exp_avg, authors.moments[0])
    assert_fp32_close(scale_exp_avg_sq, authors.moments[3].squeeze(1))
    # g ≠ ‖v‖ by far more than the tolerance (1e-5·max) and W moved: a real comparison
    assert (row_scale - row_norm).abs().max() > 1e-4 * row_norm.max()
    assert (ours - w0).abs().max() > 0.05


def test_init_state_is_the_row_norms():
    w = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    row_scale, row_norm = reference.gradnorm_init_state(w)
    assert torch.equal(row_scale, torch.tensor([5.0, 2.0])) and torch.equal(row_norm, row_scale)
    assert row_scale.data_ptr() != row_norm.data_ptr()


def test_8bit_moments_follow_the_fp32_step_of_their_dequantized_values():
    """With 8-bit M, V the step is the fp32 step on the dequantized moments (the W, g, ‖v‖ it
    writes are identical) and the moments are requantized (fused_galore_step's format)."""
    gen = torch.Generator().manual_seed(1)
    m, n, rank, block = 24, 40, 6, 4
    basis = torch.linalg.qr(torch.randn(m, rank, generator=gen))[0].contiguous()
    w, grad = torch.randn(m, n, generator=gen), torch.randn(m, n, generator=gen)
    index = torch.arange(rank * n).view(rank, n) + reference.MOMENT_STREAM
    words_m, words_v = reference.philox_uint32x2(0, index)
    m_codes, m_scales = reference.quantize_moment(0.1 * torch.randn(rank, n, generator=gen),
                                                  words_m, block, False, signed=True)
    v_codes, v_scales = reference.quantize_moment(0.01 * torch.rand(rank, n, generator=gen),
                                                  words_v, block, False, signed=False)
    states = [*reference.gradnorm_init_state(w), torch.zeros(m), torch.zeros(m)]
    expected_w, expected_states = w.clone(), [s.clone() for s in states]
    m32 = reference.dequantize_moment(m_codes, m_scales, block, False, signed=True)
    v32 = reference.dequantize_moment(v_codes, v_scales, block, False, signed=False)
    reference.fused_gradnorm_step(expected_w, grad, basis, m32, v32, *expected_states, **HYPER,
                                  step=2)
    reference.fused_gradnorm_step(w, grad, basis, m_codes, v_codes, *states, **HYPER, step=2,
                                  exp_avg_scales=m_scales, exp_avg_sq_scales=v_scales,
                                  state_block_size=block)
    assert torch.equal(w, expected_w)
    for got, want in zip(states, expected_states, strict=True):
        assert torch.equal(got, want)
    assert m_codes.dtype == torch.int8 and v_codes.dtype == torch.uint8
