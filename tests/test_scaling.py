"""scale_hyperparameters: the square-root and linear batch-size rules (docs/scaling.md).

Expected values are written from the rule's equations (lr·√κ, 1−β → κ(1−β), ε/√κ, decoupled
wd·√κ; linear: lr·κ), never from the function's own output; scheduler tests compare the scaled
scheduler's lr trajectory with a scheduler built from scratch at the scaled values.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch.optim import lr_scheduler

from lowrank_kernels.optim import (
    DCTAdamW,
    GaLoreAdamW,
    LowRankAdamW,
    QGaLoreAdamW,
    scale_hyperparameters,
)
from lowrank_kernels.optim.scaling import Change

KAPPA = 4.0
ROOT = 2.0  # √κ


def _params():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(8, 6)), torch.nn.Parameter(torch.randn(6))]


def _lowrank_groups(params):
    return [{"params": [params[0]], "rank": 2, "update_proj_gap": 5, "scale": 0.25},
            {"params": [params[1]]}]


class FiraLike(LowRankAdamW):
    """Stands for the LowRankAdamW subclasses to come (Fira, APOLLO)."""


# name → (factory, decoupled weight decay?)
ADAM_FAMILY = {
    "LowRankAdamW": (lambda p: LowRankAdamW(_lowrank_groups(p), lr=1e-3, weight_decay=0.1),
                     True),
    "GaLoreAdamW": (lambda p: GaLoreAdamW(_lowrank_groups(p), lr=1e-2, weight_decay=0.1), True),
    "QGaLoreAdamW": (lambda p: QGaLoreAdamW(_lowrank_groups(p), lr=1e-2, weight_decay=0.1),
                     True),
    "DCTAdamW": (lambda p: DCTAdamW(_lowrank_groups(p), lr=1e-2, weight_decay=0.1), True),
    "FiraLike": (lambda p: FiraLike(_lowrank_groups(p), lr=1e-2, weight_decay=0.1), True),
    "Adam": (lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=0.1), False),
    "Adam(decoupled)": (lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=0.1,
                                                   decoupled_weight_decay=True), True),
    "AdamW": (lambda p: torch.optim.AdamW(p, lr=1e-3, betas=(0.8, 0.99), weight_decay=0.1),
              True),
}


def _snapshot(opt) -> list[dict]:
    return [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]


def _assert_other_keys_untouched(before, after, scaled):
    for b, a in zip(before, after, strict=True):
        assert set(a) == set(b)
        for key in set(b) - set(scaled):
            assert a[key] == b[key], key


# --------------------------------------------------------------------------------------------
# the rules, per optimizer type
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(ADAM_FAMILY))
def test_sqrt_rule_on_adam_family(name):
    make, decoupled = ADAM_FAMILY[name]
    opt = make(_params())
    before = _snapshot(opt)
    changes = scale_hyperparameters(opt, 64, 256)
    for b, g in zip(before, opt.param_groups, strict=True):
        assert g["lr"] == pytest.approx(b["lr"] * ROOT, rel=1e-15)
        b1, b2 = b["betas"]
        assert isinstance(g["betas"], tuple)
        assert g["betas"] == pytest.approx((1 - KAPPA * (1 - b1), 1 - KAPPA * (1 - b2)),
                                           rel=1e-14)
        assert g["eps"] == pytest.approx(b["eps"] / ROOT, rel=1e-15)
        wd = b["weight_decay"] * ROOT if decoupled else b["weight_decay"]
        assert g["weight_decay"] == pytest.approx(wd, rel=1e-15)
    _assert_other_keys_untouched(before, _snapshot(opt), ("lr", "betas", "eps", "weight_decay"))
    keys = {(c.group, c.key) for c in changes}
    expected = {(i, k) for i in range(len(before))
                for k in ("lr", "betas", "eps") + (("weight_decay",) if decoupled else ())}
    assert keys == expected


@pytest.mark.parametrize("name", list(ADAM_FAMILY))
def test_linear_rule_scales_only_lr(name):
    opt = ADAM_FAMILY[name][0](_params())
    before = _snapshot(opt)
    changes = scale_hyperparameters(opt, 64, 256, rule="linear")
    assert [(c.group, c.key) for c in changes] == [(i, "lr") for i in range(len(before))]
    for b, g in zip(before, opt.param_groups, strict=True):
        assert g["lr"] == pytest.approx(b["lr"] * KAPPA, rel=1e-15)
    _assert_other_keys_untouched(before, _snapshot(opt), ("lr",))


def test_scaled_lowrank_optimizer_still_steps():
    params = _params()
    opt = GaLoreAdamW(_lowrank_groups(params), lr=1e-2)
    scale_hyperparameters(opt, 8, 32)
    for p in params:
        p.grad = torch.randn_like(p)
    before = [p.detach().clone() for p in params]
    opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, params, strict=True))


def test_rmsprop_alpha_is_its_beta2():
    opt = torch.optim.RMSprop(_params(), lr=1e-3, alpha=0.99, eps=1e-8, weight_decay=0.1)
    before = _snapshot(opt)
    scale_hyperparameters(opt, 100, 400)
    g = opt.param_groups[0]
    assert g["lr"] == pytest.approx(1e-3 * ROOT, rel=1e-15)
    assert g["alpha"] == pytest.approx(1 - KAPPA * 0.01, rel=1e-14)
    assert g["eps"] == pytest.approx(1e-8 / ROOT, rel=1e-15)
    # RMSprop's weight decay is L2 (part of the loss): unchanged
    _assert_other_keys_untouched(before, _snapshot(opt), ("lr", "alpha", "eps"))


@pytest.mark.parametrize("option", [{"momentum": 0.9}, {"centered": True}])
def test_rmsprop_sqrt_refuses_what_the_sde_does_not_cover(option):
    opt = torch.optim.RMSprop(_params(), lr=1e-3, **option)
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=f"param group 0: {next(iter(option))}"):
        scale_hyperparameters(opt, 1, 4)
    assert _snapshot(opt) == before
    scale_hyperparameters(opt, 1, 4, rule="linear")  # the linear rule only touches lr
    assert opt.param_groups[0]["lr"] == pytest.approx(4e-3)


def test_sgd_takes_the_linear_rule_only():
    opt = torch.optim.SGD(_params(), lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=True)
    before = _snapshot(opt)
    assert scale_hyperparameters(opt, 32, 256, rule="linear") == [
        Change(0, "lr", 0.1, 0.1 * 8)]
    _assert_other_keys_untouched(before, _snapshot(opt), ("lr",))
    with pytest.raises(ValueError, match=r"rule: SGD accepts only \('linear',\), got 'sqrt'"):
        scale_hyperparameters(opt, 32, 256)


@pytest.mark.parametrize("rule", ["sqrt", "linear"])
def test_adagrad_takes_neither_rule(rule):
    opt = torch.optim.Adagrad(_params(), lr=0.1)
    with pytest.raises(ValueError, match="Adagrad accepts neither rule"):
        scale_hyperparameters(opt, 32, 256, rule=rule)


def test_unknown_optimizer_type_is_refused_naming_it_and_the_supported_ones():
    with pytest.raises(ValueError, match=r"NAdam has no batch-size rule.*LowRankAdamW.*RMSprop"):
        scale_hyperparameters(torch.optim.NAdam(_params()), 1, 2)


# --------------------------------------------------------------------------------------------
# κ: refused, shrinking, identity, round trip
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("to_batch", [10, 11, 100])  # κ(1 − β1) = 1, 1.1, 10 with β1 = 0.9
def test_refuses_kappa_that_pushes_one_minus_beta_out_of_range(to_batch):
    params = _params()
    opt = torch.optim.AdamW([{"params": [params[0]]},
                             {"params": [params[1]], "betas": (0.9, 0.999)}],
                            betas=(0.5, 0.99))
    before = copy.deepcopy(_snapshot(opt))
    # group 0 (β1 = 0.5) fails first, and nothing of any group is written
    with pytest.raises(ValueError, match=r"param group 0: betas\[0\] = 0.5: .*κ = "):
        scale_hyperparameters(opt, 1, to_batch)
    assert _snapshot(opt) == before


def test_refusal_names_the_group_and_the_largest_batch():
    params = _params()
    opt = torch.optim.AdamW([{"params": [params[0]]},
                             {"params": [params[1]], "betas": (0.99, 0.95)}], betas=(0.99, 0.999))
    # κ = 30: group 0's (0.99, 0.999) is fine, group 1's β2 = 0.95 gives 30·0.05 = 1.5
    with pytest.raises(ValueError, match=r"param group 1: betas\[1\] = 0.95.*below 200"):
        scale_hyperparameters(opt, 10, 300)
    assert opt.param_groups[0]["lr"] == 1e-3


def test_kappa_one_changes_nothing():
    for name, (make, _) in ADAM_FAMILY.items():
        opt = make(_params())
        before = _snapshot(opt)
        assert scale_hyperparameters(opt, 128, 128) == [], name
        assert _snapshot(opt) == before, name


def test_shrinking_the_batch_is_allowed_and_round_trips():
    opt = torch.optim.AdamW(_params(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    before = _snapshot(opt)
    scale_hyperparameters(opt, 256, 16)  # κ = 1/16
    g = opt.param_groups[0]
    assert g["lr"] == pytest.approx(1e-3 / 4, rel=1e-15)
    assert g["betas"] == pytest.approx((1 - 0.1 / 16, 1 - 0.001 / 16), rel=1e-15)
    assert g["eps"] == pytest.approx(4e-8, rel=1e-15)
    scale_hyperparameters(opt, 16, 256)
    for key, value in before[0].items():
        assert opt.param_groups[0][key] == (value if value is None or isinstance(value, bool)
                                            else pytest.approx(value, rel=1e-12)), key


def test_state_is_not_touched():
    params = _params()
    opt = GaLoreAdamW(_lowrank_groups(params), lr=1e-2)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    state = copy.deepcopy(opt.state_dict()["state"])
    scale_hyperparameters(opt, 8, 16)
    for k, s in opt.state_dict()["state"].items():
        for key, value in s.items():
            torch.testing.assert_close(value, state[k][key], rtol=0, atol=0, equal_nan=True)


def test_scale_weight_decay_false_keeps_decoupled_decay():
    opt = torch.optim.AdamW(_params(), weight_decay=0.1)
    changes = scale_hyperparameters(opt, 8, 32, scale_weight_decay=False)
    assert opt.param_groups[0]["weight_decay"] == 0.1
    assert "weight_decay" not in {c.key for c in changes}


def test_zero_eps_and_zero_decay_are_not_reported():
    opt = torch.optim.AdamW(_params(), eps=0.0, weight_decay=0.0)
    assert {c.key for c in scale_hyperparameters(opt, 8, 32)} == {"lr", "betas"}


# --------------------------------------------------------------------------------------------
# return value and inputs
# --------------------------------------------------------------------------------------------
def test_return_value_lists_every_change_with_old_and_new():
    opt = torch.optim.AdamW(_params(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    changes = scale_hyperparameters(opt, 32, 128)
    assert [c.key for c in changes] == ["lr", "betas", "weight_decay", "eps"]
    by_key = {c.key: c for c in changes}
    assert all(c.group == 0 for c in changes)
    assert by_key["lr"].old == 1e-3 and by_key["lr"].new == pytest.approx(2e-3)
    assert by_key["betas"].old == (0.9, 0.999)
    assert by_key["betas"].new == pytest.approx((0.6, 0.996))
    assert by_key["weight_decay"].old == 0.1 and by_key["weight_decay"].new == pytest.approx(0.2)
    assert by_key["eps"].old == 1e-8 and by_key["eps"].new == pytest.approx(5e-9)
    for c in changes:  # the reported new value is what the group holds
        assert opt.param_groups[0][c.key] == c.new


def test_tensor_hyperparameters_are_filled_in_place():
    lr, beta1, beta2 = torch.tensor(1e-3), torch.tensor(0.9), torch.tensor(0.999)
    opt = torch.optim.Adam(_params(), lr=lr, betas=(beta1, beta2), foreach=False)
    changes = scale_hyperparameters(opt, 1, 4)
    g = opt.param_groups[0]
    assert g["lr"] is lr and g["betas"][0] is beta1 and g["betas"][1] is beta2
    assert lr.item() == pytest.approx(2e-3) and beta1.item() == pytest.approx(0.6, rel=1e-6)
    assert beta2.item() == pytest.approx(0.996, rel=1e-6)
    assert isinstance(changes[0].old, float)


def test_a_tensor_shared_by_two_groups_is_scaled_once():
    lr = torch.tensor(1e-3)
    params = _params()
    opt = torch.optim.Adam([{"params": [params[0]]}, {"params": [params[1]]}], lr=lr,
                           foreach=False)
    assert opt.param_groups[0]["lr"] is opt.param_groups[1]["lr"] is lr
    changes = scale_hyperparameters(opt, 1, 4)
    assert lr.item() == pytest.approx(2e-3)
    assert [c.group for c in changes if c.key == "lr"] == [0]


@pytest.mark.parametrize("rule", ["SQRT", "sqrt_rule", "", None])
def test_bad_rule_name(rule):
    with pytest.raises(ValueError, match=r"rule: expected one of \('sqrt', 'linear'\)"):
        scale_hyperparameters(torch.optim.AdamW(_params()), 1, 2, rule=rule)


@pytest.mark.parametrize("arg,value", [("from_batch", 0), ("from_batch", -8),
                                       ("to_batch", float("nan")), ("to_batch", True),
                                       ("to_batch", "256"), ("from_batch", float("inf"))])
def test_bad_batch_size(arg, value):
    batches = {"from_batch": 8, "to_batch": 32, arg: value}
    with pytest.raises(ValueError, match=f"{arg}: expected a positive, finite batch size"):
        scale_hyperparameters(torch.optim.AdamW(_params()), **batches)


def test_param_groups_need_the_optimizer_type_and_every_scaled_key():
    params = _params()
    groups = [{"params": [params[0]], "lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8,
               "weight_decay": 0.1, "rank": 4}]
    with pytest.raises(TypeError, match="optimizer_type"):
        scale_hyperparameters(groups, 1, 4)
    changes = scale_hyperparameters(groups, 1, 4, optimizer_type=GaLoreAdamW)
    assert groups[0]["lr"] == pytest.approx(2e-3) and groups[0]["rank"] == 4
    assert len(changes) == 4
    groups[0]["betas"] = (0.9, 0.999)
    del groups[0]["eps"]
    with pytest.raises(ValueError, match="param group 0: no 'eps' key"):
        scale_hyperparameters(groups, 1, 4, optimizer_type=torch.optim.AdamW)
    # plain Adam's decay is L2 unless the group says decoupled: no weight_decay key needed
    coupled = [{"params": [params[0]], "lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8}]
    scale_hyperparameters(coupled, 1, 4, optimizer_type=torch.optim.Adam)
    assert "weight_decay" not in coupled[0]


def test_bad_optimizer_arguments():
    with pytest.raises(TypeError, match="optimizer_or_groups"):
        scale_hyperparameters({"params": [], "lr": 1.0}, 1, 2, optimizer_type=torch.optim.SGD)
    with pytest.raises(TypeError, match="optimizer_or_groups"):
        scale_hyperparameters(3, 1, 2)
    with pytest.raises(ValueError, match="optimizer_type: only for a list"):
        scale_hyperparameters(torch.optim.AdamW(_params()), 1, 2,
                              optimizer_type=torch.optim.AdamW)


# --------------------------------------------------------------------------------------------
# LR schedulers
# --------------------------------------------------------------------------------------------
def _lrs(opt, sched, steps, key="lr"):
    out = []
    for _ in range(steps):
        opt.step()
        sched.step()
        out += [g[key] for g in opt.param_groups]
    return out


SCHEDULERS = {
    "StepLR": lambda o, lr: lr_scheduler.StepLR(o, step_size=3, gamma=0.5),
    "LambdaLR": lambda o, lr: lr_scheduler.LambdaLR(o, lambda s: 1 / (1 + s)),
    "CosineAnnealingLR": lambda o, lr: lr_scheduler.CosineAnnealingLR(o, T_max=8,
                                                                      eta_min=lr / 10),
    "CosineAnnealingWarmRestarts": lambda o, lr: lr_scheduler.CosineAnnealingWarmRestarts(
        o, T_0=4, eta_min=lr / 10),
    "SequentialLR": lambda o, lr: lr_scheduler.SequentialLR(
        o, [lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=3),
            lr_scheduler.CosineAnnealingLR(o, T_max=6, eta_min=lr / 20)], milestones=[3]),
    "CyclicLR": lambda o, lr: lr_scheduler.CyclicLR(o, base_lr=lr / 10, max_lr=lr,
                                                    step_size_up=3),
    "OneCycleLR": lambda o, lr: lr_scheduler.OneCycleLR(o, max_lr=lr, total_steps=12),
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_scaled_scheduler_follows_the_schedule_built_at_the_scaled_values(name):
    """Scaling an optimizer and its scheduler mid-schedule gives, from then on, the lrs (and the
    β1 that CyclicLR/OneCycleLR cycle) of the same schedule built at √κ·lr, with β1 mapped."""
    lr = 1e-2
    opt = torch.optim.AdamW(_params(), lr=lr, betas=(0.9, 0.999))
    sched = SCHEDULERS[name](opt, lr)
    _lrs(opt, sched, 2)
    scale_hyperparameters(opt, 16, 64, scheduler=sched)

    def beta_map(b):
        return 1 - KAPPA * (1 - b)

    ref_opt = torch.optim.AdamW(_params(), lr=lr * ROOT, betas=(beta_map(0.9), beta_map(0.999)))
    if name in ("CyclicLR", "OneCycleLR"):
        # their β1 range (base_momentum 0.8/0.85, max_momentum 0.9/0.95) maps with β1
        base, top = (0.8, 0.9) if name == "CyclicLR" else (0.85, 0.95)
        lo = lr * ROOT / 10
        ref_sched = (lr_scheduler.CyclicLR(ref_opt, base_lr=lo, max_lr=lr * ROOT, step_size_up=3,
                                           base_momentum=beta_map(base),
                                           max_momentum=beta_map(top))
                     if name == "CyclicLR" else
                     lr_scheduler.OneCycleLR(ref_opt, max_lr=lr * ROOT, total_steps=12,
                                             base_momentum=beta_map(base),
                                             max_momentum=beta_map(top)))
    else:
        ref_sched = SCHEDULERS[name](ref_opt, lr * ROOT)
    _lrs(ref_opt, ref_sched, 2)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx(
        [g["lr"] for g in ref_opt.param_groups], rel=1e-12)
    for _ in range(8):
        got, want = _lrs(opt, sched, 1), _lrs(ref_opt, ref_sched, 1)
        assert got == pytest.approx(want, rel=1e-12)
        assert opt.param_groups[0]["betas"] == pytest.approx(ref_opt.param_groups[0]["betas"],
                                                             rel=1e-12)
    assert sched.get_last_lr() == pytest.approx(ref_sched.get_last_lr(), rel=1e-12)


def test_reduce_on_plateau_floors_are_scaled():
    opt = torch.optim.AdamW(_params(), lr=1e-2)
    sched = lr_scheduler.ReduceLROnPlateau(opt, min_lr=1e-4, eps=1e-9)
    changes = scale_hyperparameters(opt, 1, 4, scheduler=sched, rule="linear")
    assert sched.min_lrs == pytest.approx([4e-4]) and sched.default_min_lr == pytest.approx(4e-4)
    assert sched.eps == pytest.approx(4e-9)
    assert "scheduler(ReduceLROnPlateau).min_lrs" in {c.key for c in changes}


def test_scheduler_not_passed_warns_and_its_next_step_undoes_the_lr():
    opt = torch.optim.AdamW(_params(), lr=1e-2)
    sched = lr_scheduler.StepLR(opt, step_size=100)
    with pytest.warns(UserWarning, match="pass it as scheduler="):
        scale_hyperparameters(opt, 1, 4)
    assert opt.param_groups[0]["initial_lr"] == pytest.approx(2e-2)
    opt.step()
    with warnings.catch_warnings():  # torch deprecates step(epoch); its closed form shows it
        warnings.simplefilter("ignore", UserWarning)
        sched.step(0)  # the closed form recomputes lr from base_lrs: the reason for the warning
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2)


def test_scheduler_created_after_scaling_needs_nothing():
    opt = torch.optim.AdamW(_params(), lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scale_hyperparameters(opt, 1, 4)
    sched = lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    assert _lrs(opt, sched, 2) == pytest.approx([1e-2, 5e-3])


def test_unknown_or_foreign_scheduler_is_refused_before_any_change():
    class MyLR(lr_scheduler.LRScheduler):
        def get_lr(self):
            return self.base_lrs

    opt = torch.optim.AdamW(_params(), lr=1e-2)
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=r"scheduler: MyLR is not a scheduler .*StepLR"):
        scale_hyperparameters(opt, 1, 4, scheduler=MyLR(opt))
    other = torch.optim.AdamW(_params(), lr=1e-2)
    with pytest.raises(ValueError, match=r"scheduler\[1\]: StepLR does not schedule"):
        scale_hyperparameters(opt, 1, 4, scheduler=[lr_scheduler.StepLR(opt, 2),
                                                     lr_scheduler.StepLR(other, 2)])
    after = _snapshot(opt)
    for b, a in zip(before, after, strict=True):
        a.pop("initial_lr")
        assert a == b


def test_many_schedulers_and_nested_children_are_reported():
    opt = torch.optim.AdamW(_params(), lr=1e-2)
    warm = lr_scheduler.LinearLR(opt, start_factor=0.5, total_iters=2)
    cos = lr_scheduler.CosineAnnealingLR(opt, T_max=5, eta_min=1e-3)
    chained = lr_scheduler.ChainedScheduler([warm, cos], optimizer=opt)
    keys = {c.key for c in scale_hyperparameters(opt, 1, 4, scheduler=chained)}
    assert {"scheduler(ChainedScheduler)._schedulers[1](CosineAnnealingLR).eta_min",
            "scheduler(ChainedScheduler)._schedulers[0](LinearLR).base_lrs"} <= keys
    assert cos.eta_min == pytest.approx(2e-3) and math.isclose(warm.base_lrs[0], 2e-2)
