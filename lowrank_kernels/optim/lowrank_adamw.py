"""LowRankAdamW: AdamW whose projected parameters take one fused low-rank step each.

Parameter groups that carry a ``rank`` are projected: each weight's step is one call to
``torch.ops.lowrank.fused_galore_step`` (through ``lowrank_kernels.ops``; an explicit ``backend``
names one implementation instead), with the projection refreshed beforehand when its policy says
so. Groups without ``rank`` get plain AdamW on torch's own kernels.

Group keys (galore-torch's first, then ours; constructor arguments give their defaults):

===================  ==========================================================================
rank                 projection rank r (1 ≤ r ≤ min(m, n); never truncated). Absent: plain AdamW
update_proj_gap      steps between refreshes (the initial gap for ``refresh="lazy"``)
scale                multiplies the back-projected update (GaLore's α; recipes use 0.25)
proj_type            "std" (GaLore's side rule: right if m ≥ n, else left); only "std" exists
projection           "svd" | "rsvd" | "dct" | "random" (lowrank_kernels.projection)
proj_bits            16: dense basis in the weight's dtype; 4: packed INT4 basis (Q-GaLore)
proj_group_size      INT4 quantization group (256)
refresh              "fixed" (every update_proj_gap steps) | "lazy" (see projection/refresh.py)
refresh_threshold,   lazy policy: grow the gap by ``refresh_growth`` (up to ``refresh_max_gap``)
refresh_growth,      while the subspace overlap ‖P_oldᵀP_new‖²_F/r stays ≥ ``refresh_threshold``
refresh_max_gap
state_dtype          dtype of the projected moments M, V: torch.float32 (default) or
                     torch.bfloat16 (half the optimizer memory; stored with stochastic rounding,
                     see below)
seed                 seed of random projections and of the stochastic-rounding streams (mixed
                     with each parameter's position)
names                optional list of parameter names, parallel to ``params`` (for messages)
===================  ==========================================================================

Semantics of a projected step: DESIGN.md §4.2 (galore-torch's ``GaLoreAdamW``: ε not
bias-corrected, decoupled decay after the update). Moments are fp32 whatever the weight dtype,
unless ``state_dtype=torch.bfloat16``: each step then computes them in fp32 and stores them
stochastically rounded to bf16 (unbiased; nearest rounding would freeze V, whose per-step change
with β2 = 0.999 is below half a bf16 ulp — see lowrank/adam.h and tests/test_bf16_moments.py).
Unprojected parameters follow ``dense_adamw``: "torch" = ``torch.optim.AdamW`` (its foreach/fused
kernels; ε bias-corrected, decay before the update) or "galore" = galore-torch's own AdamW
formula on torch's foreach ops (what ``GaLoreAdamW`` uses, so a drop-in gives the same numbers).

INT8 weights (Q-GaLore, DESIGN.md §4.4): a parameter of a projected group may be uint8 INT8
codes, as ``ops.quantize_int8`` returns them, with the quantization parameters as attributes
(q-galore-torch's convention): ``p.scales`` and ``p.zeros`` (fp32, one per group of
``p.group_size`` row-major elements; 256 if the attribute is absent) and the fp32/bf16 gradient
in ``p.float_grad`` (a uint8 tensor cannot hold a float ``.grad``). The step is the same single
fused call: it dequantizes, updates in fp32 and requantizes with stochastic rounding (Philox
seeded by the parameter's ``proj_seed`` and the step), rewriting ``p``, ``p.scales`` and
``p.zeros`` in place. ``zero_grad()`` clears ``float_grad`` too. ``p.scales``/``p.zeros`` are
model data, not optimizer state: save them with the model (as buffers of the module that owns
the codes).

All state is tensors (``step``, ``exp_avg``, ``exp_avg_sq`` and the ``proj*`` keys of
lowrank_kernels.projection.state): ``state_dict()`` survives ``torch.load(weights_only=True)`` and
a resumed run continues bit for bit.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable

import torch
from torch.optim.adamw import adamw as torch_adamw

from lowrank_kernels import ops, reference
from lowrank_kernels.projection import make_projector, make_refresh_policy
from lowrank_kernels.projection import state as proj_state
from lowrank_kernels.projection.base import check_rank

DENSE_ADAMW = ("torch", "galore")
STATE_DTYPES = (torch.float32, torch.bfloat16)  # of the projected moments
_SPEC_KEYS = ("rank", "projection", "refresh", "update_proj_gap", "refresh_threshold",
              "refresh_growth", "refresh_max_gap", "proj_bits", "proj_group_size")
INT8_GROUP_SIZE = 256


def _is_projected(group: dict) -> bool:
    return group.get("rank") is not None


def _int8_group_size(p: torch.Tensor) -> int:
    return getattr(p, "group_size", INT8_GROUP_SIZE)


def _check_int8_weight(p: torch.Tensor, name: str) -> None:
    """INT8 codes must carry their quantization parameters (see the module docstring)."""
    for attr in ("scales", "zeros"):
        if not torch.is_tensor(getattr(p, attr, None)):
            raise ValueError(f"{name}: uint8 INT8 weight codes need a tensor attribute "
                             f"`{attr}` (fp32, one per group, from ops.quantize_int8)")
    group_size = _int8_group_size(p)
    ops.check_group_size(group_size, f"{name}.group_size", packed_int4=False)
    for attr in ("scales", "zeros"):
        ops.check_group_params(getattr(p, attr), p.numel(), group_size, p.device,
                               f"{name}.{attr}", "INT8 weight codes")


def _gradient(p: torch.Tensor) -> torch.Tensor | None:
    """The gradient a step consumes: ``.grad``, or ``.float_grad`` for INT8 weight codes."""
    if p.dtype == torch.uint8:
        return getattr(p, "float_grad", None)
    return p.grad


class LowRankAdamW(torch.optim.Optimizer):
    def __init__(self, params: Iterable, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, *, update_proj_gap: int = 200, scale: float = 1.0,
                 proj_type: str = "std", projection: str = "svd", proj_bits: int = 16,
                 proj_group_size: int = 256, refresh: str = "fixed",
                 refresh_threshold: float = 0.8, refresh_growth: float = 2.0,
                 refresh_max_gap: int | None = None, seed: int = 0,
                 state_dtype: torch.dtype = torch.float32, correct_bias: bool = True,
                 dense_adamw: str = "torch", foreach: bool | None = None,
                 fused: bool | None = None, backend: str | None = None):
        if not lr >= 0.0:
            raise ValueError(f"lr: expected a value >= 0, got {lr}")
        if dense_adamw not in DENSE_ADAMW:
            raise ValueError(f"dense_adamw: expected one of {DENSE_ADAMW}, got {dense_adamw!r}")
        ops.check_hyperparameters(betas[0], betas[1], eps, 1)
        self.dense_adamw, self.foreach, self.fused, self.backend = (
            dense_adamw, foreach, fused, backend)
        self._position_of: dict[int, int] | None = None
        self._specs: dict[int, tuple[tuple, proj_state.ProjectionSpec]] = {}
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        correct_bias=correct_bias, update_proj_gap=update_proj_gap, scale=scale,
                        proj_type=proj_type, projection=projection, proj_bits=proj_bits,
                        proj_group_size=proj_group_size, refresh=refresh,
                        refresh_threshold=refresh_threshold, refresh_growth=refresh_growth,
                        refresh_max_gap=refresh_max_gap, seed=seed, state_dtype=state_dtype)
        super().__init__(params, defaults)

    # ----------------------------------------------------------------------------------------
    # groups
    # ----------------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        names = group.get("names")
        if names is not None and len(names) != len(group["params"]):
            raise ValueError(f"names: expected {len(group['params'])} names (one per param), "
                             f"got {len(names)}")
        if _is_projected(group):
            if group["proj_type"] != "std":
                raise ValueError(f"proj_type: only 'std' (right if m >= n, else left) is "
                                 f"supported, got {group['proj_type']!r}")
            self._spec(group)  # validates the projection keys
            if group["state_dtype"] not in STATE_DTYPES:
                raise ValueError(f"state_dtype: expected one of {STATE_DTYPES}, got "
                                 f"{group['state_dtype']!r}")
            for i, p in enumerate(group["params"]):
                name = self._name(group, i, p)
                if p.dim() != 2:
                    raise ValueError(f"{name}: projected parameters must be 2-D weights, got "
                                     f"shape {list(p.shape)}; put it in a group without 'rank'")
                check_rank(group["rank"], *p.shape, name)
                if p.dtype == torch.uint8:
                    _check_int8_weight(p, name)
                elif not p.is_floating_point():
                    raise ValueError(f"{name}: expected a float weight or uint8 INT8 codes, got "
                                     f"dtype {p.dtype}")
        else:
            for i, p in enumerate(group["params"]):
                if not p.is_floating_point():
                    raise ValueError(f"{self._name(group, i, p)}: dtype {p.dtype} in a group "
                                     "without 'rank'; INT8 weight codes can only be stepped by "
                                     "the fused low-rank step (give the group a rank)")
        self._position_of = None

    def _spec(self, group: dict) -> proj_state.ProjectionSpec:
        """The group's ProjectionSpec, rebuilt only when one of its keys changed (it is read on
        every step of every projected weight)."""
        key = tuple(group[k] for k in _SPEC_KEYS)
        cached = self._specs.get(id(group))
        if cached is None or cached[0] != key:
            cached = self._specs[id(group)] = (key, self._build_spec(group))
        return cached[1]

    @staticmethod
    def _build_spec(group: dict) -> proj_state.ProjectionSpec:
        policy = make_refresh_policy(group["refresh"], group["update_proj_gap"],
                                     threshold=group["refresh_threshold"],
                                     growth=group["refresh_growth"],
                                     max_gap=group["refresh_max_gap"])
        return proj_state.ProjectionSpec(group["rank"], make_projector(group["projection"]),
                                         policy, group["proj_bits"], group["proj_group_size"])

    @staticmethod
    def _name(group: dict, index: int, p: torch.Tensor) -> str:
        names = group.get("names")
        if names is not None:
            return f"parameter {names[index]!r}"
        return f"parameter #{index} of a group ({'×'.join(map(str, p.shape))})"

    def _locate(self, p: torch.Tensor) -> tuple[dict, int, int]:
        """(group, index in the group, position in the optimizer) of a parameter."""
        if self._position_of is None:
            self._position_of = {}
            flat = itertools.chain.from_iterable(
                ((g, i) for i in range(len(group["params"])))
                for g, group in enumerate(self.param_groups))
            for position, (g, i) in enumerate(flat):
                self._position_of[id(self.param_groups[g]["params"][i])] = (g, i, position)
        if id(p) not in self._position_of:
            raise ValueError("param: not a parameter of this optimizer")
        g, i, position = self._position_of[id(p)]
        return self.param_groups[g], i, position

    # ----------------------------------------------------------------------------------------
    # steps
    # ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            with_grad = [p for p in group["params"] if _gradient(p) is not None]
            if _is_projected(group):
                for p in with_grad:
                    self._step_projected(p)
            elif with_grad:
                self._step_dense(group, with_grad)
        return loss

    @torch.no_grad()
    def step_parameter(self, p: torch.Tensor) -> None:
        """Steps one parameter from its current ``.grad`` (what ``step()`` does for it); used by
        layer-wise training (lowrank_kernels.optim.layerwise)."""
        if _gradient(p) is None:
            return
        group, _, _ = self._locate(p)
        if _is_projected(group):
            self._step_projected(p)
        else:
            self._step_dense(group, [p])

    def _step_size(self, group: dict, step: int) -> tuple[float, float]:
        """(lr, weight_decay) to pass to the fused step. Without bias correction the op's folded
        α_t must become lr, so lr is rescaled and the decay rescaled back to keep lr·wd."""
        lr, wd = group["lr"], group["weight_decay"]
        if group["correct_bias"]:
            return lr, wd
        beta1, beta2 = group["betas"]
        lr_op = lr * (1.0 - beta1**step) / math.sqrt(1.0 - beta2**step)
        return lr_op, (wd * lr / lr_op if lr_op > 0 else wd)

    def _step_projected(self, p: torch.Tensor) -> None:
        grad, proj_args, hyper = self._prepare_projected(p)
        state = self.state[p]
        # p.detach(): an alias without autograd history. The CPU kernel writes tiles of the weight
        # from at::parallel_for workers, where grad mode is not inherited, so handing it the
        # Parameter itself trips autograd's in-place check on a leaf view.
        # backend=None: torch.ops.lowrank.fused_galore_step, eager and compiled alike
        ops.fused_galore_step(p.detach(), grad, proj_args.pop("proj"), state["exp_avg"],
                              state["exp_avg_sq"], **hyper, **proj_args, backend=self.backend)

    @torch.compiler.disable
    def _prepare_projected(self, p: torch.Tensor) -> tuple[torch.Tensor, dict, dict]:
        """Bookkeeping before the fused call, run eagerly even inside torch.compile (refreshes
        are rare, data-dependent and call LAPACK): state init, refresh, step count. Returns the
        gradient, the projection arguments and the scalar arguments of the fused step."""
        group, index, position = self._locate(p)
        grad = _gradient(p)
        if grad.is_sparse:
            raise RuntimeError("LowRankAdamW does not support sparse gradients")
        spec = self._spec(group)
        state = self.state[p]
        if not state:
            self._init_projected_state(state, p, spec, group, position)
        step_before = int(state["step"])
        if proj_state.refresh_due(state, step_before, spec):
            proj_state.refresh_(state, grad, p, spec, step_before, self._name(group, index, p))
        state["step"] += 1
        lr, wd = self._step_size(group, step_before + 1)
        beta1, beta2 = group["betas"]
        hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=wd,
                     scale=group["scale"], step=step_before + 1,
                     seed=int(state["proj_seed"]) % (2**31))
        if p.dtype == torch.uint8:
            # the weight's quantization parameters belong to the model; the step rewrites them
            hyper.update(param_scales=p.scales, param_zeros=p.zeros,
                         param_group_size=_int8_group_size(p))
        return grad, proj_state.step_args(state, spec), hyper

    @staticmethod
    def _init_projected_state(state: dict, p: torch.Tensor, spec: proj_state.ProjectionSpec,
                              group: dict, position: int) -> None:
        m, n = p.shape
        shape = ops.low_rank_shape(m, n, spec.rank)
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["exp_avg"] = torch.zeros(shape, dtype=group["state_dtype"], device=p.device)
        state["exp_avg_sq"] = torch.zeros(shape, dtype=group["state_dtype"], device=p.device)
        proj_state.init_state_(state, spec, proj_state.parameter_seed(group["seed"], position))

    @staticmethod
    def _init_dense_state(state: dict, p: torch.Tensor) -> None:
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    @torch.no_grad()
    def init_state(self, p: torch.Tensor) -> dict:
        """Allocates now, without a gradient, every tensor ``p``'s first step would put in
        ``self.state[p]``, and returns that state (unchanged if it exists already).

        The moments are allocated by the same code as in a step; a projected parameter also gets
        its projection storage (dense basis, packed INT4 basis + scales/zeros, or DCT indices)
        with the shape and dtype its projector declares, zero-filled, through the code a refresh
        stores it with, but NO projection is computed: the refresh counters say "never
        refreshed", so the first step still refreshes and then equals a step without this call
        bit for bit. Runs on meta tensors: bench/memory.py sums the bytes of these tensors to
        account a 7B model's optimizer memory without an SVD."""
        group, _, position = self._locate(p)
        state = self.state[p]
        if state:
            return state
        if _is_projected(group):
            spec = self._spec(group)
            self._init_projected_state(state, p, spec, group, position)
            proj_state.allocate_(state, p, spec)
        else:
            self._init_dense_state(state, p)
        return state

    def _dense_state(self, group: dict, params: list[torch.Tensor]):
        exp_avgs, exp_avg_sqs, steps = [], [], []
        for p in params:
            if p.grad.is_sparse:
                raise RuntimeError("LowRankAdamW does not support sparse gradients")
            state = self.state[p]
            if not state:
                self._init_dense_state(state, p)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        return exp_avgs, exp_avg_sqs, steps

    def _step_dense(self, group: dict, params: list[torch.Tensor]) -> None:
        exp_avgs, exp_avg_sqs, steps = self._dense_state(group, params)
        grads = [p.grad for p in params]
        beta1, beta2 = group["betas"]
        if self.dense_adamw == "torch":
            if not group["correct_bias"]:
                raise ValueError("correct_bias=False needs dense_adamw='galore' for parameters "
                                 "without rank (torch's AdamW always corrects the bias)")
            torch_adamw(params, grads, exp_avgs, exp_avg_sqs, [], steps,
                        foreach=self.foreach, fused=self.fused, amsgrad=False,
                        beta1=beta1, beta2=beta2, lr=group["lr"],
                        weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
            return
        # galore-torch's AdamW: ε not bias-corrected, decay after the update. Parameters of one
        # group share a step count unless they joined late, so batch by count.
        by_step: dict[int, list[int]] = {}
        for i, s in enumerate(steps):
            by_step.setdefault(int(s), []).append(i)
        for step_before, idx in by_step.items():
            ps, gs = [params[i] for i in idx], [grads[i] for i in idx]
            ms, vs = [exp_avgs[i] for i in idx], [exp_avg_sqs[i] for i in idx]
            torch._foreach_add_([steps[i] for i in idx], 1.0)
            step = step_before + 1
            torch._foreach_mul_(ms, beta1)
            torch._foreach_add_(ms, gs, alpha=1.0 - beta1)
            torch._foreach_mul_(vs, beta2)
            torch._foreach_addcmul_(vs, gs, gs, value=1.0 - beta2)
            denoms = torch._foreach_sqrt(vs)
            torch._foreach_add_(denoms, group["eps"])
            step_size = (reference.adam_step_size(group["lr"], beta1, beta2, step)
                         if group["correct_bias"] else group["lr"])
            torch._foreach_add_(ps, torch._foreach_div(ms, denoms), alpha=-step_size)
            if group["weight_decay"] > 0.0:
                torch._foreach_add_(ps, ps, alpha=-group["lr"] * group["weight_decay"])

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch's, and also clears the ``float_grad`` of INT8 weight codes."""
        super().zero_grad(set_to_none)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dtype == torch.uint8 and getattr(p, "float_grad", None) is not None:
                    if set_to_none:
                        p.float_grad = None
                    else:
                        p.float_grad.zero_()

    # ----------------------------------------------------------------------------------------
    # checkpoints
    # ----------------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but every state tensor keeps its saved dtype: torch casts floating state
        to the parameter's dtype, which would turn fp32 moments of bf16 weights into bf16 and
        int64 refresh counters and packed INT4 bases into floats."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # saved before the key existed: fp32 moments then
            group.setdefault("state_dtype", torch.float32)
        saved_ids = itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = itertools.chain.from_iterable(g["params"] for g in self.param_groups)
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id)
            if saved is None:
                continue
            for key, value in saved.items():
                if not torch.is_tensor(value):
                    continue
                # scalars (step, refresh counters) stay where they were saved (CPU, as torch keeps
                # `step`) so reading them costs no device sync; a copy either way, so stepping
                # never writes into the caller's state_dict
                device = value.device if value.dim() == 0 else p.device
                self.state[p][key] = value.to(device=device, copy=True)
        self._position_of = None
