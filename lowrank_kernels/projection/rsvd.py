"""Randomized truncated SVD (Halko, Martinsson & Tropp 2011, Alg. 4.4 with power iterations).

Cost O(m·n·(r+p)) instead of the O(m·n·min(m, n)) of a full SVD: the projector to use when the
full SVD dominates the step time (GaLore#16). Randomness comes from a seeded generator held by the
optimizer, so a resumed run draws the same sketch.
"""

from __future__ import annotations

import torch

from lowrank_kernels import reference
from lowrank_kernels.projection.base import Projector, to_layout


def randomized_svd(a: torch.Tensor, rank: int, *, oversample: int = 8, power_iters: int = 2,
                   generator: torch.Generator | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Approximate top-``rank`` SVD of an fp32 matrix: U (m×r), S (r), Vh (r×n)."""
    m, n = a.shape
    sketch = min(rank + oversample, m, n)
    omega = torch.randn(n, sketch, generator=generator, device=a.device, dtype=a.dtype)
    q, _ = torch.linalg.qr(a @ omega)
    for _ in range(power_iters):  # re-orthonormalise each pass so small singular values survive
        z, _ = torch.linalg.qr(a.T @ q)
        q, _ = torch.linalg.qr(a @ z)
    u_small, s, vh = torch.linalg.svd(q.T @ a, full_matrices=False)
    return (q @ u_small)[:, :rank], s[:rank], vh[:rank]


class RandomizedSVDProjector(Projector):
    """Top-r singular subspace of G by randomized SVD (seeded per parameter and refresh)."""

    name = "rsvd"
    needs_generator = True

    def __init__(self, oversample: int = 8, power_iters: int = 2):
        self.oversample, self.power_iters = oversample, power_iters

    def compute(self, grad, rank, *, generator, param_name):
        from lowrank_kernels.projection.svd import _check_finite

        g = grad.float()
        _check_finite(g, param_name)
        m, n = g.shape
        u, _, vh = randomized_svd(g, rank, oversample=self.oversample,
                                  power_iters=self.power_iters, generator=generator)
        return to_layout(vh.T if reference.is_right_side(m, n) else u, m, n)
