"""Layer-wise updates: each parameter steps as soon as its gradient is ready, then frees it.

During ``loss.backward()`` a post-accumulate-grad hook on every parameter steps that one
parameter (``LowRankAdamW.step_parameter``) and sets its ``.grad`` to None, so at most a few
full-size gradients exist at once instead of all of them. The user calls only
``loss.backward()``: no ``optimizer.step()``, no ``zero_grad()``.

Gradient accumulation: the step happens on the LAST micro-batch of every ``accumulation_steps``.
Earlier micro-batches accumulate into ``.grad`` as in ordinary training (so during accumulation
the full gradients are held; the saving applies to the last micro-batch and to everything
between steps). Accumulating in the low-rank space instead would save more memory but cannot
be exact: a refresh needs the SVD of the whole accumulated gradient. Scale the loss by
1/accumulation_steps as usual. Micro-batches are counted by completed ``backward()`` calls.

Gradient clipping: a parameter's step cannot wait for the global gradient norm (the other
gradients do not exist yet), so ``max_grad_norm`` clips each parameter's gradient by its OWN norm
(``torch.nn.utils.clip_grad_norm_([p], max_grad_norm)``, a per-tensor clip that really scales
the gradient the step sees). This is not global-norm clipping; it equals calling that function on
each parameter separately in ordinary training.

The LR scheduler (``scheduler_factory(optimizer)``) steps once per optimizer step, at the end of
the backward pass of the last micro-batch, after every parameter has stepped.

INT8 weight codes (``Int8Linear``, Q-GaLore): their gradient accumulates into
``codes.float_grad``; ``lowrank_kernels.autograd.register_float_grad_hook`` announces it once per
backward pass, after the last use of the codes (a weight shared by several layers included), and
the trainer steps the codes there, as a float weight from its post-accumulate-grad hook, then sets
``float_grad`` to None. Accumulation and clipping are the same (``clip_float_grad_`` is the
per-tensor clip on ``float_grad``). With INT8 weights only INT8 codes + scales/zeros, the states
and the largest single gradient are held: the Q-GaLore recipe's memory.

End of a backward pass: the scheduler and the micro-batch count advance in a callback queued on
the autograd graph task of the pass. Activation checkpointing with ``use_reentrant=True`` runs
the backward of every checkpointed segment as a nested graph task of its own, whose hooks fire
inside it; a callback queued from such a hook would end the pass once per segment. So the
trainer also hooks the gradient of the model's outputs (a forward hook on the model registers
it): that gradient is computed in the outermost task before any parameter's, and the callback is
queued there. With ``use_reentrant=True`` a weight must receive its gradient in one segment per
backward pass: one used in two reentrant segments (shared across layers, or the model called
twice before one backward) gets it in two nested tasks, i.e. in two parts, and by the second part
it has already been stepped on the first; that raises a RuntimeError, and the run must restart
from a checkpoint. ``use_reentrant=False`` has no nested tasks and none of these limits. Under
torch.compile the output hook is not installed (dynamo cannot trace the engine callback), so
compiled models need ``use_reentrant=False`` for checkpointing; so does a model whose forward
the trainer does not see (called as ``model.forward(...)`` or through a wrapper that bypasses
``__call__``; a warning says so). A backward that accumulates no held parameter's gradient
(``torch.autograd.grad`` of a gradient penalty) is not a pass. A backward that raised is
recognised when the next one starts (its callback was queued on another graph task) and the
trainer's count resumes, but what it had done stays done: the parameters stepped before the
error, and gradients accumulated into ``.grad`` by it; restore a checkpoint to retry the batch
exactly. The trainer is single-threaded (hooks fire on the thread running the backward).

Distributed training. FSDP2 (``fully_shard``) calls a sharded parameter's post-accumulate-grad
hooks after its gradient's reduce-scatter, so the trainer steps each weight from its averaged
shard as in one process (the sharded step's collectives run inside the backward pass, in the same
order on every rank) and frees it; keep FSDP2's gradient sync on for every micro-batch (its
default): with ``set_requires_gradient_sync(False)`` no hook fires and the micro-batch is not
counted. DistributedDataParallel averages gradients after those hooks fire, so for a DDP model
the trainer steps from a DDP communication hook instead, once a bucket's all-reduce is done
(lowrank_kernels.distributed.ddp: ``no_sync()`` for the accumulating micro-batches is optional;
under DDP the gradients live in DDP's buckets, so layer-wise stepping saves no gradient memory
there). INT8 codes are not DDP parameters: call
``lowrank_kernels.distributed.average_int8_grads(model)`` before ``layerwise(...)`` so that their
``float_grad`` is averaged before their step.

Results equal ordinary training with the same optimizer, data, accumulation and per-parameter
clipping, with and without activation checkpointing (tests/test_optim_layerwise.py checks this).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch.utils import _pytree as pytree

from lowrank_kernels.autograd import FLOAT_GRAD, register_float_grad_hook
from lowrank_kernels.distributed.ddp import DDPLayerwiseSteps
from lowrank_kernels.optim.lowrank_adamw import LowRankAdamW


class LayerwiseTrainer:
    """Owns the hooks, the optimizer and the scheduler of layer-wise training."""

    def __init__(self, model: torch.nn.Module, optimizer: LowRankAdamW, *,
                 accumulation_steps: int = 1, max_grad_norm: float | None = None,
                 scheduler: torch.optim.lr_scheduler.LRScheduler | None = None):
        if not hasattr(optimizer, "step_parameter"):
            raise TypeError("optimizer: layer-wise updates need an optimizer with "
                            "step_parameter(p), e.g. lowrank_kernels.optim.LowRankAdamW")
        if not isinstance(accumulation_steps, int) or accumulation_steps < 1:
            raise ValueError(f"accumulation_steps: expected an int >= 1, got {accumulation_steps!r}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm: expected None or a value > 0, got {max_grad_norm}")
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.accumulation_steps, self.max_grad_norm = accumulation_steps, max_grad_norm
        self.micro_steps = 0  # completed backward passes
        self.optimizer_steps = 0
        self._callback_queued = False
        self._pass_task = -1  # the autograd graph task _end_of_backward is queued on
        self._queued_by_output = False  # ... by the output-gradient hook (else by a parameter's)
        self._forward_seen = False  # a forward of the model ran since the last pass ended
        self._warned_unhooked = False
        self._saw_grad = False  # a held parameter received its gradient in the pass in progress
        self._stepped: set[int] = set()  # parameters stepped in the pass in progress
        self._held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        self._handles = [model.register_forward_hook(self._on_forward)]
        for p in model.parameters():
            if not self.holds(p):
                continue
            if p.dtype == torch.uint8:  # INT8 codes: their gradient arrives in float_grad
                self._handles.append(register_float_grad_hook(p, self._on_grad))
            elif p.requires_grad:
                self._handles.append(p.register_post_accumulate_grad_hook(self._on_grad))
        if len(self._handles) == 1:
            self.remove()
            raise ValueError("model: none of its trainable parameters is held by the optimizer")
        # DDP averages gradients after the hooks above fire: its own hook steps its parameters
        self._ddp = (DDPLayerwiseSteps(model, self)
                     if isinstance(model, torch.nn.parallel.DistributedDataParallel) else None)

    def holds(self, p: torch.Tensor) -> bool:
        """Whether the optimizer holds ``p``."""
        return id(p) in self._held

    @property
    def stepping(self) -> bool:
        """Whether the backward pass in progress (or the next one) is the last micro-batch."""
        return self.micro_steps % self.accumulation_steps == self.accumulation_steps - 1

    def _on_forward(self, module: torch.nn.Module, args, output) -> None:
        """Hooks the gradient of every output that will receive one (see the module docstring:
        it arrives in the outermost graph task of the backward pass). Under torch.compile it
        hooks nothing (dynamo cannot trace the engine callback; the parameters' hooks queue it,
        as without checkpointing)."""
        self._forward_seen = True
        if torch.compiler.is_compiling() or not torch.is_grad_enabled():
            return
        for leaf in pytree.tree_leaves(output):
            if isinstance(leaf, torch.Tensor) and leaf.requires_grad:
                leaf.register_hook(self._on_output_grad)

    def _on_output_grad(self, grad: torch.Tensor) -> None:
        if self._handles:  # outputs hooked before remove() remain hooked: they must not count
            self._queue_end_of_backward(from_output=True)

    def _queue_end_of_backward(self, from_output: bool) -> None:
        """Queues _end_of_backward on the graph task running now, once per backward pass. A
        callback still queued on another task is left over from a backward that raised
        (autograd then drops its callbacks) -- unless it was queued by the output hook and this
        is a parameter's hook in a nested (reentrant checkpoint) task of the same pass."""
        task = torch._C._current_graph_task_id()
        if self._callback_queued and task != self._pass_task and (
                from_output or not self._queued_by_output):
            self._reset_pass()  # forget what the failed pass left half done
        if not self._callback_queued:
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
            self._callback_queued = True
            self._pass_task, self._queued_by_output = task, from_output

    def _on_grad(self, p: torch.Tensor) -> None:
        if not self._forward_seen and not self._callback_queued and not self._warned_unhooked:
            self._warned_unhooked = True
            warnings.warn("layer-wise training: a gradient arrived without a forward of the "
                          "model the trainer hooks (called as model(...)), so the end of the "
                          "backward pass is taken from the parameters' hooks, which is wrong "
                          "under activation checkpointing with use_reentrant=True", stacklevel=2)
        self._queue_end_of_backward(from_output=False)
        self._saw_grad = True
        if self.stepping and not (self._ddp is not None and self._ddp.owns(p)):
            self.step_now(p)

    def step_now(self, p: torch.Tensor, grad: torch.Tensor | None = None) -> None:
        """Clips and steps ``p`` once in this pass, then frees its gradient. With ``grad`` (DDP's
        averaged bucket view) it steps from ``grad`` and leaves ``.grad`` to DDP."""
        if id(p) in self._stepped:
            raise RuntimeError(
                "layer-wise training: a parameter received its gradient twice in one backward "
                "pass and was already stepped on the first part: a weight used in several "
                "activation-checkpointed segments with use_reentrant=True (each segment's "
                "backward is a separate graph task). Use torch.utils.checkpoint with "
                "use_reentrant=False")
        self._stepped.add(id(p))
        int8 = p.dtype == torch.uint8
        if grad is not None:
            local_grad, p.grad = p.grad, grad
        if self.max_grad_norm is not None:
            if int8:
                clip_float_grad_(p, self.max_grad_norm)
            else:
                torch.nn.utils.clip_grad_norm_([p], self.max_grad_norm)
        self.optimizer.step_parameter(p)
        if grad is not None:
            p.grad = local_grad
        elif int8:
            setattr(p, FLOAT_GRAD, None)
        else:
            p.grad = None

    def _end_of_backward(self) -> None:
        if not self._saw_grad:  # e.g. torch.autograd.grad of a gradient penalty: not a pass
            self._reset_pass()
            return
        if self.stepping:
            self.optimizer_steps += 1
            if self.scheduler is not None:
                # the scheduler counts optimizer.step() calls to warn about a wrong call order;
                # layer-wise steps bypass step(), so record that the optimizer did step
                self.optimizer._opt_called = True
                self.scheduler.step()
        self.micro_steps += 1
        self._reset_pass()

    def _reset_pass(self) -> None:
        self._callback_queued = False
        self._forward_seen = False
        self._saw_grad = False
        self._stepped.clear()

    def remove(self) -> None:
        """Removes the hooks (the model trains normally again)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def clip_float_grad_(codes: torch.Tensor, max_norm: float) -> None:
    """``torch.nn.utils.clip_grad_norm_([p], max_norm)`` for the ``float_grad`` of INT8 codes:
    the same norm and the same clamped coefficient, applied in place."""
    grad = getattr(codes, FLOAT_GRAD, None)
    if grad is None:
        return
    total_norm = torch.nn.utils.get_total_norm([grad])
    grad.mul_(torch.clamp(max_norm / (total_norm + 1e-6), max=1.0).to(grad.device))


def layerwise(model: torch.nn.Module, optimizer_factory: Callable[[torch.nn.Module], LowRankAdamW],
              *, accumulation_steps: int = 1, max_grad_norm: float | None = None,
              scheduler_factory: Callable | None = None) -> LayerwiseTrainer:
    """Sets up layer-wise training of ``model`` (see the module docstring for the semantics).

    ``optimizer_factory(model)`` builds the optimizer (e.g. ``lambda m: GaLoreAdamW(groups(m))``);
    ``scheduler_factory(optimizer)``, if given, builds an LR scheduler stepped once per
    optimizer step. Returns the :class:`LayerwiseTrainer`; keep it alive while training.
    """
    optimizer = optimizer_factory(model)
    scheduler = scheduler_factory(optimizer) if scheduler_factory is not None else None
    return LayerwiseTrainer(model, optimizer, accumulation_steps=accumulation_steps,
                            max_grad_norm=max_grad_norm, scheduler=scheduler)
