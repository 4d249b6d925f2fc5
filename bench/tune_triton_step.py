"""Tunes the block sizes of the two-launch Triton step (triton_kernels/fused_galore_step.py)
on the GPU at hand: times the whole step for each candidate launch-A configuration (launch B at
its default), then each launch-B candidate with the best A, per shape and rank, and prints the
best of each next to the current table's choice (ratio = current / best, measured in one run).

Candidates that fail to compile or launch are reported and skipped; the winners must still pass
tests/test_triton_aot.py (no spills on sm_89 and sm_90) before they go into the tables.
Needs a CUDA GPU; prints why and exits 0 otherwise.

  python bench/tune_triton_step.py --shapes 4096x11008 11008x4096 --rank 128 256 512 1024
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `bench` and `lowrank_kernels` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness
from bench.bench_gpu_step import HYPER, parse_shape
from bench.harness import random_basis

# (block_own, block_r, block_long, num_warps, num_stages)
PROJECT_CANDIDATES = [
    (64, 64, 64, 4, 4), (64, 128, 64, 8, 3), (128, 64, 64, 8, 3), (128, 128, 32, 8, 3),
    (128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (64, 128, 128, 8, 3), (128, 64, 128, 8, 3),
    (64, 64, 128, 4, 3), (128, 128, 32, 8, 4), (64, 256, 32, 8, 3), (128, 256, 32, 8, 3),
]
BACK_CANDIDATES = [
    (128, 32, 128, 8, 3), (128, 64, 128, 8, 3), (128, 64, 128, 8, 4), (128, 32, 256, 8, 3),
    (256, 32, 128, 8, 3), (128, 64, 256, 8, 3), (64, 64, 128, 4, 3), (128, 128, 128, 8, 2),
]


def describe(c) -> str:
    return f"{c.block_own}/{c.block_r}/{c.block_long} w{c.num_warps} s{c.num_stages}"


def tune_case(m: int, n: int, rank: int, wdt: torch.dtype, device: str = "cuda"
              ) -> dict[str, object]:
    """Best (launch A, launch B) for one shape and rank; A first with B at its default."""
    from lowrank_kernels.triton_kernels import fused_galore_step as two
    from lowrank_kernels.triton_kernels._common import adam_coeffs

    param = torch.randn(m, n, device=device, dtype=wdt) * 0.02
    grad = torch.randn(m, n, device=device, dtype=wdt) * 1e-3
    proj = random_basis(m, n, rank, wdt, device)
    shape = (m, rank) if m >= n else (rank, n)
    exp_avg, exp_avg_sq = torch.zeros(shape, device=device), torch.zeros(shape, device=device)
    coeffs = adam_coeffs(step=1, weight_decay=0.0, **HYPER)

    def timed(a, b) -> float:
        def run():
            two.launch(param, grad, proj, exp_avg, exp_avg_sq, rank, coeffs, configs=(a, b))
        try:
            run()
        except Exception as exc:  # noqa: BLE001 - a candidate may not compile or fit
            print(f"  {describe(a)} + {describe(b)}: {type(exc).__name__}: {str(exc)[:80]}")
            return float("inf")
        return harness.time_cuda(run).median_s * 1e3

    default_a, default_b = two.pick_configs(rank, wdt, wdt, wdt)
    base_ms = timed(default_a, default_b)
    best_a, best_ms = default_a, base_ms
    for cand in (two.TileConfig(*c) for c in PROJECT_CANDIDATES):
        if (ms := timed(cand, default_b)) < best_ms:
            best_a, best_ms = cand, ms
    best_b = default_b
    for cand in (two.TileConfig(*c) for c in BACK_CANDIDATES):
        if (ms := timed(best_a, cand)) < best_ms:
            best_b, best_ms = cand, ms
    return {"shape": f"{m}x{n}", "rank": rank, "default_ms": round(base_ms, 4),
            "best_ms": round(best_ms, 4), "default/best": round(base_ms / best_ms, 3),
            "default_A": describe(default_a), "best_A": describe(best_a),
            "default_B": describe(default_b), "best_B": describe(best_b)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="*", default=["4096x11008", "11008x4096"])
    parser.add_argument("--rank", type=int, nargs="+", default=[128, 256, 512, 1024])
    parser.add_argument("--dtype", choices=harness.DTYPE_NAMES, default="bf16")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("No CUDA device: nothing to tune.")
        return 0
    wdt = harness.DTYPE_NAMES[args.dtype]
    cases = [(*parse_shape(s), r) for s in args.shapes for r in args.rank]
    rows = [tune_case(m, n, rank, wdt)
            for m, n, rank in harness.progress(cases, desc="shapes x ranks")]
    print(harness.format_table(rows, list(rows[0])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
