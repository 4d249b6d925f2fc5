"""CPU cost of the factored second moment (DESIGN.md §4.12) against the full 8-bit V.

    python bench/bench_cpu_factored.py [--full] [--rounds 7] [--csv bench/out/cpu_factored.csv]

One ``torch.ops.lowrank.fused_galore_step`` (the C++ kernel) on the same weight, gradient and
basis with 8-bit M (the Q-GaLore configuration's moments) and V either as 8-bit codes (full,
r·own bytes + scales) or factored (r + own fp32 values: the kernel runs its tiles in two phases
and keeps R in an fp32 low-rank workspace between them), next to the two-GEMM floor
(bench_cpu_step.two_gemm_floor). The providers alternate within each round
(harness.time_interleaved), so load from other jobs moves all alike; the table gives medians
and factored/full measured in the same run.
"""

from __future__ import annotations

import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import harness
from bench.bench_cpu_step import cpu_bench_main, two_gemm_floor
from bench.bench_moments_cpu import HYPER, make_weight
from lowrank_kernels import reference

QUICK = [((2048, 5504), 256, torch.float32), ((2048, 5504), 256, torch.bfloat16),
         ((4096, 4096), 1024, torch.float32), ((4096, 4096), 1024, torch.bfloat16)]
FULL = QUICK + [((m, n), 1024, dt) for (m, n) in [(4096, 11008), (11008, 4096)]
                for dt in (torch.float32, torch.bfloat16)]


def provider(m: int, n: int, r: int, dtype: torch.dtype, factored: bool):
    args = make_weight(m, n, r, dtype, "8bit", "adam", seed=0)
    if factored:
        gen = torch.Generator().manual_seed(1)
        args["exp_avg_sq"] = 1e-4 * torch.rand(reference.factored_shape(m, n, r),
                                               generator=gen)
        del args["exp_avg_sq_scales"]
    count = {"step": 0}

    def step():
        count["step"] += 1
        torch.ops.lowrank.fused_galore_step(**args, **HYPER, step=count["step"])

    return step, args


def run(cases, warmup: int, rounds: int, csv_path: str | None) -> list[dict]:
    print(f"# {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'shape':>10} {'r':>5} {'dtype':>9} {'floor ms':>9} {'full8 ms':>9} "
          f"{'fact ms':>9} {'fact/full8':>10} {'fact/floor':>10}")
    rows = []
    for (m, n), r, dtype in cases:
        full, args = provider(m, n, r, dtype, factored=False)
        factored, _ = provider(m, n, r, dtype, factored=True)
        t = harness.time_interleaved({"floor": two_gemm_floor(args["grad"], args["proj"]),
                                      "full8": full, "factored": factored},
                                     rounds=rounds, warmup=warmup)
        ms = {k: v.median_s * 1e3 for k, v in t.items()}
        row = {"m": m, "n": n, "rank": r, "dtype": str(dtype).removeprefix("torch."),
               "threads": torch.get_num_threads(), "rounds": rounds,
               **{f"{k}_ms": round(v, 3) for k, v in ms.items()},
               **{f"{k}_iqr_ms": round(t[k].iqr_s * 1e3, 3) for k in ms},
               "factored_over_full8": round(ms["factored"] / ms["full8"], 3),
               "factored_over_floor": round(ms["factored"] / ms["floor"], 3)}
        rows.append(row)
        print(f"{f'{m}x{n}':>10} {r:>5} {row['dtype']:>9} {ms['floor']:>9.1f} "
              f"{ms['full8']:>9.1f} {ms['factored']:>9.1f} {row['factored_over_full8']:>10.3f} "
              f"{row['factored_over_floor']:>10.3f}", flush=True)
    return harness.save_rows(csv_path, rows)


def main(argv=None) -> int:
    return cpu_bench_main(argv, __doc__, "cpu_factored.csv", run, QUICK, FULL,
                          "also LLaMA-7B's 4096x11008 and 11008x4096 at r = 1024")


if __name__ == "__main__":
    sys.exit(main())
