"""LowRankAdagrad (DESIGN.md §4.10): torch.optim.Adagrad's trajectory with the identity basis, the
group keys and refusals, state_dict round trips, and the scaling rules' refusal."""

import pytest
import torch
from cases import (
    assert_fp32_close,
    assert_resumes_bit_for_bit,
    mlp_batches,
    mlp_loss,
    mlp_param_groups,
    small_mlp,
    train_steps,
)

import lowrank_kernels as lk
from lowrank_kernels import reference
from lowrank_kernels.optim import LowRankAdagrad, scale_hyperparameters

pytestmark = [pytest.mark.skipif(not lk.EXTENSION_AVAILABLE, reason="extension not built"),
              pytest.mark.usefixtures("one_thread")]

LR, EPS, STEPS = 0.05, 1e-10, 20


def _identity_projection_(optimizer, p):
    """Allocates p's state and installs the identity basis (r = min(m, n): Q = I r×n or P = I
    m×r) as if refreshed at step 0, with a gap no run reaches: every step then projects on I."""
    state = optimizer.init_state(p)
    state["proj"].copy_(torch.eye(*state["proj"].shape))
    state["proj_last_refresh"].fill_(0)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1], ids=["no_decay", "decoupled_decay"])
@pytest.mark.parametrize("m,n", [(30, 12), (12, 30), (16, 16)], ids=["right", "left", "square"])
def test_identity_projection_follows_torch_adagrad_for_20_steps(m, n, weight_decay):
    """Through the optimizer (the fused op, the C++ kernel): the projected weight and the bias (a
    group without rank: torch's Adagrad kernels) land on torch.optim.Adagrad's trajectory
    (lr_decay 0, initial accumulator 0), followed by W ← (1 − lr·wd)·W each step (our decay is
    decoupled; torch's weight_decay is an L2 term)."""
    gen = torch.Generator().manual_seed(m + n)
    w0, b0 = torch.randn(m, n, generator=gen), torch.randn(m, generator=gen)
    weight, bias = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
    ours = LowRankAdagrad([{"params": [bias]},
                           {"params": [weight], "rank": min(m, n), "update_proj_gap": 10**9}],
                          lr=LR, eps=EPS, weight_decay=weight_decay)
    _identity_projection_(ours, weight)
    peer_w, peer_b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
    peer = torch.optim.Adagrad([peer_w, peer_b], lr=LR, lr_decay=0.0, weight_decay=0.0,
                               initial_accumulator_value=0.0, eps=EPS)
    for step in range(STEPS):
        grad_w = torch.randn(m, n, generator=gen) * (1.0 + step % 4)
        grad_b = torch.randn(m, generator=gen)
        weight.grad, bias.grad = grad_w.clone(), grad_b.clone()
        peer_w.grad, peer_b.grad = grad_w.clone(), grad_b.clone()
        ours.step()
        peer.step()
        with torch.no_grad():
            for p in (peer_w, peer_b):
                p.mul_(1.0 - LR * weight_decay)
        assert_fp32_close(weight.detach(), peer_w.detach(), rtol=1e-6)
        assert_fp32_close(bias.detach(), peer_b.detach(), rtol=1e-6)
    assert_fp32_close(ours.state[weight]["exp_avg_sq"], peer.state[peer_w]["sum"], rtol=1e-6)
    assert "exp_avg" not in ours.state[weight]
    assert int(ours.state[weight]["proj_refreshes"]) == 0  # I all along
    assert (w0 - weight.detach()).abs().max() > 0.1  # it moved


def test_a_refreshing_run_equals_the_reference_rule_step_by_step():
    """SVD refreshes every 2 steps, both sides: each projected step equals
    reference.fused_galore_step(inner="adagrad") on the same state (fp32 rule)."""
    model = small_mlp()
    optimizer = LowRankAdagrad(mlp_param_groups(model, rank=4, update_proj_gap=2, scale=0.5),
                               lr=0.05, weight_decay=0.1)
    weights = [p for p in model.parameters() if p.dim() == 2]
    for batch in mlp_batches(5):
        optimizer.zero_grad()
        mlp_loss(model, batch).backward()
        before = {p: (p.detach().clone(), optimizer.state[p].get("exp_avg_sq")) for p in weights}
        before = {p: (w, None if v is None else v.clone()) for p, (w, v) in before.items()}
        optimizer.step()
        for p in weights:
            w, v = before[p]
            state = optimizer.state[p]
            if v is None or int(state["proj_last_refresh"]) == int(state["step"]) - 1:
                continue  # the first step or a refresh (a new basis): nothing to replay
            reference.fused_galore_step(w, p.grad, state["proj"], None, v, lr=0.05, beta1=0.0,
                                        beta2=0.0, eps=1e-10, weight_decay=0.1, scale=0.5,
                                        step=int(state["step"]), inner="adagrad")
            assert_fp32_close(p.detach(), w)
            assert_fp32_close(state["exp_avg_sq"], v)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16, "8bit"], ids=str)
def test_state_dict_round_trip_resumes_bit_for_bit(state_dtype):
    def make(model):
        return LowRankAdagrad(mlp_param_groups(model, rank=4, update_proj_gap=2),
                              lr=0.05, weight_decay=0.1, state_dtype=state_dtype)

    _, optimizer = assert_resumes_bit_for_bit(make, mlp_batches(6))
    state = next(optimizer.state[p] for p in optimizer.param_groups[1]["params"])
    assert "exp_avg" not in state and "exp_avg_scales" not in state
    assert ("exp_avg_sq_scales" in state) == (state_dtype == "8bit")


def test_group_keys_are_lowrank_adamws_without_betas_and_with_adagrads():
    model = small_mlp()
    optimizer = LowRankAdagrad(mlp_param_groups(model, rank=4), lr=0.1)
    group = optimizer.param_groups[1]
    assert {"lr_decay", "initial_accumulator_value", "rank", "state_dtype"} <= set(group)
    assert not {"betas", "correct_bias"} & set(group)
    for key, value in (("betas", (0.9, 0.99)), ("correct_bias", False), ("rnak", 4)):
        with pytest.raises(ValueError, match=f"unknown key '{key}'"):
            LowRankAdagrad(mlp_param_groups(small_mlp(), rank=4, **{key: value}))


@pytest.mark.parametrize("key,value", [("lr_decay", 0.01), ("initial_accumulator_value", 0.1)])
def test_nonzero_lr_decay_or_initial_accumulator_is_refused(key, value):
    with pytest.raises(ValueError, match=f"LowRankAdagrad: {key} = {value}: only 0 is supported"):
        LowRankAdagrad(small_mlp().parameters(), **{key: value})
    with pytest.raises(ValueError, match=f"parameter group 1.*{key} = {value}: only 0"):
        LowRankAdagrad(mlp_param_groups(small_mlp(), rank=4, **{key: value}))


def test_scaling_rules_refuse_it_as_they_refuse_torch_adagrad():
    optimizer = LowRankAdagrad(mlp_param_groups(small_mlp(), rank=4))
    for rule in ("sqrt", "linear"):
        with pytest.raises(ValueError, match="LowRankAdagrad accepts neither rule"):
            scale_hyperparameters(optimizer, 32, 128, rule=rule)


def test_it_trains():
    model = small_mlp()
    optimizer = LowRankAdagrad(mlp_param_groups(model, rank=4, update_proj_gap=5), lr=0.05)
    batches = mlp_batches(1) * 30
    first = mlp_loss(model, batches[0]).item()
    train_steps(model, optimizer, batches)
    assert mlp_loss(model, batches[0]).item() < 0.5 * first
