"""CPU Fira and APOLLO steps: the fused step (full_rank="fira"|"apollo") vs fira's FiraAdamW.step
and apollo-torch's APOLLOAdamW.step, with the two-GEMM floor beside them.

For each LLaMA weight shape (m×n) and rank r, one optimizer step on the same fp32 inputs:
  floor        the two projection GEMMs alone (bench_cpu_step.two_gemm_floor)
  ours_fira    torch.ops.lowrank.fused_galore_step(full_rank="fira", limiter on)
  fira         fira.FiraAdamW.step with its basis fixed (the SVD refresh is excluded)
  ours_apollo  the same op with full_rank="apollo" (channel φ, limiter on), dense basis
  ours_apollo_gen  ops.random_basis (the basis from seed and refresh count, as APOLLOAdamW does
               in every step) + that op
  apollo       apollo_torch.APOLLOAdamW.step (proj="random", channel) with its basis fixed
All alternate within each round (harness.time_interleaved); medians over the rounds. Prints
milliseconds and the peer/ours ratios (> 1: ours is faster) and ours/floor.

    python bench/bench_cpu_full_rank.py            # a CPU-sized selection
    python bench/bench_cpu_full_rank.py --full     # more shapes and ranks
"""

from __future__ import annotations

import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import lowrank_kernels as lk
from bench import harness
from bench.bench_cpu_step import HYPER, cpu_bench_main, make_inputs, two_gemm_floor

QUICK = [((1024, 2752), 128), ((2752, 1024), 128), ((2048, 5504), 256)]
FULL = [((m, n), r) for (m, n) in [(1024, 2752), (2752, 1024), (2048, 5504), (5504, 2048),
                                   (4096, 4096), (4096, 11008)] for r in (128, 256, 512)]
GAP = 10**9  # the peers never refresh inside the timed steps


def _peer_step(kind: str, param, grad, basis, rank: int):
    """One weight under fira's or apollo-torch's optimizer, its projector holding ``basis``,
    past its first step (so no refresh): returns its ``step``."""
    p = torch.nn.Parameter(param.clone())
    p.grad = grad.clone()
    group = {"params": [p], "rank": rank, "update_proj_gap": GAP, "proj_type": "std"}
    hyper = dict(lr=HYPER["lr"], eps=HYPER["eps"], weight_decay=HYPER["weight_decay"])
    if kind == "fira":
        import fira
        from fira.gradient_projection import GradientProjector

        opt = fira.FiraAdamW([{**group, "alpha": HYPER["scale"]}], no_deprecation_warning=True,
                             **hyper)
        projector = GradientProjector(rank, update_proj_gap=GAP, alpha=HYPER["scale"])
    else:
        import apollo_torch
        from apollo_torch.random_projector import GradientProjector

        opt = apollo_torch.APOLLOAdamW([{**group, "proj": "random", "scale_type": "channel",
                                         "scale": HYPER["scale"]}], **hyper)
        projector = GradientProjector(rank, update_proj_gap=GAP, scale=HYPER["scale"])
    projector.ortho_matrix = basis.clone()
    opt.state[p].update(projector=projector, step=1)
    return opt.step


def bench_case(m: int, n: int, r: int, warmup: int, rounds: int) -> dict:
    param, grad, basis, exp_avg, exp_avg_sq = make_inputs(m, n, r, torch.float32)
    states = {mode: (param.clone(), exp_avg.clone(), exp_avg_sq.clone(), torch.full((1,), -1.0))
              for mode in ("fira", "apollo")}
    step = {"n": 0}
    d = n if m >= n else m

    def ours(mode: str, generate: bool = False):
        w, m1, v, limiter = states[mode]

        def run():
            step["n"] += 1
            proj = basis
            if generate:
                rows = lk.ops.random_basis(d, r, 7, 0)
                proj = rows if m >= n else rows.T
            torch.ops.lowrank.fused_galore_step(w, grad, proj, m1, v, **HYPER, step=step["n"],
                                                full_rank=mode, limiter=limiter)
        return run

    fns = {"floor": two_gemm_floor(grad, basis), "ours_fira": ours("fira"),
           "fira": _peer_step("fira", param, grad, basis, r), "ours_apollo": ours("apollo"),
           "ours_apollo_gen": ours("apollo", generate=True),
           "apollo": _peer_step("apollo", param, grad, basis, r)}
    t = harness.time_interleaved(fns, rounds=rounds, warmup=warmup)
    ms = {k: v.median_s * 1e3 for k, v in t.items()}
    row = dict(m=m, n=n, rank=r, dtype="float32", threads=torch.get_num_threads(),
               rounds=rounds, **{f"{k}_ms": round(v, 3) for k, v in ms.items()})
    row.update(fira_over_ours=round(ms["fira"] / ms["ours_fira"], 3),
               apollo_over_ours=round(ms["apollo"] / ms["ours_apollo"], 3),
               apollo_over_ours_gen=round(ms["apollo"] / ms["ours_apollo_gen"], 3),
               ours_fira_over_floor=round(ms["ours_fira"] / ms["floor"], 3),
               ours_apollo_over_floor=round(ms["ours_apollo"] / ms["floor"], 3))
    return row


def run(cases, warmup: int, rounds: int, csv_path: str | None) -> list[dict]:
    print(f"# CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, fp32")
    print(f"{'shape':>12} {'r':>4} {'floor':>7} {'ours_fira':>9} {'fira':>8} {'ours_apo':>8} "
          f"{'+gen':>7} {'apollo':>8} {'fira/ours':>9} {'apollo/ours':>11} {'(+gen)':>7} "
          f"{'fira:ours/floor':>15} {'apollo:ours/floor':>17}")
    rows = []
    for (m, n), r in cases:
        row = bench_case(m, n, r, warmup, rounds)
        rows.append(row)
        print(f"{f'{m}x{n}':>12} {r:>4} {row['floor_ms']:>7.1f} {row['ours_fira_ms']:>9.1f} "
              f"{row['fira_ms']:>8.1f} {row['ours_apollo_ms']:>8.1f} "
              f"{row['ours_apollo_gen_ms']:>7.1f} {row['apollo_ms']:>8.1f} "
              f"{row['fira_over_ours']:>9.2f} {row['apollo_over_ours']:>11.2f} "
              f"{row['apollo_over_ours_gen']:>7.2f} {row['ours_fira_over_floor']:>15.2f} "
              f"{row['ours_apollo_over_floor']:>17.2f}", flush=True)
    return harness.save_rows(csv_path, rows)


def main(argv=None) -> int:
    return cpu_bench_main(argv, __doc__, "cpu_full_rank_step.csv", run, QUICK, FULL,
                          "more shapes and ranks")


if __name__ == "__main__":
    sys.exit(main())
