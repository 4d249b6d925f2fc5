"""LowRankAdamW and GaLoreAdamW: parity with galore-torch, checkpoints, refresh, SVD fallback."""

import warnings

import pytest
import torch
from cases import (
    assert_fp32_close,
    assert_resumes_bit_for_bit,
    mlp_batches,
    mlp_loss,
    mlp_param_groups,
    save_load,
    small_mlp,
    train_steps,
)

import lowrank_kernels as lk
from lowrank_kernels.optim import DCTAdamW, GaLoreAdamW, LowRankAdamW, QGaLoreAdamW
from lowrank_kernels.projection import LazyRefresh, SVDFallbackWarning, subspace_overlap
from lowrank_kernels.projection.svd import top_singular_columns

pytestmark = [pytest.mark.skipif(not lk.EXTENSION_AVAILABLE, reason="extension not built"),
              pytest.mark.usefixtures("one_thread")]


GALORE_KEYS = dict(rank=6, update_proj_gap=10, scale=0.25, proj_type="std")


# ---------------------------------------------------------------------------------------------
# galore-torch parity
# ---------------------------------------------------------------------------------------------
def test_galore_adamw_matches_galore_torch_for_30_steps():
    """Same SVD of the same gradient -> same trajectory: 30 steps, refreshes at steps 0, 10, 20,
    weight decay on, both projection sides, biases through galore-torch's own AdamW formula."""
    galore_torch = pytest.importorskip("galore_torch")
    theirs_model, ours_model = small_mlp(), small_mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        theirs = galore_torch.GaLoreAdamW(mlp_param_groups(theirs_model, **GALORE_KEYS),
                                          lr=1e-2, weight_decay=0.1)
    ours = GaLoreAdamW(mlp_param_groups(ours_model, **GALORE_KEYS), lr=1e-2, weight_decay=0.1)
    weights = [p for n, p in ours_model.named_parameters() if n.endswith("weight")]
    their_weights = [p for n, p in theirs_model.named_parameters() if n.endswith("weight")]
    for step, batch in enumerate(mlp_batches(30)):
        train_steps(theirs_model, theirs, [batch])
        train_steps(ours_model, ours, [batch])
        for a, b in zip(ours_model.parameters(), theirs_model.parameters()):
            assert_fp32_close(a.detach(), b.detach())
        if step % 10 == 0:  # a refresh just happened: same basis, same moments
            for p, q in zip(weights, their_weights):
                assert_fp32_close(ours.state[p]["proj"], theirs.state[q]["projector"].ortho_matrix)
                assert_fp32_close(ours.state[p]["exp_avg"], theirs.state[q]["exp_avg"])
    for p in weights:
        assert int(ours.state[p]["proj_refreshes"]) == 3
        assert int(ours.state[p]["proj_last_refresh"]) == 20
    # the run moved the weights well beyond the tolerance, so the comparison could fail
    assert (weights[0] - small_mlp()[0].weight).abs().max() > 1e-2


def test_correct_bias_false_matches_galore_torch():
    galore_torch = pytest.importorskip("galore_torch")
    theirs_model, ours_model = small_mlp(), small_mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        theirs = galore_torch.GaLoreAdamW(mlp_param_groups(theirs_model, **GALORE_KEYS),
                                          lr=1e-2, weight_decay=0.1, correct_bias=False)
    ours = GaLoreAdamW(mlp_param_groups(ours_model, **GALORE_KEYS), lr=1e-2, weight_decay=0.1,
                       correct_bias=False)
    batches = mlp_batches(5)
    train_steps(theirs_model, theirs, batches)
    train_steps(ours_model, ours, batches)
    for a, b in zip(ours_model.parameters(), theirs_model.parameters()):
        assert_fp32_close(a.detach(), b.detach())


def test_dense_params_follow_torch_adamw_by_default():
    """Without rank, LowRankAdamW is torch.optim.AdamW (its kernels, its ε and decay order)."""
    ours_model, torch_model = small_mlp(), small_mlp()
    ours = LowRankAdamW(ours_model.parameters(), lr=1e-2, eps=1e-8, weight_decay=0.1)
    theirs = torch.optim.AdamW(torch_model.parameters(), lr=1e-2, eps=1e-8, weight_decay=0.1)
    batches = mlp_batches(4)
    train_steps(ours_model, ours, batches)
    train_steps(torch_model, theirs, batches)
    for a, b in zip(ours_model.parameters(), torch_model.parameters()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------
RESUME_CONFIGS = {  # name -> (optimizer class, group keys)
    "svd-fixed": (LowRankAdamW, dict(projection="svd", update_proj_gap=3)),
    "rsvd-lazy": (LowRankAdamW, dict(projection="rsvd", update_proj_gap=2, refresh="lazy",
                                     refresh_threshold=0.5)),
    "random-fixed": (LowRankAdamW, dict(projection="random", update_proj_gap=4, seed=7)),
    "DCTAdamW": (DCTAdamW, {}),  # indices re-chosen every step
    "QGaLoreAdamW": (QGaLoreAdamW, dict(update_proj_gap=2)),  # INT4 basis, lazy refresh
    # bf16 moments: stochastically rounded, the stream keyed by (seed, step) resumes too
    "svd-bf16-moments": (LowRankAdamW, dict(update_proj_gap=3, state_dtype=torch.bfloat16)),
}


@pytest.mark.parametrize("dense_adamw", ["torch", "galore"])
@pytest.mark.parametrize("config", list(RESUME_CONFIGS), ids=str)
def test_state_dict_round_trip_resumes_bit_for_bit(config, dense_adamw):
    optimizer_cls, keys = RESUME_CONFIGS[config]

    def make(model):
        groups = mlp_param_groups(model, rank=5, scale=0.25, **keys)
        return optimizer_cls(groups, lr=1e-2, weight_decay=0.05, dense_adamw=dense_adamw)

    assert_resumes_bit_for_bit(make, mlp_batches(12))


def test_load_state_dict_keeps_fp32_moments_and_int_counters_of_bf16_weights():
    model = small_mlp(dtype=torch.bfloat16)
    optimizer = LowRankAdamW(mlp_param_groups(model, rank=4, update_proj_gap=2), lr=1e-2,
                             state_dtype=torch.float32)
    batches = mlp_batches(3, dtype=torch.bfloat16)
    train_steps(model, optimizer, batches)
    saved = save_load(optimizer.state_dict())
    fresh = LowRankAdamW(mlp_param_groups(model, rank=4, update_proj_gap=2), lr=1e-2)
    fresh.load_state_dict(saved)
    state = fresh.state[model[0].weight]
    assert state["exp_avg"].dtype == torch.float32
    assert state["proj"].dtype == torch.bfloat16
    assert state["proj_last_refresh"].dtype == torch.int64
    assert torch.equal(state["exp_avg"], optimizer.state[model[0].weight]["exp_avg"])
    # stepping the loaded optimizer never writes into the loaded dict
    before = saved["state"][0]["step"].clone() if 0 in saved["state"] else None
    train_steps(model, fresh, batches[:1])
    if before is not None:
        assert torch.equal(saved["state"][0]["step"], before)


# ---------------------------------------------------------------------------------------------
# refresh policy
# ---------------------------------------------------------------------------------------------
def test_subspace_overlap_is_sign_and_rotation_invariant():
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(30, 6, generator=gen))
    rotation, _ = torch.linalg.qr(torch.randn(4, 4, generator=gen))
    left = q[:, :4]  # left layout (m×r) for a 30×50 weight
    flipped = left * torch.tensor([1.0, -1.0, -1.0, 1.0])
    assert subspace_overlap(left, flipped, 30, 50) == pytest.approx(1.0, abs=1e-6)
    assert subspace_overlap(left, left @ rotation, 30, 50) == pytest.approx(1.0, abs=1e-6)
    assert subspace_overlap(q[:, :2], q[:, 2:4], 30, 50) == pytest.approx(0.0, abs=1e-6)
    half = torch.cat([q[:, :2], q[:, 4:6]], dim=1)
    assert subspace_overlap(left, half, 30, 50) == pytest.approx(0.5, abs=1e-6)
    # right layout (r×n) for a 50×30 weight
    assert subspace_overlap(left.T, flipped.T, 50, 30) == pytest.approx(1.0, abs=1e-6)


def test_lazy_policy_grows_the_gap_while_stable_and_resets_when_the_subspace_moves():
    policy = LazyRefresh(gap=3, threshold=0.8, growth=2.0, max_gap=10)
    assert policy.next_gap(3, 0.95) == 6
    assert policy.next_gap(6, 0.95) == 10  # capped
    assert policy.next_gap(10, 0.3) == 3  # moved: back to the initial gap


def _refresh_steps(optimizer, weight, steps, grad):
    refreshed = []
    for _ in range(steps):
        weight.grad = grad.clone()
        before = int(optimizer.state[weight]["proj_refreshes"]) if optimizer.state[weight] else 0
        step_before = int(optimizer.state[weight]["step"]) if optimizer.state[weight] else 0
        optimizer.step()
        if int(optimizer.state[weight]["proj_refreshes"]) > before:
            refreshed.append(step_before)
    return refreshed


def test_lazy_refresh_in_the_optimizer():
    gen = torch.Generator().manual_seed(0)
    grad = torch.randn(40, 24, generator=gen)
    stable = torch.nn.Parameter(torch.zeros(40, 24))
    optimizer = LowRankAdamW([{"params": [stable], "rank": 4, "update_proj_gap": 2,
                               "refresh": "lazy", "refresh_growth": 2.0}], lr=1e-3)
    # the same gradient every step: the SVD subspace never moves, so the gap doubles each time
    assert _refresh_steps(optimizer, stable, 16, grad) == [0, 2, 6, 14]
    assert float(optimizer.state[stable]["proj_overlap"]) == pytest.approx(1.0, abs=1e-5)

    moving = torch.nn.Parameter(torch.zeros(40, 24))
    optimizer = LowRankAdamW([{"params": [moving], "rank": 4, "update_proj_gap": 2,
                               "refresh": "lazy", "projection": "random"}], lr=1e-3)
    # a fresh random subspace each refresh overlaps ~r/d = 1/6 < 0.8: the gap stays 2
    assert _refresh_steps(optimizer, moving, 9, grad) == [0, 2, 4, 6, 8]


def test_fixed_refresh_follows_galore_convention():
    weight = torch.nn.Parameter(torch.zeros(40, 24))
    optimizer = LowRankAdamW([{"params": [weight], "rank": 4, "update_proj_gap": 5}], lr=1e-3)
    assert _refresh_steps(optimizer, weight, 12, torch.randn(40, 24)) == [0, 5, 10]


# ---------------------------------------------------------------------------------------------
# SVD robustness
# ---------------------------------------------------------------------------------------------
def _low_rank_gradient(m, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, 8, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(n, 8, generator=gen))
    s = torch.tensor([50.0, 40, 30, 20, 10, 5, 2, 1])
    return (u * s) @ v.T + 1e-3 * torch.randn(m, n, generator=gen)


@pytest.mark.parametrize("m,n", [(40, 24), (24, 40)], ids=["right", "left"])
def test_svd_fallbacks_find_the_same_subspace_and_name_the_parameter(monkeypatch, m, n):
    grad = _low_rank_gradient(m, n)
    exact = top_singular_columns(grad, 4, param_name="w")

    real_svd = torch.linalg.svd

    def svd_failing_on_the_gradient(a, *args, **kwargs):
        # LAPACK fails on the big ill-conditioned gradient; the small sketch of rsvd still works
        if a.shape == grad.shape:
            raise torch.linalg.LinAlgError("simulated: the algorithm failed to converge")
        return real_svd(a, *args, **kwargs)

    def failing(*args, **kwargs):
        raise torch.linalg.LinAlgError("simulated: the algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "svd", svd_failing_on_the_gradient)
    with pytest.warns(SVDFallbackWarning, match="'layers.3.weight'.*eigh"):
        via_eigh = top_singular_columns(grad, 4, param_name="'layers.3.weight'")
    monkeypatch.setattr(torch.linalg, "eigh", failing)
    with pytest.warns(SVDFallbackWarning, match="randomized"):
        via_rsvd = top_singular_columns(grad, 4, param_name="'layers.3.weight'",
                                        generator=torch.Generator().manual_seed(0))
    for columns in (via_eigh, via_rsvd):
        overlap = float((exact.T @ columns).square().sum()) / 4
        assert overlap == pytest.approx(1.0, abs=1e-5)


def test_optimizer_svd_fallback_warning_names_the_parameter(monkeypatch):
    model = small_mlp()
    optimizer = LowRankAdamW(mlp_param_groups(model, rank=4), lr=1e-3)

    def failing(*args, **kwargs):
        raise torch.linalg.LinAlgError("simulated")

    monkeypatch.setattr(torch.linalg, "svd", failing)
    with pytest.warns(SVDFallbackWarning, match="parameter '2.weight'"):
        train_steps(model, optimizer, mlp_batches(1))


def test_non_finite_gradient_is_an_error_naming_the_parameter():
    model = small_mlp()
    optimizer = LowRankAdamW(mlp_param_groups(model, rank=4), lr=1e-3)
    mlp_loss(model, mlp_batches(1)[0]).backward()
    model[0].weight.grad[0, 0] = float("nan")
    before = model[0].weight.detach().clone()
    with pytest.raises(ValueError, match="'0.weight'.*NaN"):
        optimizer.step()
    assert torch.equal(model[0].weight, before)


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad,match", [
    (dict(rank=25), r"rank of parameter '0.weight'.*min\(m, n\) = 24"),
    (dict(rank=4, proj_type="reverse_std"), "proj_type"),
    (dict(rank=4, projection="pca"), "projection"),
    (dict(rank=4, proj_bits=8), "proj_bits"),
    (dict(rank=4, refresh="sometimes"), "refresh"),
    (dict(rank=4, update_proj_gap=0), "update_proj_gap"),
    (dict(rank=4, refresh="lazy", refresh_threshold=1.5), "refresh_threshold"),
    (dict(rank=4, state_dtype=torch.float16), "state_dtype: expected one of"),
])
def test_bad_group_keys_raise_naming_the_key(bad, match):
    with pytest.raises(ValueError, match=match):
        LowRankAdamW(mlp_param_groups(small_mlp(), **bad))


def test_projected_parameters_must_be_matrices():
    bias = torch.nn.Parameter(torch.zeros(8))
    with pytest.raises(ValueError, match="2-D"):
        LowRankAdamW([{"params": [bias], "rank": 2}])


def test_bf16_moments_are_stored_in_bf16_and_track_the_fp32_run():
    """state_dtype=torch.bfloat16: the moments of projected weights are bf16 (dense parameters
    keep torch's states), and the trajectory stays near the fp32-moment one."""
    batches = mlp_batches(20)
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = small_mlp()
        optimizer = LowRankAdamW(mlp_param_groups(model, rank=5, update_proj_gap=5),
                                 lr=1e-2, state_dtype=dtype)
        train_steps(model, optimizer, batches)
        runs[dtype] = model, optimizer
    model, optimizer = runs[torch.bfloat16]
    for p in optimizer.param_groups[1]["params"]:
        assert optimizer.state[p]["exp_avg"].dtype == torch.bfloat16
        assert optimizer.state[p]["exp_avg_sq"].dtype == torch.bfloat16
    assert optimizer.state[optimizer.param_groups[0]["params"][0]]["exp_avg"].dtype == (
        torch.float32)
    fp32_model, _ = runs[torch.float32]
    initial = small_mlp()
    for a, b, w0 in zip(model.parameters(), fp32_model.parameters(), initial.parameters()):
        moved = (b - w0).abs().max()
        assert moved > 1e-3
        assert (a - b).abs().max() < 0.05 * moved


def test_checkpoint_saved_before_state_dtype_existed_loads_with_fp32_moments():
    model = small_mlp()
    optimizer = LowRankAdamW(mlp_param_groups(model, rank=5, update_proj_gap=2), lr=1e-2)
    train_steps(model, optimizer, mlp_batches(2))
    saved = save_load(optimizer.state_dict())
    for group in saved["param_groups"]:
        del group["state_dtype"]  # the layout of older checkpoints
    saved["state"] = {}  # parameters without state allocate theirs on the next step
    # even into an optimizer built for bf16 moments: such checkpoints hold fp32 ones
    fresh = LowRankAdamW(mlp_param_groups(model, rank=5, update_proj_gap=2), lr=1e-2,
                         state_dtype=torch.bfloat16)
    fresh.load_state_dict(saved)
    train_steps(model, fresh, mlp_batches(1))
    assert fresh.param_groups[1]["state_dtype"] == torch.float32
    assert fresh.state[model[0].weight]["exp_avg"].dtype == torch.float32


def test_group_key_changes_take_effect_between_steps():
    """The projection spec is cached per group and rebuilt when a key changes (here the refresh
    gap, as a schedule of update_proj_gap would do)."""
    model = small_mlp()
    optimizer = LowRankAdamW(mlp_param_groups(model, rank=5, update_proj_gap=1000), lr=1e-2)
    batches = mlp_batches(4)
    train_steps(model, optimizer, batches[:2])
    weight = model[0].weight
    assert int(optimizer.state[weight]["proj_refreshes"]) == 1  # step 0 only
    optimizer.param_groups[1]["update_proj_gap"] = 1
    train_steps(model, optimizer, batches[2:])
    assert int(optimizer.state[weight]["proj_refreshes"]) == 3  # and every step since
