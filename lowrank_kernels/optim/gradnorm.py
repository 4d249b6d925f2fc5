"""GradNormLoRPAdamW: GradNormLoRP (gradient-weight-normalised low-rank projection) on the fused
``torch.ops.lowrank.fused_gradnorm_step`` (DESIGN.md §4.8, docs/optimizers.md)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from lowrank_kernels import distributed, ops, reference
from lowrank_kernels.optim.lowrank_adamw import _is_projected
from lowrank_kernels.optim.presets import GaLoreAdamW
from lowrank_kernels.projection import state as proj_state

ROW_STATE_KEYS = ("row_scale", "row_norm", "scale_exp_avg", "scale_exp_avg_sq")


class GradNormLoRPAdamW(GaLoreAdamW):
    r"""GradNormLoRP: the authors' ``LowRankWeightNormAdamW`` (github Jhhuangkay/Gradient-Weight-
    normalized-Low-rank-Projection-for-Efficient-LLM-Training) with each projected weight's step
    fused into one ``torch.ops.lowrank.fused_gradnorm_step`` call, keeping W itself and four
    floats per row instead of their full-precision copy v of every weight.

    Each projected weight is reparametrised row by row as W = g ⊙ v/‖v‖. The authors' step
    (every step re-sets g ← ‖v‖ first, so a learned g lives for one forward pass)::

        ∇v = G·g/‖v‖ (= G),   ∇g_i = Σ_j G_ij·v_ij/‖v_i‖
        N = Adam(project(∇v)),  N_g = Adam(∇g)              (ε not bias-corrected; one α_t)
        v ← d·(v − α_t·scale·back(N)),   g ← d·(‖v‖ − α_t·N_g),   W = g ⊙ v/‖v‖

    with d = 1 − lr·weight_decay, α_t = lr·√(1−β2ᵗ)/(1−β1ᵗ) (lr if ``correct_bias=False``) and
    the projection of GaLore (side rule "std", refreshed every ``update_proj_gap`` steps; the
    SVD is taken of G, which equals ∇v up to rounding). Ours stores g and ‖v‖ and rebuilds
    v = (‖v‖/g) ⊙ W (ops.fused_gradnorm_step has the maths); the trajectory is the authors' to
    fp32 rounding (tests/test_optim_gradnorm.py: 20 steps through this optimizer).

    The constructor is GaLoreAdamW's (the authors' has galore-torch's signature).

    **Group keys**: those of :class:`LowRankAdamW` (galore-torch's ``rank``,
    ``update_proj_gap``, ``scale``, ``proj_type``; ``projection``, ``proj_bits``, ``refresh``,
    ``state_dtype``, …): every projection format the op takes (SVD and its variants, a random
    basis, DCT indices, an INT4 basis) works, and every moment format of R (fp32, bf16,
    ``"8bit"`` codes with block scales: DESIGN.md §4.9); g's moments are fp32. Groups without
    ``rank`` take plain AdamW (galore-torch's formula by default, as :class:`GaLoreAdamW`); the
    authors' code weight-normalises those parameters too (full-rank, a 1-D tensor as one row) —
    a deliberate difference: norms and biases gain nothing from it in the GaLore recipes.

    **State** of a projected weight, besides LowRankAdamW's (step, exp_avg, exp_avg_sq, proj*):

    ==================  =====================================================================
    row_scale           g, fp32, one per row (the authors' ``g`` after its step)
    row_norm            ‖v‖ of each row, fp32
    scale_exp_avg(_sq)  g's Adam moments, fp32, one per row
    ==================  =====================================================================

    All initialised from the weight at its first step (g = ‖v‖ = ‖W_i‖, the authors' v = W;
    :meth:`init_state` takes them from the weight at that call). Tensors only: ``state_dict()``
    loads with ``torch.load(weights_only=True)`` and a resumed run continues bit for bit.

    **Refused at construction**, naming the parameter: INT8 weight codes (the renormalisation
    needs each row in fp32) and FSDP2 (DTensor) weights. Under FSDP2's row sharding a right-side
    weight's step is shard-local (its rows, R's rows and the row norms stay on one rank with the
    whole r×n basis), but a left-side weight needs R's all-reduce across the row shards, and
    ``lowrank_shard_placement``'s column sharding would split every row norm across ranks: not
    implemented. DDP works unchanged (every rank holds whole weights), layer-wise stepping too.
    """

    def _check_group(self, group: dict, index: int) -> None:
        super()._check_group(group, index)
        if not _is_projected(group):
            return
        if group["second_moment"] != "full":
            raise ValueError(f"{self._group_label(group, index)}: "
                             f"second_moment: GradNormLoRPAdamW keeps the full V ('full'), got "
                             f"{group['second_moment']!r} (fused_gradnorm_step has no factored "
                             f"mode)")
        for i, p in enumerate(group["params"]):
            name = self._name(group, i, p)
            if p.dtype == torch.uint8:
                raise ValueError(f"{name}: INT8 weight codes cannot be trained by "
                                 "GradNormLoRPAdamW: its row renormalisation needs each row of "
                                 "W in fp32 (train the weight in fp32, bf16 or fp16)")
            if distributed.is_sharded(p):
                raise ValueError(f"{name}: GradNormLoRPAdamW does not support FSDP2 (DTensor) "
                                 "weights: a left-side weight's projection needs R's "
                                 "all-reduce across row shards and column sharding splits the "
                                 "row norms across ranks (see the class docstring); use DDP "
                                 "or unsharded weights")

    def _fused_step_kernel(self) -> Callable:
        if self.backend is None:
            return torch.ops.lowrank.fused_gradnorm_step.default
        return functools.partial(ops.fused_gradnorm_step, backend=self.backend)

    def _step_hyper(self, group: dict, state: dict, p: torch.Tensor, step: int) -> dict:
        """LowRankAdamW's scalars plus the per-row states (keyword arguments of the op)."""
        return {**super()._step_hyper(group, state, p, step),
                **{key: state[key] for key in ROW_STATE_KEYS}}

    def _init_projected_state(self, state: dict, p: torch.Tensor,
                              spec: proj_state.ProjectionSpec, group: dict,
                              position: int) -> None:
        super()._init_projected_state(state, p, spec, group, position)
        state["row_scale"], state["row_norm"] = reference.gradnorm_init_state(p.detach())
        state["scale_exp_avg"] = torch.zeros_like(state["row_scale"])
        state["scale_exp_avg_sq"] = torch.zeros_like(state["row_scale"])
