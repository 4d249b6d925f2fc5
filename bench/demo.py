"""Training demo: a tiny LLaMA trained on CPU with AdamW, galore-torch and our presets.

    python bench/demo.py [--steps 300] [--out bench/out] [--no-sizes]

Every optimizer starts from the same initial weights and sees the same batches: byte-level
language modelling of the Python standard library's source (no download needed). Loss curves
and step times go to demo_loss.png and demo_step_time.png, the per-run summary to demo.csv.

Each optimizer runs at its own recipe's learning rate (``LR``): GaLore-style optimizers project
the attention and MLP weights (rank 32, refresh every 50 steps, scale 0.25; APOLLO scale 1,
APOLLO-Mini rank 1 and scale 128) at the GaLore recipe's lr 0.01 (Q-GaLore's 0.015); AdamW, whose best lr differs most from theirs, runs a
small sweep (``ADAMW_LRS``), every point in the table and its best in the plots.

Then (unless --no-sizes) the optimizer step alone against model size: the projected weights
(attention and MLP Linears, every layer) of llama-tiny, llama-60m and llama-130m, random
gradients, a few steps of each optimizer interleaved (harness.time_interleaved) ->
demo_step_time_by_size.png / .csv. Embeddings and norms are left out: every optimizer gives
them plain AdamW. Ours is LowRankAdamW with a random projection and galore-torch holds fixed
bases: both time the steady-state step (the SVD of a refresh step is excluded from both).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import sysconfig
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

if __package__ in (None, ""):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness, memory

# recipe learning rates: GaLore's LLaMA recipe 0.01 (scale 0.25), Q-GaLore's 0.015 at 60M/130M
LR = {"galore-torch": 1e-2, "ours GaLoreAdamW": 1e-2, "ours QGaLoreAdamW": 1.5e-2,
      "ours DCTAdamW": 1e-2, "ours LowRankAdamW": 1e-2, "ours GaLoreAdamW bf16 moments": 1e-2,
      "ours GaLoreAdamW 8-bit moments": 1e-2, "ours GradNormLoRPAdamW": 1e-2,
      "ours FiraAdamW": 1e-2, "ours APOLLOAdamW": 1e-2}
# group keys of a preset's recipe that differ from GaLore's (APOLLO: scale 1, Fira's alpha is
# GaLore's 0.25)
RECIPE_KEYS = {"APOLLOAdamW": {"scale": 1.0}}
# Configurations of bench/memory.py trained as they are accounted there (INT8 weights,
# layer-wise stepping, moment dtype, rank), each at its preset's lr: the memory table's
# candidates for a small 7B budget, whose loss the README compares with GaLoreAdamW's.
MEMORY_CONFIGS = ("ours-QGaLoreAdamW-layerwise", "ours-QGaLoreAdamW-layerwise-8bit",
                  "ours-QGaLoreAdamW-layerwise-10gib", "ours-GradNormLoRPAdamW-layerwise-8bit",
                  "ours-APOLLO-Mini-int8-layerwise")
# AdamW's recipe at 60M is 1e-3; the sweep brackets it (and shows it at GaLore's 0.01)
ADAMW_LRS = (3e-4, 1e-3, 3e-3, 1e-2)
TINY = harness.ModelShape("llama-tiny", hidden=128, intermediate=344, layers=2, heads=4,
                          rank=32, update_proj_gap=50, vocab=256)


def corpus(max_bytes: int = 2_000_000) -> torch.Tensor:
    """Bytes of the standard library's top-level .py files, as a uint8 tensor."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    chunks, size = [], 0
    for path in sorted(stdlib.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        size += len(data)
        if size >= max_bytes:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:max_bytes]), dtype=torch.uint8)


def batches(data: torch.Tensor, steps: int, batch: int, seq: int, seed: int
            ) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, data.numel() - seq - 1, (steps, batch), generator=gen)
    return [torch.stack([data[s:s + seq + 1] for s in row.tolist()]).long() for row in starts]


def galore_groups(net: torch.nn.Module, cfg: harness.ModelShape) -> list[dict]:
    low_rank, rest = memory.split_params(net)
    return [{"params": rest},
            {"params": low_rank, "rank": cfg.rank, "update_proj_gap": cfg.update_proj_gap,
             "scale": 0.25, "proj_type": "std"}]


def optimizers(cfg: harness.ModelShape, adamw_lrs: Sequence[float] = ADAMW_LRS
               ) -> dict[str, tuple[float, Callable[[torch.nn.Module], object]]]:
    """name -> (lr, factory(model)); ours are added when lowrank_kernels.optim provides them."""
    found: dict[str, tuple[float, Callable]] = {}
    for lr in adamw_lrs:
        found[f"AdamW lr {lr:g}"] = (lr, lambda net, lr=lr: torch.optim.AdamW(net.parameters(),
                                                                              lr=lr))

    def galore(net):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return harness.import_galore_torch().GaLoreAdamW(galore_groups(net, cfg),
                                                             lr=LR["galore-torch"])

    found["galore-torch"] = (LR["galore-torch"], galore)
    try:
        optim = importlib.import_module("lowrank_kernels.optim")
    except ImportError:
        return found

    def ours(cls, lr, recipe=None, **kwargs):
        def make(net):
            rest, projected = galore_groups(net, cfg)
            return cls([rest, {**projected, **(recipe or {})}], lr=lr, **kwargs)
        return make

    for preset in memory.OUR_PRESETS:
        name = f"ours {preset}"
        if hasattr(optim, preset) and name in LR:
            found[name] = (LR[name], ours(getattr(optim, preset), LR[name],
                                          RECIPE_KEYS.get(preset)))
    if hasattr(optim, "GaLoreAdamW"):  # bf16 and 8-bit moments against fp32 ones
        for name, state_dtype in (("ours GaLoreAdamW bf16 moments", torch.bfloat16),
                                  ("ours GaLoreAdamW 8-bit moments", "8bit")):
            found[name] = (LR[name], ours(optim.GaLoreAdamW, LR[name], state_dtype=state_dtype))
    for key in MEMORY_CONFIGS:
        config = memory.OUR_CONFIGS[key]
        lr = LR[f"ours {config.preset}"]
        found[config.label] = (lr, memory_config_optimizer(key, cfg, lr))
    return found


class _LayerwiseSteps:
    """A layer-wise trainer seen by ``train``: its hooks step every weight during backward, so
    step() and zero_grad() have nothing left to do."""

    def __init__(self, trainer):
        self.trainer = trainer

    def step(self) -> None:
        pass

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass


def memory_config_optimizer(key: str, cfg: harness.ModelShape, lr: float
                            ) -> Callable[[torch.nn.Module], object]:
    """A factory training bench/memory.py's configuration ``key`` on the demo's model: its
    projected Linears quantized to INT8 first when the configuration has INT8 weights, the
    optimizer (and layer-wise trainer) built as the accounting builds them."""
    def make(net):
        if memory.OUR_CONFIGS[key].int8_weights:
            memory.int8_projected_linears(net)
        opt, _, trainer = memory.build_optimizer(key, net, cfg, lr=lr)
        return opt if trainer is None else _LayerwiseSteps(trainer)
    return make


def train(name: str, make_opt, net: torch.nn.Module, data: list[torch.Tensor],
          show_progress: bool = True) -> dict[str, list[float]]:
    opt = make_opt(net)
    losses, step_ms, opt_ms = [], [], []
    bar = harness.progress(data, desc=f"{name:>14}", disable=not show_progress)
    for tokens in bar:
        t0 = time.perf_counter()
        logits = net(tokens[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 tokens[:, 1:].reshape(-1))
        loss.backward()
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        losses.append(loss.item())
        step_ms.append((t2 - t0) * 1e3)
        opt_ms.append((t2 - t1) * 1e3)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return {"loss": losses, "step_ms": step_ms, "opt_ms": opt_ms}


def smooth(values: Sequence[float], window: int = 10) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v - (values[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def _save(fig, path: Path, bottom: float = 0.03) -> Path:
    """Writes the figure with the result header on the image itself (commit, date, machine,
    versions) in a footer strip of height ``bottom``, and closes it."""
    import matplotlib.pyplot as plt

    info = harness.machine_info("cpu")
    fig.tight_layout(rect=(0, bottom, 1, 1))
    fig.text(0.01, 0.005, f"commit {info['commit']}, {info['date_utc']}, {info['cpu']}, "
             f"torch {info['torch']}", fontsize=6, color="0.4", va="bottom")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot(runs: dict[str, dict[str, list[float]]], lrs: dict[str, float], out: Path
         ) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for name, run in runs.items():
        ax.plot(smooth(run["loss"]), label=name if name.startswith("AdamW lr")
                else f"{name} (lr {lrs[name]:g})")
    ax.set(xlabel="step", ylabel="training loss (10-step mean)",
           title=f"{TINY.name}: byte-level LM on CPU, each optimizer at its recipe lr")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    loss_png = _save(fig, out / "demo_loss.png")

    # horizontal boxes: the optimizers' names are long and read left to right
    names = list(runs)[::-1]
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(names) + 1.4))
    ax.boxplot([runs[n]["opt_ms"][5:] for n in names], vert=False, showfliers=False)
    ax.set_yticks(range(1, len(names) + 1), names, fontsize=8)
    ax.set(xlabel="optimizer.step() ms (1 thread)",
           title=f"{TINY.name} optimizer step time (after 5 warm-up steps)")
    ax.grid(alpha=0.3, axis="x")
    return [loss_png, _save(fig, out / "demo_step_time.png", bottom=0.04)]


def run(steps: int = 300, batch: int = 16, seq: int = 64, out: Path = harness.OUT_DIR,
        seed: int = 0, show_progress: bool = True, threads: int = 1,
        adamw_lrs: Sequence[float] = ADAMW_LRS) -> tuple[list[dict[str, object]], list[Path]]:
    # The model is tiny: more threads only add synchronisation (and fight other jobs for cores).
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run(steps, batch, seq, out, seed, show_progress, adamw_lrs)
    finally:
        torch.set_num_threads(previous_threads)


def _run(steps: int, batch: int, seq: int, out: Path, seed: int, show_progress: bool,
         adamw_lrs: Sequence[float]) -> tuple[list[dict[str, object]], list[Path]]:
    torch.manual_seed(seed)
    initial = memory.build_model(TINY, torch.float32, device="cpu")
    data = batches(corpus(), steps, batch, seq, seed)
    runs, lrs = {}, {}
    failures: dict[str, str] = {}
    for name, (lr, make_opt) in optimizers(TINY, adamw_lrs).items():
        lrs[name] = lr
        try:
            runs[name] = train(name, make_opt, copy.deepcopy(initial), data, show_progress)
        except (RuntimeError, TypeError, ValueError, NotImplementedError) as exc:
            # one broken optimizer must not hide the others' curves: report it in the table
            failures[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
            print(f"  {name} failed: {failures[name]}")
    final = {name: sum(r["loss"][-20:]) / len(r["loss"][-20:]) for name, r in runs.items()}
    adamw = [name for name in runs if name.startswith("AdamW")]
    best_adamw = min(adamw, key=final.get) if adamw else None
    rows = []
    for name, r in runs.items():
        rows.append({"optimizer": name, "lr": lrs[name], "steps": steps,
                     "best_of_sweep": "yes" if name == best_adamw else "",
                     "first_loss": round(r["loss"][0], 4),
                     "final_loss_last20": round(final[name], 4),
                     "step_ms_median": round(harness.Timing.from_samples(
                         [s / 1e3 for s in r["step_ms"][5:]]).median_s * 1e3, 2),
                     "opt_step_ms_median": round(harness.Timing.from_samples(
                         [s / 1e3 for s in r["opt_ms"][5:]]).median_s * 1e3, 3)})
    rows += [{"optimizer": name, "lr": lrs[name], "steps": steps, "error": error}
             for name, error in failures.items()]
    if best_adamw:
        harness.add_ratios(rows, key="optimizer", baseline=best_adamw,
                           value="opt_step_ms_median", group_by=("steps",),
                           column="opt_step_vs_AdamW")
    out.mkdir(parents=True, exist_ok=True)
    harness.write_csv(out / "demo.csv", rows, harness.machine_info("cpu"))
    shown = {name: r for name, r in runs.items() if name not in adamw or name == best_adamw}
    return rows, plot(shown, lrs, out)


# --------------------------------------------------------------------------------------------
# optimizer step time against model size
# --------------------------------------------------------------------------------------------
SIZES = ("llama-tiny", "llama-60m", "llama-130m")


def projected_weights(cfg: harness.ModelShape) -> list[torch.nn.Parameter]:
    """The attention and MLP weights of every layer, with random gradients."""
    weights = []
    for _ in range(cfg.layers):
        for m, n in cfg.linear_shapes().values():
            p = torch.nn.Parameter(0.02 * torch.randn(m, n))
            p.grad = 1e-3 * torch.randn(m, n)
            weights.append(p)
    return weights


def size_optimizers(weights: list[torch.nn.Parameter], cfg: harness.ModelShape
                    ) -> dict[str, object]:
    """The optimizers of the size plot on ``weights`` (shared; each keeps its own state).
    Steady state only: galore-torch's projectors hold fixed bases, ours draws a random basis
    (the fused step it then runs is the one every projection shares)."""
    from lowrank_kernels.optim import LowRankAdamW

    groups = [{"params": weights, "rank": cfg.rank, "update_proj_gap": cfg.update_proj_gap,
               "scale": 0.25, "proj_type": "std"}]
    random = [{**groups[0], "projection": "random"}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        galore = harness.galore_torch_fixed_bases(groups, lr=1e-2, weight_decay=0.0, eps=1e-6)
    return {"AdamW (torch)": torch.optim.AdamW(weights, lr=1e-3), "galore-torch": galore,
            "ours (LowRankAdamW)": LowRankAdamW(random, lr=1e-2)}


def step_time_by_size(out: Path = harness.OUT_DIR, sizes: Sequence[str] = SIZES,
                      rounds: int = 3, threads: int = 1) -> tuple[list[dict[str, object]], Path]:
    """Median optimizer.step() ms per model size, the optimizers interleaved round by round, on
    ``threads`` threads (one by default: on a shared machine, parallel regions waiting for parked
    threads would charge the many-op steps far more than the fused one)."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _step_time_by_size(out, sizes, rounds)
    finally:
        torch.set_num_threads(previous_threads)


def _step_time_by_size(out: Path, sizes: Sequence[str], rounds: int
                       ) -> tuple[list[dict[str, object]], Path]:
    configs = {TINY.name: TINY, **harness.MODELS}
    rows: list[dict[str, object]] = []
    for name in sizes:
        cfg = configs[name]
        torch.manual_seed(0)
        weights = projected_weights(cfg)
        opts = size_optimizers(weights, cfg)
        timings = harness.time_interleaved({k: o.step for k, o in opts.items()}, rounds=rounds,
                                           warmup=1)
        params = sum(p.numel() for p in weights)
        for optimizer, t in timings.items():
            rows.append({"model": name, "projected_params_M": round(params / 1e6, 2),
                     "rank": cfg.rank,
                         "optimizer": optimizer, "threads": torch.get_num_threads(),
                         "rounds": rounds, "step_ms": round(t.median_s * 1e3, 2),
                         "iqr_ms": round(t.iqr_s * 1e3, 2)})
        print(f"  step time at {name}: " + ", ".join(
            f"{k} {t.median_s * 1e3:.1f} ms" for k, t in timings.items()), flush=True)
        del weights, opts
    harness.add_ratios(rows, key="optimizer", baseline="galore-torch", value="step_ms",
                       group_by=("model",))
    out.mkdir(parents=True, exist_ok=True)
    harness.write_csv(out / "demo_step_time_by_size.csv", rows, harness.machine_info("cpu"))
    return rows, plot_sizes(rows, out)


def plot_sizes(rows: list[dict[str, object]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for optimizer in dict.fromkeys(r["optimizer"] for r in rows):
        mine = [r for r in rows if r["optimizer"] == optimizer]
        ax.plot([r["projected_params_M"] for r in mine], [r["step_ms"] for r in mine], marker="o",
                label=optimizer)
    ax.set(xscale="log", yscale="log",
           xlabel="model (its projected attention + MLP parameters)",
           ylabel="optimizer.step() ms (median)",
           title="optimizer step of the projected weights against model size "
                 f"(CPU, {rows[0]['threads']} thread{'' if rows[0]['threads'] == 1 else 's'})")
    sizes = {r["model"]: r["projected_params_M"] for r in rows}
    ax.set_xticks(list(sizes.values()), [f"{m}\n{p:g} M" for m, p in sizes.items()])
    ax.minorticks_off()
    ax.set_xlim(min(sizes.values()) / 2, max(sizes.values()) * 2)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out / "demo_step_time_by_size.png")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--adamw-lrs", type=float, nargs="+", default=list(ADAMW_LRS))
    parser.add_argument("--no-sizes", action="store_true", help="skip the step time by size")
    parser.add_argument("--out", type=Path, default=harness.OUT_DIR)
    args = parser.parse_args(argv)
    rows, pngs = run(args.steps, args.batch, args.seq, args.out, threads=args.threads,
                     adamw_lrs=args.adamw_lrs)
    print(harness.format_table(rows))
    if not args.no_sizes:
        size_rows, png = step_time_by_size(args.out)
        print(harness.format_table(size_rows))
        pngs.append(png)
    print("wrote", ", ".join(str(p) for p in pngs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
