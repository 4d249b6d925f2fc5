"""Registration, dispatch, fake kernels, torch.compile, autograd and input validation of the
ops."""

import importlib.util
import os

import pytest
import torch
from cases import (
    HYPER,
    StepInputs,
    assert_fp32_close,
    mode_args,
    orthonormal_basis,
    step_inputs,
)
from torch._dynamo.testing import CompileCounter
from torch.utils._python_dispatch import TorchDispatchMode

import lowrank_kernels as lk
from lowrank_kernels import _dispatch, reference

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


@pytest.mark.parametrize("mode", [
    {"inner": "adagrad"}, {"moments": "8bit"}, {"moments": "8bit", "inner": "adagrad", "block": 8},
    {"right": True}, {"right": False, "basis": "int4"}], ids=str)
def test_opcheck_fused_galore_step_modes(mode):
    """The schema's keyword-only modes: exp_avg None (Tensor(b!)?), the written 8-bit scales
    (Tensor(f!)?, Tensor(g!)?), str inner, bool? right."""
    args = mode_args(40, 23, 5, **mode)
    positional = tuple(args.pop(k) for k in ("param", "grad", "proj", "exp_avg", "exp_avg_sq"))
    _opcheck(OPS.fused_galore_step.default, positional, {**args, **HYPER, "seed": 3})


@pytest.mark.parametrize("m,n,moments", [(40, 23, "fp32"), (23, 40, "8bit")],
                         ids=["right-fp32", "left-8bit"])
def test_opcheck_fused_galore_step_factored_v(m, n, moments):
    """A factored V (DESIGN.md §4.12): exp_avg_sq is a 1-D fp32 tensor of r + own factors,
    written in place like the 2-D V."""
    args = mode_args(m, n, 5, moments=moments)
    args.pop("exp_avg_sq_scales", None)
    args["exp_avg_sq"] = torch.rand(reference.factored_shape(m, n, 5)) + 0.01
    positional = tuple(args.pop(k) for k in ("param", "grad", "proj", "exp_avg", "exp_avg_sq"))
    _opcheck(OPS.fused_galore_step.default, positional, {**args, **HYPER, "seed": 3})


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


def test_backend_switch_errors_are_clear():
    inputs = step_inputs(20, 10, 2)
    with pytest.raises(ValueError, match="backend: expected one of"):
        lk.ops.fused_galore_step(*inputs.args(), **HYPER, backend="nope")
    with pytest.raises(ValueError, match="cannot run on cpu"):
        lk.ops.fused_galore_step(*inputs.args(), **HYPER, backend="cuda")
    with pytest.raises(NotImplementedError, match="no Triton kernel of project"):
        lk.ops.project(inputs.grad, inputs.proj, backend="triton")
    with pytest.raises(ValueError, match="expected one of"):
        lk.set_cuda_backend("cuda")
    if not _dispatch.CUDA_CXX_AVAILABLE:
        with pytest.raises(RuntimeError, match="'cuda_cxx' needs the extension built with"):
            lk.set_cuda_backend("cuda_cxx")
    assert lk.cuda_backend() == ("triton" if _dispatch.TRITON_AVAILABLE else "cuda_cxx")


# ---------------------------------------------------------------------------------------------
# one dispatch: torch.ops.lowrank.<op> is the entry of ops.<op>, Triton sits on its CUDA key
# ---------------------------------------------------------------------------------------------
needs_triton = pytest.mark.skipif(not _dispatch.TRITON_AVAILABLE, reason="triton not installed")
CUDA_KEY = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)


@needs_triton
@pytest.mark.parametrize("op", _dispatch.TRITON_OPS)
def test_triton_kernels_are_registered_on_the_cuda_key(op):
    """Registered at import whenever triton is importable (no GPU needed): the CUDA kernel of
    lowrank::<op> is the Python kernel of lowrank_kernels/_dispatch.py; the C++ CUDA kernel, if
    built, stays behind it (inactive) and under lowrank_cuda::<op> (ops without a CUDA C++
    kernel, _dispatch.TRITON_ONLY_OPS, have none there)."""
    dump = torch._C._dispatch_dump(f"lowrank::{op}")
    cuda_lines = [line for line in dump.splitlines() if line.startswith("CUDA")]
    assert cuda_lines[0].startswith("CUDA: registered at")
    assert os.path.join("lowrank_kernels", "_dispatch.py") in cuda_lines[0], dump
    assert all("inactive" in line for line in cuda_lines[1:]), dump
    if _dispatch.CUDA_CXX_AVAILABLE and op not in _dispatch.TRITON_ONLY_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lowrank_cuda::{op}", "CUDA")


@needs_triton
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU tensors need the "
                    "Triton interpreter (no GPU)")
@pytest.mark.parametrize("m,n", [(40, 23), (23, 40)], ids=["right", "left"])
def test_the_cuda_key_runs_the_triton_kernel_and_the_switch_reroutes_it(m, n):
    """The dispatcher's CUDA kernel of lowrank::fused_galore_step, called on CPU tensors (Triton
    runs them in its interpreter): the Triton launcher's numbers, bit for bit, and the
    reference's. set_cuda_backend("cuda_cxx") sends the same call to lowrank_cuda::<op> (which
    then finds no CPU kernel for the CPU tensors: the error names it), or, without a CUDA
    build, refuses to switch."""
    inputs = step_inputs(m, n, 5, weight_dtype=torch.bfloat16, proj_dtype=torch.bfloat16)
    via_key, via_triton = inputs.clone(), inputs.clone()
    OPS.fused_galore_step.default.redispatch(CUDA_KEY, *via_key.args(), **HYPER)
    lk.ops.fused_galore_step(*via_triton.args(), **HYPER, backend="triton")
    for a, b in zip(via_key.args(), via_triton.args()):
        assert torch.equal(a, b)
    assert not torch.equal(via_key.param, inputs.param)
    if not _dispatch.CUDA_CXX_AVAILABLE:
        return
    try:
        lk.set_cuda_backend("cuda_cxx")
        out = inputs.clone()
        with pytest.raises(NotImplementedError, match="lowrank_cuda::fused_galore_step"):
            OPS.fused_galore_step.default.redispatch(CUDA_KEY, *out.args(), **HYPER)
    finally:
        lk.set_cuda_backend("triton")


def test_modes_the_cuda_cxx_kernel_lacks_route_to_triton(monkeypatch):
    """Under set_cuda_backend("cuda_cxx") the registered CUDA kernel runs the CUDA C++ kernel,
    except for a call that sets a mode only Triton serves (CUDA_CXX_DEFAULT_ONLY): AdaGrad,
    8-bit moments, an explicit side. The decision alone (no GPU here), with a stand-in for
    lowrank_cuda::<op>."""
    cuda_cxx = object()
    monkeypatch.setattr(_dispatch, "_cuda_backend", "cuda_cxx")
    monkeypatch.setitem(_dispatch._CUDA_TARGETS, "fused_galore_step", cuda_cxx)
    monkeypatch.setattr(_dispatch, "TRITON_AVAILABLE", True)
    scales = torch.ones(3, 1)
    defaults = {"inner": "adam", "exp_avg_scales": None, "exp_avg_sq_scales": None,
                "state_block_size": 32, "right": None, "seed": 4, "lr": 0.1}
    assert _dispatch.cuda_target("fused_galore_step", {}) is cuda_cxx
    assert _dispatch.cuda_target("fused_galore_step", defaults) is cuda_cxx
    assert _dispatch.cuda_target("dct_select", {"method": "fft"}) is not None
    for mode in ({"inner": "adagrad"}, {"exp_avg_scales": scales},
                 {"exp_avg_sq_scales": scales}, {"right": True}, {"right": False}):
        target = _dispatch.cuda_target("fused_galore_step", {**defaults, **mode})
        assert target is not cuda_cxx, mode
        if _dispatch.TRITON_AVAILABLE and importlib.util.find_spec("triton") is not None:
            assert target is _dispatch.triton_kernel("fused_galore_step"), mode
    monkeypatch.setattr(_dispatch, "_cuda_backend", "triton")
    assert _dispatch.cuda_target("fused_galore_step", {"inner": "adagrad"}) is cuda_cxx


@needs_triton
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU tensors need the "
                    "Triton interpreter (no GPU)")
def test_the_cuda_key_runs_a_new_mode_in_triton_under_the_cuda_cxx_switch(monkeypatch):
    """Through the dispatcher's CUDA key with the switch on the CUDA C++ kernels (a stand-in
    that fails if called): an AdaGrad call runs the Triton kernel, the reference's numbers."""
    def cuda_cxx(*args, **kwargs):
        raise AssertionError("the CUDA C++ kernel was called for a mode it lacks")

    monkeypatch.setattr(_dispatch, "_cuda_backend", "cuda_cxx")
    monkeypatch.setitem(_dispatch._CUDA_TARGETS, "fused_galore_step", cuda_cxx)
    args = mode_args(40, 23, 5, inner="adagrad")
    positional = [args.pop(k) for k in ("param", "grad", "proj", "exp_avg", "exp_avg_sq")]
    expected = [t.clone() if t is not None else None for t in positional]
    OPS.fused_galore_step.default.redispatch(CUDA_KEY, *positional, **args, **HYPER)
    lk.ops.fused_galore_step(*expected, **args, **HYPER, backend="reference")
    assert_fp32_close(positional[0], expected[0])
    assert_fp32_close(positional[4], expected[4])


def test_new_lr_and_step_values_are_graph_inputs_not_recompilations():
    """lr and weight_decay are Scalar and step SymInt in the schema: a compiled function calling
    the op over 5 (lr, step) values compiles once with dynamic=True (by default once more, when
    Dynamo's automatic dynamic first sees a value change), and gives the eager bits. A float-lr
    op (the schema before) recompiles for every value: the contrast shows the count is real."""
    def step(p, g, q, m_, v, lr, t):
        OPS.fused_galore_step(p, g, q, m_, v, lr=lr, beta1=0.9, beta2=0.999, eps=1e-6,
                              weight_decay=0.1, scale=0.25, step=t)

    schedule = list(zip((0.1, 0.05, 0.02, 0.01, 0.3), range(1, 6)))
    for backend, dynamic, most in (("eager", True, 1), ("eager", None, 2),
                                   ("aot_eager", True, None)):
        torch._dynamo.reset()
        counter = CompileCounter()
        compiled = torch.compile(step, fullgraph=True, dynamic=dynamic,
                                 backend=counter if backend == "eager" else backend)
        ours, eager = step_inputs(48, 30, 6), step_inputs(48, 30, 6)
        for lr, t in schedule:
            compiled(*ours.args(), lr, t)
            step(*eager.args(), lr, t)
        for a, b in zip(ours.args(), eager.args()):
            assert torch.equal(a, b)
        if most is not None:
            assert counter.frame_count <= most, (backend, dynamic, counter.frame_count)

    @torch.library.custom_op("lowrank_test::float_lr_step", mutates_args=("x",))
    def float_lr_step(x: torch.Tensor, lr: float) -> None:
        x.sub_(lr)

    @float_lr_step.register_fake
    def _(x, lr):
        return None

    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(lambda x, lr: float_lr_step(x, lr), fullgraph=True, dynamic=True,
                             backend=counter)
    for lr, _ in schedule:
        compiled(torch.zeros(3), lr)
    assert counter.frame_count == len(schedule)


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("op,args", [
    ("fused_galore_step", lambda i: (i.args(), HYPER)),
    ("project", lambda i: ((i.grad, i.proj), {})),
    ("quantize_int4", lambda i: ((i.proj,), {})),
    ("dct_select", lambda i: ((i.grad, 3), {})),
], ids=lambda x: x if isinstance(x, str) else "")
def test_ops_wrappers_call_the_dispatcher_op(op, args):
    """lowrank_kernels.ops.<op> with backend=None is torch.ops.lowrank.<op>: whatever kernel the
    dispatcher holds for the tensors' device (C++ on CPU, Triton on CUDA) runs for both."""
    inputs = step_inputs(40, 23, 5)
    positional, keywords = args(inputs.clone())
    with _RecordOps() as recorded:
        getattr(lk.ops, op)(*positional, **keywords)
    assert recorded.ops[0] == f"lowrank.{op}.default", recorded.ops


@pytest.mark.skipif(not torch.cuda.is_available() or not _dispatch.TRITON_AVAILABLE,
                    reason="needs a GPU and triton")
@pytest.mark.parametrize("m,n", [(1000, 3001), (3001, 1000)], ids=["left", "right"])
def test_on_gpus_ops_and_torch_ops_run_the_triton_kernel(m, n):
    """On CUDA tensors: ops.fused_galore_step, torch.ops.lowrank.fused_galore_step and the
    Triton launcher give the same bits."""
    inputs = step_inputs(m, n, 130, weight_dtype=torch.bfloat16, proj_dtype=torch.bfloat16,
                         device="cuda")
    results = [inputs.clone() for _ in range(3)]
    lk.ops.fused_galore_step(*results[0].args(), **HYPER)
    OPS.fused_galore_step(*results[1].args(), **HYPER)
    lk.ops.fused_galore_step(*results[2].args(), **HYPER, backend="triton")
    for other in results[1:]:
        for a, b in zip(results[0].args(), other.args()):
            assert torch.equal(a, b)


def test_fake_kernels_do_not_specialise_dynamic_shapes():
    """One compiled graph serves weights of different shapes (the fakes check sizes with
    torch._check_value, recorded as guards on the symbols, not as constants)."""
    counter = torch._dynamo.testing.CompileCounter()

    def step(p, g, q, m_, v):
        OPS.fused_galore_step(p, g, q, m_, v, **HYPER)
        return OPS.project(g, q)

    compiled = torch.compile(step, backend=counter, dynamic=True, fullgraph=True)
    torch._dynamo.reset()
    for m, n, rank in [(48, 30, 6), (61, 37, 9), (90, 41, 5)]:
        inputs = step_inputs(m, n, rank)
        want = inputs.clone()
        got_low_rank = compiled(*inputs.args())
        want_low_rank = step(*want.args())
        torch.testing.assert_close(got_low_rank, want_low_rank)
        for a, b in zip(inputs.args(), want.args()):
            assert torch.equal(a, b)
    assert counter.frame_count == 1


def _imports(path: str) -> set[str]:
    import ast

    tree = ast.parse(open(path, encoding="utf8").read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_layering_reads_one_way():
    """optimizer -> projection -> ops -> _dispatch/_fakes -> kernels -> _checks -> reference: no
    kernel module and no validation imports the layers above it (no import cycle, hidden by a
    lazy import or not)."""
    import glob

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    above = ("lowrank_kernels.ops", "lowrank_kernels._dispatch", "lowrank_kernels._fakes",
             "lowrank_kernels.optim", "lowrank_kernels.projection", "lowrank_kernels.autograd")
    kernels = glob.glob(os.path.join(root, "triton_kernels", "**", "*.py"), recursive=True)
    for path in [*kernels, os.path.join(root, "lowrank_kernels", "_checks.py"),
                 os.path.join(root, "lowrank_kernels", "reference.py")]:
        bad = {name for name in _imports(path) if name.startswith(above)}
        assert not bad, f"{os.path.relpath(path, root)} imports {sorted(bad)}"
    leaf = _imports(os.path.join(root, "lowrank_kernels", "_checks.py"))
    assert {n for n in leaf if n.startswith("lowrank_kernels")} == {"lowrank_kernels.reference"}
