"""DCTAdamW and QGaLoreAdamW (INT4 basis, INT8 weights) against plain-torch computations of the
same steps; each projected step is one fused_galore_step call on the compact formats."""

import pytest
import torch
from cases import assert_fp32_close, mlp_batches, mlp_loss, mlp_param_groups, small_mlp

import lowrank_kernels as lk
from lowrank_kernels import ops, reference
from lowrank_kernels.optim import DCTAdamW, LowRankAdamW, QGaLoreAdamW
from lowrank_kernels.projection import int4
from lowrank_kernels.projection.base import to_layout
from lowrank_kernels.projection.svd import top_singular_columns

pytestmark = pytest.mark.skipif(not lk.EXTENSION_AVAILABLE, reason="extension not built")

HYPER = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.1)
SHAPES = [(67, 41), (41, 67)]


def _gradients(m, n, count, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(m, n, generator=gen) for _ in range(count)]


def _steps(optimizer_cls, m, n, rank, grads, **group):
    weight = torch.nn.Parameter(0.02 * torch.randn(m, n, generator=torch.Generator()
                                                   .manual_seed(1)))
    before = weight.detach().clone()
    optimizer = optimizer_cls([{"params": [weight], "rank": rank, "scale": 0.25, **group}],
                              **HYPER)
    for grad in grads:
        weight.grad = grad.clone()
        optimizer.step()
    return before, weight.detach(), optimizer.state[weight]


def _reference_step_(weight, grad, basis, exp_avg, exp_avg_sq, step):
    reference.fused_galore_step(weight, grad, basis, exp_avg, exp_avg_sq, lr=HYPER["lr"],
                                beta1=HYPER["betas"][0], beta2=HYPER["betas"][1],
                                eps=HYPER["eps"], weight_decay=HYPER["weight_decay"], scale=0.25,
                                step=step)


def _scipy_dct_choice(grad, rank):
    """(indices, basis in the fused-step layout) of DESIGN §4.5, from scipy's DCT matrix."""
    scipy_fft = pytest.importorskip("scipy.fft")
    m, n = grad.shape
    right = reference.is_right_side(m, n)
    d = n if right else m
    dct = torch.from_numpy(scipy_fft.dct(torch.eye(d).numpy(), norm="ortho", axis=0)).float()
    coefficients = grad @ dct.T if right else dct @ grad  # G Cᵀ (m×d) or C G (d×n)
    scores = coefficients.abs().sum(dim=0 if right else 1)
    chosen = torch.sort(torch.topk(scores, rank).indices).values
    return chosen, (dct[chosen] if right else dct[chosen].T.contiguous())


# ---------------------------------------------------------------------------------------------
# DCTAdamW
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("m,n", SHAPES, ids=["right", "left"])
def test_dct_adamw_step_matches_a_scipy_dct_basis(m, n):
    grad, = _gradients(m, n, 1)
    before, after, state = _steps(DCTAdamW, m, n, 7, [grad])
    chosen, basis = _scipy_dct_choice(grad, 7)
    assert state["proj"].dtype == torch.int32
    assert state["proj"].tolist() == chosen.tolist()
    expected = before.clone()
    shape = ops.low_rank_shape(m, n, 7)
    _reference_step_(expected, grad, basis, torch.zeros(shape), torch.zeros(shape), 1)
    assert_fp32_close(after, expected)


@pytest.mark.parametrize("m,n", SHAPES, ids=["right", "left"])
def test_dct_adamw_reselects_every_step_and_keeps_the_moments(m, n):
    """Default: dct_select at every step; M and V carry over unchanged when the indices change
    (no reset, no re-projection), as DESIGN §4.5 specifies."""
    grads = _gradients(m, n, 3, seed=2)
    _, after, state = _steps(DCTAdamW, m, n, 5, grads)
    assert int(state["proj_refreshes"]) == 3
    assert int(state["proj_last_refresh"]) == 2

    expected = 0.02 * torch.randn(m, n, generator=torch.Generator().manual_seed(1))
    shape = ops.low_rank_shape(m, n, 5)
    exp_avg, exp_avg_sq = torch.zeros(shape), torch.zeros(shape)
    choices = []
    for step, grad in enumerate(grads, start=1):
        chosen, basis = _scipy_dct_choice(grad, 5)
        choices.append(set(chosen.tolist()))
        _reference_step_(expected, grad, basis, exp_avg, exp_avg_sq, step)
    assert len(set(map(frozenset, choices))) > 1, "the indices never changed: the test is void"
    assert_fp32_close(after, expected)
    assert_fp32_close(state["exp_avg"], exp_avg)
    assert_fp32_close(state["exp_avg_sq"], exp_avg_sq)


# ---------------------------------------------------------------------------------------------
# QGaLoreAdamW: INT4 basis
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("m,n", SHAPES, ids=["right", "left"])
def test_qgalore_adamw_step_uses_the_int4_basis(m, n):
    grad, = _gradients(m, n, 1)
    before, after, state = _steps(QGaLoreAdamW, m, n, 7, [grad])
    assert state["proj"].dtype == torch.uint8
    basis = to_layout(top_singular_columns(grad, 7, param_name="w"), m, n)
    packed, scales, zeros = int4.pack_basis(basis, 256)
    assert torch.equal(packed, state["proj"])
    assert torch.equal(scales, state["proj_scales"])
    assert torch.equal(zeros, state["proj_zeros"])
    # the dequantized basis (what the step must use) differs from the exact one...
    dequantized = int4.unpack_basis(packed, scales, zeros, tuple(basis.shape), 256)
    assert (dequantized - basis).abs().max() > 1e-3
    expected = before.clone()
    shape = ops.low_rank_shape(m, n, 7)
    _reference_step_(expected, grad, dequantized, torch.zeros(shape), torch.zeros(shape), 1)
    # ...and the step follows the dequantized one
    assert_fp32_close(after, expected)


def test_qgalore_lazy_refresh_measures_overlap_on_the_dequantized_basis():
    weight = torch.nn.Parameter(torch.zeros(40, 24))
    optimizer = QGaLoreAdamW([{"params": [weight], "rank": 4, "update_proj_gap": 2}], lr=1e-3)
    grad = torch.randn(40, 24, generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        weight.grad = grad.clone()
        optimizer.step()
    # the same gradient twice: INT4 rounding keeps the overlap near 1 (not exactly 1), so the
    # gap grew from 2 to 4
    overlap = float(optimizer.state[weight]["proj_overlap"])
    assert 0.9 < overlap < 1.0
    assert int(optimizer.state[weight]["proj_gap"]) == 4


# ---------------------------------------------------------------------------------------------
# one fused call per projected step, on the compact formats
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset,proj_dtype", [(DCTAdamW, torch.int32),
                                               (QGaLoreAdamW, torch.uint8)], ids=["dct", "qgalore"])
def test_each_projected_step_is_one_fused_call_on_the_compact_proj(monkeypatch, preset,
                                                                   proj_dtype):
    calls = []
    real = LowRankAdamW._fused_step_kernel

    def recording_kernel(self):  # wraps the kernel the step resolves (dispatcher or ops)
        kernel = real(self)

        def recording(param, grad, proj, *args, **kwargs):
            calls.append((proj.dtype, kwargs.get("proj_scales") is not None))
            return kernel(param, grad, proj, *args, **kwargs)

        return recording

    monkeypatch.setattr(LowRankAdamW, "_fused_step_kernel", recording_kernel)
    model = small_mlp()
    optimizer = preset(mlp_param_groups(model, rank=4), lr=1e-2)
    for batch in mlp_batches(2):
        optimizer.zero_grad()
        mlp_loss(model, batch).backward()
        optimizer.step()
    assert calls == [(proj_dtype, proj_dtype == torch.uint8)] * 6  # 3 weights × 2 steps


# ---------------------------------------------------------------------------------------------
# QGaLoreAdamW: INT8 weight codes
# ---------------------------------------------------------------------------------------------
def _int8_parameter(weight: torch.Tensor, group_size: int = 256) -> torch.nn.Parameter:
    codes, scales, zeros = ops.quantize_int8(weight, group_size)
    p = torch.nn.Parameter(codes, requires_grad=False)
    p.scales, p.zeros, p.group_size = scales, zeros, group_size
    return p


@pytest.mark.parametrize("m,n", SHAPES, ids=["right", "left"])
def test_qgalore_int8_weight_step_matches_the_reference(m, n):
    gen = torch.Generator().manual_seed(3)
    weight = 0.02 * torch.randn(m, n, generator=gen)
    grad = torch.randn(m, n, generator=gen)
    p = _int8_parameter(weight, group_size=128)
    codes, scales, zeros = p.detach().clone(), p.scales.clone(), p.zeros.clone()
    optimizer = QGaLoreAdamW([{"params": [p], "rank": 7, "scale": 0.25}], **HYPER)
    p.float_grad = grad.clone()
    optimizer.step()
    state = optimizer.state[p]

    shape = ops.low_rank_shape(m, n, 7)
    reference.fused_qgalore_step(
        codes, grad, state["proj"], torch.zeros(shape), torch.zeros(shape), lr=HYPER["lr"],
        beta1=HYPER["betas"][0], beta2=HYPER["betas"][1], eps=HYPER["eps"],
        weight_decay=HYPER["weight_decay"], scale=0.25, step=1, proj_scales=state["proj_scales"],
        proj_zeros=state["proj_zeros"], param_scales=scales, param_zeros=zeros,
        param_group_size=128, seed=int(state["proj_seed"]) % 2**31)
    assert p.dtype == torch.uint8
    assert torch.equal(p.detach(), codes)
    assert_fp32_close(p.scales, scales)
    assert_fp32_close(p.zeros, zeros)
    assert not torch.equal(p.detach(), _int8_parameter(weight, 128).detach())  # it moved
    optimizer.zero_grad()
    assert p.float_grad is None


def _train_int8(p, target, optimizer, steps):
    """Quadratic loss ½‖W − target‖², W the dequantized codes: its gradient is W − target."""
    losses = []
    for _ in range(steps):
        weight = ops.dequantize_int8(p.detach(), p.scales, p.zeros, p.group_size)
        losses.append(0.5 * float((weight - target).square().sum()))
        p.float_grad = weight - target
        optimizer.step()
        optimizer.zero_grad()
    return losses


def _int8_problem():
    gen = torch.Generator().manual_seed(4)
    target = torch.randn(48, 32, generator=gen)
    return _int8_parameter(torch.zeros(48, 32) + 0.1 * torch.randn(48, 32, generator=gen)), target


def _int8_optimizer(p):
    return QGaLoreAdamW([{"params": [p], "rank": 8, "update_proj_gap": 3}], lr=0.1)


def test_qgalore_int8_weights_train():
    p, target = _int8_problem()
    losses = _train_int8(p, target, _int8_optimizer(p), 40)
    assert losses[-1] < 0.6 * losses[0], losses


# ---------------------------------------------------------------------------------------------
# checkpoints (the MLP round trip for both presets is in test_optim_lowrank_adamw.py)
# ---------------------------------------------------------------------------------------------
def test_qgalore_int8_resume_is_bit_for_bit(tmp_path):
    straight_p, target = _int8_problem()
    _train_int8(straight_p, target, _int8_optimizer(straight_p), 10)

    first_p, _ = _int8_problem()
    first = _int8_optimizer(first_p)
    _train_int8(first_p, target, first, 5)
    # the codes' scales and zeros are model data: saved next to the codes
    torch.save({"codes": first_p.detach(), "scales": first_p.scales, "zeros": first_p.zeros,
                "optim": first.state_dict()}, tmp_path / "ckpt.pt")
    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed_p = _int8_parameter(torch.zeros(48, 32))
    resumed_p.data.copy_(checkpoint["codes"])
    resumed_p.scales.copy_(checkpoint["scales"])
    resumed_p.zeros.copy_(checkpoint["zeros"])
    resumed = _int8_optimizer(resumed_p)
    resumed.load_state_dict(checkpoint["optim"])
    _train_int8(resumed_p, target, resumed, 5)

    assert torch.equal(resumed_p.detach(), straight_p.detach())
    assert torch.equal(resumed_p.scales, straight_p.scales)
    assert torch.equal(resumed_p.zeros, straight_p.zeros)


def test_int8_codes_without_quantization_parameters_are_refused():
    codes = torch.nn.Parameter(torch.zeros(8, 8, dtype=torch.uint8), requires_grad=False)
    with pytest.raises(ValueError, match="`scales`"):
        QGaLoreAdamW([{"params": [codes], "rank": 2}])
    codes.scales, codes.zeros = torch.ones(3), torch.zeros(1)
    with pytest.raises(ValueError, match=r"scales: expected shape \[1\]"):
        QGaLoreAdamW([{"params": [codes], "rank": 2}])
    codes.scales = torch.ones(1)
    with pytest.raises(ValueError, match="without 'rank'"):
        QGaLoreAdamW([{"params": [codes]}])
