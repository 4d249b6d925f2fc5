"""How much of V can go (issue 16): reduced second moments of the projected Adam step, and rules
for the weights without rank, trained on the demo's tiny LLaMA against the full V.

    python bench/quality_factored.py [--steps 200] [--out DIR]

Projected weights (GaLoreAdamW, rank 32, the demo's recipe; fp32 M for every V candidate, so
only V differs; R is the m×r or r×n projected gradient, own lines = its rows on the right side,
its columns on the left):
  full V                 Adam's V, one value per element of R (the baseline)
  factored V (chosen)    Adafactor's rank-axis and own-axis means of the EMA of R², V̂ = a·bᵀ/ā
                         (DESIGN.md §4.12): r + own values; the fused op's mode
  V per rank             one value per rank (the mean of R² over own lines): r values
  V per 32 ranks         one value per block of 32 ranks of an own-line (the 8-bit scale's
                         block): own·⌈r/32⌉ values
  V per 32 lines         one value per rank and block of 32 own-lines: r·⌈own/32⌉ values
The reduced candidates other than the chosen one run as Python steps over reference.py (the
optimizer with its fused kernel replaced), the others through the optimizer's own kernel.

The 7B configuration (bench/memory.py "ours-QGaLoreAdamW-layerwise-10gib": INT8 weights, INT4
basis, 8-bit M, factored V, randomized SVD, layer-wise) with its embeddings and lm_head on
AdamW (dense_adamw="galore") or Adafactor (dense_adamw="adafactor": no M, factored V).

Same initial weights and batches for every run (demo.batches, seed 0). Printed: the final loss
(mean of the last 20 steps) and its difference to GaLoreAdamW with fp32 moments and the full V.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import demo, harness, memory
from lowrank_kernels import reference
from lowrank_kernels.optim import GaLoreAdamW

BLOCK = 32


def _reduced_v(kind: str, squares: torch.Tensor) -> torch.Tensor:
    """This step's R² (own × r) reduced as ``kind`` (the EMA runs on the reduced values)."""
    own, rank = squares.shape
    if kind == "rank":
        return squares.mean(dim=0, keepdim=True)
    if kind == "rank-block":
        blocks = -(-rank // BLOCK)
        padded = squares.new_zeros(own, blocks * BLOCK)
        padded[:, :rank] = squares
        counts = torch.tensor([min(BLOCK, rank - b * BLOCK) for b in range(blocks)])
        return padded.view(own, blocks, BLOCK).sum(dim=2) / counts
    blocks = -(-own // BLOCK)  # "line-block"
    padded = squares.new_zeros(blocks * BLOCK, rank)
    padded[:own] = squares
    counts = torch.tensor([min(BLOCK, own - b * BLOCK) for b in range(blocks)])
    return padded.view(blocks, BLOCK, rank).sum(dim=1) / counts[:, None]


def _expand(kind: str, v: torch.Tensor, own: int, rank: int) -> torch.Tensor:
    if kind == "rank":
        return v.expand(own, rank)
    if kind == "rank-block":
        return v.repeat_interleave(BLOCK, dim=1)[:, :rank]
    return v.repeat_interleave(BLOCK, dim=0)[:own]


def reduced_v_step(kind: str, states: dict, param, grad, proj, exp_avg, exp_avg_sq, *, lr,
                   beta1, beta2, eps, weight_decay, scale, step, seed=0):
    """The fused step's Adam with V replaced by ``kind`` (fp32 M, dense basis), in place."""
    del exp_avg_sq, seed  # the reduced V lives in ``states``; fp32 moments round nothing
    m, n = param.shape
    right = reference.is_right_side(m, n)
    low_rank = reference.project(grad.float(), proj, right)
    lines = low_rank if right else low_rank.T  # own × r
    reduced = _reduced_v(kind, lines * lines)
    v = states.setdefault(id(exp_avg), torch.zeros_like(reduced))
    v.mul_(beta2).add_(reduced, alpha=1.0 - beta2)
    exp_avg.mul_(beta1).add_(low_rank, alpha=1.0 - beta1)
    v_full = _expand(kind, v, *lines.shape)
    normalized = exp_avg / ((v_full if right else v_full.T).sqrt() + eps)
    update = reference.project_back(normalized, proj, m, n, scale, right)
    w = param.float().sub_(update, alpha=reference.adam_step_size(lr, beta1, beta2, step))
    param.copy_(w.mul_(1.0 - lr * weight_decay))


class ReducedVAdamW(GaLoreAdamW):
    """GaLoreAdamW whose projected step is :func:`reduced_v_step` (fp32 moments)."""

    def __init__(self, params, kind: str, **kwargs):
        super().__init__(params, state_dtype=torch.float32, **kwargs)
        self._kernel = functools.partial(reduced_v_step, kind, {})

    def _fused_step_kernel(self):
        return self._kernel


@dataclasses.dataclass(frozen=True)
class Run:
    name: str
    make: object  # (net) -> optimizer (or layer-wise stepper)
    state_values: str


def runs() -> list[Run]:
    cfg, lr = demo.TINY, demo.LR["ours GaLoreAdamW"]

    def galore(**kw):
        def make(net):
            groups, _, _ = memory._groups(net, cfg, options=kw.pop("options", {}))
            return GaLoreAdamW(groups, lr=lr, **kw)
        return make

    def reduced(kind):
        def make(net):
            groups, _, _ = memory._groups(net, cfg)
            return ReducedVAdamW(groups, kind, lr=lr)
        return make

    def seven_b(dense):
        key = "ours-QGaLoreAdamW-layerwise-10gib"
        base = memory.OUR_CONFIGS[key]
        memory.OUR_CONFIGS[f"{key}-{dense}"] = dataclasses.replace(
            base, constructor=(("dense_adamw", dense),))
        return demo.memory_config_optimizer(f"{key}-{dense}", cfg,
                                            demo.LR[f"ours {base.preset}"])

    return [
        Run("full V", galore(state_dtype=torch.float32), "r·own"),
        Run("factored V (chosen)", galore(state_dtype=torch.float32,
                                          options={"second_moment": "factored"}), "r + own"),
        Run("factored V, 8-bit M", galore(state_dtype="8bit",
                                          options={"second_moment": "factored"}), "r + own"),
        Run("V per rank", reduced("rank"), "r"),
        Run("V per 32 ranks of a line", reduced("rank-block"), "own·⌈r/32⌉"),
        Run("V per 32 lines of a rank", reduced("line-block"), "r·⌈own/32⌉"),
        Run("7B config, dense AdamW", seven_b("galore"), "r + own"),
        Run("7B config, dense Adafactor (chosen)", seven_b("adafactor"), "r + own"),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", type=Path, default=harness.RESULTS_DIR)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny shapes: more threads only add noise
    torch.manual_seed(0)
    initial = memory.build_model(demo.TINY, torch.float32, device="cpu")
    data = demo.batches(demo.corpus(), args.steps, 16, 64, 0)
    rows, baseline = [], None
    for run in runs():
        t0 = time.perf_counter()
        losses = demo.train(run.name, run.make, copy.deepcopy(initial), data, False)["loss"]
        final = sum(losses[-20:]) / 20
        baseline = final if baseline is None else baseline
        rows.append({"run": run.name, "V values per weight": run.state_values,
                     "final_loss": round(final, 4),
                     "vs_full_V_pct": round(100 * (final - baseline) / baseline, 2)})
        print(f"{run.name}: {final:.4f} ({rows[-1]['vs_full_V_pct']:+.2f} %, "
              f"{time.perf_counter() - t0:.0f} s)", flush=True)
    print(harness.format_table(rows))
    harness.write_csv(args.out / "quality_factored.csv", rows, harness.machine_info("cpu"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
