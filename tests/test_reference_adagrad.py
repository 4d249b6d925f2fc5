"""reference.fused_galore_step(inner="adagrad") (DESIGN.md §4.10) against torch.optim.Adagrad:
with the identity basis (r = min(m, n), Q = I or P = I) the low-rank step IS coordinate-wise
AdaGrad, so 20 steps must land on torch's trajectory. The mapping of conventions:
torch's state_sum is our V (initial_accumulator_value=0), std = √state_sum + ε is our √V + ε (ε
outside the square root in both), lr_decay=0 keeps torch's clr = lr, and torch's weight_decay is
an L2 term added to the gradient, so our decoupled decay is checked against Adagrad followed by
W ← (1 − lr·wd)·W instead."""

import pytest
import torch
from cases import assert_fp32_close

from lowrank_kernels import reference

pytestmark = pytest.mark.usefixtures("one_thread")

LR, EPS, STEPS = 0.05, 1e-10, 20


@pytest.mark.parametrize("weight_decay", [0.0, 0.1], ids=["no_decay", "decoupled_decay"])
@pytest.mark.parametrize("m,n", [(30, 12), (12, 30), (16, 16)], ids=["right", "left", "square"])
def test_identity_projection_is_torch_adagrad(m, n, weight_decay):
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(m, n, generator=gen)
    peer_param = torch.nn.Parameter(w0.clone())
    peer = torch.optim.Adagrad([peer_param], lr=LR, lr_decay=0.0, weight_decay=0.0,
                               initial_accumulator_value=0.0, eps=EPS)
    rank = min(m, n)
    basis = torch.eye(rank)  # Q = I (r×n, right) or P = I (m×r, left)
    ours = w0.clone()
    exp_avg_sq = torch.zeros(m, rank) if reference.is_right_side(m, n) else torch.zeros(rank, n)
    for step in range(1, STEPS + 1):
        grad = torch.randn(m, n, generator=gen) * (1.0 + step % 4)
        peer_param.grad = grad.clone()
        peer.step()
        with torch.no_grad():
            peer_param.mul_(1.0 - LR * weight_decay)
        reference.fused_galore_step(ours, grad, basis, None, exp_avg_sq, lr=LR, beta1=0.9,
                                    beta2=0.999, eps=EPS, weight_decay=weight_decay, scale=1.0,
                                    step=step, inner="adagrad")
        assert_fp32_close(ours, peer_param.detach(), rtol=1e-6)
    assert_fp32_close(exp_avg_sq, peer.state[peer_param]["sum"], rtol=1e-6)


def test_adagrad_is_the_adam_arithmetic_with_coefficients_0_1_1_1():
    """The kernels run AdaGrad through their Adam code with (β1, 1−β1, β2, 1−β2) = (0, 1, 1, 1)
    and M = 0 (adam.h make_adam_coeffs' fields): bit for bit the same numbers."""
    gen = torch.Generator().manual_seed(1)
    grad_low = torch.randn(40, 9, generator=gen) * torch.logspace(-6, 3, 9)
    v0 = torch.rand(40, 9, generator=gen) * torch.logspace(-8, 4, 9)
    beta1, one_minus_beta1, beta2, one_minus_beta2 = (torch.tensor(c, dtype=torch.float32)
                                                      for c in (0.0, 1.0, 1.0, 1.0))
    eps = torch.tensor(1e-6, dtype=torch.float32)
    m = beta1 * torch.zeros_like(grad_low) + one_minus_beta1 * grad_low
    v = beta2 * v0 + one_minus_beta2 * grad_low * grad_low
    expected = m / (torch.sqrt(v) + eps)
    v_ref = v0.clone()
    normalized = reference.adagrad_normalized(grad_low, v_ref, 1e-6)
    assert torch.equal(v_ref, v)
    assert torch.equal(normalized, expected)


def test_adagrad_with_8bit_accumulator_and_no_exp_avg():
    """exp_avg None with an 8-bit V: N from the dequantized V + R², V requantized."""
    gen = torch.Generator().manual_seed(2)
    m, n, rank, block = 20, 12, 5, 4
    basis = torch.linalg.qr(torch.randn(n, rank, generator=gen))[0].T.contiguous()
    grad, param = torch.randn(m, n, generator=gen), torch.randn(m, n, generator=gen)
    v = torch.rand(m, rank, generator=gen)
    words = reference.philox_uint32x2(0, torch.arange(v.numel()).view(v.shape)
                                      + reference.MOMENT_STREAM)[1]
    codes, scales = reference.quantize_moment(v, words, block, True, signed=False)
    expected_param, expected_v = param.clone(), reference.dequantize_moment(codes, scales, block,
                                                                            True, signed=False)
    reference.fused_galore_step(expected_param, grad, basis, None, expected_v, lr=LR, beta1=0.9,
                                beta2=0.999, eps=1e-6, weight_decay=0.0, scale=0.5, step=3,
                                inner="adagrad")
    reference.fused_galore_step(param, grad, basis, None, codes, lr=LR, beta1=0.9, beta2=0.999,
                                eps=1e-6, weight_decay=0.0, scale=0.5, step=3, inner="adagrad",
                                exp_avg_sq_scales=scales, state_block_size=block, seed=7)
    assert torch.equal(param, expected_param)
    words = reference.philox_uint32x2(reference.rounding_philox_seed(7, 3),
                                      torch.arange(v.numel()).view(v.shape)
                                      + reference.MOMENT_STREAM)[1]
    expected_codes, expected_scales = reference.quantize_moment(expected_v, words, block, True,
                                                                signed=False)
    assert torch.equal(codes, expected_codes) and torch.equal(scales, expected_scales)
