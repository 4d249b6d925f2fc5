"""Which 8-bit format keeps low-rank Adam moments (issue 16): candidates measured on the demo's
tiny LLaMA against fp32 moments, and on a synthetic moment stream (the V ≈ 0 failure).

    python bench/quality_8bit_moments.py [--steps 300] [--gap 200] [--seeds 2] [--block-sweep]
                                         [--skip-training] [--out DIR]

Every candidate stores M and V in blocks of B = reference.MOMENT_BLOCK_SIZE consecutive rank-axis
elements of an own-line (DESIGN.md §4.9, reference.quantize_moment), one fp32 scale per block,
and draws its stochastic-rounding words as the bf16 moments do (Philox key (seed, step), counter
(row-major index, 1, 0, 0): the first word for M, the second for V):
  bf16 SR              the existing 16-bit moments: the scale of a harmless change of the loss
  fp8 SR (chosen)      M as E4M3 codes, √V as unsigned E4M4 codes, absmax scales (reference.py)
  linear SR, V | √V    M int8 = SR(M/s), s = max|M|/127; V (or √V) uint8 = SR(x/s), s = max/255
  bnb map nearest|SR   bitsandbytes' dynamic map (create_dynamic_map: signed for M, unsigned for
                       V or √V), x/max|x| rounded to the nearest entry or stochastically between
                       its two neighbours (the table search a kernel would do)
"+ floor" variants store a positive V as at least the smallest nonzero code.

Training: bench/demo.py's model (llama-tiny: hidden 128, 2 layers, vocab 256), data (standard-
library bytes, batch 16 × 64, seed 0) and GaLore setup (rank 32, scale 0.25, lr 0.01, betas
(0.9, 0.999), ε 1e-6), run as a minimal GaLore loop over reference.py: the SVD basis of the
gradient refreshed every --gap steps (steps 0, gap, 2·gap, ... as GaLoreAdamW), moments kept
across refreshes, decay 0; the other parameters take torch AdamW at the same lr. Same initial
weights and batches for every run; SR candidates run --seeds different Philox seeds. Printed:
the final loss (mean of the last 20 steps) and its difference to fp32 moments (target: < 1 %).

Fidelity: 64 lines of r = 32 projected gradients R ~ N(0, σ_k²) whose σ_k spans 2 or 4 decades
along the rank axis (one block holds all of them), 3000 Adam steps; the error of N = M/(√V+ε)
computed from the stored moments against fp32 moments (RMS over steps 500-3000, N is O(1)
whatever R's scale), its maximum, and the count of V > 0 stored as 0 (N = M/ε).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import demo, harness, memory
from lowrank_kernels import reference

BLOCK = reference.MOMENT_BLOCK_SIZE
RANK, SCALE, LR, BETAS, EPS = 32, 0.25, 1e-2, (0.9, 0.999), 1e-6


# --------------------------------------------------------------------------------------------
# candidate formats: fp32 in, fp32 out (what the step would load back), blocks along the rank axis
# --------------------------------------------------------------------------------------------
def _blocks(x: torch.Tensor, right: bool) -> torch.Tensor:
    return reference.moment_blocks(x, BLOCK, right)


def _unblocks(blocks: torch.Tensor, like: torch.Tensor, right: bool) -> torch.Tensor:
    return reference.from_moment_blocks(blocks, like.shape[1] if right else like.shape[0], right)


def _unit(words: torch.Tensor) -> torch.Tensor:
    return (words >> 8).to(torch.float32) * 2.0**-24


def _linear(x, words, right, max_code, floor):
    """SR(x/s) on the integer grid, s = max|x|/max_code, back to fp32."""
    xb, wb = _blocks(x, right), _blocks(words, right)
    scale = xb.abs().amax(2, keepdim=True) / max_code
    y = torch.where(scale > 0, xb / scale, torch.zeros_like(xb))
    down = torch.floor(y)
    codes = (down + (_unit(wb) < y - down).float()).clamp(-max_code, max_code)
    if floor:
        codes = torch.where((xb > 0) & (codes == 0), torch.ones_like(codes), codes)
    return _unblocks(codes * scale, x, right)


def _table(x, words, right, table, stochastic, floor):
    """x/max|x| to an entry of the sorted table (nearest, or SR between the two neighbours)."""
    xb, wb = _blocks(x, right), _blocks(words, right)
    absmax = xb.abs().amax(2, keepdim=True)
    y = torch.where(absmax > 0, xb / absmax, torch.zeros_like(xb))
    upper = torch.searchsorted(table, y.contiguous(), right=True).clamp(1, len(table) - 1)
    lo, hi = table[upper - 1], table[upper]
    if stochastic:
        up = _unit(wb) < (y - lo) / (hi - lo)
    else:
        up = (hi - y) < (y - lo)
    index = torch.where(up & (y > lo), upper, upper - 1)
    if floor:
        smallest = int((table > 0).nonzero()[0])
        index = torch.where((xb > 0) & (table[index] == 0), torch.full_like(index, smallest),
                            index)
    return _unblocks(table[index] * absmax, x, right)


@dataclasses.dataclass(frozen=True)
class Candidate:
    name: str
    store: Callable  # (m, v, words_m, words_v, right) -> (m̃, ṽ)
    stochastic: bool = True


def _with_sqrt_v(store_v: Callable) -> Callable:
    return lambda v, words, right: store_v(v.sqrt(), words, right) ** 2


def fp8_chosen(block: int = BLOCK) -> Callable:
    """reference.py's format (quantize_moment / dequantize_moment) with blocks of ``block``."""
    def store(m, v, words_m, words_v, right):
        out = []
        for value, words, signed in ((m, words_m, True), (v, words_v, False)):
            codes, scales = reference.quantize_moment(value, words, block, right, signed=signed)
            out.append(reference.dequantize_moment(codes, scales, block, right, signed=signed))
        return tuple(out)

    return store


def _bf16(m, v, words_m, words_v, right):
    """The existing bf16 moments (stochastic rounding): how far a 16-bit format moves the loss."""
    return (reference.stochastic_round_bf16(m, words_m).float(),
            reference.stochastic_round_bf16(v, words_v).float())


def candidates() -> list[Candidate]:
    def pair(store_m, store_v):
        return lambda m, v, wm, wv, right: (store_m(m, wm, right), store_v(v, wv, right))

    def linear(floor):
        return lambda x, w, right: _linear(x, w, right, 255, floor)

    found = [
        Candidate("bf16 SR (16-bit reference point)", _bf16),
        Candidate("fp8 SR: E4M3 M, E4M4 √V + floor (chosen)", fp8_chosen()),
        Candidate("linear SR: V", pair(lambda x, w, r: _linear(x, w, r, 127, False),
                                       linear(False))),
        Candidate("linear SR: √V", pair(lambda x, w, r: _linear(x, w, r, 127, False),
                                        _with_sqrt_v(linear(False)))),
        Candidate("linear SR: √V + floor", pair(lambda x, w, r: _linear(x, w, r, 127, False),
                                                _with_sqrt_v(linear(True)))),
    ]
    try:
        from bitsandbytes.functional import create_dynamic_map
    except ImportError:
        print("bitsandbytes missing: its dynamic-map candidates are skipped")
        return found
    signed = torch.sort(create_dynamic_map(signed=True).float()).values
    unsigned = torch.sort(create_dynamic_map(signed=False).float()).values
    def table(values, stochastic, floor):
        return lambda x, w, right: _table(x, w, right, values, stochastic, floor)

    for stochastic in (False, True):
        label = "SR" if stochastic else "nearest"
        store_m, store_v = table(signed, stochastic, False), table(unsigned, stochastic, True)
        found.append(Candidate(f"bnb map {label}: V + floor", pair(store_m, store_v),
                               stochastic))
        found.append(Candidate(f"bnb map {label}: √V + floor",
                               pair(store_m, _with_sqrt_v(store_v)), stochastic))
    return found


def moment_words(philox_seed: int, shape) -> tuple[torch.Tensor, torch.Tensor]:
    index = torch.arange(shape[0] * shape[1]).view(shape) + reference.MOMENT_STREAM
    return reference.philox_uint32x2(philox_seed, index)


# --------------------------------------------------------------------------------------------
# training: a minimal GaLore loop over reference.py
# --------------------------------------------------------------------------------------------
def svd_basis(grad: torch.Tensor, rank: int) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
    return vh[:rank].contiguous() if reference.is_right_side(*grad.shape) else u[:, :rank]


def train(candidate: Candidate | None, net: torch.nn.Module, data: list[torch.Tensor], gap: int,
          seed: int) -> list[float]:
    projected, rest = memory.split_params(net)
    others = torch.optim.AdamW(rest, lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0)
    states: list[dict[str, torch.Tensor]] = [{} for _ in projected]
    losses = []
    for step, tokens in enumerate(data, start=1):
        logits = net(tokens[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 tokens[:, 1:].reshape(-1))
        loss.backward()
        with torch.no_grad():
            for index, (param, state) in enumerate(zip(projected, states, strict=True)):
                grad = param.grad
                if (step - 1) % gap == 0:
                    state["basis"] = svd_basis(grad, RANK)
                low_rank = reference.project(grad, state["basis"])
                if "m" not in state:
                    state["m"], state["v"] = torch.zeros_like(low_rank), torch.zeros_like(low_rank)
                normalized = reference.adam_normalized(low_rank, state["m"], state["v"], *BETAS,
                                                       EPS)
                param.sub_(reference.project_back(normalized, state["basis"], *param.shape,
                                                  SCALE),
                           alpha=reference.adam_step_size(LR, *BETAS, step))
                if candidate is not None:
                    words = moment_words(reference.rounding_philox_seed(seed + index, step),
                                         low_rank.shape)
                    state["m"], state["v"] = candidate.store(
                        state["m"], state["v"], *words, reference.is_right_side(*param.shape))
                param.grad = None
        others.step()
        others.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def final_loss(losses: list[float], window: int = 20) -> float:
    tail = losses[-window:]
    return sum(tail) / len(tail)


def training_rows(steps: int, gap: int, seeds: int, block_sweep: bool
                  ) -> list[dict[str, object]]:
    torch.manual_seed(0)
    initial = memory.build_model(demo.TINY, torch.float32, device="cpu")
    data = demo.batches(demo.corpus(), steps, 16, 64, 0)
    t0 = time.perf_counter()
    baseline = final_loss(train(None, copy.deepcopy(initial), data, gap, 0))
    rows = [{"moments": "fp32", "seed": "", "final_loss": round(baseline, 4),
             "vs_fp32_pct": 0.0}]
    print(f"fp32: {baseline:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    runs = candidates()
    if block_sweep:  # the chosen format with smaller blocks (r = 32: B ≥ 32 is one block a line)
        runs += [Candidate(f"fp8 SR, B = {block}", fp8_chosen(block)) for block in (4, 8, 16)]
    for candidate in runs:
        for seed in range(seeds if candidate.stochastic else 1):
            t0 = time.perf_counter()
            loss = final_loss(train(candidate, copy.deepcopy(initial), data, gap, 1000 * seed))
            rows.append({"moments": candidate.name, "seed": 1000 * seed,
                         "final_loss": round(loss, 4),
                         "vs_fp32_pct": round(100 * (loss - baseline) / baseline, 2)})
            print(f"{candidate.name} seed {1000 * seed}: {loss:.4f} "
                  f"({rows[-1]['vs_fp32_pct']:+.2f} %, {time.perf_counter() - t0:.0f} s)",
                  flush=True)
    return rows


# --------------------------------------------------------------------------------------------
# fidelity of N on a synthetic stream, and the V ≈ 0 failure
# --------------------------------------------------------------------------------------------
def fidelity_rows(decades: float, lines: int = 64, steps: int = 3000) -> list[dict[str, object]]:
    gen = torch.Generator().manual_seed(0)
    sigma = 10 ** (-decades * torch.arange(RANK) / (RANK - 1))
    grads = [torch.randn(lines, RANK, generator=gen) * sigma
             * (1 + 0.5 * torch.sin(torch.tensor(t / 300.0))) for t in range(steps)]
    rows = []
    for candidate in candidates():
        m32, v32 = torch.zeros(lines, RANK), torch.zeros(lines, RANK)
        m8, v8 = m32.clone(), v32.clone()
        squares, count, worst, zeros = torch.zeros(RANK), 0, 0.0, 0
        for step, grad in enumerate(grads, start=1):
            exact = reference.adam_normalized(grad, m32, v32, *BETAS, EPS)
            stored = reference.adam_normalized(grad, m8, v8, *BETAS, EPS)
            if step > 500:
                squares += ((stored - exact) ** 2).sum(0)
                count += lines
                worst = max(worst, float((stored - exact).abs().max()))
            m8, v8 = candidate.store(m8, v8, *moment_words(reference.rounding_philox_seed(1, step),
                                                           m8.shape), True)
            zeros += int(((v8 == 0) & (v32 > 0) & (m8 != 0)).sum())
        rms = (squares / count).sqrt()
        rows.append({"moments": candidate.name, "decades_of_R": decades,
                     "N_err_rms_large": round(float(rms[:4].mean()), 4),
                     "N_err_rms_mid": round(float(rms[14:18].mean()), 4),
                     "N_err_rms_small": round(float(rms[-4:].mean()), 4),
                     "N_err_max": round(worst, 3), "V_zero_with_M": zeros})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--gap", type=int, default=200, help="SVD refresh every GAP steps")
    parser.add_argument("--seeds", type=int, default=2, help="Philox seeds per SR candidate")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--block-sweep", action="store_true",
                        help="also train the chosen format with blocks of 4, 8 and 16")
    parser.add_argument("--out", type=Path, default=harness.RESULTS_DIR)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny shapes: more threads only add noise
    fidelity = fidelity_rows(2.0) + fidelity_rows(4.0)
    print(harness.format_table(fidelity))
    harness.write_csv(args.out / "quality_8bit_moments_fidelity.csv", fidelity,
                      harness.machine_info("cpu"))
    if not args.skip_training:
        training = training_rows(args.steps, args.gap, args.seeds, args.block_sweep)
        print(harness.format_table(training))
        harness.write_csv(args.out / "quality_8bit_moments.csv", training,
                          harness.machine_info("cpu"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
