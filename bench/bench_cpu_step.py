"""CPU fused GaLore step vs galore-torch's GaLoreAdamW.step vs the two-GEMM floor.

For each LLaMA weight shape (m×n) and rank r, one optimizer step on the same inputs:
  ours      torch.ops.lowrank.fused_galore_step (C++ blocked one-pass kernel)
  galore    galore_torch.GaLoreAdamW.step with its basis fixed (the SVD refresh is excluded)
  floor     the two projection GEMMs alone, fp32: R = G·Qᵀ and N·Q (left side: Pᵀ·G and P·N)
and prints milliseconds, ours/floor and galore/ours. The three alternate within each round
(harness.time_interleaved: floor, ours, galore, ours, galore, floor, …) and each reports its
median over the rounds, so load from other jobs moves all three alike.
DESIGN.md §5: on CPU the fused step should be within 1.1× of the floor.

    python bench/bench_cpu_step.py              # a CPU-sized selection (about a minute)
    python bench/bench_cpu_step.py --full       # 1024×2752 … 4096×11008, r 128…512
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import lowrank_kernels as lk
from bench import harness

QUICK = [((1024, 2752), 128, torch.float32), ((2752, 1024), 128, torch.float32),
         ((2048, 5504), 256, torch.float32), ((2048, 5504), 256, torch.bfloat16)]
FULL = [((m, n), r, dt) for (m, n) in [(1024, 2752), (2752, 1024), (2048, 2048), (2048, 5504),
                                       (5504, 2048), (4096, 4096), (4096, 11008), (11008, 4096)]
        for r in (128, 256, 512) for dt in (torch.float32, torch.bfloat16)]
HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01, scale=0.25)


def make_inputs(m: int, n: int, r: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(0)
    right = m >= n
    d = n if right else m
    q, _ = torch.linalg.qr(torch.randn(d, r, generator=gen))
    basis = (q.T if right else q).contiguous().to(dtype)
    param = (0.02 * torch.randn(m, n, generator=gen)).to(dtype)
    grad = torch.randn(m, n, generator=gen).to(dtype)
    shape = (m, r) if right else (r, n)
    return param, grad, basis, torch.zeros(shape), torch.zeros(shape)


def two_gemm_floor(grad: torch.Tensor, basis: torch.Tensor):
    """The floor of any step on CPU: the projection and back-projection GEMMs alone, in fp32
    (R = G·Qᵀ and N·Q right, Pᵀ·G and P·N left), into preallocated outputs so that no
    allocation or page fault is timed. Returns the function to time."""
    m, n = grad.shape
    right = m >= n
    g32, q32 = grad.float(), basis.float()
    low = torch.empty((m, basis.shape[0]) if right else (basis.shape[1], n))
    full = torch.empty(m, n)

    def floor():
        torch.mm(g32, q32.T, out=low) if right else torch.mm(q32.T, g32, out=low)
        torch.mm(low, q32, out=full) if right else torch.mm(q32, low, out=full)

    return floor


def bench_case(m: int, n: int, r: int, dtype: torch.dtype, warmup: int, rounds: int) -> dict:
    """Times floor, ours and galore-torch on one shape, interleaved round by round
    (harness.time_interleaved), and returns the CSV row (medians over the rounds)."""
    param, grad, basis, exp_avg, exp_avg_sq = make_inputs(m, n, r, dtype)
    step = {"n": 0}

    def ours():
        step["n"] += 1
        torch.ops.lowrank.fused_galore_step(param, grad, basis, exp_avg, exp_avg_sq, **HYPER,
                                            step=step["n"])

    t = harness.time_interleaved({"floor": two_gemm_floor(grad, basis), "ours": ours,
                                  "galore": harness.galore_torch_optimizer(
                                      param, grad, basis, r, **HYPER).step},
                                 rounds=rounds, warmup=warmup,
                                 # galore-torch's bf16 CPU GEMMs take seconds: 3 rounds of it
                                 max_rounds={"galore": 3} if dtype != torch.float32 else None)
    ms = {k: v.median_s * 1e3 for k, v in t.items()}
    return dict(m=m, n=n, rank=r, dtype=str(dtype).removeprefix("torch."),
                threads=torch.get_num_threads(), rounds=rounds, floor_ms=round(ms["floor"], 3),
                ours_ms=round(ms["ours"], 3), ours_iqr_ms=round(t["ours"].iqr_s * 1e3, 3),
                galore_ms=round(ms["galore"], 3),
                galore_iqr_ms=round(t["galore"].iqr_s * 1e3, 3),
                ours_over_floor=round(ms["ours"] / ms["floor"], 3),
                galore_over_ours=round(ms["galore"] / ms["ours"], 3))


def run(cases, warmup: int, rounds: int, csv_path: str | None) -> list[dict]:
    threads = torch.get_num_threads()
    print(f"# CPU: {platform.processor() or platform.machine()}, {threads} threads, "
          f"torch {torch.__version__}")
    print(f"{'shape':>12} {'r':>4} {'dtype':>8} {'floor ms':>9} {'ours ms':>9} {'galore ms':>10}"
          f" {'ours/floor':>10} {'galore/ours':>11}")
    rows = []
    for (m, n), r, dtype in cases:
        row = bench_case(m, n, r, dtype, warmup, rounds)
        rows.append(row)
        print(f"{f'{m}x{n}':>12} {r:>4} {row['dtype']:>8} {row['floor_ms']:>9.1f} "
              f"{row['ours_ms']:>9.1f} {row['galore_ms']:>10.1f} {row['ours_over_floor']:>10.2f} "
              f"{row['galore_over_ours']:>11.2f}", flush=True)
    return harness.save_rows(csv_path, rows)


def cpu_bench_main(argv, doc: str, csv_name: str, run, quick, full, full_help: str,
                   rounds_help: str | None = None) -> int:
    """The command line shared by the CPU step benchmarks: --full, --rounds, --warmup, --csv,
    then ``run(cases, warmup, rounds, csv)`` once the extension is known to load."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--full", action="store_true", help=full_help)
    parser.add_argument("--rounds", type=int, default=7, help=rounds_help)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--csv", default=str(harness.OUT_DIR / csv_name))
    args = parser.parse_args(argv)
    if not lk.EXTENSION_AVAILABLE:
        print(f"error: {lk.EXTENSION_LOAD_ERROR}", file=sys.stderr)
        return 1
    run(full if args.full else quick, args.warmup, args.rounds, args.csv)
    return 0


def main(argv=None) -> int:
    return cpu_bench_main(argv, __doc__, "cpu_step.csv", run, QUICK, FULL,
                          "all LLaMA shapes and ranks",
                          "interleaved rounds (each times floor, ours and galore-torch once)")


if __name__ == "__main__":
    sys.exit(main())
