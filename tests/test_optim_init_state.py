"""LowRankAdamW.init_state: the state a first step allocates, allocated without a gradient and
without computing a projection (on CPU and on the meta device), changing no later step."""

import pytest
import torch
from cases import mlp_batches, mlp_loss, mlp_param_groups, small_mlp

import lowrank_kernels as lk
from lowrank_kernels.autograd import replace_linear_with_int8
from lowrank_kernels.optim import (
    DCTAdamW,
    GaLoreAdamW,
    LowRankAdagrad,
    LowRankAdamW,
    QGaLoreAdamW,
)

pytestmark = [pytest.mark.skipif(not lk.EXTENSION_AVAILABLE, reason="extension not built"),
              pytest.mark.usefixtures("one_thread")]

# (optimizer, group keys): every projector and both storage widths; the lazy policy refreshes
# every 2 steps at first, so the runs below cross refreshes that measure the subspace overlap
CONFIGS = {
    "galore-svd": (GaLoreAdamW, dict(rank=6, update_proj_gap=2)),
    "qgalore-int4-lazy": (QGaLoreAdamW, dict(rank=6, update_proj_gap=2, proj_group_size=16)),
    "dct": (DCTAdamW, dict(rank=6)),
    "rsvd": (LowRankAdamW, dict(rank=6, update_proj_gap=2, projection="rsvd")),
    "random": (LowRankAdamW, dict(rank=6, update_proj_gap=2, projection="random",
                                  refresh="lazy")),
    "galore-bf16-moments": (GaLoreAdamW, dict(rank=6, update_proj_gap=2,
                                              state_dtype=torch.bfloat16)),
    "galore-8bit-moments": (GaLoreAdamW, {"rank": 6, "update_proj_gap": 2,
                                          "state_dtype": "8bit"}),
    "adagrad": (LowRankAdagrad, {"rank": 6, "update_proj_gap": 2}),
    "adagrad-8bit-dct": (LowRankAdagrad, {"rank": 6, "projection": "dct", "state_dtype": "8bit"}),
}


def _train(cls, group_keys, steps, init_first):
    model = small_mlp(seed=3)
    optimizer = cls(mlp_param_groups(model, scale=0.25, **group_keys), lr=1e-2)
    if init_first:
        for p in model.parameters():
            optimizer.init_state(p)
    for batch in mlp_batches(steps):
        optimizer.zero_grad()
        mlp_loss(model, batch).backward()
        optimizer.step()
    return model, optimizer


@pytest.mark.parametrize("steps", [1, 5])  # 1: the zero basis must not count as an old one
@pytest.mark.parametrize("config", list(CONFIGS))
def test_init_state_then_steps_equal_steps_alone_bit_for_bit(config, steps):
    cls, keys = CONFIGS[config]
    plain, plain_opt = _train(cls, keys, steps=steps, init_first=False)
    early, early_opt = _train(cls, keys, steps=steps, init_first=True)
    for (name, a), b in zip(plain.named_parameters(), early.parameters()):
        assert torch.equal(a, b), name
        sa, sb = plain_opt.state[a], early_opt.state[b]
        assert sa.keys() == sb.keys(), name
        for key in sa:
            assert torch.equal(sa[key], sb[key]) or (sa[key].isnan().all() and
                                                     sb[key].isnan().all()), (name, key)


def _layout(state):
    return {k: (tuple(v.shape), v.dtype) for k, v in state.items()}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_init_state_allocates_what_the_first_step_holds(config, device):
    cls, keys = CONFIGS[config]
    stepped, stepped_opt = _train(cls, keys, steps=1, init_first=False)
    with torch.device(device):
        model = small_mlp(seed=3)
    optimizer = cls(mlp_param_groups(model, scale=0.25, **keys), lr=1e-2)
    for p, q in zip(stepped.parameters(), model.parameters()):
        state = optimizer.init_state(q)
        assert state is optimizer.state[q]
        assert _layout(state) == _layout(stepped_opt.state[p])
        assert all(t.device.type == (device if t.dim() else "cpu") for t in state.values())
        assert int(state["step"]) == 0
        if "proj_last_refresh" in state:  # never refreshed: the first step computes the basis
            assert int(state["proj_last_refresh"]) == -1 and int(state["proj_refreshes"]) == 0


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_init_state_of_int8_weight_codes(device):
    """Q-GaLore with INT8 weights (Int8Linear): the codes' state is that of a real first step."""
    def build(dev):
        with torch.device(dev):
            model = small_mlp(seed=3)
        replace_linear_with_int8(model, lambda name: name in ("0", "2"), group_size=16)
        return model

    def groups(model):
        codes = [p for p in model.parameters() if p.dtype == torch.uint8]
        rest = [p for p in model.parameters() if p.dtype != torch.uint8]
        return [{"params": rest}, {"params": codes, "rank": 6, "proj_group_size": 16}]

    real = build("cpu")
    real_opt = QGaLoreAdamW(groups(real), lr=1e-2)
    for batch in mlp_batches(1):
        mlp_loss(real, batch).backward()
    real_opt.step()
    model = build(device)
    optimizer = QGaLoreAdamW(groups(model), lr=1e-2)
    for p, q in zip(real.parameters(), model.parameters()):
        assert _layout(optimizer.init_state(q)) == _layout(real_opt.state[p])


def test_init_state_of_a_foreign_parameter_is_an_error():
    model = small_mlp()
    optimizer = GaLoreAdamW(mlp_param_groups(model, rank=4), lr=1e-2)
    with pytest.raises(ValueError, match="not a parameter of this optimizer"):
        optimizer.init_state(torch.nn.Parameter(torch.zeros(3, 3)))
