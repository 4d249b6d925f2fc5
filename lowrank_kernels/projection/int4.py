"""INT4 storage of a dense basis (Q-GaLore, DESIGN.md §4.3).

The basis is quantized once per refresh by ``ops.quantize_int4`` (asymmetric 4-bit, groups of
``group_size`` consecutive row-major elements, two codes per byte) and stays packed in the
optimizer state; the fused step dequantizes inside its projection GEMMs.
"""

from __future__ import annotations

import torch

from lowrank_kernels.projection._requires import require_op

FEATURE = "INT4 projection storage (proj_bits=4)"


def check_available() -> None:
    require_op("quantize_int4", FEATURE)
    require_op("dequantize_int4", FEATURE)


def pack_basis(basis: torch.Tensor, group_size: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed uint8, scales, zeros) of an fp32 basis."""
    return require_op("quantize_int4", FEATURE)(basis.float().contiguous(), group_size)


def unpack_basis(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 shape: tuple[int, int], group_size: int) -> torch.Tensor:
    """The fp32 basis that the fused step sees for a packed one."""
    out = require_op("dequantize_int4", FEATURE)(packed, scales, zeros, group_size)
    # an odd element count leaves a padding nibble in the last byte: keep the real elements
    return out.float().reshape(-1)[: shape[0] * shape[1]].reshape(shape)
