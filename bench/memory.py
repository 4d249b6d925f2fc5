"""Memory accounting of a LLaMA model under each optimizer, from the optimizers' own allocation.

    python bench/memory.py --model llama-7b [--dtype bf16] [--measure]

The model is built on the meta device (transformers LlamaForCausalLM when installed, else
nn.Linear/nn.Embedding modules from bench.harness.MODELS), every parameter gets a meta gradient,
and each optimizer runs its own state initialisation on those meta tensors (for most, one real
``step()``). The state tensors it allocated are then summed by category:

  weights        parameter storage (INT8 codes + group scales/zeros for q-galore-torch)
  grads (all)    every gradient held at once (normal training: one per parameter)
  grads (layer)  the largest single gradient (layer-wise training steps each weight from a hook)
  optimizer      moment buffers (exp_avg, exp_avg_sq, bitsandbytes state1/2 + absmax + qmaps)
  projection     projection state (GaLore basis, quantised basis + scales/zeros, DCT indices)

GaLore-style optimizers project the attention and MLP nn.Linear weights (the GaLore recipe,
rank from the model table); embeddings, lm_head and norms get plain AdamW states.

Where a state cannot be allocated on meta tensors, the optimizer's own code runs on a real CPU
tensor of each distinct shape once and the bytes are multiplied by the number of weights of that
shape (q-galore-torch's quantisers assert on NaNs, which meta tensors cannot answer); its INT8
weight layout comes from its own ``_quantize`` the same way. No byte count is typed in by hand.

``--measure`` validates the accounting: each optimizer runs for real, in its own subprocess, on
a model that fits this machine (llama-60m by default), and the resident-set growth across
``step()`` (VmRSS, /proc/self/status) is compared with the accounted optimizer + projection bytes;
the peak (VmHWM) shows the transient temporaries on top.
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
from unittest import mock

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
                use_transformers: bool = True) -> torch.nn.Module:
    """LlamaForCausalLM for ``cfg`` (untied embeddings, as the GaLore configs), or modules with
    the same parameters when transformers is missing or not wanted."""
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


@dataclasses.dataclass
class Account:
    optimizer: str
    weights: int = 0
    grads_all: int = 0
    grads_layer: int = 0
    optimizer_state: int = 0
    projection: int = 0
    note: str = ""

    @property
    def total(self) -> int:  # weights + grads held at once + states
        return self.weights + self.grads_all + self.optimizer_state + self.projection

    def row(self) -> dict[str, object]:
        gib = 2**30
        return {"optimizer": self.optimizer, "weights_GiB": round(self.weights / gib, 3),
                "grads_all_GiB": round(self.grads_all / gib, 3),
                "grads_layer_GiB": round(self.grads_layer / gib, 4),
                "optimizer_GiB": round(self.optimizer_state / gib, 3),
                "projection_GiB": round(self.projection / gib, 4),
                "total_GiB": round(self.total / gib, 3), "note": self.note}


def account_state(name: str, params: Sequence[torch.Tensor], state: dict, *,
                  multiplier: Callable[[torch.Tensor], int] = lambda p: 1) -> Account:
    """Sums an optimizer state dict {param: {...}} by category; shared tensors counted once."""
    acc = Account(name)
    seen: set[int] = set()
    for p in params:
        k = multiplier(p)
        acc.weights += k * _nbytes(p)
        acc.grads_all += k * _nbytes(p)
        acc.grads_layer = max(acc.grads_layer, _nbytes(p))
        for path, t in _tensors(state.get(p, {})):
            if id(t) in seen or t.dim() == 0:  # scalars: step counters
                continue
            seen.add(id(t))
            is_projection = any(key in path.lower() for key in PROJECTION_KEYS)
            if is_projection:
                acc.projection += k * _nbytes(t)
            else:
                acc.optimizer_state += k * _nbytes(t)
    return acc


def _meta_grads(params: Sequence[torch.Tensor]) -> None:
    for p in params:
        p.grad = torch.empty_like(p)


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# --------------------------------------------------------------------------------------------
# one function per optimizer: returns its Account for the model
# --------------------------------------------------------------------------------------------
def account_adamw(net, cfg) -> Account:
    params = list(net.parameters())
    _meta_grads(params)
    opt = torch.optim.AdamW(params, lr=1e-3, foreach=False)
    opt.step()
    return account_state("torch AdamW", params, opt.state)


def account_adamw8bit(net, cfg) -> Account:
    import bitsandbytes as bnb

    params = list(net.parameters())
    opt = bnb.optim.AdamW8bit(params, lr=1e-3)
    group = opt.param_groups[0]
    for i, p in enumerate(params):  # bitsandbytes' own allocation (its kernels need real data)
        opt.init_state(group, p, 0, i)
    acc = account_state("bnb AdamW8bit", params, opt.state)
    acc.note = "blockwise 8-bit states, fp32 absmax per 256; <4096-element params stay fp32"
    return acc


def _galore_groups(net, cfg) -> tuple[list, list, list]:
    low_rank, rest = split_params(net)
    _meta_grads(low_rank + rest)
    groups = [{"params": rest},
              {"params": low_rank, "rank": cfg.rank, "update_proj_gap": cfg.update_proj_gap,
               "scale": 0.25, "proj_type": "std"}]
    return groups, low_rank, rest


def account_galore_torch(net, cfg) -> Account:
    import galore_torch

    groups, low_rank, rest = _galore_groups(net, cfg)
    with _quiet():
        opt = galore_torch.GaLoreAdamW(groups, lr=1e-3)
    opt.step()  # SVD, projection and state allocation, all on meta tensors
    acc = account_state("galore-torch GaLoreAdamW", rest + low_rank, opt.state)
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
    acc = Account("q-galore-torch QGaLoreAdamW8bit",
                  note=f"rank {cfg.rank}; INT8 W g256, INT4 P (1 code/byte) g256, 8-bit M/V")
    for p in low_rank:
        weight_bytes, basis_bytes, state_bytes = per_shape[tuple(p.shape)]
        acc.weights += weight_bytes
        acc.grads_all += _nbytes(p)  # float_grad in the activation dtype
        acc.grads_layer = max(acc.grads_layer, _nbytes(p))
        acc.projection += basis_bytes
        acc.optimizer_state += state_bytes
    # the other parameters: the same optimizer without projection (8-bit states)
    opt = opt_cls(rest, lr=1e-3)
    for i, p in enumerate(rest):
        opt.init_state(opt.param_groups[0], p, 0, i)
    other = account_state("rest", rest, opt.state)
    acc.weights += other.weights
    acc.grads_all += other.grads_all
    acc.grads_layer = max(acc.grads_layer, other.grads_layer)
    acc.optimizer_state += other.optimizer_state  # includes the shared qmaps, counted once
    return acc


@contextlib.contextmanager
def _meta_safe_generators():
    """torch.Generator(device="meta") raises ("not an accelerator"); our projectors seed one per
    parameter. A CPU generator is accepted by torch.randn(..., device="meta"), so hand out that."""
    real = torch.Generator

    def generator(device=None):
        meta = device is not None and torch.device(device).type == "meta"
        return real(device="cpu") if meta else real(device=device or "cpu")

    with mock.patch.object(torch, "Generator", generator):
        yield


# Our presets (lowrank_kernels.optim), written in parallel: each is used when it exists.
OUR_PRESETS = ("GaLoreAdamW", "QGaLoreAdamW", "DCTAdamW", "FiraAdamW", "LowRankAdamW")


def account_ours(preset: str) -> Callable:
    def account(net, cfg) -> Account:
        optim = importlib.import_module("lowrank_kernels.optim")
        if not hasattr(optim, preset):
            raise ImportError(f"lowrank_kernels.optim has no {preset} yet")
        cls = getattr(optim, preset)
        groups, low_rank, rest = _galore_groups(net, cfg)
        try:
            opt = cls(groups, lr=1e-3)
            with _meta_safe_generators():
                opt.step()
            acc = account_state(f"ours {preset}", rest + low_rank, opt.state)
            acc.note = f"rank {cfg.rank}"
            return acc
        except RuntimeError as exc:  # e.g. a .item() on the projection path
            meta_error = str(exc).splitlines()[0]
        # The same optimizer on a real CPU weight of each distinct shape, bytes times the count.
        acc = Account(f"ours {preset}", note=f"rank {cfg.rank}; real CPU step per distinct shape "
                                             f"(on meta: {meta_error})")
        per_shape: dict[tuple[int, int], Account] = {}
        for p in low_rank:
            shape = tuple(p.shape)
            if shape not in per_shape:
                torch.manual_seed(0)
                real = torch.nn.Parameter(torch.zeros(shape, dtype=p.dtype))
                real.grad = torch.randn(shape, dtype=p.dtype)
                group = {**groups[1], "params": [real], "rank": min(cfg.rank, *shape)}
                opt = cls([group], lr=1e-3)
                opt.step()
                per_shape[shape] = account_state("", [real], opt.state)
            part = per_shape[shape]
            acc.weights += part.weights
            acc.grads_all += part.grads_all
            acc.grads_layer = max(acc.grads_layer, part.grads_layer)
            acc.optimizer_state += part.optimizer_state
            acc.projection += part.projection
        opt = cls([{"params": rest}], lr=1e-3)  # unprojected parameters: dense states, on meta
        opt.step()
        other = account_state("", rest, opt.state)
        acc.weights += other.weights
        acc.grads_all += other.grads_all
        acc.grads_layer = max(acc.grads_layer, other.grads_layer)
        acc.optimizer_state += other.optimizer_state
        acc.projection += other.projection
        return acc

    return account


ACCOUNTANTS: dict[str, Callable] = {
    "adamw": account_adamw,
    "adamw8bit": account_adamw8bit,
    "galore-torch": account_galore_torch,
    "q-galore-torch": account_q_galore_torch,
    **{f"ours-{p}": account_ours(p) for p in OUR_PRESETS},
}


def model_config(model_name: str, layers: int | None = None) -> harness.ModelShape:
    """The table's model, optionally with fewer layers (same shapes; for the measured runs)."""
    cfg = harness.model(model_name)
    if layers is None or layers == cfg.layers:
        return cfg
    return dataclasses.replace(cfg, name=f"{cfg.name}-{layers}layers", layers=layers)


def accounting(model_name: str, dtype: torch.dtype = torch.bfloat16,
               optimizers: Sequence[str] = tuple(ACCOUNTANTS), verbose: bool = True,
               layers: int | None = None) -> list[Account]:
    cfg = model_config(model_name, layers)
    accounts = []
    for name in optimizers:
        net = build_model(cfg, dtype)
        try:
            with _quiet():
                accounts.append(ACCOUNTANTS[name](net, cfg))
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
    """Real tensors: build the model, set gradients, run 2 steps; RSS growth across the steps,
    RSS released when the optimizer state is dropped, and the peak during the steps."""
    torch.manual_seed(0)
    cfg = model_config(model_name, layers)
    net = build_model(cfg, dtype, device="cpu", use_transformers=False)
    for p in net.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    low_rank, rest = split_params(net)
    with _quiet():
        if optimizer == "adamw":
            opt = torch.optim.AdamW(net.parameters(), lr=1e-3, foreach=False)
        elif optimizer == "adamw8bit":
            import bitsandbytes as bnb

            opt = bnb.optim.AdamW8bit(net.parameters(), lr=1e-3)
        elif optimizer == "galore-torch":
            import galore_torch

            groups = [{"params": rest},
                      {"params": low_rank, "rank": cfg.rank, "update_proj_gap": 200,
                       "scale": 0.25, "proj_type": "std"}]
            opt = galore_torch.GaLoreAdamW(groups, lr=1e-3)
        elif optimizer.startswith("ours-"):
            optim = importlib.import_module("lowrank_kernels.optim")
            groups = [{"params": rest},
                      {"params": low_rank, "rank": cfg.rank, "update_proj_gap": 200,
                       "scale": 0.25, "proj_type": "std"}]
            opt = getattr(optim, optimizer.removeprefix("ours-"))(groups, lr=1e-3)
        else:
            raise ValueError(f"optimizer: no measured run for {optimizer!r}")
    rss_before, _ = _rss_kib()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    for _ in range(2):
        opt.step()
    rss_after, hwm_after = _rss_kib()
    opt.state.clear()
    gc.collect()
    rss_cleared, _ = _rss_kib()
    return {"optimizer": optimizer, "rss_growth": (rss_after - rss_before) * 1024,
            "rss_released": (rss_after - rss_cleared) * 1024,
            "peak_growth": (hwm_after - rss_before) * 1024}


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


def validate(model_name: str, dtype_name: str, optimizers: Sequence[str],
             layers: int | None = 1) -> list[dict]:
    """Accounted optimizer+projection bytes against the measured RSS growth across step().

    ``layers`` trims the model (same shapes) so that galore-torch's SVDs stay quick on CPU."""
    accounts = {a.optimizer: a for a in accounting(model_name, harness.DTYPE_NAMES[dtype_name],
                                                   optimizers, verbose=False, layers=layers)}
    rows = []
    for name in harness.progress(optimizers, desc="measured runs"):
        acc = _account_for(name, accounts)
        if acc is None:
            continue
        result = measure(name, model_name, dtype_name, layers)
        if result is None:
            continue
        accounted = acc.optimizer_state + acc.projection
        rows.append({"optimizer": acc.optimizer,
                     "model": model_config(model_name, layers).name,
                     "accounted_state_MiB": round(accounted / 2**20, 2),
                     "rss_growth_MiB": round(result["rss_growth"] / 2**20, 2),
                     "rss_released_MiB": round(result["rss_released"] / 2**20, 2),
                     "released_over_accounted": round(result["rss_released"] / accounted, 3),
                     "peak_growth_MiB": round(result["peak_growth"] / 2**20, 2)})
    return rows


def _account_for(name: str, accounts: dict[str, Account]) -> Account | None:
    prefix = {"adamw": "torch AdamW", "adamw8bit": "bnb AdamW8bit",
              "galore-torch": "galore-torch", "q-galore-torch": "q-galore-torch"}.get(
                  name, f"ours {name.removeprefix('ours-')}")
    return next((a for key, a in accounts.items() if key.startswith(prefix)), None)


COLUMNS = ["optimizer", "weights_GiB", "grads_all_GiB", "grads_layer_GiB", "optimizer_GiB",
           "projection_GiB", "total_GiB", "note"]


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
    parser.add_argument("--csv", action="store_true", help="write bench/results/memory_*.csv")
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
        measurable = [o for o in args.optimizers if o != "q-galore-torch"]
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
