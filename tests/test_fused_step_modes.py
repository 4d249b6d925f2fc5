"""fused_galore_step's AdaGrad rule (inner="adagrad", DESIGN.md §4.10) and 8-bit moments (§4.9)
in the C++ CPU kernel and Triton (the interpreter on CPU tensors without a GPU), against the
reference.

Moments are compared bit for bit on exact inputs (cases.mode_args(exact=True): integer G, a
dyadic basis, few-bit moments; 8-bit codes with power-of-two block scales), where every backend's
fp32 moments agree: the stored fp32, bf16 or 8-bit codes and their block scales must then be the
reference's exactly (the stochastic rounding included). A DCT basis is never dyadic: there G = 0
keeps R = 0 exact. Weights are compared with the fp32 rule, INT8 codes within one quantization
step of the reference (and bit for bit between the CPU and Triton kernels). General inputs are
compared with tolerances. The interpreter is slow: small shapes, few cases per backend.
"""

import importlib.util

import pytest
import torch
from cases import (
    EXACT_HYPER,
    HYPER,
    SMALL_ODD_SHAPES,
    StepInputs,
    assert_fp32_close,
    assert_lowp_close,
    assert_states_equal,
    assert_8bit_moments_within_a_grid_step,
    assert_step_matches,
    decoded_8bit_moments,
    mode_args,
    plain_torch_galore_step,
    run_mode_step,
)

import lowrank_kernels as lk
from lowrank_kernels import reference

needs_extension = pytest.mark.skipif(not lk.EXTENSION_AVAILABLE, reason="extension not built")
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton is not installed")
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: the interpreter
BACKENDS = [pytest.param("cpu", marks=needs_extension), pytest.param("triton", marks=needs_triton)]
LEFT, RIGHT = SMALL_ODD_SHAPES  # (67, 131), (131, 67)


def _device(backend):
    return TRITON_DEVICE if backend == "triton" else "cpu"


def _assert_weights_match(out, ref, args):
    """fp32 weights by the fp32 rule; INT8 codes: dequantized within one step of the
    reference's (a code may differ by one where u falls within the GEMMs' rounding)."""
    if out["param"].dtype != torch.uint8:
        assert_fp32_close(out["param"], ref["param"])
        assert not torch.equal(out["param"], args["param"]), "the weight did not move"
        return
    group = args["param_group_size"]
    w_out, w_ref = (reference.dequantize_int8(r["param"], r["param_scales"], r["param_zeros"],
                                              group) for r in (out, ref))
    step = ref["param_scales"].repeat_interleave(group)[:w_ref.numel()].view(w_ref.shape)
    assert ((w_out - w_ref).abs() <= step * (1 + 1e-4)).all()


# (m, n, rank, basis, weight, moments, inner, block): both sides, r = 1, r not a multiple of 32
# (40: a full and a partial block), dense/INT4/DCT bases, fp32 and INT8 weights, every moment
# format under AdaGrad and 8-bit moments under Adam.
EXACT_CASES = [
    (*LEFT, 5, "dense", "fp32", "8bit", "adam", 32),
    (*RIGHT, 17, "dense", "fp32", "8bit", "adam", 32),
    (*LEFT, 40, "int4", "fp32", "8bit", "adam", 8),
    (*RIGHT, 1, "int4", "fp32", "8bit", "adam", 32),
    (*RIGHT, 40, "dct", "fp32", "8bit", "adam", 32),
    (*LEFT, 17, "dense", "int8", "8bit", "adam", 16),
    (*RIGHT, 5, "int4", "int8", "8bit", "adam", 32),
    (*LEFT, 17, "dense", "fp32", "fp32", "adagrad", 32),
    (*RIGHT, 5, "dense", "fp32", "bf16", "adagrad", 32),
    (*LEFT, 40, "dense", "fp32", "8bit", "adagrad", 32),
    (*RIGHT, 17, "int4", "int8", "8bit", "adagrad", 4),
    (96, 64, 1, "dct", "fp32", "bf16", "adagrad", 32),  # d = 64: row 0 of C is exactly 1/8
]


def _exact_id(case):
    m, n, rank, basis, weight, moments, inner, block = case
    return f"{m}x{n}-r{rank}-{basis}-w{weight}-{moments}-b{block}-{inner}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", EXACT_CASES, ids=_exact_id)
def test_moments_equal_the_reference_bit_for_bit(case, backend):
    m, n, rank, basis, weight, moments, inner, block = case
    # DCT rows are not dyadic, but for d = 4^k row 0 is c_0 = 2^-k exactly (R exact); other
    # DCT ranks run with G = 0 (R = 0 for any basis)
    args = mode_args(m, n, rank, basis=basis, weight=weight, moments=moments, inner=inner,
                     block=block, exact=True, zero_grad=basis == "dct" and rank > 1, seed=rank)
    decay = {"weight_decay": 0.1}  # the weight moves even where N = 0 (AdaGrad with G = 0)
    ref = run_mode_step(args, "reference", **decay)
    out = run_mode_step(args, backend, _device(backend), **decay)
    assert_states_equal(out, ref)
    _assert_weights_match(out, ref, args)
    for name in ("exp_avg_sq", "exp_avg_sq_scales"):  # the states moved (and so could differ)
        if name in args:
            assert not torch.equal(ref[name], args[name]), name


@needs_extension
@pytest.mark.parametrize("moments,inner", [("8bit", "adam"), ("8bit", "adagrad"),
                                           ("fp32", "adagrad")])
@pytest.mark.parametrize("m,n,rank", [(256, 520, 64), (520, 256, 40)], ids=["left", "right"])
def test_cpu_tiles_cover_the_moments_as_the_reference(m, n, rank, moments, inner):
    """Several CPU tiles (each decodes, updates and encodes its lines; blocks along the rank axis
    of a left-side column tile run down the rows)."""
    args = mode_args(m, n, rank, moments=moments, inner=inner, exact=True)
    assert_states_equal(run_mode_step(args, "cpu"), run_mode_step(args, "reference"))


@needs_extension
@needs_triton
@pytest.mark.parametrize("inner", ["adam", "adagrad"])
@pytest.mark.parametrize("m,n,rank,group", [(96, 64, 7, 64), (*LEFT, 3, 256)],
                         ids=["rows-right", "groups-left"])
def test_int8_weight_codes_with_8bit_moments_equal_between_cpu_and_triton(m, n, rank, group,
                                                                          inner):
    """Exact inputs: the INT8 requantization sees the same W' in both kernels, so the codes,
    scales and zeros of the weight are equal too."""
    args = mode_args(m, n, rank, weight="int8", moments="8bit", inner=inner, exact=True,
                     int8_group=group)
    cpu = run_mode_step(args, "cpu", **HYPER)
    triton = run_mode_step(args, "triton", TRITON_DEVICE, **HYPER)
    for name in ("param", "param_scales", "param_zeros"):
        assert torch.equal(triton[name], cpu[name]), name
    assert_states_equal(triton, cpu)
    assert not torch.equal(cpu["param"], args["param"])


# ---- general inputs: tolerances -------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m,n,rank,weight,moments", [
    (*LEFT, 17, torch.float32, torch.float32), (*RIGHT, 1, torch.bfloat16, torch.bfloat16),
    (*RIGHT, 17, torch.bfloat16, torch.float32), (*LEFT, 64, torch.float32, torch.bfloat16)],
    ids=["left-fp32", "right-r1-bf16", "right-bf16w", "left-bf16s"])
def test_adagrad_matches_the_reference(m, n, rank, weight, moments, backend):
    """The DESIGN.md §6 rules (assert_step_matches) with inner='adagrad': fp32 to 1e-5, 16-bit
    results within twice plain torch's error."""
    gen = torch.Generator().manual_seed(rank)
    right = reference.is_right_side(m, n)
    d, shape = (n, (m, rank)) if right else (m, (rank, n))
    q, _ = torch.linalg.qr(torch.randn(d, rank, generator=gen, dtype=torch.float64))
    inputs = StepInputs(param=(0.02 * torch.randn(m, n, generator=gen)).to(weight),
                        grad=torch.randn(m, n, generator=gen).to(weight),
                        proj=(q.T if right else q).float().contiguous().to(weight),
                        exp_avg=None,
                        exp_avg_sq=(0.1 * torch.rand(shape, generator=gen)).to(moments))
    hyper = {**HYPER, "inner": "adagrad"}
    out = inputs.to(device=_device(backend))
    lk.ops.fused_galore_step(*out.args(), **hyper, backend=backend)
    assert_step_matches(out.to(device="cpu"), inputs, **hyper)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m,n,rank,basis,weight,inner", [
    (*RIGHT, 17, "dense", "bf16", "adam"), (*LEFT, 40, "dct", "fp32", "adam"),
    (*LEFT, 5, "int4", "bf16", "adagrad")],
    ids=["right-dense-bf16w", "left-dct", "left-int4-adagrad"])
def test_8bit_moments_on_general_inputs_stay_within_a_grid_step(m, n, rank, basis, weight,
                                                                inner, backend):
    """The moments within a grid step of the reference's (cases.assert_8bit_moments_within_a_
    grid_step), and the weight follows the reference (bf16 weights to two bf16 ulps, with
    Triton's back projection in bf16)."""
    block = 8 if basis == "dct" else 32
    args = mode_args(m, n, rank, basis=basis, weight=weight, moments="8bit", inner=inner,
                     block=block)
    ref = run_mode_step(args, "reference", **HYPER)
    out = run_mode_step(args, backend, _device(backend), **HYPER)
    right = reference.is_right_side(m, n)
    assert_8bit_moments_within_a_grid_step(out, ref, right, block)
    if weight == "bf16":  # DESIGN.md §6: within twice plain torch's error in bf16
        exact = run_mode_step({**args, "param": args["param"].float()}, "reference", **HYPER)
        dense = {"dense": lambda: args["proj"], "dct": lambda: reference.dct_projection(
            args["proj"], m, n), "int4": lambda: reference.dequantize_int4(
            args["proj"], args["proj_scales"], args["proj_zeros"],
            reference.quantized_basis_shape(m, n, rank), 256)}[basis]()
        m0, v0 = decoded_8bit_moments(args, right, block)
        plain = plain_torch_galore_step(StepInputs(args["param"], args["grad"], dense, m0, v0),
                                        **HYPER, inner=inner)
        assert_lowp_close(out["param"], exact["param"], plain.param, before=args["param"])
    else:
        assert_fp32_close(out["param"], ref["param"], rtol=1e-4)


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_a_nan_makes_its_blocks_scale_nan_and_leaves_the_others(backend):
    args = mode_args(*RIGHT, 40, moments="8bit", block=8)
    args["grad"][3, :] = float("nan")  # right side: row 3 of R, M and V
    out = run_mode_step(args, backend, _device(backend), **HYPER)
    for name in ("exp_avg_scales", "exp_avg_sq_scales"):
        assert out[name][3].isnan().all() and not out[name][4:].isnan().any()
    m32, v32 = decoded_8bit_moments(out, True, 8)
    assert m32[3].isnan().all() and v32[3].isnan().all() and v32[4:].isfinite().all()


@needs_extension
def test_positive_v_keeps_a_nonzero_code_in_the_kernels():
    """A block whose largest √V is 1e8 times its smallest: the floor keeps code 1 (CPU kernel
    and reference alike)."""
    args = mode_args(*RIGHT, 8, moments="8bit", block=8, inner="adagrad")
    args["grad"].zero_()
    v = torch.full((131, 8), 1e-16)
    v[:, 0] = 1.0
    words = reference.philox_uint32x2(0, torch.arange(v.numel()).view(v.shape)
                                      + reference.MOMENT_STREAM)[1]
    args["exp_avg_sq"], args["exp_avg_sq_scales"] = reference.quantize_moment(v, words, 8, True,
                                                                              signed=False)
    for backend in ("reference", "cpu"):
        out = run_mode_step(args, backend)
        assert (out["exp_avg_sq"] > 0).all(), backend


# ---- bad input: clear errors naming the argument, nothing written -------------------------
def _bad_cases():
    def eight(args):
        return args

    return [
        ("adagrad-with-exp_avg", "fp32", "adagrad",
         lambda a: a.update(exp_avg=torch.zeros_like(a["exp_avg_sq"])),
         "exp_avg: expected None with inner='adagrad'"),
        ("adam-without-exp_avg", "fp32", "adam", lambda a: a.update(exp_avg=None),
         "exp_avg: required with inner='adam'"),
        ("bad-inner", "fp32", "adam", lambda a: a.update(inner="rmsprop"),
         "inner: expected 'adam' or 'adagrad'"),
        ("scales-missing", "8bit", "adam", lambda a: a.update(exp_avg_sq_scales=None),
         "exp_avg_sq_scales: required with 8-bit"),
        ("scales-shape", "8bit", "adam",
         lambda a: a.update(exp_avg_scales=a["exp_avg_scales"][:-1].contiguous()),
         "exp_avg_scales: expected shape"),
        ("scales-dtype", "8bit", "adam",
         lambda a: a.update(exp_avg_scales=a["exp_avg_scales"].double()),
         "exp_avg_scales: expected dtype float32"),
        ("scales-with-fp32-moments", "fp32", "adam",
         lambda a: a.update(exp_avg_scales=torch.ones(131, 1, device=a["param"].device)),
         "exp_avg_scales: only valid with 8-bit"),
        ("block-not-power-of-two", "8bit", "adam", lambda a: a.update(state_block_size=24),
         "state_block_size: expected a power of two in \\[1, 32\\]"),
        ("block-above-tile", "8bit", "adam", lambda a: a.update(state_block_size=64),
         "state_block_size: expected a power of two in \\[1, 32\\]"),
        ("8bit-m-fp32-v", "8bit", "adam",
         lambda a: a.update(exp_avg_sq=torch.zeros(131, 17, device=a["param"].device),
                            exp_avg_sq_scales=None),
         "exp_avg_sq: expected dtype torch.uint8|exp_avg_sq: expected dtype Byte"),
        ("int8-v", "8bit", "adam", lambda a: a.update(exp_avg_sq=a["exp_avg"]),
         "exp_avg_sq: expected dtype float32, bfloat16 or"),
        ("aliased-scales", "8bit", "adam",
         lambda a: a.update(exp_avg_sq_scales=a["exp_avg_scales"]),
         "exp_avg_sq_scales: must not alias exp_avg_scales"),
        ("8bit-bad-seed", "8bit", "adam", lambda a: a.update(seed=2**32),
         "seed: expected a value in"),
    ]


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("name,moments,inner,change,match", _bad_cases(),
                         ids=[c[0] for c in _bad_cases()])
def test_bad_input_raises_naming_the_argument_before_writing(name, moments, inner, change,
                                                             match, backend):
    args = mode_args(*RIGHT, 17, moments=moments, inner=inner)
    args["seed"] = 21
    device = _device(backend)
    moved = {k: v.clone().to(device) if torch.is_tensor(v) else v for k, v in args.items()}
    change(moved)
    before = {k: v.clone() for k, v in moved.items() if torch.is_tensor(v)}
    with pytest.raises((ValueError, RuntimeError), match=match):
        lk.ops.fused_galore_step(**moved, **EXACT_HYPER, backend=backend)
    for k, v in before.items():
        assert torch.equal(moved[k], v), k


# ---- the side override (right=): a row shard of a right-side weight may be wider than tall ---
# (m, n, rank, right, basis, weight): against the side rule in both directions, a rank above
# min(m, n) (allowed: only the basis' dimension bounds it), r = 1, every basis and INT8 weights.
SIDE_CASES = [
    (20, 64, 8, True, "dense", "fp32"),
    (64, 20, 8, False, "dense", "fp32"),
    (8, 64, 16, True, "dense", "fp32"),
    (20, 64, 1, True, "int4", "fp32"),
    (64, 21, 5, False, "dct", "fp32"),
    (24, 64, 7, True, "dct", "int8"),
    (64, 20, 8, False, "int4", "int8"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", SIDE_CASES, ids=lambda c: f"{c[0]}x{c[1]}-r{c[2]}-"
                         f"{'right' if c[3] else 'left'}-{c[4]}-w{c[5]}")
def test_side_override_matches_the_reference(case, backend):
    m, n, rank, right, basis, weight = case
    args = mode_args(m, n, rank, basis=basis, weight=weight, right=right, int8_group=16)
    ref = run_mode_step(args, "reference", **HYPER)
    out = run_mode_step(args, backend, _device(backend), **HYPER)
    assert out["exp_avg"].shape == ((m, rank) if right else (rank, n))
    for name in ("exp_avg", "exp_avg_sq"):
        assert_fp32_close(out[name], ref[name])
    _assert_weights_match(out, ref, args)


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("m,n", [(40, 23), (23, 40)], ids=["right", "left"])
def test_the_side_the_rule_picks_given_explicitly_changes_nothing(m, n, backend):
    args = mode_args(m, n, 5)
    implicit = run_mode_step(args, backend, _device(backend), **HYPER)
    args["right"] = reference.is_right_side(m, n)
    explicit = run_mode_step(args, backend, _device(backend), **HYPER)
    for name in ("param", "exp_avg", "exp_avg_sq"):
        assert torch.equal(explicit[name], implicit[name]), name


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_side_override_bad_input_names_the_argument(backend):
    args = mode_args(20, 64, 8, right=True)
    device = _device(backend)
    moved = {k: v.clone().to(device) if torch.is_tensor(v) else v for k, v in args.items()}
    before = {k: v.clone() for k, v in moved.items() if torch.is_tensor(v)}
    wide = torch.zeros(65, 64, device=device)  # rank 65 > n = 64
    with pytest.raises((ValueError, RuntimeError),
                       match=r"proj: rank r=65 must lie in \[1, n=64\] \(right side given\)"):
        lk.ops.fused_galore_step(**{**moved, "proj": wide}, **HYPER, backend=backend)
    with pytest.raises((ValueError, RuntimeError),
                       match=r"proj: expected shape \(m=20, r\) for a left projection, got"):
        lk.ops.fused_galore_step(**{**moved, "right": False}, **HYPER, backend=backend)
    with pytest.raises((ValueError, RuntimeError), match=r"exp_avg: expected shape \[20, 8\]"
                       r"|exp_avg: expected shape \(m, r\)|exp_avg: expected shape"):
        lk.ops.fused_galore_step(**{**moved, "exp_avg": moved["exp_avg"].T.contiguous()},
                                 **HYPER, backend=backend)
    for k, v in before.items():
        assert torch.equal(moved[k], v), k
