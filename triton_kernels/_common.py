"""Pieces shared by the Triton fused_galore_step variants (fused_galore_step.py: one pass;
fused_galore_step_2d.py: two launches): the addressing of the two projection sides, the dot and
rounding helpers that also work around Triton 3.8 interpreter bugs, and the host Adam scalars."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

DEFAULT_NUM_SMS = 132  # H100 SXM; used when no GPU can be queried (interpreter, AOT)


@triton.jit
def _tile_offsets(offs_own, offs_other, stride, RIGHT: tl.constexpr):
    """Element offsets of an (owned, other) tile of a row-major matrix with row stride ``stride``
    whose rows are the owned axis on the right side and the other axis on the left side."""
    if RIGHT:
        return offs_own[:, None] * stride + offs_other[None, :]
    else:
        return offs_own[:, None] + offs_other[None, :] * stride


@triton.jit
def _dot(a, b, acc, INTERPRETED: tl.constexpr):
    """acc + a·b: tensor cores when both operands share a 16-bit type, else an exact fp32 dot.

    Triton's interpreter multiplies bfloat16 bit patterns in tl.dot (triton-lang/triton#11584,
    "not supported yet"), so there bfloat16 operands are widened first: products of bf16 values
    are exact in fp32, so this is the tensor-core arithmetic up to summation order."""
    if a.dtype != b.dtype or a.dtype == tl.float32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif INTERPRETED and a.dtype == tl.bfloat16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _round_to(x, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
    """fp32 ``x`` rounded to nearest even in ``dtype`` (what a cast does on the GPU).

    Triton's interpreter truncates fp32 -> bfloat16 casts, so there the rounding is done on the
    bits first and the cast then only drops zero bits."""
    if INTERPRETED and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _project_tile(G_ptr, Proj_ptr, offs_own, offs_r, own_mask, r_mask, LONG, stride_gm,
                  stride_projm, acc, RIGHT: tl.constexpr, BLOCK_LONG: tl.constexpr,
                  INDEX_64: tl.constexpr, INTERPRETED: tl.constexpr):
    """acc + Σ_long G[own, long]·basis[long, r]: a tile of R reduced over the whole long axis by
    one program (no split-K: the Adam epilogue that follows is nonlinear)."""
    for start in range(0, LONG, BLOCK_LONG):
        offs_long = start + tl.arange(0, BLOCK_LONG)
        if INDEX_64:
            offs_long = offs_long.to(tl.int64)
        long_mask = offs_long < LONG
        g = tl.load(G_ptr + _tile_offsets(offs_own, offs_long, stride_gm, RIGHT),
                    mask=own_mask[:, None] & long_mask[None, :], other=0.0)
        # the basis as a (long, r) tile: Qᵀ on the right, P on the left
        basis = tl.load(Proj_ptr + tl.trans(_tile_offsets(offs_r, offs_long, stride_projm, RIGHT)),
                        mask=long_mask[:, None] & r_mask[None, :], other=0.0)
        acc = _dot(g, basis, acc, INTERPRETED)
    return acc


@triton.jit
def _adam_tile(ExpAvg_ptr, ExpAvgSq_ptr, state_offs, state_mask, proj_low, beta1, beta2,
               one_minus_beta1, one_minus_beta2, eps, INTERPRETED: tl.constexpr):
    """Adam on one tile of M and V (fp32 arithmetic, one rounding on store); returns
    N = M/(√V+ε) in fp32 (masked-out entries are not meaningful)."""
    exp_avg = tl.load(ExpAvg_ptr + state_offs, mask=state_mask, other=0.0).to(tl.float32)
    exp_avg_sq = tl.load(ExpAvgSq_ptr + state_offs, mask=state_mask, other=0.0).to(tl.float32)
    exp_avg = beta1 * exp_avg + one_minus_beta1 * proj_low
    exp_avg_sq = beta2 * exp_avg_sq + one_minus_beta2 * proj_low * proj_low
    tl.store(ExpAvg_ptr + state_offs, _round_to(exp_avg, ExpAvg_ptr.dtype.element_ty, INTERPRETED),
             mask=state_mask)
    tl.store(ExpAvgSq_ptr + state_offs,
             _round_to(exp_avg_sq, ExpAvgSq_ptr.dtype.element_ty, INTERPRETED), mask=state_mask)
    return tl.div_rn(exp_avg, tl.sqrt_rn(exp_avg_sq) + eps)


def dot_kind(grad_dtype: torch.dtype, proj_dtype: torch.dtype) -> str:
    """'tc' when the projection dot runs on tensor cores, else 'fp32'."""
    return "tc" if grad_dtype == proj_dtype and grad_dtype != torch.float32 else "fp32"


def _round_to_fp32(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float64).to(torch.float32))


def adam_coeffs(lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                scale: float, step: int) -> dict[str, float]:
    """The per-step scalars of adam.h ``make_adam_coeffs``: computed in double (Python floats),
    rounded to fp32 once."""
    bias1 = 1.0 - math.pow(beta1, float(step))
    bias2 = 1.0 - math.pow(beta2, float(step))
    alpha_t = lr * math.sqrt(bias2) / bias1
    decay = 1.0 - lr * weight_decay
    coeffs = dict(beta1=beta1, beta2=beta2, one_minus_beta1=1.0 - beta1,
                  one_minus_beta2=1.0 - beta2, eps=eps, decay=decay,
                  update_scale=decay * alpha_t * scale)
    return {k: _round_to_fp32(v) for k, v in coeffs.items()}


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_NUM_SMS


def needs_index_64(*tensors: torch.Tensor) -> bool:
    """int32 offsets overflow past 2**31 elements in any one tensor."""
    return max(t.numel() for t in tensors) >= 2**31
