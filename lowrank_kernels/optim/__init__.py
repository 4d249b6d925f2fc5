"""Optimizers: the LowRankAdamW core, its presets, LowRankAdagrad, GradNormLoRPAdamW and
layer-wise training (DESIGN.md §2)."""

from lowrank_kernels.optim.full_rank import APOLLOAdamW, FiraAdamW
from lowrank_kernels.optim.gradnorm import GradNormLoRPAdamW
from lowrank_kernels.optim.layerwise import LayerwiseTrainer, clip_float_grad_, layerwise
from lowrank_kernels.optim.lowrank_adagrad import LowRankAdagrad
from lowrank_kernels.optim.lowrank_adamw import (
    GROUP_KEYS_WITHOUT_DEFAULT,
    STATE_DTYPES,
    LowRankAdamW,
    check_group_keys,
    moment_dtype,
)
from lowrank_kernels.optim.presets import DCTAdamW, GaLoreAdamW, QGaLoreAdamW
from lowrank_kernels.optim.scaling import scale_hyperparameters

__all__ = ["GROUP_KEYS_WITHOUT_DEFAULT", "STATE_DTYPES", "APOLLOAdamW", "DCTAdamW", "FiraAdamW",
           "GaLoreAdamW", "GradNormLoRPAdamW", "LayerwiseTrainer", "LowRankAdagrad",
           "LowRankAdamW", "QGaLoreAdamW", "check_group_keys", "clip_float_grad_", "layerwise",
           "moment_dtype",
           "scale_hyperparameters"]
