"""Truncated-SVD projection (GaLore): the top-r singular vectors of the current gradient.

The SVD runs in fp32 on the gradient as ``galore_torch`` computes it
(``torch.linalg.svd(G.float(), full_matrices=False)``), so both packages obtain the same basis from
the same gradient. LAPACK/cuSOLVER occasionally fail to converge on ill-conditioned gradients
(GaLore#58); instead of aborting training the projector then warns, naming the parameter, and
computes the same subspace from the eigendecomposition of the smaller Gram matrix in fp64, and if
that fails too, by randomized SVD.
"""

from __future__ import annotations

import warnings

import torch

from lowrank_kernels import reference
from lowrank_kernels.projection.base import Projector, to_layout
from lowrank_kernels.projection.rsvd import randomized_svd


class SVDFallbackWarning(RuntimeWarning):
    """The fp32 SVD of a gradient failed and a fallback computed the basis."""


def _check_finite(grad: torch.Tensor, param_name: str) -> None:
    if not bool(torch.isfinite(grad).all()):
        raise ValueError(f"gradient of {param_name}: contains NaN or Inf, so no projection can be "
                         "computed from it (skip this step, e.g. with a GradScaler)")


def top_singular_columns(grad32: torch.Tensor, rank: int, *, param_name: str,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """The d×r top singular vectors on the projected side (right: of Gᵀ, i.e. Vh[:r]ᵀ; left: U).

    Tries fp32 ``torch.linalg.svd``; on failure, fp64 ``eigh`` of the d×d Gram matrix; then
    randomized SVD. Each fallback emits an :class:`SVDFallbackWarning` naming ``param_name``."""
    m, n = grad32.shape
    right = reference.is_right_side(m, n)
    try:
        u, _, vh = torch.linalg.svd(grad32, full_matrices=False)
        if not (bool(torch.isfinite(u).all()) and bool(torch.isfinite(vh).all())):
            raise torch.linalg.LinAlgError("non-finite singular vectors")
        return vh[:rank].T if right else u[:, :rank]
    except (torch.linalg.LinAlgError, RuntimeError) as exc:
        warnings.warn(f"SVD of the gradient of {param_name} ({m}×{n}) failed ({exc}); "
                      "falling back to eigh of its Gram matrix in fp64", SVDFallbackWarning,
                      stacklevel=3)
    try:
        g64 = grad32.double()
        gram = g64.T @ g64 if right else g64 @ g64.T  # d×d, eigenvectors = singular vectors
        _, vecs = torch.linalg.eigh(gram)
        return vecs[:, -rank:].flip(-1).float().contiguous()  # eigh sorts ascending
    except (torch.linalg.LinAlgError, RuntimeError) as exc:
        warnings.warn(f"eigh fallback for {param_name} failed too ({exc}); using randomized SVD",
                      SVDFallbackWarning, stacklevel=3)
    u, _, vh = randomized_svd(grad32, rank, generator=generator)
    return vh.T if right else u


class SVDProjector(Projector):
    """GaLore's basis: top-r singular vectors of G (fp32 SVD with fallbacks)."""

    name = "svd"
    needs_generator = True  # only the last-resort randomized fallback draws from it

    def compute(self, grad, rank, *, generator, param_name):
        g = grad.float()
        _check_finite(g, param_name)
        m, n = g.shape
        return to_layout(top_singular_columns(g, rank, param_name=param_name,
                                              generator=generator), m, n)
