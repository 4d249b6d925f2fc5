"""FiraAdamW and APOLLOAdamW: LowRankAdamW with the scaled full-rank term in the same fused call.

Both add to GaLore's low-rank Adam step a term built from the whole gradient G, scaled per
channel (or per tensor) by φ = ‖N‖/(‖R‖ + 1e-8), whose norm the norm-growth limiter keeps from
growing by more than γ = 1.01 per step (DESIGN.md §4.6-§4.7, docs/methods.md; with a = scale,
α_t the bias-corrected step size, d = 1 − lr·wd)::

    Fira:    W ← d·(W − α_t·(a·back(N) + ℓ·φ⊙(G − a·back(R))))
    APOLLO:  W ← d·(W − α_t·√a·ℓ·φ⊙G)                    (no back projection)

ℓ ≤ 1 is the limiter's factor: ‖S‖ of the limited term S (the φ⊙… part) is kept in the state as
a 1-element fp32 tensor on the weight's device (``limiter``, negative before the first step),
read and written by the kernel itself, so a step never synchronises with the host. Each weight
takes ONE ``fused_galore_step`` call (``full_rank="fira"|"apollo"``): G is read twice and W once,
with no m×n temporary.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from lowrank_kernels import distributed
from lowrank_kernels.optim.lowrank_adamw import LowRankAdamW
from lowrank_kernels.optim.presets import GaLoreAdamW

APOLLO_PROJ = {"random": "gaussian", "svd": "svd"}  # apollo-torch's proj -> our projection
SCALE_TYPES = ("channel", "tensor")


class _FullRankAdamW(LowRankAdamW):
    """The shared part: the limiter's state, the full-rank arguments of each fused call, the
    peers' AdamW for unprojected parameters (ε not bias-corrected, decay after the update), and
    no sharded weights (the sharded step composes GaLore's pieces only)."""

    MODE = "none"

    def _check_group(self, group: dict, index: int) -> None:
        super()._check_group(group, index)
        if group.get("rank") is None:
            return
        if group["state_dtype"] == "8bit":
            raise ValueError(f"{self._group_label(group, index)}: "
                             f"state_dtype: {type(self).__name__} keeps fp32 or bf16 moments "
                             f"('auto', torch.float32 or torch.bfloat16), got '8bit' (the fused "
                             f"step's full-rank modes take no 8-bit moments)")
        if group["second_moment"] != "full":
            raise ValueError(f"{self._group_label(group, index)}: "
                             f"second_moment: {type(self).__name__} keeps the full V ('full'), "
                             f"got {group['second_moment']!r} (the fused step's full-rank "
                             f"modes take no factored V)")
        for i, p in enumerate(group["params"]):
            if distributed.is_sharded(p):
                raise ValueError(f"{self._name(group, i, p)}: {type(self).__name__} does not "
                                 "step sharded (FSDP2) weights; DDP and single-process "
                                 "training are supported")

    def _init_projected_state(self, state: dict, p: torch.Tensor, spec, group: dict,
                              position: int) -> None:
        super()._init_projected_state(state, p, spec, group, position)
        # ‖S_prev‖, negative before the first step; the kernel reads and writes it in place
        state["limiter"] = torch.full((1,), -1.0, dtype=torch.float32, device=p.device)

    def _full_rank_args(self, group: dict, state: dict) -> dict:
        return {"full_rank": self.MODE, "limiter": state["limiter"]}

    def _step_hyper(self, group: dict, state: dict, p: torch.Tensor, step: int) -> dict:
        return {**super()._step_hyper(group, state, p, step),
                **self._full_rank_args(group, state)}


class FiraAdamW(_FullRankAdamW, GaLoreAdamW):
    """``fira.FiraAdamW`` (fira 1.0.2) with each projected step one fused call.

    Same constructor and group keys: ``rank``, ``update_proj_gap``, ``alpha`` (Fira's scale a
    of both back projections; ``scale`` is the same key under LowRankAdamW's name — give one),
    ``proj_type`` ("std"). The basis is galore-torch's SVD by default; every LowRankAdamW key
    (``projection``, ``proj_bits``, ``refresh``, ``state_dtype``, …) applies too.
    ``no_deprecation_warning`` is accepted and ignored.

    State per projected weight: LowRankAdamW's plus ``limiter`` (fira's ``scaling_grad``, as a
    1-element fp32 tensor on the weight's device).
    """

    MODE = "fira"  # the constructor is GaLoreAdamW's (fira's has the same arguments)

    def add_param_group(self, param_group: dict) -> None:
        if isinstance(param_group, dict) and "alpha" in param_group:
            if "scale" in param_group:
                raise ValueError("alpha, scale: the same key under two names (fira's alpha is "
                                 "LowRankAdamW's scale); give one")
            param_group = {**param_group, "scale": param_group["alpha"]}
            del param_group["alpha"]
        super().add_param_group(param_group)


class APOLLOAdamW(_FullRankAdamW):
    """``apollo_torch.APOLLOAdamW`` (apollo-torch 1.0.3) with each projected step one fused call.

    Same constructor (``scale_front``, ``disable_nl``) and group keys: ``rank``, ``proj``
    ("random": APOLLO's N(0, 1/r) basis; "svd": galore-torch's), ``scale_type`` ("channel" |
    "tensor"), ``scale`` (the update carries √scale), ``update_proj_gap``, ``proj_type``
    ("std"). APOLLO-Mini is ``rank=1, scale_type="tensor"`` (its recipe: ``scale=128``).
    ``scale_front`` and ``disable_nl`` are group keys here as well (the constructor's values are
    their defaults). Defaults of keys apollo-torch requires: ``proj="random"``,
    ``scale_type="channel"`` (transformers' defaults for ``optim="apollo_adamw"``).

    The random basis is generated from (the parameter's seed, its refresh count) by
    ``ops.random_basis`` inside each step: the state holds no basis (``proj_seed`` and
    ``proj_refreshes`` are the basis), as APOLLO regenerates it from its seed. Its values are
    our Philox stream's, not torch's ``randn``: same distribution, different draws.

    State per projected weight: LowRankAdamW's (no ``proj`` with proj="random") plus
    ``limiter`` (apollo-torch's ``scaled_grad``, a 1-element fp32 tensor on the weight's
    device; allocated also with ``disable_nl``, unused then).
    """

    MODE = "apollo"

    def __init__(self, params: Iterable, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, correct_bias: bool = True,
                 scale_front: bool = False, disable_nl: bool = False,
                 no_deprecation_warning: bool = True, *, proj: str = "random",
                 scale_type: str = "channel", **lowrank_options):
        self._apollo_defaults = dict(proj=proj, scale_type=scale_type, scale_front=scale_front,
                                     disable_nl=disable_nl)
        lowrank_options.setdefault("dense_adamw", "galore")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         correct_bias=correct_bias, **lowrank_options)

    def _extra_defaults(self) -> dict:
        return dict(self._apollo_defaults)

    def add_param_group(self, param_group: dict) -> None:
        if isinstance(param_group, dict):
            param_group = self._with_projection(param_group)
        super().add_param_group(param_group)

    def _with_projection(self, group: dict) -> dict:
        """Validates APOLLO's keys and sets LowRankAdamW's ``projection`` from ``proj``."""
        get = {**self._apollo_defaults, **group}.get
        if get("proj") not in APOLLO_PROJ:
            raise ValueError(f"proj: expected 'random' or 'svd', got {get('proj')!r}")
        if get("scale_type") not in SCALE_TYPES:
            raise ValueError(f"scale_type: expected 'channel' or 'tensor', got "
                             f"{get('scale_type')!r}")
        for key in ("scale_front", "disable_nl"):
            if not isinstance(get(key), bool):
                raise ValueError(f"{key}: expected a bool, got {get(key)!r}")
        projection = APOLLO_PROJ[get("proj")]
        if group.get("projection", projection) != projection:
            raise ValueError(f"projection: APOLLOAdamW takes it from proj ({get('proj')!r} -> "
                             f"{projection!r}), got projection={group['projection']!r}")
        return {**group, "projection": projection}

    def _full_rank_args(self, group: dict, state: dict) -> dict:
        return {"full_rank": "apollo", "full_rank_norm": group["scale_type"],
                "limiter": None if group["disable_nl"] else state["limiter"],
                "scale_front": group["scale_front"]}
