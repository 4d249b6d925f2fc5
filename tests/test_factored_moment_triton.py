"""The factored second moment (DESIGN.md §4.12: a 1-D fp32 exp_avg_sq of r + own Adafactor
factors) in the Triton fused_galore_step (the interpreter on CPU tensors without a GPU), against
reference.fused_galore_step / fused_qgalore_step over three steps, each side carrying its own
state.

What is exact and what is not. M depends on R alone: on exact inputs (cases.mode_args(
exact=True): integer G, a dyadic basis, few-bit M) R is exact in any summation order and
M ← M/2 + R/2 rounds identically everywhere, so M (fp32, bf16 with stochastic rounding, 8-bit
codes and scales) is compared bit for bit at every step. The factors are sums of R² over a
line or a rank column divided by own or r, and ā a sum of r values: the kernel sums tile by
tile, torch in its own order. For n positive fp32 terms two orders differ by at most
2(n − 1)·2^-24 relative, so the factors are held to 2(own + r + 4)·2^-24 (the "+ 4": the
division, the two EMA roundings, ā's division), and exactly when own and r are powers of two
(every sum, division and EMA step is then exact: the dyadic test). N inherits that relative
error (halved by the square root); weights: fp32 to the fp32 rule (1e-5 of the tensor's scale),
bf16 within 2k·(ulp + 2^-7·|update|) at step k (N and the basis are rounded to bf16 for launch
B's dot, as on the 2-D path; assert_weights_close), INT8 codes dequantized within one
quantization step. A DCT basis is never dyadic: there M follows the fp32 rule too.
"""

import importlib.util
import math
import re

import pytest
import torch
from cases import (
    EXACT_HYPER,
    SMALL_ODD_SHAPES,
    assert_fp32_close,
    mode_args,
)

import lowrank_kernels as lk
from lowrank_kernels import reference

pytestmark = [pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                 reason="triton is not installed"),
              pytest.mark.usefixtures("one_thread")]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: the interpreter
LEFT, RIGHT = SMALL_ODD_SHAPES  # (67, 131), (131, 67)
STEPS = 3
MOMENT_NAMES = ("exp_avg", "exp_avg_scales")


def factored_args(m: int, n: int, rank: int, *, exact: bool = True, seed: int = 0,
                  weight: str = "fp32", **formats) -> dict:
    """cases.mode_args with the 2-D V replaced by r + own factors (positive; multiples of 1/64
    on exact inputs, so their first EMA step is exact too). weight 'fp16': the fp32 case's W
    and G in float16 (small integers and 0.02·randn: G stays exact)."""
    args = mode_args(m, n, rank, exact=exact, seed=seed,
                     weight="fp32" if weight == "fp16" else weight, **formats)
    if weight == "fp16":
        args.update(param=args["param"].half(), grad=args["grad"].half())
    args.pop("exp_avg_sq_scales", None)
    gen = torch.Generator().manual_seed(seed + 1)
    factors = 0.1 * torch.rand(reference.factored_shape(m, n, rank, args["right"]),
                               generator=gen) + 0.01
    args["exp_avg_sq"] = (factors * 64).round() / 64 if exact else factors
    return args


def _copy(args: dict, device: str = "cpu") -> dict:
    return {k: v.clone().to(device) if torch.is_tensor(v) else v for k, v in args.items()}


def run_steps(args: dict, backend: str, steps: int = STEPS, **hyper) -> list[dict]:
    """``steps`` consecutive steps (step = 1, 2, ...) on one copy of ``args``; the states after
    each step, on CPU."""
    state = _copy(args, DEVICE if backend == "triton" else "cpu")
    history = []
    for step in range(1, steps + 1):
        lk.ops.fused_galore_step(**state, **{**EXACT_HYPER, **hyper, "step": step}, seed=7,
                                 backend=backend)
        history.append(_copy(state))
    return history


def factor_rtol(args: dict, rank: int) -> float:
    own = args["exp_avg_sq"].numel() - rank
    return 2 * (own + rank + 4) * 2.0**-24


def assert_weights_close(out: dict, ref: dict, before: dict, step: int) -> None:
    """``before``: the reference's state before this step (``step`` = 1, 2, ...)."""
    param = ref["param"]
    assert not torch.equal(out["param"], before["param"]), "the weight did not move"
    if param.dtype == torch.uint8:
        group = before["param_group_size"]
        w_out, w_ref = (reference.dequantize_int8(r["param"], r["param_scales"],
                                                  r["param_zeros"], group) for r in (out, ref))
        step_size = ref["param_scales"].repeat_interleave(group)[:w_ref.numel()].view(w_ref.shape)
        assert ((w_out - w_ref).abs() <= step_size * (1 + 1e-4)).all()
    elif param.dtype in (torch.bfloat16, torch.float16):
        # per step: the two roundings of W to 16 bits (one ulp apart), launch B's 16-bit
        # operands (half an ulp of the update; an ulp taken) and the difference carried from the
        # last step; twice that, as the ulp is the reference's and the other value may be a
        # binade up
        bits = {torch.bfloat16: 7, torch.float16: 10}[param.dtype]  # mantissa bits
        ref32 = param.float()
        ulp = 2.0 ** (torch.floor(torch.log2(ref32.abs().clamp(min=2.0**-100))) - bits)
        update = (ref32 - before["param"].float()).abs().max()
        bound = 2 * step * (ulp + 2.0**-bits * update)
        assert ((out["param"].float() - ref32).abs() <= bound).all()
    else:
        assert_fp32_close(out["param"], param)


# (shape, rank, basis, weight, M format, state block, side override, exact inputs): both sides,
# r = 1, r not a multiple of 32 (17; 40 and 33 span two rank tiles of launch A, 131 three own
# tiles), r = min(m, n), r > own (the side override), dense / packed INT4 / DCT bases, fp32 /
# bf16 / fp16 / INT8 weights, M fp32 / bf16 / 8-bit, and the side override. The INT4 + INT8 +
# 8-bit M rows are the Q-GaLore configuration; fp16 W with bf16 M is state_dtype="auto"'s.
CASES = [
    (LEFT, 17, "dense", "fp32", "fp32", 32, None, True),
    (RIGHT, 1, "dense", "bf16", "bf16", 32, None, True),
    (LEFT, 40, "int4", "int8", "8bit", 8, None, True),
    (RIGHT, 33, "int4", "int8", "8bit", 32, None, True),
    (RIGHT, 5, "dense", "fp32", "8bit", 4, None, True),
    (LEFT, 40, "dct", "bf16", "fp32", 32, None, False),
    (RIGHT, 17, "dense", "fp32", "bf16", 32, False, True),  # 131×67 on the left side
    (LEFT, 17, "dense", "fp16", "bf16", 32, None, True),
    (RIGHT, 67, "dense", "fp32", "fp32", 32, None, True),  # r = min(m, n)
    ((20, 64), 40, "dense", "bf16", "8bit", 8, True, True),  # r = 40 > own = 20
]


def _case_id(case):
    (m, n), rank, basis, weight, moments, block, right, exact = case
    side = "" if right is None else f"-right={right}"
    return f"{m}x{n}-r{rank}-{basis}-w{weight}-m{moments}-b{block}{side}" + ("" if exact
                                                                            else "-general")


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_three_steps_match_the_reference(case):
    (m, n), rank, basis, weight, moments, block, right, exact = case
    args = factored_args(m, n, rank, basis=basis, weight=weight, moments=moments, block=block,
                         right=right, exact=exact, seed=rank)
    hyper = {"weight_decay": 0.1}
    outs, refs = run_steps(args, "triton", **hyper), run_steps(args, "reference", **hyper)
    rtol = factor_rtol(args, rank)
    before = args
    for step, (out, ref) in enumerate(zip(outs, refs), start=1):
        torch.testing.assert_close(out["exp_avg_sq"], ref["exp_avg_sq"], rtol=rtol, atol=0,
                                   msg=lambda msg, step=step: f"factors, step {step}: {msg}")
        for name in MOMENT_NAMES:
            if ref.get(name) is None:
                continue
            if exact:
                assert torch.equal(out[name], ref[name]), f"{name}, step {step}"
            else:
                assert_fp32_close(out[name], ref[name])
        assert_weights_close(out, ref, before, step)
        before = ref
    assert not torch.equal(refs[-1]["exp_avg_sq"], args["exp_avg_sq"])


def test_strided_basis_and_transposed_gradient():
    """A column-major dense basis (galore-torch's strided SVD rows) and a transposed G are read
    through their strides (no copy): the same results as the row-major step's reference."""
    args = factored_args(*LEFT, 17, moments="bf16", seed=5)
    args["proj"] = args["proj"].T.contiguous().T
    args["grad"] = args["grad"].T.contiguous().T
    assert args["proj"].stride()[0] == 1 and args["grad"].stride()[0] == 1
    rtol = factor_rtol(args, 17)
    refs = run_steps(args, "reference", steps=2)
    for step, (out, ref) in enumerate(zip(run_steps(args, "triton", steps=2), refs), start=1):
        torch.testing.assert_close(out["exp_avg_sq"], ref["exp_avg_sq"], rtol=rtol, atol=0)
        assert torch.equal(out["exp_avg"], ref["exp_avg"])
        assert_weights_close(out, ref, args if step == 1 else refs[0], step)


@pytest.mark.parametrize("m,n,rank", [(64, 128, 4), (128, 64, 2)], ids=["left", "right"])
def test_factors_equal_the_reference_bit_for_bit_on_dyadic_inputs(m, n, rank):
    """own and r powers of two, R dyadic, β2 = 3/4, factors multiples of 1/64: every sum of R²,
    its division by own or r, the EMA and ā are exact in any order, and so is N: the factors
    and the 8-bit M must be the reference's bit for bit after each step."""
    args = factored_args(m, n, rank, moments="8bit", block=2, seed=3)
    for out, ref in zip(run_steps(args, "triton"), run_steps(args, "reference")):
        for name in ("exp_avg_sq", *MOMENT_NAMES):
            assert torch.equal(out[name], ref[name]), name
        assert_fp32_close(out["param"], ref["param"])


def test_two_runs_are_bit_identical():
    """No atomics, partial sums reduced in a fixed order: the Q-GaLore configuration (INT4 basis,
    INT8 weights, 8-bit M, factored V) on general inputs gives the same bits twice."""
    args = factored_args(*RIGHT, 40, basis="int4", weight="int8", moments="8bit", exact=False,
                         seed=11)
    first, second = run_steps(args, "triton", steps=2), run_steps(args, "triton", steps=2)
    for a, b in zip(first, second):
        for name, value in a.items():
            if torch.is_tensor(value):
                assert torch.equal(value, b[name]), name


def test_workspaces_need_no_initialisation(monkeypatch):
    """Launch A writes every partial sum and every R element the later launches read: with the
    step's workspaces (torch.empty) filled with NaN the results are the same bits."""
    args = factored_args(*LEFT, 40, basis="int4", weight="int8", moments="8bit", exact=False,
                         seed=13)
    expected = run_steps(args, "triton", steps=1)
    empty = torch.empty

    def nan_empty(*size, **kwargs):
        out = empty(*size, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", nan_empty)
    poisoned = run_steps(args, "triton", steps=1)
    monkeypatch.undo()
    for name, value in expected[0].items():
        if torch.is_tensor(value):
            assert torch.equal(value, poisoned[0][name]), name


def test_finalize_keeps_a_nan_mean_as_torch_clamp_does():
    """ā = max(Σa/r, 1e-30) with torch.clamp's NaN rule (the reference's and the C++ kernel's):
    a NaN factor gives a NaN mean, a zero mean gives the floor."""
    from lowrank_kernels.triton_kernels import fused_galore_step as fgs

    own, rank = 5, 3
    floor = torch.tensor(reference.FACTORED_FLOOR, dtype=torch.float32).item()
    for planted, expected in ((float("nan"), "nan"), (0.0, floor)):
        factors = torch.zeros(rank + own, device=DEVICE)
        factors[1] = planted
        partials = torch.zeros(rank + own + 1, device=DEVICE)
        mean = partials[-1:]
        fgs._factored_finalize_kernel[(2,)](factors, partials, mean, own, rank, 1, 1, 0.5, 0.5,
                                            BLOCK=fgs.FACTORED_FINALIZE_BLOCK)
        got = mean.item()
        assert math.isnan(got) if expected == "nan" else got == expected, got


REFUSED = [
    ({"inner": "adagrad", "exp_avg": None},
     "exp_avg_sq: a factored (1-D) second moment needs inner='adam'"),
    ({"exp_avg_sq": torch.zeros(131 + 17 + 1)}, "exp_avg_sq: expected shape [148]"),
    ({"exp_avg_sq": torch.zeros(131 + 17, dtype=torch.bfloat16)},
     "exp_avg_sq: expected dtype float32"),
    ({"exp_avg_sq_scales": torch.ones(131, 1)}, "exp_avg_sq_scales: only valid with 8-bit"),
    ({"full_rank": "fira"}, "exp_avg_sq: full_rank='fira' supports a full"),
]


@pytest.mark.parametrize("change,message", REFUSED, ids=["adagrad", "length", "dtype",
                                                         "sq-scales", "fira"])
def test_refused_inputs_raise_before_writing(change, message):
    args = {**factored_args(*RIGHT, 17), **change}
    state = _copy(args, DEVICE)
    with pytest.raises(ValueError, match=re.escape(message)):
        lk.ops.fused_galore_step(**state, **EXACT_HYPER, backend="triton")
    for name, value in args.items():
        if torch.is_tensor(value):
            assert torch.equal(state[name].cpu(), value), f"{name} was written"
