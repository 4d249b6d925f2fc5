"""Autograd functions and modules over the lowrank ops: the INT8 linear layer of Q-GaLore.

An :class:`Int8Linear` stores its weight as INT8 codes (uint8, out×in) with fp32 scales and zeros
per group of ``group_size`` consecutive row-major elements (DESIGN.md §4.4) and never keeps a
float copy of it:

* forward  y = x W̃ᵀ + b, W̃ = s·(q − z): on CUDA a Triton kernel dequantizes tiles of codes in
  registers inside the matmul; elsewhere W̃ is expanded block by block (about 2^20 elements at a
  time) and each block is freed after its slice of the matmul.
* backward returns grad_input = dy W̃ (same blocking) and the bias gradient. The weight gradient
  dW = dyᵀ x (in x's dtype) cannot live in ``weight.grad`` (integer tensors carry no gradient),
  so it is accumulated (+=) into the attribute ``weight.float_grad``, as q-galore-torch does; an
  optimizer reads it, steps (e.g. ``fused_galore_step`` with the codes) and sets it to None.
  The weight gradient is produced even when x does not require grad.

Integer tensors have no ``.grad``, so no ``Tensor.register_post_accumulate_grad_hook`` fires for
the codes. :func:`register_float_grad_hook` is its counterpart for ``float_grad`` (layer-wise
training steps INT8 weights from it): ``fn(codes)`` runs once per backward pass, after the LAST
accumulation of that pass into ``codes.float_grad``, also when the codes serve several
``int8_linear`` calls (a shared weight). How: every call on the same codes takes the same leaf
scalar (the "anchor", one per codes tensor, on its device) as an input and returns a zero
gradient for it, so autograd's own AccumulateGrad node of the anchor runs exactly once, after
every use's backward, and that node's post-accumulate-grad hook calls ``fn``. AccumulateGrad
nodes run as soon as they are ready, so at most the gradients of the weights just finished are
alive when the hooks run.
"""

from __future__ import annotations

import math
import os
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from torch.utils.weak import WeakIdKeyDictionary

from lowrank_kernels import _dispatch, ops, reference

FLOAT_GRAD = "float_grad"  # attribute of the INT8 weight that receives dL/dW
_BLOCK_ELEMENTS = 1 << 20  # elements of W̃ alive at a time on the blocked path


class _FloatGradHooks:
    """The anchor of one codes tensor and the hooks registered on its float_grad."""

    def __init__(self) -> None:
        # an OrderedDict: RemovableHandle keeps a weak reference to it
        self.hooks: OrderedDict[int, Callable[[torch.Tensor], None]] = OrderedDict()
        self.anchor: torch.Tensor | None = None


# codes -> _FloatGradHooks, kept out of the codes' __dict__ so that pickling, deepcopy and
# state_dict of a model see nothing of it (a copy of the codes starts without hooks, like a copy
# of a float Parameter)
_FLOAT_GRAD_HOOKS = WeakIdKeyDictionary()


def _hooks_of(codes: torch.Tensor) -> _FloatGradHooks:
    entry = _FLOAT_GRAD_HOOKS.get(codes)
    if entry is None:
        entry = _FLOAT_GRAD_HOOKS[codes] = _FloatGradHooks()
    return entry


@torch.compiler.disable  # a registry lookup and a leaf creation: run eagerly under compile
def _anchor_of(codes: torch.Tensor) -> torch.Tensor:
    """The leaf scalar all int8_linear calls on ``codes`` take (see the module docstring)."""
    entry = _hooks_of(codes)
    if entry.anchor is None or entry.anchor.device != codes.device:  # first use, or .to(device)
        anchor = torch.zeros((), device=codes.device, requires_grad=True)
        codes_ref = weakref.ref(codes)  # the registry must not keep the codes alive

        def announce(anchor: torch.Tensor) -> None:
            anchor.grad = None
            owner = codes_ref()
            if owner is not None:
                for fn in list(entry.hooks.values()):
                    fn(owner)

        anchor.register_post_accumulate_grad_hook(announce)
        entry.anchor = anchor
    return entry.anchor


def register_float_grad_hook(codes: torch.Tensor, fn: Callable[[torch.Tensor], None]
                             ) -> RemovableHandle:
    """Calls ``fn(codes)`` once per backward pass, after the pass's last accumulation into
    ``codes.float_grad`` (every use of a shared weight included): the contract of
    ``Tensor.register_post_accumulate_grad_hook`` for the gradient of INT8 codes. ``fn`` may
    read, modify or clear ``codes.float_grad``; hooks run in registration order. Returns a handle
    whose ``remove()`` unregisters ``fn``. The hook belongs to this tensor object (not to views
    or copies of it) and only fires for backward passes through ``int8_linear``/``Int8Linear``
    (not ``torch.autograd.grad``, which runs no AccumulateGrad node, as for float weights)."""
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
        raise ValueError(f"codes: expected uint8 INT8 weight codes, got "
                         f"{getattr(codes, 'dtype', type(codes).__name__)}")
    if not callable(fn):
        raise TypeError(f"fn: expected a callable fn(codes), got {type(fn).__name__}")
    hooks = _hooks_of(codes).hooks
    handle = RemovableHandle(hooks)
    hooks[handle.id] = fn
    return handle


def _use_triton(x: torch.Tensor, backend: str | None) -> bool:
    name = backend or "auto"
    if name == "triton":
        if not x.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise ValueError(f"backend='triton': expected CUDA tensors (or TRITON_INTERPRET=1 "
                             f"for CPU tensors), got x on {x.device}")
        return True
    if name == "auto":
        return x.is_cuda and _dispatch.TRITON_AVAILABLE
    return False


def dequantized_row_blocks(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                           group_size: int, max_elements: int = _BLOCK_ELEMENTS
                           ) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yields (first_row, end_row, W̃[first_row:end_row] in fp32), blocks of whole groups: each
    block spans a multiple of group_size / gcd(in_features, group_size) rows."""
    rows, cols = codes.shape
    unit = group_size // math.gcd(cols, group_size)
    step = max(unit, (max_elements // cols) // unit * unit)
    for start in range(0, rows, step):
        end = min(rows, start + step)
        first_group = start * cols // group_size
        last_group = reference.num_groups(end * cols, group_size)
        yield start, end, ops.dequantize_int8(codes[start:end], scales[first_group:last_group],
                                              zeros[first_group:last_group], group_size)


def _matmul_weight_t(x2d, codes, scales, zeros, group_size, bias, backend):
    """x2d @ W̃ᵀ (+ bias) in x's dtype."""
    if _use_triton(x2d, backend):
        from lowrank_kernels.triton_kernels.int8_matmul import int8_matmul

        return int8_matmul(x2d, codes, scales, zeros, group_size, transposed_w=True, bias=bias)
    out = x2d.new_empty((x2d.shape[0], codes.shape[0]))
    for start, end, block in dequantized_row_blocks(codes, scales, zeros, group_size):
        out[:, start:end] = x2d @ block.to(x2d.dtype).T
    return out if bias is None else out.add_(bias.to(out.dtype))


def _matmul_weight(dy2d, codes, scales, zeros, group_size, backend):
    """dy2d @ W̃ in dy's dtype."""
    if _use_triton(dy2d, backend):
        from lowrank_kernels.triton_kernels.int8_matmul import int8_matmul

        return int8_matmul(dy2d, codes, scales, zeros, group_size, transposed_w=False)
    out = dy2d.new_zeros((dy2d.shape[0], codes.shape[1]))
    for start, end, block in dequantized_row_blocks(codes, scales, zeros, group_size):
        out.addmm_(dy2d[:, start:end], block.to(dy2d.dtype))
    return out


class Int8LinearFunction(torch.autograd.Function):
    """y = x W̃ᵀ + b with W̃ = dequantize_int8(codes); dL/dW accumulates into codes.float_grad.

    ``anchor`` is the codes' leaf scalar (``_anchor_of``): it requires grad, so that autograd
    runs the backward (and so delivers the weight gradient) even when neither x nor the bias
    requires grad, and its zero gradient triggers the float_grad hooks once all uses are done."""

    @staticmethod
    def forward(ctx, x, anchor, codes, scales, zeros, bias, group_size, backend):
        x2d = x.reshape(-1, x.shape[-1])
        out = _matmul_weight_t(x2d, codes, scales, zeros, group_size, bias, backend)
        ctx.save_for_backward(x2d, scales, zeros)
        ctx.codes, ctx.group_size, ctx.backend = codes, group_size, backend
        ctx.has_bias, ctx.x_shape = bias is not None, x.shape
        return out.view(*x.shape[:-1], codes.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x2d, scales, zeros = ctx.saved_tensors
        codes = ctx.codes
        dy2d = grad_out.reshape(-1, codes.shape[0]).to(x2d.dtype)
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _matmul_weight(dy2d, codes, scales, zeros, ctx.group_size,
                                    ctx.backend).view(ctx.x_shape)
        if ctx.has_bias and ctx.needs_input_grad[5]:
            grad_bias = dy2d.sum(0)
        grad_w = dy2d.T @ x2d
        previous = getattr(codes, FLOAT_GRAD, None)
        setattr(codes, FLOAT_GRAD, grad_w if previous is None else previous.add_(grad_w))
        # a defined (zero) gradient, so that the anchor's AccumulateGrad node runs its hook
        grad_anchor = torch.zeros((), device=codes.device) if ctx.needs_input_grad[1] else None
        return grad_x, grad_anchor, None, None, None, grad_bias, None, None


def int8_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                zeros: torch.Tensor, bias: torch.Tensor | None = None, group_size: int = 256,
                *, backend: str | None = None) -> torch.Tensor:
    """Functional INT8 linear layer: x W̃ᵀ + b (see the module docstring for the gradients).

    codes: uint8 out×in; scales, zeros: fp32, one per group of ``group_size`` consecutive
    row-major elements. backend: None (Triton on CUDA, blocked torch elsewhere), "triton"
    (also CPU tensors under TRITON_INTERPRET=1) or "torch" (blocked dequantization)."""
    if backend not in (None, "triton", "torch"):
        raise ValueError(f"backend: expected None, 'triton' or 'torch', got {backend!r}")
    if codes.dtype != torch.uint8 or codes.dim() != 2:
        raise ValueError(f"codes: expected a 2-D uint8 tensor (INT8 codes), got {codes.dtype} "
                         f"with shape {list(codes.shape)}")
    if x.shape[-1] != codes.shape[1]:
        raise ValueError(f"x: expected last dimension {codes.shape[1]} (in_features), got "
                         f"{x.shape[-1]}")
    ops.check_group_size(group_size, "group_size", packed_int4=False)
    for t, name in ((scales, "scales"), (zeros, "zeros")):
        ops.check_group_params(t, codes.numel(), group_size, codes.device, name, "INT8 codes")
    # without grad mode no graph is recorded: a plain scalar (also under inference_mode, where
    # the codes' anchor, a leaf that requires grad, must not be created)
    anchor = _anchor_of(codes) if torch.is_grad_enabled() else torch.zeros(())
    return Int8LinearFunction.apply(x, anchor, codes, scales, zeros, bias, group_size, backend)


class Int8Linear(nn.Module):
    """nn.Linear with an INT8 weight (Q-GaLore): ``weight`` is a uint8 Parameter (out×in codes,
    requires_grad=False) with buffers ``weight_scales``/``weight_zeros``; after backward the
    weight gradient is in ``weight.float_grad``. The weight also carries ``scales``, ``zeros``
    (aliases of the buffers) and ``group_size``, the convention lowrank_kernels.optim's
    QGaLoreAdamW (and q-galore-torch) read to step INT8 codes in place."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 group_size: int = 256, device=None, dtype=None) -> None:
        super().__init__()
        ops.check_group_size(group_size, "group_size", packed_int4=False)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = reference.num_groups(in_features * out_features, group_size)
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=torch.uint8,
                                               device=device), requires_grad=False)
        self.register_buffer("weight_scales", torch.ones(groups, device=device))
        self.register_buffer("weight_zeros", torch.zeros(groups, device=device))
        self.bias = (nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
                     if bias else None)
        self._link_quantization_state()

    def _link_quantization_state(self) -> None:
        # The optimizer rewrites scales/zeros in place through these aliases, so the buffers
        # (and state_dict) always hold the codes' current quantization parameters.
        self.weight.scales = self.weight_scales
        self.weight.zeros = self.weight_zeros
        self.weight.group_size = self.group_size

    def _apply(self, fn, recurse=True):
        # .to()/.cuda() replace the buffers: point the weight's aliases at the new ones.
        module = super()._apply(fn, recurse)
        self._link_quantization_state()
        return module

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 256) -> Int8Linear:
        """Quantizes a float nn.Linear (round to nearest); the bias stays in its dtype."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    group_size, device=linear.weight.device, dtype=linear.weight.dtype)
        codes, scales, zeros = ops.quantize_int8(linear.weight.detach(), group_size)
        with torch.no_grad():
            layer.weight.copy_(codes)
            layer.weight_scales.copy_(scales)
            layer.weight_zeros.copy_(zeros)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach())
        return layer

    def dequantized_weight(self) -> torch.Tensor:
        return ops.dequantize_int8(self.weight, self.weight_scales, self.weight_zeros,
                                   self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weight, self.weight_scales, self.weight_zeros, self.bias,
                           self.group_size)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, group_size={self.group_size}")


def replace_linear_with_int8(model: nn.Module, targets: Iterable[str] | Callable[[str], bool],
                             group_size: int = 256) -> list[str]:
    """Replaces, in place, every nn.Linear whose dotted name contains one of ``targets`` (as
    GaLore's target_modules_list; or for which the callable returns True) by an Int8Linear
    quantized from it, like Q-GaLore's ``prepare_model_for_int8_training``. Returns the names
    replaced."""
    match = targets if callable(targets) else (
        lambda name, keys=tuple(targets): any(key in name for key in keys))
    chosen = [name for name, module in model.named_modules()
              if isinstance(module, nn.Linear) and match(name)]
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear.from_linear(getattr(parent, child), group_size))
    return chosen
