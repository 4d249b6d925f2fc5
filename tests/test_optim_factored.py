"""The factored second moment (DESIGN.md §4.12) in the optimizers: second_moment="factored" keeps
r + own fp32 values of V per projected weight, steps them through the fused op, resumes bit for
bit, and trains like the full V; dense_adamw="adafactor" does the same for the weights without
rank (no M, V factored over a matrix's rows and columns, in row chunks)."""

import math

import pytest
import torch
from cases import (
    assert_curves_follow,
    assert_int8_qgalore_trains,
    assert_resumes_bit_for_bit,
    mlp_batches,
    mlp_loss_curve,
    mlp_param_groups,
    small_mlp,
    train_steps,
)

import lowrank_kernels as lk
from lowrank_kernels import reference
from lowrank_kernels.optim import (
    APOLLOAdamW,
    FiraAdamW,
    GaLoreAdamW,
    GradNormLoRPAdamW,
    LowRankAdamW,
    QGaLoreAdamW,
    lowrank_adamw,
)

pytestmark = [pytest.mark.skipif(not lk.EXTENSION_AVAILABLE, reason="extension not built"),
              pytest.mark.usefixtures("one_thread")]

# None: the op the dispatcher registers for CPU tensors (the C++ kernel)
BACKENDS = [None, "reference"]


def _factored(model, backend, **kw):
    kw.setdefault("state_dtype", torch.float32)
    return GaLoreAdamW(mlp_param_groups(model, rank=4, update_proj_gap=5,
                                        second_moment="factored"),
                       lr=1e-2, backend=backend, **kw)


# --------------------------------------------------------------------------------------------
# the reference's arithmetic
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("right", [True, False])
def test_factored_v_is_adafactors_sum_form(right):
    """factored_normalized against Adafactor's own statement (row sums Rₛ, column sums Cₛ of
    the EMA of R², V̂ = Rₛ·Cₛᵀ / Σ Rₛ) kept as full EMA matrices: the same N and factors."""
    gen = torch.Generator().manual_seed(0)
    own, rank = 11, 5
    shape = (own, rank) if right else (rank, own)
    factors, m32 = torch.zeros(rank + own), torch.zeros(shape)
    ema, m_ref = torch.zeros(own, rank), torch.zeros(own, rank)
    for _ in range(4):
        r = torch.randn(shape, generator=gen)
        got = reference.factored_normalized(r, m32, factors, 0.9, 0.99, 1e-8, right)
        lines = r if right else r.T  # own × rank
        ema = 0.99 * ema + 0.01 * lines.square()
        m_ref = 0.9 * m_ref + 0.1 * lines
        row_sums, col_sums = ema.sum(dim=1), ema.sum(dim=0)  # per own line, per rank
        v_hat = row_sums[:, None] * col_sums[None, :] / ema.sum()
        want = m_ref / (v_hat.sqrt() + 1e-8)
        # M's cancellation near 0 costs relative bits: an absolute floor of 1e-6 of |N|'s scale
        torch.testing.assert_close(got if right else got.T, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(factors[:rank], col_sums / own, rtol=1e-5, atol=0)
        torch.testing.assert_close(factors[rank:], row_sums / rank, rtol=1e-5, atol=0)


def test_factored_v_equals_full_v_when_r_squared_is_rank_one():
    """R = u·vᵀ·s_t (a fixed rank-1 pattern of R² at every step) makes the EMA of R² rank 1, so
    the factored V̂ is V itself: the factored step equals the full-V Adam step."""
    gen = torch.Generator().manual_seed(1)
    u, v = torch.rand(9, generator=gen) + 0.5, torch.rand(4, generator=gen) + 0.5
    factors, m_fact = torch.zeros(4 + 9), torch.zeros(9, 4)
    m_full, v_full = torch.zeros(9, 4), torch.zeros(9, 4)
    for step in range(5):
        r = u[:, None] * v[None, :] * (1.0 + step) * (-1) ** step
        got = reference.factored_normalized(r, m_fact, factors, 0.9, 0.999, 1e-6, True)
        want = reference.adam_normalized(r, m_full, v_full, 0.9, 0.999, 1e-6)
        torch.testing.assert_close(got, want, rtol=2e-6, atol=0)


# --------------------------------------------------------------------------------------------
# the optimizer
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16, "8bit"], ids=str)
def test_state_is_m_plus_r_plus_own_fp32_factors(backend, state_dtype):
    model = small_mlp()
    optimizer = _factored(model, backend, state_dtype=state_dtype)
    train_steps(model, optimizer, mlp_batches(2))
    for p, own in ((model[0].weight, 40), (model[2].weight, 40), (model[4].weight, 32)):
        state = optimizer.state[p]  # 40×24 right (own 40); 32×40 and 10×32 left (own n)
        assert state["exp_avg_sq"].dtype == torch.float32
        assert state["exp_avg_sq"].shape == (4 + own,)
        assert (state["exp_avg_sq"] > 0).all()
        assert "exp_avg_sq_scales" not in state
        m_dtype = torch.int8 if state_dtype == "8bit" else state_dtype
        assert state["exp_avg"].dtype == m_dtype


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_step_is_the_reference_step(backend):
    """A step of the optimizer equals reference.fused_galore_step on the state before it."""
    model = small_mlp()
    optimizer = _factored(model, backend, weight_decay=0.1)
    batches = mlp_batches(3)
    train_steps(model, optimizer, batches[:2])
    layers = (0, 2)  # 40×24 on the right side, 32×40 on the left
    before = {layer: ({k: v.clone() for k, v in optimizer.state[model[layer].weight].items()},
                      model[layer].weight.detach().clone()) for layer in layers}
    train_steps(model, optimizer, batches[2:])
    for layer in layers:
        weight = model[layer].weight
        state = optimizer.state[weight]
        ref, w = before[layer]
        reference.fused_galore_step(w, weight.grad, ref["proj"], ref["exp_avg"],
                                    ref["exp_avg_sq"], lr=1e-2, beta1=0.9, beta2=0.999,
                                    eps=1e-6, weight_decay=0.1, scale=1.0, step=3)
        assert ref["exp_avg_sq"].shape == (4 + 40,)
        torch.testing.assert_close(weight.detach(), w, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(state["exp_avg_sq"], ref["exp_avg_sq"], rtol=1e-5, atol=0)
        torch.testing.assert_close(state["exp_avg"], ref["exp_avg"], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("state_dtype", [torch.bfloat16, "8bit"], ids=str)
def test_state_dict_round_trip_resumes_bit_for_bit(state_dtype):
    def make(model):
        return QGaLoreAdamW(mlp_param_groups(model, rank=4, update_proj_gap=2,
                                             proj_group_size=16, second_moment="factored"),
                            lr=1e-2, weight_decay=0.1, state_dtype=state_dtype,
                            dense_adamw="adafactor")

    _, optimizer = assert_resumes_bit_for_bit(make, mlp_batches(6))
    assert optimizer.state[optimizer.param_groups[1]["params"][0]]["exp_avg_sq"].dim() == 1


def test_factored_v_trains_like_the_full_v():
    """40 steps of the small MLP (rank 8, refresh every 10), 8-bit M: the factored V's loss
    curve follows the full 8-bit V's (mean relative gap below 3 %), both learn, they differ."""
    assert_curves_follow(*(mlp_loss_curve(lambda model, v=second_moment: GaLoreAdamW(
        mlp_param_groups(model, rank=8, update_proj_gap=10, second_moment=v), lr=1e-2,
        state_dtype="8bit")) for second_moment in ("full", "factored")))


def test_int8_weights_int4_basis_8bit_m_factored_v_train():
    """The 7B <= 10 GiB configuration's step on the small MLP: INT8 weight codes, packed INT4
    basis, 8-bit M, factored V, Adafactor for the biases; one fused call per weight."""
    codes, optimizer = assert_int8_qgalore_trains(
        state_dtype="8bit", dense_adamw="adafactor", second_moment="factored",
        projection="rsvd")
    state = optimizer.state[codes[0]]
    assert state["exp_avg"].dtype == torch.int8 and state["exp_avg_sq"].shape == (4 + 40,)


@pytest.mark.parametrize("cls", [FiraAdamW, APOLLOAdamW, GradNormLoRPAdamW],
                         ids=lambda c: c.__name__)
def test_optimizers_without_a_factored_mode_refuse_it(cls):
    with pytest.raises(ValueError, match="second_moment: .* keeps the full V"):
        cls(mlp_param_groups(small_mlp(), rank=4, second_moment="factored"))


def test_an_unknown_second_moment_names_the_choices():
    with pytest.raises(ValueError, match="second_moment: expected one of .*'factored'"):
        GaLoreAdamW(mlp_param_groups(small_mlp(), rank=4, second_moment="adafactor"))
    with pytest.raises(ValueError, match="second_moment: expected one of .*'factored'"):
        GaLoreAdamW([{"params": small_mlp().parameters(), "second_moment": "bogus"}])


def test_a_factored_v_in_a_group_without_rank_is_refused_not_ignored():
    with pytest.raises(ValueError, match="parameter group 0: second_moment='factored' in a group "
                                         "without 'rank'.*dense_adamw='adafactor'"):
        GaLoreAdamW([{"params": small_mlp().parameters(), "second_moment": "factored"}])
    # the constructor's default reaches every group: only the projected ones use it
    model = small_mlp()
    GaLoreAdamW([{"params": [model[0].weight], "rank": 4}, {"params": [model[0].bias]}],
                second_moment="factored")


@pytest.mark.parametrize("cls", [GaLoreAdamW, FiraAdamW, GradNormLoRPAdamW],
                         ids=lambda c: c.__name__)
def test_a_refused_group_leaves_the_optimizer_as_it_was(cls):
    """add_param_group on a built optimizer: the refusal comes after torch has added the group
    (its defaults filled in), and takes it out again."""
    model = small_mlp()
    optimizer = cls([{"params": [model[0].weight], "rank": 4}])
    with pytest.raises(ValueError, match="second_moment"):
        optimizer.add_param_group({"params": [model[2].weight], "rank": 4,
                                   "second_moment": "factored" if cls is not GaLoreAdamW
                                   else "bogus"})
    assert len(optimizer.param_groups) == 1
    optimizer.add_param_group({"params": [model[2].weight], "rank": 4})  # not held by the first
    assert len(optimizer.param_groups) == 2


# --------------------------------------------------------------------------------------------
# dense_adamw="adafactor"
# --------------------------------------------------------------------------------------------
def _adafactor_restated(w, b, grads, lr, beta2, eps, wd):
    """The rule as the docstring states it, in float64, on whole tensors (no chunks)."""
    w, b = w.double(), b.double()
    rows, cols, vb = torch.zeros(w.shape[0]), torch.zeros(w.shape[1]), torch.zeros(b.shape)
    rows, cols, vb = rows.double(), cols.double(), vb.double()
    for t, (g, gb) in enumerate(grads, start=1):
        g, gb = g.double(), gb.double()
        rows = beta2 * rows + (1 - beta2) * g.square().mean(1)
        cols = beta2 * cols + (1 - beta2) * g.square().mean(0)
        v_hat = rows[:, None] * cols[None, :] / rows.mean()
        step = lr * math.sqrt(1 - beta2**t)
        w = (1 - lr * wd) * (w - step * g / (v_hat.sqrt() + eps))
        vb = beta2 * vb + (1 - beta2) * gb.square()
        b = (1 - lr * wd) * (b - step * gb / (vb.sqrt() + eps))
    return w.float(), b.float()


@pytest.mark.parametrize("chunk", [40, 1 << 22])  # 40: three rows per chunk, a partial last one
def test_dense_adafactor_is_the_stated_rule(monkeypatch, chunk):
    monkeypatch.setattr(lowrank_adamw, "DENSE_CHUNK_ELEMENTS", chunk)
    gen = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(13, 7, generator=gen))
    b = torch.nn.Parameter(torch.randn(7, generator=gen))
    start = (w.detach().clone(), b.detach().clone())
    optimizer = LowRankAdamW([w, b], lr=1e-2, weight_decay=0.1, dense_adamw="adafactor")
    grads = [(torch.randn(13, 7, generator=gen), torch.randn(7, generator=gen))
             for _ in range(4)]
    for g, gb in grads:
        w.grad, b.grad = g.clone(), gb.clone()
        optimizer.step()
    want_w, want_b = _adafactor_restated(*start, grads, 1e-2, 0.999, 1e-6, 0.1)
    torch.testing.assert_close(w.detach(), want_w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.detach(), want_b, rtol=1e-5, atol=1e-6)
    assert optimizer.state[w]["exp_avg_sq"].shape == (13 + 7,)
    assert "exp_avg" not in optimizer.state[w]
    assert optimizer.state[b]["exp_avg_sq"].shape == (7,)


def test_dense_adafactor_steps_a_bf16_weight_in_fp32_rounding_once():
    gen = torch.Generator().manual_seed(2)
    w32 = torch.randn(6, 5, generator=gen)
    w = torch.nn.Parameter(w32.to(torch.bfloat16))
    ref = torch.nn.Parameter(w32.to(torch.bfloat16).float())
    g = torch.randn(6, 5, generator=gen)
    for p in (w, ref):
        p.grad = g.to(p.dtype) if p is w else g.to(torch.bfloat16).float()
        LowRankAdamW([p], lr=1e-2, dense_adamw="adafactor").step()
    assert w.dtype == torch.bfloat16
    assert torch.equal(w.detach(), ref.detach().to(torch.bfloat16))


def _dense_groups(model: torch.nn.Module) -> list[dict]:
    """The head's 10×32 weight and the biases without rank, the other weights projected."""
    return [{"params": [model[4].weight, model[0].bias, model[4].bias]},
            {"params": [model[0].weight, model[2].weight], "rank": 4}]


def _dense_checkpoint(dense_adamw: str) -> tuple[torch.nn.Module, dict]:
    model = small_mlp()
    optimizer = LowRankAdamW(_dense_groups(model), lr=1e-2, dense_adamw=dense_adamw)
    train_steps(model, optimizer, mlp_batches(2))
    return model, optimizer.state_dict()


@pytest.mark.parametrize("saved,resumed", [("torch", "adafactor"), ("adafactor", "galore")])
def test_a_checkpoint_of_another_dense_rule_is_refused_before_loading(tmp_path, saved, resumed):
    """dense_adamw is a constructor argument, not saved: a state of the other layout is refused
    by load_state_dict, naming the parameter and both layouts, before any state is loaded."""
    model, state_dict = _dense_checkpoint(saved)
    torch.save(state_dict, tmp_path / "opt.pt")
    loaded = torch.load(tmp_path / "opt.pt", weights_only=True)
    optimizer = LowRankAdamW(_dense_groups(model), lr=1e-2, dense_adamw=resumed)
    with pytest.raises(ValueError, match=rf"state_dict: parameter #0 of a group \(10×32\) was "
                                         rf"saved with moments .*dense_adamw='{resumed}' keeps"):
        optimizer.load_state_dict(loaded)
    assert not optimizer.state
    optimizer = LowRankAdamW(_dense_groups(model), lr=1e-2, dense_adamw=saved)
    optimizer.load_state_dict(loaded)  # the rule it was written with
    assert len(optimizer.state) == 5
    shapes = {"torch": (10, 32), "adafactor": (10 + 32,)}
    assert optimizer.state[model[4].weight]["exp_avg_sq"].shape == shapes[saved]


def test_foreach_and_fused_are_refused_where_torch_adamw_does_not_run():
    with pytest.raises(ValueError, match="foreach, fused: options of torch's AdamW, used only "
                                         "with dense_adamw='torch'; got foreach=None, "
                                         "fused=True with dense_adamw='adafactor'"):
        LowRankAdamW([torch.nn.Parameter(torch.zeros(2))], dense_adamw="adafactor", fused=True)


def test_an_unknown_dense_rule_names_the_choices():
    with pytest.raises(ValueError, match="dense_adamw: expected one of .*'adafactor'"):
        LowRankAdamW([torch.nn.Parameter(torch.zeros(2))], dense_adamw="adam8bit")
