"""Build lowrank_kernels optimizers from Hugging Face ``TrainingArguments``.

Targets are chosen as transformers does for its GaLore/APOLLO optimizers
(``optim_target_modules``): ``"all-linear"`` (every ``nn.Linear``), one regex string (matched in
full against module names), or a list of strings (a module matches if its name equals an entry,
contains it, or matches it as a regex). The weights of the matching ``nn.Linear`` modules are
projected; every other parameter takes plain AdamW.

Two ways to hand the optimizer to a ``Trainer``::

    from lowrank_kernels.integrations.transformers import build_optimizer, optimizer_cls_and_kwargs

    args = TrainingArguments(..., optim_target_modules=["attn", "mlp"],
                             optim_args="rank=128,update_proj_gap=200,scale=0.25")
    # 1. a ready optimizer (the Trainer still builds the LR scheduler)
    trainer = Trainer(model=model, args=args, optimizers=(build_optimizer(model, args), None))
    # 2. a class and its kwargs, built by the Trainer
    trainer = Trainer(model=model, args=args,
                      optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(model, args))

``optimizer`` picks the preset: "galore" (GaLoreAdamW), "qgalore" (QGaLoreAdamW), "dct"
(DCTAdamW), "fira" (FiraAdamW), "apollo" (APOLLOAdamW: ``optim_args`` as transformers passes
them to apollo-torch for ``optim="apollo_adamw"``: rank, proj, scale_type, update_proj_gap,
scale, proj_type, with its defaults 128, random, channel, 200, 1.0, std), "lowrank"
(LowRankAdamW) or "adagrad" / "lowrank_adagrad" (LowRankAdagrad, which takes lr and weight decay
from ``args`` but not Adam's betas and ε: its ε is torch Adagrad's 1e-10). ``optim_args``
(comma-separated key=value, as the Trainer takes it) and keyword arguments set group keys such
as rank, update_proj_gap, scale, projection, proj_bits, refresh, state_dtype (``auto``, the
default: the weight's dtype, bf16 moments stochastically rounded; ``fp32``; ``bf16``; ``8bit``:
FP8-like codes with block scales, DESIGN.md §4.9, not with fira/apollo); keyword arguments win.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from lowrank_kernels.autograd import Int8Linear
from lowrank_kernels.optim import (
    APOLLOAdamW,
    DCTAdamW,
    FiraAdamW,
    GaLoreAdamW,
    LowRankAdagrad,
    LowRankAdamW,
    QGaLoreAdamW,
)

PRESETS = {"galore": GaLoreAdamW, "qgalore": QGaLoreAdamW, "dct": DCTAdamW,
           "fira": FiraAdamW, "apollo": APOLLOAdamW, "lowrank": LowRankAdamW,
           "adagrad": LowRankAdagrad, "lowrank_adagrad": LowRankAdagrad}
# group keys read from optim_args, with their types (strings come from the command line)
STATE_DTYPE_NAMES = {"auto": "auto", "fp32": torch.float32, "float32": torch.float32,
                     "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "8bit": "8bit"}


def _state_dtype(name: str) -> str | torch.dtype:
    if name not in STATE_DTYPE_NAMES:
        raise ValueError(f"optim_args: state_dtype expected one of {sorted(STATE_DTYPE_NAMES)}, "
                         f"got {name!r}")
    return STATE_DTYPE_NAMES[name]


def _bool(value: str) -> bool:
    if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"optim_args: expected true or false, got {value!r}")
    return value.lower() in ("true", "1")


GROUP_KEYS = {"rank": int, "update_proj_gap": int, "scale": float, "proj_type": str,
              "projection": str, "proj_bits": int, "proj_group_size": int, "refresh": str,
              "refresh_threshold": float, "refresh_growth": float, "refresh_max_gap": int,
              "seed": int, "state_dtype": _state_dtype, "second_moment": str,
              # fira's and apollo-torch's own names (FiraAdamW, APOLLOAdamW)
              "alpha": float, "proj": str, "scale_type": str, "scale_front": _bool,
              "disable_nl": _bool}
GROUP_DEFAULTS = {"rank": 128, "update_proj_gap": 200, "scale": 0.25}  # galore's LLaMA recipe
# per preset, where it differs: transformers' defaults for optim="apollo_adamw"
PRESET_GROUP_DEFAULTS = {"apollo": {"rank": 128, "update_proj_gap": 200, "scale": 1.0,
                                    "proj": "random", "scale_type": "channel"}}


def _matches(target_modules: str | list[str], name: str) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(t == name or t in name or re.fullmatch(t, name) is not None
               for t in target_modules)


def _is_all_linear(target_modules) -> bool:
    return isinstance(target_modules, str) and target_modules.replace("_", "-") == "all-linear"


LINEAR_TYPES = (torch.nn.Linear, Int8Linear)

def target_linear_names(model: torch.nn.Module, target_modules: str | list[str]) -> list[str]:
    """Names of the ``nn.Linear`` (and ``Int8Linear``) modules of ``model`` selected by
    ``target_modules``."""
    if not isinstance(target_modules, (str, list, tuple)):
        raise TypeError("target_modules: expected 'all-linear', a regex string or a list of "
                        f"strings, got {target_modules!r}")
    names = [name for name, module in model.named_modules()
             if isinstance(module, LINEAR_TYPES)
             and (_is_all_linear(target_modules) or _matches(target_modules, name))]
    if not names:
        raise ValueError(f"target_modules: {target_modules!r} matches no nn.Linear of the model")
    return names


def lowrank_param_groups(model: torch.nn.Module, target_modules: str | list[str] = "all-linear",
                         *, group_defaults: dict[str, Any] | None = None,
                         **group_keys: Any) -> list[dict]:
    """Two groups: the other trainable parameters (plain AdamW), then the target Linear weights
    with ``group_keys`` (``rank`` etc.) over ``group_defaults`` (GROUP_DEFAULTS by default;
    fira's ``alpha`` replaces the default ``scale``). Each group carries the parameter
    ``names``."""
    defaults = dict(GROUP_DEFAULTS if group_defaults is None else group_defaults)
    if "alpha" in group_keys:
        defaults.pop("scale", None)
    targets = {f"{name}.weight" for name in target_linear_names(model, target_modules)}
    # INT8 codes do not require grad (their gradient arrives in .float_grad) but are trained
    int8 = {f"{name}.weight" for name, module in model.named_modules()
            if isinstance(module, Int8Linear)}
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad or n in int8]
    rest = [(n, p) for n, p in named if n not in targets]
    projected = [(n, p) for n, p in named if n in targets]
    groups = [{"params": [p for _, p in projected], "names": [n for n, _ in projected],
               **defaults, **group_keys}]
    if rest:
        groups.insert(0, {"params": [p for _, p in rest], "names": [n for n, _ in rest]})
    return groups


def parse_optim_args(optim_args: str | None) -> dict[str, Any]:
    """``"rank=64,refresh=lazy"`` -> ``{"rank": 64, "refresh": "lazy"}`` (typed; unknown keys
    raise, so a typo is not silently ignored)."""
    parsed: dict[str, Any] = {}
    for item in filter(None, (optim_args or "").replace(" ", "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in GROUP_KEYS:
            raise ValueError(f"optim_args: expected key=value with key in {sorted(GROUP_KEYS)}, "
                             f"got {item!r}")
        parsed[key] = None if value == "None" else GROUP_KEYS[key](value)
    return parsed


def optimizer_cls_and_kwargs(model: torch.nn.Module, args, optimizer: str = "galore",
                             target_modules: str | list[str] | None = None, **group_keys: Any
                             ) -> tuple[type, dict[str, Any]]:
    """``(optimizer class, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)``: the kwargs
    carry the parameter groups under ``params`` (the Trainer uses them instead of its own) and
    lr, betas, eps and weight decay from ``args`` (AdaGrad: lr and weight decay only)."""
    if optimizer not in PRESETS:
        raise ValueError(f"optimizer: expected one of {tuple(PRESETS)}, got {optimizer!r}")
    targets = target_modules if target_modules is not None else args.optim_target_modules
    if targets is None:
        raise ValueError("target_modules: pass target_modules= or set "
                         "TrainingArguments.optim_target_modules")
    keys = {**parse_optim_args(getattr(args, "optim_args", None)), **group_keys}
    groups = lowrank_param_groups(model, targets,
                                  group_defaults=PRESET_GROUP_DEFAULTS.get(optimizer), **keys)
    kwargs = {"params": groups, "lr": args.learning_rate,
              "weight_decay": args.weight_decay}
    if not issubclass(PRESETS[optimizer], LowRankAdagrad):  # Adam's keys (Adagrad has none)
        kwargs.update(betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    return PRESETS[optimizer], kwargs


def build_optimizer(model: torch.nn.Module, args, optimizer: str = "galore",
                    target_modules: str | list[str] | None = None, **group_keys: Any
                    ) -> LowRankAdamW:
    """The optimizer itself, for ``Trainer(optimizers=(optimizer, None))``."""
    cls, kwargs = optimizer_cls_and_kwargs(model, args, optimizer, target_modules, **group_keys)
    return cls(kwargs.pop("params"), **kwargs)
