"""DCT projection (SVD-free, DESIGN.md §4.5): r rows of the orthonormal DCT-II basis.

The rows are chosen by their alignment with the gradient (top-r ℓ1 or ℓ2 column scores of G Cᵀ on
the right, row scores of C G on the left) by ``ops.dct_select``; only the r int32 indices are
stored, and ``fused_galore_step`` takes them as its ``proj`` and generates the basis values
itself. The dense basis, when needed (subspace overlap, tests), comes from ``ops.dct_basis``.
For two index sets the overlap ‖P_oldᵀ P_new‖²_F / r is simply the fraction of shared indices,
because DCT rows are orthonormal.
"""

from __future__ import annotations

import torch

from lowrank_kernels import ops, reference
from lowrank_kernels.projection.base import Projector

NORMS = {"l1": 1, "l2": 2}


class DCTProjector(Projector):
    name = "dct"
    kind = "indices"

    def __init__(self, norm: str = "l1"):
        if norm not in NORMS:
            raise ValueError(f"dct norm: expected one of {tuple(NORMS)}, got {norm!r}")
        self.norm = norm

    def compute(self, grad, rank, *, generator, param_name):
        # dct_select also returns G projected onto the chosen rows; the fused step recomputes that
        # projection in its own pass, so only the indices are kept
        indices, _ = ops.dct_select(grad, rank, NORMS[self.norm])
        return indices.contiguous()


def dct_dense_basis(indices: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """The fp32 basis of DCT indices in the fused-step layout (r×n right, m×r left)."""
    right = reference.is_right_side(m, n)
    rows = ops.dct_basis(n if right else m, indices)  # r×d
    return rows.contiguous() if right else rows.T.contiguous()


def index_overlap(old: torch.Tensor, new: torch.Tensor) -> float:
    """Fraction of shared indices = ‖P_oldᵀ P_new‖²_F / r for orthonormal DCT rows."""
    shared = torch.isin(new, old).sum()
    return float(shared) / new.numel()
