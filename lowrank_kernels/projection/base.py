"""What a projector is, and the layout conventions every projector follows.

A projector turns a gradient G (m×n) into a projection in the layout the fused step consumes
(DESIGN.md §4.1): right side (m ≥ n) a basis Q of shape r×n, left side (m < n) a basis P of shape
m×r. Projectors hold configuration only; every tensor they produce lives in the optimizer's state
(see ``lowrank_kernels.projection.storage``), so ``optimizer.state_dict()`` is tensors and
Python scalars only.
"""

from __future__ import annotations

import torch

from lowrank_kernels import reference


def basis_dim(m: int, n: int) -> int:
    """The dimension the basis spans: n for a right projection, m for a left one."""
    return n if reference.is_right_side(m, n) else m


def to_layout(columns: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """Turns a d×r matrix of orthonormal columns into the fused-step layout (r×n or m×r)."""
    return columns.T.contiguous() if reference.is_right_side(m, n) else columns.contiguous()


def columns_of(basis: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """Inverse of :func:`to_layout`: the basis as d×r columns (a view)."""
    return basis.T if reference.is_right_side(m, n) else basis


def check_rank(rank: int, m: int, n: int, name: str) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool):
        raise TypeError(f"rank of {name}: expected an int, got {rank!r}")
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank of {name}: expected 1 <= rank <= min(m, n) = {min(m, n)} for a "
                         f"{m}×{n} weight, got {rank} (ranks are never silently truncated)")


def subspace_overlap(old: torch.Tensor, new: torch.Tensor, m: int, n: int) -> float:
    """‖P_oldᵀ P_new‖²_F / r ∈ [0, 1] for two rank-r bases in the fused-step layout.

    1 means the same subspace, 0 orthogonal subspaces; flipping the sign of (or rotating) basis
    vectors inside the subspace leaves it unchanged, unlike a cosine of the top vectors.
    """
    a = columns_of(old.float(), m, n)
    b = columns_of(new.float(), m, n)
    return float((a.T @ b).square().sum()) / b.shape[1]


class Projector:
    """Computes a rank-r projection of a gradient. Subclasses set ``name`` and implement
    :meth:`compute`; ``kind`` says what :meth:`compute` returns: ``"dense"`` (an orthonormal fp32
    basis in the fused-step layout) or ``"indices"`` (int32 DCT indices, length r)."""

    name = "base"
    kind = "dense"
    needs_generator = False
    # False when compute() reads only the gradient's shape and device (a sharded step then
    # computes the projection on every rank without gathering the gradient)
    needs_gradient = True

    def compute(self, grad: torch.Tensor, rank: int, *, generator: torch.Generator | None,
                param_name: str) -> torch.Tensor:
        raise NotImplementedError

    def empty(self, m: int, n: int, rank: int, device: torch.device) -> torch.Tensor:
        """A zero tensor of the shape and dtype :meth:`compute` returns for an m×n gradient,
        computed from nothing (no gradient, works on the meta device): what
        ``LowRankAdamW.init_state`` stores before the first refresh."""
        if self.kind == "indices":
            return torch.zeros(rank, dtype=torch.int32, device=device)
        right = reference.is_right_side(m, n)
        return torch.zeros((rank, n) if right else (m, rank), dtype=torch.float32, device=device)
