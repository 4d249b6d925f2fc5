"""Where the optimizer state of an FSDP2 parameter lives, and the local view a step works on.

FSDP2 (``torch.distributed.fsdp.fully_shard``) holds each parameter as a DTensor sharded on one
dimension: dim 0 (rows) by default, dim 1 (columns) where ``shard_placement_fn`` says so
(:func:`lowrank_shard_placement` does for left-side weights). With w ranks on the sharding mesh
dimension, rank k holds the k-th chunk of c = ceil(size/w) rows or columns (``torch.chunk``'s
rule: the last ranks may hold fewer, or none; FSDP2 only allows dim 1 when w divides n).

A weight's step needs a sum over ranks exactly when the sharded dimension is the one its basis
spans (its short side: n on the right, m on the left), because the projection R sums over it.
The state is placed accordingly (r = rank, "like W" = sharded on the weight's dimension):

====================  =======================  ================================================
state                 right side (m ≥ n)       left side (m < n)
====================  =======================  ================================================
exp_avg, exp_avg_sq   m×r, Shard(0) (rows)     r×n, Shard(1) (columns)
8-bit moments' block  m×⌈r/32⌉, Shard(0)       n×⌈r/32⌉, Shard(0) (one row per own-line:
scales                                         the moments' columns)
proj (dense)          r×n: Replicate if W is   m×r: Replicate if W is Shard(1),
                      Shard(0), like W (Shard  like W (Shard(0)) if W is Shard(0)
                      (1)) if W is Shard(1)
proj (INT4 packed),   Replicate                Replicate (INT4 groups of 256 row-major
DCT indices, scales                            elements straddle shards; the packed basis is
                                               1/8 of an fp32 one, indices r int32)
step, proj_* counters 0-d tensors, equal on every rank (plain tensors, as torch keeps ``step``)
====================  =======================  ================================================

The moments follow the long side whatever W's sharding: when W is sharded on that side they are
the rows/columns of its shard; when W is sharded on the short side, R is reduce-scattered along
the long side so that Adam runs on 1/w of it per rank (step.py says
how). Every non-scalar state tensor is a DTensor on the parameter's mesh, so
``torch.distributed.checkpoint`` saves each shard once and reloads it onto any number of ranks.
A mesh with more dimensions (HSDP: ``(Replicate(), Shard(0))``) is handled along its sharding
dimension; any other placement (tensor parallelism, ...) is refused when the parameter joins the
optimizer.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.utils.weak import WeakIdKeyDictionary

from lowrank_kernels import reference


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a DTensor (an FSDP2 parameter), i.e. needs the sharded step."""
    return isinstance(t, DTensor)


def chunk_range(size: int, world: int, rank: int) -> tuple[int, int]:
    """[start, stop) of ``rank``'s chunk of ``size`` under ``torch.chunk``'s rule (FSDP2's and
    DTensor's Shard): chunks of ceil(size/world), the last ones shorter or empty."""
    chunk = -(-size // world)
    start = min(rank * chunk, size)
    return start, min(start + chunk, size)


def check_sharded_param(p: DTensor, name: str) -> None:
    """Refuses, naming the parameter, a DTensor the sharded step cannot serve."""
    if p.dtype == torch.uint8:
        raise ValueError(
            f"{name}: INT8 weight codes cannot be sharded by FSDP2: their quantization groups "
            "(256 consecutive row-major elements) straddle the shards and fully_shard drops the "
            "codes' scales/zeros attributes. Keep INT8 weights out of fully_shard (DDP "
            "replicates them: see lowrank_kernels.distributed.average_int8_grads) or train this "
            "weight in a float dtype")
    shards = [pl for pl in p.placements if isinstance(pl, Shard)]
    others = [pl for pl in p.placements if not isinstance(pl, (Shard, Replicate))]
    if others or len(shards) > 1 or (shards and shards[0].dim not in (0, 1)):
        raise ValueError(f"{name}: expected a DTensor sharded on dim 0 or 1 over one mesh "
                         f"dimension (FSDP2's fully_shard, optionally replicated on others), got "
                         f"placements {tuple(p.placements)}")


@dataclasses.dataclass(frozen=True)
class ShardLayout:
    """How one m×n weight is split across the ranks of its sharding mesh dimension."""

    mesh: object  # DeviceMesh
    placements: tuple  # the parameter's
    mesh_dim: int | None  # the mesh dimension that shards the weight; None: replicated
    dim: int  # the weight's sharded dimension (0 when replicated)
    device: torch.device  # of the local tensors
    m: int
    n: int

    @property
    def right(self) -> bool:
        return reference.is_right_side(self.m, self.n)

    @property
    def sums(self) -> bool:
        """Whether the sharded dimension is the basis' (n right, m left): R = sum over ranks."""
        return self.mesh_dim is not None and self.dim == (1 if self.right else 0)

    @property
    def moment_dim(self) -> int:
        """The long side's dimension in the moments' shape (m×r right, r×n left)."""
        return 0 if self.right else 1

    @property
    def group(self):
        return None if self.mesh_dim is None else self.mesh.get_group(self.mesh_dim)

    @property
    def world(self) -> int:
        return 1 if self.mesh_dim is None else self.mesh.size(self.mesh_dim)

    @property
    def rank(self) -> int:
        return 0 if self.mesh_dim is None else self.mesh.get_local_rank(self.mesh_dim)

    @property
    def own(self) -> tuple[int, int]:
        """[start, stop) of this rank's rows (dim 0) or columns (dim 1) of the weight."""
        return chunk_range((self.m, self.n)[self.dim], self.world, self.rank)

    def placements_for(self, dim: int | None) -> tuple:
        """Shard(dim) on the sharding mesh dimension (Replicate elsewhere); None: Replicate."""
        return tuple(Shard(dim) if dim is not None and i == self.mesh_dim else Replicate()
                     for i in range(len(self.placements)))

    def wrap(self, local: torch.Tensor, dim: int | None, shape: tuple[int, ...]) -> DTensor:
        """A DTensor of global ``shape``, sharded on ``dim`` (None: replicated), whose local
        part on this rank is ``local``."""
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(local, self.mesh, self.placements_for(dim), run_check=False,
                                  shape=torch.Size(shape), stride=stride)

    def zeros(self, shape: tuple[int, ...], dim: int | None, dtype: torch.dtype) -> DTensor:
        local = list(shape)
        if dim is not None:
            start, stop = chunk_range(shape[dim], self.world, self.rank)
            local[dim] = stop - start
        return self.wrap(torch.zeros(local, dtype=dtype, device=self.device), dim, tuple(shape))

    def basis_dim(self, proj: torch.Tensor) -> int | None:
        """Where a stored projection tensor is sharded: a dense basis like the weight when the
        weight is sharded on its basis side (the basis axis is then the weight's sharded one),
        else (and packed INT4 bytes, DCT indices) replicated."""
        return self.dim if self.sums and proj.is_floating_point() else None


_LAYOUTS = WeakIdKeyDictionary()  # param -> its ShardLayout


def layout_of(p: DTensor) -> ShardLayout:
    """The parameter's ShardLayout (cached per parameter object)."""
    layout = _LAYOUTS.get(p)
    if layout is not None:
        return layout
    mesh_dims = [i for i, pl in enumerate(p.placements) if isinstance(pl, Shard)]
    mesh_dim = mesh_dims[0] if mesh_dims else None
    dim = p.placements[mesh_dim].dim if mesh_dim is not None else 0
    local = p.to_local()
    layout = ShardLayout(p.device_mesh, tuple(p.placements), mesh_dim, dim, local.device,
                         *p.shape)
    start, stop = layout.own
    if local.shape[dim] != stop - start:
        raise RuntimeError(f"a {list(p.shape)} DTensor holds {local.shape[dim]} of dim {dim} on "
                           f"rank {layout.rank} of {layout.world}; expected torch.chunk's "
                           f"{stop - start} ([{start}, {stop}))")
    _LAYOUTS[p] = layout
    return layout


def local_view(state: dict) -> dict:
    """The state with every DTensor replaced by its local tensor (same storage: in-place updates
    of the view update the DTensors)."""
    return {k: v.to_local() if isinstance(v, DTensor) else v for k, v in state.items()}


PROJECTION_TENSORS = ("proj", "proj_scales", "proj_zeros")


def place_projection_(state: dict, stored: dict, layout: ShardLayout) -> None:
    """Moves the projection tensors of ``stored`` (whole-weight tensors, as
    ``projection.state`` stores them in one process) into ``state`` as DTensors placed by
    :meth:`ShardLayout.basis_dim`."""
    start, stop = layout.own
    for key in PROJECTION_TENSORS:
        if key not in stored:
            continue
        whole = stored[key]
        dim = layout.basis_dim(whole) if key == "proj" else None
        local = whole if dim is None else whole.narrow(dim, start, stop - start).contiguous()
        state[key] = layout.wrap(local, dim, tuple(whole.shape))


def moment_zeros_for(layout: ShardLayout, scales: bool = False):
    """``zeros(shape, dtype=...)`` for the moments of the layout's weight (see module doc), or
    with ``scales`` for the block scales of its 8-bit moments: (own, ⌈r/B⌉), own = the long
    side, so they shard on dim 0 where the moments shard on their long side."""
    dim = 0 if scales else layout.moment_dim

    def zeros(shape, *, dtype):
        return layout.zeros(tuple(shape), dim if layout.mesh_dim is not None else None, dtype)
    return zeros


def lowrank_shard_placement(mesh):
    """A ``shard_placement_fn`` for ``fully_shard`` that shards every 2-D left-side weight
    (m < n) on dim 1 when the sharding mesh dimension's size divides n (FSDP2 refuses uneven
    dim-1 shards), and leaves everything else on FSDP2's default dim 0. Every projected weight
    is then sharded along its long side, where its step needs no communication between
    refreshes (docs/distributed.md). ``mesh``: the DeviceMesh given to fully_shard (its last
    dimension shards, as in FSDP2), or the number of ranks."""
    world = mesh if isinstance(mesh, int) else mesh.size(-1)

    def placement(param: torch.nn.Parameter) -> Shard | None:
        if param.dim() == 2 and not reference.is_right_side(*param.shape) and (
                param.shape[1] % world == 0):
            return Shard(1)
        return None
    return placement


__all__ = ["ShardLayout", "check_sharded_param", "chunk_range", "is_sharded", "layout_of",
           "local_view", "lowrank_shard_placement", "moment_zeros_for", "place_projection_"]
