"""LowRankAdagrad: AdaGrad whose projected parameters take one fused low-rank step each."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.optim.adagrad import adagrad as torch_adagrad

from lowrank_kernels import ops
from lowrank_kernels.optim.lowrank_adamw import LowRankAdamW

# torch.optim.Adagrad's keys that only their default value serves here (not implemented)
UNSUPPORTED_AT_NONZERO = {
    "lr_decay": "torch.optim.Adagrad's lr / (1 + (t − 1)·lr_decay) schedule; use an LR scheduler",
    "initial_accumulator_value": "a nonzero starting V (torch.optim.Adagrad's "
                                 "initial_accumulator_value); V starts at 0",
}


class LowRankAdagrad(LowRankAdamW):
    r"""AdaGrad in the low-rank space (DESIGN.md §4.10): each projected weight W (m×n, gradient
    G) takes ONE fused call of ``torch.ops.lowrank.fused_galore_step(..., inner="adagrad")``; the
    other parameters take plain AdaGrad. A sibling of :class:`LowRankAdamW`: the same projection,
    refresh policies, formats (INT4 basis, INT8 weights, DCT), distributed and checkpoint
    support; only the rule applied to the projected gradient differs::

        R = G Qᵀ (right, Q r×n, m ≥ n)  or  Pᵀ G (left, P m×r)
        V ← V + R²                          no decay of V, no first moment
        N = R / (√V + ε)                    ε outside the square root, as torch's Adagrad
        W ← W − lr·scale·back(N)            no bias correction
        W ← W − lr·weight_decay·W           decoupled decay, after the update

    With the identity basis (r = min(m, n), Q = I or P = I) this is ``torch.optim.Adagrad`` with
    ``lr_decay=0``, ``initial_accumulator_value=0`` followed by W ← (1 − lr·wd)·W (torch's own
    ``weight_decay`` is an L2 term added to G instead; tests/test_optim_adagrad.py checks 20
    steps). V is kept across refreshes of the basis, as GaLore keeps its moments.

    **Group keys**: those of LowRankAdamW except ``betas`` and ``correct_bias`` (AdaGrad has no
    moving averages and no bias correction), plus torch.optim.Adagrad's ``lr_decay`` and
    ``initial_accumulator_value``, which only take their default 0 (a nonzero value raises;
    see ``UNSUPPORTED_AT_NONZERO``). Defaults as torch.optim.Adagrad: lr 1e-2, ε 1e-10.
    ``state_dtype``: "auto" (the weight's dtype: fp32 V for fp32 weights, bf16 stochastically
    rounded for 16-bit weights and INT8 codes), torch.float32, torch.bfloat16 or "8bit". V only
    grows, so the rounding noise of a bf16 or 8-bit V is never forgotten; fp32 is the safe
    choice when memory allows (docs/methods.md §2).

    **State** of a projected parameter: ``step``, ``exp_avg_sq`` (V; with 8-bit moments its
    ``exp_avg_sq_scales``) and the projection's tensors, no ``exp_avg``. Unprojected parameters:
    ``step`` and ``exp_avg_sq`` (torch's ``sum``). ``state_dict`` loads with
    ``torch.load(weights_only=True)`` and resumes bit for bit.

    **Batch size**: ``scale_hyperparameters`` refuses it as it refuses torch.optim.Adagrad (no
    β to rescale; bench/adagrad_batch.py measures how it behaves as the batch grows).
    """

    _MOMENTS = ("exp_avg_sq",)

    def __init__(self, params: Iterable, lr: float = 1e-2, lr_decay: float = 0.0,
                 weight_decay: float = 0.0, initial_accumulator_value: float = 0.0,
                 eps: float = 1e-10, *, update_proj_gap: int = 200, scale: float = 1.0,
                 proj_type: str = "std", projection: str = "svd", proj_bits: int = 16,
                 proj_group_size: int = 256, refresh: str = "fixed",
                 refresh_threshold: float = 0.8, refresh_growth: float = 2.0,
                 refresh_max_gap: int | None = None, seed: int = 0,
                 state_dtype: str | torch.dtype = "auto", foreach: bool | None = None,
                 fused: bool | None = None, backend: str | None = None):
        if not lr >= 0.0:
            raise ValueError(f"lr: expected a value >= 0, got {lr}")
        ops.check_hyperparameters(0.0, 0.0, eps, 1)
        defaults = dict(lr=lr, lr_decay=lr_decay, eps=eps, weight_decay=weight_decay,
                        initial_accumulator_value=initial_accumulator_value,
                        update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type,
                        projection=projection, proj_bits=proj_bits,
                        proj_group_size=proj_group_size, refresh=refresh,
                        refresh_threshold=refresh_threshold, refresh_growth=refresh_growth,
                        refresh_max_gap=refresh_max_gap, seed=seed, state_dtype=state_dtype)
        _check_supported(defaults, "LowRankAdagrad")
        self._init_optimizer(params, defaults, None, foreach, fused, backend)

    def add_param_group(self, param_group: dict) -> None:
        if isinstance(param_group, dict):
            _check_supported({**self.defaults, **param_group},
                             self._group_label(param_group, len(self.param_groups)))
        super().add_param_group(param_group)

    def _rule_scalars(self, group: dict, step: int) -> dict:
        # the op validates β1, β2 but AdaGrad reads neither
        return {"lr": group["lr"], "beta1": 0.0, "beta2": 0.0,
                "weight_decay": group["weight_decay"], "inner": "adagrad"}

    @staticmethod
    def _dense_state_layout(p: torch.Tensor) -> dict[str, tuple[int, ...]]:
        return {"exp_avg_sq": tuple(p.shape)}

    @staticmethod
    def _init_dense_state(state: dict, p: torch.Tensor) -> None:
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    @torch.compiler.disable
    def _step_dense(self, group: dict, params: list[torch.Tensor]) -> None:
        """AdaGrad for a group without rank: torch's own Adagrad kernels (foreach/fused as given
        to the constructor) with lr_decay = 0 and no L2 term, then the decoupled decay."""
        sums, steps, grads = [], [], []
        for p in params:
            if p.grad.is_sparse:
                raise RuntimeError("LowRankAdagrad does not support sparse gradients")
            state = self.state[p]
            if not state:
                self._init_dense_state(state, p)
            sums.append(state["exp_avg_sq"])
            steps.append(state["step"])
            grads.append(p.grad)
        torch_adagrad(params, grads, sums, steps, foreach=self.foreach, fused=self.fused,
                      lr=group["lr"], weight_decay=0.0, lr_decay=0.0, eps=group["eps"],
                      maximize=False, has_sparse_grad=False,
                      has_complex=any(torch.is_complex(p) for p in params))
        if group["weight_decay"] != 0.0:
            torch._foreach_mul_(params, 1.0 - group["lr"] * group["weight_decay"])


def _check_supported(keys: dict, where: str) -> None:
    for key, what in UNSUPPORTED_AT_NONZERO.items():
        if keys.get(key, 0.0) != 0.0:
            raise ValueError(f"{where}: {key} = {keys[key]!r}: only 0 is supported ({what})")
