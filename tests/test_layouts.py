"""Inputs as other libraries hold them: read-only tensors of any strides (grad, proj,
proj_scales/proj_zeros, DCT indices, packed codes) give the numbers of their dense copies, in
every backend, against the reference (DESIGN.md §6). Tensors written in place must stay dense
(tests/test_ops.py checks that error).

Layouts: galore-torch's own basis (``GaLoreProjector.ortho_matrix``: a strided SVD output, made
by galore-torch on CPU, both sides and in bf16), a transposed gradient (``x.t()`` of a
contiguous x), a row-strided slice and a column-stepped view. The CPU and Triton kernels read G
through its strides (no m×n copy); the CUDA C++ kernel copies strided operands.
"""

import pytest
import torch
from cases import (
    HYPER,
    SMALL_ODD_SHAPES,
    StepInputs,
    assert_fp32_close,
    assert_step_matches,
    qgalore_inputs,
    step_inputs,
)

import lowrank_kernels as lk
from lowrank_kernels import _dispatch, reference

galore_projector = pytest.importorskip("galore_torch.galore_projector")

HAS_GPU = torch.cuda.is_available()
TRITON_DEVICE = "cuda" if HAS_GPU else "cpu"  # CPU tensors: Triton's interpreter (conftest.py)
# (backend, device); None: the default, torch.ops.lowrank
BACKENDS = [
    pytest.param((None, "cpu"), marks=pytest.mark.skipif(not lk.EXTENSION_AVAILABLE,
                                                         reason="extension not built"),
                 id="torch.ops"),
    pytest.param(("cpu", "cpu"), marks=pytest.mark.skipif(not lk.EXTENSION_AVAILABLE,
                                                          reason="extension not built"),
                 id="cpu"),
    pytest.param(("reference", "cpu"), id="reference"),
    pytest.param(("triton", TRITON_DEVICE), marks=pytest.mark.skipif(
        not _dispatch.TRITON_AVAILABLE, reason="triton not installed"), id="triton"),
    pytest.param((None, "cuda"), marks=pytest.mark.skipif(
        not (HAS_GPU and lk.EXTENSION_AVAILABLE), reason="needs a GPU"), id="torch.ops-cuda"),
    pytest.param(("cuda", "cuda"), marks=pytest.mark.skipif(
        not (HAS_GPU and _dispatch.CUDA_CXX_AVAILABLE), reason="needs a GPU and CUDA C++"),
        id="cuda"),
]
RANK = 17


def galore_basis(grad: torch.Tensor, rank: int) -> torch.Tensor:
    """galore-torch's basis for ``grad`` as galore-torch holds it (never made contiguous)."""
    projector = galore_projector.GaLoreProjector(rank, proj_type="std")
    projector.project(grad, 0)
    return projector.ortho_matrix


def transposed(t: torch.Tensor) -> torch.Tensor:
    """The same values stored column-major: ``x.t()`` of a contiguous x."""
    return t.t().contiguous().t()


def row_slice(t: torch.Tensor) -> torch.Tensor:
    """The same values as a slice of a wider, taller tensor (row stride ≠ row length, offset)."""
    m, n = t.shape
    big = torch.full((m + 3, n + 5), float("nan"), dtype=t.dtype)
    big[2:m + 2, 3:n + 3] = t
    return big[2:m + 2, 3:n + 3]


def stepped(t: torch.Tensor) -> torch.Tensor:
    """The same values with both strides non-unit (every other column of a wider tensor)."""
    m, n = t.shape
    big = torch.full((m, 2 * n), float("nan"), dtype=t.dtype)
    big[:, ::2] = t
    return big[:, ::2]


LAYOUTS = {"transposed": transposed, "row-slice": row_slice, "stepped": stepped}


def run(backend, device, inputs: StepInputs, **formats) -> StepInputs:
    out = StepInputs(*(t.to(device) for t in inputs.args()))
    formats = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in formats.items()}
    lk.ops.fused_galore_step(*out.args(), **HYPER, **formats, backend=backend)
    return StepInputs(*(t.cpu() for t in out.args()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m,n", SMALL_ODD_SHAPES, ids=["left", "right"])
def test_galore_torch_basis(m, n, dtype, backend):
    """galore-torch's ortho_matrix of either side, as its projector returns it."""
    dense = step_inputs(m, n, RANK, weight_dtype=dtype)
    basis = galore_basis(torch.randn(m, n, generator=torch.Generator().manual_seed(9)).to(dtype),
                         RANK)
    assert not basis.is_contiguous() and basis.dtype == dtype
    dense.proj = basis.contiguous()
    strided = StepInputs(dense.param, dense.grad, basis, dense.exp_avg, dense.exp_avg_sq)
    assert_step_matches(run(*backend, strided.clone()), dense, **HYPER)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m,n", SMALL_ODD_SHAPES, ids=["left", "right"])
def test_strided_gradient_and_basis(m, n, dtype, layout, backend):
    dense = step_inputs(m, n, RANK, weight_dtype=dtype, proj_dtype=dtype)
    strided = dense.clone()
    strided.grad, strided.proj = LAYOUTS[layout](dense.grad), LAYOUTS[layout](dense.proj)
    assert not strided.grad.is_contiguous() and torch.equal(strided.grad, dense.grad)
    assert_step_matches(run(*backend, strided), dense, **HYPER)


def _spread(t: torch.Tensor) -> torch.Tensor:
    """A 1-D tensor's values at stride 2 (every other element of a buffer twice as long)."""
    big = torch.zeros(2 * t.numel(), dtype=t.dtype)
    big[::2] = t
    return big[::2]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m,n", SMALL_ODD_SHAPES, ids=["left", "right"])
def test_strided_int4_basis_and_dct_indices(m, n, backend):
    """The 1-D read-only inputs: packed INT4 codes with their scales and zeros, DCT indices."""
    q = qgalore_inputs(m, n, RANK, int4_proj=True, int8_weight=False, proj_group_size=64)
    dense_basis = reference.dequantize_int4(q.proj, q.proj_scales, q.proj_zeros,
                                            reference.quantized_basis_shape(m, n, RANK), 64)
    inputs = StepInputs(q.param, q.grad, _spread(q.proj), q.exp_avg, q.exp_avg_sq)
    formats = {"proj_scales": _spread(q.proj_scales), "proj_zeros": _spread(q.proj_zeros),
               "proj_group_size": 64}
    assert not formats["proj_scales"].is_contiguous()
    dense = StepInputs(q.param, q.grad, dense_basis, q.exp_avg, q.exp_avg_sq)
    assert_step_matches(run(*backend, inputs.clone(), **formats), dense, **HYPER)

    indices = torch.tensor(sorted(range(0, min(m, n), 3))[:RANK], dtype=torch.int32)
    dct = StepInputs(q.param, q.grad, _spread(indices), q.exp_avg, q.exp_avg_sq)
    dense = StepInputs(q.param, q.grad, reference.dct_projection(indices, m, n), q.exp_avg,
                       q.exp_avg_sq)
    assert_step_matches(run(*backend, dct.clone()), dense, **HYPER)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("m,n", SMALL_ODD_SHAPES, ids=["left", "right"])
def test_dct_select_of_strided_gradients(m, n, layout, backend):
    name, device = backend
    grad = torch.randn(m, n, generator=torch.Generator().manual_seed(4))
    want_idx, want_r = lk.ops.dct_select(grad, RANK, 1, backend="reference")
    idx, low_rank = lk.ops.dct_select(LAYOUTS[layout](grad).to(device), RANK, 1, backend=name)
    assert torch.equal(idx.cpu(), want_idx)
    assert_fp32_close(low_rank.cpu(), want_r)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dequantize_strided_codes_scales_and_zeros(backend):
    name, device = backend
    x = torch.randn(37, 51, generator=torch.Generator().manual_seed(2))
    packed, scales, zeros = reference.quantize_int4(x, 64)
    codes, scales8, zeros8 = reference.quantize_int8(x, 64)
    want4 = reference.dequantize_int4(packed, scales, zeros, [37, 51], 64)
    want8 = reference.dequantize_int8(codes, scales8, zeros8, 64)

    def on(*ts):
        return [t.to(device) for t in ts]

    got4 = lk.ops.dequantize_int4(*on(_spread(packed), _spread(scales), _spread(zeros)),
                                  [37, 51], 64, backend=name)
    got8 = lk.ops.dequantize_int8(*on(transposed(codes.t()).t(), _spread(scales8),
                                      _spread(zeros8)), 64, backend=name)
    assert torch.equal(got4.cpu(), want4) and torch.equal(got8.cpu(), want8)
