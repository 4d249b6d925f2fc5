"""The optimizer's own collectives, on the process group that shards one weight's rows.

Uneven shards are padded to torch.chunk's chunk size c = ceil(size/w) so that every rank hands
the collective a buffer of the same size (what NCCL and gloo require); the padding is dropped
on return. Sizes below are the buffers' (w ranks, fp32 unless said otherwise):

======================  =====================================  ================================
function                used for                               buffer per rank
======================  =====================================  ================================
all_reduce_sum_         DCT scores (right side), lazy-refresh  n floats; r×r floats
                        overlap of a sharded left basis
reduce_scatter_columns  R = Pᵀ G of a left-side weight         in: w·ceil(n/w)×r, out: 1/w
all_gather_columns      N of a left-side weight                in: ceil(n/w)×r, out: w×
gather_rows             a refresh that needs the whole G       ceil(m/w)×n in G's dtype
                        (SVD, randomized SVD, DCT left side)   (the owner receives w×)
broadcast_              the new basis from the owner           r×n or m×r, or r int32
======================  =====================================  ================================

With one rank on the sharding dimension (a mesh replicated everywhere) they return at once.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lowrank_kernels.distributed.placement import ShardLayout


def _padded(local: torch.Tensor, rows: int) -> torch.Tensor:
    """``local`` (k×d, k ≤ rows) as a contiguous rows×d buffer, zero-padded below."""
    if local.shape[0] == rows and local.is_contiguous():
        return local
    out = local.new_zeros((rows, *local.shape[1:]))
    out[:local.shape[0]] = local
    return out


def all_reduce_sum_(t: torch.Tensor, layout: ShardLayout) -> torch.Tensor:
    if layout.world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=layout.group)
    return t


def broadcast_(t: torch.Tensor, layout: ShardLayout, owner: int) -> torch.Tensor:
    """``t`` of rank ``owner`` (group-local rank) into ``t`` of every rank."""
    if layout.world > 1:
        dist.broadcast(t, group=layout.group, group_src=owner)
    return t


def gather_rows(local: torch.Tensor, layout: ShardLayout, owner: int) -> torch.Tensor | None:
    """The whole m×n tensor on rank ``owner`` from every rank's rows; None on the others."""
    if layout.world == 1:
        return local
    chunk = -(-layout.m // layout.world)
    buffer = _padded(local, chunk)
    pieces = [torch.empty_like(buffer) for _ in range(layout.world)] if (
        layout.rank == owner) else None
    dist.gather(buffer, pieces, group=layout.group, group_dst=owner)
    return torch.cat(pieces)[:layout.m] if pieces is not None else None


def reduce_scatter_columns(partial: torch.Tensor, layout: ShardLayout) -> torch.Tensor:
    """Σ over ranks of ``partial`` (r×n), this rank's columns of it (r×n_k, a transposed view:
    columns of a row-major matrix are not contiguous, so the buffers hold the transpose)."""
    if layout.world == 1:
        return partial
    chunk = -(-layout.n // layout.world)
    buffer = _padded(partial.T, chunk * layout.world)
    out = partial.new_empty((chunk, partial.shape[0]))
    dist.reduce_scatter_single(out, buffer, op=dist.ReduceOp.SUM, group=layout.group)
    start, stop = layout.columns
    return out[:stop - start].T


def all_gather_columns(local: torch.Tensor, layout: ShardLayout) -> torch.Tensor:
    """The r×n matrix whose columns ranks hold as r×n_k pieces (a transposed view)."""
    if layout.world == 1:
        return local
    chunk = -(-layout.n // layout.world)
    buffer = _padded(local.T, chunk)
    out = local.new_empty((chunk * layout.world, local.shape[0]))
    dist.all_gather_single(out, buffer, group=layout.group)
    return out[:layout.n].T
