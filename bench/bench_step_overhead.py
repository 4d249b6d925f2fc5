"""Per-step fixed cost: ``optimizer.step()`` of the demo's tiny LLaMA, ours against galore-torch.

    python bench/bench_step_overhead.py [--rounds 30] [--steps 20] [--threads 1] [--csv [PATH]]

The model is bench/demo.py's (hidden 128, 2 layers: 14 projected weights of 128×128, 344×128
and 128×344, rank 32) on CPU, where the step's arithmetic is small and the per-weight fixed
costs (Python bookkeeping, op dispatch, allocations) dominate. Every optimizer gets its own copy
of the same weights and the same gradients, and takes a first step (its SVD refresh) untimed;
``update_proj_gap`` is then beyond the run, so every timed step is a plain projected step. The
optimizers are timed in rounds, interleaved (the order rotates each round): one sample is the
mean time of ``--steps`` consecutive ``step()`` calls, and the table gives the median over
``--rounds`` rounds and its ratio against galore-torch's median of the same weight dtype, in
the same run. Gradients stay set between steps (no zero_grad), as the optimizers read but never
change them.

Rows: fp32 weights (ours with its default moments, fp32, and with bf16 moments) and bf16 weights
(ours with its default moments, bf16 stochastically rounded; galore-torch's are bf16 too).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import demo, harness, memory

GAP = 10**9  # no refresh after the first step
LR = 1e-2


def _groups(net: torch.nn.Module) -> list[dict]:
    low_rank, rest = memory.split_params(net)
    return [{"params": rest},
            {"params": low_rank, "rank": demo.TINY.rank, "update_proj_gap": GAP, "scale": 0.25,
             "proj_type": "std"}]


def _galore_torch(net):
    import galore_torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return galore_torch.GaLoreAdamW(_groups(net), lr=LR)


def _ours(**kwargs) -> Callable:
    def make(net):
        from lowrank_kernels.optim import GaLoreAdamW

        return GaLoreAdamW(_groups(net), lr=LR, **kwargs)

    return make


# (label, weight dtype, factory); the first row of each weight dtype is the baseline
PROVIDERS = (
    ("galore-torch", torch.float32, _galore_torch),
    ("ours GaLoreAdamW", torch.float32, _ours()),
    ("ours GaLoreAdamW, bf16 moments", torch.float32, _ours(state_dtype=torch.bfloat16)),
    ("galore-torch", torch.bfloat16, _galore_torch),
    ("ours GaLoreAdamW", torch.bfloat16, _ours()),
)


def _prepared(dtype: torch.dtype, make: Callable, model: torch.nn.Module,
              grads: list[torch.Tensor]):
    """A copy of ``model`` in ``dtype`` with ``grads`` set, and its optimizer one step in."""
    net = copy.deepcopy(model).to(dtype)
    for p, g in zip(net.parameters(), grads):
        p.grad = g.to(dtype)
    optimizer = make(net)
    optimizer.step()  # the SVD refresh and the state allocation, untimed
    return optimizer


def run(rounds: int = 30, steps: int = 20, threads: int = 1, seed: int = 0
        ) -> list[dict[str, object]]:
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        model = memory.build_model(demo.TINY, torch.float32, device="cpu")
        gen = torch.Generator().manual_seed(seed)
        grads = [1e-3 * torch.randn(p.shape, generator=gen) for p in model.parameters()]
        optimizers = [_prepared(dtype, make, model, grads) for _, dtype, make in PROVIDERS]
        for optimizer in optimizers:  # warm-up: lazy imports, allocator, caches
            for _ in range(3):
                optimizer.step()
        samples: list[list[float]] = [[] for _ in PROVIDERS]
        for r in range(rounds):
            order = list(range(len(PROVIDERS)))
            order = order[r % len(order):] + order[:r % len(order)]
            for i in order:
                step = optimizers[i].step
                t0 = time.perf_counter()
                for _ in range(steps):
                    step()
                samples[i].append((time.perf_counter() - t0) / steps)
    finally:
        torch.set_num_threads(previous_threads)
    rows = []
    for (label, dtype, _), times in zip(PROVIDERS, samples):
        timing = harness.Timing.from_samples(times)
        rows.append({"optimizer": label, "weights": harness.dtype_name(dtype),
                     "step_ms_median": round(timing.median_s * 1e3, 4),
                     "step_ms_iqr": round(timing.iqr_s * 1e3, 4), "rounds": rounds,
                     "steps_per_round": steps})
    return harness.add_ratios(rows, key="optimizer", baseline="galore-torch",
                              value="step_ms_median", group_by=("weights",),
                              column="vs_galore_torch")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--steps", type=int, default=20, help="step() calls per sample")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--csv", nargs="?", type=Path, const=harness.results_path(
        "step_overhead_cpu"), help="write the table (default bench/results/step_overhead_cpu.csv)")
    args = parser.parse_args(argv)
    rows = run(args.rounds, args.steps, args.threads)
    print(f"{demo.TINY.name}: optimizer.step() of 14 projected weights (rank {demo.TINY.rank}) "
          f"and the other parameters, {args.threads} thread(s), median of {args.rounds} "
          "interleaved rounds")
    print(harness.format_table(rows))
    if args.csv:
        print(f"wrote {harness.write_csv(args.csv, rows, harness.machine_info('cpu'))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
