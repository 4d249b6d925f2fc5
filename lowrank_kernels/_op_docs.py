"""``help(torch.ops.lowrank.<op>)`` shows the op: its schema, then the docstring of the typed
wrapper in ``lowrank_kernels.ops`` (the maths, formats and errors), written once, there.

The dispatcher's op objects carry no documentation of their own (a C++ schema has no doc
string), so the package attaches it to each op object when it loads.
"""

from __future__ import annotations

import inspect

import torch

OPS = ("fused_galore_step", "fused_gradnorm_step", "project", "project_back", "dct_select",
       "dct_basis", "philox_uniform", "quantize_int4", "dequantize_int4", "quantize_int8",
       "dequantize_int8", "random_basis")


def op_doc(name: str) -> str | None:
    """The text ``help`` shows for torch.ops.lowrank.<name>; None when the op is not registered
    (the extension did not load)."""
    from lowrank_kernels import ops

    try:
        packet = getattr(torch.ops.lowrank, name)
    except (AttributeError, RuntimeError):
        return None
    schemas = "\n".join(f"    {getattr(packet, overload)._schema}"
                        for overload in packet.overloads())
    wrapper = getattr(ops, name, None)
    body = inspect.getdoc(wrapper) if wrapper is not None else ""
    return (f"torch.ops.lowrank.{name}\n\n{schemas}\n\n{body}\n\n"
            f"Typed wrapper (the same kernel; backend=... names one implementation for tests): "
            f"lowrank_kernels.ops.{name}. On CUDA tensors the Triton kernel runs, or the CUDA "
            f"C++ one after lowrank_kernels.set_cuda_backend('cuda_cxx'). Semantics, formats "
            f"and layouts: docs/DESIGN.md.")


def attach() -> None:
    for name in OPS:
        doc = op_doc(name)
        if doc is None:
            continue
        packet = getattr(torch.ops.lowrank, name)
        packet.__doc__ = doc
        for overload in packet.overloads():
            getattr(packet, overload).__doc__ = doc
