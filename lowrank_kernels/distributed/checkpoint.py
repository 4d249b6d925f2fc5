"""Checkpoints with ``torch.distributed.checkpoint`` (DCP), resharding included.

Every state tensor of a sharded weight is a DTensor placed with its weight (placement.py) or a 0-d
counter, so the standard DCP recipe saves each shard once and loads onto any number of ranks, or
into one process without FSDP (docs/distributed.md has the recipe):

    sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.save(sd, checkpoint_id=path)                 # on every rank
    ...
    init_optimizer_state(opt)                         # a fresh optimizer: see below
    sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(sd, checkpoint_id=path)
    set_model_state_dict(model, sd["model"]); set_optimizer_state_dict(model, opt, sd["optim"])

:func:`init_optimizer_state` allocates the state of every parameter without a step. Without it,
``get_optimizer_state_dict`` on a fresh optimizer creates the state by running one ``step()``
with zero gradients and lr 0, which for LowRankAdamW refreshes every projection: under FSDP2 a
gather of every weight's (zero) gradient and an SVD of it. The result is the same either way
(the load overwrites every state tensor).
"""

from __future__ import annotations

import torch


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.init_state(p)`` for every parameter (LowRankAdamW: the tensors a first step
    allocates, zero-filled, placed for DTensor parameters; no projection is computed)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            optimizer.init_state(p)
