"""CPU cost of the moment formats in the fused step: 8-bit vs bf16 (and fp32) moments.

    python bench/bench_moments_cpu.py [--rounds 9] [--csv bench/results/moments_cpu_step.csv]

One ``torch.ops.lowrank.fused_galore_step`` per weight (the C++ kernel) with the same weight,
gradient and basis, the moments stored as fp32, bf16 (stochastic rounding) or 8-bit codes (FP8
with block scales, DESIGN.md §4.9; decoded, updated and re-encoded in the Adam loop of each
tile), under Adam and AdaGrad. Cases: 2048×5504, r = 256 (a LLaMA-1B MLP weight, bf16), and
the tiny-LLaMA demo's 14 projected weights (128×128, 344×128, 128×344 in 2 layers, r = 32,
fp32: the demo's weights), timed as one step over all of them. The providers alternate within
each round (harness.time_interleaved), so load from other jobs moves all alike; the table gives
medians and each format's ratio to bf16 moments, measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import lowrank_kernels as lk
from bench import harness
from lowrank_kernels import reference

HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01, scale=0.25, seed=7)
FORMATS = ("fp32", "bf16", "8bit")
DEMO_SHAPES = [(128, 128)] * 4 + [(344, 128)] * 2 + [(128, 344)]  # one decoder layer
CASES = {  # name -> (weight shapes, rank, weight dtype)
    "2048x5504 r=256 bf16": ([(2048, 5504)], 256, torch.bfloat16),
    "demo: 14 weights r=32 fp32": (DEMO_SHAPES * 2, 32, torch.float32),
}


def make_weight(m: int, n: int, r: int, dtype: torch.dtype, fmt: str, inner: str, seed: int
                ) -> dict:
    """The op's arguments for one weight, moments in ``fmt`` (after a few steps' worth of
    values, so that the 8-bit blocks hold real scales)."""
    gen = torch.Generator().manual_seed(seed)
    right = m >= n
    d, shape = (n, (m, r)) if right else (m, (r, n))
    q, _ = torch.linalg.qr(torch.randn(d, r, generator=gen))
    args = {"param": (0.02 * torch.randn(m, n, generator=gen)).to(dtype),
            "grad": torch.randn(m, n, generator=gen).to(dtype),
            "proj": (q.T if right else q).contiguous().to(dtype), "inner": inner}
    m0, v0 = 0.01 * torch.randn(shape, generator=gen), 1e-4 * torch.rand(shape, generator=gen)
    if fmt == "8bit":
        index = torch.arange(m0.numel()).view(shape) + reference.MOMENT_STREAM
        words_m, words_v = reference.philox_uint32x2(1, index)
        args["exp_avg"], args["exp_avg_scales"] = reference.quantize_moment(
            m0, words_m, 32, right, signed=True)
        args["exp_avg_sq"], args["exp_avg_sq_scales"] = reference.quantize_moment(
            v0, words_v, 32, right, signed=False)
    else:
        dtype = torch.float32 if fmt == "fp32" else torch.bfloat16
        args["exp_avg"], args["exp_avg_sq"] = m0.to(dtype), v0.to(dtype)
    if inner == "adagrad":
        args["exp_avg"] = None
        args.pop("exp_avg_scales", None)
    return args


def provider(shapes, r: int, dtype: torch.dtype, fmt: str, inner: str):
    weights = [make_weight(m, n, r, dtype, fmt, inner, seed=i)
               for i, (m, n) in enumerate(shapes)]
    count = {"step": 0}

    def step():
        count["step"] += 1
        for args in weights:
            torch.ops.lowrank.fused_galore_step(**args, **HYPER, step=count["step"])

    return step


def run(rounds: int, warmup: int, csv_path: str | None) -> list[dict]:
    print(f"# {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'case':>28} {'inner':>8} " + " ".join(f"{f + ' ms':>9}" for f in FORMATS)
          + f" {'8bit/bf16':>10} {'fp32/bf16':>10}")
    rows = []
    for case, (shapes, r, dtype) in CASES.items():
        for inner in ("adam", "adagrad"):
            t = harness.time_interleaved(
                {fmt: provider(shapes, r, dtype, fmt, inner) for fmt in FORMATS},
                rounds=rounds, warmup=warmup)
            ms = {fmt: t[fmt].median_s * 1e3 for fmt in FORMATS}
            row = {"case": case, "inner": inner, "threads": torch.get_num_threads(),
                   "rounds": rounds, **{f"{fmt}_ms": round(ms[fmt], 3) for fmt in FORMATS},
                   **{f"{fmt}_iqr_ms": round(t[fmt].iqr_s * 1e3, 3) for fmt in FORMATS},
                   "8bit_over_bf16": round(ms["8bit"] / ms["bf16"], 3),
                   "fp32_over_bf16": round(ms["fp32"] / ms["bf16"], 3)}
            rows.append(row)
            print(f"{case:>28} {inner:>8} " + " ".join(f"{ms[f]:>9.2f}" for f in FORMATS)
                  + f" {row['8bit_over_bf16']:>10.2f} {row['fp32_over_bf16']:>10.2f}",
                  flush=True)
    return harness.save_rows(csv_path, rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads (default: torch's)")
    parser.add_argument("--csv", default=str(harness.RESULTS_DIR / "moments_cpu_step.csv"))
    args = parser.parse_args(argv)
    if not lk.EXTENSION_AVAILABLE:
        print(f"error: {lk.EXTENSION_LOAD_ERROR}", file=sys.stderr)
        return 1
    if args.threads:
        torch.set_num_threads(args.threads)
    run(args.rounds, args.warmup, args.csv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
