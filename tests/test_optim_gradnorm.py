"""GradNormLoRPAdamW: 20 steps through the optimizer (the fused kernel of every backend) against
the authors' update rules restated in fp32 (tests/test_reference_gradnorm.py), state, checkpoints,
layer-wise stepping and the refusals (INT8 weights, FSDP2)."""

import importlib.util
import os

import pytest
import torch
from cases import (
    assert_8bit_moments_train_like_fp32_moments,
    assert_fp32_close,
    assert_resumes_bit_for_bit,
    mlp_batches,
    mlp_loss,
    mlp_param_groups,
    save_load,
    small_mlp,
    train_steps,
)
from test_reference_gradnorm import GAP, HYPER, STEPS, AuthorsRule

import lowrank_kernels as lk
from lowrank_kernels import distributed
from lowrank_kernels.optim import GradNormLoRPAdamW, layerwise

pytestmark = [pytest.mark.skipif(not lk.EXTENSION_AVAILABLE, reason="extension not built"),
              pytest.mark.usefixtures("one_thread")]
ROW_KEYS = ("row_scale", "row_norm", "scale_exp_avg", "scale_exp_avg_sq")
TRITON_ON_CPU = (importlib.util.find_spec("triton") is not None
                 and os.environ.get("TRITON_INTERPRET") == "1")


def _optimizer(weight, rank, backend=None, **options):
    group = {"params": [weight], "rank": rank, "update_proj_gap": GAP, "scale": HYPER["scale"],
             "proj_type": "std"}
    return GradNormLoRPAdamW([group], lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]),
                             eps=HYPER["eps"], weight_decay=HYPER["weight_decay"],
                             backend=backend, **options)


def _parity(m, n, rank, backend, steps=STEPS):
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(m, n, generator=gen) * torch.linspace(0.5, 2.0, m).unsqueeze(1)
    authors = AuthorsRule(w0, rank)
    weight = torch.nn.Parameter(w0.clone())
    optimizer = _optimizer(weight, rank, backend)
    for _ in range(steps):
        # the gradient a forward pass through the current W would give, plus a row-scale push
        grad = torch.randn(m, n, generator=gen) + 0.3 * weight.detach()
        expected = authors.step(grad)
        weight.grad = grad
        optimizer.step()
        state = optimizer.state[weight]
        assert_fp32_close(weight.detach(), expected)
        assert_fp32_close(state["row_scale"], authors.g.squeeze(1))
        assert_fp32_close(state["row_norm"], torch.linalg.vector_norm(authors.v, dim=1))
    assert_fp32_close(state["exp_avg"], authors.moments[0], rtol=1e-4)
    assert_fp32_close(state["scale_exp_avg_sq"], authors.moments[3].squeeze(1), rtol=1e-4)
    assert int(state["proj_refreshes"]) == -(-steps // GAP)
    # a real comparison: g ≠ ‖v‖ by far more than the tolerance, and W moved
    assert (state["row_scale"] - state["row_norm"]).abs().max() > 1e-4 * state["row_norm"].max()
    assert (weight.detach() - w0).abs().max() > 0.05


@pytest.mark.parametrize("m,n,rank", [(40, 24, 5), (24, 40, 5), (16, 16, 16)],
                         ids=["right", "left", "full-rank"])
def test_twenty_steps_follow_the_authors_rules_cpu_kernel(m, n, rank):
    """torch.ops.lowrank.fused_gradnorm_step (the C++ kernel on CPU tensors), with the SVD
    refreshes of the optimizer (of G; the authors take it of ∇v = G·g/‖v‖, equal up to
    rounding), decay 0.1, against the authors' step with their full v."""
    _parity(m, n, rank, backend=None)


@pytest.mark.skipif(not TRITON_ON_CPU, reason="needs triton and its interpreter")
@pytest.mark.parametrize("m,n,rank", [(40, 24, 5), (24, 40, 5)], ids=["right", "left"])
def test_twenty_steps_follow_the_authors_rules_triton_kernel(m, n, rank):
    _parity(m, n, rank, backend="triton")


def test_reference_backend_follows_the_authors_rules():
    _parity(24, 40, 5, backend="reference", steps=8)


def _make(model, **options):
    return GradNormLoRPAdamW(mlp_param_groups(model, rank=4, update_proj_gap=3, scale=0.25),
                             lr=1e-2, weight_decay=0.05, **options)


def test_state_and_checkpoint_resume_bit_for_bit():
    """State: LowRankAdamW's plus the four fp32 row tensors; a weights_only checkpoint halfway
    resumes bit for bit (cases.assert_resumes_bit_for_bit), bf16 moments included."""
    batches = mlp_batches(6)
    _, optimizer = assert_resumes_bit_for_bit(_make, batches)
    for group in optimizer.param_groups[1:]:
        for p in group["params"]:
            state = optimizer.state[p]
            for key in ROW_KEYS:
                assert state[key].dtype == torch.float32 and state[key].shape == (p.shape[0],)
    assert_resumes_bit_for_bit(lambda m: _make(m, state_dtype=torch.bfloat16), batches)
    saved = save_load(optimizer.state_dict())
    assert all(key in saved["state"][len(optimizer.param_groups[0]["params"])]
               for key in ROW_KEYS)


def test_8bit_moments_resume_bit_for_bit_and_train_like_fp32_moments():
    """state_dtype="8bit" (DESIGN.md §4.9): int8/uint8 codes with fp32 block scales beside the
    row states, a weights_only checkpoint resumes bit for bit, and 40 steps of the small MLP
    follow the fp32-moment loss curve (mean relative gap below 3 %)."""
    _, optimizer = assert_resumes_bit_for_bit(lambda m: _make(m, state_dtype="8bit"),
                                              mlp_batches(6))
    state = optimizer.state[optimizer.param_groups[1]["params"][0]]
    assert state["exp_avg"].dtype == torch.int8 and state["exp_avg_sq"].dtype == torch.uint8
    assert state["exp_avg_scales"].dtype == torch.float32 and "exp_avg_sq_scales" in state
    assert all(state[key].dtype == torch.float32 for key in ROW_KEYS)
    assert_8bit_moments_train_like_fp32_moments(lambda model, state_dtype: GradNormLoRPAdamW(
        mlp_param_groups(model, rank=8, update_proj_gap=10), lr=1e-2, state_dtype=state_dtype))


def test_init_state_then_steps_equal_steps_alone():
    """init_state allocates (and initialises from the weight) what the first step would, so
    training after it is the training without it, bit for bit."""
    batches = mlp_batches(2)
    model_a, model_b = small_mlp(), small_mlp()
    ahead, eager = _make(model_a), _make(model_b)
    for p in model_a.parameters():
        ahead.init_state(p)
    train_steps(model_a, ahead, batches)
    train_steps(model_b, eager, batches)
    for p, q in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(p, q)
        assert ahead.state[p].keys() == eager.state[q].keys()
        for key, value in eager.state[q].items():
            assert torch.equal(ahead.state[p][key], value) or value.isnan().all(), key


def test_layerwise_equals_ordinary_training():
    batches = mlp_batches(4)
    model = small_mlp()
    ordinary = _make(model)
    train_steps(model, ordinary, batches)
    layer_model = small_mlp()
    trainer = layerwise(layer_model, _make)
    for batch in batches:
        mlp_loss(layer_model, batch).backward()
    for a, b in zip(layer_model.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)
    p = list(layer_model.parameters())[-2]  # the 10×32 weight (left side)
    assert torch.equal(trainer.optimizer.state[p]["row_norm"],
                       ordinary.state[list(model.parameters())[-2]]["row_norm"])


@pytest.mark.parametrize("projection,bits", [("dct", 16), ("svd", 4), ("random", 16)])
def test_every_projection_format_trains(projection, bits):
    """DCT indices, a packed INT4 basis and a random basis reach the fused op in their formats:
    the loss falls, and the weights equal the reference backend's within fp32 rounding."""
    batches = mlp_batches(8)
    losses, finals = {}, {}
    for backend in (None, "reference"):
        model = small_mlp()
        options = {"projection": projection, "proj_bits": bits, "backend": backend}
        if projection == "dct":
            options["update_proj_gap"] = 1
        optimizer = GradNormLoRPAdamW(mlp_param_groups(model, rank=4, scale=0.25), lr=1e-2,
                                      **options)
        before = mlp_loss(model, batches[0]).item()
        train_steps(model, optimizer, batches)
        losses[backend] = (before, mlp_loss(model, batches[0]).item())
        finals[backend] = [p.detach().clone() for p in model.parameters()]
    assert losses[None][1] < losses[None][0]
    for a, b in zip(finals[None], finals["reference"], strict=True):
        assert_fp32_close(a, b, rtol=1e-4)


def test_int8_weights_and_fsdp2_weights_are_refused(monkeypatch):
    codes = torch.zeros(8, 4, dtype=torch.uint8)
    codes.scales, codes.zeros = torch.ones(1), torch.zeros(1)
    with pytest.raises(ValueError, match=r"parameter 'w'.*INT8 weight codes cannot be trained"):
        GradNormLoRPAdamW([{"params": [codes], "names": ["w"], "rank": 2}])
    weight = torch.nn.Parameter(torch.randn(8, 4))
    monkeypatch.setattr(distributed, "is_sharded", lambda p: p is weight)
    monkeypatch.setattr(distributed, "check_sharded_param", lambda p, name: None)
    with pytest.raises(ValueError, match=r"parameter 'w'.*does not support FSDP2"):
        GradNormLoRPAdamW([{"params": [weight], "names": ["w"], "rank": 2}])


def test_unknown_keys_and_bad_values_raise():
    with pytest.raises(ValueError, match="unknown key 'rnak'"):
        GradNormLoRPAdamW([{"params": [torch.nn.Parameter(torch.randn(8, 4))], "rnak": 2}])
    with pytest.raises(ValueError, match="rank"):
        GradNormLoRPAdamW([{"params": [torch.nn.Parameter(torch.randn(8, 4))], "rank": 9}])
