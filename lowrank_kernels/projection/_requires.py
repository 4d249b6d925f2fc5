"""Looks up ops that other parts of the package provide, failing with a message naming them."""

from __future__ import annotations

from collections.abc import Callable

from lowrank_kernels import ops


def require_op(name: str, feature: str) -> Callable:
    """``lowrank_kernels.ops.<name>``, or NotImplementedError saying which feature needs it."""
    fn = getattr(ops, name, None)
    if fn is None:
        raise NotImplementedError(
            f"{feature} needs lowrank_kernels.ops.{name} (torch.ops.lowrank.{name}), which this "
            "build of lowrank_kernels does not provide yet")
    return fn
