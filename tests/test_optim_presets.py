"""DCTAdamW and QGaLoreAdamW against plain-torch computations of the same step.

Both presets are written against ops that other branches provide (ops.dct_select/dct_basis;
ops.quantize_int4/dequantize_int4 and a fused step taking an int32 or packed uint8 proj); their
tests skip, saying which op is missing, until those land."""

import pytest
import torch
from cases import assert_fp32_close

import lowrank_kernels as lk
from lowrank_kernels import ops, reference
from lowrank_kernels.optim import DCTAdamW, QGaLoreAdamW
from lowrank_kernels.projection import int4
from lowrank_kernels.projection.base import to_layout
from lowrank_kernels.projection.svd import top_singular_columns

pytestmark = pytest.mark.skipif(not lk.EXTENSION_AVAILABLE, reason="extension not built")


def _missing(*names):
    missing = [n for n in names if not hasattr(ops, n)]
    return pytest.mark.skipif(bool(missing), reason=f"needs ops.{', ops.'.join(missing)}")


HYPER = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.1)
SHAPES = [(67, 41), (41, 67)]


def _one_step(optimizer_cls, m, n, rank, **group):
    gen = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter(0.02 * torch.randn(m, n, generator=gen))
    grad = torch.randn(m, n, generator=gen)
    before = weight.detach().clone()
    optimizer = optimizer_cls([{"params": [weight], "rank": rank, "scale": 0.25, **group}],
                              **HYPER)
    weight.grad = grad.clone()
    optimizer.step()
    return before, grad, weight.detach(), optimizer.state[weight]


def _reference_step(before, grad, basis):
    m, n = before.shape
    expected = before.clone()
    shape = ops.low_rank_shape(m, n, basis.shape[0] if m >= n else basis.shape[1])
    reference.fused_galore_step(expected, grad, basis, torch.zeros(shape), torch.zeros(shape),
                                lr=HYPER["lr"], beta1=HYPER["betas"][0], beta2=HYPER["betas"][1], eps=HYPER["eps"],
                                weight_decay=HYPER["weight_decay"], scale=0.25, step=1)
    return expected


@_missing("dct_select", "dct_basis")
@pytest.mark.parametrize("m,n", SHAPES, ids=["right", "left"])
def test_dct_adamw_step_matches_a_scipy_dct_basis(m, n):
    scipy_fft = pytest.importorskip("scipy.fft")
    before, grad, after, state = _one_step(DCTAdamW, m, n, 7)
    right = reference.is_right_side(m, n)
    d = n if right else m
    dct = torch.from_numpy(scipy_fft.dct(torch.eye(d).numpy(), norm="ortho", axis=0)).float()
    coefficients = grad @ dct.T if right else dct @ grad  # G Cᵀ (m×d) or C G (d×n)
    scores = coefficients.abs().sum(dim=0 if right else 1)
    chosen = torch.topk(scores, 7).indices
    assert set(state["proj"].tolist()) == set(chosen.tolist())
    assert state["proj"].dtype == torch.int32
    basis = dct[chosen] if right else dct[chosen].T.contiguous()
    assert_fp32_close(after, _reference_step(before, grad, basis))


@_missing("quantize_int4", "dequantize_int4")
@pytest.mark.parametrize("m,n", SHAPES, ids=["right", "left"])
def test_qgalore_adamw_step_uses_the_int4_basis(m, n):
    before, grad, after, state = _one_step(QGaLoreAdamW, m, n, 7)
    assert state["proj"].dtype == torch.uint8
    basis = to_layout(top_singular_columns(grad, 7, param_name="w"), m, n)
    packed, scales, zeros = int4.pack_basis(basis, 256)
    assert torch.equal(packed, state["proj"])
    dequantized = int4.unpack_basis(packed, scales, zeros, tuple(basis.shape), 256)
    assert_fp32_close(after, _reference_step(before, grad, dequantized))


@_missing("quantize_int4", "dequantize_int4")
def test_qgalore_lazy_refresh_measures_overlap_on_the_dequantized_basis():
    weight = torch.nn.Parameter(torch.zeros(40, 24))
    optimizer = QGaLoreAdamW([{"params": [weight], "rank": 4, "update_proj_gap": 2}], lr=1e-3)
    grad = torch.randn(40, 24, generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        weight.grad = grad.clone()
        optimizer.step()
    # the same gradient twice: INT4 rounding keeps the overlap near 1, so the gap grew
    assert float(optimizer.state[weight]["proj_overlap"]) > 0.9
    assert int(optimizer.state[weight]["proj_gap"]) == 4
