"""Where the optimizer state of an FSDP2 parameter lives, and the local view a step works on.

FSDP2 (``torch.distributed.fsdp.fully_shard``) holds each parameter as a DTensor sharded on dim 0:
with w ranks on the sharding mesh dimension, rank k holds rows [k·c, min((k+1)·c, m)) of an m×n
weight, c = ceil(m/w) (``torch.chunk``'s rule: the last ranks may hold fewer rows, or none).
LowRankAdamW places the state of such a weight (rank r) so that every step touches only local
data except where the maths sums over the sharded rows:

=================  ========================  ===================================================
state              right side (m ≥ n)        left side (m < n)
=================  ========================  ===================================================
exp_avg, _sq       m×r, Shard(0): the rows   r×n, Shard(1): c' = ceil(n/w) columns per rank
                   of the weight's shard     (R = Pᵀ G is a sum over rows: reduce-scattered
                                             by columns, so Adam runs on 1/w of it per rank)
proj (dense)       r×n, Replicate            m×r, Shard(0): the rows of the weight's shard
proj (INT4)        packed, Replicate         packed, Replicate (quantization groups of 256
                                             row-major elements straddle the row shards; the
                                             packed basis is 1/8 of an fp32 one)
proj (DCT)         r int32, Replicate        r int32, Replicate
proj_scales/zeros  Replicate                 Replicate
step, proj_* ints  0-d tensors, equal on every rank (plain tensors, as torch keeps ``step``)
=================  ========================  ===================================================

Every non-scalar state tensor is a DTensor on the parameter's mesh, so
``torch.distributed.checkpoint`` saves each shard once and reloads it onto any number of ranks
(``get_optimizer_state_dict``/``set_optimizer_state_dict``). A mesh with more dimensions (HSDP:
``(Replicate(), Shard(0))``) is handled along its sharding dimension; the other dimensions stay
replicated. Any other placement (tensor parallelism's Shard(1), ...) is refused when the
parameter joins the optimizer.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.utils.weak import WeakIdKeyDictionary

from lowrank_kernels import reference

ROWS, COLUMNS, REPLICATE = "rows", "columns", "replicate"


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
            "(256 consecutive row-major elements) straddle the row shards and fully_shard drops "
            "the codes' scales/zeros attributes. Keep INT8 weights out of fully_shard (DDP "
            "replicates them and is supported) or train this weight in a float dtype")
    shards = [i for i, pl in enumerate(p.placements) if isinstance(pl, Shard)]
    others = [pl for pl in p.placements if not isinstance(pl, (Shard, Replicate))]
    if others or len(shards) > 1 or (shards and p.placements[shards[0]].dim != 0):
        raise ValueError(f"{name}: expected a DTensor sharded on dim 0 (FSDP2's fully_shard, "
                         f"optionally replicated on other mesh dims), got placements "
                         f"{tuple(p.placements)}")


@dataclasses.dataclass(frozen=True)
class ShardLayout:
    """How one m×n weight is split across the ranks of its sharding mesh dimension."""

    mesh: object  # DeviceMesh
    placements: tuple  # the parameter's
    mesh_dim: int | None  # the mesh dimension that shards rows; None: replicated everywhere
    device: torch.device  # of the local tensors
    m: int
    n: int

    @property
    def right(self) -> bool:
        return reference.is_right_side(self.m, self.n)

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
    def rows(self) -> tuple[int, int]:
        return chunk_range(self.m, self.world, self.rank)

    @property
    def columns(self) -> tuple[int, int]:
        return chunk_range(self.n, self.world, self.rank)

    def placements_for(self, kind: str) -> tuple:
        if kind == ROWS:
            return self.placements
        if kind == COLUMNS:
            return tuple(Shard(1) if i == self.mesh_dim else Replicate()
                         for i in range(len(self.placements)))
        return tuple(Replicate() for _ in self.placements)

    def wrap(self, local: torch.Tensor, kind: str, shape: tuple[int, ...]) -> DTensor:
        """A DTensor of global ``shape`` whose local part on this rank is ``local``."""
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(local, self.mesh, self.placements_for(kind), run_check=False,
                                  shape=torch.Size(shape), stride=stride)

    def zeros(self, shape: tuple[int, ...], kind: str, dtype: torch.dtype) -> DTensor:
        """Zeros of global ``shape`` placed as ``kind`` (rows: dim 0 sharded like the weight)."""
        rank, world = self.rank, self.world
        local = list(shape)
        if kind in (ROWS, COLUMNS):
            dim = 0 if kind == ROWS else 1
            start, stop = chunk_range(shape[dim], world, rank)
            local[dim] = stop - start
        return self.wrap(torch.zeros(local, dtype=dtype, device=self.device), kind, tuple(shape))


_LAYOUTS = WeakIdKeyDictionary()  # param -> its ShardLayout


def layout_of(p: DTensor) -> ShardLayout:
    """The parameter's ShardLayout (cached per parameter object)."""
    layout = _LAYOUTS.get(p)
    if layout is not None:
        return layout
    dims = [i for i, pl in enumerate(p.placements) if isinstance(pl, Shard)]
    layout = ShardLayout(p.device_mesh, tuple(p.placements), dims[0] if dims else None,
                         p.to_local().device, *p.shape)
    start, stop = layout.rows
    if p.to_local().shape[0] != stop - start:
        raise RuntimeError(f"a {p.shape[0]}-row DTensor holds {p.to_local().shape[0]} rows on "
                           f"rank {layout.rank} of {layout.world}; expected torch.chunk's "
                           f"{stop - start} (rows [{start}, {stop}))")
    _LAYOUTS[p] = layout
    return layout


def moment_kind(layout: ShardLayout) -> str:
    return ROWS if layout.right else COLUMNS


def projection_kind(layout: ShardLayout, proj: torch.Tensor) -> str:
    """A dense left basis (m×r) is sharded with the weight's rows; everything else (r×n right
    basis, packed INT4 bytes, DCT indices, group scales) is replicated."""
    dense = proj.is_floating_point()
    return ROWS if dense and not layout.right else REPLICATE


def local_view(state: dict) -> dict:
    """The state with every DTensor replaced by its local tensor (same storage: in-place updates
    of the view update the DTensors)."""
    return {k: v.to_local() if isinstance(v, DTensor) else v for k, v in state.items()}


PROJECTION_TENSORS = ("proj", "proj_scales", "proj_zeros")


def place_projection_(state: dict, stored: dict, layout: ShardLayout) -> None:
    """Moves the projection tensors of ``stored`` (whole-weight tensors, as
    ``projection.state`` stores them in one process) into ``state`` as DTensors: a dense left
    basis keeps this rank's rows, everything else is replicated."""
    start, stop = layout.rows
    for key in PROJECTION_TENSORS:
        if key not in stored:
            continue
        full = stored[key]
        kind = projection_kind(layout, stored["proj"]) if key == "proj" else REPLICATE
        local = full[start:stop].contiguous() if kind == ROWS else full
        state[key] = layout.wrap(local, kind, tuple(full.shape))


def moment_zeros_for(layout: ShardLayout):
    """``zeros(shape, dtype=...)`` for the moments of the layout's weight (see module doc)."""
    def zeros(shape, *, dtype):
        return layout.zeros(tuple(shape), moment_kind(layout), dtype)
    return zeros


__all__ = ["ShardLayout", "check_sharded_param", "chunk_range", "is_sharded",
           "layout_of", "local_view", "moment_zeros_for", "place_projection_"]
