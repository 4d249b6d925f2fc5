"""DistributedDataParallel and layer-wise stepping; INT8 weight gradients under DDP.

DDP averages gradients bucket by bucket during the backward pass (a bucket's all-reduce starts
when all its gradients are accumulated) and copies the averaged buckets back into ``.grad`` at the
end of the pass. A parameter's post-accumulate-grad hook fires BEFORE that all-reduce, so layer-wise
stepping (lowrank_kernels.optim.layerwise) cannot step from it under DDP: it would step each rank
on its own gradient. :class:`DDPLayerwiseSteps` instead registers a DDP communication hook that,
on the micro-batch that steps, waits for the bucket's all-reduce, steps the bucket's parameters
from the averaged gradients, and zeroes the bucket, so the ``.grad`` DDP writes back is zero and
the next accumulation starts from nothing. Other micro-batches (and passes under ``no_sync()``,
which skip the hook) are ordinary DDP. Each bucket's all-reduce is waited for before its steps, so
the steps of one bucket no longer overlap that bucket's communication (the next buckets' do).

DDP keeps every gradient in its buckets for the whole backward pass, so under DDP layer-wise
stepping saves no gradient memory; it makes the same layer-wise script run on one or many GPUs
with the same numbers. FSDP2 is where layer-wise stepping frees memory (each sharded gradient is
dropped after its step).

INT8 weight codes (Int8Linear) are not DDP parameters (uint8, no ``.grad``): their gradient
arrives in ``codes.float_grad``, which DDP does not see. :func:`average_int8_grads` registers a
float_grad hook on each of them that averages it across the ranks, once per backward pass, before
any other float_grad hook (so before a layer-wise step).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lowrank_kernels.autograd import FLOAT_GRAD, register_float_grad_hook


class DDPLayerwiseSteps:
    """The DDP communication hook of a LayerwiseTrainer (see the module docstring)."""

    def __init__(self, ddp_model: torch.nn.parallel.DistributedDataParallel, trainer):
        self.trainer = trainer
        self.group = ddp_model.process_group
        self.reduced = {id(p) for p in ddp_model.parameters() if p.requires_grad}
        ddp_model.register_comm_hook(self, _step_after_all_reduce)

    def owns(self, p: torch.Tensor) -> bool:
        """Whether DDP averages ``p``'s gradient (it is then stepped by the hook)."""
        return id(p) in self.reduced


def _step_after_all_reduce(steps: DDPLayerwiseSteps, bucket):
    """DDP's comm hook (state, bucket). No annotation on ``bucket``: DDP checks it is
    dist.GradBucket itself and rejects the string that ``from __future__ import annotations``
    makes of it."""
    buffer = bucket.buffer()
    buffer.div_(dist.get_world_size(steps.group))
    work = dist.all_reduce(buffer, group=steps.group, async_op=True)
    if not steps.trainer.stepping:
        return work.get_future().then(lambda fut: fut.value()[0])
    work.wait()
    for p, grad in zip(bucket.parameters(), bucket.gradients()):
        if steps.trainer.holds(p):
            steps.trainer.step_now(p, grad)
    buffer.zero_()
    # a CUDA-aware future on GPUs, so that DDP's use of the buffer waits for the zeroing
    done = torch.futures.Future(devices=[buffer.device] if buffer.is_cuda else None)
    done.set_result(buffer)
    return done


def average_int8_grads(model: torch.nn.Module, group: dist.ProcessGroup | None = None) -> list:
    """Averages the ``float_grad`` of every INT8 weight of ``model`` across the ranks of
    ``group`` once per backward pass (see the module docstring). Call it after building the
    model and before ``layerwise(...)``; returns the hook handles."""
    handles = []
    world = dist.get_world_size(group)

    def average(codes: torch.Tensor) -> None:
        grad = getattr(codes, FLOAT_GRAD, None)
        if grad is not None:
            dist.all_reduce(grad.div_(world), group=group)

    for p in model.parameters():
        if p.dtype == torch.uint8:
            handles.append(register_float_grad_hook(p, average))
    return handles
