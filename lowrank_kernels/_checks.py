"""Argument validation of every lowrank op, one function per op with the op's schema signature.

A leaf module (it imports torch and the reference only), used by every Python entry that does
not reach a C++ kernel: the reference path (lowrank_kernels._dispatch), the fake kernels
(lowrank_kernels._fakes) and the Triton launchers (lowrank_kernels.triton_kernels). It mirrors
csrc/include/lowrank/checks.h, message for message: each failure is a ValueError naming the
argument and the value expected, raised before any tensor is written.

Layout rule (as checks.h): tensors an op writes in place (param, exp_avg, exp_avg_sq,
param_scales, param_zeros) must be dense row-major; read-only inputs (grad, proj, proj_scales,
proj_zeros, indices, packed codes, scales and zeros of dequantize) may have any strides, as
other libraries hold them (galore-torch's basis is a strided SVD output; a gradient may be a
transposed view).

Sizes may be symbolic (fake tensors under torch.compile with dynamic shapes): size and value
conditions go through ``_require`` (torch._check_value), which records a guard or a deferred
runtime assert on the symbols instead of specialising them to the traced values. Values that
live in device memory (DCT indices) are read only for real CPU tensors, as checks.h does: on a
GPU that read would synchronise the host on every step.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from lowrank_kernels import reference

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
STATE_DTYPES = (torch.float32, torch.bfloat16)
# 8-bit moment codes (DESIGN.md §4.9): int8 for exp_avg (signed M), uint8 for exp_avg_sq (√V)
MOMENT_CODE_DTYPES = {"exp_avg": torch.int8, "exp_avg_sq": torch.uint8}
INNER_RULES = reference.INNER_RULES
# state_block_size: a power of two dividing every rank tile of the Triton kernels (32, 64, 128),
# so that a program always holds whole blocks
MAX_MOMENT_BLOCK = 32
MAX_ROUNDING_SEED = 2**32 - 1
MAX_ROUNDING_STEP = 2**31 - 1


def _require(cond, message: Callable[[], str]) -> None:
    """ValueError(message()) unless ``cond``; a plain True costs one comparison, a SymBool is
    handed to torch._check_value (see the module docstring)."""
    if cond is not True:
        torch._check_value(cond, message)


def is_fake(t: torch.Tensor) -> bool:
    """Fake (meta/tracing) tensors carry no values to check."""
    return isinstance(t, torch._subclasses.FakeTensor) or t.device.type == "meta"


# --------------------------------------------------------------------------------------------
# shared pieces
# --------------------------------------------------------------------------------------------
def check_float_matrix(t: torch.Tensor, name: str) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D tensor, got {t.dim()}-D")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: expected dtype float32, bfloat16 or float16, got {t.dtype}")


def check_same_device(t: torch.Tensor, ref: torch.Tensor, name: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name}: expected device {ref.device} (that of param), got {t.device}")


def check_contiguous(t: torch.Tensor, name: str) -> None:
    """For tensors written in place (read-only inputs may have any strides)."""
    _require(t.is_contiguous(),
             lambda: f"{name}: expected a contiguous (row-major) tensor; call .contiguous() first")


def step_side(m: int, n: int, right: bool | None = None) -> bool:
    """The projection side of a step: ``right`` if given, else the side rule m ≥ n."""
    return reference.is_right_side(m, n) if right is None else bool(right)


def low_rank_shape(m: int, n: int, rank: int, right: bool | None = None) -> tuple[int, int]:
    """Shape of R, M and V for an m×n weight: (m, r) on the right side, (r, n) on the left (side:
    ``right``, else the side rule)."""
    return (m, rank) if step_side(m, n, right) else (rank, n)


def moment_scales_shape(m: int, n: int, rank: int, block_size: int, right: bool | None = None
                        ) -> tuple[int, int]:
    """Shape of the fp32 block scales of 8-bit moments: (own, ⌈r/B⌉), own = m (right) or n."""
    return (m if step_side(m, n, right) else n), -(-rank // block_size)


def _check_rank(rank: int, m: int, n: int, name: str, right: bool | None = None) -> None:
    """r in [1, min(m, n)] by the side rule; with an explicit side, r in [1, d] with d the
    basis' dimension (n right, m left): a shard's other axis may be shorter than r, or empty."""
    if right is None:
        _require(rank >= 1, lambda: f"{name}: rank r={rank} must lie in [1, min(m, n)="
                                    f"{min(m, n)}]")
        _require(rank <= torch.sym_min(m, n),
                 lambda: f"{name}: rank r={rank} must lie in [1, min(m, n)={min(m, n)}]")
        return
    d, axis, side = (n, "n", "right") if right else (m, "m", "left")

    def message() -> str:
        return f"{name}: rank r={rank} must lie in [1, {axis}={d}] ({side} side given)"

    _require(rank >= 1, message)
    _require(rank <= d, message)


def _check_shape(t: torch.Tensor, shape: tuple | list, name: str, what: str = "") -> None:
    if t.dim() != len(shape):
        raise ValueError(f"{name}: expected shape {list(shape)}{what}, got {list(t.shape)}")
    for have, want in zip(t.shape, shape, strict=True):
        _require(have == want, lambda: f"{name}: expected shape {list(shape)}{what}, "
                                       f"got {list(t.shape)}")


def check_dense_projection(m: int, n: int, proj: torch.Tensor, right: bool | None = None) -> int:
    """Validates a dense basis for an m×n weight (side: ``right``, else the side rule) and
    returns its rank."""
    check_float_matrix(proj, "proj")
    if step_side(m, n, right):
        rule = "" if right is not None else " (m >= n)"
        _require(proj.shape[1] == n, lambda: f"proj: expected shape (r, n={n}) for a right "
                                             f"projection{rule}, got {list(proj.shape)}")
        rank = proj.shape[0]
    else:
        rule = "" if right is not None else " (m < n)"
        _require(proj.shape[0] == m, lambda: f"proj: expected shape (m={m}, r) for a left "
                                             f"projection{rule}, got {list(proj.shape)}")
        rank = proj.shape[1]
    _check_rank(rank, m, n, "proj", right)
    return rank


def _check_state(s: torch.Tensor, param: torch.Tensor, shape: tuple[int, int], name: str) -> None:
    """A moment: fp32, bf16, or its 8-bit code dtype (MOMENT_CODE_DTYPES)."""
    check_same_device(s, param, name)
    code = MOMENT_CODE_DTYPES[name]
    if s.dtype not in (*STATE_DTYPES, code):
        raise ValueError(f"{name}: expected dtype float32, bfloat16 or {code} (8-bit codes), "
                         f"got {s.dtype}")
    _check_shape(s, shape, name)
    check_contiguous(s, name)


def check_inner_rule(inner: str) -> None:
    if inner not in INNER_RULES:
        raise ValueError(f"inner: expected 'adam' or 'adagrad', got {inner!r}")


def check_state_block_size(block_size: int) -> None:
    _require(block_size >= 1, lambda: _block_message(block_size))
    _require(block_size <= MAX_MOMENT_BLOCK, lambda: _block_message(block_size))
    _require(block_size & (block_size - 1) == 0, lambda: _block_message(block_size))


def _block_message(block_size: int) -> str:
    return (f"state_block_size: expected a power of two in [1, {MAX_MOMENT_BLOCK}] (it must "
            f"divide the Triton kernels' rank tiles), got {block_size}")


def _check_moment_scales(scales: torch.Tensor | None, codes: torch.Tensor | None, name: str,
                         codes_name: str, shape: tuple, param: torch.Tensor) -> None:
    """Block scales of 8-bit moment codes: fp32, ``shape`` (own, ⌈r/B⌉), dense (rewritten)."""
    code = MOMENT_CODE_DTYPES[codes_name]
    if codes is None or codes.dtype != code:
        if scales is not None:
            raise ValueError(f"{name}: only valid with 8-bit ({code}) {codes_name} codes")
        return
    if scales is None:
        raise ValueError(f"{name}: required with 8-bit ({code}) {codes_name} codes")
    if scales.dtype != torch.float32:
        raise ValueError(f"{name}: expected dtype float32, got {scales.dtype}")
    _check_shape(scales, shape, name, " (own, ceil(r / state_block_size))")
    if scales.device != param.device:
        raise ValueError(f"{name}: expected device {param.device}, got {scales.device}")
    check_contiguous(scales, name)


def check_moments(exp_avg: torch.Tensor | None, exp_avg_sq: torch.Tensor, param: torch.Tensor,
                  shape: tuple, *, inner: str = "adam",
                  exp_avg_scales: torch.Tensor | None = None,
                  exp_avg_sq_scales: torch.Tensor | None = None, state_block_size: int = 32,
                  own: int = 0, rank: int = 0) -> None:
    """The moments of a step (checks.h check_moments): exp_avg (None for AdaGrad) and exp_avg_sq
    both fp32, both bf16, or 8-bit codes (int8 M, uint8 √V) with their block scales, of shape
    (own, ⌈rank/B⌉) (own: m on the right side, n on the left)."""
    check_inner_rule(inner)
    if inner == "adagrad":
        if exp_avg is not None:
            raise ValueError("exp_avg: expected None with inner='adagrad' (AdaGrad keeps no "
                             "first moment), got a tensor")
    elif exp_avg is None:
        raise ValueError("exp_avg: required with inner='adam' (None only with inner='adagrad')")
    if exp_avg is not None:
        _check_state(exp_avg, param, shape, "exp_avg")
    if exp_avg_sq.dim() == 1:
        _check_factored(exp_avg, exp_avg_sq, param, inner, exp_avg_sq_scales, own + rank)
    else:
        _check_state(exp_avg_sq, param, shape, "exp_avg_sq")
    if exp_avg is not None and exp_avg_sq.dim() == 2:
        if exp_avg.dtype == torch.int8:
            if exp_avg_sq.dtype != torch.uint8:
                raise ValueError(f"exp_avg_sq: expected dtype torch.uint8 (8-bit codes of "
                                 f"sqrt(V)) with 8-bit exp_avg codes, got {exp_avg_sq.dtype}")
        elif exp_avg_sq.dtype != exp_avg.dtype:
            raise ValueError(f"exp_avg_sq: expected the dtype of exp_avg ({exp_avg.dtype}), got "
                             f"{exp_avg_sq.dtype}")
        if exp_avg is exp_avg_sq:
            raise ValueError("exp_avg_sq: must not alias exp_avg")
    check_state_block_size(state_block_size)
    scales_shape = (own, -(-rank // state_block_size))
    _check_moment_scales(exp_avg_scales, exp_avg, "exp_avg_scales", "exp_avg", scales_shape,
                         param)
    _check_moment_scales(exp_avg_sq_scales, exp_avg_sq, "exp_avg_sq_scales", "exp_avg_sq",
                         scales_shape, param)
    if exp_avg_scales is not None and exp_avg_scales is exp_avg_sq_scales:
        raise ValueError("exp_avg_sq_scales: must not alias exp_avg_scales")


def _check_factored(exp_avg: torch.Tensor | None, exp_avg_sq: torch.Tensor,
                    param: torch.Tensor, inner: str, exp_avg_sq_scales: torch.Tensor | None,
                    length: int) -> None:
    """A factored second moment (1-D exp_avg_sq, DESIGN.md §4.12): r + own fp32 values, Adam
    only; M (exp_avg) in any of its formats."""
    if inner != "adam":
        raise ValueError(f"exp_avg_sq: a factored (1-D) second moment needs inner='adam', got "
                         f"inner={inner!r}")
    check_same_device(exp_avg_sq, param, "exp_avg_sq")
    if exp_avg_sq.dtype != torch.float32:
        raise ValueError(f"exp_avg_sq: expected dtype float32 for a factored (1-D) second "
                         f"moment, got {exp_avg_sq.dtype}")
    _require(exp_avg_sq.shape[0] == length,
             lambda: f"exp_avg_sq: expected shape [{length}] (r + own factors) for a factored "
                     f"second moment, got {list(exp_avg_sq.shape)}")
    check_contiguous(exp_avg_sq, "exp_avg_sq")
    if exp_avg_sq_scales is not None:
        raise ValueError("exp_avg_sq_scales: only valid with 8-bit (torch.uint8) exp_avg_sq "
                         "codes, not with a factored second moment")
    if exp_avg is exp_avg_sq:
        raise ValueError("exp_avg_sq: must not alias exp_avg")


def check_hyperparameters(beta1: float, beta2: float, eps: float, step: int) -> None:
    _require(0.0 <= beta1, lambda: f"beta1: expected a value in [0, 1), got {beta1}")
    _require(beta1 < 1.0, lambda: f"beta1: expected a value in [0, 1), got {beta1}")
    _require(0.0 <= beta2, lambda: f"beta2: expected a value in [0, 1), got {beta2}")
    _require(beta2 < 1.0, lambda: f"beta2: expected a value in [0, 1), got {beta2}")
    _require(eps >= 0.0, lambda: f"eps: expected a value >= 0, got {eps}")
    _require(step >= 1,
             lambda: f"step: expected the already-incremented step (>= 1), got {step}")


def check_dct_indices(indices: torch.Tensor, d: int, name: str) -> int:
    """Validates DCT row indices of a size-d basis (1-D int32, length r in [1, d]) and returns r.
    Their values (in [0, d), no repeats) are checked for real CPU tensors only (module
    docstring); GPU callers rely on dct_select, which produces valid indices."""
    if indices.dim() != 1:
        raise ValueError(f"{name}: expected a 1-D tensor of DCT row indices, got {indices.dim()}-D")
    if indices.dtype != torch.int32:
        raise ValueError(f"{name}: expected dtype int32, got {indices.dtype}")
    rank = indices.shape[0]
    _require(rank >= 1, lambda: f"{name}: rank r={rank} must lie in [1, d={d}]")
    _require(rank <= d, lambda: f"{name}: rank r={rank} must lie in [1, d={d}]")
    if indices.device.type == "cpu" and not is_fake(indices):
        values = indices.tolist()
        bad = [v for v in values if not 0 <= v < d]
        if bad:
            raise ValueError(f"{name}: index {bad[0]} is outside [0, d={d})")
        if len(set(values)) != rank:
            repeated = next(v for v in values if values.count(v) > 1)
            raise ValueError(f"{name}: index {repeated} is repeated")
    return rank


def check_dct_projection(m: int, n: int, proj: torch.Tensor, right: bool | None = None) -> int:
    """Validates DCT indices standing for the basis of an m×n weight (d = n right, m left)."""
    return check_dct_indices(proj, n if step_side(m, n, right) else m, "proj")


def check_group_size(group_size: int, name: str, *, packed_int4: bool) -> None:
    _require(group_size >= 1,
             lambda: f"{name}: expected a positive group size, got {group_size}")
    if packed_int4:
        _require(group_size % 2 == 0, lambda: f"{name}: expected an even group size for packed "
                                              f"INT4 codes (two per byte), got {group_size}")


def check_group_params(t: torch.Tensor | None, numel: int, group_size: int,
                       device: torch.device, name: str, what: str, *, written: bool = False
                       ) -> None:
    """Scales or zeros of ``numel`` quantized elements: fp32, 1-D, one per group, on
    ``device``; dense when the op rewrites them (``written``)."""
    if t is None:
        raise ValueError(f"{name}: required with {what}")
    if t.dtype != torch.float32:
        raise ValueError(f"{name}: expected dtype float32, got {t.dtype}")
    groups = reference.num_groups(numel, group_size)
    _check_shape(t, [groups], name, f" (ceil({numel} / group size {group_size}))")
    if t.device != device:
        raise ValueError(f"{name}: expected device {device}, got {t.device}")
    if written:
        check_contiguous(t, name)


def check_rounding_seed(seed: int) -> None:
    _require(0 <= seed, lambda: f"seed: expected a value in [0, 2^32 - 1], got {seed}")
    _require(seed <= MAX_ROUNDING_SEED,
             lambda: f"seed: expected a value in [0, 2^32 - 1], got {seed}")


def _check_uint8(t: torch.Tensor, name: str, what: str) -> None:
    if t.dtype != torch.uint8:
        raise ValueError(f"{name}: expected dtype uint8 ({what}), got {t.dtype}")


# --------------------------------------------------------------------------------------------
# one check per op, with the op's schema signature (csrc/lowrank.cpp)
# --------------------------------------------------------------------------------------------
def check_project(grad: torch.Tensor, proj: torch.Tensor) -> int:
    """project(grad, proj): returns the rank."""
    check_float_matrix(grad, "grad")
    check_same_device(proj, grad, "proj")
    return check_dense_projection(*grad.shape, proj)


def check_project_back(low_rank: torch.Tensor, proj: torch.Tensor, m: int, n: int,
                       scale: float = 1.0) -> int:
    """project_back(low_rank, proj, m, n, scale): returns the rank."""
    _require(m >= 1, lambda: f"m, n: expected positive sizes, got m={m}, n={n}")
    _require(n >= 1, lambda: f"m, n: expected positive sizes, got m={m}, n={n}")
    check_float_matrix(low_rank, "low_rank")
    check_same_device(proj, low_rank, "proj")
    rank = check_dense_projection(m, n, proj)
    _check_shape(low_rank, low_rank_shape(m, n, rank), "low_rank")
    return rank


def check_fused_galore_step(param, grad, proj, exp_avg, exp_avg_sq, *, lr, beta1, beta2, eps,
                            weight_decay, scale, step, proj_scales=None, proj_zeros=None,
                            proj_group_size=256, param_scales=None, param_zeros=None,
                            param_group_size=256, seed=0, inner="adam", exp_avg_scales=None,
                            exp_avg_sq_scales=None, state_block_size=32, right=None,
                            full_rank="none", full_rank_norm="channel", limiter=None,
                            limiter_growth=reference.LIMITER_GROWTH, scale_front=False) -> int:
    """fused_galore_step(...) in any format; returns the rank. proj: dense float basis, int32
    DCT indices, or a packed INT4 basis (uint8; the rank is then that of the moments); param:
    float weight or INT8 codes (uint8). ``lr`` and ``weight_decay`` may be any value (also
    symbolic under torch.compile: nothing here reads them); ``step`` may be a SymInt. The
    full-rank modes: :func:`check_full_rank` (``scale`` is checked there for APOLLO)."""
    del lr, weight_decay  # any value is valid
    int8_weight = param.dtype == torch.uint8
    if param.dim() != 2:
        raise ValueError(f"param: expected a 2-D tensor, got {param.dim()}-D")
    if not int8_weight:
        check_float_matrix(param, "param")
    check_contiguous(param, "param")
    check_float_matrix(grad, "grad")
    check_same_device(grad, param, "grad")
    for have, want in zip(grad.shape, param.shape, strict=True):  # both 2-D
        _require(have == want, lambda: f"grad: expected the shape of param {list(param.shape)}, "
                                       f"got {list(grad.shape)}")
    check_same_device(proj, param, "proj")
    m, n = param.shape
    side = step_side(m, n, right)
    if proj.dtype == torch.uint8:
        # the rank of a packed basis is that of the moments (exp_avg_sq for AdaGrad)
        ranked, ranked_name = (exp_avg, "exp_avg") if exp_avg is not None else (exp_avg_sq,
                                                                                "exp_avg_sq")
        what = f"{'(m, r)' if side else '(r, n)'} (its rank sets that of the packed proj)"
        if ranked.dim() != 2:
            raise ValueError(f"{ranked_name}: expected shape {what}, got {list(ranked.shape)}")
        _require(ranked.shape[0 if side else 1] == (m if side else n),
                 lambda: f"{ranked_name}: expected shape {what}, got {list(ranked.shape)}")
        rank = ranked.shape[1] if side else ranked.shape[0]
        _check_rank(rank, m, n, ranked_name, right)
        basis_numel = rank * (n if side else m)
        if proj.dim() != 1:
            raise ValueError(f"proj: expected a 1-D packed INT4 basis of {(basis_numel + 1) // 2}"
                             f" bytes (ceil({basis_numel} / 2)), got shape {list(proj.shape)}")
        _require(proj.shape[0] == (basis_numel + 1) // 2,
                 lambda: f"proj: expected a 1-D packed INT4 basis of {(basis_numel + 1) // 2} "
                         f"bytes (ceil({basis_numel} / 2)), got shape {list(proj.shape)}")
        check_group_size(proj_group_size, "proj_group_size", packed_int4=True)
        for t, name in ((proj_scales, "proj_scales"), (proj_zeros, "proj_zeros")):
            check_group_params(t, basis_numel, proj_group_size, param.device, name,
                               "a packed INT4 (uint8) proj")
    else:
        # Signed integers can only mean DCT indices (uint8 is packed INT4): report them as such.
        dct = not proj.dtype.is_floating_point and proj.dtype not in (torch.bool, torch.uint8)
        rank = (check_dct_projection(m, n, proj, right) if dct
                else check_dense_projection(m, n, proj, right))
        if proj_scales is not None or proj_zeros is not None:
            raise ValueError("proj_scales/proj_zeros: only valid with a packed INT4 (uint8) proj")
    check_moments(exp_avg, exp_avg_sq, param, low_rank_shape(m, n, rank, side), inner=inner,
                  exp_avg_scales=exp_avg_scales, exp_avg_sq_scales=exp_avg_sq_scales,
                  state_block_size=state_block_size, own=m if side else n, rank=rank)
    if int8_weight:
        check_group_size(param_group_size, "param_group_size", packed_int4=False)
        for t, name in ((param_scales, "param_scales"), (param_zeros, "param_zeros")):
            check_group_params(t, m * n, param_group_size, param.device, name,
                               "INT8 (uint8) param codes", written=True)
        if param_scales is param_zeros:
            raise ValueError("param_zeros: must not alias param_scales")
    elif param_scales is not None or param_zeros is not None:
        raise ValueError("param_scales/param_zeros: only valid with INT8 (uint8) param codes")
    if int8_weight or any(t is not None and t.dtype != torch.float32
                          for t in (exp_avg, exp_avg_sq)):  # a stochastic-rounding stream
        check_rounding_seed(seed)
        _require(step <= MAX_ROUNDING_STEP,
                 lambda: f"step: expected a value <= 2^31 - 1, got {step}")
    check_hyperparameters(beta1, beta2, eps, step)
    check_full_rank(param, full_rank, full_rank_norm, limiter, limiter_growth, scale_front, scale)
    check_full_rank_combination(full_rank, inner, exp_avg_sq, right, m >= n)
    return rank


FULL_RANK_MODES = reference.FULL_RANK_MODES
FULL_RANK_NORMS = reference.FULL_RANK_NORMS


def check_full_rank(param: torch.Tensor, full_rank: str, full_rank_norm: str,
                    limiter: torch.Tensor | None, limiter_growth: float, scale_front: bool,
                    scale: float) -> None:
    """The full-rank keyword arguments of fused_galore_step (DESIGN.md §4.6-§4.7). With
    full_rank='none' the others must keep their defaults (nothing is silently ignored)."""
    if full_rank not in FULL_RANK_MODES:
        raise ValueError(f"full_rank: expected 'none', 'fira' or 'apollo', got {full_rank!r}")
    if full_rank_norm not in FULL_RANK_NORMS:
        raise ValueError(f"full_rank_norm: expected 'channel' or 'tensor', got "
                         f"{full_rank_norm!r}")
    if full_rank == "none":
        if limiter is not None or full_rank_norm != "channel" or scale_front:
            raise ValueError("limiter/full_rank_norm/scale_front: only valid with "
                             "full_rank='fira' or 'apollo'")
        return
    if scale_front and full_rank != "apollo":
        raise ValueError("scale_front: only valid with full_rank='apollo'")
    if full_rank == "apollo":
        _require(scale >= 0.0, lambda: f"scale: expected a value >= 0 with full_rank='apollo' "
                                        f"(the update is multiplied by sqrt(scale)), got {scale}")
    _require(limiter_growth > 0.0, lambda: f"limiter_growth: expected a finite value > 0, got "
                                           f"{limiter_growth}")
    _require(limiter_growth < math.inf, lambda: f"limiter_growth: expected a finite value > 0, "
                                                f"got {limiter_growth}")
    if limiter is None:
        return
    if limiter.dtype != torch.float32:
        raise ValueError(f"limiter: expected dtype float32, got {limiter.dtype}")
    if limiter.dim() != 1:
        raise ValueError(f"limiter: expected shape [1] (the previous ||S||, < 0 before the first "
                         f"step), got {list(limiter.shape)}")
    _require(limiter.shape[0] == 1, lambda: f"limiter: expected shape [1] (the previous ||S||, "
                                            f"< 0 before the first step), got "
                                            f"{list(limiter.shape)}")
    check_same_device(limiter, param, "limiter")
    if limiter is param:
        raise ValueError("limiter: must not alias param")


def check_full_rank_combination(full_rank: str, inner: str, exp_avg_sq: torch.Tensor,
                                right: bool | None, natural_right: bool) -> None:
    """full_rank='fira'/'apollo' runs Adam with fp32/bf16 moments on the side rule's side: the
    AdaGrad rule, 8-bit moments and a side override are refused with it (every backend raises
    the same message, before anything is written)."""
    if full_rank == "none":
        return
    if inner != "adam":
        raise ValueError(f"inner: full_rank={full_rank!r} supports only inner='adam', got "
                         f"{inner!r}")
    if exp_avg_sq.dtype == torch.uint8:
        raise ValueError(f"exp_avg_sq: full_rank={full_rank!r} supports fp32/bf16 moments only, "
                         f"got 8-bit moments (uint8 codes)")
    if exp_avg_sq.dim() == 1:
        raise ValueError(f"exp_avg_sq: full_rank={full_rank!r} supports a full (2-D) second "
                         f"moment only, got a factored (1-D) one")
    if right is not None and bool(right) != natural_right:
        raise ValueError(f"right: full_rank={full_rank!r} supports only the side rule's side "
                         f"(right={natural_right} for this shape), got right={bool(right)}")


def check_random_basis(d: int, rank: int, seed: int, refresh: int, *, device=None) -> None:
    """random_basis(d, rank, seed, refresh): Philox counters rank·⌈d/4⌉ stay below 2^32."""
    del device
    _require(d >= 1, lambda: f"d: expected a basis size >= 1, got {d}")
    _require(rank >= 1, lambda: f"rank: expected a value in [1, 2^24], got {rank}")
    _require(rank <= 2**24, lambda: f"rank: expected a value in [1, 2^24], got {rank}")
    _require((d + 3) // 4 <= 2**32 // rank,
             lambda: f"d, rank: rank * ceil(d / 4) must not exceed 2^32 (one Philox counter per "
                     f"four elements), got d={d}, rank={rank}")
    _require(0 <= seed, lambda: f"seed: expected a value in [0, 2^32 - 1], got {seed}")
    _require(seed <= MAX_ROUNDING_SEED,
             lambda: f"seed: expected a value in [0, 2^32 - 1], got {seed}")
    _require(0 <= refresh, lambda: f"refresh: expected a value in [0, 2^31 - 1], got {refresh}")
    _require(refresh <= MAX_ROUNDING_STEP,
             lambda: f"refresh: expected a value in [0, 2^31 - 1], got {refresh}")


ROW_STATES = ("row_scale", "row_norm", "scale_exp_avg", "scale_exp_avg_sq")


def check_row_state(t: torch.Tensor, param: torch.Tensor, name: str) -> None:
    """A per-row fp32 state of an m×n weight: 1-D, length m, on param's device, dense."""
    check_same_device(t, param, name)
    if t.dtype != torch.float32:
        raise ValueError(f"{name}: expected dtype float32, got {t.dtype}")
    _check_shape(t, [param.shape[0]], name, " (one value per row of param)")
    check_contiguous(t, name)


def check_fused_gradnorm_step(param, grad, proj, exp_avg, exp_avg_sq, row_scale, row_norm,
                              scale_exp_avg, scale_exp_avg_sq, *, lr, beta1, beta2, eps,
                              weight_decay, scale, step, proj_scales=None, proj_zeros=None,
                              proj_group_size=256, seed=0, exp_avg_scales=None,
                              exp_avg_sq_scales=None, state_block_size=32) -> int:
    """fused_gradnorm_step(...): a float weight (INT8 codes refused), the projection and the
    low-rank moments of fused_galore_step (Adam: fp32, bf16, or 8-bit codes with their block
    scales), four distinct per-row fp32 states; returns the rank."""
    if param.dtype == torch.uint8:
        raise ValueError("param: INT8 weight codes (uint8) are not supported by "
                         "fused_gradnorm_step (the row renormalisation needs each row in fp32); "
                         "expected dtype float32, bfloat16 or float16")
    if exp_avg_sq.dim() == 1:
        raise ValueError("exp_avg_sq: fused_gradnorm_step needs the full (2-D) second moment; a "
                         "factored (1-D) one is a fused_galore_step mode")
    rank = check_fused_galore_step(
        param, grad, proj, exp_avg, exp_avg_sq, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
        weight_decay=weight_decay, scale=scale, step=step, proj_scales=proj_scales,
        proj_zeros=proj_zeros, proj_group_size=proj_group_size, seed=seed,
        exp_avg_scales=exp_avg_scales, exp_avg_sq_scales=exp_avg_sq_scales,
        state_block_size=state_block_size)
    rows = (row_scale, row_norm, scale_exp_avg, scale_exp_avg_sq)
    for i, (t, name) in enumerate(zip(rows, ROW_STATES, strict=True)):
        check_row_state(t, param, name)
        for other, other_name in zip(rows[:i], ROW_STATES[:i], strict=False):
            if t is other:
                raise ValueError(f"{name}: must not alias {other_name}")
    return rank


def check_philox_uniform(seed: int, offsets: torch.Tensor) -> None:
    _require(0 <= seed, lambda: f"seed: expected a value in [0, 2^63 - 1], got {seed}")
    _require(seed < 2**63, lambda: f"seed: expected a value in [0, 2^63 - 1], got {seed}")
    if offsets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"offsets: expected dtype int64 or int32, got {offsets.dtype}")


def _check_quantize_input(x: torch.Tensor) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x: expected dtype float32, bfloat16 or float16, got {x.dtype}")
    _require(x.numel() >= 1, lambda: "x: expected at least one element")


def check_quantize_int4(x: torch.Tensor, group_size: int = 256) -> None:
    _check_quantize_input(x)
    check_group_size(group_size, "group_size", packed_int4=True)


def check_quantize_int8(x: torch.Tensor, group_size: int = 256, stochastic: bool = False,
                        seed: int = 0) -> None:
    _check_quantize_input(x)
    check_group_size(group_size, "group_size", packed_int4=False)
    check_rounding_seed(seed)


def check_dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                          shape: list[int], group_size: int = 256) -> int:
    """dequantize_int4(...): returns the number of elements."""
    _check_uint8(packed, "packed", "two INT4 codes per byte")
    check_group_size(group_size, "group_size", packed_int4=True)
    for d in shape:
        _require(d >= 0, lambda: f"shape: expected at least one element, got {list(shape)}")
    numel = math.prod(shape)
    _require(numel >= 1, lambda: f"shape: expected at least one element, got {list(shape)}")
    what = f" (ceil({numel} / 2) bytes for shape {list(shape)})"
    _check_shape(packed, [(numel + 1) // 2], "packed", what)
    for t, name in ((scales, "scales"), (zeros, "zeros")):
        check_group_params(t, numel, group_size, packed.device, name, "INT4 codes")
    return numel


def check_dequantize_int8(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                          group_size: int = 256) -> None:
    _check_uint8(codes, "codes", "INT8 codes")
    check_group_size(group_size, "group_size", packed_int4=False)
    _require(codes.numel() >= 1, lambda: "codes: expected at least one element")
    for t, name in ((scales, "scales"), (zeros, "zeros")):
        check_group_params(t, codes.numel(), group_size, codes.device, name, "INT8 codes")


def check_dct_select(grad: torch.Tensor, rank: int, norm: int = 1, *, method: str = "auto"
                     ) -> None:
    check_float_matrix(grad, "grad")
    d = torch.sym_min(*grad.shape)
    _require(d >= 1, lambda: f"grad: expected a non-empty matrix, got shape {list(grad.shape)}")
    _require(rank >= 1, lambda: f"rank: expected a value in [1, min(m, n)={d}], got {rank}")
    _require(rank <= d, lambda: f"rank: expected a value in [1, min(m, n)={d}], got {rank}")
    if norm not in (1, 2):
        raise ValueError(f"norm: expected 1 or 2, got {norm}")
    if method not in ("auto", "fft", "dense"):
        raise ValueError(f"method: expected 'auto', 'fft' or 'dense', got {method!r}")


def check_dct_basis(d: int, indices: torch.Tensor) -> int:
    """dct_basis(d, indices): returns the rank."""
    _require(d >= 1, lambda: f"d: expected a basis size >= 1, got {d}")
    return check_dct_indices(indices, d, "indices")
