"""Projector state: svd, rsvd, dct, random; INT4 storage; refresh policy (DESIGN.md §2).

A projection is described by a :class:`ProjectionSpec` (rank, projector, storage bits, refresh
policy) and its tensors live in the optimizer state (:mod:`lowrank_kernels.projection.state`).
"""

from __future__ import annotations

from lowrank_kernels.projection.base import Projector, subspace_overlap
from lowrank_kernels.projection.dct import DCTProjector
from lowrank_kernels.projection.random import GaussianProjector, RandomProjector
from lowrank_kernels.projection.refresh import (
    REFRESH_POLICIES,
    FixedGap,
    LazyRefresh,
    make_refresh_policy,
)
from lowrank_kernels.projection.rsvd import RandomizedSVDProjector, randomized_svd
from lowrank_kernels.projection.state import PROJ_BITS, ProjectionSpec
from lowrank_kernels.projection.svd import SVDFallbackWarning, SVDProjector

PROJECTORS = {
    "svd": SVDProjector,
    "rsvd": RandomizedSVDProjector,
    "dct": DCTProjector,
    "random": RandomProjector,
    "gaussian": GaussianProjector,
}


def make_projector(name: str) -> Projector:
    if name not in PROJECTORS:
        raise ValueError(f"projection: expected one of {tuple(PROJECTORS)}, got {name!r}")
    return PROJECTORS[name]()


__all__ = [
    "PROJECTORS",
    "PROJ_BITS",
    "REFRESH_POLICIES",
    "DCTProjector",
    "GaussianProjector",
    "FixedGap",
    "LazyRefresh",
    "ProjectionSpec",
    "Projector",
    "RandomProjector",
    "RandomizedSVDProjector",
    "SVDFallbackWarning",
    "SVDProjector",
    "make_projector",
    "make_refresh_policy",
    "randomized_svd",
    "subspace_overlap",
]
