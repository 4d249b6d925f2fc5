"""Q-GaLore step (packed INT4 basis, INT8 weight, stochastic rounding): ours vs q-galore-torch.

1. CPU time of one optimizer step per LLaMA weight shape, on the same inputs, in the same run:
     ours      torch.ops.lowrank.fused_galore_step with a packed INT4 proj and INT8 param codes
     q-galore  q-galore-torch 1.0's `QGaLoreAdamW8bit.step` for an INT8 weight (its float_grad
               path), op for op, calling its own `_dequantize`, `GaLoreProjector.project` /
               `project_back` (INT4 basis preset: no SVD) and `_quantize_stochastic_round`.
               One substitution: its low-rank Adam runs in bitsandbytes' CUDA-only 8-bit kernel
               (and the step calls torch.cuda.synchronize), so on CPU that update is the same Adam
               written in torch on the fp32 low-rank tensors (m×r or r×n: a small share of the
               time). Everything that touches m×n tensors is q-galore-torch's own code.
   The gradient dtype sets q-galore-torch's compute dtype (its float_grad): bf16 is its real
   training path, fp32 is shown too. Prints milliseconds (median over interleaved rounds,
   harness.time_interleaved) of both and
   of the two fp32 projection GEMMs alone (the floor of any step), and the ratios.
2. The DRAM-traffic model per step (bytes, bench/traffic.py) of our fused Triton step, its floor
   (DESIGN.md §5) and q-galore-torch's step (its tensor ops counted one by one).
3. Stochastic-rounding bias: one INT8 group whose interior moves by 0.1 of a step, requantized
   many times: how far the dequantized mean moves (0.1 is unbiased) with our fp32 rounding and
   with q-galore-torch's `_quantize_stochastic_round` in bf16 (its training dtype) and fp32.

    python bench/bench_qgalore.py             # LLaMA-350M shapes, r 256 (about a minute)
    python bench/bench_qgalore.py --full      # + LLaMA-1B shapes, r 512
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import types

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import lowrank_kernels as lk
from bench import bench_cpu_step, harness, traffic
from lowrank_kernels import reference

GROUP = 256
# (m, n), rank: LLaMA-350M attention / MLP (Q-GaLore recipe rank 256); --full adds LLaMA-1B.
QUICK = [((1024, 1024), 256), ((1024, 2736), 256), ((2736, 1024), 256)]
FULL = QUICK + [((2048, 2048), 512), ((2048, 5461), 512), ((5461, 2048), 512)]
# Q-GaLore's recipe: betas (0.9, 0.95), lr 0.01 (350M, 1B), scale 0.25.
HYPER = {"lr": 0.01, "beta1": 0.9, "beta2": 0.95, "eps": 1e-6, "weight_decay": 0.01,
         "scale": 0.25}


def make_inputs(m: int, n: int, r: int, grad_dtype: torch.dtype, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    right = reference.is_right_side(m, n)
    d = n if right else m
    q, _ = torch.linalg.qr(torch.randn(d, r, generator=gen))
    basis = (q.T if right else q).contiguous()
    weight = 0.02 * torch.randn(m, n, generator=gen)
    return {"basis": basis, "weight": weight,
            "grad": (1e-3 * torch.randn(m, n, generator=gen)).to(grad_dtype),
            "low_rank_shape": (m, r) if right else (r, n)}


# ---- ours ------------------------------------------------------------------------------------
def our_step(inputs: dict):
    packed, p_scales, p_zeros = torch.ops.lowrank.quantize_int4(inputs["basis"], GROUP)
    codes, w_scales, w_zeros = torch.ops.lowrank.quantize_int8(inputs["weight"], GROUP)
    exp_avg = torch.zeros(inputs["low_rank_shape"])
    exp_avg_sq = torch.zeros(inputs["low_rank_shape"])
    counter = {"step": 0}

    def step():
        counter["step"] += 1
        torch.ops.lowrank.fused_galore_step(
            codes, inputs["grad"], packed, exp_avg, exp_avg_sq, **HYPER, step=counter["step"],
            proj_scales=p_scales, proj_zeros=p_zeros, proj_group_size=GROUP,
            param_scales=w_scales, param_zeros=w_zeros, param_group_size=GROUP, seed=1234)

    return step


# ---- q-galore-torch ----------------------------------------------------------------------------
def qgalore_torch_step(inputs: dict):
    """q-galore-torch's step for one INT8 weight with float_grad (q_galore_adamw8bit.py 16-126),
    its m×n work done by its own functions; see the module docstring for the Adam substitution."""
    from q_galore_torch import QGaLoreAdamW8bit
    from q_galore_torch.q_galore_projector import GaLoreProjector

    opt = QGaLoreAdamW8bit  # its methods use no optimizer state: called unbound
    dtype = inputs["grad"].dtype
    codes, scales, zeros = opt._quantize(None, inputs["weight"].to(dtype), q_group_size=GROUP)
    p = types.SimpleNamespace(data=codes, scales=scales, zeros=zeros, group_size=GROUP,
                              float_grad=inputs["grad"], stochastic_round=True)
    projector = GaLoreProjector(min(inputs["basis"].shape), update_proj_gap=10**9, scale=HYPER["scale"], quant=True,
                                group_size=GROUP, n_bit=4)
    (projector.ortho_matrix, projector.ortho_matrix_scales, projector.ortho_matrix_zeros,
     projector.ortho_matrix_shape) = projector._quantize(inputs["basis"].to(dtype), GROUP, 4)
    state = {"step": 0, "exp_avg": torch.zeros(inputs["low_rank_shape"]),
             "exp_avg_sq": torch.zeros(inputs["low_rank_shape"])}
    lr, wd = HYPER["lr"], HYPER["weight_decay"]
    beta1, beta2, eps = HYPER["beta1"], HYPER["beta2"], HYPER["eps"]

    def step():
        float_weight = opt._dequantize(None, p.data, p.float_grad.dtype, p.group_size, p.scales,
                                       p.zeros)
        p.data = p.data.to(p.float_grad.dtype)
        p.data = float_weight.clone()
        grad = projector.project(p.float_grad, state["step"] + 1)  # no refresh at this iter
        p.saved_data = p.data.clone()
        p.data = grad.clone().to(p.data.dtype)
        p.data.zero_()
        # bitsandbytes' 8-bit Adam (CUDA-only) → the same Adam on the low-rank tensors in torch
        state["step"] += 1
        g32 = grad.float()
        state["exp_avg"].mul_(beta1).add_(g32, alpha=1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(g32, g32, value=1 - beta2)
        step_size = reference.adam_step_size(lr, beta1, beta2, state["step"])
        update = state["exp_avg"] / (state["exp_avg_sq"].sqrt() + eps) * -step_size
        p.data.add_(update.to(p.data.dtype))
        p.data = p.saved_data.add_(projector.project_back(p.data))
        del p.saved_data
        p.data.add_(p.data, alpha=-lr * wd)
        saved_data = p.data.clone()
        p.data, p.scales, p.zeros = opt._quantize_stochastic_round(None, saved_data,
                                                                   q_group_size=p.group_size)

    return step


# ---- DRAM-traffic model --------------------------------------------------------------------------
def traffic_table(cases, grad_dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """bench/traffic.py's models: the floor of our storage (floor_q), our Triton two-launch step
    (fused_triton_q: the floor + the fp32 N round trip + a second basis read) and q-galore-torch's
    tensor ops one by one (q_galore_torch), in its compute dtype = the gradient's."""
    print(f"\n# DRAM bytes per step ({str(grad_dtype).removeprefix('torch.')} G, fp32 M and V; "
          "bench/traffic.py): our floor, our fused Triton step, q-galore-torch's tensor ops")
    print(f"{'shape':>12} {'r':>4} {'floor MB':>9} {'ours MB':>8} {'ours/floor':>11} "
          f"{'q-galore MB':>12} {'q-galore/ours':>14}")
    rows = []
    for (m, n), r in cases:
        floor = traffic.floor_q(m, n, r, grad_dtype).total
        ours = traffic.fused_triton_q(m, n, r, grad_dtype).total
        theirs = traffic.q_galore_torch(m, n, r, grad_dtype).total
        rows.append({"m": m, "n": n, "rank": r, "floor_bytes": int(floor), "ours_bytes": int(ours),
                     "qgalore_bytes": int(theirs), "ours_over_floor": round(ours / floor, 3),
                     "qgalore_over_ours": round(theirs / ours, 2)})
        print(f"{f'{m}x{n}':>12} {r:>4} {floor / 1e6:>9.2f} {ours / 1e6:>8.2f} "
              f"{ours / floor:>11.3f} {theirs / 1e6:>12.2f} {theirs / ours:>14.2f}")
    return rows


# ---- stochastic-rounding bias -----------------------------------------------------------------------
def rounding_bias(trials: int = 20000, delta: float = 0.1) -> list[dict]:
    """Mean movement (in steps) of a group's interior moved by ``delta`` of a step (s = 2^-10,
    z = 128, min and max fixed so the grid does not move), over ``trials`` requantizations."""
    from q_galore_torch import QGaLoreAdamW8bit

    step = 2.0**-10
    grid = step * (torch.arange(256, dtype=torch.float32) - 128)
    values = grid.clone()
    values[1:-1] += delta * step
    values = values.repeat(trials, 1)

    def moved(codes, scales, zeros):
        back = reference.dequantize_int8(codes.reshape(-1), scales.reshape(-1).float(),
                                         zeros.reshape(-1).float(), 256).view(trials, 256)
        return ((back[:, 1:-1].double() - grid[1:-1].double()) / step).mean().item()

    sigma = (delta * (1 - delta) / (trials * 254)) ** 0.5
    rows = [("ours (fp32, Philox)", moved(*torch.ops.lowrank.quantize_int8(values, 256, True, 7)))]
    torch.manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32):
        theirs = QGaLoreAdamW8bit._quantize_stochastic_round(None, values.to(dtype), 256, 8)
        rows.append((f"q-galore-torch ({str(dtype).removeprefix('torch.')})", moved(*theirs)))
    print(f"\n# stochastic rounding of a {delta}-step update, {trials} x 254 elements "
          f"(unbiased: {delta} +- {3 * sigma:.4f})")
    for name, shift in rows:
        print(f"{name:>26}  mean moved by {shift:.4f} steps")
    return [{"rounding": name, "mean_shift_steps": round(shift, 5), "expected": delta,
             "three_sigma": round(3 * sigma, 5)} for name, shift in rows]


# ---- timing ------------------------------------------------------------------------------------
SUBSTITUTION = ("q-galore-torch's step re-run op for op on CPU with its own functions, its "
                "bitsandbytes 8-bit Adam (CUDA-only) replaced by fp32 Adam in torch on the "
                "low-rank tensors")


def time_table(cases, dtypes, warmup: int, rounds: int) -> list[dict]:
    print(f"# CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
          f"threads, torch {torch.__version__}")
    print(f"# q-galore ms: {SUBSTITUTION}")
    print(f"{'shape':>12} {'r':>4} {'grad':>9} {'floor ms':>9} {'ours ms':>9} {'q-galore ms':>12} "
          f"{'ours/floor':>11} {'q-galore/ours':>14}")
    rows = []
    for (m, n), r in cases:
        for dtype in dtypes:
            inputs = make_inputs(m, n, r, dtype)
            # the floor: both GEMMs in fp32 (our CPU kernel runs both in fp32 whatever G's dtype)
            floor = bench_cpu_step.two_gemm_floor(inputs["grad"], inputs["basis"])
            t = harness.time_interleaved({"floor": floor, "ours": our_step(inputs),
                                          "qgalore": qgalore_torch_step(inputs)},
                                         rounds=rounds, warmup=warmup)
            ms = {k: v.median_s * 1e3 for k, v in t.items()}
            ratio = ms["qgalore"] / ms["ours"]
            name = str(dtype).removeprefix("torch.")
            rows.append({"m": m, "n": n, "rank": r, "grad_dtype": name,
                         "threads": torch.get_num_threads(), "floor_ms": round(ms["floor"], 2),
                         "ours_ms": round(ms["ours"], 2), "qgalore_ms": round(ms["qgalore"], 2),
                         "ours_over_floor": round(ms["ours"] / ms["floor"], 3),
                         "qgalore_over_ours": round(ratio, 2)})
            print(f"{f'{m}x{n}':>12} {r:>4} {name:>9} {ms['floor']:>9.1f} {ms['ours']:>9.1f} "
                  f"{ms['qgalore']:>12.1f} {ms['ours'] / ms['floor']:>11.2f} {ratio:>14.2f}",
                  flush=True)
    return rows


def write_csv(rows: list[dict], path: str, **notes: str) -> None:
    harness.write_csv(path, rows, {**harness.machine_info("cpu"), **notes})
    print(f"# wrote {path}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="add LLaMA-1B shapes")
    parser.add_argument("--rounds", type=int, default=5,
                        help="interleaved rounds (each times floor, ours and q-galore-torch once)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--csv", default=str(harness.OUT_DIR / "qgalore"),
                        help="path prefix of the three CSVs (default bench/out/qgalore)")
    args = parser.parse_args(argv)
    if not lk.EXTENSION_AVAILABLE:
        print(f"error: {lk.EXTENSION_LOAD_ERROR}", file=sys.stderr)
        return 1
    cases = FULL if args.full else QUICK
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    timing = time_table(cases, dtypes, args.warmup, args.rounds)
    traffic = traffic_table(cases)
    bias = rounding_bias()
    if args.csv:
        write_csv(timing, args.csv + "_cpu_step.csv", qgalore_ms=SUBSTITUTION)
        write_csv(traffic, args.csv + "_traffic.csv")
        write_csv(bias, args.csv + "_rounding_bias.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
