"""Training demo: a tiny LLaMA trained on CPU with AdamW, galore-torch and our presets.

    python bench/demo.py [--steps 300] [--out bench/out]

Every optimizer starts from the same initial weights and sees the same batches: byte-level
language modelling of the Python standard library's source (no download needed). Loss curves
and step times go to demo_loss.png and demo_step_time.png, the per-run summary to demo.csv.
GaLore-style optimizers project the attention and MLP weights (rank --rank, refresh every
--gap steps, scale 0.25, the GaLore recipe's lr 0.01); AdamW uses lr 1e-3.
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

LR = {"AdamW": 1e-3, "galore": 1e-2}  # GaLore's recipe lr is 10x AdamW's (with scale 0.25)
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


def optimizers(cfg: harness.ModelShape) -> dict[str, Callable[[torch.nn.Module], object]]:
    """name -> factory(model); ours are added when lowrank_kernels.optim provides them."""
    def adamw(net):
        return torch.optim.AdamW(net.parameters(), lr=LR["AdamW"])

    def galore(net):
        import galore_torch

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return galore_torch.GaLoreAdamW(galore_groups(net, cfg), lr=LR["galore"])

    found: dict[str, Callable] = {"AdamW": adamw, "galore-torch": galore}
    try:
        optim = importlib.import_module("lowrank_kernels.optim")
    except ImportError:
        return found
    def ours(cls):
        return lambda net: cls(galore_groups(net, cfg), lr=LR["galore"])

    for preset in memory.OUR_PRESETS:
        if hasattr(optim, preset):
            found[f"ours {preset}"] = ours(getattr(optim, preset))
    if hasattr(optim, "GaLoreAdamW"):  # bf16 moments (stochastic rounding) against fp32 ones
        found["ours GaLoreAdamW bf16 moments"] = lambda net: optim.GaLoreAdamW(
            galore_groups(net, cfg), lr=LR["galore"], state_dtype=torch.bfloat16)
    return found


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


def plot(runs: dict[str, dict[str, list[float]]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, run in runs.items():
        ax.plot(smooth(run["loss"]), label=name)
    ax.set(xlabel="step", ylabel="training loss (10-step mean)",
           title=f"{TINY.name}: byte-level LM on CPU")
    ax.grid(alpha=0.3)
    ax.legend()
    loss_png = out / "demo_loss.png"
    fig.tight_layout()
    fig.savefig(loss_png, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(runs)
    ax.boxplot([runs[n]["opt_ms"][5:] for n in names], showfliers=False)
    ax.set_xticks(range(1, len(names) + 1), names)
    ax.set(ylabel="optimizer.step() ms", title="optimizer step time (after 5 warm-up steps)")
    ax.grid(alpha=0.3, axis="y")
    time_png = out / "demo_step_time.png"
    fig.tight_layout()
    fig.savefig(time_png, dpi=120)
    plt.close(fig)
    return [loss_png, time_png]


def run(steps: int = 300, batch: int = 16, seq: int = 64, out: Path = harness.OUT_DIR,
        seed: int = 0, show_progress: bool = True, threads: int = 1
        ) -> tuple[list[dict[str, object]], list[Path]]:
    # The model is tiny: more threads only add synchronisation (and fight other jobs for cores).
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run(steps, batch, seq, out, seed, show_progress)
    finally:
        torch.set_num_threads(previous_threads)


def _run(steps: int, batch: int, seq: int, out: Path, seed: int, show_progress: bool
         ) -> tuple[list[dict[str, object]], list[Path]]:
    torch.manual_seed(seed)
    initial = memory.build_model(TINY, torch.float32, device="cpu")
    data = batches(corpus(), steps, batch, seq, seed)
    runs = {}
    failures: dict[str, str] = {}
    for name, make_opt in optimizers(TINY).items():
        try:
            runs[name] = train(name, make_opt, copy.deepcopy(initial), data, show_progress)
        except (RuntimeError, TypeError, ValueError, NotImplementedError) as exc:
            # one broken optimizer must not hide the others' curves: report it in the table
            failures[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
            print(f"  {name} failed: {failures[name]}")
    rows = []
    for name, r in runs.items():
        tail = r["loss"][-20:]
        rows.append({"optimizer": name, "lr": LR.get(name, LR["galore"]), "steps": steps,
                     "first_loss": round(r["loss"][0], 4),
                     "final_loss_last20": round(sum(tail) / len(tail), 4),
                     "step_ms_median": round(harness.Timing.from_samples(
                         [s / 1e3 for s in r["step_ms"][5:]]).median_s * 1e3, 2),
                     "opt_step_ms_median": round(harness.Timing.from_samples(
                         [s / 1e3 for s in r["opt_ms"][5:]]).median_s * 1e3, 3)})
    rows += [{"optimizer": name, "steps": steps, "error": error}
             for name, error in failures.items()]
    harness.add_ratios(rows, key="optimizer", baseline="AdamW", value="opt_step_ms_median",
                       group_by=("steps",), column="opt_step_vs_AdamW")
    out.mkdir(parents=True, exist_ok=True)
    harness.write_csv(out / "demo.csv", rows, harness.machine_info("cpu"))
    return rows, plot(runs, out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=harness.OUT_DIR)
    args = parser.parse_args(argv)
    rows, pngs = run(args.steps, args.batch, args.seq, args.out, threads=args.threads)
    print(harness.format_table(rows))
    print("wrote", ", ".join(str(p) for p in pngs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
