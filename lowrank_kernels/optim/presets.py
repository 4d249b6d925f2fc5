"""Ready-made configurations of LowRankAdamW.

* :class:`GaLoreAdamW` — a drop-in for ``galore_torch.GaLoreAdamW``: same constructor, same group
  keys (``rank``, ``update_proj_gap``, ``scale``, ``proj_type``), same numbers (fp32 SVD of the
  gradient, refresh at steps 0, T, 2T, …, galore-torch's AdamW formula for unprojected params).
* :class:`QGaLoreAdamW` — Q-GaLore: INT4-packed basis, lazy refresh, β = (0.9, 0.95) as in the
  Q-GaLore recipes (INT8 weights through ``Int8Linear``: not wired in yet).
* :class:`DCTAdamW` — SVD-free DCT projection refreshed every step (only r indices stored).
"""

from __future__ import annotations

from collections.abc import Iterable

from lowrank_kernels.optim.lowrank_adamw import LowRankAdamW


class GaLoreAdamW(LowRankAdamW):
    """``galore_torch.GaLoreAdamW`` with each projected step fused into one kernel call.

    Differences, all deliberate: a rank above min(m, n) raises instead of being truncated,
    proj_type must be "std", moments of projected weights are fp32 (galore-torch keeps them in the
    gradient's dtype), and a failed SVD falls back (with a warning) instead of aborting.
    ``no_deprecation_warning`` is accepted for signature compatibility and ignored.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, correct_bias: bool = True,
                 no_deprecation_warning: bool = False, **lowrank_options):
        lowrank_options.setdefault("dense_adamw", "galore")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         correct_bias=correct_bias, **lowrank_options)


class QGaLoreAdamW(LowRankAdamW):
    """Q-GaLore: INT4 basis (``proj_bits=4``, groups of 256) refreshed lazily.

    Needs the quantization ops (``ops.quantize_int4``/``dequantize_int4`` and a fused step that
    accepts a packed basis); constructing it with a projected group raises NotImplementedError
    naming the missing op until they are built. INT8 weights (``Int8Linear`` codes stepped with
    stochastic rounding inside the same fused call) are not wired in yet: a uint8 parameter in a
    projected group raises NotImplementedError.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-6,
                 weight_decay: float = 0.0, *, update_proj_gap: int = 200,
                 refresh: str = "lazy", proj_bits: int = 4, **lowrank_options):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         update_proj_gap=update_proj_gap, refresh=refresh, proj_bits=proj_bits,
                         **lowrank_options)


class DCTAdamW(LowRankAdamW):
    """DCT projection (DESIGN.md §4.5), refreshed every step by default (the choice is cheap:
    a top-r over column scores of G Cᵀ), moments kept when indices change.

    Needs ``ops.dct_select`` and ``ops.dct_basis``; until they are built, constructing it with a
    projected group raises NotImplementedError naming the missing op.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, *, update_proj_gap: int = 1,
                 **lowrank_options):
        lowrank_options.setdefault("projection", "dct")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         update_proj_gap=update_proj_gap, **lowrank_options)
