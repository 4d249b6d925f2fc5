"""FiraAdamW and APOLLOAdamW (lowrank_kernels.optim.full_rank) against fira 1.0.2's FiraAdamW and
apollo-torch 1.0.3's APOLLOAdamW: 20 steps side by side through the optimizers (a projected weight
and an unprojected bias in separate groups, weight decay on, gradients whose norm swings so that
the limiter both cuts and lets through), the peer's basis handed to ours at each of its
refreshes, in the C++ CPU backend, the reference and the Triton interpreter; plus the state
(limiter on the device, APOLLO's seeded basis), checkpoints, layer-wise training, group keys."""

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
from test_reference_fira_apollo import gradients

import lowrank_kernels as lk
from lowrank_kernels import reference
from lowrank_kernels.optim import APOLLOAdamW, FiraAdamW, layerwise
from lowrank_kernels.projection import state as proj_state
from lowrank_kernels.projection.svd import SVDProjector

pytestmark = [pytest.mark.skipif(not lk.EXTENSION_AVAILABLE, reason="extension not built"),
              pytest.mark.usefixtures("one_thread")]
fira = pytest.importorskip("fira")

STEPS, GAP = 20, 7
HYPER = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.1)
SIDES = [(40, 24, 5), (24, 40, 5)]
BACKENDS = ["cpu", "reference"]


@pytest.fixture(scope="module")
def apollo_torch():
    return pytest.importorskip("apollo_torch")


def _peer_basis(monkeypatch, peer_state: dict, seeded: bool) -> None:
    """Our refreshes (SVD) or our generated basis (APOLLO's random) return the peer's current
    basis, in the same layout (r×n right, m×r left)."""
    def current():
        return peer_state["state"]["projector"].ortho_matrix.float().clone()

    if seeded:
        monkeypatch.setattr(proj_state, "seeded_basis", lambda *args: current())
    else:
        monkeypatch.setattr(SVDProjector, "compute", lambda self, grad, rank, **kw: current())


def _side_by_side(peer_cls, ours_cls, monkeypatch, m, n, rank, *, seed, peer_key,
                  peer_group, ours_group, peer_kwargs=None, ours_kwargs=None, seeded=False,
                  steps=STEPS, limiter=True):
    """Steps both optimizers on the same gradients; returns (limited, passed) step counts."""
    gen = torch.Generator().manual_seed(seed)
    w0, b0 = torch.randn(m, n, generator=gen), torch.randn(m, generator=gen)
    peer_w, peer_b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
    our_w, our_b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
    common = {"rank": rank, "update_proj_gap": GAP, "proj_type": "std"}
    peer = peer_cls([{"params": [peer_b]}, {"params": [peer_w], **common, **peer_group}],
                    **HYPER, **(peer_kwargs or {}))
    ours = ours_cls([{"params": [our_b]}, {"params": [our_w], **common, **ours_group}],
                    **HYPER, **(ours_kwargs or {}))
    holder = {}
    _peer_basis(monkeypatch, holder, seeded)
    counts = [0, 0]
    for grad in gradients(m, n, seed)[:steps]:
        bias_grad = grad.sum(1)
        peer_w.grad, peer_b.grad = grad.clone(), bias_grad.clone()
        our_w.grad, our_b.grad = grad.clone(), bias_grad.clone()
        peer.step()
        holder["state"] = peer.state[peer_w]
        previous = ours.state[our_w]["limiter"].item() if ours.state[our_w] else -1.0
        ours.step()
        assert_fp32_close(our_w.detach(), peer_w.detach())
        assert_fp32_close(our_b.detach(), peer_b.detach())
        state = ours.state[our_w]
        assert state["limiter"].dtype == torch.float32 and state["limiter"].shape == (1,)
        if limiter:
            assert_fp32_close(state["limiter"], peer.state[peer_w][peer_key].reshape(1))
            if previous >= 0:
                bound = reference.LIMITER_GROWTH * (previous + reference.NORM_GUARD)
                counts[abs(state["limiter"].item() - bound) > 1e-6 * bound] += 1
    assert_fp32_close(ours.state[our_w]["exp_avg"], peer.state[peer_w]["exp_avg"])
    assert_fp32_close(ours.state[our_w]["exp_avg_sq"], peer.state[peer_w]["exp_avg_sq"])
    return counts


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m,n,rank", SIDES, ids=["right", "left"])
def test_fira_adamw_matches_fira(monkeypatch, m, n, rank, backend):
    limited, passed = _side_by_side(
        fira.FiraAdamW, FiraAdamW, monkeypatch, m, n, rank, seed=2, peer_key="scaling_grad",
        peer_group={"alpha": 0.25}, ours_group={"alpha": 0.25},
        peer_kwargs={"no_deprecation_warning": True}, ours_kwargs={"backend": backend})
    assert limited >= 3 and passed >= 3, (limited, passed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("proj,scale_type,scale_front", [("svd", "channel", False),
                                                         ("random", "tensor", True),
                                                         ("random", "channel", False),
                                                         ("svd", "tensor", False)])
@pytest.mark.parametrize("m,n,rank", SIDES, ids=["right", "left"])
def test_apollo_adamw_matches_apollo(monkeypatch, apollo_torch, m, n, rank, proj, scale_type,
                                     scale_front, backend):
    group = {"proj": proj, "scale_type": scale_type, "scale": 0.25}
    kwargs = {"scale_front": scale_front}
    limited, passed = _side_by_side(
        apollo_torch.APOLLOAdamW, APOLLOAdamW, monkeypatch, m, n, rank, seed=4,
        peer_key="scaled_grad", peer_group=group, ours_group=group, peer_kwargs=kwargs,
        ours_kwargs={**kwargs, "backend": backend}, seeded=proj == "random")
    assert limited >= 3 and passed >= 3, (limited, passed)


@pytest.mark.parametrize("m,n", [(40, 24), (24, 40)], ids=["right", "left"])
def test_apollo_mini_without_limiter_matches(monkeypatch, apollo_torch, m, n):
    """APOLLO-Mini: rank 1, tensor scale, scale 128, disable_nl (the limiter stays untouched)."""
    group = {"proj": "random", "scale_type": "tensor", "scale": 128.0}
    _side_by_side(apollo_torch.APOLLOAdamW, APOLLOAdamW, monkeypatch, m, n, 1, seed=6,
                  peer_key="scaled_grad", peer_group=group, ours_group=group,
                  peer_kwargs={"disable_nl": True}, ours_kwargs={"disable_nl": True},
                  seeded=True, limiter=False)


@pytest.mark.parametrize("ours_cls,peer,group", [
    (FiraAdamW, "fira", {"alpha": 0.25}),
    (APOLLOAdamW, "apollo", {"proj": "svd", "scale_type": "channel", "scale": 0.25})],
    ids=["fira", "apollo"])
def test_triton_interpreter_matches_the_peer(monkeypatch, apollo_torch, ours_cls, peer, group):
    """Five steps with the Triton kernels (interpreter on CPU tensors), right side."""
    peer_cls = fira.FiraAdamW if peer == "fira" else apollo_torch.APOLLOAdamW
    key = "scaling_grad" if peer == "fira" else "scaled_grad"
    extra = {"no_deprecation_warning": True} if peer == "fira" else {}
    pytest.importorskip("triton")
    _side_by_side(peer_cls, ours_cls, monkeypatch, 40, 24, 5, seed=2, peer_key=key,
                  peer_group=group, ours_group=group, peer_kwargs=extra,
                  ours_kwargs={"backend": "triton"}, steps=5)


# ---- APOLLO's seeded basis ------------------------------------------------------------------
@pytest.mark.parametrize("m,n", [(40, 24), (24, 40)], ids=["right", "left"])
def test_apollo_random_basis_is_generated_from_seed_and_refresh_count(m, n):
    """No basis in the state; each step equals the reference step on random_projection(seed,
    refresh count), a new basis at each refresh."""
    w = torch.nn.Parameter(torch.randn(m, n))
    opt = APOLLOAdamW([{"params": [w], "rank": 4, "update_proj_gap": 2, "scale": 0.5}], **HYPER)
    expected = w.detach().clone()
    shape = (m, 4) if m >= n else (4, n)
    exp_avg, exp_avg_sq, limiter = torch.zeros(shape), torch.zeros(shape), torch.full((1,), -1.)
    bases = []
    for step in range(1, 6):
        w.grad = torch.randn(m, n)
        opt.step()
        state = opt.state[w]
        assert "proj" not in state
        seed, refresh = int(state["proj_seed"]) % 2**32, int(state["proj_refreshes"]) - 1
        assert refresh == (step - 1) // 2
        basis = reference.random_projection(seed, refresh, m, n, 4)
        bases.append(basis)
        reference.fused_galore_step(expected, w.grad, basis, exp_avg, exp_avg_sq,
                                    lr=HYPER["lr"], beta1=0.9, beta2=0.999, eps=1e-6,
                                    weight_decay=0.1, scale=0.5, step=step,
                                    full_rank="apollo", limiter=limiter)
        assert_fp32_close(w.detach(), expected)
        assert_fp32_close(state["limiter"], limiter)
    assert torch.equal(bases[0], bases[1]) and not torch.equal(bases[1], bases[2])


# ---- checkpoints, layer-wise, keys -----------------------------------------------------------
MAKERS = {
    "fira": lambda model: FiraAdamW(mlp_param_groups(model, rank=3, update_proj_gap=2,
                                                     alpha=0.25), **HYPER),
    "apollo": lambda model: APOLLOAdamW(mlp_param_groups(model, rank=3, update_proj_gap=2,
                                                         scale=0.25), **HYPER),
    "apollo-mini": lambda model: APOLLOAdamW(
        mlp_param_groups(model, rank=1, update_proj_gap=2, scale=128.0, scale_type="tensor"),
        **HYPER),
}


@pytest.mark.parametrize("kind", MAKERS)
def test_state_dict_round_trip_resumes_bit_for_bit(kind):
    _, optimizer = assert_resumes_bit_for_bit(MAKERS[kind], mlp_batches(6))
    state = optimizer.state[optimizer.param_groups[1]["params"][0]]
    assert state["limiter"].item() > 0


@pytest.mark.parametrize("kind", ["fira", "apollo"])
def test_layerwise_equals_ordinary_training(kind):
    batches = mlp_batches(4, batch=8)
    expected = small_mlp()
    train_steps(expected, MAKERS[kind](expected), batches)
    model = small_mlp()
    trainer = layerwise(model, MAKERS[kind])
    for batch in batches:
        mlp_loss(model, batch).backward()
    assert trainer.optimizer_steps == 4
    for a, b in zip(model.parameters(), expected.parameters()):
        assert torch.equal(a, b)


def _weight():
    return torch.nn.Parameter(torch.randn(8, 6))


@pytest.mark.parametrize("cls,group,match", [
    (FiraAdamW, {"rank": 2, "alpha": 0.5, "scale": 0.5}, "alpha, scale"),
    (FiraAdamW, {"rank": 2, "rnak": 2}, "unknown key 'rnak'"),
    (FiraAdamW, {"rank": 2, "scale_type": "tensor"}, "unknown key 'scale_type'"),
    (APOLLOAdamW, {"rank": 2, "proj": "dct"}, "proj: expected"),
    (APOLLOAdamW, {"rank": 2, "scale_type": "row"}, "scale_type: expected"),
    (APOLLOAdamW, {"rank": 2, "proj": "random", "projection": "svd"}, "projection: APOLLO"),
    (APOLLOAdamW, {"rank": 2, "disable_nl": 1}, "disable_nl: expected a bool"),
    (APOLLOAdamW, {"rank": 2, "alpha": 0.5}, "unknown key 'alpha'"),
    (APOLLOAdamW, {"rank": 2, "refresh": "lazy"}, "refresh: projection='gaussian'"),
    (APOLLOAdamW, {"rank": 2, "proj_bits": 4}, "proj_bits=4"),
    (FiraAdamW, {"rank": 2, "state_dtype": "8bit"}, "state_dtype: FiraAdamW keeps fp32 or bf16"),
    (APOLLOAdamW, {"rank": 2, "state_dtype": "8bit"}, "state_dtype: APOLLOAdamW keeps"),
])
def test_bad_group_keys_raise(cls, group, match):
    with pytest.raises(ValueError, match=match):
        cls([{"params": [_weight()], **group}])


def test_peer_group_keys_are_accepted():
    """fira's divide_params groups and apollo-torch's README groups, as they are written."""
    w = _weight()
    groups = fira.divide_params(None) or [{"params": [w], "rank": 2, "update_proj_gap": 200,
                                           "alpha": 1.0, "proj_type": "std"}]
    assert FiraAdamW(groups, lr=1e-3, no_deprecation_warning=True).param_groups[0]["scale"] == 1.0
    apollo = APOLLOAdamW([{"params": [w], "rank": 1, "proj": "random", "scale_type": "tensor",
                           "scale": 128, "update_proj_gap": 200, "proj_type": "std"}],
                         lr=1e-3, weight_decay=0.0, scale_front=True, disable_nl=False)
    group = apollo.param_groups[0]
    assert (group["projection"], group["scale_front"], group["disable_nl"]) == ("gaussian", True,
                                                                                  False)


# ---- transformers integration ------------------------------------------------------------------
@pytest.mark.parametrize("optimizer,optim_args,cls", [
    ("apollo", "rank=4,proj=random,scale_type=tensor,update_proj_gap=2,scale=128,proj_type=std",
     APOLLOAdamW),
    ("apollo", "", APOLLOAdamW),
    ("fira", "rank=4,update_proj_gap=2,alpha=0.25", FiraAdamW)])
def test_transformers_integration_builds_and_steps(tmp_path, optimizer, optim_args, cls):
    """optim_args as transformers passes them to apollo-torch for optim="apollo_adamw" (its
    defaults when absent: rank 128, proj random, scale_type channel, gap 200, scale 1.0)."""
    transformers = pytest.importorskip("transformers")
    from lowrank_kernels.integrations.transformers import build_optimizer

    model = torch.nn.Sequential(torch.nn.Linear(12, 10), torch.nn.GELU(),
                                torch.nn.Linear(10, 3))
    args = transformers.TrainingArguments(output_dir=str(tmp_path), optim_target_modules="0",
                                          optim_args=optim_args, learning_rate=1e-2,
                                          weight_decay=0.01, report_to=[], use_cpu=True)
    if not optim_args:  # transformers' default rank 128 exceeds this weight: kept, not cut
        with pytest.raises(ValueError, match="rank of parameter '0.weight'"):
            build_optimizer(model, args, optimizer)
        return
    opt = build_optimizer(model, args, optimizer)
    assert type(opt) is cls
    group = opt.param_groups[1]
    if optimizer == "apollo":
        assert (group["rank"], group["projection"], group["scale_type"], group["scale"]) == (
            4, "gaussian", "tensor", 128.0)
    else:
        assert (group["rank"], group["scale"]) == (4, 0.25)
    model(torch.randn(5, 12)).sum().backward()
    opt.step()
    assert opt.state[model[0].weight]["limiter"].item() > 0
