"""lowrank_kernels: fused kernels for low-rank gradient-projection training (GaLore family).

Public surface:
  * ``torch.ops.lowrank.*`` — the ops: C++ kernels on CPU tensors, Triton kernels on CUDA tensors
    (registered at import when triton is importable; lowrank_kernels/_dispatch.py),
  * ``set_cuda_backend("triton" | "cuda_cxx")`` — the one switch of the CUDA kernels,
  * ``lowrank_kernels.ops`` — typed wrappers of the same ops, with an explicit ``backend=`` for
    tests and benchmarks (cpu | cuda | triton | reference),
  * ``lowrank_kernels.reference`` — the plain-torch specification of every op,
  * ``lowrank_kernels.optim`` — LowRankAdamW and its presets (GaLoreAdamW, QGaLoreAdamW,
    DCTAdamW), LowRankAdagrad, GradNormLoRPAdamW, layer-wise training, scaling rules; the
    optimizers are also importable from here,
  * ``lowrank_kernels.projection`` — projectors and refresh policies,
  * ``lowrank_kernels.distributed`` — FSDP2/DDP placement, collectives, DCP helpers,
  * ``lowrank_kernels.autograd`` — Int8Linear (INT8 weights, Q-GaLore),
  * ``lowrank_kernels.integrations.transformers`` — Hugging Face Trainer (imported on demand).

Layers, each importing only those below it: optim -> projection -> ops -> _dispatch / _fakes ->
_checks and the kernels (C++ through torch.ops, triton_kernels) -> reference.
"""

from lowrank_kernels import _dispatch, _fakes
from lowrank_kernels._extension import AVAILABLE as EXTENSION_AVAILABLE
from lowrank_kernels._extension import LOAD_ERROR as EXTENSION_LOAD_ERROR

_fakes.register()
_dispatch.register_cuda_kernels()

# after the registrations
from lowrank_kernels import _op_docs, autograd, integrations, ops, optim, projection, reference
from lowrank_kernels._dispatch import cuda_backend, set_cuda_backend
from lowrank_kernels.autograd import (
    Int8Linear,
    int8_linear,
    replace_linear_with_int8,
)
from lowrank_kernels.ops import fused_galore_step, fused_gradnorm_step, project, project_back
from lowrank_kernels.optim import (
    APOLLOAdamW,
    DCTAdamW,
    FiraAdamW,
    GaLoreAdamW,
    GradNormLoRPAdamW,
    LayerwiseTrainer,
    LowRankAdagrad,
    LowRankAdamW,
    QGaLoreAdamW,
    layerwise,
)

__version__ = "0.1.0"

_op_docs.attach()  # help(torch.ops.lowrank.<op>) shows the schema and the wrapper's docstring

__all__ = [
    "EXTENSION_AVAILABLE",
    "EXTENSION_LOAD_ERROR",
    "APOLLOAdamW",
    "DCTAdamW",
    "FiraAdamW",
    "GaLoreAdamW",
    "GradNormLoRPAdamW",
    "Int8Linear",
    "LayerwiseTrainer",
    "LowRankAdagrad",
    "LowRankAdamW",
    "QGaLoreAdamW",
    "autograd",
    "cuda_backend",
    "fused_galore_step",
    "fused_gradnorm_step",
    "int8_linear",
    "integrations",
    "layerwise",
    "ops",
    "optim",
    "project",
    "project_back",
    "projection",
    "reference",
    "replace_linear_with_int8",
    "set_cuda_backend",
]
