"""Layer-wise updates equal ordinary training: accumulation, per-parameter clipping, scheduler."""

import pytest
import torch
from cases import mlp_batches, mlp_loss, mlp_param_groups, small_mlp

import lowrank_kernels as lk
from lowrank_kernels.optim import GaLoreAdamW, LowRankAdamW, layerwise

pytestmark = [pytest.mark.skipif(not lk.EXTENSION_AVAILABLE, reason="extension not built"),
              pytest.mark.usefixtures("one_thread")]

ACCUMULATION = 4
OPTIMIZER_STEPS = 6



def make_optimizer(model):
    return GaLoreAdamW(mlp_param_groups(model, rank=5, update_proj_gap=3, scale=0.25),
                       lr=2e-2, weight_decay=0.05)


def make_scheduler(optimizer):
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)


def ordinary_training(batches, max_grad_norm):
    model = small_mlp()
    optimizer = make_optimizer(model)
    scheduler = make_scheduler(optimizer)
    lrs = []
    for start in range(0, len(batches), ACCUMULATION):
        for batch in batches[start:start + ACCUMULATION]:
            (mlp_loss(model, batch) / ACCUMULATION).backward()
        if max_grad_norm is not None:
            for p in model.parameters():
                torch.nn.utils.clip_grad_norm_([p], max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        lrs.append(optimizer.param_groups[1]["lr"])
    return model, optimizer, lrs


@pytest.mark.parametrize("max_grad_norm", [None, 0.05], ids=["no-clip", "clip"])
def test_layerwise_equals_ordinary_training_with_accumulation(max_grad_norm):
    batches = mlp_batches(ACCUMULATION * OPTIMIZER_STEPS, batch=8)
    expected, expected_optimizer, expected_lrs = ordinary_training(batches, max_grad_norm)

    model = small_mlp()
    trainer = layerwise(model, make_optimizer, accumulation_steps=ACCUMULATION,
                        max_grad_norm=max_grad_norm, scheduler_factory=make_scheduler)
    lrs, grads_between_steps = [], []
    for i, batch in enumerate(batches):
        (mlp_loss(model, batch) / ACCUMULATION).backward()
        if i % ACCUMULATION == ACCUMULATION - 1:
            lrs.append(trainer.optimizer.param_groups[1]["lr"])
            grads_between_steps.append(sum(p.grad is not None for p in model.parameters()))
    assert trainer.optimizer_steps == OPTIMIZER_STEPS
    assert lrs == expected_lrs  # the scheduler stepped once per optimizer step
    assert grads_between_steps == [0] * OPTIMIZER_STEPS  # every gradient was freed by its hook
    for a, b in zip(model.parameters(), expected.parameters()):
        assert torch.equal(a, b)
    for p, q in zip(model.parameters(), expected.parameters()):
        assert int(trainer.optimizer.state[p]["step"]) == OPTIMIZER_STEPS
        assert torch.equal(trainer.optimizer.state[p]["exp_avg"], expected_optimizer.state[q]["exp_avg"])


def test_clipping_changes_the_result():
    """The clip is real: with a small max norm the trajectory differs from the unclipped one."""
    batches = mlp_batches(ACCUMULATION * 2, batch=8)
    clipped, _, _ = ordinary_training(batches, 0.05)
    unclipped, _, _ = ordinary_training(batches, None)
    assert not torch.allclose(clipped[0].weight, unclipped[0].weight)
    model = small_mlp()
    layerwise(model, make_optimizer, accumulation_steps=ACCUMULATION, max_grad_norm=0.05)
    for batch in batches:
        (mlp_loss(model, batch) / ACCUMULATION).backward()
    assert torch.equal(model[0].weight, clipped[0].weight)


def test_layerwise_needs_step_parameter_and_held_parameters():
    model = small_mlp()
    with pytest.raises(TypeError, match="step_parameter"):
        layerwise(model, lambda m: torch.optim.AdamW(m.parameters()))
    with pytest.raises(ValueError, match="accumulation_steps"):
        layerwise(model, lambda m: LowRankAdamW(m.parameters()), accumulation_steps=0)
    with pytest.raises(ValueError, match="none of its trainable parameters"):
        layerwise(model, lambda m: LowRankAdamW([torch.nn.Parameter(torch.zeros(2))]))


def test_remove_restores_ordinary_gradients():
    model = small_mlp()
    trainer = layerwise(model, make_optimizer)
    trainer.remove()
    mlp_loss(model, mlp_batches(1)[0]).backward()
    assert all(p.grad is not None for p in model.parameters())
