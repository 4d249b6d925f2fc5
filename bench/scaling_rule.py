"""The square-root scaling rule (Malladi et al., NeurIPS 2022) on a tiny model: loss against
samples seen at batch B, 4B and 16B, with the sqrt rule, the linear rule and no rule.

    python bench/scaling_rule.py [--quick] [--seeds 3] [--optimizer adamw galore]
                                 [--out bench/results]

Model and data (one draw per seed): a 16→64→64→1 tanh MLP (with biases) regresses a teacher
MLP of the same shape (outputs scaled to standard deviation 1) from labels with Gaussian noise of
standard deviation ``--label-noise`` (2). The inputs and label noise of the whole run are drawn
once, so every batch size sees the same samples in the same order; only how they are grouped
into steps differs. Loss: MSE against the noise-free teacher on 2048 held-out inputs (the
excess risk), at 32 equally spaced sample counts.

Optimizers at the base batch B = 4 (``--base-batch``): torch AdamW, lr 1e-3, β = (0.99, 0.999),
ε 1e-8, no weight decay; and our GaLoreAdamW (hidden weight matrices projected at rank 8,
scale 0.25, lr 4e-3 for them, the rest at 1e-3, refresh every 200 steps). At κB the rule is
applied with ``lowrank_kernels.optim.scale_hyperparameters`` (κ = 4, 16); "none" keeps the base
values. The base β1 = 0.99 is what lets κ = 16 pass: the rule needs κ(1 − β1) < 1. The GaLore
refresh gap is divided by κ, so refreshes happen at the same sample counts (the function leaves
step counts to the caller, docs/scaling.md).

Regime: the SDE behind the rule needs small steps and gradient noise that dominates the
gradient. A label noise twice the signal and lr 1e-3 put the runs there; the script measures it:
the per-sample noise-to-signal ratio tr Σ / ‖∇L‖² (per-sample gradient covariance over the
squared full gradient, from 512 per-sample gradients) at the start and the end of the base run,
reported divided by the batch (a batch of b divides the noise by b); the rule is expected to hold
while that stays ≫ 1 at 16B.

Reported per optimizer and rule: final loss (mean of the last 4 evaluations, mean over seeds) at
B, 4B, 16B, their spread (max − min) and relative spread (spread / mean), and the curve spread
(mean over the second half of the evaluations of (max − min)/mean across batch sizes).
Claim under test: the sqrt rule's curves stay together — judged held when its relative final
spread and its curve spread are both the smallest of the three rules and below 10 %.

Outputs (``--out``, default bench/results): scaling_rule.md (setup, table, verdict) and
scaling_rule.png (one panel per optimizer and rule, loss against samples seen).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness
from lowrank_kernels.optim import GaLoreAdamW, scale_hyperparameters

IN, HIDDEN, EVAL_SAMPLES, NOISE_PROBE = 16, 64, 2048, 512
KAPPAS = (1, 4, 16)
RULES = ("none", "sqrt", "linear")
LR, BETAS, EPS = 1e-3, (0.99, 0.999), 1e-8
GALORE = {"rank": 8, "scale": 0.25, "lr": 4e-3, "update_proj_gap": 200}
QUICK = {"seeds": 1, "samples": 512, "evals": 8, "smoke": True}


@dataclasses.dataclass(frozen=True)
class Setup:
    base_batch: int = 4
    samples: int = 16384
    seeds: int = 3
    label_noise: float = 2.0
    evals: int = 32  # equally spaced evaluations per run
    smoke: bool = False  # --quick: proves the script runs; its numbers are not a measurement


def mlp(seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.Tanh(),
                               torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.Tanh(),
                               torch.nn.Linear(HIDDEN, 1))


@dataclasses.dataclass
class Data:
    x: torch.Tensor  # (samples, IN), the training stream
    y: torch.Tensor  # (samples, 1), noisy labels
    eval_x: torch.Tensor
    eval_y: torch.Tensor  # noise-free teacher outputs


@torch.no_grad()
def make_data(seed: int, setup: Setup) -> Data:
    teacher = mlp(10_000 + seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(setup.samples + EVAL_SAMPLES, IN, generator=gen)
    clean = teacher(x)
    clean /= clean.std()
    noisy = clean[:setup.samples] + setup.label_noise * torch.randn(setup.samples, 1,
                                                                    generator=gen)
    return Data(x[:setup.samples], noisy, x[setup.samples:], clean[setup.samples:])


def make_optimizer(name: str, net: torch.nn.Sequential) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(net.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0)
    hidden = [net[0].weight, net[2].weight]
    ids = {id(p) for p in hidden}
    rest = [p for p in net.parameters() if id(p) not in ids]
    return GaLoreAdamW([{"params": rest}, {"params": hidden, **GALORE}], lr=LR, betas=BETAS,
                       eps=EPS, weight_decay=0.0)


OPTIMIZERS = {"adamw": "torch AdamW", "galore": "GaLoreAdamW (ours)"}


def evaluate(net: torch.nn.Module, data: Data) -> float:
    with torch.no_grad():
        return torch.nn.functional.mse_loss(net(data.eval_x), data.eval_y).item()


def noise_to_signal(net: torch.nn.Module, data: Data) -> float:
    """tr Σ / ‖∇L‖² of per-sample gradients (of the training loss on noisy labels), from the
    first NOISE_PROBE samples of the stream; a batch of b divides it by b."""
    params = {k: v.detach() for k, v in net.named_parameters()}

    def loss(p, x, y):
        out = torch.func.functional_call(net, p, (x[None],))
        return ((out - y[None]) ** 2).mean()

    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(
        params, data.x[:NOISE_PROBE], data.y[:NOISE_PROBE])
    flat = torch.cat([g.reshape(NOISE_PROBE, -1) for g in grads.values()], dim=1)
    mean = flat.mean(0)
    return ((flat - mean).pow(2).sum(1).mean() / mean.pow(2).sum()).item()


def train(name: str, rule: str, kappa: int, seed: int, data: Data, setup: Setup
          ) -> tuple[list[float], list[float]]:
    """Eval losses at ``setup.evals`` equally spaced sample counts, and the noise-to-signal
    ratio at the start and the end."""
    net = mlp(seed)
    opt = make_optimizer(name, net)
    batch = setup.base_batch * kappa
    if rule != "none":
        scale_hyperparameters(opt, setup.base_batch, batch, rule)
    if name == "galore":  # refresh at the same sample counts as at the base batch
        opt.param_groups[1]["update_proj_gap"] = max(1, GALORE["update_proj_gap"] // kappa)
    steps = setup.samples // batch
    every = steps // setup.evals
    noise = [noise_to_signal(net, data)]
    losses = []
    for step in range(steps):
        rows = slice(step * batch, (step + 1) * batch)
        loss = torch.nn.functional.mse_loss(net(data.x[rows]), data.y[rows])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % every == 0:
            losses.append(evaluate(net, data))
    noise.append(noise_to_signal(net, data))
    return losses, noise


def summarize(curves: dict[int, list[float]]) -> dict[str, float]:
    """Final loss per κ (mean of the last 4 evaluations), spreads across κ."""
    finals = {k: statistics.fmean(c[-4:]) for k, c in curves.items()}
    values = list(finals.values())
    spread = max(values) - min(values)
    half = len(next(iter(curves.values()))) // 2
    curve_spread = statistics.fmean(
        (max(col) - min(col)) / statistics.fmean(col)
        for col in zip(*(c[half:] for c in curves.values()), strict=True))
    return {**{f"final_{k}B": v for k, v in finals.items()}, "spread": spread,
            "relative_spread": spread / statistics.fmean(values), "curve_spread": curve_spread}


def judge(rows: list[dict[str, object]], name: str) -> str:
    """Held when the sqrt rule has the smallest relative final spread and the smallest curve
    spread of the three rules, both below 10 %."""
    mine = {r["rule"]: r for r in rows if r["optimizer"] == name}
    held = all(mine["sqrt"][k] == min(r[k] for r in mine.values()) and mine["sqrt"][k] < 0.10
               for k in ("relative_spread", "curve_spread"))
    return (f"{'held' if held else 'did not hold'} for {OPTIMIZERS[name]} (relative final "
            "spread / curve spread: " + ", ".join(
                f"{rule} {r['relative_spread']:.1%} / {r['curve_spread']:.1%}"
                for rule, r in mine.items()) + ")")


def plot(curves: dict[tuple[str, str, int], list[float]], setup: Setup, names: Sequence[str],
         path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(names), len(RULES), figsize=(4 * len(RULES), 3.2 * len(names)),
                             sharex=True, sharey=True, squeeze=False)
    seen = [setup.samples * (i + 1) / setup.evals for i in range(setup.evals)]
    for row, name in enumerate(names):
        for col, rule in enumerate(RULES):
            ax = axes[row][col]
            for kappa in KAPPAS:
                ax.plot(seen, curves[name, rule, kappa], label=f"B = {setup.base_batch * kappa}")
            ax.set(yscale="log", title=f"{OPTIMIZERS[name]}, rule: {rule}")
            ax.grid(alpha=0.3, which="both")
            if row == len(names) - 1:
                ax.set_xlabel("samples seen")
            if col == 0:
                ax.set_ylabel(f"eval MSE (mean of {setup.seeds} seeds)")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown(rows: list[dict[str, object]], noise: dict[str, list[float]], setup: Setup,
             verdicts: list[str], seconds: float, command: str) -> str:
    b = setup.base_batch
    cols = {"optimizer": "optimizer", "rule": "rule", **{f"final_{k}B": f"final @ B={b * k}"
                                                         for k in KAPPAS},
            "spread": "spread", "relative_spread": "relative spread",
            "curve_spread": "curve spread"}
    table = [{cols[k]: (f"{v:.1%}" if k in ("relative_spread", "curve_spread") else
                        f"{v:.4g}" if isinstance(v, float) else v)
              for k, v in r.items() if k in cols} for r in rows]
    regime = "; ".join(
        f"{OPTIMIZERS[n]}: {v[0] / b:.3g} → {v[1] / b:.3g} at B={b}, "
        f"{v[0] / (16 * b):.3g} → {v[1] / (16 * b):.3g} at B={16 * b}"
        for n, v in noise.items())
    return "\n".join([
        "## Square-root scaling rule: loss against samples seen at B, 4B, 16B",
        "",
        (f"16→64→64→1 tanh MLP regressing a teacher MLP, label noise {setup.label_noise:g}× the "
         f"signal, {setup.samples} samples for every batch size, {setup.seeds} seed(s); base "
         f"B = {b}: AdamW lr {LR:g}, β = {BETAS}, ε {EPS:g}; GaLoreAdamW rank {GALORE['rank']}, "
         f"scale {GALORE['scale']}, lr {GALORE['lr']:g} for the projected weights. Rules from "
         "`lowrank_kernels.optim.scale_hyperparameters`. Final loss: eval MSE against the "
         f"noise-free teacher, mean of the last 4 of {setup.evals} evaluations. Command: "
         f"`{command}` ({seconds:.0f} s)."),
        "",
        f"Noise-to-signal ratio of the batch gradient (start → end of the base run): {regime}.",
        "",
        harness.format_table(table, markdown=True),
        "",
        "**Claim** (the sqrt rule's curves stay together across batch sizes): "
        + ("not judged: a --quick smoke run." if setup.smoke else "; ".join(verdicts) + "."),
        "",
    ])


def run(setup: Setup = Setup(), optimizers: Sequence[str] = tuple(OPTIMIZERS),
        out: Path = harness.RESULTS_DIR, threads: int = 1, command: str = ""
        ) -> tuple[list[dict[str, object]], list[Path]]:
    unknown = [n for n in optimizers if n not in OPTIMIZERS]
    if unknown:
        raise ValueError(f"optimizer: expected names from {sorted(OPTIMIZERS)}, got {unknown}")
    unit = setup.base_batch * max(KAPPAS) * setup.evals
    if setup.samples % unit:
        raise ValueError(f"samples: expected a multiple of base_batch·{max(KAPPAS)}·evals = "
                         f"{unit}, got {setup.samples}")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)  # a tiny MLP: more threads only add synchronisation
    start = time.perf_counter()
    curves: dict[tuple[str, str, int], list[float]] = {}
    noise: dict[str, list[float]] = {}
    try:
        for seed in range(setup.seeds):
            data = make_data(seed, setup)
            for name in optimizers:
                for rule in RULES:
                    for kappa in KAPPAS:
                        if kappa == 1 and rule != "none":  # κ = 1: every rule is the identity
                            curves[name, rule, 1] = curves[name, "none", 1]
                            continue
                        t0 = time.perf_counter()
                        losses, ratio = train(name, rule, kappa, seed, data, setup)
                        key = (name, rule, kappa)
                        curves[key] = [a + (b - a) / (seed + 1) for a, b in  # running mean
                                       zip(curves.get(key, losses), losses, strict=True)]
                        if kappa == 1:
                            noise[name] = [a + (b - a) / (seed + 1) for a, b in
                                           zip(noise.get(name, ratio), ratio, strict=True)]
                        print(f"[scaling_rule] seed {seed} {name:6s} {rule:6s} "
                              f"B={setup.base_batch * kappa:3d}: final {losses[-1]:.4g} "
                              f"({time.perf_counter() - t0:.1f} s)", flush=True)
    finally:
        torch.set_num_threads(previous_threads)
    rows = [{"optimizer": name, "rule": rule,
             **summarize({k: curves[name, rule, k] for k in KAPPAS})}
            for name in optimizers for rule in RULES]
    verdicts = [judge(rows, name) for name in optimizers]
    for line in verdicts:
        print(f"[scaling_rule] claim {line}")
    out.mkdir(parents=True, exist_ok=True)
    md = out / "scaling_rule.md"
    md.write_text(markdown(rows, noise, setup, verdicts, time.perf_counter() - start,
                           command or "python bench/scaling_rule.py"))
    return rows, [md, plot(curves, setup, optimizers, out / "scaling_rule.png")]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run in seconds, not a measurement: {QUICK}")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--base-batch", type=int, default=Setup.base_batch)
    parser.add_argument("--label-noise", type=float, default=Setup.label_noise)
    parser.add_argument("--optimizer", nargs="+", default=list(OPTIMIZERS),
                        choices=list(OPTIMIZERS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=harness.RESULTS_DIR)
    args = parser.parse_args(argv)
    sizes = dict(QUICK) if args.quick else {}
    sizes.update({k: v for k, v in (("seeds", args.seeds), ("samples", args.samples))
                  if v is not None})
    setup = Setup(base_batch=args.base_batch, label_noise=args.label_noise, **sizes)
    command = " ".join(["python bench/scaling_rule.py",
                        *(sys.argv[1:] if argv is None else argv)])
    _, paths = run(setup, args.optimizer, args.out, args.threads, command)
    print("wrote", ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
