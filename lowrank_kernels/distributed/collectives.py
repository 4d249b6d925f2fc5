"""The optimizer's own collectives, on the process group that shards one weight.

Tensors are 2-D and split along one dimension ``dim`` in torch.chunk's chunks (c = ceil(size/w)
for w ranks). Collectives need equal buffers on every rank, so a chunk is zero-padded to c along
``dim`` (and, for dim 1, transposed so that the buffer is contiguous); the padding is dropped on
return. Buffers per rank (fp32 unless said otherwise):

======================  ========================================  ==========================
function                used for                                  buffer per rank
======================  ========================================  ==========================
all_reduce_sum_         DCT scores (n or m floats), lazy-refresh  the tensor
                        overlap of a sharded dense basis (r×r)
reduce_scatter_along    R of a weight sharded on its basis side   in: w·c×r, out: c×r
all_gather_along        N of such a weight                        in: c×r, out: w·c×r
start_gather            a refresh that needs the whole gradient   c×(other side), G's dtype
                        (SVD, randomized SVD, DCT of a weight     (the owner receives w of
                        sharded on its basis side)                them)
broadcast_              the new basis from the owner              r×n or m×r fp32, r int32
======================  ========================================  ==========================

With one rank on the sharding dimension (a replicated DTensor) they return at once.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lowrank_kernels.distributed.placement import ShardLayout, chunk_range


def _padded_front(local: torch.Tensor, dim: int, rows: int) -> torch.Tensor:
    """``local`` with ``dim`` moved to the front, as a contiguous buffer zero-padded to ``rows``
    along it."""
    front = local.movedim(dim, 0)
    if front.shape[0] == rows and front.is_contiguous():
        return front
    out = front.new_zeros((rows, *front.shape[1:]))
    out[:front.shape[0]] = front
    return out


def all_reduce_sum_(t: torch.Tensor, layout: ShardLayout, *, async_op: bool = False):
    """Sums ``t`` over the ranks in place; with ``async_op`` returns the Work to wait for
    (None with one rank)."""
    if layout.world == 1:
        return None if async_op else t
    work = dist.all_reduce(t, op=dist.ReduceOp.SUM, group=layout.group, async_op=async_op)
    return work if async_op else t


def broadcast_(t: torch.Tensor, layout: ShardLayout, owner: int, *, async_op: bool = False):
    """``t`` of rank ``owner`` (group-local rank) into ``t`` of every rank; with ``async_op``
    returns the Work to wait for (None with one rank)."""
    if layout.world == 1:
        return None if async_op else t
    work = dist.broadcast(t, group=layout.group, group_src=owner, async_op=async_op)
    return work if async_op else t


class PendingGather:
    """A gather in flight (:func:`start_gather`)."""

    def __init__(self, work, whole: torch.Tensor | None, dim: int, size: int):
        self.work, self.whole, self.dim, self.size = work, whole, dim, size

    def wait(self) -> torch.Tensor | None:
        """The whole tensor on the owner (contiguous: a copy only when gathered along dim 1),
        None elsewhere."""
        if self.work is not None:
            self.work.wait()
        if self.whole is None:
            return None
        return self.whole[:self.size].movedim(0, self.dim).contiguous()


def start_gather(local: torch.Tensor, dim: int, size: int, layout: ShardLayout, owner: int
                 ) -> PendingGather:
    """Starts gathering the whole tensor (``size`` along ``dim``) on rank ``owner`` from every
    rank's chunk; its ``wait()`` returns it there, None on the other ranks. The owner receives
    into one buffer (the pieces are views of it), so it holds the gradient once."""
    if layout.world == 1:
        return PendingGather(None, local.movedim(dim, 0), dim, size)
    chunk = -(-size // layout.world)
    buffer = _padded_front(local, dim, chunk)
    whole = pieces = None
    if layout.rank == owner:
        whole = buffer.new_empty((chunk * layout.world, *buffer.shape[1:]))
        pieces = list(whole.split(chunk))
    work = dist.gather(buffer, pieces, group=layout.group, group_dst=owner, async_op=True)
    return PendingGather(work, whole, dim, size)


def reduce_scatter_along(partial: torch.Tensor, dim: int, layout: ShardLayout) -> torch.Tensor:
    """The sum over ranks of ``partial``, this rank's chunk of it along ``dim`` (a view)."""
    if layout.world == 1:
        return partial
    size = partial.shape[dim]
    chunk = -(-size // layout.world)
    buffer = _padded_front(partial, dim, chunk * layout.world)
    out = buffer.new_empty((chunk, *buffer.shape[1:]))
    dist.reduce_scatter_single(out, buffer, op=dist.ReduceOp.SUM, group=layout.group)
    start, stop = chunk_range(size, layout.world, layout.rank)
    return out[:stop - start].movedim(0, dim)


def all_gather_along(local: torch.Tensor, dim: int, size: int, layout: ShardLayout
                     ) -> torch.Tensor:
    """The whole tensor (``size`` along ``dim``) from every rank's chunk, on every rank (a
    view)."""
    if layout.world == 1:
        return local
    chunk = -(-size // layout.world)
    buffer = _padded_front(local, dim, chunk)
    out = buffer.new_empty((chunk * layout.world, *buffer.shape[1:]))
    dist.all_gather_single(out, buffer, group=layout.group)
    return out[:size].movedim(0, dim)
