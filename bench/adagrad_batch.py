"""Adagrad vs SGD (and Adam) as the batch grows: iterations to a target loss on anisotropic
softmax regression (the seed: "Adagrad under anisotropic smoothness", ICLR 2025).

    python bench/adagrad_batch.py [--quick] [--spectrum spiked|log] [--seeds 3]
                                  [--optimizer sgd adagrad adam] [--out bench/results]

Problem (one per seed): K = 4 classes, d = 64 features x_j ~ N(0, s_j²). Coordinate j's
smoothness is ∝ s_j² and its gradient noise variance ∝ s_j² too, so both differ across
coordinates as in the paper. Two spectra of scales s_j (both over 1.75 decades of scale,
3.5 of smoothness):

  spiked (default)  one feature at 1, the other 63 log-spaced over 10^-0.75 … 10^-1.75
  log               all 64 log-spaced over 1 … 10^-1.75

Why two: bounds of the form ε ≲ D²‖L‖₁/T + D‖σ‖₁/√(BT) (Adagrad, coordinate-wise L and σ) and
ε ≲ D²L_max/T + D‖σ‖₂/√(BT) (SGD) stop improving with B past a critical batch
B* ∝ ‖σ‖₁²/‖L‖₁ (Adagrad) and ∝ ‖σ‖₂²/L_max (SGD); with σ_j² ∝ L_j their ratio is
(Σ√L_j)² L_max/(ΣL_j)²: ≈ 14 for the spiked spectrum, ≈ 3.6 for the log one (the script
prints it). The spiked one is where the claim is expected to show, the log one a control.

Labels come from a softmax teacher W* (K×d) whose column j is N(0, s_j^(−2p)), p =
``--weight-power`` (coordinate j's share of the logit variance ∝ s_j^(2−2p)), rescaled to logit
standard deviation 3. Every iteration draws B fresh samples; the stream of a (seed, B) is the
same for every optimizer and lr (common random numbers). The model is the K×d weight of a
bias-free linear layer, from zero, on the cross-entropy; its gradient is computed in closed form
and handed to the torch optimizer (a 2-D weight, so a low-rank optimizer can take it later).

Target: excess loss L(W) − L(W*) ≤ ``--excess`` · (L(0) − L(W*)), L the cross-entropy against
the teacher's probabilities on 4096 held-out inputs. "Iterations to target": the first evaluated
iteration at or under it (evaluated every iteration up to 32, then every ⌊t/32⌋: 3 %
resolution), capped at ``--max-iters`` (shown as ">cap"); a run whose loss is not finite
counts as not reaching it.

Protocol: for each batch size and optimizer every lr of the optimizer's grid (GRIDS, ×√10 apart)
runs on every seed, and the lr with the smallest median iteration count (over seeds) is kept.
Runs stop as soon as they pass the best median so far, and an lr stops once half its seeds
missed: the same choice as running everything to the cap. Each batch size starts its search at
the previous one's lr.

Claim under test: Adagrad's count keeps falling as B grows where SGD's flattens. Measured by
each optimizer's critical batch: the smallest B of the sweep from which the next (4×) batch
gives less than half of perfect scaling (fewer than 2× fewer iterations); the claim holds when
Adagrad's critical batch is larger than SGD's.

Outputs (``--out``, default bench/results): adagrad_batch.md (setup, tables, verdict) and
adagrad_batch.png (iterations against B, log-log). ``--quick``: a smoke run in seconds. A new
optimizer is one entry in OPTIMIZERS (a factory ``(weight, lr) -> optimizer``) and one in GRIDS;
``lowrank_adagrad`` is lowrank_kernels' LowRankAdagrad (rank 4, the whole class axis in an SVD
basis, through the fused op): whether the low-rank AdaGrad keeps AdaGrad's batch-size behaviour
is read from its critical batch beside Adagrad's.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness

CLASSES, FEATURES, EVAL_SAMPLES, LOGIT_STD = 4, 64, 4096, 3.0
BATCHES = (1, 4, 16, 64, 256, 1024)
QUICK = {"seeds": 1, "max_iters": 200, "batches": (16, 256), "excess": 0.3, "smoke": True}
SPECTRA = ("spiked", "log")

LOWRANK_RANK = 4  # = min(K, d): the whole class axis, in the SVD basis of the gradient


def _lowrank_adagrad(w: torch.Tensor, lr: float) -> torch.optim.Optimizer:
    """lowrank_kernels' LowRankAdagrad on the K×d weight (left side: P is K×r, R = Pᵀ G r×d, so
    AdaGrad stays coordinate-wise along the d anisotropic features), SVD basis refreshed every
    200 iterations (GaLore's default gap), ε as torch's Adagrad."""
    from lowrank_kernels.optim import LowRankAdagrad

    return LowRankAdagrad([{"params": [w], "rank": LOWRANK_RANK, "update_proj_gap": 200}],
                          lr=lr)


OPTIMIZERS: dict[str, Callable[[torch.Tensor, float], torch.optim.Optimizer]] = {
    "sgd": lambda w, lr: torch.optim.SGD([w], lr=lr),
    "adagrad": lambda w, lr: torch.optim.Adagrad([w], lr=lr),
    "adam": lambda w, lr: torch.optim.Adam([w], lr=lr),
    "lowrank_adagrad": _lowrank_adagrad,
}
GRIDS: dict[str, tuple[float, ...]] = {  # each reaches past the best lr at both ends
    "sgd": (0.3, 1.0, 3.0, 10.0, 30.0, 100.0),
    "adagrad": (0.03, 0.1, 0.3, 1.0, 3.0, 10.0),
    "adam": (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0),
    "lowrank_adagrad": (0.03, 0.1, 0.3, 1.0, 3.0, 10.0),
}


@dataclasses.dataclass(frozen=True)
class Setup:
    spectrum: str = "spiked"
    weight_power: float = 0.5
    excess: float = 0.1
    seeds: int = 3
    max_iters: int = 4000
    batches: tuple[int, ...] = BATCHES
    smoke: bool = False  # --quick: proves the script runs; its numbers are not a measurement


def feature_scales(spectrum: str) -> torch.Tensor:
    if spectrum == "spiked":
        return torch.cat([torch.ones(1), torch.logspace(-0.75, -1.75, FEATURES - 1)])
    if spectrum == "log":
        return torch.logspace(0.0, -1.75, FEATURES)
    raise ValueError(f"spectrum: expected one of {SPECTRA}, got {spectrum!r}")


def critical_batch_ratio(scales: torch.Tensor) -> float:
    """B*(Adagrad)/B*(SGD) = (Σ√L_j)²·L_max/(ΣL_j)² with L_j ∝ σ_j² ∝ s_j² (module docstring)."""
    smooth = scales.double() ** 2
    return (smooth.sqrt().sum() ** 2 * smooth.max() / smooth.sum() ** 2).item()


@dataclasses.dataclass
class Problem:
    scales: torch.Tensor  # (d,)
    teacher: torch.Tensor  # (K, d)
    eval_x: torch.Tensor  # (n, d)
    eval_p: torch.Tensor  # (n, K) teacher probabilities
    target: float
    seed: int


def cross_entropy(w: torch.Tensor, x: torch.Tensor, p: torch.Tensor) -> float:
    """Cross-entropy of the model's softmax against the teacher's probabilities ``p``."""
    return -(p * torch.log_softmax(x @ w.T, dim=1)).sum(1).mean().item()


def make_problem(seed: int, setup: Setup) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    scales = feature_scales(setup.spectrum)
    teacher = torch.randn(CLASSES, FEATURES, generator=gen) * scales.pow(-setup.weight_power)
    probe = torch.randn(4096, FEATURES, generator=gen) * scales
    teacher *= LOGIT_STD / (probe @ teacher.T).std()
    eval_x = torch.randn(EVAL_SAMPLES, FEATURES, generator=gen) * scales
    eval_p = torch.softmax(eval_x @ teacher.T, dim=1)
    best = cross_entropy(teacher, eval_x, eval_p)
    start = math.log(CLASSES)  # W = 0: uniform prediction
    return Problem(scales, teacher, eval_x, eval_p, best + setup.excess * (start - best), seed)


class Stream:
    """The samples of one (problem, batch size): batch t is the same for every optimizer and lr
    (common random numbers), drawn in chunks and kept, so the lr search generates them once."""

    CHUNK = 32  # iterations per draw

    def __init__(self, problem: Problem, batch_size: int):
        self.problem, self.batch_size = problem, batch_size
        self.gen = torch.Generator().manual_seed(1_000_003 * (problem.seed + 1) + batch_size)
        self.x: list[torch.Tensor] = []
        self.y: list[torch.Tensor] = []

    def __getitem__(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        chunk, row = divmod(t - 1, self.CHUNK)
        while len(self.x) <= chunk:
            n = self.CHUNK * self.batch_size
            x = torch.randn(n, FEATURES, generator=self.gen) * self.problem.scales
            gumbel = -torch.log(-torch.log(torch.rand(n, CLASSES, generator=self.gen)))
            y = (x @ self.problem.teacher.T + gumbel).argmax(1)  # y ~ softmax(W* x)
            onehot = torch.nn.functional.one_hot(y, CLASSES).to(x.dtype)
            self.x.append(x.view(self.CHUNK, self.batch_size, FEATURES))
            self.y.append(onehot.view(self.CHUNK, self.batch_size, CLASSES))
        return self.x[chunk][row], self.y[chunk][row]


def gradient(w: torch.Tensor, x: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """∇_W of the mean cross-entropy: (softmax(X Wᵀ) − onehot(y))ᵀ X / B."""
    return (torch.softmax(x @ w.T, dim=1) - onehot).T @ x / len(x)


def _evaluated(t: int) -> bool:
    return t % max(1, t // 32) == 0


def iterations_to_target(stream: Stream, name: str, lr: float, cap: int) -> int | None:
    """First evaluated iteration whose loss is ≤ the target; None if not reached by ``cap`` or
    diverged (a loss that is not finite). A large but finite loss is not divergence: Adagrad's
    first step moves every coordinate by lr and can overshoot, then recover."""
    problem = stream.problem
    w = torch.zeros(CLASSES, FEATURES, requires_grad=True)
    opt = OPTIMIZERS[name](w, lr)
    for t in range(1, cap + 1):
        x, y = stream[t]
        w.grad = gradient(w.detach(), x, y)
        opt.step()
        if _evaluated(t):
            loss = cross_entropy(w.detach(), problem.eval_x, problem.eval_p)
            if loss <= problem.target:
                return t
            if not math.isfinite(loss):
                return None
    return None


def _median(counts: Sequence[int | None]) -> float:
    return statistics.median(math.inf if c is None else c for c in counts)


def tune(streams: Sequence[Stream], name: str, max_iters: int, start_lr: float | None
         ) -> dict[str, object]:
    """The lr of GRIDS[name] with the smallest median iterations over ``streams`` (seeds), with
    its per-seed counts as text (">c": stopped at c, the cap or the best median at the time; "—"
    when no lr reached the target)."""
    grid = GRIDS[name]
    order = sorted(grid, key=lambda lr: abs(math.log(lr / start_lr))) if start_lr else grid
    best: dict[str, object] = {"lr": None, "median": math.inf, "per_seed": ["—"] * len(streams)}
    for lr in order:
        cap = max_iters if math.isinf(best["median"]) else int(best["median"])
        counts: list[int | None] = []
        for stream in streams:
            counts.append(iterations_to_target(stream, name, lr, cap))
            if counts.count(None) > len(streams) // 2:  # the median is already past the cap
                counts += [None] * (len(streams) - len(counts))
                break
        median = _median(counts)
        if median < best["median"]:
            best = {"lr": lr, "median": median,
                    "per_seed": [f">{cap}" if c is None else str(c) for c in counts]}
    return best


def speedups(batches: Sequence[int], iters: Sequence[float]) -> list[float]:
    """iters(B_i)/iters(B_i+1) for consecutive batch sizes (nan where either missed)."""
    return [a / b if math.isfinite(a) and math.isfinite(b) else math.nan
            for a, b in itertools.pairwise(iters)]


def critical_batch(batches: Sequence[int], iters: Sequence[float]) -> int | None:
    """Smallest B whose next batch (r× larger) gives fewer than √r× fewer iterations (less than
    half of perfect scaling in log terms); None when every step still gains that much."""
    for b, b_next, gain in zip(batches, batches[1:], speedups(batches, iters)):
        if math.isfinite(gain) and gain < math.sqrt(b_next / b):
            return b
    return None


def judge(critical: dict[str, int | None], batches: Sequence[int]) -> str:
    if "adagrad" not in critical or "sgd" not in critical:
        return "not measured (run both sgd and adagrad)."
    ada, sgd = critical["adagrad"], critical["sgd"]
    ada_key = math.inf if ada is None else ada
    if sgd is None:
        held, why = False, f"SGD did not flatten up to B = {batches[-1]}"
    else:
        held = ada_key > sgd
        why = (f"SGD flattens from B = {sgd}, Adagrad "
               + (f"keeps falling up to B = {batches[-1]}" if ada is None else f"from B = {ada}"))
    return f"{'held' if held else 'did not hold'} at this scale ({why})."


def judge_lowrank(critical: dict[str, int | None], rows: list[dict[str, object]],
                  batches: Sequence[int]) -> str:
    """Whether LowRankAdagrad keeps Adagrad's batch-size behaviour: its critical batch is not
    smaller than Adagrad's, and its iteration counts stay within 2× of Adagrad's at every B."""
    if "lowrank_adagrad" not in critical or "adagrad" not in critical:
        return "not measured (run both adagrad and lowrank_adagrad)."
    last = batches[-1] * 4  # "never flattened" ranks above every measured batch
    ours = critical["lowrank_adagrad"] or last
    theirs = critical["adagrad"] or last
    iters = {name: [r["median_iters"] for r in rows if r["optimizer"] == name]
             for name in ("adagrad", "lowrank_adagrad")}
    ratios = [a / b for a, b in zip(iters["lowrank_adagrad"], iters["adagrad"])
              if math.isfinite(a) and math.isfinite(b)]
    worst = max(ratios, default=math.inf)
    kept = ours >= theirs and worst <= 2.0
    shown = {name: b if b is not None else f"≥ {batches[-1]}" for name, b in critical.items()}
    return (f"{'kept' if kept else 'not kept'} (critical batch {shown['lowrank_adagrad']} vs "
            f"Adagrad's {shown['adagrad']}; iterations at most {worst:.2f}× Adagrad's).")


def _fmt_iters(value: float, cap: int) -> str:
    return f">{cap}" if math.isinf(value) else f"{value:g}"


def plot(rows: list[dict[str, object]], path: Path, setup: Setup) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name in dict.fromkeys(r["optimizer"] for r in rows):
        pts = [(r["batch"], r["median_iters"]) for r in rows
               if r["optimizer"] == name and math.isfinite(r["median_iters"])]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=name)
    first = [r["median_iters"] for r in rows
             if r["batch"] == setup.batches[0] and math.isfinite(r["median_iters"])]
    if first:
        ref, b0 = max(first), setup.batches[0]
        ax.plot(setup.batches, [ref * b0 / b for b in setup.batches], "k:", lw=1,
                label="∝ 1/B (perfect scaling)")
    ax.set(xscale="log", yscale="log", xlabel="batch size B",
           ylabel=f"iterations to target (median of {setup.seeds} seeds)",
           title=f"anisotropic softmax regression, {setup.spectrum} spectrum")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def markdown(rows: list[dict[str, object]], setup: Setup, names: Sequence[str],
             critical: dict[str, int | None], verdict: str, seconds: float, command: str,
             lowrank_verdict: str = "") -> str:
    cap = setup.max_iters
    table = [{"optimizer": r["optimizer"], "B": r["batch"], "tuned lr": r["lr"],
              "median iters": _fmt_iters(r["median_iters"], cap),
              "per seed": ", ".join(r["per_seed"])} for r in rows]
    steps = [f"{a}→{b}" for a, b in zip(setup.batches, setup.batches[1:])]
    gains = []
    for name in names:
        iters = [r["median_iters"] for r in rows if r["optimizer"] == name]
        gains.append({"optimizer": name, **{s: ("—" if math.isnan(g) else f"{g:.2f}×")
                                            for s, g in zip(steps, speedups(setup.batches,
                                                                            iters))},
                      "critical B": critical[name] or f"≥ {setup.batches[-1]}"})
    ratio = critical_batch_ratio(feature_scales(setup.spectrum))
    return "\n".join([
        "## Adagrad vs SGD as the batch grows (anisotropic softmax regression)",
        "",
        f"K = {CLASSES} classes, d = {FEATURES} features, {setup.spectrum} spectrum of feature "
        f"scales (bench/adagrad_batch.py docstring), teacher weight power "
        f"{setup.weight_power:g}; target: excess loss ≤ {setup.excess:g} of the initial excess; "
        f"{setup.seeds} seed(s), median; lr tuned per batch size from "
        + "; ".join(f"{n} {list(GRIDS[n])}" for n in names)
        + f"; cap {cap} iterations. Predicted B*(Adagrad)/B*(SGD) from the bounds: {ratio:.1f}."
        f" Command: `{command}` ({seconds:.0f} s).",
        "",
        harness.format_table(table, markdown=True),
        "",
        ("Speed-up from each batch size to the next, r× larger (r× = perfect scaling; the "
         "critical batch is the first B whose next step gains less than √r×):"),
        "",
        harness.format_table(gains, markdown=True),
        "",
        f"**Claim** (Adagrad's count keeps falling where SGD's flattens): {verdict}",
        "",
        *([(f"**LowRankAdagrad** (rank {LOWRANK_RANK}, fused op) keeps Adagrad's batch-size "
            f"behaviour: {lowrank_verdict}"), ""] if lowrank_verdict else []),
    ])


def run(setup: Setup = Setup(), optimizers: Sequence[str] = tuple(OPTIMIZERS),
        out: Path = harness.RESULTS_DIR, threads: int = 1, command: str = ""
        ) -> tuple[list[dict[str, object]], list[Path]]:
    unknown = [n for n in optimizers if n not in OPTIMIZERS]
    if unknown:
        raise ValueError(f"optimizer: expected names from {sorted(OPTIMIZERS)}, got {unknown}")
    feature_scales(setup.spectrum)  # validates the name before minutes of work
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)  # a 4×64 weight: more threads only add synchronisation
    start = time.perf_counter()
    try:
        problems = [make_problem(seed, setup) for seed in range(setup.seeds)]
        rows = []
        lrs: dict[str, float | None] = dict.fromkeys(optimizers)
        for b in setup.batches:
            streams = [Stream(p, b) for p in problems]
            for name in optimizers:
                t0 = time.perf_counter()
                best = tune(streams, name, setup.max_iters, lrs[name])
                lrs[name] = best["lr"] or lrs[name]
                rows.append({"optimizer": name, "batch": b, "lr": best["lr"],
                             "median_iters": best["median"], "per_seed": best["per_seed"]})
                print(f"[adagrad_batch] {name:8s} B={b:5d}: lr {best['lr']}, median "
                      f"{_fmt_iters(best['median'], setup.max_iters)} iterations "
                      f"({time.perf_counter() - t0:.1f} s)", flush=True)
    finally:
        torch.set_num_threads(previous_threads)
    rows.sort(key=lambda r: list(optimizers).index(r["optimizer"]))  # stable: B order kept
    critical = {name: critical_batch(setup.batches, [r["median_iters"] for r in rows
                                                     if r["optimizer"] == name])
                for name in optimizers}
    verdict = ("not judged: a --quick smoke run." if setup.smoke
               else judge(critical, setup.batches))
    lowrank_verdict = "" if "lowrank_adagrad" not in optimizers else (
        "not judged: a --quick smoke run." if setup.smoke
        else judge_lowrank(critical, rows, setup.batches))
    print(f"[adagrad_batch] critical batch: {critical}; claim {verdict}"
          + (f"; LowRankAdagrad {lowrank_verdict}" if lowrank_verdict else ""))
    out.mkdir(parents=True, exist_ok=True)
    md = out / "adagrad_batch.md"
    md.write_text(markdown(rows, setup, optimizers, critical, verdict,
                           time.perf_counter() - start,
                           command or "python bench/adagrad_batch.py", lowrank_verdict))
    return rows, [md, plot(rows, out / "adagrad_batch.png", setup)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run in seconds, not a measurement: {QUICK}")
    parser.add_argument("--spectrum", choices=SPECTRA, default=Setup.spectrum)
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--max-iters", type=int, default=None)
    parser.add_argument("--weight-power", type=float, default=Setup.weight_power)
    parser.add_argument("--excess", type=float, default=Setup.excess,
                        help="target excess loss, as a fraction of the initial one")
    parser.add_argument("--optimizer", nargs="+", default=list(OPTIMIZERS),
                        choices=list(OPTIMIZERS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=harness.RESULTS_DIR)
    args = parser.parse_args(argv)
    sizes = {"excess": args.excess, **(QUICK if args.quick else {})}
    sizes.update({k: v for k, v in (("seeds", args.seeds), ("max_iters", args.max_iters))
                  if v is not None})
    setup = Setup(spectrum=args.spectrum, weight_power=args.weight_power, **sizes)
    command = " ".join(["python bench/adagrad_batch.py",
                        *(sys.argv[1:] if argv is None else argv)])
    _, paths = run(setup, args.optimizer, args.out, args.threads, command)
    print("wrote", ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
