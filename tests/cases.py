"""Shapes, inputs and tolerances shared by every test module (one fixture module, docs/DESIGN.md §6).

Tolerances follow DESIGN.md §6: fp32 results agree to ~1e-5 relative; low-precision results are
judged against what plain torch makes in that precision ("error ≤ 2× plain torch's error against
an fp32 reference"), never against a hand-tuned atol.
"""

from __future__ import annotations

import dataclasses
import io
import itertools

import torch

import lowrank_kernels as lk
from lowrank_kernels import reference

# Odd shapes: m, n not multiples of any block size; both projection sides.
ODD_SHAPES = [(1000, 3001), (3001, 1000)]
SMALL_ODD_SHAPES = [(67, 131), (131, 67)]  # for the Triton interpreter and other slow paths
RANKS = [1, 17, 64]
WEIGHT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
STATE_DTYPES = [torch.float32, torch.bfloat16]
# A large lr makes every update span several bf16 ulps even at rank 1, so a kernel that skipped
# the update or the decay would fail the low-precision comparison too (see assert_lowp_close).
HYPER = dict(lr=0.5, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.1, scale=0.25, step=3)


def side(m: int, n: int) -> str:
    return "right" if reference.is_right_side(m, n) else "left"


def orthonormal_basis(m: int, n: int, rank: int, *, generator: torch.Generator) -> torch.Tensor:
    """A random orthonormal basis in the layout fused_galore_step expects (r×n or m×r)."""
    d = n if reference.is_right_side(m, n) else m
    q, _ = torch.linalg.qr(torch.randn(d, rank, generator=generator, dtype=torch.float64))
    q = q.float()
    return q.T.contiguous() if reference.is_right_side(m, n) else q.contiguous()


@dataclasses.dataclass
class StepInputs:
    param: torch.Tensor
    grad: torch.Tensor
    proj: torch.Tensor
    exp_avg: torch.Tensor | None  # None: AdaGrad
    exp_avg_sq: torch.Tensor

    def clone(self) -> StepInputs:
        return StepInputs(*(None if t is None else t.clone() for t in self.args()))

    def to(self, **kwargs) -> StepInputs:
        """A copy (never an alias, even when nothing changes) moved/converted by Tensor.to."""
        return StepInputs(*(None if t is None else t.to(**kwargs, copy=True)
                            for t in self.args()))

    def args(self) -> tuple[torch.Tensor, ...]:
        """The tensors themselves, in op argument order (dataclasses.astuple would copy them)."""
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))


def step_inputs(m: int, n: int, rank: int, *, weight_dtype=torch.float32,
                state_dtype=torch.float32, proj_dtype=torch.float32, seed: int = 0,
                device="cpu") -> StepInputs:
    """Inputs of one step after a few earlier ones: weights ~0.02 as at LLaMA init (so an update
    spans many bf16 ulps), nonzero moments, and an orthonormal basis."""
    gen = torch.Generator().manual_seed(seed)
    shape = (m, rank) if reference.is_right_side(m, n) else (rank, n)
    inputs = StepInputs(
        param=(0.02 * torch.randn(m, n, generator=gen)).to(weight_dtype),
        grad=torch.randn(m, n, generator=gen).to(weight_dtype),
        proj=orthonormal_basis(m, n, rank, generator=gen).to(proj_dtype),
        exp_avg=(0.1 * torch.randn(shape, generator=gen)).to(state_dtype),
        exp_avg_sq=(0.1 * torch.rand(shape, generator=gen)).to(state_dtype),
    )
    return inputs.to(device=device)


def assert_fp32_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    """~1e-5 relative to the tensor's scale (elementwise relative error is meaningless near 0)."""
    actual, expected = actual.float().cpu(), expected.float().cpu()
    atol = rtol * expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def assert_lowp_close(actual: torch.Tensor, exact: torch.Tensor, plain: torch.Tensor,
                      before: torch.Tensor | None = None, factor: float = 2.0) -> None:
    """Low-precision rule: max error of ``actual`` against the fp32 ``exact`` result is at most
    ``factor``× that of ``plain`` (the same computation done by plain torch in that dtype).

    With ``before`` (the tensor before the update), also checks that the update is larger than
    the tolerance, so that leaving the tensor unchanged could not pass."""
    actual, exact, plain = actual.float().cpu(), exact.float().cpu(), plain.float().cpu()
    err = (actual - exact).abs().max().item()
    plain_err = (plain - exact).abs().max().item()
    assert plain_err > 0, "the plain low-precision baseline is exact: the comparison is vacuous"
    if before is not None:
        change = (exact - before.float().cpu()).abs().max().item()
        assert change > factor * plain_err, "update below the tolerance: the test cannot fail"
    assert err <= factor * plain_err, f"error {err:.3e} > {factor}× plain torch's {plain_err:.3e}"


def plain_torch_galore_step(inputs: StepInputs, **hyper) -> StepInputs:
    """GaLore's step as plain torch ops in the inputs' own dtypes (what galore-torch does with
    low-precision tensors): the baseline that low-precision kernels are judged against.
    ``inner="adagrad"`` (exp_avg None) and ``right`` as in the op."""
    out = inputs.clone()
    p, g, q, m_, v = out.args()
    q = q.to(g.dtype)
    m, n = p.shape
    right = reference._side(m, n, hyper.get("right"))
    r_ = (g @ q.T) if right else (q.T @ g)
    if hyper.get("inner", "adam") == "adagrad":
        v.addcmul_(r_.to(v.dtype), r_.to(v.dtype))
        norm = (r_.to(v.dtype) / (v.sqrt() + hyper["eps"])).to(p.dtype)
        step_size = hyper["lr"]
    else:
        m_.mul_(hyper["beta1"]).add_(r_.to(m_.dtype), alpha=1 - hyper["beta1"])
        v.mul_(hyper["beta2"]).addcmul_(r_.to(v.dtype), r_.to(v.dtype),
                                        value=1 - hyper["beta2"])
        norm = (m_ / (v.sqrt() + hyper["eps"])).to(p.dtype)
        step_size = reference.adam_step_size(hyper["lr"], hyper["beta1"], hyper["beta2"],
                                             hyper["step"])
    back = (norm @ q.to(p.dtype)) if right else (q.to(p.dtype) @ norm)
    p.add_(back * hyper["scale"], alpha=-step_size)
    p.add_(p, alpha=-hyper["lr"] * hyper["weight_decay"])
    return out


def exact_galore_step(inputs: StepInputs, **hyper) -> StepInputs:
    """The reference step on fp32 copies of the inputs, left in fp32 (no final rounding)."""
    out = inputs.to(dtype=torch.float32)
    reference.fused_galore_step(*out.args(), **hyper)
    return out


def assert_step_matches(actual: StepInputs, inputs: StepInputs, **hyper) -> None:
    """Checks a kernel's step result against the reference with the DESIGN.md §6 tolerances."""
    exact = exact_galore_step(inputs, **hyper)
    lowp = any(t is not None and t.dtype != torch.float32 for t in inputs.args())
    plain = plain_torch_galore_step(inputs, **hyper) if lowp else None
    for name in ("param", "exp_avg", "exp_avg_sq"):
        if getattr(inputs, name) is None:  # AdaGrad: no first moment
            assert getattr(actual, name) is None
            continue
        got, want = getattr(actual, name), getattr(exact, name)
        if getattr(inputs, name).dtype == torch.float32 and not lowp:
            assert_fp32_close(got, want)
        elif getattr(inputs, name).dtype == torch.float32:
            # fp32 storage fed by low-precision inputs: judged against fp32 of those same inputs
            assert_fp32_close(got, want, rtol=1e-4)
        else:
            assert_lowp_close(got, want, getattr(plain, name), before=getattr(inputs, name))


# --------------------------------------------------------------------------------------------
# optimizer tests (tests/test_optim_*.py): a small MLP whose weights cover both projection sides
# --------------------------------------------------------------------------------------------
MLP_SIZES = (24, 40, 32, 10)  # weights 40×24 (right), 32×40 and 10×32 (left)


def small_mlp(seed: int = 0, dtype=torch.float32) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    layers = []
    for d_in, d_out in itertools.pairwise(MLP_SIZES):
        layers += [torch.nn.Linear(d_in, d_out), torch.nn.GELU()]
    return torch.nn.Sequential(*layers[:-1]).to(dtype)


def mlp_param_groups(model: torch.nn.Module, **lowrank) -> list[dict]:
    """galore-torch's usual grouping: Linear weights projected (with ``lowrank`` keys), the rest
    (biases) in a plain group. Names travel with the projected group for messages."""
    named = [(n, p) for n, p in model.named_parameters() if n.endswith("weight") and p.dim() == 2]
    projected = {id(p) for _, p in named}
    rest = [p for p in model.parameters() if id(p) not in projected]
    return [{"params": rest},
            {"params": [p for _, p in named], "names": [n for n, _ in named], **lowrank}]


def mlp_batches(count: int, batch: int = 16, seed: int = 1, dtype=torch.float32) -> list:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, MLP_SIZES[0], generator=gen).to(dtype),
             torch.randint(0, MLP_SIZES[-1], (batch,), generator=gen)) for _ in range(count)]


def mlp_loss(model: torch.nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x).float(), y)


def mlp_loss_curve(make_optimizer) -> torch.Tensor:
    """The losses of 40 steps of the small MLP on 4 repeated batches with
    ``make_optimizer(model)``."""
    model = small_mlp()
    optimizer = make_optimizer(model)
    losses = []
    for batch in mlp_batches(4) * 10:
        optimizer.zero_grad()
        loss = mlp_loss(model, batch)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return torch.tensor(losses)


def assert_curves_follow(baseline: torch.Tensor, other: torch.Tensor) -> None:
    """Both loss curves learn, ``other`` follows ``baseline`` (mean relative gap below 3 %) and
    differs from it (the variant is not the baseline in disguise)."""
    for curve in (baseline, other):
        assert curve[-10:].mean() < 0.8 * curve[:5].mean()
    assert ((other - baseline).abs() / baseline).mean() < 0.03
    assert not torch.equal(other, baseline)


def assert_8bit_moments_train_like_fp32_moments(make_optimizer) -> None:
    """:func:`mlp_loss_curve` with ``make_optimizer(model, state_dtype)`` (the caller's rank 8,
    refresh every 10): the curve of 8-bit moments follows that of fp32 moments."""
    assert_curves_follow(*(mlp_loss_curve(lambda model, s=state_dtype: make_optimizer(model, s))
                           for state_dtype in (torch.float32, "8bit")))


def assert_int8_qgalore_trains(**options) -> tuple[list[torch.Tensor], object]:
    """The small MLP with INT8 weight codes (layers 0 and 2, groups of 16) and a QGaLoreAdamW of
    rank 4 (``options``: group keys of the codes' group, or constructor arguments, as named by
    QGALORE_CONSTRUCTOR_KEYS) learns one batch in 25 steps; returns (codes, optimizer)."""
    from lowrank_kernels.autograd import replace_linear_with_int8
    from lowrank_kernels.optim import QGaLoreAdamW

    model = small_mlp()
    replace_linear_with_int8(model, lambda name: name in ("0", "2"), group_size=16)
    codes = [p for p in model.parameters() if p.dtype == torch.uint8]
    rest = [p for p in model.parameters() if p.dtype != torch.uint8]
    constructor = {k: options.pop(k) for k in QGALORE_CONSTRUCTOR_KEYS if k in options}
    optimizer = QGaLoreAdamW([{"params": rest}, {"params": codes, "rank": 4,
                                                 "proj_group_size": 16, **options}],
                             lr=1e-2, **constructor)
    batches = mlp_batches(1) * 25
    first = mlp_loss(model, batches[0]).item()
    for batch in batches:
        optimizer.zero_grad()
        mlp_loss(model, batch).backward()
        optimizer.step()
    assert mlp_loss(model, batches[0]).item() < 0.7 * first
    return codes, optimizer


QGALORE_CONSTRUCTOR_KEYS = ("state_dtype", "dense_adamw")


def train_steps(model: torch.nn.Module, optimizer, batches) -> None:
    for batch in batches:
        optimizer.zero_grad()
        mlp_loss(model, batch).backward()
        optimizer.step()


def save_load(obj):
    """``obj`` through torch.save and ``torch.load(weights_only=True)``."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def assert_resumes_bit_for_bit(make, batches: list, dtype=torch.float32):
    """Trains the small MLP on ``batches`` with ``make(model)`` straight through, and again with a
    weights_only checkpoint (model + optimizer) halfway, resumed into a differently initialised
    model: weights and every state tensor (dtype included) must be equal. Returns the straight
    (model, optimizer)."""
    straight_model = small_mlp(dtype=dtype)
    straight = make(straight_model)
    train_steps(straight_model, straight, batches)

    half = len(batches) // 2
    first_model = small_mlp(dtype=dtype)
    first = make(first_model)
    train_steps(first_model, first, batches[:half])
    checkpoint = save_load({"model": first_model.state_dict(), "optim": first.state_dict()})
    resumed_model = small_mlp(seed=123, dtype=dtype)  # everything must come from the file
    resumed_model.load_state_dict(checkpoint["model"])
    resumed = make(resumed_model)
    resumed.load_state_dict(checkpoint["optim"])
    train_steps(resumed_model, resumed, batches[half:])

    for a, b in zip(resumed_model.parameters(), straight_model.parameters()):
        assert torch.equal(a, b)
    for p, q in zip(resumed_model.parameters(), straight_model.parameters()):
        for key, value in straight.state[q].items():
            got = resumed.state[p][key]
            assert got.dtype == value.dtype, key
            assert torch.equal(got, value) or (got.isnan().all() and value.isnan().all()), key
    assert (straight_model[0].weight.float() - small_mlp()[0].weight).abs().max() > 1e-3
    return straight_model, straight


# --------------------------------------------------------------------------------------------
# Q-GaLore formats (DESIGN.md §4.3-§4.4): packed INT4 basis and INT8 weight codes
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class QGaLoreInputs:
    """A fused step's tensors in the Q-GaLore formats; proj_* / param_* are None when dense."""
    param: torch.Tensor
    grad: torch.Tensor
    proj: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    proj_scales: torch.Tensor | None = None
    proj_zeros: torch.Tensor | None = None
    param_scales: torch.Tensor | None = None
    param_zeros: torch.Tensor | None = None

    def clone(self) -> QGaLoreInputs:
        return QGaLoreInputs(*(None if t is None else t.clone() for t in self.tensors()))

    def tensors(self) -> tuple[torch.Tensor | None, ...]:
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    def args(self) -> tuple[torch.Tensor, ...]:
        return (self.param, self.grad, self.proj, self.exp_avg, self.exp_avg_sq)

    def formats(self, proj_group_size: int, param_group_size: int, seed: int) -> dict:
        return {"proj_scales": self.proj_scales, "proj_zeros": self.proj_zeros,
                "proj_group_size": proj_group_size, "param_scales": self.param_scales,
                "param_zeros": self.param_zeros, "param_group_size": param_group_size,
                "seed": seed}


def qgalore_inputs(m: int, n: int, rank: int, *, int4_proj: bool, int8_weight: bool,
                   proj_group_size: int = 256, param_group_size: int = 256,
                   grad_dtype=torch.float32, state_dtype=torch.float32, seed: int = 0
                   ) -> QGaLoreInputs:
    """step_inputs with the basis packed to INT4 and/or the weight quantized to INT8 (nearest),
    by the reference quantizers."""
    dense = step_inputs(m, n, rank, state_dtype=state_dtype, seed=seed)
    out = QGaLoreInputs(dense.param, dense.grad.to(grad_dtype), dense.proj, dense.exp_avg,
                        dense.exp_avg_sq)
    if int4_proj:
        out.proj, out.proj_scales, out.proj_zeros = reference.quantize_int4(dense.proj,
                                                                            proj_group_size)
    if int8_weight:
        out.param, out.param_scales, out.param_zeros = reference.quantize_int8(dense.param,
                                                                               param_group_size)
    return out


# --------------------------------------------------------------------------------------------
# the keyword-only modes (DESIGN.md §4.9-§4.10) and the side override: one step's arguments in
# any combination of basis, weight format, moment format, inner rule and side
# --------------------------------------------------------------------------------------------
# Dyadic betas: with the exact inputs below every moment update is exact in fp32 in any
# evaluation order (with or without FMA contraction), so every backend's fp32 moments agree and
# so do their rounded (bf16, 8-bit) codes (tests/test_bf16_moments.py has the bf16 case).
EXACT_HYPER = dict(lr=1e-3, beta1=0.5, beta2=0.75, eps=1e-6, weight_decay=0.0, scale=0.25,
                   step=3)
STATE_NAMES = ("exp_avg", "exp_avg_sq", "exp_avg_scales", "exp_avg_sq_scales")


def _dyadic_rows(rank: int, d: int, gen: torch.Generator) -> torch.Tensor:
    """r×d rows with one nonzero ±k/8 (k in 1..7) per column: R = G·basis is exact in any
    summation order for an integer G, and back(N) has one term per entry."""
    values = torch.randint(1, 8, (d,), generator=gen) * (1 - 2 * torch.randint(0, 2, (d,),
                                                                               generator=gen))
    rows = torch.zeros(rank, d)
    rows[torch.arange(d) % rank, torch.arange(d)] = values.float() / 8
    return rows


def _exact_8bit_moment(shape, block: int, right: bool, signed: bool, gen: torch.Generator):
    """(codes, scales) of random 8-bit codes whose block scales are 2^-4 or 2^-3, so that the
    decoded moments have a few significant bits within 24 of R's (|R| ≤ 8, multiples of 1/8):
    M' = M/2 + R/2 and V' = 3V/4 + R²/4 (V + R² for AdaGrad) are exact. √V's codes are 0 or in
    the exponent fields 8-12 (√V in [2^-3, 8)): a smaller V would need more bits."""
    if signed:
        codes = torch.randint(-127, 128, shape, generator=gen).to(torch.int8)
    else:
        codes = torch.randint(128, 208, shape, generator=gen)
        codes = torch.where(torch.rand(shape, generator=gen) < 0.1, 0, codes).to(torch.uint8)
    own = shape[0] if right else shape[1]
    rank = shape[1] if right else shape[0]
    exponents = torch.randint(-4, -2, (own, -(-rank // block)), generator=gen)
    return codes, 2.0 ** exponents.float()


def mode_args(m: int, n: int, rank: int, *, basis: str = "dense", weight: str = "fp32",
              moments: str = "fp32", inner: str = "adam", right: bool | None = None,
              block: int = 32, exact: bool = False, zero_grad: bool = False, seed: int = 0,
              int8_group: int = 64) -> dict:
    """Every argument of one fused_galore_step call (``kwargs`` of ops.fused_galore_step without
    the scalars), on CPU. basis: 'dense' | 'int4' | 'dct'; weight: 'fp32' | 'bf16' | 'int8';
    moments: 'fp32' | 'bf16' | '8bit'; inner: 'adam' | 'adagrad' (exp_avg None); ``right``: the
    side override. ``exact``: integer G and a dyadic basis (INT4 codes of it with scales 1/8 and
    zeros 8), few-bit moments (8-bit: power-of-two scales): with EXACT_HYPER every backend's fp32
    moments agree. DCT values are never dyadic: ``zero_grad`` (R = 0 for any basis) keeps the
    moments exact there."""
    gen = torch.Generator().manual_seed(seed)
    side = reference._side(m, n, right)
    d = n if side else m
    shape = (m, rank) if side else (rank, n)
    if exact:
        rows = _dyadic_rows(rank, d, gen)
        grad = torch.randint(-4, 5, (m, n), generator=gen).float()
    else:
        q, _ = torch.linalg.qr(torch.randn(d, rank, generator=gen, dtype=torch.float64))
        rows = q.T.float()
        grad = torch.randn(m, n, generator=gen)
    if zero_grad:
        grad.zero_()
    dense = rows if side else rows.T.contiguous()
    args = {"param": 0.02 * torch.randn(m, n, generator=gen), "grad": grad, "proj": dense,
            "inner": inner, "right": right, "state_block_size": block}
    if basis == "int4":
        if exact:
            codes = (dense * 8 + 8).round().to(torch.uint8).reshape(-1)
            groups = reference.num_groups(codes.numel(), 256)
            args.update(proj=reference.pack_int4(codes), proj_scales=torch.full((groups,), 0.125),
                        proj_zeros=torch.full((groups,), 8.0))
        else:
            packed, scales, zeros = reference.quantize_int4(dense, 256)
            args.update(proj=packed, proj_scales=scales, proj_zeros=zeros)
        args["proj_group_size"] = 256
    elif basis == "dct":
        freqs = torch.linspace(0, d - 1, rank).round().to(torch.int32).unique()
        extra = torch.tensor([f for f in range(d) if f not in set(freqs.tolist())][:rank],
                             dtype=torch.int32)
        args["proj"] = torch.cat([freqs, extra])[:rank].sort().values
    if weight == "int8":
        codes, scales, zeros = reference.quantize_int8(args["param"], int8_group)
        args.update(param=codes, param_scales=scales, param_zeros=zeros,
                    param_group_size=int8_group)
    elif weight == "bf16":
        args["param"] = args["param"].bfloat16()
        args["grad"] = args["grad"].bfloat16()
    if moments == "8bit":
        if exact:
            m_codes, m_scales = _exact_8bit_moment(shape, block, side, True, gen)
            v_codes, v_scales = _exact_8bit_moment(shape, block, side, False, gen)
        else:
            index = torch.arange(rank * (m if side else n)).view(shape) + reference.MOMENT_STREAM
            words_m, words_v = reference.philox_uint32x2(seed, index)
            m_codes, m_scales = reference.quantize_moment(
                0.1 * torch.randn(shape, generator=gen), words_m, block, side, signed=True)
            v_codes, v_scales = reference.quantize_moment(
                0.1 * torch.rand(shape, generator=gen), words_v, block, side, signed=False)
        args.update(exp_avg=m_codes, exp_avg_sq=v_codes, exp_avg_scales=m_scales,
                    exp_avg_sq_scales=v_scales)
    else:
        dtype = torch.bfloat16 if moments == "bf16" else torch.float32
        quantum = 1 / 64 if exact else None  # a few bits: exact dyadic updates
        m0 = 0.1 * torch.randn(shape, generator=gen)
        v0 = 0.1 * torch.rand(shape, generator=gen)
        if quantum:
            m0, v0 = (m0 / quantum).round() * quantum, (v0 / quantum).round() * quantum
        args.update(exp_avg=m0.to(dtype), exp_avg_sq=v0.to(dtype))
    if inner == "adagrad":
        args["exp_avg"] = None
        args.pop("exp_avg_scales", None)
    return args


def run_mode_step(args: dict, backend: str, device: str = "cpu", seed: int = 21,
                  **hyper) -> dict:
    """One ops.fused_galore_step on copies of ``args`` (moved to ``device``); returns the
    tensors after the step, on CPU."""
    moved = {k: v.clone().to(device) if torch.is_tensor(v) else v for k, v in args.items()}
    lk.ops.fused_galore_step(**moved, **{**EXACT_HYPER, **hyper}, seed=seed, backend=backend)
    return {k: v.cpu() if torch.is_tensor(v) else v for k, v in moved.items()}


def decoded_8bit_moments(result: dict, right: bool, block: int
                         ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(M, V) in fp32 from a step's 8-bit codes and scales (M None under AdaGrad)."""
    m32 = None
    if result.get("exp_avg") is not None:
        m32 = reference.dequantize_moment(result["exp_avg"], result["exp_avg_scales"], block,
                                          right, signed=True)
    v32 = reference.dequantize_moment(result["exp_avg_sq"], result["exp_avg_sq_scales"], block,
                                      right, signed=False)
    return m32, v32


def assert_8bit_moments_within_a_grid_step(actual: dict, expected: dict, right: bool,
                                           block: int) -> None:
    """General inputs: GEMM rounding differs between backends, so a code may differ where u
    falls within it. The decoded moments stay within one grid step of the expected ones (E4M3:
    2^-3 of the block's max for M, E4M4: 2^-4 for √V), almost every code is equal, and the
    block scales agree to fp32 rounding."""
    rank = expected["exp_avg_sq"].shape[1 if right else 0]
    (m_exp, v_exp) = decoded_8bit_moments(expected, right, block)
    (m_act, v_act) = decoded_8bit_moments(actual, right, block)

    def grid(name, max_value, mantissa_bits):
        g = expected[name].repeat_interleave(block, 1)[:, :rank] * max_value * 2.0**-mantissa_bits
        return g if right else g.T

    v_grid = grid("exp_avg_sq_scales", reference.EXP_AVG_SQ_FORMAT.max_value, 4)
    assert ((v_act.sqrt() - v_exp.sqrt()).abs() <= v_grid * 1.01 + 1e-30).all()
    if m_exp is not None:
        m_grid = grid("exp_avg_scales", reference.EXP_AVG_FORMAT.max_value, 3)
        assert ((m_act - m_exp).abs() <= m_grid * 1.01).all()
        assert (actual["exp_avg"] == expected["exp_avg"]).float().mean() > 0.95
    assert (actual["exp_avg_sq"] == expected["exp_avg_sq"]).float().mean() > 0.95
    torch.testing.assert_close(actual["exp_avg_sq_scales"], expected["exp_avg_sq_scales"],
                               rtol=1e-5, atol=0)


def assert_states_equal(actual: dict, expected: dict) -> None:
    """Moments (and 8-bit scales) bit for bit."""
    for name in STATE_NAMES:
        if expected.get(name) is None:
            assert actual.get(name) is None, name
            continue
        assert torch.equal(actual[name], expected[name]), name
