"""The projection's part of a parameter's optimizer state: tensors only.

Keys written into ``optimizer.state[p]`` (all tensors, so ``state_dict()`` loads with
``torch.load(weights_only=True)`` and a resumed run continues bit for bit):

=================  ===============================================================================
proj               dense basis (r×n right / m×r left, the weight's dtype), packed INT4 basis
                   (uint8), or DCT indices (int32, length r); absent for the seeded Gaussian
                   basis (projection="gaussian", APOLLO's: :func:`seeded_basis`)
proj_scales/zeros  INT4 group scales and zero points (only with proj_bits=4)
proj_last_refresh  int64 scalar: step (before increment) of the last refresh, -1 before the first
proj_gap           int64 scalar: current refresh gap (changes under the lazy policy)
proj_refreshes     int64 scalar: number of refreshes so far (part of the random generator's seed)
proj_seed          int64 scalar: this parameter's seed (group seed mixed with its position)
proj_overlap       fp32 scalar: overlap ‖P_oldᵀP_new‖²_F/r measured at the last refresh (NaN if
                   not measured)
=================  ===============================================================================
"""

from __future__ import annotations

import dataclasses

import torch

from lowrank_kernels import reference
from lowrank_kernels.projection import int4
from lowrank_kernels.projection.base import (
    Projector,
    basis_dim,
    check_rank,
    columns_of,
    subspace_overlap,
    to_layout,
)
from lowrank_kernels.projection.dct import dct_dense_basis, index_overlap
from lowrank_kernels.projection.refresh import FixedGap, LazyRefresh

PROJ_BITS = (16, 4)
_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant (golden ratio): spreads nearby seeds apart


@dataclasses.dataclass(frozen=True)
class ProjectionSpec:
    """Everything the optimizer needs to project one parameter group's weights."""

    rank: int
    projector: Projector
    policy: FixedGap | LazyRefresh
    bits: int = 16
    group_size: int = 256

    def __post_init__(self):
        if self.bits not in PROJ_BITS:
            raise ValueError(f"proj_bits: expected one of {PROJ_BITS}, got {self.bits!r}")
        if self.bits == 4 and self.projector.kind != "dense":
            raise ValueError(f"proj_bits=4 quantizes a stored dense basis; projection="
                             f"{self.projector.name!r} stores "
                             f"{'indices' if self.projector.kind == 'indices' else 'a seed'}")
        if self.projector.kind == "seeded" and self.policy.measures_overlap:
            raise ValueError(f"refresh: projection={self.projector.name!r} draws bases "
                             "independently of the gradient (their overlap says nothing): use "
                             "refresh='fixed'")


def parameter_seed(group_seed: int, position: int) -> int:
    """A per-parameter seed: the group's seed mixed with the parameter's position in the
    optimizer, so two equal-shaped parameters draw different random bases."""
    return (group_seed * _MIX + position * 0xBF58476D1CE4E5B9 + 1) % (2**63)


def init_state_(state: dict, spec: ProjectionSpec, seed: int) -> None:
    state["proj_last_refresh"] = torch.tensor(-1, dtype=torch.int64)
    state["proj_gap"] = torch.tensor(spec.policy.gap, dtype=torch.int64)
    state["proj_refreshes"] = torch.tensor(0, dtype=torch.int64)
    state["proj_seed"] = torch.tensor(seed, dtype=torch.int64)
    state["proj_overlap"] = torch.tensor(float("nan"), dtype=torch.float32)


def refresh_due(state: dict, step_before: int, spec: ProjectionSpec) -> bool:
    last = int(state["proj_last_refresh"])
    # a fixed gap is read from the group, so editing update_proj_gap mid-run takes effect
    gap = int(state["proj_gap"]) if spec.policy.measures_overlap else spec.policy.gap
    return last < 0 or step_before - last >= gap


def _generator(state: dict, device: torch.device) -> torch.Generator:
    seed = (int(state["proj_seed"]) + int(state["proj_refreshes"]) * _MIX) % (2**63)
    return torch.Generator(device=device).manual_seed(seed)


def seeded_basis(state: dict, m: int, n: int, rank: int, device: torch.device) -> torch.Tensor:
    """The Gaussian basis of the last refresh, generated from the parameter's seed (its low 32
    bits) and refresh index by ``ops.random_basis``: r×n rows on the right side, their m×r
    transpose (a view) on the left."""
    from lowrank_kernels import ops  # ops -> _dispatch -> ... would cycle at import time

    refresh = int(state["proj_refreshes"]) - 1
    if refresh < 0:
        raise RuntimeError("a seeded basis exists only after the first refresh")
    rows = ops.random_basis(basis_dim(m, n), rank, int(state["proj_seed"]) % 2**32, refresh,
                            device=device)
    return rows if reference.is_right_side(m, n) else rows.T


def dense_basis(state: dict, m: int, n: int, spec: ProjectionSpec) -> torch.Tensor:
    """The fp32 basis the fused step applies (dequantized, or generated from indices or from
    the seed)."""
    if spec.projector.kind == "seeded":
        return seeded_basis(state, m, n, spec.rank, state["proj_seed"].device)
    proj = state["proj"]
    if proj.dtype == torch.int32:
        return dct_dense_basis(proj, m, n)
    if proj.dtype == torch.uint8:
        return int4.unpack_basis(proj, state["proj_scales"], state["proj_zeros"],
                                 int4.basis_shape(m, n, spec.rank), spec.group_size)
    return proj.float()


def refresh_(state: dict, grad: torch.Tensor, param: torch.Tensor, spec: ProjectionSpec,
             step_before: int, param_name: str) -> None:
    """Recomputes the projection from ``grad`` and advances the refresh counters."""
    m, n = param.shape
    check_rank(spec.rank, m, n, param_name)
    new = compute_projection(state, grad, spec, param_name)
    install_(state, new, param, spec, step_before, measure_overlap(state, new, m, n, spec))


def compute_projection(state: dict, grad: torch.Tensor, spec: ProjectionSpec, param_name: str
                       ) -> torch.Tensor:
    """The projector's output for ``grad`` (the whole m×n gradient), drawing from the generator
    that the refresh counters seed (so every process that holds the same counters draws the same
    random numbers)."""
    generator = _generator(state, grad.device) if spec.projector.needs_generator else None
    return spec.projector.compute(grad, spec.rank, generator=generator, param_name=param_name)


def measure_overlap(state: dict, new: torch.Tensor, m: int, n: int, spec: ProjectionSpec
                    ) -> float | None:
    """The overlap of the stored projection with ``new``, or None when the policy does not
    measure it or no projection was computed yet."""
    if not overlap_due(state, spec):
        return None
    if spec.projector.kind == "indices":
        return index_overlap(state["proj"], new)
    old = dense_basis(state, m, n, spec)
    if state["proj"].dtype == torch.uint8:
        # INT4 rounding leaves the columns slightly off orthonormal (the overlap could exceed 1):
        # measure the subspace they span
        old = to_layout(torch.linalg.qr(columns_of(old, m, n)).Q, m, n)
    return subspace_overlap(old, new, m, n)


def overlap_due(state: dict, spec: ProjectionSpec) -> bool:
    """Whether a refresh now measures the overlap: the policy uses it and a computed projection
    exists (proj may exist before the first refresh: zeros from allocate_)."""
    return spec.policy.measures_overlap and int(state["proj_last_refresh"]) >= 0


def install_(state: dict, new: torch.Tensor, param: torch.Tensor, spec: ProjectionSpec,
             step_before: int, overlap: float | None) -> None:
    """Stores a computed projection (``new``, as the projector returned it) and advances the
    refresh counters; ``overlap`` (from :func:`measure_overlap`) steers the lazy policy's gap."""
    if overlap is not None:
        state["proj_overlap"].fill_(overlap)
        state["proj_gap"].fill_(spec.policy.next_gap(int(state["proj_gap"]), overlap))
    elif not spec.policy.measures_overlap:
        state["proj_gap"].fill_(spec.policy.gap)
    _store_(state, new, param, spec)
    state["proj_last_refresh"].fill_(step_before)
    state["proj_refreshes"].add_(1)


def _store_(state: dict, new: torch.Tensor, param: torch.Tensor, spec: ProjectionSpec) -> None:
    """Puts a projector's output into the state in its storage form (the only place that
    decides what the projection state holds, for refreshes and for :func:`allocate_`)."""
    if spec.projector.kind == "seeded":
        return  # the seed and the refresh count are the basis
    if spec.projector.kind == "indices":
        state["proj"] = new
    elif spec.bits == 4:
        state["proj"], state["proj_scales"], state["proj_zeros"] = int4.pack_basis(
            new, spec.group_size)
    else:
        # galore-torch keeps the basis in the gradient's dtype; ours follows the weight's dtype
        # (fp32 for fp32 or INT8 weights), which is the same in ordinary (non-AMP) training.
        dtype = param.dtype if param.is_floating_point() else torch.float32
        state["proj"] = new.to(dtype).contiguous()


def allocate_(state: dict, param: torch.Tensor, spec: ProjectionSpec) -> None:
    """Allocates the projection storage of ``param`` without computing a projection: the
    projector's declared output (:meth:`Projector.empty`, zeros) stored as a refresh would store
    it. The refresh counters are left alone, so the first step still refreshes. Needs no
    gradient and runs on the meta device (memory accounting without an SVD)."""
    m, n = param.shape
    _store_(state, spec.projector.empty(m, n, spec.rank, param.device), param, spec)


def step_args(state: dict, spec: ProjectionSpec, param: torch.Tensor | None = None) -> dict:
    """The projection arguments of ``ops.fused_galore_step`` for this state (a seeded basis is
    generated here, on ``param``'s device)."""
    if spec.projector.kind == "seeded":
        if param is None:
            raise ValueError(f"projection={spec.projector.name!r}: the step generates the basis "
                             "and needs the parameter (sharded weights are not supported)")
        basis = seeded_basis(state, *param.shape, spec.rank, param.device)
        # in the weight's dtype, as a stored dense basis is (_store_): the same kernel path
        dtype = param.dtype if param.is_floating_point() else torch.float32
        return {"proj": basis.to(dtype)}
    args = {"proj": state["proj"]}
    if state["proj"].dtype == torch.uint8:
        args.update(proj_scales=state["proj_scales"], proj_zeros=state["proj_zeros"],
                    proj_group_size=spec.group_size)
    return args


def moment_scales(state: dict) -> dict:
    """The block-scale arguments of ``ops.fused_galore_step`` for a projected state whose moments
    are 8-bit codes (``exp_avg_scales``, ``exp_avg_sq_scales``; only the latter under AdaGrad);
    empty for fp32/bf16 moments. Here beside :func:`step_args`, so that the optimizer and the
    sharded step (lowrank_kernels.distributed) build the same call."""
    return {key: state[key] for key in ("exp_avg_scales", "exp_avg_sq_scales") if key in state}
