"""torch.compile and LowRankAdamW.step: a compiled step gives the eager result bit for bit, and a
scheduled lr and the step count cause no recompilation.

The step runs eagerly inside a compiled region (LowRankAdamW._step_projected / _step_dense are
``torch.compiler.disable``): the fused op takes ``lr`` as a Python float, and PT2 specializes a
traced custom op on its float arguments (there is no symbolic float in an op schema), so a traced
step would recompile at every scheduler step (one graph per lr, until the recompile limit).
"""

import pytest
import torch
from cases import mlp_batches, mlp_loss, mlp_param_groups, small_mlp
from torch._dynamo.testing import CompileCounter

import lowrank_kernels as lk
from lowrank_kernels.optim import DCTAdamW, GaLoreAdamW, QGaLoreAdamW

pytestmark = pytest.mark.skipif(not lk.EXTENSION_AVAILABLE, reason="extension not built")

PRESETS = [GaLoreAdamW, DCTAdamW, QGaLoreAdamW]
PRESET_IDS = ["galore", "dct-int32-proj", "qgalore-int4-proj"]


def one_layer(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(24, 10))  # a 10×24 weight (left) and a bias


def run(preset, compile_step: bool):
    model = one_layer()
    optimizer = preset([{"params": [model[0].bias]},
                        {"params": [model[0].weight], "rank": 4, "update_proj_gap": 2,
                         "scale": 0.25, "proj_type": "std"}], lr=1e-2, weight_decay=0.1,
                       dense_adamw="galore")
    step = torch.compile(optimizer.step, backend="eager") if compile_step else optimizer.step
    for batch in mlp_batches(5):
        optimizer.zero_grad()
        mlp_loss(model, batch).backward()
        step()
    return model, optimizer


@pytest.mark.parametrize("preset", PRESETS, ids=PRESET_IDS)
def test_compiled_step_matches_eager_bit_for_bit(preset):
    torch._dynamo.reset()
    eager_model, eager = run(preset, False)
    compiled_model, compiled = run(preset, True)
    for a, b in zip(compiled_model.parameters(), eager_model.parameters()):
        assert torch.equal(a, b)
    weight = compiled_model[0].weight
    # steps 0, 2, 4 (the lazy policy of QGaLoreAdamW starts with the same gap)
    assert int(compiled.state[weight]["proj_refreshes"]) == 3
    assert torch.equal(compiled.state[weight]["exp_avg"],
                       eager.state[eager_model[0].weight]["exp_avg"])


def training_step(model, optimizer):
    def step(batch):
        loss = mlp_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss

    return step


@pytest.mark.parametrize("preset,dense_adamw", [
    (GaLoreAdamW, "galore"), (GaLoreAdamW, "torch"), (DCTAdamW, "torch"), (QGaLoreAdamW, "torch")],
    ids=["galore", "galore-dense-torch", "dct-int32-proj", "qgalore-int4-proj"])
def test_a_scheduled_lr_and_the_step_count_do_not_recompile(preset, dense_adamw):
    """A compiled training step (forward, backward, optimizer.step) over 6 steps of a LambdaLR
    schedule: the first call compiles, the next 5 (5 new lr values, steps 2-6, a refresh at
    steps 2 and 4) compile nothing (error_on_recompile), and the result is the eager one."""
    results = []
    for compiled in (True, False):
        torch._dynamo.reset()
        model = small_mlp()
        optimizer = preset(mlp_param_groups(model, rank=4, update_proj_gap=2, scale=0.25),
                           lr=1e-2, weight_decay=0.1, dense_adamw=dense_adamw)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
        counter = CompileCounter()
        step = training_step(model, optimizer)
        step = torch.compile(step, backend=counter) if compiled else step
        lrs = []
        for i, batch in enumerate(mlp_batches(6)):
            with torch._dynamo.config.patch(error_on_recompile=i > 0):
                step(batch)
            if i == 0:
                first_frames = counter.frame_count
            lrs.append(optimizer.param_groups[1]["lr"])
            scheduler.step()
        if compiled:
            assert first_frames >= 1  # the forward was compiled
            assert counter.frame_count == first_frames
            assert len(set(lrs)) == 6
        results.append(model)
    for a, b in zip(*(m.parameters() for m in results)):
        assert torch.equal(a, b)
