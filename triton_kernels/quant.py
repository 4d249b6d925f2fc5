"""Triton kernels of the Q-GaLore formats (DESIGN.md §4.3-§4.4).

    philox_uniform   u[i] = tl.rand(seed, offsets[i])           (the stochastic-rounding stream)

Tiling: one program per BLOCK consecutive offsets. DRAM traffic: the offsets once (8 B) and u once
(4 B) per element; nothing else.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

PHILOX_BLOCK = 1024
# The interpreter pays per program, not per element: it runs CPU tensors in far fewer programs.
INTERPRETER_BLOCK = 65536


@triton.jit
def _philox_uniform_kernel(out_ptr, offsets_ptr, seed, numel, BLOCK: tl.constexpr):
    """out[i] = tl.rand(seed, offsets[i]) for i in this program's BLOCK."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < numel
    offsets = tl.load(offsets_ptr + idx, mask=mask, other=0)
    tl.store(out_ptr + idx, tl.rand(seed, offsets), mask=mask)


def philox_uniform(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """Launcher of :func:`_philox_uniform_kernel` (arguments checked by lowrank_kernels.ops)."""
    offsets = offsets.contiguous()
    out = torch.empty(offsets.shape, dtype=torch.float32, device=offsets.device)
    numel = offsets.numel()
    if numel:
        block = PHILOX_BLOCK if offsets.is_cuda else INTERPRETER_BLOCK
        grid = (triton.cdiv(numel, block),)
        _philox_uniform_kernel[grid](out, offsets, seed, numel, BLOCK=block)
    return out
