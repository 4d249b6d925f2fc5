"""LowRankAdamW: AdamW whose projected parameters take one fused low-rank step each.

The maths, the parameter-group keys and the state are documented on :class:`LowRankAdamW`; the
presets (GaLoreAdamW, QGaLoreAdamW, DCTAdamW) are in :mod:`lowrank_kernels.optim.presets`.
"""

from __future__ import annotations

import difflib
import functools
import itertools
import math
from collections.abc import Callable, Iterable

import torch
from torch.optim.adamw import adamw as torch_adamw

from lowrank_kernels import distributed, ops, reference
from lowrank_kernels.projection import make_projector, make_refresh_policy
from lowrank_kernels.projection import state as proj_state
from lowrank_kernels.projection.base import check_rank

DENSE_ADAMW = ("torch", "galore", "adafactor")
# rows of a dense matrix the Adafactor rule (dense_adamw="adafactor") updates at once: its fp32
# temporaries stay ~16 MiB whatever the matrix (a 32000×4096 embedding would need 0.5 GiB each)
DENSE_CHUNK_ELEMENTS = 1 << 22
# of the projected moments; "8bit": FP8-like codes with fp32 block scales (DESIGN.md §4.9)
STATE_DTYPES = ("auto", torch.float32, torch.bfloat16, "8bit")
# of the projected V: "full" (a V like M) or "factored" (r + own fp32 values, DESIGN.md §4.12)
SECOND_MOMENTS = ("full", "factored")
MOMENT_BLOCK_SIZE = reference.MOMENT_BLOCK_SIZE  # 8-bit moments: scales per 32 ranks of a line
_SPEC_KEYS = ("rank", "projection", "refresh", "update_proj_gap", "refresh_threshold",
              "refresh_growth", "refresh_max_gap", "proj_bits", "proj_group_size")
INT8_GROUP_SIZE = 256

# ---------------------------------------------------------------------------------------------
# parameter-group keys
# ---------------------------------------------------------------------------------------------
# A group may carry every key the constructor has a default for (lr, betas, update_proj_gap,
# state_dtype, ...: a new constructor argument is a group key at once) and the keys below, which
# have no default. Any other key raises: a typo such as `rnak` would otherwise silently turn a
# projected group into plain AdamW. A new key without a default goes in this table.
GROUP_KEYS_WITHOUT_DEFAULT = {
    "params": "torch.optim.Optimizer",
    "param_names": "torch.optim.Optimizer, from (name, tensor) pairs in `params`",
    "names": "parameter names, parallel to `params` (for messages)",
    "rank": "galore-torch: projection rank; absent or None means plain AdamW",
    "initial_lr": "torch.optim.lr_scheduler (every scheduler)",
    "max_lr": "torch.optim.lr_scheduler.OneCycleLR",
    "min_lr": "torch.optim.lr_scheduler.OneCycleLR",
    "max_momentum": "torch.optim.lr_scheduler.OneCycleLR / CyclicLR (cycle_momentum)",
    "base_momentum": "torch.optim.lr_scheduler.OneCycleLR / CyclicLR (cycle_momentum)",
    "swa_lr": "torch.optim.swa_utils.SWALR",
}
# Keys of the peers (and of torch.optim.AdamW) that this optimizer does not take, with what to
# write instead; they raise like any unknown key, with this hint added.
PEER_KEY_HINTS = {
    "quant": "q-galore-torch's INT4 basis switch: use proj_bits=4 (QGaLoreAdamW's default)",
    "quant_n_bit": "q-galore-torch's basis bits: use proj_bits (4 or 16)",
    "quant_group_size": "q-galore-torch's basis quantization group: use proj_group_size",
    "cos_threshold": "q-galore-torch's lazy-refresh test (cosine of the top singular vector): "
                     "use refresh='lazy' with refresh_threshold (subspace overlap)",
    "gamma_proj": "q-galore-torch's gap growth factor: use refresh_growth",
    "queue_size": "q-galore-torch's similarity queue: the lazy policy decides at each refresh "
                  "from refresh_threshold, without a queue",
    "alpha": "fira's back-projection scale: use scale",
    "proj": "apollo-torch's projection type: use projection ('random' or 'svd')",
    "amsgrad": "torch.optim.AdamW's AMSGrad is not implemented",
    "maximize": "not implemented (negate the loss)",
    "foreach": "a constructor argument (foreach=...), for every group without rank",
    "fused": "a constructor argument (fused=...), for every group without rank",
}


def check_group_keys(group: dict, accepted: Iterable[str], where: str) -> None:
    """Raises ValueError naming the first key of ``group`` outside ``accepted`` (``where`` names
    the group), with a close match or a peer's equivalent, and the accepted keys."""
    accepted = sorted(set(accepted))
    for key in group:
        if key in accepted:
            continue
        hint = PEER_KEY_HINTS.get(key)
        if hint is None:
            close = difflib.get_close_matches(str(key), accepted, n=1)
            hint = f"did you mean {close[0]!r}?" if close else None
        hint = f" ({hint})" if hint else ""
        raise ValueError(f"{where}: unknown key {key!r}{hint}; accepted keys: "
                         f"{', '.join(accepted)}")


def moment_dtype(state_dtype: str | torch.dtype, p: torch.Tensor) -> torch.dtype | str:
    """The dtype of the projected moments of ``p`` for a group's ``state_dtype`` ("8bit" for
    8-bit codes: int8 M, uint8 √V, with fp32 block scales).

    "auto" follows the weight, as galore-torch's moments do (they take the gradient's dtype), so
    that they never take more memory than galore-torch's: fp32 weights get fp32 moments; bf16
    weights bf16 moments; fp16 weights bf16 moments too (the kernels store fp32 or bf16
    moments; bf16 has the range of fp32, where V = R² of an fp16 gradient under- or overflows
    fp16); INT8 weight codes bf16 (q-galore-torch keeps 8-bit moments there). bf16 and 8-bit
    moments are stored with stochastic rounding."""
    if state_dtype != "auto":
        return state_dtype
    if p.dtype in (torch.bfloat16, torch.float16, torch.uint8):
        return torch.bfloat16
    return torch.float32


def _is_projected(group: dict) -> bool:
    return group.get("rank") is not None


def _int8_group_size(p: torch.Tensor) -> int:
    return getattr(p, "group_size", INT8_GROUP_SIZE)


def _check_int8_weight(p: torch.Tensor, name: str) -> None:
    """INT8 codes must carry their quantization parameters (see LowRankAdamW's docstring)."""
    for attr in ("scales", "zeros"):
        if not torch.is_tensor(getattr(p, attr, None)):
            raise ValueError(f"{name}: uint8 INT8 weight codes need a tensor attribute "
                             f"`{attr}` (fp32, one per group, from ops.quantize_int8)")
    group_size = _int8_group_size(p)
    ops.check_group_size(group_size, f"{name}.group_size", packed_int4=False)
    for attr in ("scales", "zeros"):
        ops.check_group_params(getattr(p, attr), p.numel(), group_size, p.device,
                               f"{name}.{attr}", "INT8 weight codes")


def _apply_dense_update(p: torch.Tensor, update: torch.Tensor, step_size: float,
                        decay: float) -> None:
    """p ← (1 − decay)·(p − step_size·update), in fp32, rounded once into p's dtype."""
    w = p.float().sub_(update, alpha=step_size)
    if decay != 0.0:
        w.mul_(1.0 - decay)
    p.copy_(w)


def _gradient(p: torch.Tensor) -> torch.Tensor | None:
    """The gradient a step consumes: ``.grad``, or ``.float_grad`` for INT8 weight codes."""
    if p.dtype == torch.uint8:
        return getattr(p, "float_grad", None)
    return p.grad


class LowRankAdamW(torch.optim.Optimizer):
    r"""AdamW whose projected parameters take one fused low-rank step each.

    A parameter group with a ``rank`` is projected: each of its weights W (m×n, gradient G) is
    stepped by ONE call of ``torch.ops.lowrank.fused_galore_step`` (the kernel registered for its
    device: C++ on CPU, Triton on CUDA; the constructor's ``backend`` forces one implementation),
    after a refresh of its projection when the group's policy says so.
    Groups without ``rank`` take plain AdamW.

    **Projected step** (DESIGN.md §4.2, galore-torch's ``GaLoreAdamW``), t the step count after
    its increment, side by galore-torch's "std" rule (right: Q r×n if m ≥ n; left: P m×r)::

        R = G Qᵀ (right)  or  Pᵀ G (left)                     project, r×... low-rank gradient
        M ← β1·M + (1−β1)·R          V ← β2·V + (1−β2)·R²      moments, low rank
        N = M / (√V + ε)                                       ε not bias-corrected
        α_t = lr·√(1−β2ᵗ)/(1−β1ᵗ)    (lr if correct_bias=False)
        W ← W − α_t·scale·back(N),   back(N) = N Q (right) or P N (left)
        W ← W − lr·weight_decay·W                               decoupled decay, after the update

    All arithmetic is fp32 inside the kernel whatever the storage dtypes. The basis is
    refreshed from the current gradient (``projection``: truncated SVD as galore-torch, or
    randomized SVD, a seeded random basis, DCT rows) at steps 0, T, 2T, … (T = update_proj_gap)
    or lazily (the gap grows while the subspace stays put). M and V are kept across refreshes.

    **Group keys** (the constructor's arguments give their defaults; any other key raises a
    ValueError naming it, see ``GROUP_KEYS_WITHOUT_DEFAULT`` / ``check_group_keys``):

    ===================  ======================================================================
    lr, betas, eps,      torch's; ε (default 1e-6, galore-torch's) enters the projected step as
    weight_decay         above; ``lr`` may be changed by any torch LR scheduler
    correct_bias         galore-torch's: False drops the bias correction of α_t
    rank                 projection rank r (1 ≤ r ≤ min(m, n); never truncated). Absent or
                         None: plain AdamW for the group
    update_proj_gap      steps between refreshes (the initial gap for ``refresh="lazy"``)
    scale                multiplies the back-projected update (GaLore's α; recipes use 0.25)
    proj_type            "std" (GaLore's side rule above); only "std" exists
    projection           "svd" | "rsvd" | "dct" | "random" (lowrank_kernels.projection)
    proj_bits            16: dense basis in the weight's dtype; 4: packed INT4 basis (Q-GaLore)
    proj_group_size      INT4 quantization group (256)
    refresh              "fixed" (every update_proj_gap steps) | "lazy" (projection/refresh.py)
    refresh_threshold,   lazy policy: grow the gap by ``refresh_growth`` (up to
    refresh_growth,      ``refresh_max_gap``) while the subspace overlap ‖P_oldᵀP_new‖²_F/r
    refresh_max_gap      stays ≥ ``refresh_threshold``
    second_moment        "full" (default: V has M's shape and format) or "factored": V kept as
                         r + own fp32 values, Adafactor's row and column means of the EMA of R²
                         (DESIGN.md §4.12, ``reference.factored_normalized``); M keeps
                         ``state_dtype``. At 7B (r = 1024) it removes 1.7 GiB of 8-bit V
    state_dtype          dtype of the projected moments M, V: "auto" (default: follows the
                         weight, :func:`moment_dtype`: fp32 weights → fp32; bf16, fp16 weights
                         and INT8 codes → bf16), torch.float32, torch.bfloat16 or "8bit"
                         (FP8-like codes with fp32 block scales, below)
    seed                 seed of random projections and of the stochastic-rounding streams
                         (mixed with each parameter's position)
    names                optional parameter names, parallel to ``params`` (for messages; torch's
                         ``param_names`` from (name, tensor) pairs serve too)
    ===================  ======================================================================

    torch's LR schedulers' own keys (``initial_lr``, ``max_lr``, …) are accepted as well. Peer
    keys with another name here (q-galore-torch's ``quant``, fira's ``alpha``, …) raise with the
    name to use.

    **bf16 moments** (``state_dtype`` "auto" on 16-bit weights, or torch.bfloat16): each step
    computes M and V in fp32 (N from those) and stores them stochastically rounded to bf16
    (unbiased; nearest rounding, galore-torch's, would freeze V, whose per-step change at
    β2 = 0.999 is below half a bf16 ulp — lowrank/adam.h, tests/test_bf16_moments.py). The
    rounding stream is keyed by the parameter's seed and the step, so a resumed run continues
    bit for bit. ``state_dtype=torch.float32`` keeps fp32 moments for any weight.

    **8-bit moments** (``state_dtype="8bit"``, DESIGN.md §4.9): M is stored as int8 codes (E4M3,
    sign apart) and V as uint8 codes of √V (unsigned E4M4), each block of 32 consecutive ranks
    of an own-line (a row of the m×r state on the right side, a column of the r×n state on the
    left) with one fp32 scale (absmax/480, absmax/496): 1 + 4/min(32, r) bytes per element and
    moment, 3.6× less than fp32 at r ≥ 32. The step decodes them to fp32, updates, computes N
    from the fp32 values and re-encodes with stochastic rounding (the bf16 moments' Philox
    stream), all inside the fused kernel. The scales live in the state (``exp_avg_scales``,
    ``exp_avg_sq_scales``) and travel in ``state_dict``. Measured on the tiny-LLaMA demo: the
    final loss within 0.1 % of fp32 moments (docs/methods.md §6).

    **Unprojected parameters** follow the constructor's ``dense_adamw``: "torch" =
    ``torch.optim.AdamW`` (its foreach/fused kernels, ``foreach=``/``fused=`` passed through; ε
    bias-corrected, decay before the update) or "galore" = galore-torch's AdamW formula on
    torch's foreach ops (``GaLoreAdamW``'s default, so a drop-in gives the same numbers). Their
    moments are ``zeros_like(p)``, as in both. "adafactor" keeps no M and, for a matrix, a
    factored V (Shazeer & Stern 2018 with β1 = 0, Adam's β2 and bias correction, no update
    clipping or relative step; :meth:`_step_dense_adafactor`): m + n fp32 values instead of
    2·m·n, the choice that lets embeddings and lm_head fit a 7B budget (bench/memory.py).
    ``backend`` (constructor) forces a backend of the fused step (see ``lowrank_kernels.ops``).

    **INT8 weights** (Q-GaLore, DESIGN.md §4.4): a parameter of a projected group may be uint8
    INT8 codes, as ``ops.quantize_int8`` returns them, with the quantization parameters as
    attributes (q-galore-torch's convention): ``p.scales`` and ``p.zeros`` (fp32, one per group
    of ``p.group_size`` row-major elements; 256 if the attribute is absent) and the fp32/bf16
    gradient in ``p.float_grad`` (a uint8 tensor cannot hold a float ``.grad``). The step is the
    same single fused call: it dequantizes, updates in fp32 and requantizes with stochastic
    rounding (Philox seeded by the parameter's ``proj_seed`` and the step), rewriting ``p``,
    ``p.scales`` and ``p.zeros`` in place. ``zero_grad()`` clears ``float_grad`` too.
    ``p.scales``/``p.zeros`` are model data, not optimizer state: save them with the model (as
    buffers of the module that owns the codes).

    **State** of a projected parameter (all tensors: ``state_dict()`` survives
    ``torch.load(weights_only=True)`` and a resumed run continues bit for bit):

    =================  ========================================================================
    step               fp32 scalar (CPU): steps taken
    exp_avg            M, low-rank shape (m×r right, r×n left), dtype by ``state_dtype``
    exp_avg_sq         V, same shape and dtype (8-bit: uint8 codes of √V); factored: fp32
                       (r + own,): the rank-axis factor a, then the own-axis factor b
    exp_avg_scales,    8-bit moments only: fp32 block scales, (m, ⌈r/32⌉) right, (n, ⌈r/32⌉)
    exp_avg_sq_scales  left
    proj, proj_*       the projection and its refresh counters
                       (:mod:`lowrank_kernels.projection.state`)
    =================  ========================================================================

    Unprojected parameters hold torch AdamW's ``step``, ``exp_avg``, ``exp_avg_sq``; with
    ``dense_adamw="adafactor"`` only ``step`` and an fp32 ``exp_avg_sq``: (m + n,) for an m×n
    matrix (its row means, then its column means), the parameter's shape otherwise. The rule is
    a constructor argument, not saved: ``load_state_dict`` refuses a state of the other layout.
    ``load_state_dict`` keeps every state tensor's saved dtype.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, *, update_proj_gap: int = 200, scale: float = 1.0,
                 proj_type: str = "std", projection: str = "svd", proj_bits: int = 16,
                 proj_group_size: int = 256, refresh: str = "fixed",
                 refresh_threshold: float = 0.8, refresh_growth: float = 2.0,
                 refresh_max_gap: int | None = None, seed: int = 0,
                 state_dtype: str | torch.dtype = "auto", second_moment: str = "full",
                 correct_bias: bool = True, dense_adamw: str = "torch", foreach: bool | None = None,
                 fused: bool | None = None, backend: str | None = None):
        if not lr >= 0.0:
            raise ValueError(f"lr: expected a value >= 0, got {lr}")
        if dense_adamw not in DENSE_ADAMW:
            raise ValueError(f"dense_adamw: expected one of {DENSE_ADAMW}, got {dense_adamw!r}")
        if dense_adamw != "torch" and (foreach is not None or fused is not None):
            raise ValueError(f"foreach, fused: options of torch's AdamW, used only with "
                             f"dense_adamw='torch'; got foreach={foreach!r}, fused={fused!r} "
                             f"with dense_adamw={dense_adamw!r}")
        ops.check_hyperparameters(betas[0], betas[1], eps, 1)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        correct_bias=correct_bias, update_proj_gap=update_proj_gap, scale=scale,
                        proj_type=proj_type, projection=projection, proj_bits=proj_bits,
                        proj_group_size=proj_group_size, refresh=refresh,
                        refresh_threshold=refresh_threshold, refresh_growth=refresh_growth,
                        refresh_max_gap=refresh_max_gap, seed=seed, state_dtype=state_dtype,
                        second_moment=second_moment, **self._extra_defaults())
        self._init_optimizer(params, defaults, dense_adamw, foreach, fused, backend)

    def _init_optimizer(self, params: Iterable, defaults: dict, dense_adamw: str | None,
                        foreach: bool | None, fused: bool | None, backend: str | None) -> None:
        """torch.optim.Optimizer's construction with ``defaults`` (every group key that has a
        default), after the attributes its add_param_group reads."""
        self.dense_adamw, self.foreach, self.fused, self.backend = (
            dense_adamw, foreach, fused, backend)
        self._position_of: dict[int, int] | None = None
        self._specs: dict[int, tuple[tuple, proj_state.ProjectionSpec]] = {}
        torch.optim.Optimizer.__init__(self, params, defaults)

    def _extra_defaults(self) -> dict:
        """Group keys (with their defaults) that a subclass adds to the constructor's (Fira's and
        APOLLO's, lowrank_kernels.optim.full_rank); read before any group is added."""
        return {}

    # ----------------------------------------------------------------------------------------
    # groups
    # ----------------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        if isinstance(param_group, dict):  # torch's own check reports the other types
            check_group_keys(param_group, [*self.defaults, *GROUP_KEYS_WITHOUT_DEFAULT],
                             self._group_label(param_group, len(self.param_groups)))
            if (param_group.get("rank") is None
                    and param_group.get("second_moment", "full") == "factored"):
                raise ValueError(f"{self._group_label(param_group, len(self.param_groups))}: "
                                 "second_moment='factored' in a group without 'rank' (it "
                                 "factors the projected V); for the dense parameters use "
                                 "LowRankAdamW(..., dense_adamw='adafactor')")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._check_group(group, len(self.param_groups) - 1)
        except BaseException:  # a refused group leaves the optimizer as it was
            self.param_groups.pop()
            self._specs.pop(id(group), None)
            raise
        self._position_of = None

    def _check_group(self, group: dict, index: int) -> None:
        """Refusals of a group torch.optim.Optimizer has just added (its defaults filled in);
        raising removes the group again. Subclasses add theirs after calling this one."""
        names = group.get("names")
        if names is not None and len(names) != len(group["params"]):
            raise ValueError(f"names: expected {len(group['params'])} names (one per param), "
                             f"got {len(names)}")
        if group.get("second_moment", "full") not in SECOND_MOMENTS:
            raise ValueError(f"second_moment: expected one of {SECOND_MOMENTS}, got "
                             f"{group['second_moment']!r}")
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
                if distributed.is_sharded(p):
                    distributed.check_sharded_param(p, name)
                    if group.get("second_moment", "full") == "factored":
                        raise ValueError(f"{name}: second_moment='factored' does not step "
                                         "sharded (FSDP2) weights (its factors sum over the "
                                         "whole weight); DDP and one process are supported")
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
                if self.dense_adamw == "adafactor" and distributed.is_sharded(p):
                    raise ValueError(f"{self._name(group, i, p)}: dense_adamw='adafactor' does "
                                     "not step sharded (FSDP2) weights (its factors are means "
                                     "over the whole matrix); use 'torch' or 'galore'")
                if not p.is_floating_point():
                    raise ValueError(f"{self._name(group, i, p)}: dtype {p.dtype} in a group "
                                     "without 'rank'; INT8 weight codes can only be stepped by "
                                     "the fused low-rank step (give the group a rank)")

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
        names = group.get("names") or group.get("param_names")
        if names is not None:
            return f"parameter {names[index]!r}"
        return f"parameter #{index} of a group ({'×'.join(map(str, p.shape))})"

    @staticmethod
    def _group_label(group: dict, index: int) -> str:
        """How messages name a parameter group: its index and, when given, its first names."""
        names = group.get("names") or group.get("param_names")
        if not names:
            return f"parameter group {index}"
        shown = ", ".join(map(repr, list(names)[:3])) + (", …" if len(names) > 3 else "")
        return f"parameter group {index} ({shown})"

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
        sharded = [p for g in self.param_groups if _is_projected(g) for p in g["params"]
                   if distributed.is_sharded(p) and p.grad is not None]
        if sharded:  # FSDP2: the refreshes due run first, together (owner ranks in parallel)
            distributed.refresh_due_(self, sharded)
        for group in self.param_groups:
            with_grad = [p for p in group["params"] if _gradient(p) is not None]
            if not with_grad:
                continue
            if _is_projected(group):
                self._step_projected(group, with_grad)
            else:
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
            self._step_projected(group, [p])
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

    def _fused_step_kernel(self) -> Callable:
        """What runs the fused step: the dispatcher's op (the kernel registered for the tensors'
        device: C++ on CPU, Triton on CUDA; lowrank_kernels._dispatch), or, with an explicit
        ``backend``, that implementation through ``ops``. Looked up once per group and step."""
        if self.backend is None:
            return torch.ops.lowrank.fused_galore_step.default
        return functools.partial(ops.fused_galore_step, backend=self.backend)

    @torch.compiler.disable
    def _step_projected(self, group: dict, params: list[torch.Tensor]) -> None:
        """One fused call per weight of a projected group, after its bookkeeping: state init,
        refresh, step count.

        Runs eagerly inside torch.compile too: refreshes are data-dependent and call LAPACK, and
        the op takes ``lr`` as a float, on which a traced call specializes (PT2 has no symbolic
        float for custom-op arguments: a scheduler would recompile the graph every step). The
        kernel is one call per weight already; a graph would have nothing to fuse.

        The group's spec and the kernel are looked up once per call, not per
        weight: at small shapes these per-weight costs are the step's cost (bench/
        bench_step_overhead.py)."""
        spec = self._spec(group)
        kernel = self._fused_step_kernel()
        for p in params:
            if distributed.is_sharded(p):  # FSDP2: state placement and collectives live there
                distributed.step_sharded(self, p)
                continue
            grad = _gradient(p)
            if grad.is_sparse:
                raise RuntimeError("LowRankAdamW does not support sparse gradients")
            state = self.state[p]
            if not state:
                self._init_projected_state(state, p, spec, group, self._locate(p)[2])
            step = int(state["step"]) + 1
            if proj_state.refresh_due(state, step - 1, spec):
                proj_state.refresh_(state, grad, p, spec, step - 1,
                                    self._name(group, self._locate(p)[1], p))
            state["step"].fill_(step)
            formats = proj_state.step_args(state, spec, p)
            # p.detach(): an alias without autograd history. The CPU kernel writes tiles of the
            # weight from at::parallel_for workers, where grad mode is not inherited, so handing
            # it the Parameter itself trips autograd's in-place check on a leaf view.
            kernel(p.detach(), grad, formats.pop("proj"), state.get("exp_avg"),
                   state["exp_avg_sq"], **self._step_hyper(group, state, p, step), **formats,
                   **proj_state.moment_scales(state))

    def _rule_scalars(self, group: dict, step: int) -> dict:
        """The inner rule's arguments of the fused step: lr, β1, β2, weight decay (Adam)."""
        lr, wd = self._step_size(group, step)
        beta1, beta2 = group["betas"]
        return {"lr": lr, "beta1": beta1, "beta2": beta2, "weight_decay": wd}

    def _step_hyper(self, group: dict, state: dict, p: torch.Tensor, step: int) -> dict:
        """The scalar (and INT8 quantization) arguments of the fused step at ``step``."""
        hyper = dict(**self._rule_scalars(group, step), eps=group["eps"], scale=group["scale"],
                     step=step, seed=int(state["proj_seed"]) % (2**31))
        if p.dtype == torch.uint8:
            # the weight's quantization parameters belong to the model; the step rewrites them
            hyper.update(param_scales=p.scales, param_zeros=p.zeros,
                         param_group_size=_int8_group_size(p))
        return hyper

    # the moments a projected weight keeps: M and V (AdaGrad: V only)
    _MOMENTS = ("exp_avg", "exp_avg_sq")

    def _init_projected_state(self, state: dict, p: torch.Tensor,
                              spec: proj_state.ProjectionSpec, group: dict,
                              position: int) -> None:
        m, n = p.shape
        shape = ops.low_rank_shape(m, n, spec.rank)
        # a DTensor's moments are DTensors placed with it (lowrank_kernels.distributed)
        sharded = distributed.is_sharded(p)
        zeros = (distributed.moment_zeros(p) if sharded
                 else functools.partial(torch.zeros, device=p.device))
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        dtype = moment_dtype(group["state_dtype"], p)
        for name in self._MOMENTS:
            if name == "exp_avg_sq" and group.get("second_moment", "full") == "factored":
                state[name] = zeros(reference.factored_shape(m, n, spec.rank), dtype=torch.float32)
                continue
            if dtype != "8bit":
                state[name] = zeros(shape, dtype=dtype)
                continue
            # zero codes with zero scales decode to 0: the fresh M and V
            state[name] = zeros(shape, dtype=torch.int8 if name == "exp_avg" else torch.uint8)
            scale_zeros = (distributed.moment_scale_zeros(p) if sharded
                           else functools.partial(torch.zeros, device=p.device))
            state[f"{name}_scales"] = scale_zeros(
                ops.moment_scales_shape(m, n, spec.rank, MOMENT_BLOCK_SIZE), dtype=torch.float32)
        proj_state.init_state_(state, spec, proj_state.parameter_seed(group["seed"], position))

    def _dense_state_layout(self, p: torch.Tensor) -> dict[str, tuple[int, ...]]:
        """The moments (name -> shape) the dense rule keeps for ``p``, beside ``step``."""
        if self.dense_adamw == "adafactor":
            return {"exp_avg_sq": (sum(p.shape),) if p.dim() == 2 else tuple(p.shape)}
        return {"exp_avg": tuple(p.shape), "exp_avg_sq": tuple(p.shape)}

    def _check_dense_layouts(self, state_dict: dict) -> None:
        """Refuses, before anything is loaded, a saved state of a parameter without rank whose
        moments are not the ones this optimizer's dense rule keeps (``dense_adamw`` is a
        constructor argument, not saved: a 'torch' checkpoint cannot resume under 'adafactor')."""
        for group, saved_group in zip(self.param_groups, state_dict["param_groups"]):
            if _is_projected(saved_group):
                continue
            for i, (p, saved_id) in enumerate(zip(group["params"], saved_group["params"])):
                saved = state_dict["state"].get(saved_id)
                if not saved:
                    continue
                layout = self._dense_state_layout(p)
                found = {k: tuple(v.shape) for k, v in saved.items()
                         if k != "step" and torch.is_tensor(v)}
                if found != layout:
                    rule = (f"dense_adamw={self.dense_adamw!r}" if self.dense_adamw
                            else type(self).__name__)
                    raise ValueError(f"state_dict: {self._name(group, i, p)} was saved with "
                                     f"moments {found}; {rule} keeps {layout} (the rule for "
                                     f"parameters without rank is a constructor argument: "
                                     f"resume with the one the checkpoint was written with)")

    def _init_dense_state(self, state: dict, p: torch.Tensor) -> None:
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        if self.dense_adamw == "adafactor":
            # a matrix: its row means then its column means of the EMA of G² (fp32); else V
            shape = self._dense_state_layout(p)["exp_avg_sq"]
            state["exp_avg_sq"] = torch.zeros(shape, dtype=torch.float32, device=p.device)
            return
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
            if distributed.is_sharded(p):
                distributed.shard_projection_(state, p)
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

    @torch.compiler.disable
    def _step_dense(self, group: dict, params: list[torch.Tensor]) -> None:
        """AdamW for a group without rank (``dense_adamw``). Eager inside torch.compile, as the
        projected step: traced, it would specialize on the group's float lr and recompile at
        every scheduler step (torch's own ``fused=True`` is its one-kernel form)."""
        if self.dense_adamw == "adafactor":
            self._step_dense_adafactor(group, params)
            return
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
            step = step_before + 1
            for i in idx:  # fill_: a quarter of the time of add_ (or _foreach_add_) on CPU scalars
                steps[i].fill_(step)
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

    def _step_dense_adafactor(self, group: dict, params: list[torch.Tensor]) -> None:
        """dense_adamw="adafactor": for a matrix G (m×n), with V's factors r (m) and c (n),

          r ← β2·r + (1−β2)·mean_j(G²),  c ← β2·c + (1−β2)·mean_i(G²),
          V̂ = r·cᵀ / max(mean(r), 1e-30),  W ← (1 − lr·wd)·(W − lr·√(1−β2ᵗ)·G/(√V̂ + ε))

        (``correct_bias=False``: lr instead of lr·√(1−β2ᵗ); a tensor that is not 2-D keeps V
        itself: V ← β2·V + (1−β2)·G²). No first moment: β1 is not used. Computed in fp32 over
        chunks of rows, so no temporary is larger than DENSE_CHUNK_ELEMENTS floats; the weight
        is rounded once per step in its dtype."""
        beta2 = group["betas"][1]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        for p in params:
            grad = p.grad
            if grad.is_sparse:
                raise RuntimeError("LowRankAdamW does not support sparse gradients")
            state = self.state[p]
            if not state:
                self._init_dense_state(state, p)
            step = int(state["step"]) + 1
            state["step"].fill_(step)
            step_size = lr * math.sqrt(1.0 - beta2**step) if group["correct_bias"] else lr
            v = state["exp_avg_sq"]
            if p.dim() != 2:
                g = grad.float()
                v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
                _apply_dense_update(p, g / (v.sqrt() + eps), step_size, lr * wd)
                continue
            m, n = p.shape
            rows, cols = v[:m], v[m:]
            chunk = max(1, DENSE_CHUNK_ELEMENTS // max(n, 1))
            col_sums = torch.zeros(n, dtype=torch.float32, device=p.device)
            row_means = torch.empty(m, dtype=torch.float32, device=p.device)
            for start in range(0, m, chunk):
                squares = grad[start:start + chunk].float().square()
                row_means[start:start + chunk] = squares.mean(dim=1)
                col_sums += squares.sum(dim=0)
            rows.mul_(beta2).add_(row_means, alpha=1.0 - beta2)
            cols.mul_(beta2).add_(col_sums / m, alpha=1.0 - beta2)
            col_scale = cols / torch.clamp(rows.mean(), min=reference.FACTORED_FLOOR)
            for start in range(0, m, chunk):
                v_hat = rows[start:start + chunk, None] * col_scale[None, :]
                update = grad[start:start + chunk].float() / (v_hat.sqrt() + eps)
                _apply_dense_update(p[start:start + chunk], update, step_size, lr * wd)

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
        int64 refresh counters and packed INT4 bases into floats. A parameter without rank
        whose saved moments are not the dense rule's is refused before anything is loaded."""
        self._check_dense_layouts(state_dict)
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
