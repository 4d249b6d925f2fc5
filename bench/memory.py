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
a model that fits this machine (llama-60m shapes, 1 decoder layer by default). The resident-set
growth (VmRSS, /proc/self/status) across building the model, setting the gradients, and the
first two ``step()`` calls is compared with the accounted weights, gradients and optimizer +
projection bytes; the state is also measured as the RSS released when it is dropped. The peak
(VmHWM) shows the step's transient temporaries on top. Tolerance: ``TOLERANCE``.
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
        from lowrank_kernels.autograd import replace_linear_with_int8

        replace_linear_with_int8(net, lambda name: name.rpartition(".")[2] in GALORE_TARGETS)
    return net


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
}


def _groups(net, cfg, recipe_keys: bool = True) -> tuple[list[dict], list, list]:
    """GaLore's grouping; ``recipe_keys=False`` leaves update_proj_gap to the preset (DCTAdamW:
    1, indices re-chosen every step)."""
    low_rank, rest = split_params(net)
    group = {"params": low_rank, "rank": cfg.rank, "scale": 0.25, "proj_type": "std"}
    if recipe_keys:
        group["update_proj_gap"] = cfg.update_proj_gap
    return [{"params": rest}, group], low_rank, rest


def build_optimizer(name: str, net: torch.nn.Module, cfg: harness.ModelShape):
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
            groups, low_rank, rest = _groups(net, cfg, recipe_keys=ours.preset != "DCTAdamW")
            opt = getattr(optim, ours.preset)(groups, lr=1e-3, state_dtype=ours.state_dtype)
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


# Our optimizers that bench/demo.py trains (each when lowrank_kernels.optim has it).
OUR_PRESETS = ("GaLoreAdamW", "QGaLoreAdamW", "DCTAdamW", "FiraAdamW", "LowRankAdamW")


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
        dtypes = {opt.state[p]["exp_avg_sq"].dtype for group in opt.param_groups
                  if group.get("rank") is not None for p in group["params"]}
        names = {torch.bfloat16: "bf16 (stochastically rounded)",
                 torch.uint8: "8-bit (FP8 codes + fp32 scales per 32 ranks)"}
        moments = " / ".join(names.get(d) or harness.dtype_name(d)
                             for d in sorted(dtypes, key=str))
        acc.note = f"rank {cfg.rank}; {moments} M, V of projected weights"
        if ours.int8_weights:
            acc.note += "; Int8Linear W g256 (fp32 scales/zeros)"
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
    **{key: account_ours(key) for key in OUR_CONFIGS},
}
MEASURABLE = ("adamw", "adamw8bit", "galore-torch",
              *(k for k, c in OUR_CONFIGS.items() if not c.layerwise))


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
    code = (f"import json, sys; sys.path.insert(0, {str(REPO)!r}); "
            "from bench import memory, harness; "
            f"print('RESULT', json.dumps(memory._measure_in_this_process({call})))")
    # A fixed mmap threshold makes glibc return every large freed block to the OS at once (its
    # adaptive threshold would keep freed temporaries resident and blur the growth).
    env = dict(os.environ, PYTHONWARNINGS="ignore", MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=timeout, env=env, cwd=REPO, check=False)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    print(f"  measured run of {optimizer} failed: {out.stderr.strip().splitlines()[-1:]}")
    return None


# |measured / accounted - 1| allowed for weights, gradients and the released state; the
# remainder is allocator granularity (pages, malloc arenas for tensors under the mmap threshold)
TOLERANCE = 0.03


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


COLUMNS = ["optimizer", "weights_GiB", "grads_held_GiB", "optimizer_GiB", "projection_GiB",
           "total_GiB", "note"]  # the CSVs also keep grads_all_GiB and grads_layer_GiB


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
    if args.measure:
        measurable = [o for o in args.optimizers if o in MEASURABLE]
        rows = validate(args.measure_model, args.dtype, measurable, args.measure_layers)
        print(f"\nvalidation on {args.measure_model} with {args.measure_layers} layers "
              "(real CPU run, 2 steps):")
        print(harness.format_table(rows))
        if args.csv and rows:
            path = harness.results_path(f"memory_validation_{args.measure_model}")
            harness.write_csv(path, rows, harness.machine_info("cpu"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
