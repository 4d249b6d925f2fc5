"""DCT projection (DESIGN.md §4.5): dct_basis, dct_select and fused_galore_step with int32 indices.

Truth for the basis and the coefficients is scipy.fft in float64; the reference is checked against
it, the C++ CPU kernels (fft and dense paths) against both, and the reference against
ista-daslab-optimizers' DCT projector (the method's authors' code). The GPU kernels (Triton: its
interpreter on CPU tensors here; CUDA: skipped without a GPU) face the same cases at the end.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import scipy.fft
import torch
from cases import HYPER, assert_fp32_close, assert_step_matches, step_inputs

import lowrank_kernels as lk
from lowrank_kernels import _dispatch, ops, reference

needs_extension = pytest.mark.skipif(not lk.EXTENSION_AVAILABLE, reason="extension not built")

DCT_SIZES = [1, 2, 3, 1000, 3001]
DENSE_MAX_SIZE = 1000  # the dense path and the GEMM reference are O(d^3) at these shapes
BACKENDS = [pytest.param("cpu", marks=needs_extension), "reference"]
METHODS = ["fft", "dense"]


def scipy_basis(d: int) -> np.ndarray:
    return scipy.fft.dct(np.eye(d), norm="ortho", axis=0)


def shape_for(d: int, side: str) -> tuple[int, int]:
    """An odd m×n gradient whose short side is d on the given side (§4.1)."""
    return (d + 7, d) if side == "right" else (d, d + 13)


def exact_coefficients(grad: torch.Tensor) -> torch.Tensor:
    """G's orthonormal DCT-II along the short side in float64 (m×d right, d×n left)."""
    m, n = grad.shape
    axis = 1 if reference.is_right_side(m, n) else 0
    return torch.from_numpy(scipy.fft.dct(grad.double().numpy(), norm="ortho", axis=axis))


def exact_scores(coeffs: torch.Tensor, right: bool, norm: int) -> torch.Tensor:
    return torch.linalg.vector_norm(coeffs, ord=norm, dim=0 if right else 1)


def assert_valid_selection(idx: torch.Tensor, low_rank: torch.Tensor, grad: torch.Tensor,
                           rank: int, norm: int, rtol: float = 1e-5) -> None:
    """idx is a top-rank set of the exact scores (swaps only among scores equal within rtol: a
    genuine near-tie may fall either way in fp32) and low_rank holds the exact coefficients."""
    right = reference.is_right_side(*grad.shape)
    coeffs = exact_coefficients(grad)
    scores = exact_scores(coeffs, right, norm)
    assert idx.dtype == torch.int32 and idx.shape == (rank,)
    chosen = idx.long()
    assert torch.all(chosen[1:] > chosen[:-1]), "indices must be distinct and increasing"
    threshold = torch.sort(scores, descending=True).values[rank - 1]
    slack = rtol * scores.max().item()
    assert scores[chosen].min() >= threshold - slack
    unchosen = torch.ones_like(scores, dtype=torch.bool)
    unchosen[chosen] = False
    if unchosen.any():
        assert scores[unchosen].max() <= threshold + slack
    expected = coeffs[:, chosen] if right else coeffs[chosen, :]
    assert low_rank.dtype == torch.float32 and low_rank.shape == expected.shape
    assert_fp32_close(low_rank, expected)


def separated_gradient(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """A gradient whose DCT coefficients have |X[l, k]| = w_k exactly, with the w_k a shuffled
    ramp 1..2: every score gap is ≥ 1/d relative, far above fp32 error, so the top-r set is unique
    and any correct implementation must return exactly it."""
    gen = torch.Generator().manual_seed(seed)
    right = reference.is_right_side(m, n)
    d, lines = (n, m) if right else (m, n)
    weights = 1.0 + torch.randperm(d, generator=gen).double() / d
    signs = torch.randint(0, 2, (lines, d), generator=gen).double() * 2 - 1
    coeffs = signs * weights  # lines × d
    basis = torch.from_numpy(scipy_basis(d))
    grad = coeffs @ basis if right else (coeffs @ basis).T  # inverse DCT of each line
    return grad.float().contiguous()


def dct_select(grad, rank, norm, backend, method="auto"):
    if backend == "reference":
        return ops.dct_select(grad, rank, norm, backend="reference")
    return ops.dct_select(grad, rank, norm, method=method, backend=backend)


# ------------------------------------------------------------------------------------------
# dct_basis
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("d", DCT_SIZES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_basis_matches_scipy(d, backend):
    gen = torch.Generator().manual_seed(d)
    idx = torch.randperm(d, generator=gen)[: min(d, 300)].to(torch.int32)
    rows = ops.dct_basis(d, idx, backend=backend)
    expected = torch.from_numpy(scipy_basis(d))[idx.long()]
    assert rows.dtype == torch.float32 and rows.shape == (len(idx), d)
    assert_fp32_close(rows, expected, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_basis_keeps_fp32_accuracy_at_large_d(backend):
    """The phase (2i+1)k reaches 2d² ≈ 2^31 at d = 32768: without exact reduction mod 4d the
    fp32 angle would be off by whole radians."""
    d = 32768
    idx = torch.tensor([d - 1, d // 2 + 1, 12345, 1], dtype=torch.int32)
    rows = ops.dct_basis(d, idx, backend=backend).double()
    i = torch.arange(d, dtype=torch.float64)
    expected = math.sqrt(2.0 / d) * torch.cos(
        math.pi * (2 * i + 1) * idx.double().reshape(-1, 1) / (2 * d))
    assert (rows - expected).abs().max().item() <= 1e-6 * math.sqrt(2.0 / d)


@pytest.mark.parametrize("d", [1, 2, 3, 257, 1000])
@pytest.mark.parametrize("backend", BACKENDS)
def test_basis_is_orthonormal(d, backend):
    basis = ops.dct_basis(d, torch.arange(d, dtype=torch.int32), backend=backend).double()
    torch.testing.assert_close(basis @ basis.T, torch.eye(d, dtype=torch.float64), rtol=0,
                               atol=2e-6)


# ------------------------------------------------------------------------------------------
# dct_select
# ------------------------------------------------------------------------------------------
def selection_cases():
    return [pytest.param(d, side, rank, id=f"d{d}-{side}-r{rank}") for d in DCT_SIZES
            for side in ("right", "left") for rank in sorted({1, min(d, 17), d})]


@pytest.mark.parametrize("d,side,rank", selection_cases())
@pytest.mark.parametrize("norm", [1, 2])
@pytest.mark.parametrize("impl", [pytest.param(("cpu", m), marks=needs_extension, id=f"cpu-{m}")
                                  for m in METHODS] + [pytest.param(("reference", None),
                                                                    id="reference")])
def test_select_matches_exact(d, side, rank, norm, impl):
    backend, method = impl
    if (backend == "reference" or method == "dense") and d > DENSE_MAX_SIZE:
        pytest.skip("O(d^3) GEMM path: covered up to d=1000")
    if d > DENSE_MAX_SIZE and rank == d and norm == 2:
        pytest.skip("full-rank l2 at d=3001 adds nothing over l1")
    m, n = shape_for(d, side)
    grad = torch.randn(m, n, generator=torch.Generator().manual_seed(d + rank))
    idx, low_rank = dct_select(grad, rank, norm, backend, method)
    assert_valid_selection(idx, low_rank, grad, rank, norm)


@pytest.mark.parametrize("m,n", [(1007, 1000), (1000, 1013), (131, 67), (67, 131)], ids=str)
@pytest.mark.parametrize("norm", [1, 2])
def test_select_separated_scores_agree_exactly(m, n, norm):
    """With well-separated scores every implementation returns the same indices, bit for bit."""
    grad = separated_gradient(m, n)
    rank = 17
    coeffs = exact_coefficients(grad)
    right = reference.is_right_side(m, n)
    expected = torch.sort(exact_scores(coeffs, right, norm), descending=True).indices[:rank]
    expected = torch.sort(expected).values.to(torch.int32)
    results = {"reference": ops.dct_select(grad, rank, norm, backend="reference")}
    if lk.EXTENSION_AVAILABLE:
        for method in METHODS:
            results[method] = ops.dct_select(grad, rank, norm, method=method, backend="cpu")
    for name, (idx, low_rank) in results.items():
        assert torch.equal(idx, expected), name
        want = coeffs[:, expected.long()] if right else coeffs[expected.long(), :]
        assert_fp32_close(low_rank, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("side", ["right", "left"])
def test_select_ties_go_to_the_lower_index(backend, side):
    # All scores zero: an exact tie everywhere.
    m, n = shape_for(40, side)
    for method in METHODS if backend == "cpu" else [None]:
        idx, low_rank = dct_select(torch.zeros(m, n), 5, 1, backend, method or "auto")
        assert torch.equal(idx, torch.arange(5, dtype=torch.int32))
        assert not low_rank.any()
    # d = 2, line (1, 0): coefficients (1/√2, 1/√2) tie exactly; line (0, 1): (1/√2, -1/√2).
    lines = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])
    grad = lines if side == "right" else lines.T.contiguous()
    for method in METHODS if backend == "cpu" else [None]:
        idx, _ = dct_select(grad, 1, 1, backend, method or "auto")
        assert idx.tolist() == [0]


def test_reference_top_r_tie_break_and_order():
    scores = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0, float("nan")])
    assert reference.top_r_indices(scores, 3).tolist() == [1, 2, 5]
    assert reference.top_r_indices(scores, 5).tolist() == [1, 2, 3, 4, 5]


@needs_extension
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_select_low_precision_gradient(side, dtype):
    """bf16/fp16 gradients are read as fp32: the same result as the fp32 upcast (no extra
    rounding), on both paths."""
    m, n = shape_for(300, side)
    grad = torch.randn(m, n, generator=torch.Generator().manual_seed(5)).to(dtype)
    want_idx, want_r = ops.dct_select(grad.float(), 20, 1, method="fft", backend="cpu")
    for method in METHODS:
        idx, low_rank = ops.dct_select(grad, 20, 1, method=method, backend="cpu")
        assert torch.equal(idx, want_idx), method
        assert_fp32_close(low_rank, want_r)


@needs_extension
@pytest.mark.parametrize("side", ["right", "left"])
def test_select_low_rank_is_the_dense_projection(side):
    """R from the selection equals project(G, basis rows) with the dense basis (§4.5)."""
    m, n = shape_for(257, side)
    grad = torch.randn(m, n, generator=torch.Generator().manual_seed(7))
    idx, low_rank = ops.dct_select(grad, 33, 1, backend="cpu")
    proj = reference.dct_projection(idx, m, n)
    assert_fp32_close(low_rank, reference.project(grad, proj), rtol=2e-5)


@needs_extension
def test_select_opcheck():
    grad = torch.randn(37, 20)
    torch.library.opcheck(torch.ops.lowrank.dct_select, (grad, 5, 1))
    torch.library.opcheck(torch.ops.lowrank.dct_select, (grad.T.contiguous(), 5, 2),
                          {"method": "dense"})
    indices = torch.tensor([3, 0], dtype=torch.int32)
    torch.library.opcheck(torch.ops.lowrank.dct_basis, (20, indices))


# ------------------------------------------------------------------------------------------
# fused_galore_step with int32 indices
# ------------------------------------------------------------------------------------------
def dct_step_inputs(m, n, rank, **kwargs):
    """step_inputs with DCT indices as proj, and the same inputs with the dense rows of C."""
    dense = step_inputs(m, n, rank, **kwargs)
    d = n if reference.is_right_side(m, n) else m
    gen = torch.Generator().manual_seed(m * n + rank)
    idx = torch.randperm(d, generator=gen)[:rank].to(torch.int32)
    dense.proj = reference.dct_projection(idx, m, n)
    with_idx = dense.clone()
    with_idx.proj = idx
    return with_idx, dense


@pytest.mark.parametrize("m,n,rank", [(1000, 301, 1), (301, 1000, 17), (67, 131, 67),
                                      (131, 67, 17)], ids=str)
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_step_with_indices_matches_dense_rows(m, n, rank, weight_dtype, backend):
    with_idx, dense = dct_step_inputs(m, n, rank, weight_dtype=weight_dtype)
    out = with_idx.clone()
    ops.fused_galore_step(*out.args(), **HYPER, backend=backend)
    assert torch.equal(out.proj, with_idx.proj)
    out.proj = dense.proj
    assert_step_matches(out, dense, **HYPER)
    # The same backend fed its own dense rows of C (dct_basis) computes the very same floats.
    same = dense.clone()
    d = n if reference.is_right_side(m, n) else m
    rows = ops.dct_basis(d, with_idx.proj, backend=backend)
    same.proj = rows if reference.is_right_side(m, n) else rows.T.contiguous()
    ops.fused_galore_step(*same.args(), **HYPER, backend=backend)
    for name in ("param", "exp_avg", "exp_avg_sq"):
        assert torch.equal(getattr(out, name), getattr(same, name)), name


@needs_extension
def test_step_with_indices_after_select_tracks_reference():
    """A DCT-AdamW loop (select every step, then step with the indices) on the C++ path follows the
    reference loop."""
    m, n, rank = 150, 97, 12
    gen = torch.Generator().manual_seed(3)
    param = 0.02 * torch.randn(m, n, generator=gen)
    ours = [param.clone(), torch.zeros(m, rank), torch.zeros(m, rank)]
    ref = [param.clone(), torch.zeros(m, rank), torch.zeros(m, rank)]
    for step in range(1, 6):
        grad = separated_gradient(m, n, seed=step)
        hyper = {**HYPER, "step": step}
        idx, _ = ops.dct_select(grad, rank, backend="cpu")
        ref_idx, _ = ops.dct_select(grad, rank, backend="reference")
        assert torch.equal(idx, ref_idx)
        ops.fused_galore_step(ours[0], grad, idx, ours[1], ours[2], **hyper, backend="cpu")
        reference.fused_galore_step_dct(ref[0], grad, ref_idx, ref[1], ref[2], **hyper)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


# ------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------
BAD_INDICES = [
    (torch.tensor([0, 5], dtype=torch.int64), "int32"),
    (torch.tensor([0.0, 5.0]), "int32|2-D"),  # a float proj is a dense basis to the step
    (torch.tensor([[0, 5]], dtype=torch.int32), "1-D"),
    (torch.tensor([0, 40], dtype=torch.int32), "outside"),
    (torch.tensor([-1, 3], dtype=torch.int32), "outside"),
    (torch.tensor([3, 7, 3], dtype=torch.int32), "repeated"),
    (torch.zeros(0, dtype=torch.int32), "rank"),
]


@pytest.mark.parametrize("indices,message", BAD_INDICES, ids=lambda x: str(x).replace(" ", ""))
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_indices_raise(indices, message, backend):
    with pytest.raises(ValueError, match=message):
        ops.dct_basis(40, indices, backend=backend)
    for m, n in [(60, 40), (40, 60)]:  # d = 40 on both sides
        inputs = step_inputs(m, n, 2)
        inputs.proj = indices
        before = inputs.clone()
        with pytest.raises(ValueError, match=message):
            ops.fused_galore_step(*inputs.args(), **HYPER, backend=backend)
        for got, want in zip(inputs.args(), before.args()):
            assert torch.equal(got, want), "a tensor was written before validation"


def test_too_many_indices_raise():
    inputs = step_inputs(60, 40, 2)
    inputs.proj = torch.arange(41, dtype=torch.int32)
    for backend in ("cpu", "reference") if lk.EXTENSION_AVAILABLE else ("reference",):
        with pytest.raises(ValueError, match="rank r=41"):
            ops.fused_galore_step(*inputs.args(), **HYPER, backend=backend)


def bad_select_cases(device="cpu"):
    """(dct_select kwargs, the argument its error names): shared by every backend's test."""
    grad = torch.randn(30, 20, device=device)
    return [
        ({"grad": grad, "rank": 21}, "rank"),
        ({"grad": grad.T, "rank": 21}, "rank"),
        ({"grad": grad, "rank": 0}, "rank"),
        ({"grad": grad, "rank": 3, "norm": 3}, "norm"),
        ({"grad": grad, "rank": 3, "method": "svd"}, "method"),
        ({"grad": torch.randn(30, device=device), "rank": 3}, "grad"),
        ({"grad": grad.to(torch.int32), "rank": 3}, "grad"),
        ({"grad": grad[:, :0], "rank": 1}, "grad"),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_select_arguments_raise(backend):
    for kwargs, message in bad_select_cases():
        with pytest.raises(ValueError, match=message):
            ops.dct_select(**kwargs, backend=backend)
    with pytest.raises(ValueError, match="d: expected"):
        ops.dct_basis(0, torch.zeros(1, dtype=torch.int32), backend=backend)


# ------------------------------------------------------------------------------------------
# ista-daslab-optimizers (peer): the DCT projector of DCT-AdamW (arXiv 2505.17967)
# ------------------------------------------------------------------------------------------
def import_ista_dct():
    """Their DCT modules without the package __init__, which imports wandb and CUDA extensions:
    a stub parent package whose __path__ points at the installed files. Needs
    `pip install --no-deps ista-daslab-optimizers`."""
    spec = importlib.util.find_spec("ista_daslab_optimizers")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("ista-daslab-optimizers is not installed (pip install --no-deps "
                    "ista-daslab-optimizers)")
    saved = {k: v for k, v in sys.modules.items() if k.startswith("ista_daslab_optimizers")}
    package = types.ModuleType("ista_daslab_optimizers")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["ista_daslab_optimizers"] = package
    try:
        dct = importlib.import_module("ista_daslab_optimizers.utils.dct")
        projector = importlib.import_module("ista_daslab_optimizers.fft_low_rank.fft_projector")
    except ImportError as exc:
        pytest.skip(f"ista-daslab-optimizers' DCT modules do not import: {exc}")
    finally:
        for key in [k for k in sys.modules if k.startswith("ista_daslab_optimizers")]:
            del sys.modules[key]
        sys.modules.update(saved)
    return dct, projector


@pytest.mark.parametrize("d", [2, 3, 257])
def test_ista_basis_is_ours(d):
    """Their dct3_matrix is C itself (row k = frequency k). They form the angle πk(2i+1)/(2d) in
    fp32, so their values carry an error up to ~ulp(πd)·√(2/d); ours reduce the phase exactly
    (see test_basis_keeps_fp32_accuracy_at_large_d), hence the looser bound here."""
    dct, _ = import_ista_dct()
    theirs = dct.dct3_matrix(d, torch.float32, "cpu").double()
    ours = reference.dct_basis(d, torch.arange(d)).double()
    angle_ulp = 2.0 ** (math.floor(math.log2(math.pi * d)) - 23)
    assert (theirs - ours).abs().max().item() <= 2 * angle_ulp * math.sqrt(2.0 / d)


@pytest.mark.parametrize("m,n", [(301, 257), (257, 301), (130, 3), (3, 130)], ids=str)
@pytest.mark.parametrize("sim_type,norm", [("matmul", 1), ("matmul", 2), ("makhoul", 1)])
def test_ista_projector_selects_the_same_rows(m, n, sim_type, norm):
    _, projector = import_ista_dct()
    grad = separated_gradient(m, n, seed=m + n)
    right = reference.is_right_side(m, n)
    d = n if right else m
    rank = min(d, 17)
    # Their 'matmul' path scores the columns of A·Q (right) or rows of Qᵀ·A (left): Q = Cᵀ gives
    # G Cᵀ / C G as DESIGN §4.5 does, and their 'makhoul' path computes the same without a matrix.
    # Q is our exact C (their dct3_matrix differs by its fp32 angle error, test above), so the
    # comparison is of the selection and R.
    basis_t = reference.dct_basis(d, torch.arange(d)).T.contiguous()
    peer = projector.FFTLowRankProjector(grad, rank=rank, proj="dct", rotate_subspace=False,
                                         sim_type=sim_type, ell_norm=norm)
    their_r = peer.change_subspace(basis_t, grad, col_norms=None)
    their_idx = peer.indices_crt.long()
    order = torch.argsort(their_idx)  # they keep topk(sorted=False) order; we sort
    their_idx = their_idx[order]
    their_r = their_r[:, order] if right else their_r[order, :]

    for backend in ("reference", "cpu") if lk.EXTENSION_AVAILABLE else ("reference",):
        idx, low_rank = ops.dct_select(grad, rank, norm, backend=backend)
        assert torch.equal(idx.long(), their_idx), backend
        assert_fp32_close(low_rank, their_r, rtol=2e-5)


# ------------------------------------------------------------------------------------------
# GPU kernels: Triton (its interpreter on CPU tensors here) and CUDA (skipped without a GPU).
# Same cases as the CPU kernel, against the float64 truth and the reference.
# ------------------------------------------------------------------------------------------
HAS_GPU = torch.cuda.is_available()
needs_cuda_kernel = pytest.mark.skipif(not (HAS_GPU and _dispatch.CUDA_CXX_AVAILABLE),
                                       reason="needs a GPU and the extension built with CUDA")
needs_triton = pytest.mark.skipif(
    not (_dispatch.TRITON_AVAILABLE and (HAS_GPU or os.environ.get("TRITON_INTERPRET") == "1")),
    reason="needs triton and a GPU or TRITON_INTERPRET=1")
GPU_BACKENDS = [pytest.param("triton", marks=needs_triton),
                pytest.param("cuda", marks=needs_cuda_kernel)]
INTERPRETED_MAX_SIZE = 1000  # d = 3001 takes minutes in the Triton interpreter


@pytest.mark.parametrize("d", [1, 2, 3, 1000, 3001, 32768])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_basis_matches_float64_truth(d, backend):
    """The rows the fused step's tiles generate, written out (Triton) or the CUDA op, against
    c_k·cos(π(2i+1)k/(2d)) in float64; d = 32768 takes 64-bit phases."""
    gen = torch.Generator().manual_seed(d)
    picked = torch.randperm(d, generator=gen)[: min(d, 40)].tolist()
    idx = torch.tensor(sorted(set(picked) | {0, d - 1}), dtype=torch.int32)
    rows = ops.dct_basis(d, idx.to("cuda" if HAS_GPU else "cpu"), backend=backend).cpu()
    i = torch.arange(d, dtype=torch.float64)
    k = idx.double().reshape(-1, 1)
    scale = torch.where(k == 0, math.sqrt(1.0 / d), math.sqrt(2.0 / d))
    expected = scale * torch.cos(math.pi * (2 * i + 1) * k / (2 * d))
    assert rows.dtype == torch.float32 and rows.shape == (len(idx), d)
    assert (rows.double() - expected).abs().max().item() <= 2e-6 * math.sqrt(2.0 / d)


def gpu_select(grad: torch.Tensor, rank: int, norm: int, backend: str):
    """dct_select on the backend's device (Triton: CUDA tensors when there is a GPU, else CPU
    tensors through the interpreter), results back on the CPU."""
    device = "cuda" if HAS_GPU else "cpu"
    idx, low_rank = ops.dct_select(grad.to(device), rank, norm, backend=backend)
    assert idx.device.type == device and low_rank.device.type == device
    return idx.cpu(), low_rank.cpu()


def interpreted(backend: str) -> bool:
    return backend == "triton" and not HAS_GPU


@pytest.mark.parametrize("d,side,rank", selection_cases())
@pytest.mark.parametrize("norm", [1, 2])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_select_matches_exact(d, side, rank, norm, backend):
    if interpreted(backend) and (d > INTERPRETED_MAX_SIZE or (
            d == 1000 and rank == 1 or (rank == d == 1000 and norm == 2))):
        pytest.skip("Triton interpreter: d = 1000 at r = 17 and r = d (l1) only")
    m, n = shape_for(d, side)
    grad = torch.randn(m, n, generator=torch.Generator().manual_seed(d + rank))
    idx, low_rank = gpu_select(grad, rank, norm, backend)
    assert_valid_selection(idx, low_rank, grad, rank, norm)


@pytest.mark.parametrize("m,n", [(1007, 1000), (1000, 1013), (131, 67), (67, 131)], ids=str)
@pytest.mark.parametrize("norm", [1, 2])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_select_equals_reference(m, n, norm, backend):
    """Well-separated scores: the reference's indices exactly, and its R."""
    if interpreted(backend) and min(m, n) == 1000:
        pytest.skip("Triton interpreter: d = 1000 is covered by test_gpu_select_matches_exact")
    grad = separated_gradient(m, n)
    want_idx, want_r = ops.dct_select(grad, 17, norm, backend="reference")
    idx, low_rank = gpu_select(grad, 17, norm, backend)
    assert torch.equal(idx, want_idx)
    assert_fp32_close(low_rank, want_r)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_select_low_precision_gradient(side, dtype, backend):
    """bf16/fp16 gradients are read as fp32: a valid selection of the upcast values' exact scores
    and their exact coefficients."""
    m, n = shape_for(300, side)
    grad = torch.randn(m, n, generator=torch.Generator().manual_seed(5)).to(dtype)
    idx, low_rank = gpu_select(grad, 20, 1, backend)
    assert_valid_selection(idx, low_rank, grad.float(), 20, 1)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_select_ties_go_to_the_lower_index(side, backend):
    m, n = shape_for(40, side)
    idx, low_rank = gpu_select(torch.zeros(m, n), 5, 1, backend)
    assert torch.equal(idx, torch.arange(5, dtype=torch.int32))
    assert not low_rank.any()
    # d = 2: the line (1, 0) has the exactly tied coefficients (1/√2, 1/√2) (see above)
    lines = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])
    grad = lines if side == "right" else lines.T.contiguous()
    assert gpu_select(grad, 1, 1, backend)[0].tolist() == [0]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_select_is_deterministic_and_takes_strided_gradients(backend):
    """No atomics: repeated calls agree bit for bit. A row-strided view and a transposed layout
    (read in place by the Triton kernel) give the contiguous copy's result."""
    base = torch.randn(300, 230, generator=torch.Generator().manual_seed(3))
    grad, view = base[:, :200].contiguous(), base[:, :200]
    transposed = grad.t().contiguous().t()
    first = gpu_select(grad, 20, 1, backend)
    for again in (gpu_select(grad, 20, 1, backend), gpu_select(view, 20, 1, backend),
                  gpu_select(transposed, 20, 1, backend)):
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_bad_select_arguments_raise(backend):
    for kwargs, message in bad_select_cases("cuda" if HAS_GPU else "cpu"):
        with pytest.raises(ValueError, match=message):
            ops.dct_select(**kwargs, backend=backend)


@needs_cuda_kernel
@pytest.mark.parametrize("d", [1, 3, 1000, 32768])
def test_cuda_basis_equals_cpu(d):
    idx = torch.tensor(sorted({0, d // 2, d - 1}), dtype=torch.int32)
    rows = torch.ops.lowrank_cuda.dct_basis(d, idx.cuda()).cpu()
    assert_fp32_close(rows, torch.ops.lowrank.dct_basis(d, idx), rtol=1e-6)


# ---- AOT compilation of the Triton kernel for sm_89 / sm_90 --------------------------------
@pytest.mark.skipif(not _dispatch.TRITON_AVAILABLE, reason="triton is not installed")
def test_triton_dct_kernel_compiles_without_spills():
    """Every launch (LOWRANK_AOT_ALL_DTYPES=1; by default the two most register-hungry ones,
    each with 32- and 64-bit offsets and G row-major or transposed, and dct_basis) is compiled
    for sm_89 and sm_90 by Triton's own ptxas: no spills, shared memory within the target's
    limit. In a subprocess: conftest's TRITON_INTERPRET=1 would hand the compiler an
    interpreter object."""
    aot = pytest.importorskip("lowrank_kernels.triton_kernels.aot")
    if aot.ptxas_path() is None:
        pytest.skip("Triton's ptxas is missing")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = [sys.executable, "-m", "lowrank_kernels.triton_kernels.aot", "--kernels",
            "dct_select", "--targets", "89,90", "--jobs", "4"]
    if os.environ.get("LOWRANK_AOT_ALL_DTYPES", "0") != "1":
        args.append("--main-dtypes")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=1800,
                          check=False)
    assert proc.returncode == 0, f"AOT compilation failed:\n{proc.stderr[-5000:]}"
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    from lowrank_kernels.triton_kernels import dct_select as triton_dct

    main_only = "--main-dtypes" in args
    assert len(reports) == 2 * len(list(triton_dct.aot_variants(main_only)))
    limits = {"sm_89": aot.MAX_SHARED_BYTES[89], "sm_90a": aot.MAX_SHARED_BYTES[90]}
    for r in reports:
        assert r["spill_store_bytes"] == 0 and r["spill_load_bytes"] == 0, r
        assert r["shared_bytes"] <= limits[r["target"]], r
        assert r["registers"] <= aot.MAX_REGISTERS, r
