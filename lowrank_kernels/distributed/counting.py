"""Counting the collectives a region of code issues, with their bytes.

:class:`CommCounter` is a TorchDispatchMode: every collective reaches the dispatcher as a
``c10d`` op (``torch.distributed.all_reduce`` and friends) or a ``_c10d_functional`` op (DTensor
redistribution, ``full_tensor()``), so it sees the optimizer's own calls, DTensor's and anyone
else's alike, without trusting the code it measures. Sizes follow nccl-tests' convention:

==================  ===============================  ==========================================
collective          ``size`` (bytes)                 ``bus_bytes`` = size × (nccl-tests busbw)
==================  ===============================  ==========================================
all_reduce          the tensor                       2(w−1)/w · size
all_gather          the gathered output (w pieces)   (w−1)/w · size
reduce_scatter      the input (w pieces)             (w−1)/w · size
gather, scatter     the w pieces together            (w−1)/w · size
all_to_all          the input                        (w−1)/w · size
broadcast, reduce   the tensor                       1 · size
==================  ===============================  ==========================================

``bus_bytes`` is what each rank's link carries with a bandwidth-optimal algorithm (ring/tree); it
is the number to compare with FSDP2's own gradient reduce-scatter and DDP's all-reduce.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

_FAMILY = {
    "allreduce_": "all_reduce", "allreduce_coalesced_": "all_reduce",
    "all_reduce": "all_reduce", "all_reduce_": "all_reduce", "all_reduce_coalesced": "all_reduce",
    "all_reduce_coalesced_": "all_reduce",
    "_allgather_base_": "all_gather", "allgather_": "all_gather",
    "allgather_into_tensor_coalesced_": "all_gather", "all_gather_into_tensor": "all_gather",
    "all_gather_into_tensor_out": "all_gather", "all_gather_into_tensor_coalesced": "all_gather",
    "_reduce_scatter_base_": "reduce_scatter", "reduce_scatter_": "reduce_scatter",
    "reduce_scatter_tensor_coalesced_": "reduce_scatter", "reduce_scatter_tensor": "reduce_scatter",
    "reduce_scatter_tensor_coalesced": "reduce_scatter",
    "gather_": "gather", "scatter_": "scatter",
    "alltoall_base_": "all_to_all", "alltoall_": "all_to_all", "all_to_all_single": "all_to_all",
    "broadcast_": "broadcast", "broadcast": "broadcast", "reduce_": "reduce",
    "send": "send", "recv_": "recv", "recv_any_source_": "recv", "barrier": "barrier",
}
_BUS_FACTOR = {
    "all_reduce": lambda w: 2 * (w - 1) / w, "all_gather": lambda w: (w - 1) / w,
    "reduce_scatter": lambda w: (w - 1) / w, "gather": lambda w: (w - 1) / w,
    "scatter": lambda w: (w - 1) / w, "all_to_all": lambda w: (w - 1) / w,
}


def _tensors(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _tensors(item)]
    return []


def _nbytes(x) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(x))


def _group_size(args) -> int:
    for a in args:
        if isinstance(a, torch.ScriptObject):
            try:
                return dist.ProcessGroup.unbox(a).size()
            except RuntimeError:  # another script object (a ReduceOp)
                continue
    for a in args[1:]:
        if isinstance(a, str):  # functional collectives name their group
            return dist.distributed_c10d._resolve_process_group(a).size()
    return dist.get_world_size()


@dataclasses.dataclass(frozen=True)
class Collective:
    op: str  # the family: all_reduce, all_gather, reduce_scatter, gather, broadcast, ...
    size: int  # bytes, nccl-tests convention (module docstring)
    world: int

    @property
    def bus_bytes(self) -> float:
        return self.size * _BUS_FACTOR.get(self.op, lambda w: 1.0)(self.world)


class CommCounter(TorchDispatchMode):
    """``with CommCounter() as c: ...`` records every collective issued inside in ``c.calls``."""

    def __init__(self):
        super().__init__()
        self.calls: list[Collective] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.namespace in ("c10d", "_c10d_functional"):
            family = _FAMILY.get(func._opname)
            if family is not None:
                self.calls.append(Collective(family, self._size(func._opname, args),
                                             _group_size(args)))
        return out

    @staticmethod
    def _size(opname: str, args) -> int:
        if opname.startswith("all_gather_into_tensor"):  # functional: (input, group_size, ...)
            return _nbytes(args[0]) * args[1]
        if opname in ("_allgather_base_", "allgather_into_tensor_coalesced_"):
            return _nbytes(args[0])  # (outputs, inputs, ...)
        if opname in ("allgather_", "gather_"):  # (outputs, inputs, ...): w × this rank's input
            return _nbytes(args[1]) * _group_size(args)
        if opname in ("_reduce_scatter_base_", "reduce_scatter_tensor_coalesced_"):
            return _nbytes(args[1])  # (outputs, inputs, ...)
        if opname in ("reduce_scatter_", "scatter_"):  # w × this rank's output
            return _nbytes(args[0]) * _group_size(args)
        return _nbytes(args[0])  # the tensor, or the input

    @property
    def size(self) -> int:
        return sum(c.size for c in self.calls)

    @property
    def bus_bytes(self) -> float:
        return sum(c.bus_bytes for c in self.calls)

    def by_op(self) -> dict[str, tuple[int, int]]:
        """{family: (calls, size in bytes)}."""
        out: dict[str, tuple[int, int]] = {}
        for c in self.calls:
            calls, size = out.get(c.op, (0, 0))
            out[c.op] = (calls + 1, size + c.size)
        return out
