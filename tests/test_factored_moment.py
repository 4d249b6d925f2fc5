"""The factored second moment (a 1-D fp32 exp_avg_sq of r + own values, DESIGN.md §4.12) in the
C++ CPU kernel of fused_galore_step, against reference.fused_galore_step / fused_qgalore_step.

General inputs, several steps, both sides, every basis (dense, packed INT4, DCT) and weight
format (fp32, bf16, fp16, INT8) with M in fp32, bf16 or 8-bit codes: the kernel sums R² in
another order than the reference (per line over the rank; per 16-line chunk, then over the
chunks in double), and its GEMMs round differently, so the factors, M and W agree to fp32
rounding (the fp32 rule, 1e-5 of the tensor's scale; N = M/(√(a_i c_j) + ε) carries the sums'
rounding, ~1e-7 relative, into W), rounded stores (bf16, fp16, 8-bit and INT8 codes) to one
step of their grid with almost every element equal. On exact inputs (cases.mode_args(exact=True)
with dyadic betas) R and every sum the factors need are exact: M's stored bits (fp32, bf16,
8-bit codes and scales) and the factors a, b are then the reference's bit for bit.

The thread count changes the tile bounds; the factors' sums run over fixed 16-line chunks in a
fixed order, so the step is the same bit for bit at 1, 2 and 3 threads wherever the GEMMs are:
with a basis whose GEMMs are exact (one 1 per rank row: R is a selection of G's entries, back(N)
of N's), and on general inputs under MKL's reproducible mode (MKL_CBWR=COMPATIBLE, in a
subprocess). MKL's default GEMM bits depend on its thread context (fp32 weights' addmm_ and, at
some shapes, R itself; the full V's step likewise), which no reduction order can undo.
"""

import os
import re
import subprocess
import sys

import pytest
import torch
from cases import EXACT_HYPER, HYPER, assert_fp32_close, mode_args

import lowrank_kernels as lk
from lowrank_kernels import reference

pytestmark = pytest.mark.skipif(not lk.EXTENSION_AVAILABLE, reason="extension not built")
STEPS = (1, 2, 3)


def factored_args(m: int, n: int, rank: int, *, basis: str = "dense", weight: str = "fp32",
                  moments: str = "fp32", right: bool | None = None, exact: bool = False,
                  seed: int = 0) -> dict:
    """cases.mode_args with exp_avg_sq replaced by positive factors [a | b] (after earlier
    steps; exact: multiples of 1/64); M stays in the ``moments`` format. weight 'fp16': the
    fp32 case's tensors in float16."""
    args = mode_args(m, n, rank, basis=basis, weight="fp32" if weight == "fp16" else weight,
                     moments=moments, right=right, exact=exact, seed=seed, int8_group=64)
    if weight == "fp16":
        args.update(param=args["param"].half(), grad=args["grad"].half())
    gen = torch.Generator().manual_seed(seed + 1)
    factors = 0.01 + 0.1 * torch.rand(reference.factored_shape(m, n, rank, right), generator=gen)
    args.update(exp_avg_sq=(factors * 64).round() / 64 if exact else factors)
    args.pop("exp_avg_sq_scales", None)
    return args


def run_steps(args: dict, backend: str, steps=STEPS, seed: int = 21, **hyper) -> dict:
    out = {k: v.clone() if torch.is_tensor(v) else v for k, v in args.items()}
    for step in steps:
        lk.ops.fused_galore_step(**out, **{**hyper, "step": step}, seed=seed, backend=backend)
    return out


def assert_within_one_ulp(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """16-bit values: at most one ulp of the expected value apart (plus the fp32 rule's 1e-6
    of the tensor's scale, for values that cancel to near 0 before the rounding), almost all
    equal."""
    exp32 = expected.float()
    slack = torch.finfo(expected.dtype).eps * exp32.abs() + 1e-6 * exp32.abs().max()
    assert ((actual.float() - exp32).abs() <= slack).all()
    assert (actual == expected).float().mean() > 0.95


def assert_codes_within_a_step(actual: dict, expected: dict, code: str, scales: str,
                               decode) -> None:
    """Quantized codes (8-bit M, INT8 W): decoded within one grid step of the expected ones,
    almost every code equal, the scales equal to fp32 rounding."""
    step, value_act, value_exp = decode(actual, expected)
    assert ((value_act - value_exp).abs() <= step * 1.01 + 1e-30).all(), code
    assert (actual[code] == expected[code]).float().mean() > 0.95, code
    torch.testing.assert_close(actual[scales], expected[scales], rtol=1e-5, atol=0)


def _decode_m(right: bool, block: int, rank: int):
    def decode(actual, expected):
        values = [reference.dequantize_moment(r["exp_avg"], r["exp_avg_scales"], block, right,
                                              signed=True) for r in (actual, expected)]
        grid = expected["exp_avg_scales"].repeat_interleave(block, 1)[:, :rank]
        grid = grid * reference.EXP_AVG_FORMAT.max_value * 2.0**-3
        return (grid if right else grid.T), *values
    return decode


def _decode_w(group: int):
    def decode(actual, expected):
        values = [reference.dequantize_int8(r["param"], r["param_scales"], r["param_zeros"],
                                            group) for r in (actual, expected)]
        step = expected["param_scales"].repeat_interleave(group)[:values[1].numel()]
        return step.view(values[1].shape), *values
    return decode


# (m, n, rank, basis, weight, moments, right): both sides, odd shapes, r = 1, r not a multiple
# of 32, r = min(m, n), r > own, several tiles (520 x 256, 256 x 520), every basis and weight
# format, the Q-GaLore configuration (packed INT4 basis + INT8 weights + 8-bit M), the side
# override both ways.
CASES = [
    (37, 23, 5, "dense", "fp32", "fp32", None),
    (23, 37, 5, "dense", "fp32", "fp32", None),
    (37, 23, 1, "dense", "bf16", "bf16", None),
    (23, 37, 1, "dense", "fp16", "8bit", None),
    (131, 67, 33, "dense", "fp16", "bf16", None),
    (67, 131, 17, "dct", "bf16", "8bit", None),
    (37, 23, 17, "int4", "int8", "8bit", None),
    (23, 37, 17, "int4", "int8", "8bit", None),
    (67, 131, 40, "int4", "fp32", "bf16", None),
    (131, 67, 7, "dct", "int8", "fp32", None),
    (20, 64, 8, "dense", "fp32", "8bit", True),
    (20, 64, 40, "dense", "bf16", "bf16", True),  # r = 40 > own = 20 (the side override)
    (37, 23, 23, "dense", "fp32", "fp32", None),  # r = min(m, n)
    (23, 37, 23, "int4", "int8", "8bit", None),
    (64, 21, 5, "int4", "int8", "8bit", False),
    (520, 256, 40, "dense", "fp32", "fp32", None),
    (256, 520, 40, "dense", "bf16", "8bit", None),
]


def _case_id(case):
    m, n, rank, basis, weight, moments, right = case
    side = "" if right is None else f"-right{right}"
    return f"{m}x{n}-r{rank}-{basis}-w{weight}-m{moments}{side}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_the_reference_over_steps(case):
    """Each step from the reference's state after the previous one (so that rounded stores
    stay comparable to one grid step: differences do not compound), steps 1-3."""
    m, n, rank, basis, weight, moments, right = case
    state = factored_args(m, n, rank, basis=basis, weight=weight, moments=moments, right=right)
    for step in STEPS:
        ref = run_steps(state, "reference", steps=(step,), **HYPER)
        out = run_steps(state, "cpu", steps=(step,), **HYPER)
        _assert_step_close(out, ref, state, reference._side(m, n, right), rank)
        state = ref


def _assert_step_close(out: dict, ref: dict, args: dict, side: bool, rank: int) -> None:
    moments = args["exp_avg"].dtype
    assert_fp32_close(out["exp_avg_sq"], ref["exp_avg_sq"])
    assert not torch.equal(out["exp_avg_sq"], args["exp_avg_sq"])
    if moments == torch.int8:
        assert_codes_within_a_step(out, ref, "exp_avg", "exp_avg_scales",
                                   _decode_m(side, args["state_block_size"], rank))
    elif moments == torch.bfloat16:
        assert_within_one_ulp(out["exp_avg"], ref["exp_avg"])
    else:
        assert_fp32_close(out["exp_avg"], ref["exp_avg"])
    _assert_weight_close(out, ref, args)
    assert not torch.equal(out["param"], args["param"]), "the weight did not move"


def _assert_weight_close(out: dict, ref: dict, args: dict) -> None:
    if args["param"].dtype == torch.uint8:
        assert_codes_within_a_step(out, ref, "param", "param_scales",
                                   _decode_w(args["param_group_size"]))
    elif args["param"].dtype == torch.float32:
        assert_fp32_close(out["param"], ref["param"])
    else:
        assert_within_one_ulp(out["param"], ref["param"])


# (m, n, rank, basis, weight, moments): exact inputs (integer G, dyadic basis or INT4 codes of
# it; DCT rows are never dyadic, so there G = 0 keeps R exact)
EXACT_CASES = [
    (37, 23, 5, "dense", "fp32", "fp32"),
    (23, 37, 17, "dense", "fp32", "bf16"),
    (37, 23, 17, "int4", "int8", "8bit"),
    (23, 37, 1, "int4", "int8", "8bit"),
    (67, 131, 40, "dct", "fp32", "8bit"),
    (256, 520, 40, "dense", "bf16", "bf16"),
]


@pytest.mark.parametrize("m,n,rank,basis,weight,moments", EXACT_CASES,
                         ids=["-".join(map(str, c)) for c in EXACT_CASES])
def test_m_and_the_factors_equal_the_reference_bit_for_bit_on_exact_inputs(m, n, rank, basis,
                                                                           weight, moments):
    """M = β1 M + (1−β1) R and each factor's EMA of an exact sum: the stored M (bf16 and 8-bit
    with the reference's stochastic rounding) and a, b are the reference's bits; W by the fp32
    rule (N divides by √(a_i c_j), whose mean(a) is summed in another order)."""
    args = factored_args(m, n, rank, basis=basis, weight=weight, moments=moments, exact=True,
                         seed=rank)
    if basis == "dct":
        args["grad"].zero_()
    hyper = {**EXACT_HYPER, "weight_decay": 0.1}
    ref = run_steps(args, "reference", **hyper)
    out = run_steps(args, "cpu", **hyper)
    for name in ("exp_avg", "exp_avg_scales", "exp_avg_sq"):
        if name in args:
            assert torch.equal(out[name], ref[name]), name
            assert not torch.equal(out[name], args[name]), name
    _assert_weight_close(out, ref, args)


def _selection_basis(m: int, n: int, rank: int, gen: torch.Generator) -> torch.Tensor:
    """A basis with a single 1 per rank row (distinct coordinates): every GEMM of the step is
    exact (R selects entries of G, back(N) places entries of N), in any blocking."""
    right = reference.is_right_side(m, n)
    d = n if right else m
    rows = torch.zeros(rank, d)
    rows[torch.arange(rank), torch.randperm(d, generator=gen)[:rank]] = 1.0
    return rows if right else rows.T.contiguous()


@pytest.mark.parametrize("weight,moments", [("bf16", "bf16"), ("int8", "8bit"),
                                            ("fp32", "fp32")])
@pytest.mark.parametrize("m,n,rank", [(520, 256, 40), (256, 520, 40)], ids=["right", "left"])
def test_the_step_is_the_same_bit_for_bit_at_any_thread_count(m, n, rank, weight, moments):
    args = factored_args(m, n, rank, weight=weight, moments=moments, seed=3)
    gen = torch.Generator().manual_seed(4)
    args["proj"] = _selection_basis(m, n, rank, gen)
    args["grad"] = torch.randn(m, n, generator=gen).to(args["grad"].dtype)
    # the sums depend on their order for these inputs: per-tile sums (bounds moving with the
    # thread count) would change the factors
    lines = (args["grad"].float() @ args["proj"].T if m >= n else
             (args["proj"].T @ args["grad"].float()).T) ** 2
    by_112 = torch.stack([c.sum(0) for c in lines.split(112)]).sum(0)
    by_96 = torch.stack([c.sum(0) for c in lines.split(96)]).sum(0)
    assert not torch.equal(by_112, by_96)
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append(run_steps(args, "cpu", steps=(1, 2), **HYPER))
    finally:
        torch.set_num_threads(threads)
    for name, value in results[0].items():
        if not torch.is_tensor(value):
            continue
        for other in results[1:]:
            if name == "param" and weight == "fp32":
                # addmm_ folds the update into MKL's GEMM, whose beta/alpha combination rounds
                # differently in its thread contexts even with an exact product (the full V's
                # fp32 weights as well); 16-bit and INT8 weights round back(N) here
                assert_fp32_close(other[name], value)
            else:
                assert torch.equal(other[name], value), name
    assert not torch.equal(results[0]["exp_avg_sq"], args["exp_avg_sq"])


# General inputs under MKL's conditional numerical reproducibility mode (MKL_CBWR), in which its
# GEMMs round alike in every thread context: then the whole step, fp32 weights included, is the
# same bit for bit at 1, 2 and 3 threads (tile bounds differ at 520 lines; at 2048 they do not,
# but MKL's bits did). A subprocess: MKL reads the variable when it loads.
_CNR_SCRIPT = """
import sys, torch
from cases import HYPER
from test_factored_moment import factored_args, run_steps
for m, n, rank, weight, moments in [(520, 256, 40, "fp32", "fp32"), (256, 520, 40, "bf16", "8bit"),
                                    (2048, 1024, 128, "fp32", "bf16")]:
    args = factored_args(m, n, rank, weight=weight, moments=moments)
    results = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        results.append(run_steps(args, "cpu", steps=(1, 2), **HYPER))
    for name, value in results[0].items():
        if torch.is_tensor(value) and not all(torch.equal(r[name], value) for r in results[1:]):
            sys.exit(f"{m}x{n} {weight} {moments}: {name} differs between thread counts")
"""


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="needs MKL's MKL_CBWR")
def test_general_inputs_are_the_same_bit_for_bit_at_any_thread_count_with_reproducible_mkl():
    tests = os.path.dirname(os.path.abspath(__file__))
    path = [os.path.dirname(tests), tests, os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "MKL_CBWR": "COMPATIBLE", "PYTHONPATH": os.pathsep.join(path)}
    proc = subprocess.run([sys.executable, "-c", _CNR_SCRIPT], env=env, cwd=tests,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_fp32_m_needs_no_rounding_seed_and_bf16_m_does():
    """The rounding-seed rule looks at both moments: a factored V is fp32, M decides."""
    args = factored_args(37, 23, 5)
    for backend in ("reference", "cpu"):
        run_steps(args, backend, steps=(1,), seed=2**32, **EXACT_HYPER)  # nothing is rounded


# ---- bad input: the Python checks and checks.h raise the same message, before any write ----
def _gradnorm_call(args: dict, backend: str) -> None:
    m = args["param"].shape[0]
    rows = [torch.ones(m) for _ in range(4)]
    lk.ops.fused_gradnorm_step(args["param"], args["grad"], args["proj"], args["exp_avg"],
                               args["exp_avg_sq"], *rows, **EXACT_HYPER, backend=backend)


def _galore_call(args: dict, backend: str) -> None:
    lk.ops.fused_galore_step(**args, **EXACT_HYPER, backend=backend)


BAD_CASES = [
    ("adagrad", "fp32", lambda a: a.update(inner="adagrad", exp_avg=None), _galore_call,
     re.escape("exp_avg_sq: a factored (1-D) second moment needs inner='adam', got "
               "inner='adagrad'")),
    ("bf16-factors", "bf16", lambda a: a.update(exp_avg_sq=a["exp_avg_sq"].bfloat16()),
     _galore_call, re.escape("exp_avg_sq: expected dtype float32 for a factored (1-D) second "
                             "moment, got ") + "(torch.bfloat16|BFloat16)$"),
    ("length", "fp32", lambda a: a.update(exp_avg_sq=a["exp_avg_sq"][:-1].clone()),
     _galore_call, r"exp_avg_sq: expected shape \[42\] \(r \+ own factors\) for a factored "
                   r"second moment, got \[41\]"),
    ("strided", "fp32", lambda a: a.update(exp_avg_sq=a["exp_avg_sq"].repeat(2)[::2]),
     _galore_call, r"exp_avg_sq: expected a contiguous \(row-major\) tensor"),
    ("v-scales", "8bit", lambda a: a.update(exp_avg_sq_scales=torch.ones(37, 1)), _galore_call,
     r"exp_avg_sq_scales: only valid with 8-bit \(torch.uint8\) exp_avg_sq codes, not with a "
     r"factored second moment"),
    ("fira", "fp32", lambda a: a.update(full_rank="fira"), _galore_call,
     r"exp_avg_sq: full_rank='fira' supports a full \(2-D\) second moment only, got a factored "
     r"\(1-D\) one"),
    ("apollo", "bf16", lambda a: a.update(full_rank="apollo"), _galore_call,
     r"exp_avg_sq: full_rank='apollo' supports a full \(2-D\) second moment only"),
    ("bf16-m-seed", "bf16", lambda a: a.update(seed=2**32), _galore_call,
     r"seed: expected a value in \[0, 2\^32 - 1\], got 4294967296"),
    ("int8-weight-seed", "8bit", lambda a: a.update(seed=-1), _galore_call,
     r"seed: expected a value in \[0, 2\^32 - 1\], got -1"),
    ("gradnorm", "fp32", lambda a: None, _gradnorm_call,
     r"exp_avg_sq: fused_gradnorm_step needs the full \(2-D\) second moment; a factored "
     r"\(1-D\) one is a fused_galore_step mode"),
]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("name,moments,change,call,match", BAD_CASES,
                         ids=[c[0] for c in BAD_CASES])
def test_bad_input_raises_naming_the_argument_before_writing(name, moments, change, call, match,
                                                             backend):
    args = factored_args(37, 23, 5, moments=moments)
    args["seed"] = 21
    change(args)
    before = {k: v.clone() for k, v in args.items() if torch.is_tensor(v)}
    with pytest.raises(ValueError, match=match):
        call(args, backend)
    for k, v in before.items():
        assert torch.equal(args[k], v), k


def test_the_cpu_benchmark_runs_and_reports_its_ratios():
    from bench import bench_cpu_factored

    (row,) = bench_cpu_factored.run([((96, 40), 8, torch.float32)], warmup=0, rounds=1,
                                    csv_path=None)
    ratio = row["factored_ms"] / row["full8_ms"]
    # the times are rounded to 0.0005 ms, the ratio (from unrounded times) to 0.0005
    rounding = 5e-4 * (1 + ratio) / row["full8_ms"] + 5e-4
    assert abs(row["factored_over_full8"] - ratio) <= rounding
    assert row["floor_ms"] > 0
