"""DRAM-traffic model of one low-rank optimizer step on an m×n weight (DESIGN.md §5).

Every implementation is a list of kernels (``Access``: bytes read, bytes written). Counts are
compulsory traffic: each operand of a kernel is read once and each output written once; an
operand passed twice to one kernel (``p.add_(p)``, ``addcmul_(R, R)``) is read once. Real GEMMs
may re-read tiles of their operands, so the torch counts are lower bounds, and so are the
predicted times (bytes / peak bandwidth). Counts are for a steady-state step: the SVD refresh and
first-step state allocation are excluded.

Implementations
  floor           read G, read+write W, read+write M and V, read the basis P once.
  fused-triton-onepass
                  EXPERIMENTAL (on no default path):
                  triton_kernels/experimental/fused_galore_step_onepass.py: one program owns a
                  tile of whole lines (rows when m >= n, columns when m < n) and runs project ->
                  Adam -> back-project -> update on it while the tile is on chip, so G, W, M, V
                  cross DRAM once. Every program reads the basis twice (project and
                  back-project); those re-reads hit L2 when P fits in half of it, which the model
                  charges as ONE extra DRAM read of P (conservative). When P does not fit, every
                  tile reads it twice from DRAM. Listed only up to r = ONE_PASS_MAX_RANK (its
                  register tile's limit). Measured slower than the two launches at every 7B
                  shape despite its bytes: its grid of ⌈own/BLOCK_OWN⌉ programs re-reads the
                  basis from L2 per program (its module docstring has the H100 numbers).
  floor+N         the least any step moves that passes N = M/(√V+ε) (r×own) from the projection
                  GEMM to the back projection through memory: the floor plus N written and read
                  once in W's 16-bit type. Only a kernel that holds all r rows of N for its
                  lines on chip (the one-pass kernel) avoids it; at r = min(m, n)/4 with bf16 W
                  and fp32 M, V that term alone is ≈ 10% of the floor (4·r·own bytes
                  against 6·m·n + 16·r·own + the basis: 1.095-1.098 at LLaMA shapes), so no
                  two-launch step gets under ≈ 1.10× there.
  fused-triton-2launch
                  triton_kernels/fused_galore_step.py, the kernel of torch.ops.lowrank on CUDA
                  tensors: launch A projects and runs Adam on 2-D tiles of R, storing N (W's
                  type when W is 16-bit, else fp32) to a low-rank workspace; launch B
                  back-projects N on 2-D tiles of W and updates W. Adds to the floor: N written
                  and read once (2·L·s(N)) and a second basis read.
  fused-cuda      csrc/cuda/fused_galore_step.cu (set_cuda_backend("cuda_cxx")): the same
                  two-launch structure (mma.sync GEMMs) on an fp32 basis and an fp32 N: the floor
                  + the N round trip in fp32 + either a second read of an fp32 basis or, for any
                  other basis, an fp32 copy of it (4·d·r written, then read by both launches).
                  Counted in DRAM as the kernel's header counts them (N and the basis may partly
                  stay in L2). ``fused_cuda_fast16`` models the EXPERIMENTAL 16-bit path
                  (csrc/experimental, not built by default): W, G and the basis of one 16-bit
                  type, N in it too, the basis read twice -- the bytes of fused-triton-2launch.
  fused-cuda-q    the same two launches on INT8 weight codes and a packed INT4 basis, plus pass
                  2 (csrc/cuda/int8_update.cu): launch 1 reads an fp32 copy of the basis that
                  dequantize_int4 makes and writes N (fp32); pass 2 reads N and the packed basis
                  (expanded on the fly) and reads and writes each code, scale and zero once.
                  Judged against floor-q (our storage: packed P, M and V in the state dtype).
  galore-torch    GaLoreAdamW.step (galore_torch/adamw.py 78-140 and galore_projector.py): one
                  kernel per torch op, states in the gradient's dtype.
  fused-triton-q  triton_kernels/fused_galore_step.py on the Q-GaLore formats (INT8 W codes,
                  packed INT4 P, M and V in the state dtype): launch A (project + Adam) writes N
                  in fp32 (the INT8 epilogue needs the CPU's fp32 numbers), launch B reads it,
                  reads the codes and group scales/zeros of W once and writes them once. P (0.5
                  B per element + fp32 scales/zeros per group) is read by both launches; the
                  second read is charged once more (it is far below L2). Judged against
                  ``floor-q``: the same storage's floor (no N round trip, P read once).
  q-galore-torch  QGaLoreAdamW8bit.step with an INT8 weight (q_galore_adamw8bit.py 16-126 and
                  q_galore_projector.py): dequantise W twice, dequantise P on every projection,
                  bitsandbytes blockwise 8-bit Adam, requantise with stochastic rounding through
                  an m×n random tensor. Compared with ``floor-q-galore``: the floor for that
                  storage (INT8 W codes + group scales, uint8 P codes, 8-bit M/V + absmax).

Fira and APOLLO (full_rank="fira"|"apollo"; triton_kernels/full_rank.py)
  fused-triton-fira
                  the two launches with Fira's term: launch A also stores R (fp32) and per-line
                  sums, N is fp32; the Gram K = PPᵀ (P read once more, r² fp32), the per-line
                  quadratic (R and K read) and the finalize (line sums read, 2 coefficients per
                  line written); launch B reads P, N, R, the coefficients, G again and W.
  fused-triton-apollo
                  the same without a back projection: launch A writes N (fp32, unread) and the
                  line sums; launch B reads G again and W, no basis. APOLLOAdamW's basis is
                  generated in each step (ops.random_basis, fp32 r×d written, then read by A).
  fira            fira 1.0.2 FiraAdamW.step (fira_adamw.py 66-165): GaLore's kernels plus the
                  residual G − α·back(R), its channel norms and the limiter, each an m×n torch op.
  apollo-torch    apollo-torch 1.0.3 APOLLOAdamW.step (apollo.py 100-218): Adam on R, the
                  channel norms, φ ⊙ G, the limiter and √scale, each an m×n torch op.
  The three fira/apollo peers' lists are checked against their executed kernels
  (tests/test_bench_harness.py); all are judged against the dense floor (G read once).

Usage: ``python -m bench.traffic [--model llama-7b] [--rank 256] [--dtype bf16] [--ops]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import DTYPE_NAMES, MODELS, format_table, model

# Peak DRAM bandwidth (bytes/s) and L2 size (bytes) of the GPUs the project targets.
DEVICES: dict[str, tuple[float, int]] = {
    "RTX 4090": (1008e9, 72 * 2**20),
    "RTX 4060 Ti": (288e9, 32 * 2**20),
    "H100": (3.35e12, 50 * 2**20),
}

# The fused model's L2 test uses the smallest L2 listed, so its bytes hold on every device.
SMALLEST_L2 = min(l2 for _, l2 in DEVICES.values())

try:  # the experimental one-pass kernel's rank limit (its R tile lives in registers)
    from lowrank_kernels.triton_kernels.experimental.fused_galore_step_onepass import (
        MAX_RANK_PAD as ONE_PASS_MAX_RANK,
    )
except ImportError:  # Triton not installed: the same constant
    ONE_PASS_MAX_RANK = 512

QUANT_GROUP = 256  # q-galore-torch's group for W (INT8) and P (INT4); bitsandbytes' block too

# Whether the code a row models has ever been timed on a GPU (bench/results/gpu_*.csv). A row of
# code that never ran is a prediction about something nobody has measured: tables say so.
RAN_ON_GPU = {
    "fused-triton-onepass": "yes (H100; experimental, off the default path)",
    "fused-triton-2launch": "yes (H100)",
    "galore-torch": "yes (H100)",
    "fused-cuda": "yes (H100: the general path)",
    "fused-cuda-fast16": "no: the experimental 16-bit path (csrc/experimental), never run",
    "fused-triton-q": "no",
    "fused-cuda-q": "no: models the fast path's INT4 loader",
    "q-galore-torch": "no: cannot step with bitsandbytes >= 0.45",
    "fused-triton-fira": "no", "fused-triton-apollo": "no", "fira": "no", "apollo-torch": "no",
}


@dataclasses.dataclass(frozen=True)
class Access:
    """One kernel: what it is and the DRAM bytes it reads and writes."""

    op: str
    read: float
    write: float

    @property
    def total(self) -> float:
        return self.read + self.write


@dataclasses.dataclass(frozen=True)
class Traffic:
    impl: str
    accesses: tuple[Access, ...]
    launches: int | None = None  # kernel launches when not one per Access (our fused kernels)

    @property
    def read(self) -> float:
        return sum(a.read for a in self.accesses)

    @property
    def write(self) -> float:
        return sum(a.write for a in self.accesses)

    @property
    def total(self) -> float:
        return self.read + self.write

    @property
    def kernels(self) -> int:
        return self.launches if self.launches is not None else len(self.accesses)

    def seconds(self, bandwidth: float) -> float:
        return self.total / bandwidth


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Element counts of one m×n weight at rank r (side rule of DESIGN.md §4.1)."""

    m: int
    n: int
    rank: int

    def __post_init__(self) -> None:
        if not 1 <= self.rank <= min(self.m, self.n):
            raise ValueError(f"rank: expected 1 <= r <= min(m, n) = {min(self.m, self.n)}, "
                             f"got {self.rank}")

    @property
    def full(self) -> int:  # elements of W and G
        return self.m * self.n

    @property
    def low_rank(self) -> int:  # elements of R, M, V, N: m×r (right) or r×n (left)
        return self.rank * max(self.m, self.n)

    @property
    def basis(self) -> int:  # elements of P: r×n (right) or m×r (left)
        return self.rank * min(self.m, self.n)


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def floor(m: int, n: int, rank: int, weight_dtype: torch.dtype = torch.bfloat16,
          state_dtype: torch.dtype = torch.float32, proj_dtype: torch.dtype | None = None
          ) -> Traffic:
    """The bytes any dense-basis step must move (DESIGN.md §5)."""
    g = Geometry(m, n, rank)
    w, s, p = _size(weight_dtype), _size(state_dtype), _size(proj_dtype or weight_dtype)
    return Traffic("floor", (
        Access("read G", g.full * w, 0),
        Access("read+write W", g.full * w, g.full * w),
        Access("read+write M, V", 2 * g.low_rank * s, 2 * g.low_rank * s),
        Access("read P", g.basis * p, 0),
    ))


def fused(m: int, n: int, rank: int, weight_dtype: torch.dtype = torch.bfloat16,
          state_dtype: torch.dtype = torch.float32, proj_dtype: torch.dtype | None = None, *,
          l2_bytes: int = SMALLEST_L2, block_lines: int = 64, impl: str = "fused-triton-onepass"
          ) -> Traffic:
    """The experimental one-pass (Triton) step under the line-tile scheme in the module
    docstring; it exists up to r = ONE_PASS_MAX_RANK."""
    g = Geometry(m, n, rank)
    if rank > ONE_PASS_MAX_RANK:
        raise ValueError(f"rank: the one-pass kernel runs up to r = {ONE_PASS_MAX_RANK}, "
                         f"got {rank}")
    p_bytes = g.basis * _size(proj_dtype or weight_dtype)
    base = floor(m, n, rank, weight_dtype, state_dtype, proj_dtype).accesses
    if 2 * p_bytes <= l2_bytes:
        extra = Access("P again for back-projection (L2 hits, charged once)", p_bytes, 0)
    else:
        tiles = -(-max(m, n) // block_lines)
        extra = Access(f"P re-read by {tiles} tiles x 2 passes (P exceeds L2/2)",
                       (2 * tiles - 1) * p_bytes, 0)
    return Traffic(impl, (*base, extra), launches=1)


def _workspace_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """The two-launch kernels store N in the type their back projection multiplies in: W's
    type when W is 16-bit, else fp32 (fused_galore_step.workspace_dtype)."""
    return torch.float32 if weight_dtype == torch.float32 else weight_dtype


def floor_plus_n(m: int, n: int, rank: int, weight_dtype: torch.dtype = torch.bfloat16,
                 state_dtype: torch.dtype = torch.float32, proj_dtype: torch.dtype | None = None
                 ) -> Traffic:
    """The floor plus N written and read once in the workspace type: the least a step moves
    that keeps N in memory between its two GEMMs (module docstring)."""
    n_dtype = _workspace_dtype(weight_dtype)
    n_bytes = Geometry(m, n, rank).low_rank * _size(n_dtype)
    return Traffic("floor+N", (
        *floor(m, n, rank, weight_dtype, state_dtype, proj_dtype).accesses,
        Access(f"N ({n_dtype}) written once and read once", n_bytes, n_bytes),
    ))


def fused_triton_2launch(m: int, n: int, rank: int, weight_dtype: torch.dtype = torch.bfloat16,
                         state_dtype: torch.dtype = torch.float32,
                         proj_dtype: torch.dtype | None = None) -> Traffic:
    """Our Triton two-launch step (triton_kernels/fused_galore_step.py): the floor, the basis
    read once more by launch B, and N written by launch A and read by launch B in the
    workspace type."""
    g = Geometry(m, n, rank)
    proj_dtype = proj_dtype or weight_dtype
    n_dtype = _workspace_dtype(weight_dtype)
    n_bytes = g.low_rank * _size(n_dtype)
    return Traffic("fused-triton-2launch", (
        *floor(m, n, rank, weight_dtype, state_dtype, proj_dtype).accesses,
        Access("P again for launch B (back-project)", g.basis * _size(proj_dtype), 0),
        Access(f"N workspace ({n_dtype}): launch A writes, launch B reads", n_bytes, n_bytes),
    ), launches=2)


def fused_cuda(m: int, n: int, rank: int, weight_dtype: torch.dtype = torch.bfloat16,
               state_dtype: torch.dtype = torch.float32, proj_dtype: torch.dtype | None = None
               ) -> Traffic:
    """Our CUDA C++ step (module docstring); G has W's dtype here. The floor, the N round trip
    in fp32, and an fp32 basis read again by launch 2, or any other basis first copied to fp32
    (then read by both launches)."""
    return _cuda_two_launch(m, n, rank, weight_dtype, state_dtype, proj_dtype, fast16=False)


def fused_cuda_fast16(m: int, n: int, rank: int, weight_dtype: torch.dtype = torch.bfloat16,
                      state_dtype: torch.dtype = torch.float32) -> Traffic:
    """The EXPERIMENTAL 16-bit CUDA path (csrc/experimental; W, G and the basis of one 16-bit
    type): the floor, N in W's type written and read once, the basis read by both launches."""
    if weight_dtype == torch.float32:
        raise ValueError("weight_dtype: the 16-bit path serves bf16 and fp16 only")
    return _cuda_two_launch(m, n, rank, weight_dtype, state_dtype, weight_dtype, fast16=True)


def _cuda_two_launch(m, n, rank, weight_dtype, state_dtype, proj_dtype, *, fast16: bool
                     ) -> Traffic:
    g = Geometry(m, n, rank)
    proj_dtype = proj_dtype or weight_dtype
    n_dtype = weight_dtype if fast16 else torch.float32
    n_bytes = g.low_rank * _size(n_dtype)
    ops = [*floor(m, n, rank, weight_dtype, state_dtype, proj_dtype).accesses,
           Access(f"N workspace ({n_dtype}): launch 1 writes, launch 2 reads", n_bytes, n_bytes)]
    copied = not fast16 and proj_dtype != torch.float32
    if copied:
        ops.append(Access("fp32 copy of the basis: written, then read by both launches",
                          8 * g.basis, 4 * g.basis))
    else:
        ops.append(Access("P again for launch 2 (back-project)", g.basis * _size(proj_dtype), 0))
    return Traffic("fused-cuda-fast16" if fast16 else "fused-cuda", tuple(ops),
                   launches=2 + copied)


def galore_torch(m: int, n: int, rank: int, weight_dtype: torch.dtype = torch.bfloat16,
                 *, weight_decay: bool = True) -> Traffic:
    """galore-torch GaLoreAdamW.step, one Access per torch kernel; M, V, P in the grad's dtype."""
    g = Geometry(m, n, rank)
    b = _size(weight_dtype)
    full, low, basis = g.full * b, g.low_rank * b, g.basis * b
    ops = [
        Access("R = matmul(G, P) (project)", full + basis, low),
        Access("exp_avg.mul_(beta1)", low, low),
        Access("exp_avg.add_(R)", 2 * low, low),
        Access("exp_avg_sq.mul_(beta2)", low, low),
        Access("exp_avg_sq.addcmul_(R, R)", 2 * low, low),
        Access("denom = exp_avg_sq.sqrt()", low, low),
        Access("denom.add_(eps)", low, low),
        Access("N = exp_avg / denom", 2 * low, low),
        Access("back = matmul(N, P) (m×n)", low + basis, full),
        Access("back * scale (m×n)", full, full),
        Access("p.add_(back, alpha=-step)", 2 * full, full),
    ]
    if weight_decay:
        ops.append(Access("p.add_(p, alpha=-lr*wd) (decay pass)", full, full))
    return Traffic("galore-torch", tuple(ops))


def _peer_adam(low: int, basis: int, full: int) -> list[Access]:
    """The projection and Adam kernels galore-torch, fira and apollo-torch share."""
    return [Access("R = matmul(G, P) (project)", full + basis, low),
            Access("exp_avg.mul_(beta1)", low, low), Access("exp_avg.add_(R)", 2 * low, low),
            Access("exp_avg_sq.mul_(beta2)", low, low),
            Access("exp_avg_sq.addcmul_(R, R)", 2 * low, low),
            Access("denom = exp_avg_sq.sqrt()", low, low), Access("denom.add_(eps)", low, low),
            Access("N = exp_avg / denom", 2 * low, low)]


def _peer_factor(low: int, own: int) -> list[Access]:
    """φ = ‖N‖/(‖R‖ + 1e-8) per channel (own = one value per own-line)."""
    return [Access("norm(N, dim)", low, own), Access("norm(R, dim)", low, own),
            Access("+ 1e-8", own, own), Access("φ = division", 2 * own, own)]


def _peer_sizes(m: int, n: int, rank: int, weight_dtype: torch.dtype, weight_decay: bool):
    """(full, low, basis, own bytes, the limiter's kernels, the decay pass) of fira's and
    apollo-torch's steps (everything in the weight's dtype)."""
    g = Geometry(m, n, rank)
    b = _size(weight_dtype)
    full = g.full * b
    limiter = [Access("norm(S) (limiter)", full, 0), Access("S / limiter (m×n)", full, full)]
    decay = ([Access("p.add_(p, alpha=-lr*wd) (decay pass)", full, full)] if weight_decay
             else [])
    return full, g.low_rank * b, g.basis * b, max(m, n) * b, limiter, decay


def fira_torch(m: int, n: int, rank: int, weight_dtype: torch.dtype = torch.bfloat16,
               *, weight_decay: bool = True) -> Traffic:
    """fira's FiraAdamW.step, one Access per torch kernel (states in the gradient's dtype)."""
    full, low, basis, own, limiter, decay = _peer_sizes(m, n, rank, weight_dtype, weight_decay)
    return Traffic("fira", (
        *_peer_adam(low, basis, full),
        Access("back(R) = matmul (m×n)", low + basis, full), Access("× alpha (m×n)", full, full),
        *_peer_factor(low, own),
        Access("G − back(R) (m×n)", 2 * full, full), Access("× φ (m×n)", full + own, full),
        *limiter,
        Access("back(N) = matmul (m×n)", low + basis, full), Access("× alpha (m×n)", full, full),
        Access("back(N) + S (m×n)", 2 * full, full),
        Access("p.add_(update, alpha=-step)", 2 * full, full), *decay))


def apollo_torch(m: int, n: int, rank: int, weight_dtype: torch.dtype = torch.bfloat16,
                 *, weight_decay: bool = True) -> Traffic:
    """apollo-torch's APOLLOAdamW.step (channel scale), one Access per torch kernel."""
    full, low, basis, own, limiter, decay = _peer_sizes(m, n, rank, weight_dtype, weight_decay)
    return Traffic("apollo-torch", (
        *_peer_adam(low, basis, full), *_peer_factor(low, own),
        Access("S = G × φ (m×n)", full + own, full), *limiter,
        Access("S *= sqrt(scale) (m×n)", full, full),
        Access("p.add_(S, alpha=-step)", 2 * full, full), *decay))


def fused_triton_full_rank(m: int, n: int, rank: int, mode: str,
                           weight_dtype: torch.dtype = torch.bfloat16,
                           state_dtype: torch.dtype = torch.float32,
                           proj_dtype: torch.dtype | None = None, block_r: int = 64) -> Traffic:
    """Our Triton Fira (mode "fira") or APOLLO ("apollo", its basis generated in fp32) step
    (module docstring); ``block_r``: launch A's rank tile (the line sums are per tile)."""
    g = Geometry(m, n, rank)
    apollo = mode == "apollo"
    proj_dtype = torch.float32 if apollo else (proj_dtype or weight_dtype)
    own = max(m, n)  # own-lines: rows (right) or columns (left)
    low32, basis = 4 * g.low_rank, g.basis * _size(proj_dtype)
    r_tiles = -(-rank // block_r)
    sums = 4 * own * (2 * r_tiles + 1)
    ops = [*floor(m, n, rank, weight_dtype, state_dtype, proj_dtype).accesses,
           Access("G again (launch B)", g.full * _size(weight_dtype), 0),
           Access("line sums (ν, ρ per rank tile, γ): A writes, finalize reads", sums, sums),
           Access("coefficients per line: finalize writes, B reads",
                  4 * own * (1 if apollo else 2), 4 * own * (1 if apollo else 2))]
    if apollo:
        ops += [Access("random basis (fp32): generated", 0, basis),
                Access("N (fp32): launch A writes (unread)", 0, low32)]
    else:
        ops += [Access("P again (launch B)", basis, 0),
                Access("N (fp32): launch A writes, launch B reads", low32, low32),
                Access("R (fp32): launch A writes, quadratic and launch B read", 2 * low32,
                       low32),
                Access("Gram K = PPᵀ: P read again, K written, quadratic reads K",
                       basis + 4 * rank * rank, 4 * rank * rank),
                Access("quadratic per line: written, finalize reads", 4 * own, 4 * own)]
    launches = 3 if apollo else 5  # (random basis,) A, [Gram, quadratic,] finalize, B
    return Traffic(f"fused-triton-{mode}", tuple(ops), launches=launches)


def _q_galore_layout(m: int, n: int, rank: int, float_dtype: torch.dtype):
    g = Geometry(m, n, rank)
    b = _size(float_dtype)
    w_groups = -(-g.full // QUANT_GROUP) * b  # bytes of one per-group vector (scales or zeros)
    p_groups = -(-g.basis // QUANT_GROUP) * b
    absmax = -(-g.low_rank // QUANT_GROUP) * 4  # bitsandbytes: fp32 absmax per 256-block
    return g, b, w_groups, p_groups, absmax


def floor_q_galore(m: int, n: int, rank: int, float_dtype: torch.dtype = torch.bfloat16
                   ) -> Traffic:
    """The floor for q-galore-torch's storage: G read, INT8 W codes + scales/zeros read and
    written, uint8 P codes (one per byte) + scales/zeros read, 8-bit M, V + absmax read and
    written. Our Q-GaLore storage (packed P, M and V in the state dtype) is ``floor_q``."""
    g, b, w_groups, p_groups, absmax = _q_galore_layout(m, n, rank, float_dtype)
    return Traffic("floor-q-galore", (
        Access("read G", g.full * b, 0),
        Access("read+write W codes, scales, zeros", g.full + 2 * w_groups, g.full + 2 * w_groups),
        Access("read+write 8-bit M, V, absmax", 2 * g.low_rank + 2 * absmax,
               2 * g.low_rank + 2 * absmax),
        Access("read P codes, scales, zeros", g.basis + 2 * p_groups, 0),
    ))


def fused_cuda_q(m: int, n: int, rank: int, grad_dtype: torch.dtype = torch.bfloat16,
                 state_dtype: torch.dtype = torch.float32) -> Traffic:
    """Our CUDA step on INT8 weight codes with a packed INT4 basis (module docstring)."""
    g = Geometry(m, n, rank)
    w_groups = -(-g.full // QUANT_GROUP) * 4  # fp32 scales (or zeros), one per group
    p_codes = -(-g.basis // 2) + 2 * -(-g.basis // QUANT_GROUP) * 4
    mv = 2 * g.low_rank * _size(state_dtype)
    launch1_basis = (  # launch 1 multiplies an fp32 copy of the basis
        Access("read P codes, scales, zeros (dequantize_int4 for launch 1)", p_codes, 0),
        Access("fp32 copy of the basis: written, then read by launch 1", 4 * g.basis,
               4 * g.basis))
    return Traffic("fused-cuda-q", (
        Access("read G", g.full * _size(grad_dtype), 0),
        Access("read+write W codes, scales, zeros", g.full + 2 * w_groups, g.full + 2 * w_groups),
        Access("read+write M, V", mv, mv),
        *launch1_basis,
        Access("N workspace (fp32): launch 1 writes, pass 2 reads", 4 * g.low_rank,
               4 * g.low_rank),
        Access("P codes, scales, zeros again (pass 2 dequantizes on the fly)", p_codes, 0),
    ), launches=3)


def floor_q(m: int, n: int, rank: int, grad_dtype: torch.dtype = torch.bfloat16,
            state_dtype: torch.dtype = torch.float32) -> Traffic:
    """The floor of our Q-GaLore storage (DESIGN.md §4.3-§4.4, §5): G read, INT8 W codes and
    fp32 group scales/zeros read and written, M and V in ``state_dtype`` read and written, the
    packed INT4 basis (two codes per byte) and its fp32 group scales/zeros read once."""
    g = Geometry(m, n, rank)
    s = _size(state_dtype)
    w_groups = -(-g.full // QUANT_GROUP) * 4
    p_groups = -(-g.basis // QUANT_GROUP) * 4
    return Traffic("floor-q", (
        Access("read G", g.full * _size(grad_dtype), 0),
        Access("read+write W codes, scales, zeros", g.full + 2 * w_groups, g.full + 2 * w_groups),
        Access("read+write M, V", 2 * g.low_rank * s, 2 * g.low_rank * s),
        Access("read packed P codes, scales, zeros", -(-g.basis // 2) + 2 * p_groups, 0),
    ))


def fused_triton_q(m: int, n: int, rank: int, grad_dtype: torch.dtype = torch.bfloat16,
                   state_dtype: torch.dtype = torch.float32) -> Traffic:
    """Our Triton two-launch step on INT8 W and a packed INT4 P (module docstring)."""
    g = Geometry(m, n, rank)
    base = floor_q(m, n, rank, grad_dtype, state_dtype).accesses
    p_bytes = base[-1].read
    return Traffic("fused-triton-q", (
        *base,
        Access("N workspace (fp32): launch A writes, launch B reads", 4 * g.low_rank,
               4 * g.low_rank),
        Access("P again in launch B (L2 hits, charged once)", p_bytes, 0),
    ), launches=2)


def q_galore_torch(m: int, n: int, rank: int, float_dtype: torch.dtype = torch.bfloat16,
                   *, weight_decay: bool = True) -> Traffic:
    """q-galore-torch QGaLoreAdamW8bit.step on a QGaLoreLinear (INT8 W, float_grad in
    ``float_dtype``), INT4 P stored one code per byte; one Access per torch kernel."""
    g, b, w_groups, p_groups, absmax = _q_galore_layout(m, n, rank, float_dtype)
    full, low, basis = g.full * b, g.low_rank * b, g.basis * b
    codes, bool_full = g.full, g.full  # uint8 codes and torch.bool masks: 1 byte per element

    def dequantize_p(when: str) -> list[Access]:
        return [
            Access(f"{when}: P codes.to(dtype)", g.basis, basis),
            Access(f"{when}: P - zeros", basis + p_groups, basis),
            Access(f"{when}: scales * P", basis + p_groups, basis),
        ]

    ops = [
        Access("dequantize W: codes.to(dtype)", codes, full),
        Access("dequantize W: sub_(zeros)", full + w_groups, full),
        Access("dequantize W: mul_(scales)", full + w_groups, full),
        Access("p.data.to(dtype) (discarded copy)", codes, full),
        Access("float_weight.clone()", full, full),
        *dequantize_p("project"),
        Access("R = matmul(G, P) (project)", full + basis, low),
        Access("saved_data = p.data.clone()", full, full),
        Access("grad.clone() into p.data", low, low),
        Access("p.data.zero_()", 0, low),
        Access("bitsandbytes 8-bit blockwise Adam", 2 * low + 2 * g.low_rank + 2 * absmax,
               low + 2 * g.low_rank + 2 * absmax),
        *dequantize_p("project_back"),
        Access("back = matmul(U, P) (m×n)", low + basis, full),
        Access("back * scale (m×n)", full, full),
        Access("saved_data.add_(back)", 2 * full, full),
    ]
    if weight_decay:
        ops.append(Access("p.add_(p, alpha=-lr*wd) (decay pass)", full, full))
    ops += [
        Access("saved_data = p.data.clone()", full, full),
        Access("requantize: amax per group", full, w_groups),
        Access("requantize: amin per group", full, w_groups),
        # scales = (max - min).clamp / 255; zeros = (-round(min / scales)).clamp_: 7 small ops
        Access("requantize: scale/zero arithmetic (7 ops on group vectors)", 9 * w_groups,
               7 * w_groups),
        Access("requantize: isnan(scales) (group bool)", w_groups, w_groups // b),
        Access("requantize: .sum() of that mask", w_groups // b, 0),
        Access("requantize: isnan(w) (m×n bool)", full, bool_full),
        Access("requantize: .sum() of the mask", bool_full, 0),
        Access("requantize: w / scales", full + w_groups, full),
        Access("requantize: ceil", full, full),
        Access("requantize: floor", full, full),
        Access("requantize: probability = x - floor(x)", 2 * full, full),
        Access("requantize: rand_like (m×n)", 0, full),
        Access("requantize: random < probability (m×n bool)", 2 * full, bool_full),
        Access("requantize: where(mask, up, down)", bool_full + 2 * full, full),
        Access("requantize: + zeros", full + w_groups, full),
        Access("requantize: clamp", full, full),
        Access("requantize: .to(uint8)", full, codes),
    ]
    return Traffic("q-galore-torch", tuple(ops))


# --------------------------------------------------------------------------------------------
# the same count, measured: every aten kernel a torch function runs, with its tensors' bytes
# --------------------------------------------------------------------------------------------
_NO_READ = {"zero_", "fill_", "empty", "empty_like", "zeros", "zeros_like", "rand_like",
            "uniform_", "normal_", "randn_like"}


def measure_torch(fn, *, impl: str = "measured") -> Traffic:
    """Runs ``fn`` and records one Access per aten kernel it dispatches (views excluded).

    Reads are the distinct tensor arguments (an argument passed twice is counted once; the
    destination of copy_/zero_/fill_ is not read); writes are the outputs, including tensors
    mutated in place. It checks the hand-written lists above against what a peer's step really
    executes (tests/test_bench_harness.py).
    """
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    accesses: list[Access] = []

    def nbytes(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            if func.namespace != "aten" or func.is_view or func._schema.name in ("aten::lift_fresh", "aten::detach",
                                                     "aten::_local_scalar_dense"):
                return out
            name = func._schema.name.removeprefix("aten::")
            inputs = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
            mutated = [inputs[0]] if name.endswith("_") and inputs else []
            skip_first = name in _NO_READ or name == "copy_"
            seen, read = set(), 0
            for i, t in enumerate(inputs):
                if (i == 0 and skip_first) or t.dim() == 0:  # 0-d: a scalar on its way in
                    continue
                key = (t.data_ptr(), tuple(t.shape), t.dtype)
                if key not in seen:
                    seen.add(key)
                    read += nbytes(t)
            outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
            written = sum(nbytes(o) for o in (mutated or outs) if o.dim() > 0)
            accesses.append(Access(name, read, written))
            return out

    with Recorder():
        fn()
    return Traffic(impl, tuple(accesses))


def implementations(m: int, n: int, rank: int, weight_dtype: torch.dtype = torch.bfloat16,
                    state_dtype: torch.dtype = torch.float32, *, weight_decay: bool = True,
                    l2_bytes: int = SMALLEST_L2) -> list[tuple[Traffic, Traffic]]:
    """(traffic, the floor it is judged against) for every modelled implementation."""
    dense_floor = floor(m, n, rank, weight_dtype, state_dtype)
    q_floor = floor_q_galore(m, n, rank, weight_dtype)
    pairs = [(dense_floor, dense_floor)]
    if rank <= ONE_PASS_MAX_RANK and state_dtype != torch.bfloat16:  # bf16 moments: 2 launches
        pairs.append((fused(m, n, rank, weight_dtype, state_dtype, l2_bytes=l2_bytes,
                            impl="fused-triton-onepass"), dense_floor))
    pairs.append((floor_plus_n(m, n, rank, weight_dtype, state_dtype), dense_floor))
    pairs.append((fused_triton_2launch(m, n, rank, weight_dtype, state_dtype), dense_floor))
    pairs.append((fused_cuda(m, n, rank, weight_dtype, state_dtype), dense_floor))
    # galore-torch keeps M, V in the gradient's dtype: judge it against the floor of that layout.
    pairs.append((galore_torch(m, n, rank, weight_dtype, weight_decay=weight_decay),
                  floor(m, n, rank, weight_dtype, weight_dtype)))
    ours_q_floor = floor_q(m, n, rank, weight_dtype, state_dtype)
    pairs.append((ours_q_floor, ours_q_floor))
    pairs.append((fused_triton_q(m, n, rank, weight_dtype, state_dtype), ours_q_floor))
    pairs.append((fused_cuda_q(m, n, rank, weight_dtype, state_dtype), ours_q_floor))
    pairs.append((q_floor, q_floor))
    pairs.append((q_galore_torch(m, n, rank, weight_dtype, weight_decay=weight_decay), q_floor))
    for mode in ("fira", "apollo"):  # Fira and APOLLO: judged against the dense floor
        pairs.append((fused_triton_full_rank(m, n, rank, mode, weight_dtype, state_dtype),
                      dense_floor))
    pairs.append((fira_torch(m, n, rank, weight_dtype, weight_decay=weight_decay), dense_floor))
    pairs.append((apollo_torch(m, n, rank, weight_dtype, weight_decay=weight_decay),
                  dense_floor))
    return pairs


def _row(label: str, m: object, n: object, rank: int, impl: str, kernels: int, total: float,
         judged_total: float) -> dict[str, object]:
    row: dict[str, object] = {"shape": label, "m": m, "n": n, "rank": rank, "impl": impl,
                              "kernels": "" if impl.startswith("floor") else kernels,
                              "MB": round(total / 1e6, 2),
                              "vs_floor": round(total / judged_total, 3),
                              "ran_on_gpu": "bound" if impl.startswith("floor")
                              else RAN_ON_GPU.get(impl, "no")}
    for device, (bandwidth, _) in DEVICES.items():
        row[f"pred_ms@{device}"] = round(total / bandwidth * 1e3, 4)
    return row


def rows_for_shape(m: int, n: int, rank: int, weight_dtype: torch.dtype = torch.bfloat16,
                   state_dtype: torch.dtype = torch.float32, *, weight_decay: bool = True
                   ) -> list[dict[str, object]]:
    """One table row per implementation: MB, kernels, ratio to its floor, predicted ms."""
    return [_row(f"{m}x{n}", m, n, rank, t.impl, t.kernels, t.total, f.total)
            for t, f in implementations(m, n, rank, weight_dtype, state_dtype,
                                        weight_decay=weight_decay)]


def model_rows(names: Sequence[str], rank: int | None = None,
               weight_dtype: torch.dtype = torch.bfloat16,
               state_dtype: torch.dtype = torch.float32, *, weight_decay: bool = True
               ) -> list[dict[str, object]]:
    """Rows for each distinct Linear shape of the models, then for all their Linear weights
    (every layer) together: an implementation gets that row only if it runs at every shape
    (the one-pass kernel stops at r = ONE_PASS_MAX_RANK). The rank is capped at min(m, n) per
    shape."""
    rows: list[dict[str, object]] = []
    for name in names:
        cfg = model(name)
        r = rank or cfg.rank
        counts: dict[tuple[int, int], int] = {}
        for shape in cfg.linear_shapes().values():
            counts[shape] = counts.get(shape, 0) + cfg.layers
        totals: dict[str, list[float]] = {}
        for (m, n), count in counts.items():
            rr = min(r, m, n)
            for t, f in implementations(m, n, rr, weight_dtype, state_dtype,
                                        weight_decay=weight_decay):
                rows.append({"model": cfg.name, **_row(f"{m}x{n}", m, n, rr, t.impl, t.kernels,
                                                       t.total, f.total)})
                acc = totals.setdefault(t.impl, [0, 0.0, 0.0, 0])
                acc[0] += count * t.kernels
                acc[1] += count * t.total
                acc[2] += count * f.total
                acc[3] += 1
        for impl, (kernels, total, judged_total, shapes) in totals.items():
            if shapes < len(counts):
                continue
            rows.append({"model": cfg.name, **_row(f"all Linear x{cfg.layers} layers", "", "", r,
                                                   impl, kernels, total, judged_total)})
    return rows


COLUMNS = ["model", "shape", "rank", "impl", "kernels", "MB", "vs_floor", *(
    f"pred_ms@{d}" for d in DEVICES), "ran_on_gpu"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="*", default=list(MODELS),
                        help="model sizes (default: all)")
    parser.add_argument("--rank", type=int, default=None,
                        help="rank (default: each model's recipe rank)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="bf16", help="W and G dtype")
    parser.add_argument("--state-dtype", choices=("fp32", "bf16"), default="fp32",
                        help="M, V dtype of the floor and our fused step")
    parser.add_argument("--no-weight-decay", action="store_true")
    parser.add_argument("--shape", type=str, default=None,
                        help="one shape MxN instead of the model table, e.g. 4096x11008")
    parser.add_argument("--ops", action="store_true",
                        help="also list every kernel of every implementation for --shape")
    args = parser.parse_args(argv)
    wdt, sdt = DTYPE_NAMES[args.dtype], DTYPE_NAMES[args.state_dtype]
    if args.shape:
        m, n = (int(x) for x in args.shape.lower().split("x"))
        rank = args.rank or 256
        rows = rows_for_shape(m, n, rank, wdt, sdt, weight_decay=not args.no_weight_decay)
        print(format_table(rows, COLUMNS[1:]))
        if args.ops:
            for traffic, _ in implementations(m, n, rank, wdt, sdt,
                                              weight_decay=not args.no_weight_decay):
                print(f"\n{traffic.impl}: {traffic.total / 1e6:.2f} MB in {traffic.kernels} "
                      "kernels")
                print(format_table([{"op": a.op, "read MB": round(a.read / 1e6, 3),
                                     "write MB": round(a.write / 1e6, 3)}
                                    for a in traffic.accesses]))
        return 0
    rows = model_rows(args.model, args.rank, wdt, sdt, weight_decay=not args.no_weight_decay)
    print(f"DRAM bytes per optimizer step, W/G {args.dtype}, M/V {args.state_dtype} (ours), "
          f"weight decay {'off' if args.no_weight_decay else 'on'}; pred_ms = bytes / peak "
          "bandwidth: a model, not a measurement")
    print(format_table(rows, COLUMNS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
