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
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor

    def clone(self) -> StepInputs:
        return StepInputs(*(t.clone() for t in self.args()))

    def to(self, **kwargs) -> StepInputs:
        """A copy (never an alias, even when nothing changes) moved/converted by Tensor.to."""
        return StepInputs(*(t.to(**kwargs, copy=True) for t in self.args()))

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
    low-precision tensors): the baseline that low-precision kernels are judged against."""
    out = inputs.clone()
    p, g, q, m_, v = out.args()
    q = q.to(g.dtype)
    m, n = p.shape
    r_ = (g @ q.T) if reference.is_right_side(m, n) else (q.T @ g)
    m_.mul_(hyper["beta1"]).add_(r_.to(m_.dtype), alpha=1 - hyper["beta1"])
    v.mul_(hyper["beta2"]).addcmul_(r_.to(v.dtype), r_.to(v.dtype), value=1 - hyper["beta2"])
    norm = (m_ / (v.sqrt() + hyper["eps"])).to(p.dtype)
    back = (norm @ q.to(p.dtype)) if reference.is_right_side(m, n) else (q.to(p.dtype) @ norm)
    step_size = reference.adam_step_size(hyper["lr"], hyper["beta1"], hyper["beta2"],
                                         hyper["step"])
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
    lowp = any(t.dtype != torch.float32 for t in inputs.args())
    plain = plain_torch_galore_step(inputs, **hyper) if lowp else None
    for name in ("param", "exp_avg", "exp_avg_sq"):
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
