"""Registration, fake kernels, torch.compile, autograd and input validation of the ops."""

import pytest
import torch
from cases import HYPER, StepInputs, assert_fp32_close, orthonormal_basis, step_inputs

import lowrank_kernels as lk

pytestmark = pytest.mark.skipif(not lk.EXTENSION_AVAILABLE, reason="extension not built")
OPS = torch.ops.lowrank if lk.EXTENSION_AVAILABLE else None


def _opcheck(op, args, kwargs=None):
    # opcheck checks registration (schema, fake kernel, aliasing), not maths: the maths is
    # checked against reference.py in the per-op test modules.
    torch.library.opcheck(op, args, kwargs or {})


@pytest.mark.parametrize("m,n", [(40, 23), (23, 40)], ids=["right", "left"])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_fused_galore_step(m, n, weight_dtype):
    inputs = step_inputs(m, n, 5, weight_dtype=weight_dtype)
    _opcheck(OPS.fused_galore_step.default, inputs.args(), HYPER)


@pytest.mark.parametrize("m,n", [(40, 23), (23, 40)], ids=["right", "left"])
def test_opcheck_projection_ops(m, n):
    inputs = step_inputs(m, n, 5)
    _opcheck(OPS.project.default, (inputs.grad, inputs.proj))
    _opcheck(OPS.project_back.default, (inputs.exp_avg, inputs.proj, m, n, 0.5))


def test_torch_compile_fullgraph_traces_the_step():
    inputs = step_inputs(48, 30, 6)
    eager, compiled_in = inputs.clone(), inputs.clone()

    def step(p, g, q, m_, v, t):
        # a typical optimizer body: a projection and the fused step in one graph
        OPS.fused_galore_step(p, g, q, m_, v, **{**HYPER, "step": t})
        return OPS.project(g, q).norm()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    want = step(*eager.args(), 3)
    got = compiled(*compiled_in.args(), 3)
    torch.testing.assert_close(got, want)
    for a, b in zip(compiled_in.args(), eager.args()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("m,n", [(12, 7), (7, 12)], ids=["right", "left"])
def test_projection_gradients(m, n):
    gen = torch.Generator().manual_seed(0)
    grad = torch.randn(m, n, generator=gen, dtype=torch.float64)
    # the ops compute in fp32; gradcheck in fp64 would be too strict, so compare the autograd
    # formulas with autograd through the reference instead
    basis = orthonormal_basis(m, n, 3, generator=gen)
    for fn_ours, fn_ref, args in [
        (OPS.project, lk.reference.project, (grad.float(), basis)),
        (lambda lr_, q: OPS.project_back(lr_, q, m, n, 0.5),
         lambda lr_, q: lk.reference.project_back(lr_, q, m, n, 0.5),
         (OPS.project(grad.float(), basis), basis)),
    ]:
        ours = [a.clone().requires_grad_() for a in args]
        ref = [a.clone().requires_grad_() for a in args]
        out_ours, out_ref = fn_ours(*ours), fn_ref(*ref)
        weights = torch.randn(out_ref.shape, generator=gen)
        (out_ours * weights).sum().backward()
        (out_ref * weights).sum().backward()
        for a, b in zip(ours, ref):
            assert_fp32_close(a.grad, b.grad)


@pytest.mark.parametrize("m,n", [(300, 101), (101, 300)], ids=["right", "left"])
def test_project_ops_match_reference(m, n):
    inputs = step_inputs(m, n, 17, weight_dtype=torch.bfloat16, proj_dtype=torch.bfloat16)
    assert_fp32_close(OPS.project(inputs.grad, inputs.proj),
                      lk.reference.project(inputs.grad, inputs.proj))
    assert_fp32_close(OPS.project_back(inputs.exp_avg, inputs.proj, m, n, 0.25),
                      lk.reference.project_back(inputs.exp_avg, inputs.proj, m, n, 0.25))


# ---------------------------------------------------------------------------------------------
# bad input: a clear error naming the argument, and nothing written
# ---------------------------------------------------------------------------------------------
def _bad_cases():
    """(id, mutate(inputs) -> (inputs, hyper), expected message fragment)."""
    def replace(**fields):
        def mutate(x: StepInputs):
            return StepInputs(**{**x.__dict__, **{k: f(x) for k, f in fields.items()}}), HYPER
        return mutate

    def hyper(**kw):
        return lambda x: (x, {**HYPER, **kw})

    return [
        ("grad-dtype", replace(grad=lambda x: x.grad.double()), "grad: expected dtype"),
        ("grad-shape", replace(grad=lambda x: x.grad[:, :-1].contiguous()), "grad: expected the shape"),
        ("param-1d", replace(param=lambda x: x.param.flatten()), "param: expected a 2-D"),
        ("param-noncontig", replace(param=lambda x: x.param.T.contiguous().T),
         "param: expected a contiguous"),
        ("proj-shape", replace(proj=lambda x: x.proj[:, :-1].contiguous()), "proj: expected shape"),
        ("rank-too-big", replace(proj=lambda x: torch.randn(41, 40), exp_avg=lambda x: torch.zeros(60, 41),
                                 exp_avg_sq=lambda x: torch.zeros(60, 41)), "proj: rank r=41"),
        ("state-shape", replace(exp_avg=lambda x: x.exp_avg[:-1].contiguous()), "exp_avg: expected shape"),
        ("state-dtype", replace(exp_avg_sq=lambda x: x.exp_avg_sq.half()), "exp_avg_sq: expected dtype"),
        ("state-alias", lambda x: (StepInputs(x.param, x.grad, x.proj, x.exp_avg, x.exp_avg), HYPER),
         "exp_avg_sq: must not alias"),
        ("step-zero", hyper(step=0), "step: expected"),
        ("beta1", hyper(beta1=1.0), "beta1: expected"),
        ("beta2", hyper(beta2=-0.1), "beta2: expected"),
        ("eps", hyper(eps=-1.0), "eps: expected"),
        ("scales-without-int4", hyper(proj_scales=torch.ones(3)), "proj_scales/proj_zeros"),
        ("meta-device-grad", replace(grad=lambda x: x.grad.to("meta")), "grad: expected device"),
    ]


BAD = _bad_cases()


@pytest.mark.parametrize("backend", ["cpu", "reference", "torch.ops"])
@pytest.mark.parametrize("case,mutate,message", BAD, ids=[c[0] for c in BAD])
def test_bad_input_raises_and_writes_nothing(case, mutate, message, backend):
    inputs, hyper = mutate(step_inputs(60, 40, 8))
    before = [t.clone() if t.device.type != "meta" else None for t in inputs.args()]
    with pytest.raises((ValueError, RuntimeError), match=message.replace("(", r"\(")):
        if backend == "torch.ops":
            OPS.fused_galore_step(*inputs.args(), **hyper)
        else:
            lk.ops.fused_galore_step(*inputs.args(), **hyper, backend=backend)
    for t, b in zip(inputs.args(), before):
        if b is not None:
            assert torch.equal(t, b), "a tensor was written before validation failed"


def test_fake_kernel_validates_like_the_kernel():
    inputs = step_inputs(60, 40, 8).to(device="meta")
    bad = StepInputs(inputs.param, inputs.grad, inputs.proj, inputs.exp_avg[:-1], inputs.exp_avg_sq)
    with pytest.raises((ValueError, RuntimeError), match="exp_avg: expected shape"):
        OPS.fused_galore_step(*bad.args(), **HYPER)


def test_backend_switch_errors_are_clear(monkeypatch):
    inputs = step_inputs(20, 10, 2)
    with pytest.raises(ValueError, match="backend: expected one of"):
        lk.ops.fused_galore_step(*inputs.args(), **HYPER, backend="nope")
    with pytest.raises(ValueError, match="cannot run on cpu"):
        lk.ops.fused_galore_step(*inputs.args(), **HYPER, backend="cuda")
    monkeypatch.setenv("LOWRANK_BACKEND", "reference")
    assert lk.ops.resolve_backend("fused_galore_step", inputs.param.device) == "reference"
    monkeypatch.setenv("LOWRANK_BACKEND", "cpu")
    assert lk.ops.resolve_backend("fused_galore_step", inputs.param.device) == "cpu"
    monkeypatch.delenv("LOWRANK_BACKEND")
    assert lk.ops.resolve_backend("fused_galore_step", inputs.param.device) == "cpu"
