"""The main job: a CPU-sized selection of every benchmark, written to bench/out/report.md.

    python bench/run_all.py [--steps 200] [--quick] [--out DIR | --refresh]

It writes to bench/out/ (git-ignored), so a user's run leaves the checkout clean; ``--refresh``
writes the committed bench/results/ instead (`bash scripts/bench.sh --refresh`), the one way
those files change.

Stages (a progress bar over them, and one inside the slow ones):
  1. DRAM-traffic model for every model size (bench/traffic.py)
  2. memory accounting for llama-7b and llama-60m (bench/memory.py): every optimizer, ours
     included (their init_state on meta tensors), with layer-wise rows
  3. the accounting checked against a real run's resident set (llama-60m shapes, 1 layer):
     weights, gradients and optimizer state of each optimizer that can step here
  4. one optimizer step on CPU: ours (C++) vs galore-torch vs the two-GEMM floor, interleaved
     (bench/bench_cpu_step.py); Fira and APOLLO vs fira and apollo-torch the same way
     (bench/bench_cpu_full_rank.py)
  5. the Q-GaLore step on CPU (INT4 basis, INT8 weights) against q-galore-torch's step, and the
     stochastic-rounding bias of both (bench/bench_qgalore.py)
  6. the subspace refresh on CPU: galore-torch's SVD, torch.svd_lowrank and dct_select against
     one projection GEMM (bench/bench_refresh.py); the per-step fixed cost at the demo's tiny
     shapes, ours against galore-torch (bench/bench_step_overhead.py)
  7. the GPU step: the committed GPU measurements (bench/results/gpu_*.csv) quoted with their
     commit, versions and device, and bench/bench_gpu_step.py when CUDA is available
  8. the training demo: a tiny LLaMA, AdamW (lr sweep) vs galore-torch vs our presets, and the
     optimizer step against model size (bench/demo.py)
  9. the optimizer's communication per step under FSDP2 at 7B on 8 ranks, from the shapes, and
     measured at the tests' shapes on 2 gloo ranks (bench/distributed_comm.py)
 10. the two theory reproductions: the square-root batch-size scaling rule on a tiny model
     (bench/scaling_rule.py) and Adagrad vs SGD as the batch grows (bench/adagrad_batch.py)
A stage that fails is reported in report.md (with its error) and the others still run; the exit
status is then 1. ``--quick`` skips stage 3 and shortens the demo (a smoke run).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import bench_gpu_step, demo, harness, memory, traffic

CPU_STEP_SHAPES = ((1376, 512), (512, 1376))  # llama-60m gate/up and down projections
CPU_STEP_RANK = 128


def stage_traffic(out: Path) -> str:
    rows = traffic.model_rows(list(harness.MODELS), weight_decay=False)
    whole = [r for r in rows if str(r["shape"]).startswith("all")]
    harness.write_csv(out / "traffic_models.csv", rows, harness.machine_info("cpu"))
    headline = traffic.rows_for_shape(4096, 11008, 256, weight_decay=False)
    cols = traffic.COLUMNS[1:]
    return ("Bytes per optimizer step crossing DRAM; W/G bf16, our M/V fp32 (galore-torch keeps "
            "them in bf16 and is judged against the floor of that layout), no weight decay; "
            "`pred_ms@<GPU>` = bytes / peak bandwidth: a model, never a measurement (measured GPU "
            "times: the GPU section below). `ran_on_gpu` says whether the code a row models has "
            "ever run on a GPU; rows marked no predict code nobody has timed. Assumptions: "
            "bench/traffic.py docstring. "
            "On a GPU `torch.ops.lowrank.fused_galore_step` runs `fused-triton-2launch`; "
            "`fused-triton-onepass` (N on chip, r ≤ "
            f"{traffic.ONE_PASS_MAX_RANK}) is an experimental kernel on no default path "
            "(measured slower at the 7B shapes), `fused-cuda` the CUDA C++ kernel of "
            "`set_cuda_backend(\"cuda_cxx\")`. "
            "`floor+N` is the least any step moves that passes N between its two GEMMs "
            "through memory: at r = min(m, n)/4 (the recipe ranks below) it is ≈ 1.10× the "
            "floor by itself; the two-launch steps add launch B's basis read (charged to "
            "DRAM, though the basis is re-read from L2 throughout launch A).\n\n"
            "**4096×11008, r = 256:**\n\n" + harness.format_table(headline, cols, markdown=True)
            + "\n\n**Every projected Linear of each model, recipe rank:**\n\n"
            + harness.format_table(whole, traffic.COLUMNS, markdown=True)
            + "\n\nPer-shape rows: `traffic_models.csv`.")


def _memory_table(rows: list[dict]) -> str:
    baseline = next((r for r in rows if str(r["optimizer"]).startswith("q-galore-torch")), None)
    columns = list(memory.COLUMNS)
    if baseline is not None:  # the comparison the issue asks for: ours vs q-galore-torch's state
        columns.insert(-1, "total_vs_q-galore-torch")
        for r in rows:
            r["total_vs_q-galore-torch"] = round(r["total_GiB"] / baseline["total_GiB"], 3)
    return harness.format_table(rows, columns, markdown=True)


def stage_memory(out: Path) -> str:
    parts = []
    # Every optimizer allocates its own state on meta tensors (ours through init_state, no SVD):
    # seconds even at 7B.
    for name in ("llama-7b", "llama-60m"):
        cfg = harness.model(name)
        rows = [a.row() for key in harness.progress(list(memory.ACCOUNTANTS),
                                                    desc=f"memory {name}")
                for a in memory.accounting(name, torch.bfloat16, [key], verbose=False)]
        harness.write_csv(out / f"memory_{name}_bf16.csv", rows, harness.machine_info("cpu"))
        parts.append(f"**{name}** ({cfg.total_params() / 1e9:.2f} B parameters, bf16, rank "
                     f"{cfg.rank}):\n\n" + _memory_table(rows))
    return ("GiB of the tensors each optimizer's own code allocates on the meta device "
            "(bench/memory.py): weights; gradients held at once (all of them, or the largest "
            "one for layer-wise rows, where each weight steps from its gradient hook); "
            "optimizer states; projection state. Total = their sum (activations excluded). "
            "Ours: `LowRankAdamW.init_state` per parameter, the state a first step allocates "
            "(tests/test_memory.py checks it against a real step byte for byte). "
            "q-galore-torch is modelled, not stepped (it cannot step with the installed "
            "bitsandbytes): its own quantisers on one CPU tensor per shape + bitsandbytes' "
            "init_state. Our projected moments take the weight's dtype by default "
            "(`state_dtype=\"auto\"`: bf16 here, stored with stochastic rounding; INT8 codes "
            "bf16 too), fp32 in the `fp32 moments` rows (`state_dtype=torch.float32`); "
            "galore-torch: the weight dtype, nearest-rounded; q-galore-torch: 8-bit. The "
            "layer-wise Q-GaLore rows step INT8 codes from their "
            "float_grad hook (lowrank_kernels.autograd.register_float_grad_hook). Optimizers "
            "not listed could not be imported. Per-row CSV: `memory_<model>_bf16.csv`.\n\n"
            + "\n\n".join(parts))


def stage_memory_validation(out: Path) -> str:
    rows = memory.validate_all("llama-60m", "bf16", memory.MEASURABLE, layers=1)
    if not rows:
        raise RuntimeError("no measured run succeeded")
    harness.write_csv(out / "memory_validation.csv", rows, harness.machine_info("cpu"))
    ok = sum(bool(r["within_tolerance"]) for r in rows)
    return ("Each optimizer runs for real in its own process on llama-60m shapes (1 decoder "
            "layer, bf16): resident-set growth (VmRSS) across building the model "
            "(`weights_rss`), setting the gradients (`grads_rss`) and 2 steps (`rss_growth`), "
            "and the RSS released when the optimizer state is dropped (`rss_released`), "
            "against the meta accounting above. `worst_ratio` is the measured/accounted ratio "
            "furthest from 1 among weights, gradients and released state; tolerance ±"
            f"{memory.TOLERANCE:.0%}: {ok}/{len(rows)} within. `peak_growth` adds the step's "
            "temporaries (SVD, m×n back-projection); `peak_rss` is the process's peak RSS "
            "over its pre-model baseline, against the accounted `total`. q-galore-torch cannot "
            "step here. Layer-wise rows are stepped by step() (the same state; their gradients "
            "are all set). The 7B <= 10 GiB configuration's state is 1.36 MiB at llama-60m, "
            "too small for the resident set to resolve: it is measured at llama-1b shapes "
            "(1 decoder layer).\n\n"
            + harness.format_table(rows, markdown=True))


LOADED = ("One run, torch's threads (the header's `threads`). On a machine shared with other "
          "jobs (the header's `loadavg_1m` above the core count) parallel regions wait for "
          "parked threads, which inflates the peers' times (many small ops) far more than ours: "
          "the README quotes `python bench/cpu_ratios.py --runs 3 --threads 1` "
          "(bench/results/cpu_ratios.csv) instead.\n\n")


def stage_cpu_step(out: Path) -> str:
    return LOADED + run_script("bench_cpu_step.py", "--csv", str(out / "cpu_step.csv"),
                               what="fused step vs galore-torch vs the two-GEMM floor, "
                               "interleaved rounds")


def stage_full_rank_step(out: Path) -> str:
    return LOADED + run_script("bench_cpu_full_rank.py", "--csv",
                               str(out / "cpu_full_rank_step.csv"),
                               what="Fira and APOLLO steps vs fira and apollo-torch (fixed "
                               "bases) vs the two-GEMM floor, interleaved rounds")


def run_script(name: str, *args: str, what: str) -> str:
    """Runs bench/<name> in a subprocess (its own threads and imports) and returns its output as
    a report block; a non-zero exit fails the stage."""
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name(name)), *args],
                          capture_output=True, text=True, timeout=900, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"bench/{name} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return f"`python bench/{name} {' '.join(args)}` ({what}):\n\n```\n{proc.stdout[-6000:]}```"


def stage_qgalore(out: Path) -> str:
    return LOADED + run_script("bench_qgalore.py", "--csv", str(out / "qgalore"),
                      what="ours vs q-galore-torch's step, same inputs, same run; its step is "
                      "re-run op for op with its own functions except its bitsandbytes 8-bit "
                      "Adam, CUDA-only, which is replaced by fp32 Adam in torch")


def stage_step_overhead(out: Path) -> str:
    return run_script("bench_step_overhead.py", "--csv", str(out / "step_overhead_cpu.csv"),
                      what="optimizer.step() of the demo's tiny LLaMA, ours vs galore-torch, "
                      "interleaved rounds, same run")


def stage_refresh(out: Path) -> str:
    return run_script("bench_refresh.py", "--csv", str(out / "refresh_cpu.csv"),
                      what="SVD, svd_lowrank and dct_select vs one GEMM, interleaved rounds; "
                      "`--full` adds 2048×5504 (bench/cpu_ratios.py: three runs)")


# the CSV columns that name the default provider, newest convention first: gpu_check runs time
# the "default" provider; the session-2 CSV's "triton" was lowrank_kernels.ops' default then
DEFAULT_PROVIDERS = ("default", "triton")


def committed_gpu_table(path: Path) -> str:
    """The default provider against galore-torch at every shape and rank of a committed GPU CSV,
    with the CSV's commit, date, device and versions."""
    machine, rows = harness.read_csv(path)
    step = [r for r in rows if r.get("provider") and r.get("ms")
            and r.get("stage", "step-fp32-moments") == "step-fp32-moments"]
    default = next((p for p in DEFAULT_PROVIDERS if any(r["provider"] == p for r in step)), None)
    cells: dict[tuple[str, str], dict[str, dict]] = {}
    for r in step:
        cells.setdefault((r["shape"], r["rank"]), {})[r["provider"]] = r
    table = []
    for (shape, rank), by in cells.items():
        ours, peer = by.get(default), by.get("galore-torch")
        public = by.get("torch.ops") or by.get("cuda")
        if ours is None or peer is None:
            continue
        speedup = float(peer["ms"]) / float(ours["ms"])
        table.append({"shape": shape, "r": rank, "default ms": ours["ms"],
                      "default IQR": ours.get("iqr_ms", ""), "galore-torch ms": peer["ms"],
                      "galore-torch IQR": peer.get("iqr_ms", ""),
                      "galore-torch / default": f"{speedup:.2f}",
                      "torch.ops ms": public["ms"] if public else ""})
    head = (f"`{path.name}`: {machine.get('gpu', '?')}, commit {machine.get('commit', '?')}, "
            f"{machine.get('date_utc', '?')}, torch {machine.get('torch', '?')}, Triton "
            f"{machine.get('triton', '?')}; bf16 W, fp32 M/V (galore-torch: bf16), "
            "do_bench medians with L2 flushed. `default` = the provider column "
            f"`{default}` (lowrank_kernels.ops and the optimizers at that commit); "
            "`torch.ops ms` = torch.ops.lowrank.fused_galore_step itself (the CUDA C++ general "
            "path at that commit). Ratio > 1: the default is faster than galore-torch.")
    return head + "\n\n" + harness.format_table(table, markdown=True)


def latest_gpu_csvs() -> list[Path]:
    """Committed GPU step results: the GPU check's runs (gpu_<device>_<commit>.csv), else the
    session-2 H100 benchmark."""
    found = sorted(harness.RESULTS_DIR.glob("gpu_*_*.csv"), key=lambda p: p.stat().st_mtime)
    checks = [p for p in found if not p.name.startswith("gpu_step_")]
    return checks[-1:] or [p for p in found if p.name.startswith("gpu_step_")]


def stage_gpu_step(out: Path) -> str:
    committed = "\n\n".join(committed_gpu_table(p) for p in latest_gpu_csvs())
    if not torch.cuda.is_available():
        return ("No CUDA device here: the committed measurements follow (GPU runs: "
                "`bash scripts/gpu_check.sh`, README 'GPU').\n\n" + committed)
    path = harness.results_path("gpu_step", "cuda", root=out)
    status = bench_gpu_step.main(["--out", str(path)])
    if status != 0:
        raise RuntimeError(f"bench_gpu_step exited {status}")
    machine, rows = harness.read_csv(path)
    cols = ["shape", "provider", "ms", "iqr_ms", "GBps_at_floor", "frac_of_peak",
            "vs_galore-torch"]
    return (f"{machine.get('gpu', '')}, peak {machine.get('peak_dram_gbps', '')} GB/s; "
            f"`{path.name}`\n\n" + harness.format_table(rows, cols, markdown=True))


def stage_demo(out: Path, steps: int, sizes: bool = True) -> str:
    rows, pngs = demo.run(steps=steps, out=out)
    text = (f"{demo.TINY.name}: hidden {demo.TINY.hidden}, {demo.TINY.layers} layers, byte "
            f"vocabulary, {steps} steps of 16×64 bytes of Python stdlib source, same "
            f"initial weights and batches for every optimizer; GaLore rank {demo.TINY.rank}, "
            f"refresh every {demo.TINY.update_proj_gap} steps; each optimizer at its recipe lr, "
            "AdamW over a small sweep (its best in the plots; `opt_step_vs_AdamW` against "
            "that best). Optimizer step times on 1 thread.\n\n"
            + harness.format_table(rows, markdown=True))
    if sizes:
        size_rows, png = demo.step_time_by_size(out)
        pngs.append(png)
        text += ("\n\n**Optimizer step against model size** (projected weights of every "
                 "layer, random gradients, steady state: galore-torch with fixed bases, ours "
                 "with a random projection; the three interleaved round by round, medians; "
                 "1 thread):"
                 "\n\n" + harness.format_table(size_rows, markdown=True))
    return text + "\n\n" + "\n\n".join(f"![{p.stem}]({p.name})" for p in pngs)


def stage_distributed_comm(out: Path) -> str:
    return run_script("distributed_comm.py", "--measure",
                      what="bytes the optimizer itself sends per step; the 7B rows are computed "
                      "from the shapes, the test-shape rows are counted on 2 gloo ranks")


def stage_reproduction(out: Path, script: str, quick: bool) -> str:
    """A theory reproduction (its own table, verdict and PNG) embedded in the report."""
    stem = Path(script).stem
    args = ["--out", str(out)] + (["--quick"] if quick else [])
    run_script(script, *args, what=stem)
    return (f"`python bench/{script}{' --quick' if quick else ''}`\n\n"
            + (out / f"{stem}.md").read_text() + f"\n\n![{stem}]({stem}.png)")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="training-demo steps")
    parser.add_argument("--quick", action="store_true",
                        help="skip the measured memory runs; 40 demo steps")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", type=Path, default=harness.OUT_DIR,
                       help="output folder (default bench/out/, git-ignored)")
    where.add_argument("--refresh", action="store_true",
                       help="write the committed bench/results/ (to refresh them on purpose)")
    return parser.parse_args(argv)


def output_dir(args: argparse.Namespace) -> Path:
    return harness.RESULTS_DIR if args.refresh else args.out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = output_dir(args)
    out.mkdir(parents=True, exist_ok=True)

    stages: list[tuple[str, Callable[[], str]]] = [
        ("DRAM-traffic model", lambda: stage_traffic(out)),
        ("Memory accounting", lambda: stage_memory(out)),
        ("Memory accounting checked against a real run", lambda: stage_memory_validation(out)),
        ("Optimizer step on CPU", lambda: stage_cpu_step(out)),
        ("Fira and APOLLO steps on CPU", lambda: stage_full_rank_step(out)),
        ("Q-GaLore step on CPU", lambda: stage_qgalore(out)),
        ("Subspace refresh on CPU", lambda: stage_refresh(out)),
        ("Per-step fixed cost on CPU", lambda: stage_step_overhead(out)),
        ("Optimizer step on GPU", lambda: stage_gpu_step(out)),
        ("Training demo", lambda: stage_demo(out, 40 if args.quick else args.steps,
                                             sizes=not args.quick)),
        ("Optimizer communication under FSDP2", lambda: stage_distributed_comm(out)),
        ("Batch-size scaling rule (Malladi et al.)",
         lambda: stage_reproduction(out, "scaling_rule.py", args.quick)),
        ("Adagrad vs SGD as the batch grows",
         lambda: stage_reproduction(out, "adagrad_batch.py", args.quick)),
    ]
    if args.quick:
        stages = [s for s in stages if not s[0].startswith("Memory accounting checked")]

    sections, failed = [], 0
    started = time.perf_counter()
    bar = harness.progress(stages, desc="run_all")
    for title, fn in bar:
        if hasattr(bar, "set_description"):
            bar.set_description(title)
        t0 = time.perf_counter()
        try:
            body = fn()
        except Exception:  # noqa: BLE001  (a failed stage is reported, the others still run)
            failed += 1
            body = f"**FAILED**\n\n```\n{traceback.format_exc()[-4000:]}```"
        sections.append(f"## {title}\n\n_{time.perf_counter() - t0:.0f} s_\n\n{body}\n")
        print(f"[{time.perf_counter() - started:5.0f} s] {title}: "
              f"{'FAILED' if body.startswith('**FAILED') else 'done'}", flush=True)

    machine = harness.machine_info("cuda" if torch.cuda.is_available() else "cpu")
    header = ("# lowrank_kernels benchmark report\n\n"
              "Generated by `python bench/run_all.py"
              f"{' --quick' if args.quick else ''}{' --refresh' if args.refresh else ''}` in "
              f"{time.perf_counter() - started:.0f} s.\n\n"
              + "\n".join(f"- {k}: {v}" for k, v in machine.items()) + "\n")
    report = out / "report.md"
    report.write_text(header + "\n" + "\n".join(sections))
    print(f"wrote {report}" + (f" ({failed} stage(s) failed)" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
