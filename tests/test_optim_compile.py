"""torch.compile of LowRankAdamW.step: the fused op is traced into a graph (through its fake
kernel) and the compiled step gives the eager result bit for bit, refreshes included."""

import pytest
import torch
from cases import mlp_batches, mlp_loss

import lowrank_kernels as lk
from lowrank_kernels.optim import DCTAdamW, GaLoreAdamW, QGaLoreAdamW

pytestmark = pytest.mark.skipif(not lk.EXTENSION_AVAILABLE, reason="extension not built")


def one_layer(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(24, 10))  # a 10×24 weight (left) and a bias


def run(preset, compile_step: bool, recorded_ops: set):
    def recording_backend(gm, example_inputs):
        recorded_ops.update(str(node.target) for node in gm.graph.nodes
                            if node.op == "call_function")
        return gm.forward

    model = one_layer()
    optimizer = preset([{"params": [model[0].bias]},
                        {"params": [model[0].weight], "rank": 4, "update_proj_gap": 2,
                         "scale": 0.25, "proj_type": "std"}], lr=1e-2, weight_decay=0.1,
                       # the bias takes galore-torch's AdamW formula in every preset: torch's own
                       # AdamW, traced by dynamo, is not bit-identical to its eager kernels
                       dense_adamw="galore")
    step = torch.compile(optimizer.step, backend=recording_backend) if compile_step \
        else optimizer.step
    for batch in mlp_batches(5):
        optimizer.zero_grad()
        mlp_loss(model, batch).backward()
        step()
    return model, optimizer


@pytest.mark.parametrize("preset", [GaLoreAdamW, DCTAdamW, QGaLoreAdamW],
                         ids=["galore", "dct-int32-proj", "qgalore-int4-proj"])
def test_compiled_step_matches_eager_and_traces_the_fused_op(preset):
    torch._dynamo.reset()
    recorded = set()
    eager_model, eager = run(preset, False, set())
    compiled_model, compiled = run(preset, True, recorded)
    assert "lowrank.fused_galore_step" in recorded
    for a, b in zip(compiled_model.parameters(), eager_model.parameters()):
        assert torch.equal(a, b)
    weight = compiled_model[0].weight
    # steps 0, 2, 4 (the lazy policy of QGaLoreAdamW starts with the same gap)
    assert int(compiled.state[weight]["proj_refreshes"]) == 3
    assert torch.equal(compiled.state[weight]["exp_avg"],
                       eager.state[eager_model[0].weight]["exp_avg"])
