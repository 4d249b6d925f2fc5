"""Ready-made configurations of LowRankAdamW.

* :class:`GaLoreAdamW` — a drop-in for ``galore_torch.GaLoreAdamW``: same constructor, same group
  keys (``rank``, ``update_proj_gap``, ``scale``, ``proj_type``), same numbers (fp32 SVD of the
  gradient, refresh at steps 0, T, 2T, …, galore-torch's AdamW formula for unprojected params).
* :class:`QGaLoreAdamW` — Q-GaLore: INT4-packed basis, lazy refresh, β = (0.9, 0.95) as in the
  Q-GaLore pretraining script; INT8 weight codes (uint8 with ``scales``/``zeros``/
  ``float_grad``) are stepped with stochastic rounding inside the same fused call.
* :class:`DCTAdamW` — SVD-free DCT projection re-chosen every step (only r indices stored).
"""

from __future__ import annotations

from collections.abc import Iterable

from lowrank_kernels.optim.lowrank_adamw import LowRankAdamW


class GaLoreAdamW(LowRankAdamW):
    """``galore_torch.GaLoreAdamW`` with each projected step fused into one kernel call.

    Moments of projected weights take the weight's dtype, as galore-torch's (``state_dtype``
    "auto"), so they never hold more memory than galore-torch's: fp32 weights → fp32 moments
    (the same numbers as galore-torch), bf16 weights → bf16 moments, stored with stochastic
    rounding where galore-torch rounds to nearest (which freezes V), fp16 weights → bf16 moments
    (galore-torch: fp16, whose range R² under- and overflows). ``state_dtype=torch.float32``
    keeps fp32 moments for any weight.

    Other differences, all deliberate: a rank above min(m, n) raises instead of being truncated,
    proj_type must be "std", unknown group keys raise, and a failed SVD falls back (with a
    warning) instead of aborting. ``no_deprecation_warning`` is accepted for signature
    compatibility and ignored.
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

    Defaults: lr 1e-3, betas (0.9, 0.95) (the Q-GaLore pretraining script's), ε 1e-6 (not
    bias-corrected, as in every preset), weight decay 0, moments "auto" (bf16 with stochastic
    rounding for INT8 codes and 16-bit weights). q-galore-torch's ``QGaLoreAdamW8bit`` defaults
    differ (betas (0.9, 0.999), ε 1e-8 bias-corrected inside bitsandbytes' 8-bit Adam, weight
    decay 1e-2, 8-bit moments): docs/optimizers.md lists them side by side, with the reasons.

    The basis (SVD by default) is quantized by ``ops.quantize_int4`` at each refresh and kept
    packed (two codes per byte) in the state; each step passes it, with its scales and zeros, to
    one ``fused_galore_step`` call that dequantizes inside its GEMMs. The lazy policy measures the
    subspace overlap on the dequantized bases. A parameter given as uint8 INT8 codes (see
    LowRankAdamW's docstring: ``p.scales``, ``p.zeros``, optional ``p.group_size``, gradient in
    ``p.float_grad``) is dequantized, updated and requantized with stochastic rounding in that
    same call.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-6,
                 weight_decay: float = 0.0, *, update_proj_gap: int = 200,
                 refresh: str = "lazy", proj_bits: int = 4, **lowrank_options):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         update_proj_gap=update_proj_gap, refresh=refresh, proj_bits=proj_bits,
                         **lowrank_options)


class DCTAdamW(LowRankAdamW):
    """DCT projection (DESIGN.md §4.5), re-chosen every step by default (``update_proj_gap=1``:
    ``ops.dct_select`` each step, a top-r over column scores of G Cᵀ, no SVD); moments are kept
    when the indices change. The int32 indices are the fused step's ``proj``: the kernel generates
    the basis values, so the state holds r indices instead of an r×d basis.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, *, update_proj_gap: int = 1,
                 **lowrank_options):
        lowrank_options.setdefault("projection", "dct")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         update_proj_gap=update_proj_gap, **lowrank_options)
