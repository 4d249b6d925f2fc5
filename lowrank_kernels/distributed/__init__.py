"""Distributed training with LowRankAdamW: FSDP2 (DTensor parameters), DDP, checkpoints.

- FSDP2 (``torch.distributed.fsdp.fully_shard``): a projected DTensor weight takes the sharded
  step of :mod:`lowrank_kernels.distributed.step` (state placement: :mod:`.placement`;
  collectives: :mod:`.collectives`). Nothing to configure: build the optimizer on the sharded
  model's parameters. ``fully_shard(..., shard_placement_fn=lowrank_shard_placement(mesh))``
  shards left-side weights on dim 1, which removes their per-step all-reduce.
- DDP: gradients are all-reduced before ``step()``, every rank holds every parameter, and every
  refresh is a deterministic function of the gradient and of counters all ranks share, so the
  optimizer runs unchanged and the ranks stay identical. Layer-wise stepping under DDP and the
  gradients of INT8 weights (which DDP does not see): :mod:`.ddp`.
- Checkpoints: :mod:`.checkpoint` (``torch.distributed.checkpoint`` with resharding;
  :func:`init_optimizer_state` before loading into a fresh optimizer).
- :class:`CommCounter` counts the collectives (and their bytes) a region of code issues.

docs/distributed.md is the user guide.
"""

from __future__ import annotations

import torch

from lowrank_kernels.distributed.checkpoint import init_optimizer_state
from lowrank_kernels.distributed.counting import CommCounter
from lowrank_kernels.distributed.ddp import DDPLayerwiseSteps, average_int8_grads
from lowrank_kernels.distributed.placement import (
    check_sharded_param,
    is_sharded,
    layout_of,
    lowrank_shard_placement,
    moment_zeros_for,
    place_projection_,
)
from lowrank_kernels.distributed.step import refresh_due_, step_sharded


def moment_zeros(p: torch.Tensor):
    """``zeros(shape, dtype=...)`` making moments of DTensor ``p`` placed as its state must be."""
    return moment_zeros_for(layout_of(p))


def moment_scale_zeros(p: torch.Tensor):
    """The same for the block scales of ``p``'s 8-bit moments."""
    return moment_zeros_for(layout_of(p), scales=True)


def shard_projection_(state: dict, p: torch.Tensor) -> None:
    """Turns the whole-weight projection tensors that ``projection.state.allocate_`` put in
    ``state`` into DTensors placed for ``p`` (``LowRankAdamW.init_state`` of a DTensor)."""
    place_projection_(state, dict(state), layout_of(p))


__all__ = ["CommCounter", "DDPLayerwiseSteps", "average_int8_grads", "check_sharded_param",
           "init_optimizer_state", "is_sharded", "lowrank_shard_placement", "moment_scale_zeros",
           "moment_zeros",
           "refresh_due_", "shard_projection_", "step_sharded"]
