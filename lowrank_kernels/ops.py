"""Typed Python entry points of the ``lowrank`` ops, their fake kernels and autograd formulas.

Every op exists as ``torch.ops.lowrank.<op>`` (C++ CPU and CUDA kernels, schemas in
csrc/lowrank.cpp) and as a function here that picks a backend:

========== ==================================================================================
backend    implementation
========== ==================================================================================
cpu        C++ kernel (csrc/cpu), CPU tensors
cuda       C++/CUDA kernel (csrc/cuda), CUDA tensors
triton     Triton kernel (lowrank_kernels.triton_kernels); CPU tensors need TRITON_INTERPRET=1
reference  plain torch (lowrank_kernels.reference), any device
========== ==================================================================================

The backend is the ``backend=`` argument if given, else the environment variable
``LOWRANK_BACKEND``, else the best one available for the tensors' device (cpu, then reference on
CPU; triton, then cuda, then reference on GPUs — Triton first because it measured faster; its
fused step serves every projection and weight format). Asking explicitly for a backend that
cannot serve the tensors raises instead.
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Callable

import torch

from lowrank_kernels import _extension, reference

BACKENDS = ("cpu", "cuda", "triton", "reference")

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
STATE_DTYPES = (torch.float32, torch.bfloat16)

# op name -> "module:function" of its Triton launcher, imported on first use (Triton is optional).
TRITON_IMPLS: dict[str, str] = {}
TRITON_IMPLS["fused_galore_step"] = (
    "lowrank_kernels.triton_kernels.fused_galore_step:fused_galore_step")


# --------------------------------------------------------------------------------------------
# backend selection
# --------------------------------------------------------------------------------------------
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(op: str, device: torch.device, backend: str | None = None) -> str:
    """The backend that runs ``op`` on ``device`` (see the module docstring for the rule)."""
    name = backend or os.environ.get("LOWRANK_BACKEND") or "auto"
    if name not in BACKENDS + ("auto",):
        raise ValueError(f"backend: expected one of {BACKENDS} or 'auto', got {name!r}")
    native = "cuda" if device.type == "cuda" else "cpu"
    if name == "auto":
        # On GPUs Triton first: measured on an H100 (bench/results/gpu_step_h100.csv) its fused
        # step is 4-9x faster than the CUDA C++ kernel, which stays torch.ops.lowrank's kernel.
        if device.type == "cuda" and op in TRITON_IMPLS and _triton_importable():
            return "triton"
        if _extension.has_kernel(op, native.upper()):
            return native
        return "reference"
    if name in ("cpu", "cuda"):
        if name != native:
            raise ValueError(f"backend: {name!r} cannot run on {device.type} tensors")
        if not _extension.AVAILABLE:
            raise RuntimeError(f"backend: {name!r} needs the extension: {_extension.LOAD_ERROR}")
        if not _extension.has_kernel(op, native.upper()):
            raise RuntimeError(f"backend: the extension was built without a {name} kernel of {op}")
    if name == "triton":
        if op not in TRITON_IMPLS:
            raise NotImplementedError(f"backend: no Triton kernel of {op} exists")
        if not _triton_importable():
            raise RuntimeError("backend: 'triton' needs the triton package")
        if device.type == "cpu" and not _interpreting():
            raise ValueError("backend: 'triton' on CPU tensors needs TRITON_INTERPRET=1")
    return name


def _triton_impl(op: str) -> Callable:
    module, _, fn = TRITON_IMPLS[op].partition(":")
    return getattr(importlib.import_module(module), fn)


# --------------------------------------------------------------------------------------------
# validation: mirrors csrc/include/lowrank/checks.h (the fake kernels, Triton and reference paths
# run it; the C++ kernels run their own copy). Errors name the argument and the value expected.
# --------------------------------------------------------------------------------------------
def _check_float_matrix(t: torch.Tensor, name: str) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D tensor, got {t.dim()}-D")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: expected dtype float32, bfloat16 or float16, got {t.dtype}")


def _check_same_device(t: torch.Tensor, ref: torch.Tensor, name: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name}: expected device {ref.device} (that of param), got {t.device}")


def _check_contiguous(t: torch.Tensor, name: str) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous (row-major) tensor; call .contiguous()")


def low_rank_shape(m: int, n: int, rank: int) -> tuple[int, int]:
    """Shape of R, M and V for an m×n weight: (m, r) on the right side, (r, n) on the left."""
    return (m, rank) if reference.is_right_side(m, n) else (rank, n)


def check_dense_projection(m: int, n: int, proj: torch.Tensor) -> int:
    """Validates a dense basis for an m×n weight and returns its rank."""
    _check_float_matrix(proj, "proj")
    if reference.is_right_side(m, n):
        if proj.shape[1] != n:
            raise ValueError(f"proj: expected shape (r, n={n}) for a right projection (m >= n), "
                             f"got {list(proj.shape)}")
        rank = proj.shape[0]
    else:
        if proj.shape[0] != m:
            raise ValueError(f"proj: expected shape (m={m}, r) for a left projection (m < n), "
                             f"got {list(proj.shape)}")
        rank = proj.shape[1]
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"proj: rank r={rank} must lie in [1, min(m, n)={min(m, n)}]")
    return rank


def _check_state(s: torch.Tensor, param: torch.Tensor, shape: tuple[int, int], name: str) -> None:
    _check_same_device(s, param, name)
    if s.dtype not in STATE_DTYPES:
        raise ValueError(f"{name}: expected dtype float32 or bfloat16, got {s.dtype}")
    if tuple(s.shape) != shape:
        raise ValueError(f"{name}: expected shape {list(shape)}, got {list(s.shape)}")
    _check_contiguous(s, name)


def check_project(grad: torch.Tensor, proj: torch.Tensor) -> int:
    """Validates project's arguments (mirrors csrc/cpu/project.cpp); returns the rank."""
    _check_float_matrix(grad, "grad")
    _check_same_device(proj, grad, "proj")
    return check_dense_projection(*grad.shape, proj)


def check_project_back(low_rank: torch.Tensor, proj: torch.Tensor, m: int, n: int) -> int:
    """Validates project_back's arguments (mirrors csrc/cpu/project.cpp); returns the rank."""
    if m < 1 or n < 1:
        raise ValueError(f"m, n: expected positive sizes, got m={m}, n={n}")
    _check_float_matrix(low_rank, "low_rank")
    _check_same_device(proj, low_rank, "proj")
    rank = check_dense_projection(m, n, proj)
    if tuple(low_rank.shape) != low_rank_shape(m, n, rank):
        raise ValueError(f"low_rank: expected shape {list(low_rank_shape(m, n, rank))}, "
                         f"got {list(low_rank.shape)}")
    return rank


def check_hyperparameters(beta1: float, beta2: float, eps: float, step: int) -> None:
    if not 0.0 <= beta1 < 1.0:
        raise ValueError(f"beta1: expected a value in [0, 1), got {beta1}")
    if not 0.0 <= beta2 < 1.0:
        raise ValueError(f"beta2: expected a value in [0, 1), got {beta2}")
    if not eps >= 0.0:
        raise ValueError(f"eps: expected a value >= 0, got {eps}")
    if step < 1:
        raise ValueError(f"step: expected the already-incremented step (>= 1), got {step}")


def _is_fake(t: torch.Tensor) -> bool:
    """Fake (meta/tracing) tensors carry no values to check."""
    return isinstance(t, torch._subclasses.FakeTensor) or t.device.type == "meta"


def check_dct_indices(indices: torch.Tensor, d: int, name: str, *, check_values: bool = True
                      ) -> int:
    """Validates DCT row indices of a size-d basis (1-D int32, length r in [1, d]) and returns r.

    With ``check_values`` it also checks that they lie in [0, d) and do not repeat; on a GPU this
    reads the indices back (a host sync), which is why the C++ kernels check values only for CPU
    tensors (csrc/include/lowrank/checks.h)."""
    if indices.dim() != 1:
        raise ValueError(f"{name}: expected a 1-D tensor of DCT row indices, got {indices.dim()}-D")
    if indices.dtype != torch.int32:
        raise ValueError(f"{name}: expected dtype int32, got {indices.dtype}")
    rank = indices.shape[0]
    if not 1 <= rank <= d:
        raise ValueError(f"{name}: rank r={rank} must lie in [1, d={d}]")
    if check_values:
        values = indices.tolist()
        bad = [v for v in values if not 0 <= v < d]
        if bad:
            raise ValueError(f"{name}: index {bad[0]} is outside [0, d={d})")
        if len(set(values)) != rank:
            repeated = next(v for v in values if values.count(v) > 1)
            raise ValueError(f"{name}: index {repeated} is repeated")
    return rank


def check_dct_projection(m: int, n: int, proj: torch.Tensor, *, check_values: bool = True) -> int:
    """Validates DCT indices standing for the basis of an m×n weight (d = n right, m left)."""
    d = n if reference.is_right_side(m, n) else m
    return check_dct_indices(proj, d, "proj", check_values=check_values)


def check_dct_select(grad: torch.Tensor, rank: int, norm: int, method: str = "auto") -> None:
    _check_float_matrix(grad, "grad")
    d = min(grad.shape)
    if d < 1:
        raise ValueError(f"grad: expected a non-empty matrix, got shape {list(grad.shape)}")
    if not 1 <= rank <= d:
        raise ValueError(f"rank: expected a value in [1, min(m, n)={d}], got {rank}")
    if norm not in (1, 2):
        raise ValueError(f"norm: expected 1 or 2, got {norm}")
    if method not in ("auto", "fft", "dense"):
        raise ValueError(f"method: expected 'auto', 'fft' or 'dense', got {method!r}")


# --------------------------------------------------------------------------------------------
# ops
# --------------------------------------------------------------------------------------------
def project(grad: torch.Tensor, proj: torch.Tensor, *, backend: str | None = None
            ) -> torch.Tensor:
    """Projects a gradient into the low-rank space, in fp32 (DESIGN.md §4.1).

    R = G Qᵀ (m×r) when m ≥ n (proj Q is r×n), else R = Pᵀ G (r×n) (proj P is m×r).
    Differentiable in both arguments.
    """
    if resolve_backend("project", grad.device, backend) == "reference":
        check_project(grad, proj)
        return reference.project(grad, proj)
    return torch.ops.lowrank.project(grad, proj)


def project_back(low_rank: torch.Tensor, proj: torch.Tensor, m: int, n: int, scale: float = 1.0,
                 *, backend: str | None = None) -> torch.Tensor:
    """Maps a low-rank tensor back to the m×n weight space, in fp32: scale·N Q or scale·P N."""
    if resolve_backend("project_back", low_rank.device, backend) == "reference":
        check_project_back(low_rank, proj, m, n)
        return reference.project_back(low_rank, proj, m, n, scale)
    return torch.ops.lowrank.project_back(low_rank, proj, m, n, scale)


def fused_galore_step(param: torch.Tensor, grad: torch.Tensor, proj: torch.Tensor,
                      exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *, lr: float,
                      beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-6,
                      weight_decay: float = 0.0, scale: float = 1.0, step: int,
                      proj_scales: torch.Tensor | None = None,
                      proj_zeros: torch.Tensor | None = None, proj_group_size: int = 256,
                      param_scales: torch.Tensor | None = None,
                      param_zeros: torch.Tensor | None = None, param_group_size: int = 256,
                      seed: int = 0, backend: str | None = None) -> None:
    """One fused GaLore AdamW step on an m×n weight, in place (DESIGN.md §4.2).

    With R = project(G, proj) (side by §4.1; proj is r×n when m ≥ n, else m×r):

        M ← β1·M + (1−β1)·R          V ← β2·V + (1−β2)·R²          N = M / (√V + ε)
        W ← (1 − lr·wd)·(W − α_t·scale·back(N)),     α_t = lr·√(1−β2ᵗ)/(1−β1ᵗ)

    ε is not bias-corrected and decay is applied after the update, as in galore-torch's
    ``GaLoreAdamW``. ``step`` is the step count after incrementing (1 on the first step).
    ``param``/``grad`` may be fp32, bf16 or fp16, ``exp_avg``/``exp_avg_sq`` fp32 or bf16; all
    arithmetic is fp32 and every stored value is rounded once. No m×n temporary is materialised
    by the cpu, cuda and triton backends. bf16 moments are stored with stochastic rounding
    (unbiased: a nearest-rounded V cannot decay at β2 = 0.999), |x| rounded up with probability
    (dropped bits)/2^16 from the words of one Philox call per element under key seed +
    2**32·step at counter (row-major index, 1, 0, 0), the first for exp_avg and the second for
    exp_avg_sq (``reference.store_moments_``); N uses the fp32 moments. seed in [0, 2**32) and
    step < 2**31 then, as for INT8 codes.

    Q-GaLore formats (DESIGN.md §4.3-§4.4, see :func:`quantize_int4` / :func:`quantize_int8`):
    a uint8 ``proj`` is a packed INT4 basis (1-D, with ``proj_scales``/``proj_zeros`` and
    ``proj_group_size``; the rank is that of ``exp_avg``); a uint8 ``param`` holds INT8 codes
    whose ``param_scales``/``param_zeros`` are rewritten in place: W' is computed in fp32 from
    the dequantized weight and stochastically rounded with u = tl.rand(seed + 2**32·step,
    row-major index), seed in [0, 2**32).
    """
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                 scale=scale, step=step)
    formats = dict(proj_scales=proj_scales, proj_zeros=proj_zeros,
                   proj_group_size=proj_group_size, param_scales=param_scales,
                   param_zeros=param_zeros, param_group_size=param_group_size, seed=seed)
    chosen = resolve_backend("fused_galore_step", param.device, backend)
    if chosen in ("cpu", "cuda"):
        torch.ops.lowrank.fused_galore_step(param, grad, proj, exp_avg, exp_avg_sq, **hyper,
                                            **formats)
        return
    if chosen == "triton":  # every format: the launcher validates, then generates the basis
        _triton_impl("fused_galore_step")(param, grad, proj, exp_avg, exp_avg_sq, **hyper,
                                          **formats)
        return
    check_fused_galore_step(param, grad, proj, exp_avg, exp_avg_sq, beta1=beta1, beta2=beta2,
                            eps=eps, step=step, **formats)
    if proj.dtype == torch.int32:  # DCT indices: the dense rows they stand for (§4.5)
        proj = reference.dct_projection(proj, *param.shape)
    if proj.dtype == torch.uint8 or param.dtype == torch.uint8:
        reference.fused_qgalore_step(param, grad, proj, exp_avg, exp_avg_sq, **hyper, **formats)
    else:
        reference.fused_galore_step(param, grad, proj, exp_avg, exp_avg_sq, **hyper, seed=seed)


# --------------------------------------------------------------------------------------------
# DCT projection (DESIGN.md §4.5)
# --------------------------------------------------------------------------------------------
TRITON_IMPLS["dct_select"] = "lowrank_kernels.triton_kernels.dct_select:dct_select"
TRITON_IMPLS["dct_basis"] = "lowrank_kernels.triton_kernels.dct_select:dct_basis"


def dct_select(grad: torch.Tensor, rank: int, norm: int = 1, *, method: str = "auto",
               backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Picks the rank rows of the orthonormal DCT-II basis (size d = min(m, n)) best aligned with G
    and projects G onto them (DESIGN.md §4.5). Side by §4.1.

    right (m ≥ n): X = G Cᵀ (m×d), score_k = ‖X[:, k]‖_norm, R = X[:, idx] (m×r)
    left  (m < n): X = C G (d×n), score_k = ‖X[k, :]‖_norm, R = X[idx, :] (r×n)

    Returns ``(idx, R)``: idx int32 (length r, increasing; ties go to the lower index), R fp32.
    ``method`` (cpu backend): "fft" (Makhoul rfft, O(m·n·log d)), "dense" (GEMM with C) or "auto"
    (by d); the triton and cuda kernels have one method (tiled products with C generated on the
    fly, no m×n coefficient matrix) and accept any valid value. The result is the dense basis' projection: ``project(G, dct_basis(d, idx))`` on the
    right, with ``dct_basis(d, idx).T`` on the left.
    """
    chosen = resolve_backend("dct_select", grad.device, backend)
    if chosen in ("cpu", "cuda"):
        return torch.ops.lowrank.dct_select(grad, rank, norm, method=method)
    check_dct_select(grad, rank, norm, method)
    if chosen == "triton":
        return _triton_impl("dct_select")(grad, rank, norm, method)
    return reference.dct_select(grad, rank, norm)


def dct_basis(d: int, indices: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Rows ``indices`` (int32, distinct, in [0, d)) of the orthonormal DCT-II basis of size d:
    C[k, i] = c_k·cos(π(2i+1)k/(2d)), an r×d fp32 tensor (rows of
    ``scipy.fft.dct(eye(d), norm="ortho", axis=0)``)."""
    if d < 1:
        raise ValueError(f"d: expected a basis size >= 1, got {d}")
    chosen = resolve_backend("dct_basis", indices.device, backend)
    if chosen in ("cpu", "cuda"):
        return torch.ops.lowrank.dct_basis(d, indices)
    check_dct_indices(indices, d, "indices")
    if chosen == "triton":
        return _triton_impl("dct_basis")(d, indices)
    return reference.dct_basis(d, indices)


# --------------------------------------------------------------------------------------------
# fake kernels and autograd (only when the extension registered the schemas)
# --------------------------------------------------------------------------------------------
if _extension.AVAILABLE:

    @torch.library.register_fake("lowrank::project")
    def _project_fake(grad, proj):
        rank = check_project(grad, proj)
        return grad.new_empty(low_rank_shape(*grad.shape, rank), dtype=torch.float32)

    @torch.library.register_fake("lowrank::project_back")
    def _project_back_fake(low_rank, proj, m, n, scale):
        check_project_back(low_rank, proj, m, n)
        return low_rank.new_empty((m, n), dtype=torch.float32)

    @torch.library.register_fake("lowrank::fused_galore_step")
    def _fused_galore_step_fake(param, grad, proj, exp_avg, exp_avg_sq, *, lr, beta1, beta2, eps,
                                weight_decay, scale, step, proj_scales=None, proj_zeros=None,
                                proj_group_size=256, param_scales=None, param_zeros=None,
                                param_group_size=256, seed=0):
        check_fused_galore_step(param, grad, proj, exp_avg, exp_avg_sq, beta1=beta1,
                                beta2=beta2, eps=eps, step=step, proj_scales=proj_scales,
                                proj_zeros=proj_zeros, param_scales=param_scales,
                                param_zeros=param_zeros, proj_group_size=proj_group_size,
                                param_group_size=param_group_size, seed=seed)

    @torch.library.register_fake("lowrank::dct_select")
    def _dct_select_fake(grad, rank, norm=1, *, method="auto"):
        check_dct_select(grad, rank, norm, method)
        shape = low_rank_shape(*grad.shape, rank)
        return (grad.new_empty((rank,), dtype=torch.int32),
                grad.new_empty(shape, dtype=torch.float32))

    @torch.library.register_fake("lowrank::dct_basis")
    def _dct_basis_fake(d, indices):
        if d < 1:
            raise ValueError(f"d: expected a basis size >= 1, got {d}")
        rank = check_dct_indices(indices, d, "indices", check_values=False)
        return indices.new_empty((rank, d), dtype=torch.float32)

    def _setup_project(ctx, inputs, output):
        grad, proj = inputs
        ctx.save_for_backward(grad, proj)

    def _project_backward(ctx, d_low_rank):
        grad, proj = ctx.saved_tensors
        m, n = grad.shape
        d_grad = d_proj = None
        if ctx.needs_input_grad[0]:
            d_grad = torch.ops.lowrank.project_back(d_low_rank, proj, m, n, 1.0).to(grad.dtype)
        if ctx.needs_input_grad[1]:
            g32 = grad.float()
            # right: R = G Qᵀ -> dQ = dRᵀ G;  left: R = Pᵀ G -> dP = G dRᵀ
            d_proj = d_low_rank.T @ g32 if reference.is_right_side(m, n) else g32 @ d_low_rank.T
            d_proj = d_proj.to(proj.dtype)
        return d_grad, d_proj

    torch.library.register_autograd("lowrank::project", _project_backward,
                                    setup_context=_setup_project)

    def _setup_project_back(ctx, inputs, output):
        low_rank, proj, m, n, scale = inputs
        ctx.save_for_backward(low_rank, proj)
        ctx.shape, ctx.scale = (m, n), scale

    def _project_back_backward(ctx, d_out):
        low_rank, proj = ctx.saved_tensors
        m, n = ctx.shape
        d_low_rank = d_proj = None
        if ctx.needs_input_grad[0]:
            d_low_rank = (torch.ops.lowrank.project(d_out, proj) * ctx.scale).to(low_rank.dtype)
        if ctx.needs_input_grad[1]:
            n32 = low_rank.float() * ctx.scale
            # right: out = s·N Q -> dQ = s·Nᵀ dOut;  left: out = s·P N -> dP = s·dOut Nᵀ
            d_proj = n32.T @ d_out.float() if reference.is_right_side(m, n) else d_out.float() @ n32.T
            d_proj = d_proj.to(proj.dtype)
        return d_low_rank, d_proj, None, None, None

    torch.library.register_autograd("lowrank::project_back", _project_back_backward,
                                    setup_context=_setup_project_back)


# --------------------------------------------------------------------------------------------
# Q-GaLore formats (DESIGN.md §4.3-§4.4): Philox uniforms, INT4/INT8 group quantization.
# A group is `group_size` consecutive row-major elements of the flattened tensor (the last may be
# partial; groups may straddle rows); scales and zeros are fp32, one per group. Validation
# mirrors the quantized section of csrc/include/lowrank/checks.h.
# --------------------------------------------------------------------------------------------
MAX_ROUNDING_SEED = 2**32 - 1
for _op in ("philox_uniform", "quantize_int4", "dequantize_int4", "quantize_int8",
            "dequantize_int8"):
    TRITON_IMPLS[_op] = f"lowrank_kernels.triton_kernels.quant:{_op}"
MAX_ROUNDING_STEP = 2**31 - 1


def check_group_size(group_size: int, name: str, *, packed_int4: bool) -> None:
    if group_size < 1:
        raise ValueError(f"{name}: expected a positive group size, got {group_size}")
    if packed_int4 and group_size % 2:
        raise ValueError(f"{name}: expected an even group size for packed INT4 codes (two per "
                         f"byte), got {group_size}")


def check_group_params(t: torch.Tensor | None, numel: int, group_size: int,
                       device: torch.device, name: str, what: str) -> None:
    if t is None:
        raise ValueError(f"{name}: required with {what}")
    groups = reference.num_groups(numel, group_size)
    if t.dtype != torch.float32:
        raise ValueError(f"{name}: expected dtype float32, got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != groups:
        raise ValueError(f"{name}: expected shape [{groups}] (ceil({numel} / group size "
                         f"{group_size})), got {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name}: expected device {device}, got {t.device}")
    _check_contiguous(t, name)


def check_rounding_seed(seed: int) -> None:
    if not 0 <= seed <= MAX_ROUNDING_SEED:
        raise ValueError(f"seed: expected a value in [0, 2^32 - 1], got {seed}")


def _check_uint8(t: torch.Tensor, name: str, what: str) -> None:
    if t.dtype != torch.uint8:
        raise ValueError(f"{name}: expected dtype uint8 ({what}), got {t.dtype}")


def _check_quantize_input(x: torch.Tensor) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x: expected dtype float32, bfloat16 or float16, got {x.dtype}")
    if x.numel() < 1:
        raise ValueError("x: expected at least one element")


def check_fused_galore_step(param, grad, proj, exp_avg, exp_avg_sq, *, beta1, beta2, eps, step,
                            proj_scales=None, proj_zeros=None, proj_group_size=256,
                            param_scales=None, param_zeros=None, param_group_size=256, seed=0
                            ) -> int:
    """Validates a fused step in any format (mirrors checks.h) and returns the rank. proj: dense
    float basis, int32 DCT indices, or a packed INT4 basis (uint8; the rank is then that of
    exp_avg); param: float weight or INT8 codes (uint8)."""
    int8_weight = param.dtype == torch.uint8
    if param.dim() != 2:
        raise ValueError(f"param: expected a 2-D tensor, got {param.dim()}-D")
    if not int8_weight:
        _check_float_matrix(param, "param")
    _check_contiguous(param, "param")
    _check_float_matrix(grad, "grad")
    _check_same_device(grad, param, "grad")
    if grad.shape != param.shape:
        raise ValueError(f"grad: expected the shape of param {list(param.shape)}, "
                         f"got {list(grad.shape)}")
    _check_contiguous(grad, "grad")
    _check_same_device(proj, param, "proj")
    m, n = param.shape
    right = reference.is_right_side(m, n)
    if proj.dtype == torch.uint8:
        if exp_avg.dim() != 2 or exp_avg.shape[0 if right else 1] != (m if right else n):
            raise ValueError(f"exp_avg: expected shape {'(m, r)' if right else '(r, n)'} (its "
                             f"rank sets that of the packed proj), got {list(exp_avg.shape)}")
        rank = exp_avg.shape[1] if right else exp_avg.shape[0]
        if not 1 <= rank <= min(m, n):
            raise ValueError(f"exp_avg: rank r={rank} must lie in [1, min(m, n)={min(m, n)}]")
        basis_numel = math.prod(reference.quantized_basis_shape(m, n, rank))
        if proj.dim() != 1 or proj.shape[0] != (basis_numel + 1) // 2:
            raise ValueError(f"proj: expected a 1-D packed INT4 basis of {(basis_numel + 1) // 2}"
                             f" bytes (ceil({basis_numel} / 2)), got shape {list(proj.shape)}")
        _check_contiguous(proj, "proj")
        check_group_size(proj_group_size, "proj_group_size", packed_int4=True)
        for t, name in ((proj_scales, "proj_scales"), (proj_zeros, "proj_zeros")):
            check_group_params(t, basis_numel, proj_group_size, param.device, name,
                               "a packed INT4 (uint8) proj")
    else:
        # Signed integers can only mean DCT indices (uint8 is packed INT4): report them as such.
        dct = not proj.dtype.is_floating_point and proj.dtype not in (torch.bool, torch.uint8)
        rank = (check_dct_projection(m, n, proj, check_values=not _is_fake(proj))
                if dct else check_dense_projection(m, n, proj))
        _check_contiguous(proj, "proj")
        if proj_scales is not None or proj_zeros is not None:
            raise ValueError("proj_scales/proj_zeros: only valid with a packed INT4 (uint8) proj")
    shape = low_rank_shape(m, n, rank)
    _check_state(exp_avg, param, shape, "exp_avg")
    _check_state(exp_avg_sq, param, shape, "exp_avg_sq")
    if exp_avg_sq.dtype != exp_avg.dtype:
        raise ValueError(f"exp_avg_sq: expected the dtype of exp_avg ({exp_avg.dtype}), got "
                         f"{exp_avg_sq.dtype}")
    if exp_avg is exp_avg_sq:
        raise ValueError("exp_avg_sq: must not alias exp_avg")
    if int8_weight:
        check_group_size(param_group_size, "param_group_size", packed_int4=False)
        for t, name in ((param_scales, "param_scales"), (param_zeros, "param_zeros")):
            check_group_params(t, m * n, param_group_size, param.device, name,
                               "INT8 (uint8) param codes")
        if param_scales is param_zeros:
            raise ValueError("param_zeros: must not alias param_scales")
    elif param_scales is not None or param_zeros is not None:
        raise ValueError("param_scales/param_zeros: only valid with INT8 (uint8) param codes")
    if int8_weight or exp_avg.dtype == torch.bfloat16:  # a stochastic-rounding stream
        check_rounding_seed(seed)
        if step > MAX_ROUNDING_STEP:
            raise ValueError(f"step: expected a value <= 2^31 - 1, got {step}")
    check_hyperparameters(beta1, beta2, eps, step)
    return rank


def _check_philox_args(seed: int, offsets: torch.Tensor) -> None:
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed: expected a value in [0, 2^63 - 1], got {seed}")
    if offsets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"offsets: expected dtype int64 or int32, got {offsets.dtype}")


def _check_dequantize_int4_args(packed, scales, zeros, shape, group_size) -> int:
    _check_uint8(packed, "packed", "two INT4 codes per byte")
    check_group_size(group_size, "group_size", packed_int4=True)
    if any(d < 0 for d in shape) or math.prod(shape) < 1:
        raise ValueError(f"shape: expected at least one element, got {list(shape)}")
    numel = math.prod(shape)
    if packed.dim() != 1 or packed.shape[0] != (numel + 1) // 2:
        raise ValueError(f"packed: expected shape [{(numel + 1) // 2}] (ceil({numel} / 2) bytes "
                         f"for shape {list(shape)}), got {list(packed.shape)}")
    _check_contiguous(packed, "packed")
    for t, name in ((scales, "scales"), (zeros, "zeros")):
        check_group_params(t, numel, group_size, packed.device, name, "INT4 codes")
    return numel


def _check_dequantize_int8_args(codes, scales, zeros, group_size) -> None:
    _check_uint8(codes, "codes", "INT8 codes")
    check_group_size(group_size, "group_size", packed_int4=False)
    if codes.numel() < 1:
        raise ValueError("codes: expected at least one element")
    for t, name in ((scales, "scales"), (zeros, "zeros")):
        check_group_params(t, codes.numel(), group_size, codes.device, name, "INT8 codes")


def philox_uniform(seed: int, offsets: torch.Tensor, *, backend: str | None = None
                   ) -> torch.Tensor:
    """u ∈ [0, 1) in fp32, equal bit for bit to Triton's ``tl.rand(seed, offsets)``.

    Philox-4x32-10: key = (low, high) 32-bit words of seed ∈ [0, 2**63); counter = (low, high
    words of the offset, 0, 0). These are the numbers every backend's stochastic rounding uses,
    with seed = seed + 2**32·step and offset = the element's row-major index.
    """
    chosen = resolve_backend("philox_uniform", offsets.device, backend)
    if chosen in ("cpu", "cuda"):
        return torch.ops.lowrank.philox_uniform(seed, offsets)
    _check_philox_args(seed, offsets)
    if chosen == "triton":
        return _triton_impl("philox_uniform")(seed, offsets)
    return reference.philox_uniform(seed, offsets)


def quantize_int4(x: torch.Tensor, group_size: int = 256, *, backend: str | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed INT4 codes of x's row-major groups, with fp32 scales and zeros (DESIGN.md §4.3).

    Per group: s = max(max − min, 1e-5)/15, z = clamp(−round(min/s), 0, 15),
    q = clamp(round(x/s) + z, 0, 15); two codes per byte, element 2k in the low nibble.
    Returns (packed uint8 [ceil(numel/2)], scales [groups], zeros [groups]); group_size even.
    A group that does not contain 0 saturates (as q-galore-torch's quantizer).
    """
    chosen = resolve_backend("quantize_int4", x.device, backend)
    if chosen in ("cpu", "cuda"):
        return torch.ops.lowrank.quantize_int4(x, group_size)
    _check_quantize_input(x)
    check_group_size(group_size, "group_size", packed_int4=True)
    if chosen == "triton":
        return _triton_impl("quantize_int4")(x, group_size)
    return reference.quantize_int4(x, group_size)


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    shape: list[int], group_size: int = 256, *, backend: str | None = None
                    ) -> torch.Tensor:
    """x̃ = s·(q − z) of a packed INT4 buffer, an fp32 tensor of ``shape``."""
    chosen = resolve_backend("dequantize_int4", packed.device, backend)
    if chosen in ("cpu", "cuda"):
        return torch.ops.lowrank.dequantize_int4(packed, scales, zeros, list(shape), group_size)
    _check_dequantize_int4_args(packed, scales, zeros, shape, group_size)
    if chosen == "triton":
        return _triton_impl("dequantize_int4")(packed, scales, zeros, list(shape), group_size)
    return reference.dequantize_int4(packed, scales, zeros, list(shape), group_size)


def quantize_int8(x: torch.Tensor, group_size: int = 256, stochastic: bool = False,
                  seed: int = 0, *, backend: str | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """INT8 codes (uint8, x's shape) of x's row-major groups, fp32 scales and zeros (§4.4).

    As :func:`quantize_int4` with 255 levels. ``stochastic``: q = clamp(SR(x/s) + z, 0, 255),
    SR(y) = ⌊y⌋ + [u < y − ⌊y⌋], u = philox_uniform(seed, row-major index), seed ∈ [0, 2**32)
    (the stream of ``fused_galore_step`` at step 0).
    """
    chosen = resolve_backend("quantize_int8", x.device, backend)
    if chosen in ("cpu", "cuda"):
        return torch.ops.lowrank.quantize_int8(x, group_size, stochastic, seed)
    _check_quantize_input(x)
    check_group_size(group_size, "group_size", packed_int4=False)
    check_rounding_seed(seed)
    if chosen == "triton":
        return _triton_impl("quantize_int8")(x, group_size, stochastic, seed)
    return reference.quantize_int8(x, group_size, stochastic, seed)


def dequantize_int8(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    group_size: int = 256, *, backend: str | None = None) -> torch.Tensor:
    """x̃ = s·(q − z) of INT8 codes, an fp32 tensor of the codes' shape."""
    chosen = resolve_backend("dequantize_int8", codes.device, backend)
    if chosen in ("cpu", "cuda"):
        return torch.ops.lowrank.dequantize_int8(codes, scales, zeros, group_size)
    _check_dequantize_int8_args(codes, scales, zeros, group_size)
    if chosen == "triton":
        return _triton_impl("dequantize_int8")(codes, scales, zeros, group_size)
    return reference.dequantize_int8(codes, scales, zeros, group_size)


if _extension.AVAILABLE:

    @torch.library.register_fake("lowrank::philox_uniform")
    def _philox_uniform_fake(seed, offsets):
        _check_philox_args(seed, offsets)
        return offsets.new_empty(offsets.shape, dtype=torch.float32)

    def _group_params_fake(x: torch.Tensor, numel: int, group_size: int):
        groups = reference.num_groups(numel, group_size)
        return (x.new_empty((groups,), dtype=torch.float32),
                x.new_empty((groups,), dtype=torch.float32))

    @torch.library.register_fake("lowrank::quantize_int4")
    def _quantize_int4_fake(x, group_size=256):
        _check_quantize_input(x)
        check_group_size(group_size, "group_size", packed_int4=True)
        packed = x.new_empty(((x.numel() + 1) // 2,), dtype=torch.uint8)
        return (packed, *_group_params_fake(x, x.numel(), group_size))

    @torch.library.register_fake("lowrank::dequantize_int4")
    def _dequantize_int4_fake(packed, scales, zeros, shape, group_size=256):
        _check_dequantize_int4_args(packed, scales, zeros, shape, group_size)
        return packed.new_empty(list(shape), dtype=torch.float32)

    @torch.library.register_fake("lowrank::quantize_int8")
    def _quantize_int8_fake(x, group_size=256, stochastic=False, seed=0):
        _check_quantize_input(x)
        check_group_size(group_size, "group_size", packed_int4=False)
        check_rounding_seed(seed)
        codes = x.new_empty(x.shape, dtype=torch.uint8)
        return (codes, *_group_params_fake(x, x.numel(), group_size))

    @torch.library.register_fake("lowrank::dequantize_int8")
    def _dequantize_int8_fake(codes, scales, zeros, group_size=256):
        _check_dequantize_int8_args(codes, scales, zeros, group_size)
        return codes.new_empty(codes.shape, dtype=torch.float32)
