"""Fake (meta) kernels and autograd formulas of the lowrank ops, registered when the extension
has defined the schemas.

Each fake validates with the op's check (lowrank_kernels._checks, whose size conditions go through
torch._check_value, so dynamic shapes are not specialised) and returns empties of the op's output
shapes: ``torch.compile(fullgraph=True)`` traces through every op, and ``torch.library.opcheck``
passes. project and project_back are differentiable in both arguments.
"""

from __future__ import annotations

import torch

from lowrank_kernels import _checks, _extension, reference


def _group_params(x: torch.Tensor, numel: int, group_size: int):
    groups = reference.num_groups(numel, group_size)
    return (x.new_empty((groups,), dtype=torch.float32),
            x.new_empty((groups,), dtype=torch.float32))


def _project_fake(grad, proj):
    rank = _checks.check_project(grad, proj)
    return grad.new_empty(_checks.low_rank_shape(*grad.shape, rank), dtype=torch.float32)


def _project_back_fake(low_rank, proj, m, n, scale):
    _checks.check_project_back(low_rank, proj, m, n, scale)
    return low_rank.new_empty((m, n), dtype=torch.float32)


def _fused_galore_step_fake(*args, **kwargs):
    _checks.check_fused_galore_step(*args, **kwargs)


def _fused_gradnorm_step_fake(*args, **kwargs):
    _checks.check_fused_gradnorm_step(*args, **kwargs)


def _philox_uniform_fake(seed, offsets):
    _checks.check_philox_uniform(seed, offsets)
    return offsets.new_empty(offsets.shape, dtype=torch.float32)


def _quantize_int4_fake(x, group_size=256):
    _checks.check_quantize_int4(x, group_size)
    packed = x.new_empty(((x.numel() + 1) // 2,), dtype=torch.uint8)
    return (packed, *_group_params(x, x.numel(), group_size))


def _dequantize_int4_fake(packed, scales, zeros, shape, group_size=256):
    _checks.check_dequantize_int4(packed, scales, zeros, shape, group_size)
    return packed.new_empty(list(shape), dtype=torch.float32)


def _quantize_int8_fake(x, group_size=256, stochastic=False, seed=0):
    _checks.check_quantize_int8(x, group_size, stochastic, seed)
    codes = x.new_empty(x.shape, dtype=torch.uint8)
    return (codes, *_group_params(x, x.numel(), group_size))


def _dequantize_int8_fake(codes, scales, zeros, group_size=256):
    _checks.check_dequantize_int8(codes, scales, zeros, group_size)
    return codes.new_empty(codes.shape, dtype=torch.float32)


def _dct_select_fake(grad, rank, norm=1, *, method="auto"):
    _checks.check_dct_select(grad, rank, norm, method=method)
    return (grad.new_empty((rank,), dtype=torch.int32),
            grad.new_empty(_checks.low_rank_shape(*grad.shape, rank), dtype=torch.float32))


def _dct_basis_fake(d, indices):
    rank = _checks.check_dct_basis(d, indices)
    return indices.new_empty((rank, d), dtype=torch.float32)


def _random_basis_fake(d, rank, seed, refresh, *, device=None):
    _checks.check_random_basis(d, rank, seed, refresh)
    return torch.empty((rank, d), dtype=torch.float32, device=device)


FAKES = {
    "project": _project_fake,
    "project_back": _project_back_fake,
    "fused_galore_step": _fused_galore_step_fake,
    "fused_gradnorm_step": _fused_gradnorm_step_fake,
    "philox_uniform": _philox_uniform_fake,
    "quantize_int4": _quantize_int4_fake,
    "dequantize_int4": _dequantize_int4_fake,
    "quantize_int8": _quantize_int8_fake,
    "dequantize_int8": _dequantize_int8_fake,
    "dct_select": _dct_select_fake,
    "dct_basis": _dct_basis_fake,
    "random_basis": _random_basis_fake,
}


# --------------------------------------------------------------------------------------------
# autograd of project / project_back
# --------------------------------------------------------------------------------------------
def _setup_project(ctx, inputs, output):
    grad, proj = inputs
    ctx.save_for_backward(grad, proj)


def _project_backward(ctx, d_low_rank):
    grad, proj = ctx.saved_tensors
    m, n = grad.shape
    d_grad = d_proj = None
    if ctx.needs_input_grad[0]:
        d_grad = torch.ops.lowrank.project_back(d_low_rank, proj, m, n, 1.0).to(grad.dtype)
    if ctx.needs_input_grad[1]:
        g32 = grad.float()
        # right: R = G Qᵀ -> dQ = dRᵀ G;  left: R = Pᵀ G -> dP = G dRᵀ
        d_proj = d_low_rank.T @ g32 if reference.is_right_side(m, n) else g32 @ d_low_rank.T
        d_proj = d_proj.to(proj.dtype)
    return d_grad, d_proj


def _setup_project_back(ctx, inputs, output):
    low_rank, proj, m, n, scale = inputs
    ctx.save_for_backward(low_rank, proj)
    ctx.shape, ctx.scale = (m, n), scale


def _project_back_backward(ctx, d_out):
    low_rank, proj = ctx.saved_tensors
    m, n = ctx.shape
    d_low_rank = d_proj = None
    if ctx.needs_input_grad[0]:
        d_low_rank = (torch.ops.lowrank.project(d_out, proj) * ctx.scale).to(low_rank.dtype)
    if ctx.needs_input_grad[1]:
        n32 = low_rank.float() * ctx.scale
        # right: out = s·N Q -> dQ = s·Nᵀ dOut;  left: out = s·P N -> dP = s·dOut Nᵀ
        d_proj = n32.T @ d_out.float() if reference.is_right_side(m, n) else d_out.float() @ n32.T
        d_proj = d_proj.to(proj.dtype)
    return d_low_rank, d_proj, None, None, None


def register() -> bool:
    """Registers the fakes and the autograd formulas (once, at import); needs the schemas."""
    if not _extension.AVAILABLE:
        return False
    for op, fake in FAKES.items():
        torch.library.register_fake(f"lowrank::{op}", fake)
    torch.library.register_autograd("lowrank::project", _project_backward,
                                    setup_context=_setup_project)
    torch.library.register_autograd("lowrank::project_back", _project_back_backward,
                                    setup_context=_setup_project_back)
    return True
