"""state_dtype="8bit" (DESIGN.md §4.9): LowRankAdamW and its presets keep the projected moments
as FP8-like codes with fp32 block scales in the state, step them in the fused op, save and resume
them bit for bit, and train like fp32 moments."""

import pytest
import torch
from cases import (
    assert_8bit_moments_train_like_fp32_moments,
    assert_int8_qgalore_trains,
    assert_resumes_bit_for_bit,
    mlp_batches,
    mlp_param_groups,
    small_mlp,
    train_steps,
)

import lowrank_kernels as lk
from lowrank_kernels import reference
from lowrank_kernels.optim import (
    STATE_DTYPES,
    DCTAdamW,
    GaLoreAdamW,
    LowRankAdagrad,
    QGaLoreAdamW,
)

pytestmark = [pytest.mark.skipif(not lk.EXTENSION_AVAILABLE, reason="extension not built"),
              pytest.mark.usefixtures("one_thread")]

PRESETS = {"galore": GaLoreAdamW, "qgalore-int4": QGaLoreAdamW, "dct": DCTAdamW}


@pytest.mark.parametrize("rank", [4, 40])
def test_state_holds_codes_and_block_scales_per_32_ranks(rank):
    """Codes in the moments' low-rank shape, one fp32 scale per 32 ranks of an own-line: rows of
    m×r on the right side, columns of r×n on the left (scales n×⌈r/32⌉)."""
    torch.manual_seed(0)
    right, left = torch.nn.Linear(48, 64), torch.nn.Linear(64, 48)  # weights 64×48, 48×64
    params = [right.weight, left.weight]
    optimizer = GaLoreAdamW([{"params": params, "rank": rank}], lr=1e-2, state_dtype="8bit")
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    blocks = -(-rank // 32)
    for p, shape, scales in ((params[0], (64, rank), (64, blocks)),
                             (params[1], (rank, 64), (64, blocks))):
        state = optimizer.state[p]
        assert state["exp_avg"].dtype == torch.int8 and state["exp_avg"].shape == shape
        assert state["exp_avg_sq"].dtype == torch.uint8 and state["exp_avg_sq"].shape == shape
        for name in ("exp_avg_scales", "exp_avg_sq_scales"):
            assert state[name].dtype == torch.float32 and state[name].shape == scales
            assert (state[name] > 0).all()
    assert "8bit" in STATE_DTYPES


def test_the_step_is_the_reference_step_on_the_stored_codes():
    """One step of the optimizer equals reference.fused_galore_step on the state before it (the
    same codes and scales, the same seed and step): weights by the fp32 rule, and the stored
    moments decode within one grid step of the reference's."""
    model = small_mlp()
    optimizer = GaLoreAdamW(mlp_param_groups(model, rank=4, update_proj_gap=10), lr=1e-2,
                            state_dtype="8bit")
    batches = mlp_batches(3)
    train_steps(model, optimizer, batches[:2])
    weight = model[0].weight  # 40×24: right side
    state = optimizer.state[weight]
    before = {k: v.clone() for k, v in state.items()}
    ref = {k: v.clone() for k, v in state.items()}  # stepped by the reference below
    w = weight.detach().clone()
    train_steps(model, optimizer, batches[2:])
    reference.fused_galore_step(w, weight.grad, ref["proj"], ref["exp_avg"], ref["exp_avg_sq"],
                                lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.0,
                                scale=1.0, step=3, seed=int(state["proj_seed"]) % 2**31,
                                exp_avg_scales=ref["exp_avg_scales"],
                                exp_avg_sq_scales=ref["exp_avg_sq_scales"])
    torch.testing.assert_close(weight.detach(), w, rtol=1e-5, atol=1e-7)
    for name in ("exp_avg", "exp_avg_sq"):
        assert (state[name] == ref[name]).float().mean() > 0.95, name
        assert not torch.equal(state[name], before[name]), name
    torch.testing.assert_close(state["exp_avg_sq_scales"], ref["exp_avg_sq_scales"])


@pytest.mark.parametrize("preset", list(PRESETS))
def test_state_dict_round_trip_resumes_bit_for_bit(preset):
    cls = PRESETS[preset]

    def make(model):
        return cls(mlp_param_groups(model, rank=4, update_proj_gap=2, proj_group_size=16),
                   lr=1e-2, weight_decay=0.1, state_dtype="8bit")

    _, optimizer = assert_resumes_bit_for_bit(make, mlp_batches(6))
    state = optimizer.state[optimizer.param_groups[1]["params"][0]]
    assert state["exp_avg"].dtype == torch.int8 and "exp_avg_sq_scales" in state


def test_int8_weight_codes_with_8bit_moments_train():
    """Q-GaLore's smallest state: INT8 weights, INT4 basis, 8-bit moments, one fused call."""
    codes, optimizer = assert_int8_qgalore_trains(state_dtype="8bit")
    assert optimizer.state[codes[0]]["exp_avg"].dtype == torch.int8


@pytest.mark.parametrize("cls", [GaLoreAdamW, LowRankAdagrad], ids=lambda c: c.__name__)
def test_8bit_moments_train_like_fp32_moments(cls):
    """40 steps of the small MLP on 4 repeated batches (rank 8, refresh every 10): the loss
    curve of 8-bit moments follows that of fp32 moments (mean relative gap below 3 %), and
    both learn."""
    lr = 1e-2 if cls is GaLoreAdamW else 5e-2
    assert_8bit_moments_train_like_fp32_moments(lambda model, state_dtype: cls(
        mlp_param_groups(model, rank=8, update_proj_gap=10), lr=lr, state_dtype=state_dtype))


def test_an_unknown_state_dtype_names_the_choices():
    with pytest.raises(ValueError, match="state_dtype: expected one of .*'8bit'"):
        GaLoreAdamW(mlp_param_groups(small_mlp(), rank=4), state_dtype="fp8")
