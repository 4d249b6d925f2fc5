"""The Gram form of GradNormLoRP's ‖v'_i‖² (the Triton kernel's right side) against the direct sum.

    python bench/gradnorm_gram_error.py [--out bench/out]

v'_i = a_i·W_i − us·N_i Q. The kernel takes ‖v'_i‖² = a_i²·‖W_i‖² − 2·a_i·us·N_i·(W_i Qᵀ) +
us²·N_i (Q Qᵀ) N_iᵀ (reference.gradnorm_vnorm_sq_gram) from sums streamed with G and W instead of
the row of v' itself. Its relative error per row is measured against a float64 direct sum, next
to that of the fp32 direct sum (the CPU kernel's), on

  * realistic rows: W ~ N(0, 0.02²) (LLaMA init), N ~ N(0, 0.5²) (Adam-normalised), scale 0.25,
    us = lr·0.25 at lr 1e-3, 1e-2 and 0.5 (the update 0.3%, 3% and 150% of v's norm);
  * the worst case: W inside the subspace and N along W's own coordinates, so that the step
    shrinks each row by a fraction s (v' = (1 − s)·W): the Gram form then cancels, its error
    growing as 2⁻²⁴/(1 − s)² (s = 0.5, 0.9, 0.99).

Writes gradnorm_gram_error.csv (max and median relative error over rows).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness
from lowrank_kernels import reference

SHAPES = [(4096, 1024, 256), (2048, 512, 128), (2048, 512, 512)]


def _errors(weight, basis, normalized, factor, update_scale) -> dict[str, float]:
    gram = reference.gradnorm_vnorm_sq_gram(weight, basis, normalized, factor, update_scale)
    v32 = factor.unsqueeze(1) * weight - update_scale * (normalized @ basis)
    v64 = (factor.double().unsqueeze(1) * weight.double()
           - update_scale * normalized.double() @ basis.double())
    exact = (v64 * v64).sum(1)
    gram_err = ((gram.double() - exact) / exact).abs()
    direct_err = (((v32 * v32).sum(1).double() - exact) / exact).abs()
    return {"gram_max": gram_err.max().item(), "gram_median": gram_err.median().item(),
            "direct_fp32_max": direct_err.max().item(),
            "direct_fp32_median": direct_err.median().item()}


def run(seed: int = 0) -> list[dict[str, object]]:
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for m, n, rank in SHAPES:
        basis = torch.linalg.qr(torch.randn(n, rank, generator=gen))[0].T.contiguous()
        weight = 0.02 * torch.randn(m, n, generator=gen)
        normalized = 0.5 * torch.randn(m, rank, generator=gen)
        factor = torch.ones(m)
        for lr in (1e-3, 1e-2, 0.5):
            update_scale = lr * 0.25
            share = ((update_scale * normalized @ basis).norm(dim=1)
                     / weight.norm(dim=1)).median().item()
            rows.append({"case": "realistic", "m": m, "n": n, "rank": rank, "lr": lr,
                         "update_over_v": round(share, 4),
                         **_errors(weight, basis, normalized, factor, update_scale)})
    m, n, rank = 2048, 512, 128
    basis = torch.linalg.qr(torch.randn(n, rank, generator=gen))[0].T.contiguous()
    inside = 0.02 * torch.randn(m, rank, generator=gen) @ basis
    update_scale = 1e-2 * 0.25
    for shrink in (0.5, 0.9, 0.99):
        normalized = (inside @ basis.T) * (shrink / update_scale)
        rows.append({"case": f"aligned, rows shrink by {shrink}", "m": m, "n": n, "rank": rank,
                     "lr": 1e-2, "update_over_v": shrink,
                     **_errors(inside, basis, normalized, torch.ones(m), update_scale)})
    for row in rows:
        for key in ("gram_max", "gram_median", "direct_fp32_max", "direct_fp32_median"):
            row[key] = float(f"{row[key]:.3g}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=harness.OUT_DIR)
    args = parser.parse_args(argv)
    rows = run()
    print(harness.format_table(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "gradnorm_gram_error.csv"
    harness.write_csv(path, rows, harness.machine_info("cpu"))
    print("wrote", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
