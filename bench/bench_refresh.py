"""Subspace-refresh cost on CPU per LLaMA weight shape, and projection-state memory of a 7B model.

Per shape (m×n gradient, rank r) it times, in one run whose rounds call every method in turn
(medians over the rounds, harness.time_interleaved, so that every method sees the same load):

  svd        galore-torch's refresh: GaLoreProjector.project at a refresh step, i.e.
             torch.linalg.svd(G, full_matrices=False) + the projection GEMM
  svd_lowrank  torch.svd_lowrank(G, q=r, niter=2) (randomized SVD) + the projection GEMM
  dct_fft    lowrank dct_select, Makhoul-rfft path: indices + R, O(m·n·log d)
  dct_dense  lowrank dct_select, dense path: X = G·Cᵀ with the d×d basis, O(m·n·d)
  gemm       one projection GEMM of the same shape (R = Pᵀ G or G Qᵀ): the cost of the projection
             that every method pays anyway

and prints ratios. DESIGN §4.5 / the DCT issue ask for dct_fft ≥ 100× faster than svd and no
slower than gemm at 2048×5504, r=256 (measured with --full: the SVD alone takes about a minute).

When a GPU is present the same shapes are then timed on it (triton.testing.do_bench, L2 flushed,
medians), in one run per shape:

  triton_dct   lowrank dct_select, Triton kernel (ops.dct_select(backend="triton"))
  cuda_dct     lowrank dct_select, CUDA kernel (csrc/cuda/dct.cu), if the extension has it
  svd          galore-torch's GaLoreProjector.project at a refresh step, on the GPU
  svd_lowrank  torch.svd_lowrank(G, q=r, niter=2) + the projection GEMM, on the GPU
  gemm         one fp32 projection GEMM of the same shape (cuBLAS, TF32 off)

    python bench/bench_refresh.py            # LLaMA-60M/130M/350M MLP shapes, ~1-2 minutes
    python bench/bench_refresh.py --full     # adds LLaMA-1B 2048×5504 (SVD measured once)
    python bench/bench_refresh.py --crossover  # dense vs fft dct_select over d (sets kFftMinSize)
    python bench/bench_refresh.py --memory   # projection state of LLaMA-7B only
    python bench/bench_refresh.py --gpu-only [--full]  # only the GPU providers
    python bench/bench_refresh.py --vs-gemm  # only dct_fft against gemm, every shape (no SVD)

Timings on a shared machine vary with its load; the ratios of an interleaved run are what to read.
``--csv PATH`` writes every timed row (ms per method) with the machine in the header.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a source checkout's package
import lowrank_kernels as lk
from bench import harness
from lowrank_kernels import reference

# (name, m, n, rank): MLP weights as the gradient reaches the optimizer (down_proj: hidden × inter)
DEFAULT_SHAPES = [
    ("llama-60m mlp", 512, 1376, 128),
    ("llama-130m mlp", 768, 2048, 256),
    ("llama-350m mlp", 1024, 2736, 256),
]
FULL_SHAPES = [("llama-1b mlp", 2048, 5504, 256), ("llama-1b mlp^T", 5504, 2048, 256)]


def medians(fns: dict, repeats: dict, cold: tuple[str, ...] = ()) -> dict:
    """Median wall time (s) of each function over rounds that call them in turn
    (harness.time_interleaved); ``repeats`` caps each one's rounds, and those in ``cold`` (too
    slow to repeat) get no warm-up call."""
    timings = harness.time_interleaved(fns, rounds=max(repeats.values()), max_rounds=repeats,
                                       cold=cold)
    return {name: t.median_s for name, t in timings.items()}


def galore_refresh(rank: int):
    """galore-torch's own projector at a refresh step (SVD + projection)."""
    projector = harness.import_galore_torch().GaLoreProjector

    def refresh(grad):
        projector(rank, update_proj_gap=1).project(grad, 0)

    return refresh


def svd_lowrank_refresh(grad: torch.Tensor, rank: int) -> torch.Tensor:
    u, _, v = torch.svd_lowrank(grad, q=rank, niter=2)
    proj = v.T if reference.is_right_side(*grad.shape) else u
    return reference.project(grad, proj.contiguous())


def bench_shape(name: str, m: int, n: int, rank: int, *, svd_repeats: int, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    grad = torch.randn(m, n, generator=gen)
    d = min(m, n)
    basis = torch.linalg.qr(torch.randn(d, rank, generator=gen))[0]
    proj = basis.T.contiguous() if reference.is_right_side(m, n) else basis.contiguous()
    svd_refresh = galore_refresh(rank)  # imports galore_torch outside the (cold) timing
    fns = {
        "svd": lambda: svd_refresh(grad),
        "svd_lowrank": lambda: svd_lowrank_refresh(grad, rank),
        "dct_fft": lambda: torch.ops.lowrank.dct_select(grad, rank, 1, method="fft"),
        "dct_dense": lambda: torch.ops.lowrank.dct_select(grad, rank, 1, method="dense"),
        "gemm": lambda: torch.ops.lowrank.project(grad, proj),
    }
    reps = {k: repeats for k in fns}
    reps["svd"] = svd_repeats
    reps["svd_lowrank"] = max(1, repeats // 3)
    reps["dct_dense"] = max(1, repeats // 2)
    torch.linalg.svd(torch.randn(64, 64), full_matrices=False)  # LAPACK's one-time setup
    times = medians(fns, reps, cold=("svd",))
    ms = {k: 1e3 * v for k, v in times.items()}
    print(f"{name:<16} {m:>5}x{n:<5} r={rank:<4} " + "  ".join(
        f"{k}={v:9.2f}" for k, v in ms.items()) + " ms")
    print(f"{'':<16} ratios: svd/dct_fft={ms['svd'] / ms['dct_fft']:7.1f}x  "
          f"svd_lowrank/dct_fft={ms['svd_lowrank'] / ms['dct_fft']:5.1f}x  "
          f"dct_fft/gemm={ms['dct_fft'] / ms['gemm']:5.2f}  "
          f"dct_dense/dct_fft={ms['dct_dense'] / ms['dct_fft']:5.1f}x")
    return {"device": "cpu", "shape": name, "m": m, "n": n, "rank": rank,
            **{f"{k}_ms": round(v, 3) for k, v in ms.items()}}


def bench_crossover(lines: int = 4096) -> None:
    print(f"dct_select dense vs fft, {lines} lines, r = d/8, one thread")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for d in (16, 32, 64, 128, 256, 512, 1024):
            for shape in ((lines, d), (d, lines)):
                grad = torch.randn(*shape)
                rank = max(1, d // 8)
                fns = {method: (lambda g=grad, mt=method, r=rank: torch.ops.lowrank.dct_select(
                    g, r, 1, method=mt)) for method in ("fft", "dense")}
                t = medians(fns, {"fft": 5, "dense": 5})
                print(f"  {shape!s:<14} fft {1e3 * t['fft']:8.2f} ms   dense "
                      f"{1e3 * t['dense']:8.2f} ms")
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------
# projection-state memory
# ------------------------------------------------------------------------------------------
def llama7b_weights() -> list[tuple[str, int, int]]:
    """(name, m, n) of every projected weight of LLaMA-7B as nn.Linear stores it (out × in)."""
    hidden, inter, layers = 4096, 11008, 32
    per_layer = [("q_proj", hidden, hidden), ("k_proj", hidden, hidden),
                 ("v_proj", hidden, hidden), ("o_proj", hidden, hidden),
                 ("gate_proj", inter, hidden), ("up_proj", inter, hidden),
                 ("down_proj", hidden, inter)]
    return [(f"layers.{i}.{name}", m, n) for i in range(layers) for name, m, n in per_layer]


def projection_state_bytes(m: int, n: int, rank: int, fmt: str, group: int = 256) -> int:
    """Bytes of the projection state of one m×n weight: the d×r basis (d = min(m, n), §4.1)."""
    d = min(m, n)
    elements = d * rank
    if fmt == "fp32":
        return 4 * elements
    if fmt == "bf16":
        return 2 * elements
    if fmt == "int4":  # packed codes + fp32 scale and zero per group of 256 (DESIGN §4.3)
        groups = -(-elements // group)
        return -(-elements // 2) + 8 * groups
    if fmt == "dct":  # r int32 indices (DESIGN §4.5)
        return 4 * rank
    raise ValueError(f"fmt: unknown format {fmt!r}")


def memory_table(rank: int = 1024) -> None:
    weights = llama7b_weights()
    print(f"projection state of LLaMA-7B ({len(weights)} projected weights, rank {rank})")
    dense_fp32 = sum(projection_state_bytes(m, n, rank, "fp32") for _, m, n in weights)
    for fmt in ("fp32", "bf16", "int4", "dct"):
        total = sum(projection_state_bytes(m, n, rank, fmt) for _, m, n in weights)
        print(f"  {fmt:<5} {total / 2**20:12.3f} MiB   ({dense_fp32 / total:8.1f}x smaller than "
              f"fp32)")
    sizes = sorted({min(m, n) for _, m, n in weights})
    shared = sum(2 * d * d for d in sizes)
    print(f"  (a GPU kernel that caches the full bf16 basis C adds {shared / 2**20:.0f} MiB once, "
          f"shared by all layers: d in {sizes})")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="add LLaMA-1B 2048x5504 (slow SVD)")
    p.add_argument("--crossover", action="store_true", help="dense vs fft dct_select")
    p.add_argument("--memory", action="store_true", help="only the memory table")
    p.add_argument("--repeats", type=int, default=7, help="interleaved rounds per shape")
    p.add_argument("--gpu-only", action="store_true", help="skip the CPU providers")
    p.add_argument("--vs-gemm", action="store_true",
                   help="only dct_fft against one GEMM, on every shape (no SVD)")
    p.add_argument("--csv", type=Path, default=None, help="write the timed rows here")
    return p


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    if not lk.EXTENSION_AVAILABLE and not args.gpu_only:
        raise SystemExit(f"needs the C++ extension: {lk.EXTENSION_LOAD_ERROR}")
    if args.memory:
        memory_table()
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.crossover:
        bench_crossover()
        return
    rows: list[dict] = []
    if args.vs_gemm:
        for shape in DEFAULT_SHAPES + FULL_SHAPES:
            rows.append(bench_shape_without_svd(*shape, repeats=args.repeats))
    elif args.gpu_only:
        if not torch.cuda.is_available():
            raise SystemExit("--gpu-only: no CUDA device here")
        rows += bench_gpu(DEFAULT_SHAPES + (FULL_SHAPES if args.full else []))
    else:
        for name, m, n, rank in DEFAULT_SHAPES:
            rows.append(bench_shape(name, m, n, rank, svd_repeats=1, repeats=args.repeats))
        if args.full:  # the SVD costs the same on both orientations: measure it once
            rows.append(bench_shape(*FULL_SHAPES[0], svd_repeats=1, repeats=args.repeats))
            rows.append(bench_shape_without_svd(*FULL_SHAPES[1], repeats=args.repeats))
        if torch.cuda.is_available():
            print()
            rows += bench_gpu(DEFAULT_SHAPES + (FULL_SHAPES if args.full else []))
        print()
        memory_table()
    if args.csv:
        device = "cuda" if any(r["device"] == "cuda" for r in rows) else "cpu"
        harness.write_csv(args.csv, rows, harness.machine_info(device))
        print(f"wrote {args.csv}")


def bench_gpu(shapes) -> list[dict]:
    """The GPU providers of the module docstring, per shape, with their ratios."""
    cuda_kernel = lk._dispatch.CUDA_CXX_AVAILABLE
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 GEMM every method pays
    print(f"GPU: {torch.cuda.get_device_name()} (do_bench medians, ms)")
    try:
        return [bench_gpu_shape(*shape, cuda_kernel=cuda_kernel) for shape in shapes]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32


def bench_gpu_shape(name: str, m: int, n: int, rank: int, *, cuda_kernel: bool) -> dict:
    from lowrank_kernels import ops

    gen = torch.Generator(device="cuda").manual_seed(0)
    grad = torch.randn(m, n, device="cuda", generator=gen)
    basis = torch.linalg.qr(torch.randn(min(m, n), rank, device="cuda", generator=gen))[0]
    right = reference.is_right_side(m, n)
    proj = basis.T.contiguous() if right else basis.contiguous()
    fns = {
        "triton_dct": lambda: ops.dct_select(grad, rank, 1, backend="triton"),
        "gemm": lambda: grad @ proj.T if right else proj.T @ grad,
        "svd_lowrank": lambda: svd_lowrank_refresh(grad, rank),
    }
    try:
        svd_refresh = galore_refresh(rank)
        fns["svd"] = lambda: svd_refresh(grad)
    except ImportError as exc:  # e.g. a GPU machine without the peer packages
        print(f"  skip svd (galore-torch's refresh): {exc}")
    if cuda_kernel:
        fns["cuda_dct"] = lambda: torch.ops.lowrank_cuda.dct_select(grad, rank, 1)
    ms = {k: harness.time_cuda(fn).median_s * 1e3 for k, fn in fns.items()}
    print(f"{name:<16} {m:>5}x{n:<5} r={rank:<4} " + "  ".join(
        f"{k}={v:8.3f}" for k, v in ms.items()))
    ratios = [f"triton_dct/gemm={ms['triton_dct'] / ms['gemm']:5.2f}",
              f"svd_lowrank/triton_dct={ms['svd_lowrank'] / ms['triton_dct']:6.1f}x"]
    if "svd" in ms:
        ratios.append(f"svd/triton_dct={ms['svd'] / ms['triton_dct']:7.1f}x")
    if cuda_kernel:
        ratios += [f"cuda_dct/gemm={ms['cuda_dct'] / ms['gemm']:5.2f}",
                   f"cuda_dct/triton_dct={ms['cuda_dct'] / ms['triton_dct']:5.2f}"]
    print(f"{'':<16} ratios: " + "  ".join(ratios))
    return {"device": "cuda", "shape": name, "m": m, "n": n, "rank": rank,
            **{f"{k}_ms": round(v, 4) for k, v in ms.items()}}


def bench_shape_without_svd(name: str, m: int, n: int, rank: int, *, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    grad = torch.randn(m, n, generator=gen)
    basis = torch.linalg.qr(torch.randn(min(m, n), rank, generator=gen))[0]
    proj = basis.T.contiguous() if reference.is_right_side(m, n) else basis.contiguous()
    fns = {
        "dct_fft": lambda: torch.ops.lowrank.dct_select(grad, rank, 1, method="fft"),
        "gemm": lambda: torch.ops.lowrank.project(grad, proj),
    }
    ms = {k: 1e3 * v for k, v in medians(fns, {k: repeats for k in fns}).items()}
    print(f"{name:<16} {m:>5}x{n:<5} r={rank:<4} dct_fft={ms['dct_fft']:9.2f}  "
          f"gemm={ms['gemm']:9.2f} ms   dct_fft/gemm={ms['dct_fft'] / ms['gemm']:5.2f}")
    return {"device": "cpu", "shape": name, "m": m, "n": n, "rank": rank,
            **{f"{k}_ms": round(v, 3) for k, v in ms.items()}}


if __name__ == "__main__":
    main()
