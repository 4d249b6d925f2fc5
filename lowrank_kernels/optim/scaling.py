"""Batch-size scaling rules: move an optimizer's hyperparameters from batch B to batch κB.

Square-root rule (Malladi, Lyu, Panigrahi, Arora, NeurIPS 2022, "On the SDEs and Scaling Rules for
Adaptive Gradient Algorithms", the SDE of RMSprop/Adam), with κ = to_batch / from_batch::

    lr → √κ·lr        1 − β1 → κ(1 − β1)        1 − β2 → κ(1 − β2)        ε → ε/√κ

(RMSprop's ``alpha`` is its β2.) The rule keeps the SDE that approximates the optimizer fixed when
time is counted in samples: one step at κB stands for κ steps at B, the moments' horizons 1/(1−β)
shrink by κ, the noise of V's estimate (∝ 1/B) makes √V shrink by √κ, hence ε/√κ and the update
η·M/√V grows by √κ·√κ = κ per step, i.e. stays the same per sample. It holds in the
noise-dominated regime the SDE assumes (small lr, gradient noise ≫ gradient); it is refused when
κ(1 − β) ≥ 1, where 1 − β would leave [0, 1) (β ≤ 0: the moving average is gone).

Decoupled weight decay (AdamW, LowRankAdamW and its presets, Adam with
``decoupled_weight_decay=True``) shrinks W by lr·wd per step; keeping the shrinkage per sample
needs lr·wd → κ·lr·wd, i.e. wd → √κ·wd under the square-root rule (the same EMA-timescale
argument as Wang & Aitchison 2024, "How to set AdamW's weight decay as you scale model and
dataset size"). ``scale_weight_decay=False`` keeps wd. Coupled (L2) decay is part of the loss
and is never changed.

Linear rule (Goyal et al. 2017, "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour"; its
SDE justification for SGD: Jastrzębski et al. 2017, Li, Malladi, Arora 2021): lr → κ·lr, nothing
else. It is SGD's rule; for Adam it is offered for comparison only (it is not recommended: the
adaptive update does not scale with the gradient's size, so κ·lr makes each sample's step κ/√κ
times larger than the square-root rule's).

Which rules each optimizer accepts (anything else raises, naming the optimizer type):

================================================  ==============  ==================================
LowRankAdamW (GaLoreAdamW, QGaLoreAdamW,          sqrt, linear    lr, betas, eps, decoupled wd
DCTAdamW and any subclass), torch Adam, AdamW
torch RMSprop                                     sqrt, linear    lr, alpha, eps (sqrt needs
                                                                  momentum = 0, centered = False)
torch SGD                                         linear          lr (momentum unchanged, as Goyal)
torch Adagrad, LowRankAdagrad                     none            no moving average to rescale
================================================  ==============  ==================================

Left unchanged, by design: GaLore's ``scale`` (it multiplies lr in the update; scaling both
would apply the lr factor twice) and everything counted in steps — GaLore's ``update_proj_gap``,
a scheduler's horizon (``T_max``, ``step_size``, ``milestones``, ``total_steps``), warm-up
lengths. They depend on how many steps the caller will run, which this function does not know;
at a fixed sample budget divide them by κ yourself (docs/scaling.md). Optimizer state (M, V) is
never touched: applied mid-run, V adapts to the new batch's noise within ~1/(1 − β2') steps.

Learning-rate schedulers keep copies of lr: ``initial_lr`` in each group (scaled here, with
OneCycleLR's ``max_lr``/``min_lr`` and the β1 values cycled by OneCycleLR/CyclicLR) and their own
``base_lrs`` and lr floors, which only the scheduler object holds: pass it as ``scheduler=`` or
create the scheduler after scaling, otherwise its next step undoes the lr change.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch.optim import lr_scheduler

from lowrank_kernels.optim.lowrank_adagrad import LowRankAdagrad
from lowrank_kernels.optim.lowrank_adamw import LowRankAdamW

RULES = ("sqrt", "linear")

# optimizer class → (family, rules it accepts); looked up along the MRO, so a subclass registered
# here (LowRankAdagrad) takes precedence over its base class (LowRankAdamW)
_FAMILIES: dict[type, tuple[str, tuple[str, ...]]] = {
    LowRankAdagrad: ("adagrad", ()),
    LowRankAdamW: ("adam", RULES),
    torch.optim.AdamW: ("adam", RULES),
    torch.optim.Adam: ("adam", RULES),
    torch.optim.RMSprop: ("rmsprop", RULES),
    torch.optim.SGD: ("sgd", ("linear",)),
    torch.optim.Adagrad: ("adagrad", ()),
}
_WHY_NOT = {
    "sgd": "the SDE-derived rule for SGD is the linear one; the square-root rule rescales "
           "Adam/RMSprop's moving averages, which SGD does not have",
    "adagrad": "Adagrad sums squared gradients instead of averaging them, so there is no β to "
               "rescale, and neither rule is derived for it; tune its lr per batch size "
               "(bench/adagrad_batch.py measures how it behaves as the batch grows)",
}

LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")  # lr-valued group keys (the last three:
#                                                     written by torch's LR schedulers)
MOMENTUM_KEYS = ("base_momentum", "max_momentum")  # β1 values cycled by OneCycleLR / CyclicLR

# scheduler class → lr-valued attributes beyond base_lrs/_last_lr (scalar or one per group)
_SCHEDULERS: dict[type, tuple[str, ...]] = {
    lr_scheduler.LambdaLR: (),
    lr_scheduler.MultiplicativeLR: (),
    lr_scheduler.StepLR: (),
    lr_scheduler.MultiStepLR: (),
    lr_scheduler.ConstantLR: (),
    lr_scheduler.LinearLR: (),
    lr_scheduler.ExponentialLR: (),
    lr_scheduler.PolynomialLR: (),
    lr_scheduler.CosineAnnealingLR: ("eta_min",),
    lr_scheduler.CosineAnnealingWarmRestarts: ("eta_min",),
    lr_scheduler.ReduceLROnPlateau: ("min_lrs", "default_min_lr", "eps"),
    lr_scheduler.CyclicLR: ("max_lrs",),
    lr_scheduler.OneCycleLR: (),
    lr_scheduler.SequentialLR: (),
    lr_scheduler.ChainedScheduler: (),
}


@dataclasses.dataclass(frozen=True)
class Change:
    """One value ``scale_hyperparameters`` changed.

    ``group`` is the param group's index (for a scheduler's per-group list, the list index; None
    for a scheduler's scalar); ``key`` the group key, or ``scheduler(<Class>).<attribute>`` with
    ``._schedulers[i](<Class>)`` for the children of SequentialLR/ChainedScheduler. ``betas``
    is one change holding both values."""

    group: int | None
    key: str
    old: float | tuple[float, ...]
    new: float | tuple[float, ...]


@dataclasses.dataclass
class _Edit:
    container: Any  # dict, list or object
    slot: Any  # key, index or attribute name
    value: Any  # what goes into the slot
    fills: list[tuple[torch.Tensor, float]]  # tensor values are filled in place, not replaced
    change: Change


def _lookup(cls: type, table: dict[type, Any]) -> tuple[type, Any] | None:
    for base in cls.__mro__:
        if base in table:
            return base, table[base]
    return None


def _check_batch(value: object, name: str) -> float:
    if (isinstance(value, bool) or not isinstance(value, numbers.Real)
            or not math.isfinite(value) or value <= 0):
        raise ValueError(f"{name}: expected a positive, finite batch size, got {value!r}")
    return float(value)


def _as_float(value: Any) -> float:
    return float(value.item()) if torch.is_tensor(value) else float(value)


class _Planner:
    """Collects every edit first, so nothing is written unless all values pass validation."""

    def __init__(self, kappa: float, rule: str, from_batch: float):
        self.kappa, self.rule, self.from_batch = kappa, rule, from_batch
        self.lr_factor = math.sqrt(kappa) if rule == "sqrt" else kappa
        self.edits: list[_Edit] = []
        self.tensors: set[int] = set()  # a tensor shared by two slots must be scaled once

    def _first_time(self, value: Any) -> bool:
        if not torch.is_tensor(value):
            return True
        seen = id(value) in self.tensors
        self.tensors.add(id(value))
        return not seen

    def add(self, container: Any, slot: Any, old: Any, new: float, group: int | None,
            key: str) -> None:
        if new == _as_float(old) or not self._first_time(old):  # wd = 0, eps = 0: no change
            return
        fills = [(old, new)] if torch.is_tensor(old) else []
        self.edits.append(_Edit(container, slot, old if fills else new, fills,
                                Change(group, key, _as_float(old), new)))

    def beta(self, value: Any, where: str) -> float:
        """1 − β → κ(1 − β), refused when κ(1 − β) ≥ 1 (β would be ≤ 0)."""
        beta = _as_float(value)
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"{where}: expected a value in [0, 1), got {beta}")
        one_minus = self.kappa * (1.0 - beta)
        if one_minus >= 1.0:
            largest = self.from_batch / (1.0 - beta)
            raise ValueError(
                f"{where} = {beta}: the square-root rule with κ = {self.kappa:g} gives "
                f"1 − β = κ(1 − β) = {one_minus:g}, outside [0, 1); from this β the batch must "
                f"stay below {largest:g} (from_batch / (1 − β))")
        return 1.0 - one_minus


def _plan_group(plan: _Planner, i: int, group: dict, family: str, decoupled: bool,
                scale_weight_decay: bool) -> None:
    where = f"param group {i}"

    def need(key: str) -> Any:
        if key not in group:
            raise ValueError(f"{where}: no {key!r} key; the {plan.rule} rule must scale it and "
                             "the optimizer's default would apply unscaled: set it in the group")
        return group[key]

    need("lr")
    for key in LR_KEYS:
        if key in group:
            value = group[key]
            if not _as_float(value) >= 0.0:
                raise ValueError(f"{where}: {key} = {value}: expected a value >= 0")
            plan.add(group, key, value, _as_float(value) * plan.lr_factor, i, key)
    if plan.rule != "sqrt":
        return
    root = math.sqrt(plan.kappa)
    if family == "rmsprop":
        for key in ("momentum", *MOMENTUM_KEYS):
            if _as_float(group.get(key, 0.0)) != 0.0:
                raise ValueError(f"{where}: {key} = {group[key]}: the square-root rule is derived "
                                 "for RMSprop without momentum (momentum = 0)")
        if group.get("centered", False):
            raise ValueError(f"{where}: centered=True: the square-root rule is derived for "
                             "uncentered RMSprop")
        alpha = need("alpha")
        plan.add(group, "alpha", alpha, plan.beta(alpha, f"{where}: alpha"), i, "alpha")
    else:  # adam
        betas = need("betas")
        new = tuple(plan.beta(b, f"{where}: betas[{k}]") for k, b in enumerate(betas))
        fills = [(b, v) for b, v in zip(betas, new) if torch.is_tensor(b) and plan._first_time(b)]
        plan.edits.append(_Edit(group, "betas",
                                tuple(b if torch.is_tensor(b) else v for b, v in zip(betas, new)),
                                fills, Change(i, "betas", tuple(map(_as_float, betas)), new)))
        for key in MOMENTUM_KEYS:  # β1 cycled by a scheduler
            if key in group:
                plan.add(group, key, group[key], plan.beta(group[key], f"{where}: {key}"), i, key)
        if decoupled and scale_weight_decay:
            wd = need("weight_decay")
            plan.add(group, "weight_decay", wd, _as_float(wd) * root, i, "weight_decay")
    eps = need("eps")
    plan.add(group, "eps", eps, _as_float(eps) / root, i, "eps")


def _plan_scheduler(plan: _Planner, sched: Any, path: str, family: str) -> None:
    found = _lookup(type(sched), _SCHEDULERS)
    if found is None:
        supported = ", ".join(sorted(c.__name__ for c in _SCHEDULERS))
        raise ValueError(f"{path}: {type(sched).__name__} is not a scheduler whose lr-valued "
                         f"attributes are known here (supported: {supported}); create it after "
                         "scaling instead")
    path = f"{path}({type(sched).__name__})"
    for attr in ("base_lrs", "_last_lr", *found[1]):
        value = getattr(sched, attr, None)
        if value is None:
            continue
        if isinstance(value, list):
            for k, v in enumerate(value):
                plan.add(value, k, v, _as_float(v) * plan.lr_factor, k, f"{path}.{attr}")
        else:
            plan.add(sched, attr, value, _as_float(value) * plan.lr_factor, None,
                     f"{path}.{attr}")
    if plan.rule == "sqrt" and family == "adam" and getattr(sched, "cycle_momentum", False):
        for attr in ("base_momentums", "max_momentums"):  # CyclicLR's copies of the β1 range
            values = getattr(sched, attr, None) or []
            for k, v in enumerate(values):
                plan.add(values, k, v, plan.beta(v, f"{path}.{attr}[{k}]"), k, f"{path}.{attr}")
    for j, child in enumerate(getattr(sched, "_schedulers", ())):
        _plan_scheduler(plan, child, f"{path}._schedulers[{j}]", family)


def _apply(edit: _Edit) -> None:
    for tensor, value in edit.fills:
        tensor.fill_(value)
    if isinstance(edit.container, (dict, list)):
        edit.container[edit.slot] = edit.value
    else:
        setattr(edit.container, edit.slot, edit.value)


def _groups_and_type(optimizer_or_groups: Any, optimizer_type: type | None
                     ) -> tuple[list[dict], type]:
    if isinstance(optimizer_or_groups, torch.optim.Optimizer):
        if optimizer_type is not None:
            raise ValueError("optimizer_type: only for a list of param groups; an optimizer's "
                             f"type is its own ({type(optimizer_or_groups).__name__})")
        return optimizer_or_groups.param_groups, type(optimizer_or_groups)
    if isinstance(optimizer_or_groups, dict) or not isinstance(optimizer_or_groups, Iterable):
        raise TypeError("optimizer_or_groups: expected a torch.optim.Optimizer or a list of "
                        f"param-group dicts, got {type(optimizer_or_groups).__name__}")
    groups = list(optimizer_or_groups)
    if not groups or not all(isinstance(g, dict) for g in groups):
        raise ValueError("optimizer_or_groups: expected a non-empty list of param-group dicts")
    if not isinstance(optimizer_type, type):
        raise TypeError("optimizer_type: param groups alone do not say which optimizer they "
                        "are for; pass its class (e.g. torch.optim.AdamW), got "
                        f"{optimizer_type!r}")
    return groups, optimizer_type


def scale_hyperparameters(optimizer_or_groups: torch.optim.Optimizer | Sequence[dict],
                          from_batch: float, to_batch: float, rule: str = "sqrt", *,
                          optimizer_type: type | None = None,
                          scheduler: Any = None, scale_weight_decay: bool = True
                          ) -> list[Change]:
    """Rescales every param group's hyperparameters, in place, for a batch of ``to_batch``
    instead of ``from_batch`` (κ = to_batch / from_batch; κ < 1 shrinks the batch), and returns
    the values it changed.

    Rules (module docstring and docs/scaling.md: the equations, their sources, what each
    optimizer accepts):
      * ``"sqrt"`` (Malladi et al. 2022, Adam/RMSprop): lr·√κ, 1−β1 → κ(1−β1), 1−β2 → κ(1−β2)
        (RMSprop's alpha), ε/√κ, decoupled weight decay ·√κ (unless ``scale_weight_decay=False``).
      * ``"linear"`` (Goyal et al. 2017, SGD): lr·κ; nothing else.

    ``optimizer_or_groups``: an optimizer (LowRankAdamW or a subclass, torch Adam, AdamW, RMSprop,
    SGD, Adagrad; LowRankAdagrad and torch Adagrad accept no rule), or a list of param-group dicts together with ``optimizer_type``, the class
    they are for; such groups must hold every key the rule scales (a missing key would get the
    optimizer's default unscaled). The lr-valued keys ``lr``, ``initial_lr``, ``max_lr``,
    ``min_lr`` are scaled wherever present, and OneCycleLR/CyclicLR's ``base_momentum`` and
    ``max_momentum`` follow β1. ``scheduler``: an LR scheduler of this optimizer (or a list of
    them); its ``base_lrs``, last lrs and lr floors (``eta_min``, ``min_lrs``, ``max_lrs``) are
    scaled too, and children of SequentialLR/ChainedScheduler. A group with ``initial_lr`` and no
    scheduler passed warns: the scheduler's next step would undo the lr change.

    Returns one :class:`Change` per changed value (group index, key, old, new; floats), in
    group order then scheduler order; κ = 1 changes nothing and returns []. Raises, before
    anything is modified: ValueError for a bad batch size or rule, an optimizer or scheduler type
    without the rule, a scheduler of other groups, a β with κ(1 − β) ≥ 1, or a group missing a
    scaled key; TypeError for an argument of the wrong type.
    """
    if rule not in RULES:
        raise ValueError(f"rule: expected one of {RULES}, got {rule!r}")
    from_b = _check_batch(from_batch, "from_batch")
    kappa = _check_batch(to_batch, "to_batch") / from_b
    groups, cls = _groups_and_type(optimizer_or_groups, optimizer_type)
    found = _lookup(cls, _FAMILIES)
    if found is None:
        names = ", ".join(c.__name__ for c in _FAMILIES)
        raise ValueError(f"optimizer_or_groups: {cls.__name__} has no batch-size rule here "
                         f"(supported: {names} and their subclasses)")
    base, (family, rules) = found
    if rule not in rules:
        accepted = f"only {rules}" if rules else "neither rule"
        raise ValueError(f"rule: {cls.__name__} accepts {accepted}, got {rule!r}: "
                         f"{_WHY_NOT[family]}")
    schedulers = [] if scheduler is None else (
        list(scheduler) if isinstance(scheduler, (list, tuple)) else [scheduler])
    for k, sched in enumerate(schedulers):
        sched_groups = getattr(getattr(sched, "optimizer", None), "param_groups", None)
        if (sched_groups is None or len(sched_groups) != len(groups)
                or any(a is not b for a, b in zip(sched_groups, groups))):
            raise ValueError(f"scheduler[{k}]: {type(sched).__name__} does not schedule these "
                             "param groups")
    if kappa == 1.0:
        return []

    plan = _Planner(kappa, rule, from_b)
    for i, group in enumerate(groups):
        decoupled = base is LowRankAdamW or group.get(
            "decoupled_weight_decay", base is torch.optim.AdamW)
        _plan_group(plan, i, group, family, decoupled, scale_weight_decay)
    for k, sched in enumerate(schedulers):
        _plan_scheduler(plan, sched, "scheduler" if len(schedulers) == 1 else f"scheduler[{k}]",
                        family)
    if not schedulers and any("initial_lr" in g for g in groups):
        warnings.warn("param groups have 'initial_lr': an LR scheduler is attached; pass it as "
                      "scheduler= so its base_lrs are scaled too, or its next step will undo "
                      "the lr change", stacklevel=2)
    for edit in plan.edits:
        _apply(edit)
    return [e.change for e in plan.edits]
