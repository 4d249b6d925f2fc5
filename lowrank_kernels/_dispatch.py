"""Which kernel runs a lowrank op: the registrations behind ``torch.ops.lowrank.<op>`` and the
explicit ``backend=`` of lowrank_kernels.ops.

``torch.ops.lowrank.<op>`` (schemas: csrc/lowrank.cpp) is the one entry point; the dispatcher
picks the kernel by the tensors' device:

============  ================================================================================
CPU tensors   the C++ kernel (csrc/cpu)
CUDA tensors  the Triton kernel (lowrank_kernels.triton_kernels), registered on the op's CUDA
              key by this module at ``import lowrank_kernels`` whenever triton is importable:
              measured faster than the CUDA C++ kernels on an H100 (fused_galore_step 4-12×,
              bench/results/gpu_step_h100.csv). Without triton: the CUDA C++ kernel (csrc/cuda).
both          project / project_back: one ATen implementation (at::mm) for every device
============  ================================================================================

``lowrank_kernels.ops.<op>(..., backend=None)`` calls ``torch.ops.lowrank.<op>``, so the typed
wrappers, direct callers of ``torch.ops`` and ``torch.compile`` (which traces the op through its
fake kernel, lowrank_kernels/_fakes.py, and calls it at run time) all run the same kernel.

The one switch: ``set_cuda_backend("cuda_cxx")`` makes the registered CUDA kernel of every op
call the CUDA C++ kernel instead (registered a second time as ``lowrank_cuda::<op>`` by
csrc/cuda, from the same schema list); ``set_cuda_backend("triton")`` is the default. The
registered kernel reads the choice from a module-level table, never from the environment.

``backend=`` ("cpu", "cuda", "triton", "reference") names one implementation for tests and
benchmarks: "cuda" is lowrank_cuda::<op>, "triton" the launcher itself (CPU tensors under
TRITON_INTERPRET=1 run it in Triton's interpreter), "reference" validates
(lowrank_kernels._checks) and runs lowrank_kernels.reference. Without the compiled extension
(no schemas), backend=None takes the Triton launcher on CUDA tensors and the reference
elsewhere, and "cpu"/"cuda" raise with the reason the build failed.

Why ``torch.library.register_kernel`` on the C++-defined op and not ``triton_op``: the schemas
stay in one place (csrc/lowrank.cpp) for both namespaces, and a ``triton_op`` would define the op
in Python. Inductor then calls the op as an opaque kernel instead of inlining its Triton
launches; the launchers pick block sizes and allocate the low-rank workspace per call, and the
optimizer's step is one op call per weight either way.

Everything here is per-op tables keyed by op name; a keyword argument added to a schema needs no
change in this module (the kernels, the checks and the reference take it) unless the CUDA C++
kernel does not serve it: ``CUDA_CXX_DEFAULT_ONLY`` then keeps such calls on Triton under
``set_cuda_backend("cuda_cxx")`` (Fira/APOLLO's full_rank), and ``TRITON_ONLY_OPS`` every call of
an op without a CUDA C++ kernel (fused_gradnorm_step, random_basis).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
from collections.abc import Callable

import torch

from lowrank_kernels import _checks, _extension, reference

BACKENDS = ("cpu", "cuda", "triton", "reference")
CUDA_BACKENDS = ("triton", "cuda_cxx")

TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def _reference_fused_galore_step(param, grad, proj, exp_avg, exp_avg_sq, *, proj_scales=None,
                                 proj_zeros=None, proj_group_size=256, param_scales=None,
                                 param_zeros=None, param_group_size=256, seed=0, **hyper):
    """The reference of every format: DCT indices become their dense rows (§4.5); a packed INT4
    basis or INT8 weight codes take the Q-GaLore step (§4.3-§4.4). ``hyper``: the scalars and
    the keyword-only modes (inner rule, 8-bit moments, side), passed through."""
    if proj.dtype == torch.int32:
        proj = reference.dct_projection(proj, *param.shape, right=hyper.get("right"))
    if proj.dtype == torch.uint8 or param.dtype == torch.uint8:
        reference.fused_qgalore_step(param, grad, proj, exp_avg, exp_avg_sq, **hyper,
                                     proj_scales=proj_scales, proj_zeros=proj_zeros,
                                     proj_group_size=proj_group_size, param_scales=param_scales,
                                     param_zeros=param_zeros, param_group_size=param_group_size,
                                     seed=seed)
    else:
        reference.fused_galore_step(param, grad, proj, exp_avg, exp_avg_sq, **hyper, seed=seed)


def _reference_random_basis(d, rank, seed, refresh, *, device=None):
    return reference.random_basis(d, rank, seed, refresh, device=device)


def _reference_fused_gradnorm_step(param, grad, proj, exp_avg, exp_avg_sq, *rows,
                                   proj_scales=None, proj_zeros=None, proj_group_size=256,
                                   **hyper):
    """The reference on the dense basis every projection format stands for (§4.3, §4.5)."""
    m, n = param.shape
    if proj.dtype == torch.int32:
        proj = reference.dct_projection(proj, m, n)
    elif proj.dtype == torch.uint8:
        rank = exp_avg_sq.shape[1] if reference.is_right_side(m, n) else exp_avg_sq.shape[0]
        proj = reference.dequantize_int4(proj, proj_scales, proj_zeros,
                                         reference.quantized_basis_shape(m, n, rank),
                                         proj_group_size)
    reference.fused_gradnorm_step(param, grad, proj, exp_avg, exp_avg_sq, *rows, **hyper)


def _reference_dct_select(grad, rank, norm=1, *, method="auto"):
    del method  # one algorithm; the choice only concerns the CPU kernel
    return reference.dct_select(grad, rank, norm)


@dataclasses.dataclass(frozen=True)
class Op:
    """One op's implementations besides the compiled ones: ``check`` (lowrank_kernels._checks)
    and ``reference`` take the op's schema signature; ``triton`` is "module:function" of its
    launcher in lowrank_kernels.triton_kernels (same signature; it validates itself)."""

    check: Callable
    reference: Callable
    triton: str | None = None


OPS: dict[str, Op] = {
    "project": Op(_checks.check_project, reference.project),
    "project_back": Op(_checks.check_project_back, reference.project_back),
    "fused_galore_step": Op(_checks.check_fused_galore_step, _reference_fused_galore_step,
                            "fused_galore_step:fused_galore_step"),
    "fused_gradnorm_step": Op(_checks.check_fused_gradnorm_step,
                              _reference_fused_gradnorm_step,
                              "fused_gradnorm_step:fused_gradnorm_step"),
    "philox_uniform": Op(_checks.check_philox_uniform, reference.philox_uniform,
                         "quant:philox_uniform"),
    "quantize_int4": Op(_checks.check_quantize_int4, reference.quantize_int4,
                        "quant:quantize_int4"),
    "dequantize_int4": Op(_checks.check_dequantize_int4, reference.dequantize_int4,
                          "quant:dequantize_int4"),
    "quantize_int8": Op(_checks.check_quantize_int8, reference.quantize_int8,
                        "quant:quantize_int8"),
    "dequantize_int8": Op(_checks.check_dequantize_int8, reference.dequantize_int8,
                          "quant:dequantize_int8"),
    "dct_select": Op(_checks.check_dct_select, _reference_dct_select, "dct_select:dct_select"),
    "dct_basis": Op(_checks.check_dct_basis, reference.dct_basis, "dct_select:dct_basis"),
    "random_basis": Op(_checks.check_random_basis, _reference_random_basis,
                       "random_basis:random_basis"),
}
TRITON_OPS = tuple(op for op, impl in OPS.items() if impl.triton is not None)

def triton_kernel(op: str) -> Callable:
    """The Triton launcher of ``op`` (imported on first use: triton is optional)."""
    module, _, name = OPS[op].triton.partition(":")
    return getattr(importlib.import_module(f"lowrank_kernels.triton_kernels.{module}"), name)


def _has_cuda_cxx(op: str) -> bool:
    """Whether the extension registered lowrank_cuda::<op> (a CUDA build)."""
    if not _extension.AVAILABLE:
        return False
    try:
        getattr(torch.ops.lowrank_cuda, op)
    except (AttributeError, RuntimeError):
        return False
    return True


CUDA_CXX_AVAILABLE = _has_cuda_cxx("fused_galore_step")


# --------------------------------------------------------------------------------------------
# the CUDA key of torch.ops.lowrank.<op>
# --------------------------------------------------------------------------------------------
# op -> what the registered CUDA kernel runs now (a Triton launcher, loaded on first call, or
# lowrank_cuda::<op>); rewritten only by set_cuda_backend.
_CUDA_TARGETS: dict[str, Callable] = {}
_cuda_backend = "triton" if TRITON_AVAILABLE else "cuda_cxx"
_LIBRARY: torch.library.Library | None = None


def _load_triton(op: str) -> Callable:
    def load_and_run(*args, **kwargs):
        _CUDA_TARGETS[op] = triton_kernel(op)
        return _CUDA_TARGETS[op](*args, **kwargs)
    return load_and_run


# Ops without a CUDA C++ kernel (lowrank_cuda::<op> raises NotImplementedError, or random_basis:
# none at all): their CUDA key runs the Triton kernel under either CUDA backend.
TRITON_ONLY_OPS = ("fused_gradnorm_step", "random_basis")
# Keyword arguments that the CUDA C++ kernel of an op serves only at their default value (the
# modes added after it, never run on a GPU in C++): under set_cuda_backend("cuda_cxx") a call
# that sets one of them runs the Triton kernel instead (the C++ kernel would refuse it).
CUDA_CXX_DEFAULT_ONLY: dict[str, dict[str, object]] = {
    "fused_galore_step": {"inner": "adam", "exp_avg_scales": None, "exp_avg_sq_scales": None,
                          "right": None, "full_rank": "none"},
}


def _is_default(value, default) -> bool:
    if default is None:
        return value is None
    return not isinstance(value, torch.Tensor) and value == default


def cuda_cxx_serves(op: str, kwargs: dict, args: tuple = ()) -> bool:
    """Whether the CUDA C++ kernel of ``op`` serves a call with these arguments (a factored
    second moment, a 1-D exp_avg_sq, is Triton's only, as the keyword modes above)."""
    if op in TRITON_ONLY_OPS:
        return False
    if op == "fused_galore_step" and len(args) > 4 and args[4].dim() == 1:
        return False
    defaults = CUDA_CXX_DEFAULT_ONLY.get(op, {})
    return all(_is_default(kwargs.get(key, default), default)
               for key, default in defaults.items())


def _set_targets(backend: str) -> None:
    for op in TRITON_OPS:
        _CUDA_TARGETS[op] = (_load_triton(op) if backend == "triton" or op in TRITON_ONLY_OPS
                             else getattr(torch.ops.lowrank_cuda, op))


def cuda_target(op: str, kwargs: dict, args: tuple = ()) -> Callable:
    """What the registered CUDA kernel of ``op`` runs for a call with ``kwargs``: the current
    backend's kernel, or the Triton kernel for a mode the CUDA C++ kernel lacks."""
    if (_cuda_backend == "cuda_cxx" and TRITON_AVAILABLE
            and not cuda_cxx_serves(op, kwargs, args)):
        return triton_kernel(op)
    return _CUDA_TARGETS[op]


def _cuda_kernel(op: str) -> Callable:
    def kernel(*args, **kwargs):
        return cuda_target(op, kwargs, args)(*args, **kwargs)

    kernel.__name__ = kernel.__qualname__ = f"lowrank_{op}_cuda"
    return kernel


def register_cuda_kernels() -> bool:
    """Registers the Triton kernel of every op that has one on ``lowrank::<op>``'s CUDA key
    (once; at import). Returns whether it did: it needs the extension (the schemas) and triton."""
    global _LIBRARY
    if _LIBRARY is not None:
        return True
    if not (_extension.AVAILABLE and TRITON_AVAILABLE):
        return False
    _set_targets(_cuda_backend)
    _LIBRARY = torch.library.Library("lowrank", "IMPL")  # the registrations live as long as it
    for op in TRITON_OPS:
        torch.library.register_kernel(f"lowrank::{op}", "cuda", _cuda_kernel(op), lib=_LIBRARY)
    return True


def cuda_backend() -> str:
    """What ``torch.ops.lowrank.<op>`` runs on CUDA tensors: "triton" or "cuda_cxx"."""
    return _cuda_backend


def set_cuda_backend(backend: str) -> None:
    """The one switch between the kernels of ``torch.ops.lowrank.<op>`` on CUDA tensors:
    "triton" (default; measured faster) or "cuda_cxx" (the CUDA C++ kernels of csrc/cuda).
    Applies to every op, to ``lowrank_kernels.ops`` with ``backend=None`` and to compiled
    graphs, which call the op at run time. Not thread-safe against concurrent steps."""
    global _cuda_backend
    if backend not in CUDA_BACKENDS:
        raise ValueError(f"backend: expected one of {CUDA_BACKENDS}, got {backend!r}")
    if backend == "cuda_cxx" and not CUDA_CXX_AVAILABLE:
        raise RuntimeError("backend: 'cuda_cxx' needs the extension built with its CUDA kernels"
                           + (f" ({_extension.LOAD_ERROR})" if _extension.LOAD_ERROR else
                              " (nvcc missing or LOWRANK_SKIP_CUDA_BUILD=1 at build time)"))
    if backend == "triton" and not TRITON_AVAILABLE:
        raise RuntimeError("backend: 'triton' needs the triton package")
    if _LIBRARY is not None:
        _set_targets(backend)
    _cuda_backend = backend


# --------------------------------------------------------------------------------------------
# lowrank_kernels.ops: backend=None (the dispatcher) or an explicit backend
# --------------------------------------------------------------------------------------------
def _device_of(args: tuple, kwargs: dict) -> torch.device:
    """The device an op call runs on: its first tensor's, else its ``device`` argument's (ops
    without tensor arguments: random_basis), else the CPU."""
    tensor = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if tensor is not None:
        return tensor.device
    return torch.device(kwargs.get("device") or "cpu")


def _reference(op: str) -> Callable:
    impl = OPS[op]

    def run(*args, **kwargs):
        impl.check(*args, **kwargs)
        return impl.reference(*args, **kwargs)

    return run


def kernel(op: str, backend: str | None, device: torch.device) -> Callable:
    """The callable that runs ``op`` on ``device`` for ``backend`` (module docstring); raises
    when that backend cannot serve the tensors."""
    if backend is None:
        if _extension.AVAILABLE:
            return getattr(torch.ops.lowrank, op)
        if device.type == "cuda" and OPS[op].triton is not None and TRITON_AVAILABLE:
            return triton_kernel(op)
        return _reference(op)
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS} or None, got {backend!r}")
    if backend == "reference":
        return _reference(op)
    if backend in ("cpu", "cuda"):
        native = "cuda" if device.type == "cuda" else "cpu"
        if backend != native:
            raise ValueError(f"backend: {backend!r} cannot run on {device.type} tensors")
        if not _extension.AVAILABLE:
            raise RuntimeError(f"backend: {backend!r} needs the extension: "
                               f"{_extension.LOAD_ERROR}")
        if backend == "cpu" or OPS[op].triton is None:  # project(_back): ATen on every device
            return getattr(torch.ops.lowrank, op)
        if op in TRITON_ONLY_OPS:
            raise NotImplementedError(f"backend: {op} has no CUDA C++ kernel (Triton serves "
                                      "CUDA tensors)")
        if not _has_cuda_cxx(op):
            raise RuntimeError(f"backend: the extension was built without a cuda kernel of {op}")
        return getattr(torch.ops.lowrank_cuda, op)
    if OPS[op].triton is None:
        raise NotImplementedError(f"backend: no Triton kernel of {op} exists")
    if not TRITON_AVAILABLE:
        raise RuntimeError("backend: 'triton' needs the triton package")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError("backend: 'triton' on CPU tensors needs TRITON_INTERPRET=1")
    return triton_kernel(op)


def call(op: str, backend: str | None, *args, **kwargs):
    """Runs ``op`` (see ``kernel``); with backend=None and the extension loaded this is
    ``torch.ops.lowrank.<op>(*args, **kwargs)``."""
    if backend is None and _extension.AVAILABLE:
        return getattr(torch.ops.lowrank, op)(*args, **kwargs)
    return kernel(op, backend, _device_of(args, kwargs))(*args, **kwargs)
