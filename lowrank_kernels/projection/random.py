"""Random projection: an orthonormal basis drawn independently of the gradient (SVD-free).

Gaussian columns orthonormalised by QR, drawn from the optimizer's per-parameter generator
(seeded by the group's ``seed``, the parameter's position and the refresh count), so the basis is
reproducible and a resumed run draws the same one. Orthonormal rather than APOLLO's N(0, 1/r)
so that back(project(G)) is an orthogonal projection of G, as with the SVD basis.
"""

from __future__ import annotations

import torch

from lowrank_kernels.projection.base import Projector, basis_dim, to_layout


class RandomProjector(Projector):
    name = "random"
    needs_generator = True
    needs_gradient = False

    def compute(self, grad, rank, *, generator, param_name):
        m, n = grad.shape
        gaussian = torch.randn(basis_dim(m, n), rank, generator=generator, device=grad.device,
                               dtype=torch.float32)
        q, _ = torch.linalg.qr(gaussian)
        return to_layout(q, m, n)


class GaussianProjector(Projector):
    """APOLLO's random projection (DESIGN.md §4.7): N(0, 1/r) rows, not orthonormalised,
    regenerated from (the parameter's seed, its refresh count) by ``ops.random_basis`` at every
    step (:func:`lowrank_kernels.projection.state.seeded_basis`). Nothing is stored: a refresh
    only advances the counter, so the state holds the seed and the count."""

    name = "gaussian"
    kind = "seeded"
    needs_gradient = False

    def compute(self, grad, rank, *, generator, param_name):
        return grad.new_empty(0)  # the basis is a function of the counters: nothing to store

    def empty(self, m: int, n: int, rank: int, device: torch.device) -> torch.Tensor:
        return torch.empty(0, device=device)
