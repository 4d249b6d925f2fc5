"""Triton matmul with an INT8 weight dequantized in registers (Q-GaLore's INT8 linear layer).

    y  = x  @ W~ᵀ (+ b)      x: M×K, W codes: N×K (uint8), y: M×N          (forward)
    dx = dy @ W~             dy: M×N, dx: M×K                               (backward, input)
    W~[n, k] = s[g] · (q[n, k] − z[g]),  g = (n·K + k) // group_size  (DESIGN.md §4.4 layout)

Tiling: one program per BLOCK_M × BLOCK_N tile of the output; it walks the reduction dimension in
BLOCK_K steps, loading a tile of codes (1 B each) and the scales/zeros of the groups it touches,
dequantizing in registers and accumulating in fp32 with tl.dot. DRAM traffic: the codes once per
row of output tiles (no float copy of W exists anywhere), the activations once per column of
output tiles, the output once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _int8_matmul_kernel(a_ptr, codes_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr, M, N, K,
                        W_COLS, GROUP: tl.constexpr, TRANSPOSED_W: tl.constexpr,
                        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    """out[M, N] = a[M, K] @ B[K, N], B = W~ᵀ (TRANSPOSED_W, W is N×K) or W~ (W is K×N).
    W_COLS is the row length of the stored code matrix (for the group index)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + rm[:, None].to(tl.int64) * K + rk[None, :],
                    mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        if TRANSPOSED_W:  # B[k, n] = W[n, k]
            flat = rn[None, :].to(tl.int64) * W_COLS + rk[:, None]
        else:  # B[k, n] = W[k, n]
            flat = rk[:, None].to(tl.int64) * W_COLS + rn[None, :]
        mask_b = (rk[:, None] < K) & (rn[None, :] < N)
        q = tl.load(codes_ptr + flat, mask=mask_b, other=0).to(tl.float32)
        group = flat // GROUP
        s = tl.load(scales_ptr + group, mask=mask_b, other=0.0)
        z = tl.load(zeros_ptr + group, mask=mask_b, other=0.0)
        b = (s * (q - z)).to(a.dtype)
        acc += tl.dot(a, b)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def _blocks(device: torch.device) -> tuple[int, int, int]:
    return (64, 64, 64) if device.type == "cuda" else (16, 32, 32)


def int8_matmul(a: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                group_size: int, *, transposed_w: bool, bias: torch.Tensor | None = None
                ) -> torch.Tensor:
    """a (M×K) @ W~ᵀ (transposed_w, codes N×K) or a @ W~ (codes K×N), in a's dtype."""
    a = a.contiguous()
    m, k = a.shape
    n = codes.shape[0] if transposed_w else codes.shape[1]
    out = torch.empty((m, n), dtype=a.dtype, device=a.device)
    block_m, block_n, block_k = _blocks(a.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _int8_matmul_kernel[grid](
        a, codes, scales, zeros, bias if bias is not None else scales, out, m, n, k,
        codes.shape[1], GROUP=group_size, TRANSPOSED_W=transposed_w, HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return out
