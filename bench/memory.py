"""Memory accounting of a LLaMA model under each optimizer, from the optimizers' own allocation.

    python bench/memory.py --model llama-7b [--dtype bf16] [--measure] [--csv]

The model is built on the meta device (transformers LlamaForCausalLM when installed, else
nn.Linear/nn.Embedding modules from bench.harness.MODELS), every parameter gets a meta gradient,
and each optimizer runs its own state initialisation on those meta tensors. The state tensors it
allocated are then summed by category (bytes = numel × element size of each tensor):

  weights        parameter storage (INT8 codes + fp32 group scales/zeros for Int8Linear weights,
                 q-galore-torch's codes + its scales/zeros)
  grads (all)    every gradient held at once (normal training: one per parameter; the
                 ``float_grad`` of INT8 codes, in the activation dtype)
  grads (layer)  the largest single gradient (layer-wise training steps each weight from a hook)
  grads held     grads (all), or grads (layer) for a layer-wise row
  optimizer      moment buffers (exp_avg, exp_avg_sq, bitsandbytes state1/2 + absmax + qmaps)
  projection     projection state (GaLore basis, quantised basis + scales/zeros, DCT indices)

How each optimizer allocates on meta:
  torch AdamW, galore-torch   one ``step()`` on meta tensors (galore-torch's SVD runs on meta)
  bnb AdamW8bit               its own ``init_state`` per parameter (its kernels need real data)
  ours (lowrank_kernels)      ``LowRankAdamW.init_state(p)`` per parameter: the moments and the
                              projection storage a first step allocates, from the projector's
                              declared shape and dtype, without an SVD (tests check it equals a
                              real step's state tensor for tensor). The Q-GaLore preset's
                              projected Linears are Int8Linear modules (replace_linear_with_int8
                              on the meta model), so its weights are INT8 codes + scales/zeros.
  q-galore-torch              MODELLED, not stepped (q-galore-torch 1.0 cannot step with the
                              installed bitsandbytes): its own ``_quantize`` (weights, INT4 basis)
                              runs once on a real CPU tensor of each distinct shape (its
                              quantisers assert on NaN counts, which meta tensors cannot answer)
                              and the bytes are multiplied by the count of that shape; its 8-bit
                              states come from bitsandbytes' ``init_state`` on meta.

GaLore-style optimizers project the attention and MLP nn.Linear weights (the GaLore recipe,
rank from the model table); embeddings, lm_head and norms get plain AdamW states. Layer-wise
rows (``-layerwise``) build lowrank_kernels.optim.LayerwiseTrainer on the model (INT8 codes step
from their float_grad hook); their state is the same, only the gradients held at once shrink to
the largest one (a float ``.grad`` or an INT8 layer's ``float_grad``, in the activation dtype). No byte count is typed in by hand.

``--measure`` validates the accounting: each optimizer runs for real, in its own subprocess, on
a model that fits this machine (llama-60m shapes, 1 decoder layer by default; the configurations
of VALIDATION_MODEL_OVERRIDES on larger shapes, where their state is large enough to resolve).
The resident-set growth (VmRSS, /proc/self/status) across building the model, setting the
gradients, and the first two ``step()`` calls is compared with the accounted weights, gradients
and optimizer + projection bytes; the state is also measured as the RSS released when it is
dropped. The peak (VmHWM) shows the step's transient temporaries on top. Tolerance:
``TOLERANCE``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib
import json
import os
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `bench` and `lowrank_kernels` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness

REPO = Path(__file__).resolve().parent.parent
GALORE_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# names that mark projection state inside an optimizer's per-parameter state
PROJECTION_KEYS = ("projector", "ortho", "proj", "basis", "indices", "idx")


# --------------------------------------------------------------------------------------------
# the model on meta
# --------------------------------------------------------------------------------------------
def build_model(cfg: harness.ModelShape, dtype: torch.dtype, device: str = "meta",
                use_transformers: bool = True, int8_weights: bool = False) -> torch.nn.Module:
    """LlamaForCausalLM for ``cfg`` (untied embeddings, as the GaLore configs), or modules with
    the same parameters when transformers is missing or not wanted. ``int8_weights``: the
    projected Linears become lowrank_kernels Int8Linear (INT8 codes, groups of 256), as a
    Q-GaLore user prepares a model."""
    net = _build_float_model(cfg, dtype, device, use_transformers)
    if int8_weights:
        int8_projected_linears(net)
    return net


def int8_projected_linears(net: torch.nn.Module) -> None:
    """The projected Linears (GALORE_TARGETS) become Int8Linear (INT8 codes, groups of 256), in
    place, as a Q-GaLore user prepares a model."""
    from lowrank_kernels.autograd import replace_linear_with_int8

    replace_linear_with_int8(net, lambda name: name.rpartition(".")[2] in GALORE_TARGETS)


def _build_float_model(cfg: harness.ModelShape, dtype: torch.dtype, device: str,
                       use_transformers: bool) -> torch.nn.Module:
    transformers = None
    if use_transformers:
        with contextlib.suppress(ImportError):
            import transformers
    with torch.device(device):
        if transformers is not None:
            config = transformers.LlamaConfig(
                hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                num_key_value_heads=cfg.heads, vocab_size=cfg.vocab, tie_word_embeddings=False)
            net = transformers.LlamaForCausalLM(config)
        else:  # the same parameters, without the forward pass (enough for accounting)
            net = torch.nn.Module()
            net.embed_tokens = torch.nn.Embedding(cfg.vocab, cfg.hidden)
            net.layers = torch.nn.ModuleList()
            for _ in range(cfg.layers):
                layer = torch.nn.Module()
                for name, (m, n) in cfg.linear_shapes().items():
                    setattr(layer, name, torch.nn.Linear(n, m, bias=False))
                layer.input_layernorm = torch.nn.RMSNorm(cfg.hidden)
                layer.post_attention_layernorm = torch.nn.RMSNorm(cfg.hidden)
                net.layers.append(layer)
            net.norm = torch.nn.RMSNorm(cfg.hidden)
            net.lm_head = torch.nn.Linear(cfg.hidden, cfg.vocab, bias=False)
    return net.to(dtype)


def split_params(net: torch.nn.Module) -> tuple[list[torch.nn.Parameter],
                                                list[torch.nn.Parameter]]:
    """(projected weights: attention and MLP Linear weights, everything else)."""
    low_rank, rest = [], []
    for name, p in net.named_parameters():
        is_target = p.dim() == 2 and name.split(".")[-2] in GALORE_TARGETS
        (low_rank if is_target else rest).append(p)
    return low_rank, rest


# --------------------------------------------------------------------------------------------
# walking an optimizer's state
# --------------------------------------------------------------------------------------------
def _tensors(obj: object, path: str = "", depth: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    if depth > 4:
        return
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{path}.{k}" if path else str(k), depth + 1)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{path}[{i}]", depth + 1)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):  # e.g. a GaLoreProjector
        yield from _tensors(vars(obj), path, depth + 1)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _weight_tensors(p: torch.Tensor) -> list[torch.Tensor]:
    """The tensors a weight is stored in: the parameter, and for INT8 codes their group scales
    and zeros (Int8Linear's buffers, which the codes carry as ``scales``/``zeros``)."""
    if p.dtype != torch.uint8:
        return [p]
    return [p] + [getattr(p, attr) for attr in ("scales", "zeros")]


def _gradient(p: torch.Tensor) -> torch.Tensor:
    grad = p.grad if p.grad is not None else getattr(p, "float_grad", None)
    if grad is None:
        raise ValueError(f"parameter {list(p.shape)} {p.dtype}: no .grad or .float_grad to "
                         "account (set the gradients first)")
    return grad


@dataclasses.dataclass
class Account:
    optimizer: str
    weights: int = 0
    grads_all: int = 0
    grads_layer: int = 0
    optimizer_state: int = 0
    projection: int = 0
    layerwise: bool = False
    note: str = ""

    @property
    def grads_held(self) -> int:
        """Gradients alive at once: all of them, or the largest one under layer-wise steps."""
        return self.grads_layer if self.layerwise else self.grads_all

    @property
    def total(self) -> int:  # weights + grads held at once + states
        return self.weights + self.grads_held + self.optimizer_state + self.projection

    def add(self, other: Account) -> None:
        self.weights += other.weights
        self.grads_all += other.grads_all
        self.grads_layer = max(self.grads_layer, other.grads_layer)
        self.optimizer_state += other.optimizer_state
        self.projection += other.projection

    def row(self) -> dict[str, object]:
        gib = 2**30
        return {"optimizer": self.optimizer, "weights_GiB": round(self.weights / gib, 3),
                "grads_all_GiB": round(self.grads_all / gib, 3),
                "grads_layer_GiB": round(self.grads_layer / gib, 4),
                "grads_held_GiB": round(self.grads_held / gib, 3),
                "optimizer_GiB": round(self.optimizer_state / gib, 3),
                "projection_GiB": round(self.projection / gib, 4),
                "total_GiB": round(self.total / gib, 3), "note": self.note}


def account_state(name: str, params: Sequence[torch.Tensor], state: dict, *,
                  layerwise: bool = False) -> Account:
    """Sums the weights, gradients and optimizer state {param: {...}} of ``params`` by category
    (bytes of the tensors themselves); shared tensors counted once, 0-d step counters skipped."""
    acc = Account(name, layerwise=layerwise)
    seen: set[int] = set()
    for p in params:
        acc.weights += sum(_nbytes(t) for t in _weight_tensors(p))
        grad_bytes = _nbytes(_gradient(p))
        acc.grads_all += grad_bytes
        acc.grads_layer = max(acc.grads_layer, grad_bytes)
        for path, t in _tensors(state.get(p, {})):
            if id(t) in seen or t.dim() == 0:  # scalars: step counters
                continue
            seen.add(id(t))
            is_projection = any(key in path.lower() for key in PROJECTION_KEYS)
            if is_projection:
                acc.projection += _nbytes(t)
            else:
                acc.optimizer_state += _nbytes(t)
    return acc


def set_gradients(params: Sequence[torch.Tensor], make: Callable[[torch.Tensor], torch.Tensor]
                  = torch.empty_like, activation_dtype: torch.dtype | None = None) -> None:
    """A gradient for every parameter: ``.grad``, or for INT8 codes ``.float_grad`` in the
    activation dtype (as Int8Linear's backward produces it)."""
    for p in params:
        if p.dtype == torch.uint8:
            dtype = activation_dtype or torch.float32
            p.float_grad = make(torch.empty(p.shape, dtype=dtype, device=p.device))
        else:
            p.grad = make(p)


def _meta_grads(params: Sequence[torch.Tensor]) -> None:
    set_gradients(params)


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# --------------------------------------------------------------------------------------------
# the optimizers, built the same way for the meta accounting and for the measured runs
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class OurConfig:
    """One row of ours: a preset of lowrank_kernels.optim and how the model is trained."""

    label: str
    preset: str
    int8_weights: bool = False  # projected Linears as Int8Linear (Q-GaLore's INT8 weights)
    layerwise: bool = False  # LayerwiseTrainer: each weight steps from its gradient hook
    # projected moments: "auto" (the presets' default: the weight's dtype, bf16 stochastically
    # rounded), or a dtype
    state_dtype: str | torch.dtype = "auto"
    rank: int | None = None  # the projection rank; None: the model's recipe rank / rank_divisor
    rank_divisor: int = 1
    options: tuple[tuple[str, object], ...] = ()  # further group keys of the projected group
    constructor: tuple[tuple[str, object], ...] = ()  # further constructor arguments

    def rank_for(self, cfg: harness.ModelShape) -> int:
        return max(1, cfg.rank // self.rank_divisor) if self.rank is None else self.rank


OUR_CONFIGS: dict[str, OurConfig] = {
    "ours-GaLoreAdamW": OurConfig("ours GaLoreAdamW", "GaLoreAdamW"),
    "ours-QGaLoreAdamW": OurConfig("ours QGaLoreAdamW (INT4 P, INT8 W)", "QGaLoreAdamW",
                                   int8_weights=True),
    "ours-DCTAdamW": OurConfig("ours DCTAdamW", "DCTAdamW"),
    "ours-GaLoreAdamW-layerwise": OurConfig("ours GaLoreAdamW layer-wise", "GaLoreAdamW",
                                            layerwise=True),
    "ours-QGaLoreAdamW-layerwise": OurConfig("ours QGaLoreAdamW (INT4 P, INT8 W) layer-wise",
                                             "QGaLoreAdamW", int8_weights=True, layerwise=True),
    "ours-DCTAdamW-layerwise": OurConfig("ours DCTAdamW layer-wise", "DCTAdamW",
                                         layerwise=True),
    "ours-GaLoreAdamW-fp32": OurConfig("ours GaLoreAdamW, fp32 moments", "GaLoreAdamW",
                                       state_dtype=torch.float32),
    "ours-QGaLoreAdamW-layerwise-fp32": OurConfig(
        "ours QGaLoreAdamW (INT4 P, INT8 W) layer-wise, fp32 moments", "QGaLoreAdamW",
        int8_weights=True, layerwise=True, state_dtype=torch.float32),
    # 8-bit moments (DESIGN.md §4.9): int8/uint8 codes + fp32 scales per 32 ranks of a line
    "ours-GaLoreAdamW-8bit": OurConfig("ours GaLoreAdamW, 8-bit moments", "GaLoreAdamW",
                                       state_dtype="8bit"),
    "ours-QGaLoreAdamW-layerwise-8bit": OurConfig(
        "ours QGaLoreAdamW (INT4 P, INT8 W) layer-wise, 8-bit moments", "QGaLoreAdamW",
        int8_weights=True, layerwise=True, state_dtype="8bit"),
    "ours-GradNormLoRPAdamW": OurConfig("ours GradNormLoRPAdamW", "GradNormLoRPAdamW"),
    "ours-GradNormLoRPAdamW-layerwise": OurConfig("ours GradNormLoRPAdamW layer-wise",
                                                  "GradNormLoRPAdamW", layerwise=True),
    "ours-FiraAdamW": OurConfig("ours FiraAdamW", "FiraAdamW"),
    # APOLLO (rank = GaLore's / 4: 256 at 7B, its recipe; scale 1) and APOLLO-Mini (rank 1,
    # tensor scale, scale 128): the random basis is generated from the seed in each step, so
    # it takes no state
    "ours-APOLLOAdamW": OurConfig("ours APOLLOAdamW", "APOLLOAdamW", rank_divisor=4,
                                  options=(("scale", 1.0),)),
    "ours-APOLLOAdamW-int8-layerwise": OurConfig("ours APOLLOAdamW, INT8 W, layer-wise",
                                                 "APOLLOAdamW", rank_divisor=4,
                                                 int8_weights=True, layerwise=True,
                                                 options=(("scale", 1.0),)),
    "ours-APOLLO-Mini": OurConfig("ours APOLLO-Mini (APOLLOAdamW r1, tensor)", "APOLLOAdamW",
                                  rank=1, options=(("scale_type", "tensor"), ("scale", 128.0))),
    "ours-APOLLO-Mini-int8-layerwise": OurConfig(
        "ours APOLLO-Mini, INT8 W, layer-wise", "APOLLOAdamW", rank=1, int8_weights=True,
        layerwise=True, options=(("scale_type", "tensor"), ("scale", 128.0))),
    "ours-GradNormLoRPAdamW-layerwise-8bit": OurConfig(
        "ours GradNormLoRPAdamW layer-wise, 8-bit moments", "GradNormLoRPAdamW", layerwise=True,
        state_dtype="8bit"),
    # factored V (DESIGN.md §4.12): r + own fp32 values per weight instead of a V like M
    "ours-GaLoreAdamW-8bit-factored": OurConfig(
        "ours GaLoreAdamW, 8-bit M + factored V", "GaLoreAdamW", state_dtype="8bit",
        options=(("second_moment", "factored"),)),
    "ours-QGaLoreAdamW-layerwise-8bit-factored": OurConfig(
        "ours QGaLoreAdamW (INT4 P, INT8 W) layer-wise, 8-bit M + factored V", "QGaLoreAdamW",
        int8_weights=True, layerwise=True, state_dtype="8bit",
        options=(("second_moment", "factored"),)),
    # the 7B <= 10 GiB configuration (issue 16): + Adafactor (no M, factored V) for the
    # embeddings and lm_head, and the randomized SVD refresh (half the SVD's working set)
    "ours-QGaLoreAdamW-layerwise-10gib": OurConfig(
        "ours QGaLoreAdamW (INT4 P, INT8 W) layer-wise, 8-bit M + factored V, rsvd, Adafactor "
        "dense", "QGaLoreAdamW", int8_weights=True, layerwise=True, state_dtype="8bit",
        options=(("second_moment", "factored"), ("projection", "rsvd")),
        constructor=(("dense_adamw", "adafactor"),)),
}


def _groups(net, cfg, recipe_keys: bool = True, rank: int | None = None,
            options: dict | None = None) -> tuple[list[dict], list, list]:
    """GaLore's grouping; ``recipe_keys=False`` leaves update_proj_gap to the preset (DCTAdamW:
    1, indices re-chosen every step); ``rank`` overrides the recipe's, ``options`` are further
    keys of the projected group."""
    low_rank, rest = split_params(net)
    group = {"params": low_rank, "rank": cfg.rank if rank is None else rank, "scale": 0.25,
             "proj_type": "std", **(options or {})}
    if recipe_keys:
        group.setdefault("update_proj_gap", cfg.update_proj_gap)
    return [{"params": rest}, group], low_rank, rest


def build_optimizer(name: str, net: torch.nn.Module, cfg: harness.ModelShape,
                    lr: float = 1e-3):
    """(optimizer, its parameters in accounting order, layer-wise trainer or None) for
    ``name`` on ``net``. ImportError when the package is missing."""
    with _quiet():
        if name == "adamw":
            params = list(net.parameters())
            return torch.optim.AdamW(params, lr=1e-3, foreach=False), params, None
        if name == "adamw8bit":
            import bitsandbytes as bnb

            params = list(net.parameters())
            return bnb.optim.AdamW8bit(params, lr=1e-3), params, None
        if name == "galore-torch":
            import galore_torch

            groups, low_rank, rest = _groups(net, cfg)
            return galore_torch.GaLoreAdamW(groups, lr=1e-3), rest + low_rank, None
        if name in OUR_CONFIGS:
            ours = OUR_CONFIGS[name]
            optim = importlib.import_module("lowrank_kernels.optim")
            groups, low_rank, rest = _groups(net, cfg, recipe_keys=ours.preset != "DCTAdamW",
                                             rank=ours.rank_for(cfg), options=dict(ours.options))
            opt = getattr(optim, ours.preset)(groups, lr=lr, state_dtype=ours.state_dtype,
                                              **dict(ours.constructor))
            trainer = optim.LayerwiseTrainer(net, opt) if ours.layerwise else None
            return opt, rest + low_rank, trainer
    raise ValueError(f"optimizer: expected one of {tuple(ACCOUNTANTS)}, got {name!r}")


def _model_for(name: str, cfg: harness.ModelShape, dtype: torch.dtype, device: str = "meta",
               use_transformers: bool = True) -> torch.nn.Module:
    int8 = name in OUR_CONFIGS and OUR_CONFIGS[name].int8_weights
    return build_model(cfg, dtype, device, use_transformers, int8_weights=int8)


# --------------------------------------------------------------------------------------------
# one function per optimizer: returns its Account for the model
# --------------------------------------------------------------------------------------------
def account_adamw(net, cfg) -> Account:
    opt, params, _ = build_optimizer("adamw", net, cfg)
    _meta_grads(params)
    opt.step()
    return account_state("torch AdamW", params, opt.state)


def account_adamw8bit(net, cfg) -> Account:
    opt, params, _ = build_optimizer("adamw8bit", net, cfg)
    _meta_grads(params)
    group = opt.param_groups[0]
    for i, p in enumerate(params):  # bitsandbytes' own allocation (its kernels need real data)
        opt.init_state(group, p, 0, i)
    acc = account_state("bnb AdamW8bit", params, opt.state)
    acc.note = "blockwise 8-bit states, fp32 absmax per 256; <4096-element params stay fp32"
    return acc


def account_galore_torch(net, cfg) -> Account:
    opt, params, _ = build_optimizer("galore-torch", net, cfg)
    _meta_grads(params)
    opt.step()  # SVD, projection and state allocation, all on meta tensors
    acc = account_state("galore-torch GaLoreAdamW", params, opt.state)
    acc.note = f"rank {cfg.rank}; M, V and basis in the weight dtype"
    return acc


def account_q_galore_torch(net, cfg) -> Account:
    """q-galore-torch: INT8 weights of the projected Linears, INT4 (one code per byte) basis,
    bitsandbytes 8-bit states. Its quantisers assert on NaN counts, which meta tensors cannot
    answer, so they run once on a real CPU tensor of each distinct shape."""
    import bitsandbytes  # noqa: F401  (q_galore_torch needs it)
    import q_galore_torch
    from q_galore_torch.q_galore_projector import GaLoreProjector

    low_rank, rest = split_params(net)
    opt_cls = q_galore_torch.QGaLoreAdamW8bit
    dtype = low_rank[0].dtype
    per_shape: dict[tuple[int, int], tuple[int, int, int]] = {}  # weight, basis, 8-bit states
    for p in low_rank:
        shape = tuple(p.shape)
        if shape in per_shape:
            continue
        m, n = shape
        r = min(cfg.rank, m, n)
        codes, scales, zeros = opt_cls._quantize(None, torch.zeros(m, n, dtype=dtype),
                                                 q_group_size=256)
        weight_bytes = sum(_nbytes(t) for t in (codes, scales, zeros))
        projector = GaLoreProjector(r, quant=True, group_size=256, n_bit=4)
        basis_float = torch.zeros((r, n) if m >= n else (m, r), dtype=dtype)
        q_basis, q_scales, q_zeros, _ = projector._quantize(basis_float, q_group_size=256,
                                                            n_bit=4)
        basis_bytes = sum(_nbytes(t) for t in (q_basis, q_scales, q_zeros))
        # 8-bit states of the low-rank tensor (which stands in for p.data during the step)
        lr_param = torch.nn.Parameter(torch.empty((m, r) if m >= n else (r, n), dtype=dtype,
                                                  device="meta"))
        opt = opt_cls([lr_param], lr=1e-3)
        opt.init_state(opt.param_groups[0], lr_param, 0, 0)
        state_bytes = sum(_nbytes(t) for path, t in _tensors(opt.state[lr_param])
                          if t.dim() > 0 and "qmap" not in path)
        per_shape[shape] = (weight_bytes, basis_bytes, state_bytes)
    acc = Account("q-galore-torch QGaLoreAdamW8bit (modelled)",
                  note=f"rank {cfg.rank}; INT8 W g256, INT4 P (1 code/byte) g256, 8-bit M/V; "
                       "its own quantisers + bnb init_state, not stepped")
    for p in low_rank:
        weight_bytes, basis_bytes, state_bytes = per_shape[tuple(p.shape)]
        acc.weights += weight_bytes
        acc.grads_all += _nbytes(p)  # float_grad in the activation dtype = the meta weight's
        acc.grads_layer = max(acc.grads_layer, _nbytes(p))
        acc.projection += basis_bytes
        acc.optimizer_state += state_bytes
    # the other parameters: the same optimizer without projection (8-bit states)
    _meta_grads(rest)
    opt = opt_cls(rest, lr=1e-3)
    for i, p in enumerate(rest):
        opt.init_state(opt.param_groups[0], p, 0, i)
    acc.add(account_state("rest", rest, opt.state))  # includes the shared qmaps, counted once
    return acc


# apollo-torch's APOLLO-Mini, as its README sets it up: rank 1, a random projection refreshed
# every 200 steps, one tensor-wise scaling factor, scale 128.
APOLLO_MINI = {"rank": 1, "proj": "random", "scale_type": "tensor", "scale": 128.0,
               "update_proj_gap": 200, "proj_type": "std"}


def account_apollo_torch_mini(net: torch.nn.Module) -> Account:
    """apollo-torch 1.0.3 ``APOLLOAdamW`` as APOLLO-Mini (:data:`APOLLO_MINI`), its own state
    layout: low-rank M, V in the gradient's dtype, the projector object holding its random
    basis (r×n or m×r, the weight's dtype) and seed. MODELLED like q-galore-torch's row: its
    projector seeds a torch.Generator on the tensor's device, which the meta device lacks, so
    one weight of each distinct projected shape takes a real step on the CPU and its state
    bytes count for every weight of that shape; the parameters without rank step on meta."""
    apollo_torch = importlib.import_module("apollo_torch")
    dtype = cfg_dtype(net)
    low_rank, rest = split_params(net)
    per_shape: dict[tuple[int, ...], Account] = {}
    for p in low_rank:
        shape = tuple(p.shape)
        if shape not in per_shape:
            weight = torch.nn.Parameter(torch.zeros(shape, dtype=dtype))
            weight.grad = torch.ones_like(weight)
            opt = apollo_torch.APOLLOAdamW([{"params": [weight], **APOLLO_MINI}], lr=1e-3)
            opt.step()
            per_shape[shape] = account_state("", [weight], opt.state)
    acc = Account("apollo-torch APOLLOAdamW, APOLLO-Mini (modelled)",
                  note="rank 1, random P (seeded, stored), tensor scaling; M, V and P in the "
                       "weight dtype; its own AdamW for the rest")
    for p in low_rank:
        acc.add(per_shape[tuple(p.shape)])
    _meta_grads(rest)
    opt = apollo_torch.APOLLOAdamW([{"params": rest}], lr=1e-3)
    opt.step()
    acc.add(account_state("rest", rest, opt.state))
    return acc


def apollo_torch_mini_temporary(cfg: harness.ModelShape, dtype: torch.dtype) -> Temporary:
    """apollo-torch's step, from its code: parameters without rank take its AdamW loop
    (√V + ε and M/(√V + ε): two parameter-sized results, one parameter at a time); a projected
    weight's refresh copies the gradient to fp32 (``module_params.data.float()``, m·n·4) and its
    step scales the full gradient (m·n in its dtype)."""
    net = build_model(cfg, dtype)
    low_rank, rest = split_params(net)
    dense = 2 * max(_nbytes(p) for p in rest)
    refresh = max(4 * p.numel() for p in low_rank)
    if dense >= refresh:
        return Temporary(dense, "its AdamW results (2x the largest parameter without rank)")
    return Temporary(refresh, "the fp32 copy of a gradient at a refresh")


# Our optimizers that bench/demo.py trains (each when lowrank_kernels.optim has it).
OUR_PRESETS = ("GaLoreAdamW", "QGaLoreAdamW", "DCTAdamW", "FiraAdamW", "APOLLOAdamW",
               "LowRankAdamW", "GradNormLoRPAdamW")


def account_ours(key: str) -> Callable:
    """Ours on meta: ``init_state`` of every parameter allocates exactly what a first step
    allocates (moments; basis / packed INT4 basis + scales/zeros / DCT indices), no SVD."""
    ours = OUR_CONFIGS[key]

    def account(net, cfg) -> Account:
        opt, params, _ = build_optimizer(key, net, cfg)
        set_gradients(params, activation_dtype=cfg_dtype(net))
        for p in params:
            opt.init_state(p)
        acc = account_state(ours.label, params, opt.state, layerwise=ours.layerwise)
        projected = [opt.state[p] for group in opt.param_groups
                     if group.get("rank") is not None for p in group["params"]]
        names = {torch.bfloat16: "bf16 (stochastically rounded)",
                 torch.uint8: "8-bit (FP8 codes + fp32 scales per 32 ranks)",
                 torch.int8: "8-bit (FP8 codes + fp32 scales per 32 ranks)"}
        moment = projected[0].get("exp_avg", projected[0]["exp_avg_sq"])
        moments = names.get(moment.dtype) or harness.dtype_name(moment.dtype)
        if projected[0]["exp_avg_sq"].dim() == 1:
            acc.note = f"rank {ours.rank_for(cfg)}; {moments} M, factored fp32 V (r + own)"
        else:
            acc.note = f"rank {ours.rank_for(cfg)}; {moments} M, V of projected weights"
        if getattr(opt, "dense_adamw", "torch") == "adafactor":
            acc.note += "; Adafactor (no M, factored V) for the rest"
        if ours.int8_weights:
            acc.note += "; Int8Linear W g256 (fp32 scales/zeros)"
        if ours.preset == "GradNormLoRPAdamW":
            acc.note += "; 4 fp32 per row (g, ||v||, g's moments)"
        if ours.layerwise:
            acc.note += "; grads held = the largest one"
        return acc

    return account


def cfg_dtype(net: torch.nn.Module) -> torch.dtype:
    """The model's float dtype (the activation dtype of its INT8 layers)."""
    return next(p.dtype for p in net.parameters() if p.is_floating_point())


ACCOUNTANTS: dict[str, Callable] = {
    "adamw": account_adamw,
    "adamw8bit": account_adamw8bit,
    "galore-torch": account_galore_torch,
    "q-galore-torch": account_q_galore_torch,
    "apollo-torch-mini": lambda net, cfg: account_apollo_torch_mini(net),
    **{key: account_ours(key) for key in OUR_CONFIGS},
}
# Layer-wise configurations are measured too: the run sets every gradient and calls step(), which
# allocates the state the trainer's per-weight steps do (the gradients held are not measured).
MEASURABLE = ("adamw", "adamw8bit", "galore-torch", *OUR_CONFIGS)


def model_config(model_name: str, layers: int | None = None) -> harness.ModelShape:
    """The table's model, optionally with fewer layers (same shapes; for the measured runs)."""
    cfg = harness.model(model_name)
    if layers is None or layers == cfg.layers:
        return cfg
    return dataclasses.replace(cfg, name=f"{cfg.name}-{layers}layers", layers=layers)


def accounting(model_name: str, dtype: torch.dtype = torch.bfloat16,
               optimizers: Sequence[str] = tuple(ACCOUNTANTS), verbose: bool = True,
               layers: int | None = None, model_cfg: harness.ModelShape | None = None
               ) -> list[Account]:
    """The Account of each optimizer for the model (``model_cfg`` overrides the table's)."""
    cfg = model_cfg or model_config(model_name, layers)
    accounts = []
    for name in optimizers:
        try:
            with _quiet():
                accounts.append(ACCOUNTANTS[name](_model_for(name, cfg, dtype), cfg))
        except (ImportError, RuntimeError, TypeError, NotImplementedError) as exc:
            if verbose:
                print(f"  skip {name}: {type(exc).__name__}: {str(exc).splitlines()[0]}")
    return accounts


# --------------------------------------------------------------------------------------------
# validation: a real run in a subprocess, resident-set growth across the first steps
# --------------------------------------------------------------------------------------------
def _rss_kib() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in KiB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields["VmRSS"], fields["VmHWM"]


def _measure_in_this_process(optimizer: str, model_name: str, dtype: torch.dtype,
                             layers: int | None = None) -> dict:
    """Real tensors: RSS growth across building the model (weights), setting the gradients,
    and 2 steps (state); RSS released when the optimizer state is dropped; peak during the
    steps. The optimizer is built by ``build_optimizer``, as in the accounting."""
    def gradients(net):
        with torch.no_grad():
            set_gradients(list(net.parameters()), lambda t: torch.randn_like(t).mul_(1e-3), dtype)

    # Warm-up on a tiny model of the same kind: the first model build, optimizer construction
    # (torch.optim imports modules lazily) and step load code and libraries, which would count
    # as resident growth of the measured phases.
    tiny = harness.ModelShape("warm-up", hidden=64, intermediate=128, layers=1, heads=1, rank=8,
                              vocab=256)
    net = _model_for(optimizer, tiny, dtype, device="cpu", use_transformers=False)
    gradients(net)
    opt, _, _ = build_optimizer(optimizer, net, tiny)
    with _quiet():
        opt.step()
    del net, opt
    torch.manual_seed(0)
    cfg = model_config(model_name, layers)
    gc.collect()
    rss_empty, _ = _rss_kib()
    net = _model_for(optimizer, cfg, dtype, device="cpu", use_transformers=False)
    gc.collect()
    rss_weights, _ = _rss_kib()
    gradients(net)
    gc.collect()
    rss_grads, _ = _rss_kib()
    opt, _, _ = build_optimizer(optimizer, net, cfg)
    gc.collect()
    rss_before, _ = _rss_kib()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    with _quiet():
        for _ in range(2):
            opt.step()
    rss_after, hwm_after = _rss_kib()
    opt.state.clear()
    gc.collect()
    rss_cleared, _ = _rss_kib()
    kib = 1024
    return {"optimizer": optimizer, "weights": (rss_weights - rss_empty) * kib,
            "grads": (rss_grads - rss_weights) * kib,
            "rss_growth": (rss_after - rss_before) * kib,
            "rss_released": (rss_after - rss_cleared) * kib,
            "peak_growth": (hwm_after - rss_before) * kib,
            "peak_total": (hwm_after - rss_empty) * kib}


def measure(optimizer: str, model_name: str, dtype_name: str = "bf16",
            layers: int | None = None, timeout: float = 600) -> dict | None:
    """Runs ``_measure_in_this_process`` in a fresh interpreter; None when it fails."""
    call = f"{optimizer!r}, {model_name!r}, harness.DTYPE_NAMES[{dtype_name!r}], {layers!r}"
    return _in_fresh_interpreter(f"_measure_in_this_process({call})",
                                 f"measured run of {optimizer}", timeout)


def _in_fresh_interpreter(call: str, what: str, timeout: float):
    """``memory.<call>``'s JSON result, evaluated in a fresh interpreter; None when it fails."""
    code = (f"import json, sys; sys.path.insert(0, {str(REPO)!r}); "
            "from bench import memory, harness; "
            f"print('RESULT', json.dumps(memory.{call}))")
    # A fixed mmap threshold makes glibc return every large freed block to the OS at once (its
    # adaptive threshold would keep freed temporaries resident and blur the growth).
    env = dict(os.environ, PYTHONWARNINGS="ignore", MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=timeout, env=env, cwd=REPO, check=False)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    print(f"  {what} failed: {out.stderr.strip().splitlines()[-1:]}")
    return None


# |measured / accounted - 1| allowed for weights, gradients and the released state; the
# remainder is allocator granularity (pages, malloc arenas for tensors under the mmap threshold)
TOLERANCE = 0.03
# Configurations whose state is too small at llama-60m shapes for the resident set to resolve it:
# the 7B <= 10 GiB configuration holds 1.36 MiB there (Adafactor leaves the embeddings and head
# no moments), all in tensors under the mmap threshold, which freed stay in malloc's arenas
# (measured: 0.55 MiB released, ratio 0.40). At llama-1b shapes (1 layer) it holds 17.6 MiB.
VALIDATION_MODEL_OVERRIDES = {"ours-QGaLoreAdamW-layerwise-10gib": "llama-1b"}


def validate_all(model_name: str, dtype_name: str, optimizers: Sequence[str] = MEASURABLE,
                 layers: int | None = 1) -> list[dict]:
    """:func:`validate` on ``model_name``, except the configurations of
    VALIDATION_MODEL_OVERRIDES, each measured on its own model."""
    rows = validate(model_name, dtype_name,
                    [o for o in optimizers if o not in VALIDATION_MODEL_OVERRIDES], layers)
    for name in optimizers:
        if name in VALIDATION_MODEL_OVERRIDES:
            rows += validate(VALIDATION_MODEL_OVERRIDES[name], dtype_name, [name], layers)
    return rows


def validate(model_name: str, dtype_name: str, optimizers: Sequence[str] = MEASURABLE,
             layers: int | None = 1) -> list[dict]:
    """Accounted (meta) weights, gradients and optimizer+projection bytes against a real run.

    ``layers`` trims the model (same shapes) so that galore-torch's SVDs stay quick on CPU."""
    dtype = harness.DTYPE_NAMES[dtype_name]
    rows = []
    for name in harness.progress(optimizers, desc="measured runs"):
        accounts = accounting(model_name, dtype, [name], verbose=False, layers=layers)
        if not accounts:
            continue
        (acc,) = accounts
        result = measure(name, model_name, dtype_name, layers)
        if result is None:
            continue
        accounted_state = acc.optimizer_state + acc.projection
        ratios = {"weights": result["weights"] / acc.weights,
                  "grads": result["grads"] / acc.grads_all,
                  "state": result["rss_released"] / accounted_state}
        mib = 2**20
        rows.append({"optimizer": acc.optimizer,
                     "model": model_config(model_name, layers).name,
                     "weights_MiB": round(acc.weights / mib, 2),
                     "weights_rss_MiB": round(result["weights"] / mib, 2),
                     "grads_MiB": round(acc.grads_all / mib, 2),
                     "grads_rss_MiB": round(result["grads"] / mib, 2),
                     "accounted_state_MiB": round(accounted_state / mib, 2),
                     "rss_released_MiB": round(result["rss_released"] / mib, 2),
                     "rss_growth_MiB": round(result["rss_growth"] / mib, 2),
                     "peak_growth_MiB": round(result["peak_growth"] / mib, 2),
                     "total_MiB": round(acc.total / mib, 2),
                     "peak_rss_MiB": round(result["peak_total"] / mib, 2),
                     "worst_ratio": round(max(ratios.values(), key=lambda r: abs(r - 1)), 3),
                     "within_tolerance": all(abs(r - 1) <= TOLERANCE for r in ratios.values())})
    return rows


# --------------------------------------------------------------------------------------------
# the full step budget: the states above, activations, and the step's largest temporary
# --------------------------------------------------------------------------------------------
SEQ_LEN, BATCH = 256, 1  # the budget's training shape (issue 16: sequence 256, batch 1)


@dataclasses.dataclass(frozen=True)
class Activations:
    """Activation bytes of a LLaMA training step with activation checkpointing of every decoder
    layer (T = batch·seq tokens, s = the model dtype's bytes, h hidden, i intermediate, a heads,
    V vocab, L layers; FlashAttention as PyTorch's SDPA runs it for bf16 on a GPU):

      checkpoints = L·s·T·h + 2·s·S·h/a   each layer's input, kept through the forward, and the
                                          RoPE cos/sin every layer shares (S = seq: one per
                                          position, broadcast over the batch)
      layer       = (8 + 9s)·T·h + 4s·T·i + (8 + 4a)·T
                    one layer's saved tensors while its forward is recomputed in the backward:
                    two RMSNorms (fp32 input 4Th, normalised input sTh, fp32 rsqrt per token),
                    the q/k/v input, FlashAttention's q, k, v, output (4sTh) and fp32 log-sum-exp
                    (4aT), the o_proj input, the MLP input, and the MLP's gate, SiLU(gate), up and
                    down_proj input (4sTi)
      head        = (4 + 2s)·T·h + 4T + (4 + s)·T·V
                    the final RMSNorm, the lm_head input, cross-entropy's fp32 log-softmax (4TV),
                    and the logits (sTV) the training loop holds until backward

    peak = checkpoints + max(layer, head): the head's tensors are freed before the first layer
    is recomputed (tests/test_memory.py checks the terms against the tensors autograd saves)."""

    checkpoints: int
    layer: int
    head: int

    @property
    def total(self) -> int:
        return self.checkpoints + max(self.layer, self.head)


def activation_bytes(cfg: harness.ModelShape, seq: int = SEQ_LEN, batch: int = BATCH,
                     elem: int = 2) -> Activations:
    """:class:`Activations` of ``cfg`` at ``seq``×``batch`` tokens in a dtype of ``elem`` bytes."""
    t, h, i, a, v = batch * seq, cfg.hidden, cfg.intermediate, cfg.heads, cfg.vocab
    layer = (8 + 9 * elem) * t * h + 4 * elem * t * i + (8 + 4 * a) * t
    head = (4 + 2 * elem) * t * h + 4 * t + (4 + elem) * t * v
    return Activations(cfg.layers * elem * t * h + 2 * elem * seq * (h // a), layer, head)


class _FlashAttentionSaves(torch.autograd.Function):
    """scaled_dot_product_attention saving what its FlashAttention backend saves for backward
    (q, k, v, the output and an fp32 log-sum-exp per query and head), for counting on devices
    (CPU, meta) whose SDPA takes the math path, which saves the s×s attention matrix too."""

    @staticmethod
    def forward(ctx, query, key, value, is_causal, scale):
        with torch.no_grad():
            out = _SDPA(query, key, value, is_causal=is_causal, scale=scale)
        ctx.save_for_backward(query, key, value, out,
                              query.new_empty(query.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):  # counting only
        raise NotImplementedError


_SDPA = torch.nn.functional.scaled_dot_product_attention


def saved_tensor_bytes(cfg: harness.ModelShape, layers: int, seq: int = SEQ_LEN,
                       batch: int = BATCH, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of the tensors autograd saves in a forward + cross-entropy of LlamaForCausalLM
    (``layers`` decoder layers, no checkpointing) on the meta device, each storage once,
    parameters (and views of them) excluded; FlashAttention's saves (:class:`_FlashAttentionSaves`)."""
    import transformers

    model_cfg = dataclasses.replace(cfg, layers=layers)
    net = build_model(model_cfg, dtype, device="meta")
    params = {p.untyped_storage()._cdata for p in net.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        key = t.untyped_storage()._cdata
        if key not in params:
            storages[key] = t.untyped_storage().nbytes()
        return t

    def flash(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
              **kwargs):
        del attn_mask, dropout_p, kwargs  # causal, no dropout (HF's sdpa path for LLaMA)
        return _FlashAttentionSaves.apply(query, key, value, True, scale)

    tokens = torch.zeros(batch, seq + 1, dtype=torch.long, device="meta")
    original = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = flash
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = net(tokens[:, :-1]).logits
            torch.nn.functional.cross_entropy(logits.float().reshape(-1, cfg.vocab),
                                              tokens[:, 1:].reshape(-1))
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
    del transformers
    return sum(storages.values())


# The step's largest temporary: the biggest transient one optimizer step (refresh included)
# allocates beyond the states, the maximum of three sequential phases, each derived from the
# code that runs on a GPU (and checked on CPU by tests/test_memory.py at small shapes):
#   dense    AdamW of the parameters without rank (embeddings, lm_head, norms). LowRankAdamW's
#            dense_adamw="galore" (GaLoreAdamW, GradNormLoRPAdamW) holds two parameter-sized
#            foreach results at once (√V + ε, then M/(√V + ε)); torch's foreach AdamW
#            (dense_adamw="torch", the GPU default) one (√V). Layer-wise: one parameter at a time.
#   refresh  recomputing one weight's basis, the largest weight: an SVD's working set (G in fp32,
#            U, S, Vᵀ and LAPACK's workspace: svd_bytes_per_element, measured on this CPU by
#            measure_refresh_peak at half the 11008×4096 shape in each dimension and scaled by
#            m·n; cuSOLVER's workspace differs), a random basis (its d×r Gaussian, Q and R of the
#            QR), DCT scores (R and d scores).
#   step     the fused op's workspaces in its Triton launcher (triton_kernels/fused_*_step.py):
#            GaLore's N (r·own, in a 16-bit W's type, else fp32); GradNormLoRP's fp32 N, U
#            (right side), K = QQᵀ.


def measure_refresh_peak(m: int, n: int, rank: int, dtype_name: str = "bf16",
                         projection: str = "svd", timeout: float = 600) -> int | None:
    """Peak resident growth (VmHWM) of one ``projector.compute`` of an m×n gradient, measured in
    a fresh interpreter (the basis it returns excluded); None when the run fails."""
    return _in_fresh_interpreter(
        f"_refresh_peak_in_this_process({m}, {n}, {rank}, {dtype_name!r}, {projection!r})",
        "refresh measurement", timeout)


def _refresh_peak_in_this_process(m: int, n: int, rank: int, dtype_name: str,
                                  projection: str) -> int:
    from lowrank_kernels.projection import make_projector

    torch.set_num_threads(1)
    dtype = harness.DTYPE_NAMES[dtype_name]
    projector = make_projector(projection)
    gen = torch.Generator().manual_seed(0)
    projector.compute(torch.randn(64, 32).to(dtype), 8, generator=gen, param_name="warm-up")
    grad = torch.randn(m, n, generator=gen).to(dtype)
    gc.collect()
    rss_before, _ = _rss_kib()
    Path("/proc/self/clear_refs").write_text("5")
    basis = projector.compute(grad, rank, generator=gen, param_name="weight")
    _, hwm = _rss_kib()
    return (hwm - rss_before) * 1024 - _nbytes(basis)


def svd_bytes_per_element(dtype_name: str = "bf16", projection: str = "svd") -> float:
    """The SVD refresh's peak per gradient element, measured now at 5504×2048 (half of
    11008×4096 in each dimension): every term of the working set (G in fp32, U, Vᵀ, the copy
    LAPACK's gesdd overwrites, its O(k²) workspace, k = min(m, n)) scales as m·n when both
    dimensions scale together; on this CPU 23.7, 21.5 and 20.2 bytes at 1/8, 1/4 and 1/2
    scale (fixed costs fade), so the half-scale value slightly overstates the full one.
    ``projection="rsvd"``: the randomized SVD's, measured at rank 512 (half of 1024 too: its
    terms, G in fp32 and the m×(r+p), n×(r+p) sketches, all scale by 4 from there)."""
    peak = measure_refresh_peak(5504, 2048, 512, dtype_name, projection)
    return peak / (5504 * 2048) if peak else float("nan")


@dataclasses.dataclass(frozen=True)
class Temporary:
    nbytes: int
    what: str


def _dense_adamw_temporary(opt, rest: Sequence[torch.Tensor], layerwise: bool) -> Temporary:
    if getattr(opt, "dense_adamw", "torch") == "adafactor":
        # row chunks: at most four fp32 chunk-sized tensors live at once (G², or the fp32
        # update, √V̂ and the fp32 weight chunk), whatever the parameter
        from lowrank_kernels.optim.lowrank_adamw import DENSE_CHUNK_ELEMENTS

        largest = max((p.numel() for p in rest), default=0)
        return Temporary(4 * 4 * min(largest, DENSE_CHUNK_ELEMENTS),
                         "dense Adafactor row chunks (4 fp32 chunks)")
    sizes = [_nbytes(p) for p in rest]
    copies = 2 if getattr(opt, "dense_adamw", "torch") == "galore" else 1
    nbytes = copies * (max(sizes) if layerwise else sum(sizes))
    where = "the largest parameter" if layerwise else "every parameter without rank"
    return Temporary(nbytes, f"dense AdamW foreach results ({copies}x {where})")


def _refresh_temporary(projection: str, m: int, n: int, rank: int, svd_per_element: float,
                       rsvd_per_element: float | None) -> Temporary:
    d = min(m, n)
    if projection == "svd":
        return Temporary(int(svd_per_element * m * n), f"SVD refresh of a {m}x{n} gradient")
    if projection == "rsvd":
        return Temporary(int(rsvd_per_element * m * n),
                         f"randomized SVD refresh of a {m}x{n} gradient")
    if projection == "random":
        return Temporary(3 * 4 * d * rank, f"random basis refresh ({d}x{rank} QR)")
    if projection == "gaussian":  # generated in every step: _step_workspace counts it
        return Temporary(0, "no refresh work (APOLLO's basis: seed + refresh count)")
    return Temporary(4 * rank * max(m, n) + 4 * d, f"DCT refresh of a {m}x{n} gradient")


def _step_workspace(preset: str, m: int, n: int, rank: int, weight_dtype: torch.dtype,
                    factored: bool = False) -> Temporary:
    own = max(m, n)  # the owned axis: rows (right side, m >= n) or columns (left)
    if preset == "GradNormLoRPAdamW":
        right = m >= n
        nbytes = 4 * rank * own + (4 * m * rank if right else 0) + (4 * rank * rank if right
                                                                      else 0)
        return Temporary(nbytes, f"fused_gradnorm_step workspaces ({m}x{n})")
    if preset in ("FiraAdamW", "APOLLOAdamW"):  # fp32 N (+ R and the Gram: Fira; + the
        # generated fp32 basis: APOLLO); the per-line sums are O(own)
        fira = preset == "FiraAdamW"
        nbytes = (8 * rank * own + 4 * rank * rank if fira
                  else 4 * rank * own + 4 * rank * min(m, n))
        return Temporary(nbytes, f"full-rank step workspaces ({m}x{n})")
    elem = 2 if weight_dtype in (torch.bfloat16, torch.float16) else 4
    if factored:  # R kept in fp32 between the factors' update and M's (Triton launch A -> C;
        # the C++ kernel's low-rank workspace), then N in W's type (fp32 for INT8 codes)
        return Temporary((4 + elem) * rank * own,
                         f"fused_galore_step R and N workspaces, factored V ({m}x{n})")
    return Temporary(elem * rank * own, f"fused_galore_step N workspace ({m}x{n})")


def largest_temporary(key: str, cfg: harness.ModelShape, dtype: torch.dtype,
                      svd_per_element: float, rsvd_per_element: float | None = None
                      ) -> Temporary:
    """The largest temporary of one step of our configuration ``key`` (see above);
    ``rsvd_per_element`` None: measured now when ``key`` refreshes by randomized SVD."""
    ours = OUR_CONFIGS[key]
    with _quiet():
        net = _model_for(key, cfg, dtype)
        opt, _, _ = build_optimizer(key, net, cfg)
    low_rank, rest = split_params(net)
    group = next(g for g in opt.param_groups if g.get("rank") is not None)
    rank, projection = group["rank"], group["projection"]
    shapes = {tuple(p.shape) for p in low_rank}
    m, n = max(shapes, key=lambda s: s[0] * s[1])
    weight_dtype = low_rank[0].dtype
    if projection == "rsvd" and rsvd_per_element is None:
        rsvd_per_element = svd_bytes_per_element(harness.dtype_name(dtype), "rsvd")
    candidates = [_dense_adamw_temporary(opt, rest, ours.layerwise),
                  _refresh_temporary(projection, m, n, rank, svd_per_element,
                                     rsvd_per_element),
                  *(_step_workspace(ours.preset, *shape, rank, weight_dtype,
                                    group.get("second_moment") == "factored")
                    for shape in shapes)]
    return max(candidates, key=lambda t: t.nbytes)


def step_budget(model_name: str, dtype: torch.dtype = torch.bfloat16,
                keys: Sequence[str] = tuple(OUR_CONFIGS), svd_per_element: float | None = None,
                seq: int = SEQ_LEN, batch: int = BATCH, rsvd_per_element: float | None = None,
                model_cfg: harness.ModelShape | None = None) -> list[dict[str, object]]:
    """The full step budget of each configuration: the states of :func:`accounting`, the
    activations (:func:`activation_bytes`) and the largest temporary; total = their sum (the
    temporary counted as if it met the activations, as in layer-wise training, where a weight
    is stepped -- and refreshed -- inside the backward pass)."""
    cfg = model_cfg or model_config(model_name)
    if svd_per_element is None:
        svd_per_element = svd_bytes_per_element(harness.dtype_name(dtype))
    activations = activation_bytes(cfg, seq, batch, torch.tensor([], dtype=dtype).element_size())
    rows = []
    gib = 2**30
    for key, acc in zip(keys, accounting(model_name, dtype, keys, verbose=False,
                                         model_cfg=cfg), strict=True):
        temporary = largest_temporary(key, cfg, dtype, svd_per_element, rsvd_per_element)
        rows.append(_budget_row(acc, activations.total, temporary))
    try:
        with _quiet():
            apollo = account_apollo_torch_mini(build_model(cfg, dtype))
        rows.append(_budget_row(apollo, activations.total, apollo_torch_mini_temporary(cfg, dtype)))
    except ImportError as exc:
        print(f"  skip apollo-torch APOLLO-Mini: {exc}")
    for row in rows:
        row["activations_GiB"] = round(activations.total / gib, 3)
    return rows


def _budget_row(acc: Account, activations: int, temporary: Temporary) -> dict[str, object]:
    gib = 2**30
    total = acc.total + activations + temporary.nbytes
    return {"optimizer": acc.optimizer, "weights_GiB": round(acc.weights / gib, 3),
            "grads_held_GiB": round(acc.grads_held / gib, 3),
            "optimizer_GiB": round(acc.optimizer_state / gib, 3),
            "projection_GiB": round(acc.projection / gib, 4),
            "activations_GiB": round(activations / gib, 3),
            "largest_temporary_GiB": round(temporary.nbytes / gib, 3),
            "total_GiB": round(total / gib, 3), "temporary": temporary.what, "note": acc.note}


COLUMNS = ["optimizer", "weights_GiB", "grads_held_GiB", "optimizer_GiB", "projection_GiB",
           "total_GiB", "note"]
BUDGET_COLUMNS = ["optimizer", "weights_GiB", "grads_held_GiB", "optimizer_GiB", "projection_GiB",
                  "activations_GiB", "largest_temporary_GiB", "total_GiB", "temporary"]  # the CSVs also keep grads_all_GiB and grads_layer_GiB


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="*", default=["llama-7b"])
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--optimizers", nargs="*", default=list(ACCOUNTANTS),
                        choices=list(ACCOUNTANTS))
    parser.add_argument("--measure", action="store_true",
                        help="validate with real runs (RSS) on --measure-model")
    parser.add_argument("--measure-model", default="llama-60m")
    parser.add_argument("--measure-layers", type=int, default=1,
                        help="decoder layers of the measured model (its shapes are kept)")
    parser.add_argument("--csv", action="store_true", help="write bench/out/memory_*.csv")
    parser.add_argument("--step-budget", action="store_true",
                        help="also the full step budget of our configurations and apollo-torch's "
                             "APOLLO-Mini: + activations (seq 256, batch 1, checkpointing) and "
                             "the largest temporary (measures the SVD working set on this CPU)")
    args = parser.parse_args(argv)
    dtype = harness.DTYPE_NAMES[args.dtype]
    for name in args.model:
        cfg = harness.model(name)
        print(f"\n{cfg.name} ({cfg.total_params() / 1e9:.2f} B parameters), {args.dtype} "
              f"weights, GaLore rank {cfg.rank}:")
        rows = [a.row() for a in accounting(name, dtype, args.optimizers)]
        print(harness.format_table(rows, COLUMNS))
        if args.csv:
            path = harness.results_path(f"memory_{cfg.name}_{args.dtype}")
            harness.write_csv(path, rows, harness.machine_info("cpu"))
            print(f"wrote {path}")
        if args.step_budget:
            acts = activation_bytes(cfg, elem=torch.tensor([], dtype=dtype).element_size())
            per_element = svd_bytes_per_element(args.dtype)
            rsvd_per_element = svd_bytes_per_element(args.dtype, "rsvd")
            print(f"\nstep budget, sequence {SEQ_LEN} x batch {BATCH} with activation "
                  f"checkpointing: activations {acts.total / 2**20:.1f} MiB (checkpoints "
                  f"{acts.checkpoints / 2**20:.1f}, one layer {acts.layer / 2**20:.1f}, head "
                  f"{acts.head / 2**20:.1f}); SVD refresh {per_element:.2f} and randomized SVD "
                  f"{rsvd_per_element:.2f} bytes per gradient element (measured on this CPU at "
                  "5504x2048, r = 512):")
            budget = step_budget(name, dtype, [k for k in args.optimizers if k in OUR_CONFIGS],
                                 per_element, rsvd_per_element=rsvd_per_element)
            print(harness.format_table(budget, BUDGET_COLUMNS))
            if args.csv:
                path = harness.results_path(f"memory_step_{cfg.name}_{args.dtype}")
                harness.write_csv(path, budget, {**harness.machine_info("cpu"),
                                                 "svd_bytes_per_element": round(per_element, 3),
                                                 "rsvd_bytes_per_element":
                                                     round(rsvd_per_element, 3)})
                print(f"wrote {path}")
    if args.measure:
        measurable = [o for o in args.optimizers if o in MEASURABLE]
        rows = validate_all(args.measure_model, args.dtype, measurable, args.measure_layers)
        print(f"\nvalidation on {args.measure_model} with {args.measure_layers} layers "
              f"(real CPU run, 2 steps; {VALIDATION_MODEL_OVERRIDES} measured on their own "
              "model):")
        print(harness.format_table(rows))
        if args.csv and rows:
            path = harness.results_path(f"memory_validation_{args.measure_model}")
            harness.write_csv(path, rows, harness.machine_info("cpu"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
