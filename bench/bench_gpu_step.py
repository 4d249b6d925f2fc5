"""GPU benchmark of one GaLore AdamW step: our fused kernels against galore-torch, same run.

Providers (each skipped with a message when it cannot run here):
  default       torch.ops.lowrank.fused_galore_step, what users, the optimizers and
                torch.compile run (on CUDA tensors the Triton kernel, or the CUDA C++ one after
                lowrank_kernels.set_cuda_backend("cuda_cxx"); the CSV's ``impl`` column says
                which)
  triton        the Triton launcher itself (backend="triton"; two launches through a low-rank N
                workspace): default's kernel without the dispatcher
  triton-q      the Triton step on the Q-GaLore formats: packed INT4 basis and INT8 weight codes
                (groups of 256), judged against bench/traffic.py's floor-q
  triton-dct    the Triton step on DCT frequencies (the basis generated in the kernels)
  cuda          the CUDA C++ kernel (backend="cuda": torch.ops.lowrank_cuda)
  cuda-q        the CUDA C++ step on the Q-GaLore formats, as triton-q
  triton-onepass  EXPERIMENTAL: the one-pass Triton kernel
                (triton_kernels/experimental/fused_galore_step_onepass.py; rank <= 512)
  cuda-fast16   EXPERIMENTAL: the 16-bit CUDA path (csrc/experimental; only in an extension
                built with LOWRANK_EXPERIMENTAL_CUDA=1)
  cpu           the C++ kernel (backend="cpu"; only with --device cpu)
  reference     lowrank_kernels.ops.fused_galore_step(..., backend="reference") (plain torch)
  galore-torch  galore_torch.GaLoreAdamW.step with its projector holding a fixed basis
                (harness.galore_torch_optimizer: no SVD, no refresh; M, V in the weight dtype)
  q-galore-torch  QGaLoreAdamW8bit.step on an INT8 weight (INT4 basis fixed as above); needs a
                bitsandbytes whose API it matches (1.0 calls the pre-0.45 one), else skipped
  copy          dst.copy_(src) of one m×n weight: the bandwidth a plain kernel gets on this GPU

Each is timed with triton.testing.do_bench (L2 flushed between calls). Reported: median ms and
IQR, achieved GB/s counted with the floor bytes of the provider's storage (bench/traffic.py:
galore-torch keeps M, V in the weight dtype, ours in --state-dtype), that as a fraction of the
device's peak DRAM bandwidth, the traffic model's prediction, and the ratio to galore-torch.
Results go to bench/out/gpu_step_<device>.csv (or --out) with the machine in its header.

Without a GPU it prints the traffic model for the same shapes and exits 0. ``--device cpu`` runs
the same providers on CPU tensors with perf_counter timing: a smoke check of this script (tests
use it), not the CPU benchmark (that is bench/bench_cpu_step.py, where the floor is two GEMMs).

  python bench/bench_gpu_step.py                      # 4096x11008 and 11008x4096, r=256, bf16
  python bench/bench_gpu_step.py --model-shapes       # every Linear shape of the model table
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `bench` and `lowrank_kernels` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness, traffic

DEFAULT_SHAPES = ("4096x11008", "11008x4096")
PROVIDERS = ("default", "triton", "triton-q", "triton-dct", "cuda", "cuda-q", "triton-onepass",
             "cuda-fast16", "cpu", "reference", "galore-torch", "q-galore-torch", "copy")
# provider -> (implementation: a backend of lowrank_kernels.ops, None for the dispatcher, or an
# experimental kernel; weight/basis format)
OURS: dict[str, tuple[str | None, str]] = {
    "default": (None, "dense"),
    "triton": ("triton", "dense"),
    "triton-q": ("triton", "q"),
    "triton-dct": ("triton", "dct"),
    "cuda": ("cuda", "dense"),
    "cuda-q": ("cuda", "q"),
    "triton-onepass": ("triton-onepass", "dense"),
    "cuda-fast16": ("cuda-fast16", "dense"),
    "cpu": ("cpu", "dense"),
    "reference": ("reference", "dense"),
}
HYPER = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-6, "scale": 0.25}


def parse_shape(text: str) -> tuple[int, int]:
    try:
        m, n = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"shape: expected MxN such as 4096x11008, got {text!r}") from None
    return m, n


def _step_fn(backend: str | None, device: torch.device) -> Callable:
    """The fused step a provider times (module docstring), or raises why it cannot run here."""
    from lowrank_kernels import _dispatch

    if backend == "triton-onepass":
        from lowrank_kernels.triton_kernels.experimental import fused_galore_step_onepass

        return fused_galore_step_onepass.fused_galore_step
    if backend == "cuda-fast16":
        return torch.ops.lowrank_experimental.fused_galore_step  # AttributeError if not built
    return _dispatch.kernel("fused_galore_step", backend, device)  # raises if it cannot run


def ours(backend: str | None, m: int, n: int, rank: int, wdt, sdt, weight_decay: float, device,
         fmt: str = "dense") -> Callable[[], None]:
    """A closure running one fused step in place, or raises why the backend cannot run.
    ``backend`` None: torch.ops.lowrank.fused_galore_step (the dispatcher); ``fmt``: 'dense'
    basis and float W, 'q' (packed INT4 basis, INT8 W codes) or 'dct'."""
    from lowrank_kernels import ops

    op = _step_fn(backend, torch.device(device))
    param = torch.randn(m, n, device=device, dtype=wdt) * 0.02
    grad = torch.randn(m, n, device=device, dtype=wdt) * 1e-3
    proj = harness.random_basis(m, n, rank, wdt, device)
    formats = {}
    if fmt == "q":
        proj, proj_scales, proj_zeros = ops.quantize_int4(proj.float(), 256)
        param, param_scales, param_zeros = ops.quantize_int8(param, 256)
        formats = {"proj_scales": proj_scales, "proj_zeros": proj_zeros,
                   "param_scales": param_scales, "param_zeros": param_zeros, "seed": 1}
    elif fmt == "dct":
        proj = torch.randperm(min(m, n), device=device)[:rank].sort().values.to(torch.int32)
    if sdt == torch.bfloat16:
        formats["seed"] = 1  # bf16 moments round stochastically: they need a seed
    shape = ops.low_rank_shape(m, n, rank)
    exp_avg = torch.zeros(shape, device=device, dtype=sdt)
    exp_avg_sq = torch.zeros(shape, device=device, dtype=sdt)
    step = [0]

    def run() -> None:
        step[0] += 1
        op(param, grad, proj, exp_avg, exp_avg_sq, step=step[0], weight_decay=weight_decay,
           **HYPER, **formats)

    run()  # compiles (Triton) and fails loudly before timing if the kernel is broken
    return run


def resolved_impl(provider: str, device) -> str:
    """What the default provider ran on ``device``: the kernel registered for it (the CPU C++
    kernel, or on CUDA tensors lowrank_kernels.cuda_backend(): 'triton' or 'cuda_cxx')."""
    if provider != "default":
        return ""
    from lowrank_kernels import _dispatch

    return _dispatch.cuda_backend() if torch.device(device).type == "cuda" else "cpu"


def galore_torch_step(m: int, n: int, rank: int, wdt, weight_decay: float, device
                      ) -> Callable[[], None]:
    param = torch.randn(m, n, device=device, dtype=wdt) * 0.02
    grad = torch.randn(m, n, device=device, dtype=wdt) * 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        opt = harness.galore_torch_optimizer(param, grad, harness.random_basis(m, n, rank, wdt, device),
                                             rank, weight_decay=weight_decay, **HYPER)
    opt.step()  # its state allocation happens here, not in the timing
    return opt.step


def q_galore_torch_step(m: int, n: int, rank: int, wdt, weight_decay: float, device
                        ) -> Callable[[], None]:
    import q_galore_torch

    cls = q_galore_torch.QGaLoreAdamW8bit
    codes, scales, zeros = cls._quantize(None, torch.randn(m, n, device=device, dtype=wdt) * 0.02,
                                         q_group_size=256)
    param = torch.nn.Parameter(codes, requires_grad=False)  # what QGaLoreLinear holds
    param.group_size, param.scales, param.zeros, param.stochastic_round = 256, scales, zeros, True
    grad = torch.randn(m, n, device=device, dtype=wdt) * 1e-3
    group = {"params": [param], "rank": rank, "update_proj_gap": 2**62,
             "scale": HYPER["scale"], "proj_type": "std", "quant": True, "quant_group_size": 256,
             "quant_n_bit": 4, "cos_threshold": 0.4, "gamma_proj": 2, "queue_size": 5}
    opt = cls([group], lr=HYPER["lr"], weight_decay=weight_decay)

    def step() -> None:
        param.float_grad = grad  # the step replaces it with the low-rank gradient
        opt.step()

    try:
        step()  # SVD, quantised basis and 8-bit states, outside the timing
    except Exception as exc:  # an incompatible bitsandbytes fails in many ways
        raise RuntimeError(f"its step fails here: {type(exc).__name__}: {exc}") from exc
    return step


def copy_probe(m: int, n: int, wdt, device) -> Callable[[], None]:
    src = torch.randn(m, n, device=device, dtype=wdt)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def bench_shape(m: int, n: int, rank: int, wdt, sdt, weight_decay: float, providers, device,
                peak: float | None, compile_only: bool = False) -> list[dict[str, object]]:
    rows = []
    lowrank_floor = traffic.floor(m, n, rank, wdt, sdt).total
    l2 = (torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda"
          else traffic.SMALLEST_L2)
    two_launch = traffic.fused_triton_2launch(m, n, rank, wdt, sdt).total
    models = {"triton": two_launch, "triton-dct": two_launch,
              "triton-q": traffic.fused_triton_q(m, n, rank, wdt, sdt).total,
              "cuda": traffic.fused_cuda(m, n, rank, wdt, sdt).total,
              "cpu": lowrank_floor,  # one pass over G and W per tile, the basis from cache
              "galore-torch": traffic.galore_torch(m, n, rank, wdt,
                                                   weight_decay=weight_decay > 0).total,
              "q-galore-torch": traffic.q_galore_torch(m, n, rank, wdt,
                                                       weight_decay=weight_decay > 0).total}
    if rank <= traffic.ONE_PASS_MAX_RANK:  # the one-pass kernel exists up to that rank
        models["triton-onepass"] = traffic.fused(m, n, rank, wdt, sdt, l2_bytes=l2).total
    if wdt != torch.float32:
        models["cuda-fast16"] = traffic.fused_cuda_fast16(m, n, rank, wdt, sdt).total
    default_impl = resolved_impl("default", device)
    if default_impl in ("triton", "cuda_cxx"):
        models["default"] = models["triton" if default_impl == "triton" else "cuda"]
    floors = {"galore-torch": traffic.floor(m, n, rank, wdt, wdt).total,
              "q-galore-torch": traffic.floor_q_galore(m, n, rank, wdt).total,
              "triton-q": traffic.floor_q(m, n, rank, wdt, sdt).total,
              "cuda-q": traffic.floor_q(m, n, rank, wdt, sdt).total,
              "copy": 2 * m * n * torch.empty((), dtype=wdt).element_size()}
    fns: dict[str, Callable[[], None]] = {}
    for provider in providers:
        try:
            if provider in OURS:
                backend, fmt = OURS[provider]
                fn = ours(backend, m, n, rank, wdt, sdt, weight_decay, device, fmt)
            elif provider == "galore-torch":
                fn = galore_torch_step(m, n, rank, wdt, weight_decay, device)
            elif provider == "q-galore-torch":
                fn = q_galore_torch_step(m, n, rank, wdt, weight_decay, device)
            else:
                fn = copy_probe(m, n, wdt, device)
        except (ImportError, AttributeError, RuntimeError, ValueError,
                NotImplementedError) as exc:
            print(f"  skip {provider} at {m}x{n} r{rank}: {type(exc).__name__}: {exc}")
            continue
        fns[provider] = fn
    if compile_only:  # each provider ran once above: its kernels are compiled and cached
        return []
    if device.type == "cuda":
        timings = {provider: harness.time_cuda(fn) for provider, fn in fns.items()}
    elif fns:  # shared CPU cores: interleaved rounds, more of them for a stable median
        timings = harness.time_interleaved(fns, rounds=15, warmup=3)
    else:
        timings = {}
    for provider, timing in timings.items():
        floor_bytes = floors.get(provider, lowrank_floor)
        gbps = floor_bytes / timing.median_s / 1e9
        fmt = OURS.get(provider, (None, "dense"))[1]
        row = {"shape": f"{m}x{n}", "rank": rank, "dtype": harness.dtype_name(wdt),
               "state_dtype": harness.dtype_name(wdt if provider == "galore-torch" else sdt),
               "weight_decay": weight_decay, "provider": provider,
               "impl": resolved_impl(provider, device),
               "format": {"q": "int4-basis/int8-weight", "dct": "dct-indices"}.get(fmt, "dense"),
               "ms": round(timing.median_s * 1e3, 4),
               "iqr_ms": round(timing.iqr_s * 1e3, 4),
               "floor_MB": round(floor_bytes / 1e6, 2),
               "GBps_at_floor": round(gbps, 3 if gbps < 10 else 1),
               "frac_of_peak": round(gbps * 1e9 / peak, 3) if peak else "",
               "model_MB": round(models[provider] / 1e6, 2) if provider in models else "",
               "model_ms_at_peak": (round(models[provider] / peak * 1e3, 4)
                                    if provider in models and peak else "")}
        rows.append(row)
    harness.add_ratios(rows, key="provider", baseline="galore-torch", value="ms",
                       group_by=("shape", "rank"))
    return rows


def print_traffic(shapes: Sequence[tuple[int, int]], rank: int, wdt, sdt, weight_decay: float
                  ) -> None:
    rows = []
    for m, n in shapes:
        rows += traffic.rows_for_shape(m, n, min(rank, m, n), wdt, sdt,
                                       weight_decay=weight_decay > 0)
    print(harness.format_table(rows, traffic.COLUMNS[1:]))


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="*", default=list(DEFAULT_SHAPES))
    parser.add_argument("--model-shapes", action="store_true",
                        help="add every distinct Linear shape of the model table")
    parser.add_argument("--rank", type=int, nargs="+", default=[256],
                        help="one or more ranks (capped at min(m, n))")
    parser.add_argument("--dtype", choices=harness.DTYPE_NAMES, default="bf16")
    parser.add_argument("--state-dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--providers", nargs="*", default=list(PROVIDERS), choices=PROVIDERS)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: run the providers on CPU tensors (a smoke check)")
    parser.add_argument("--out", type=Path, default=None, help="CSV path (default: bench/out/)")
    parser.add_argument("--compile-only", action="store_true",
                        help="run each provider once and time nothing: fills Triton's kernel "
                             "cache (bench/gpu_check.py does this while the extension builds)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)

    shapes = [parse_shape(s) for s in args.shapes]
    if args.model_shapes:
        for cfg in harness.MODELS.values():
            shapes += [s for s in cfg.distinct_linear_shapes() if s not in shapes]
    wdt, sdt = harness.DTYPE_NAMES[args.dtype], harness.DTYPE_NAMES[args.state_dtype]

    print(f"DRAM-traffic model (W/G {args.dtype}, M/V {args.state_dtype}, "
          f"weight decay {args.weight_decay}):")
    for rank in args.rank:
        print_traffic(shapes, rank, wdt, sdt, args.weight_decay)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("\nNo CUDA device: the GPU benchmark is skipped (traffic model above).")
        return 0

    device = torch.device(args.device)
    machine = harness.machine_info(device)
    peak = harness.gpu_peak_bandwidth(device) if device.type == "cuda" else None
    if peak:
        print(f"\n{machine['gpu']}: peak DRAM {peak / 1e9:.0f} GB/s")
    rows: list[dict[str, object]] = []
    cases = [(m, n, min(rank, m, n)) for m, n in shapes for rank in args.rank]
    for m, n, rank in harness.progress(cases, desc="shapes x ranks"):
        rows += bench_shape(m, n, rank, wdt, sdt, args.weight_decay, args.providers, device,
                            peak, compile_only=args.compile_only)
    if args.compile_only:
        print("compiled (nothing timed)")
        return 0
    if not rows:
        print("nothing ran")
        return 1
    columns = ["shape", "rank", "provider", "impl", "ms", "iqr_ms", "GBps_at_floor",
               "frac_of_peak", "model_ms_at_peak", "vs_galore-torch"]
    print(harness.format_table(rows, columns))
    path = args.out or harness.results_path("gpu_step", device)
    harness.write_csv(path, rows, machine)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
