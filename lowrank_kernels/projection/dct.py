"""DCT projection (SVD-free, DESIGN.md §4.5): r rows of the orthonormal DCT-II basis.

The rows are chosen by their alignment with the gradient (top-r column scores of G Cᵀ) by
``ops.dct_select``; only the r int32 indices are stored, and the fused step generates the basis
values on the fly. The dense basis, when needed (subspace overlap, tests), comes from
``ops.dct_basis``. For two index sets the overlap ‖P_oldᵀ P_new‖²_F / r is simply the fraction
of shared indices, because DCT rows are orthonormal.
"""

from __future__ import annotations

import torch

from lowrank_kernels.projection._requires import require_op
from lowrank_kernels.projection.base import Projector

FEATURE = "DCT projection (projection='dct')"


class DCTProjector(Projector):
    name = "dct"
    kind = "indices"

    def __init__(self, norm: str = "l1"):
        if norm not in ("l1", "l2"):
            raise ValueError(f"dct norm: expected 'l1' or 'l2', got {norm!r}")
        self.norm = norm

    def check_available(self) -> None:
        require_op("dct_select", FEATURE)
        require_op("dct_basis", FEATURE)

    def compute(self, grad, rank, *, generator, param_name):
        indices, _ = require_op("dct_select", FEATURE)(grad, rank, self.norm)
        return indices.to(torch.int32).contiguous()


def dct_dense_basis(indices: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """The fp32 basis of DCT indices in the fused-step layout (r×n right, m×r left)."""
    from lowrank_kernels import reference

    right = reference.is_right_side(m, n)
    rows = require_op("dct_basis", FEATURE)(n if right else m, indices).float()  # r×d
    return rows.contiguous() if right else rows.T.contiguous()


def index_overlap(old: torch.Tensor, new: torch.Tensor) -> float:
    """Fraction of shared indices = ‖P_oldᵀ P_new‖²_F / r for orthonormal DCT rows."""
    shared = torch.isin(new, old).sum()
    return float(shared) / new.numel()
