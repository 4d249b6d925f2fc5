"""lowrank_kernels: fused kernels for low-rank gradient-projection training (GaLore family).

Public surface:
  * ``torch.ops.lowrank.*`` — the ops (C++ CPU and CUDA kernels; see csrc/lowrank.cpp),
  * ``lowrank_kernels.ops`` — the same ops with a backend switch (cpu | cuda | triton | reference),
  * ``lowrank_kernels.reference`` — the plain-torch specification of every op.
"""

from lowrank_kernels import ops, reference
from lowrank_kernels._extension import AVAILABLE as EXTENSION_AVAILABLE
from lowrank_kernels._extension import LOAD_ERROR as EXTENSION_LOAD_ERROR
from lowrank_kernels.ops import fused_galore_step, project, project_back

__version__ = "0.1.0"

__all__ = [
    "EXTENSION_AVAILABLE",
    "EXTENSION_LOAD_ERROR",
    "fused_galore_step",
    "ops",
    "project",
    "project_back",
    "reference",
]
