"""Optimizers: the LowRankAdamW core, its presets and layer-wise training (DESIGN.md §2)."""

from lowrank_kernels.optim.layerwise import LayerwiseTrainer, layerwise
from lowrank_kernels.optim.lowrank_adamw import LowRankAdamW
from lowrank_kernels.optim.presets import DCTAdamW, GaLoreAdamW, QGaLoreAdamW
from lowrank_kernels.optim.scaling import scale_hyperparameters

__all__ = ["DCTAdamW", "GaLoreAdamW", "LayerwiseTrainer", "LowRankAdamW", "QGaLoreAdamW",
           "layerwise", "scale_hyperparameters"]
