"""Layer-wise updates equal ordinary training: accumulation, per-parameter clipping, scheduler."""

import pytest
import torch
from cases import mlp_batches, mlp_loss, mlp_param_groups, small_mlp
from torch.utils.checkpoint import checkpoint

import lowrank_kernels as lk
from lowrank_kernels.autograd import Int8Linear, replace_linear_with_int8
from lowrank_kernels.optim import GaLoreAdamW, LowRankAdamW, QGaLoreAdamW, layerwise

pytestmark = [pytest.mark.skipif(not lk.EXTENSION_AVAILABLE, reason="extension not built"),
              pytest.mark.usefixtures("one_thread")]

ACCUMULATION = 4
OPTIMIZER_STEPS = 6
INT8_GROUP = 64  # groups straddle rows of the 40×24, 32×40 and 10×32 weights


def make_optimizer(model):
    return GaLoreAdamW(mlp_param_groups(model, rank=5, update_proj_gap=3, scale=0.25),
                       lr=2e-2, weight_decay=0.05)


def make_scheduler(optimizer):
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)


def clip_each_(model, max_norm):
    """torch's clip_grad_norm_ on each gradient separately (INT8 codes: on float_grad, held as
    the .grad of a proxy tensor)."""
    for p in model.parameters():
        if p.dtype == torch.uint8:
            proxy = torch.zeros_like(p.float_grad)
            proxy.grad = p.float_grad
            p = proxy
        torch.nn.utils.clip_grad_norm_([p], max_norm)


def ordinary_training(batches, max_grad_norm, make_model=small_mlp,
                      optimizer_factory=make_optimizer, accumulation=ACCUMULATION):
    model = make_model()
    optimizer = optimizer_factory(model)
    scheduler = make_scheduler(optimizer)
    lrs = []
    for start in range(0, len(batches), accumulation):
        for batch in batches[start:start + accumulation]:
            (mlp_loss(model, batch) / accumulation).backward()
        if max_grad_norm is not None:
            clip_each_(model, max_norm=max_grad_norm)
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


# ---------------------------------------------------------------------------------------------
# INT8 weight codes (Int8Linear): stepped from register_float_grad_hook
# ---------------------------------------------------------------------------------------------
def int8_mlp():
    model = small_mlp()
    replace_linear_with_int8(model, lambda name: True, group_size=INT8_GROUP)
    return model


class SharedInt8(torch.nn.Module):
    """One Int8Linear applied twice per forward: its float_grad has two contributions."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = torch.nn.Linear(24, 32)
        self.shared = Int8Linear.from_linear(torch.nn.Linear(32, 32), group_size=INT8_GROUP)
        self.out = torch.nn.Linear(32, 10)

    def forward(self, x):
        return self.out(self.shared(torch.tanh(self.shared(torch.tanh(self.inp(x))))))


def make_int8_optimizer(model):
    return QGaLoreAdamW(mlp_param_groups(model, rank=5, update_proj_gap=2, scale=0.25),
                        lr=2e-2, weight_decay=0.05)


def assert_same_training(model, optimizer, expected, expected_optimizer, steps):
    """Codes, scales, zeros, float weights and every state tensor equal, bit for bit."""
    for (name, a), b in zip(model.named_parameters(), expected.parameters()):
        assert torch.equal(a, b), name
    for (name, a), b in zip(model.named_buffers(), expected.buffers()):
        assert torch.equal(a, b), name
    for p, q in zip(model.parameters(), expected.parameters()):
        state, expected_state = optimizer.state[p], expected_optimizer.state[q]
        assert int(state["step"]) == steps  # a skipped weight would have no state
        assert state.keys() == expected_state.keys()
        for key in state:
            torch.testing.assert_close(state[key], expected_state[key], rtol=0, atol=0,
                                       equal_nan=True, msg=key)  # proj_overlap: NaN if unset


INT8_STEPS = 4


@pytest.mark.parametrize("accumulation", [1, ACCUMULATION], ids=lambda a: f"accumulate{a}")
@pytest.mark.parametrize("max_grad_norm", [None, 0.05], ids=["no-clip", "clip"])
@pytest.mark.parametrize("make_model", [int8_mlp, SharedInt8], ids=["mlp", "shared"])
def test_layerwise_int8_weights_equal_ordinary_training(make_model, max_grad_norm, accumulation):
    batches = mlp_batches(accumulation * INT8_STEPS, batch=8)
    expected, expected_optimizer, expected_lrs = ordinary_training(
        batches, max_grad_norm, make_model, make_int8_optimizer, accumulation)

    model = make_model()
    initial_codes = [p.clone() for p in model.parameters() if p.dtype == torch.uint8]
    trainer = layerwise(model, make_int8_optimizer, accumulation_steps=accumulation,
                        max_grad_norm=max_grad_norm, scheduler_factory=make_scheduler)
    lrs = []
    for i, batch in enumerate(batches):
        (mlp_loss(model, batch) / accumulation).backward()
        float_grads = [getattr(p, "float_grad", None) for p in model.parameters()
                       if p.dtype == torch.uint8]
        if i % accumulation == accumulation - 1:  # stepped and freed during this backward
            assert all(g is None for g in float_grads)
            assert all(p.grad is None for p in model.parameters())
            lrs.append(trainer.optimizer.param_groups[1]["lr"])
        else:  # accumulating, as in ordinary training
            assert all(g is not None for g in float_grads)
    assert trainer.optimizer_steps == INT8_STEPS and lrs == expected_lrs
    assert_same_training(model, trainer.optimizer, expected, expected_optimizer, INT8_STEPS)
    codes = [p for p in model.parameters() if p.dtype == torch.uint8]
    assert all(not torch.equal(a, b) for a, b in zip(codes, initial_codes))


def test_remove_restores_ordinary_int8_gradients():
    model = int8_mlp()
    trainer = layerwise(model, make_int8_optimizer)
    codes = [p.clone() for p in model.parameters()]
    trainer.remove()
    mlp_loss(model, mlp_batches(1)[0]).backward()
    assert all(p.float_grad is not None for p in model.parameters() if p.dtype == torch.uint8)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), codes))
    assert not trainer.optimizer.state


# ---------------------------------------------------------------------------------------------
# Activation checkpointing: reentrant segments run their backward as nested graph tasks
# ---------------------------------------------------------------------------------------------
class Checkpointed(torch.nn.Module):
    """``inner`` (a Sequential) run as checkpointed segments of two modules each; ``shared``
    applies the first segment twice (its weights then get gradients in two segments)."""

    def __init__(self, inner, reentrant, shared=False):
        super().__init__()
        self.inner, self.reentrant, self.shared = inner, reentrant, shared
        modules = list(inner)
        self.segments = [torch.nn.Sequential(*modules[i:i + 2]) for i in range(0, len(modules), 2)]

    def forward(self, x):
        if self.reentrant:
            x = x.clone().requires_grad_()  # a reentrant segment needs an input that requires grad
        first, *rest = self.segments
        x = checkpoint(first, x, use_reentrant=self.reentrant)
        if self.shared:  # the first segment again, on 24 of its 40 outputs
            x = checkpoint(first, x[:, :24], use_reentrant=self.reentrant)
        for segment in rest:
            x = checkpoint(segment, x, use_reentrant=self.reentrant)
        return x


def checkpointed(int8, reentrant, shared=False):
    return lambda: Checkpointed(int8_mlp() if int8 else small_mlp(), reentrant, shared)


@pytest.mark.parametrize("accumulation", [1, 2], ids=lambda a: f"accumulate{a}")
@pytest.mark.parametrize("int8", [False, True], ids=["float", "int8"])
@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_layerwise_with_activation_checkpointing_equals_ordinary_training(reentrant, int8,
                                                                           accumulation):
    """Before the output-gradient hook, a reentrant run ended the pass once per segment (the
    scheduler, the micro-batch count and so the stepping decision all went wrong)."""
    make_model, steps = checkpointed(int8, reentrant), 3
    make_opt = make_int8_optimizer if int8 else make_optimizer
    batches = mlp_batches(accumulation * steps, batch=8)
    expected, expected_optimizer, expected_lrs = ordinary_training(
        batches, 0.05, make_model, make_opt, accumulation)

    model = make_model()
    trainer = layerwise(model, make_opt, accumulation_steps=accumulation, max_grad_norm=0.05,
                        scheduler_factory=make_scheduler)
    lrs = []
    for i, batch in enumerate(batches):
        (mlp_loss(model, batch) / accumulation).backward()
        if i % accumulation == accumulation - 1:
            lrs.append(trainer.optimizer.param_groups[1]["lr"])
    assert (trainer.micro_steps, trainer.optimizer_steps) == (len(batches), steps)
    assert lrs == expected_lrs
    assert_same_training(model, trainer.optimizer, expected, expected_optimizer, steps)


def test_weight_shared_across_reentrant_segments_is_an_error_not_a_half_step():
    model = checkpointed(False, reentrant=True, shared=True)()
    layerwise(model, make_optimizer)
    with pytest.raises(RuntimeError, match="use_reentrant=False"):
        mlp_loss(model, mlp_batches(1, batch=8)[0]).backward()


def test_weight_shared_across_non_reentrant_segments_trains_as_ordinary_training():
    make_model, steps = checkpointed(False, reentrant=False, shared=True), 3
    batches = mlp_batches(steps, batch=8)
    expected, expected_optimizer, _ = ordinary_training(batches, None, make_model,
                                                        make_optimizer, 1)
    model = make_model()
    trainer = layerwise(model, make_optimizer, scheduler_factory=make_scheduler)
    for batch in batches:
        mlp_loss(model, batch).backward()
    assert_same_training(model, trainer.optimizer, expected, expected_optimizer, steps)


def test_gradient_penalty_graph_is_not_a_pass():
    """torch.autograd.grad (here of a gradient penalty, create_graph=True) runs the output hook
    but accumulates no parameter gradient: it must not count as a micro-batch."""
    batches = mlp_batches(ACCUMULATION * 2, batch=8)

    def penalized_loss(model, batch):
        x = batch[0].clone().requires_grad_()
        loss = mlp_loss(model, (x, batch[1]))
        (gx,) = torch.autograd.grad(loss, x, create_graph=True)
        return (loss + gx.pow(2).sum()) / ACCUMULATION

    expected = small_mlp()
    optimizer = make_optimizer(expected)
    for start in range(0, len(batches), ACCUMULATION):
        for batch in batches[start:start + ACCUMULATION]:
            penalized_loss(expected, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    model = small_mlp()
    trainer = layerwise(model, make_optimizer, accumulation_steps=ACCUMULATION)
    for batch in batches:
        penalized_loss(model, batch).backward()
    assert (trainer.micro_steps, trainer.optimizer_steps) == (len(batches), 2)
    for a, b in zip(model.parameters(), expected.parameters()):
        assert torch.equal(a, b)


def test_a_backward_that_raised_does_not_break_the_next_passes():
    model = small_mlp()
    trainer = layerwise(model, make_optimizer)
    batch = mlp_batches(1, batch=8)[0]

    def fail(grad):
        raise ValueError("boom")

    out = model(batch[0])
    out.register_hook(fail)
    with pytest.raises(ValueError, match="boom"):
        torch.nn.functional.cross_entropy(out, batch[1]).backward()
    for expected_steps in (1, 2):  # each later pass steps every weight once and counts once
        mlp_loss(model, batch).backward()
        assert trainer.optimizer_steps == expected_steps
        assert all(p.grad is None for p in model.parameters())


def test_remove_also_stops_counting_outputs_made_before():
    model = small_mlp()
    trainer = layerwise(model, make_optimizer, scheduler_factory=make_scheduler)
    loss = mlp_loss(model, mlp_batches(1, batch=8)[0])
    trainer.remove()
    loss.backward()
    assert (trainer.micro_steps, trainer.optimizer_steps) == (0, 0)
    assert all(p.grad is not None for p in model.parameters())


def test_compiled_model_trains_layerwise():
    """torch.compile(fullgraph=True) of the model: the output hook stays out of the graph."""
    batches = mlp_batches(3, batch=8)
    expected, _, _ = ordinary_training(batches, None, accumulation=1)
    model = small_mlp()
    trainer = layerwise(model, make_optimizer, scheduler_factory=make_scheduler)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    for batch in batches:
        mlp_loss(compiled, batch).backward()
    assert trainer.optimizer_steps == 3
    for a, b in zip(model.parameters(), expected.parameters()):
        torch.testing.assert_close(a, b)


def test_compiled_model_recovers_from_a_backward_that_raised():
    """Under compile no output hook exists: a failed pass is recognised by its graph task."""
    model = small_mlp()
    trainer = layerwise(model, make_optimizer)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    batch = mlp_batches(1, batch=8)[0]
    first = model[0].weight

    def fail_once(p):
        first_hook.remove()
        raise ValueError("boom")

    first_hook = first.register_post_accumulate_grad_hook(fail_once)  # after the trainer's hook
    with pytest.raises(ValueError, match="boom"):
        mlp_loss(compiled, batch).backward()
    for expected_steps in (1, 2):
        mlp_loss(compiled, batch).backward()
        assert trainer.optimizer_steps == expected_steps
        assert all(p.grad is None for p in model.parameters())


def test_a_forward_the_trainer_cannot_see_is_warned_about():
    model = small_mlp()
    layerwise(model, make_optimizer)
    x, y = mlp_batches(1, batch=8)[0]
    with pytest.warns(UserWarning, match="without a forward of the model"):
        torch.nn.functional.cross_entropy(model.forward(x), y).backward()
