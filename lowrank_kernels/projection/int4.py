"""INT4 storage of a dense basis (Q-GaLore, DESIGN.md §4.3).

The basis is quantized once per refresh by ``ops.quantize_int4`` (asymmetric 4-bit, groups of
``group_size`` consecutive row-major elements, two codes per byte, a 1-D uint8 buffer) and stays
packed in the optimizer state; ``fused_galore_step`` takes the packed buffer as its ``proj`` (with
``proj_scales``/``proj_zeros``) and dequantizes inside its projection GEMMs.
"""

from __future__ import annotations

import torch

from lowrank_kernels import ops, reference


def basis_shape(m: int, n: int, rank: int) -> tuple[int, int]:
    """Logical shape of the packed basis of an m×n weight: r×n (right) or m×r (left)."""
    return tuple(reference.quantized_basis_shape(m, n, rank))


def pack_basis(basis: torch.Tensor, group_size: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed uint8 [ceil(numel/2)], scales, zeros) of a basis in the fused-step layout."""
    return ops.quantize_int4(basis.float().contiguous(), group_size)


def unpack_basis(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 shape: tuple[int, int], group_size: int) -> torch.Tensor:
    """The fp32 basis that the fused step sees for a packed one."""
    return ops.dequantize_int4(packed, scales, zeros, list(shape), group_size)
