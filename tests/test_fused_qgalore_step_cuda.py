"""fused_galore_step on INT8 weight codes with the C++/CUDA kernel (csrc/cuda/int8_update.cu,
DESIGN.md §4.4) against the reference and against the C++ CPU kernel on the same inputs.

Every basis format (dense fp32 and bf16, packed INT4, DCT indices), both sides, odd shapes, both
pass-2 kernels of int8_update.cu: "tiled" (n % group_size == 0, group_size <= 256) and "general"
(groups straddling rows or larger than 256, including groups beyond the 8 values per lane the
general kernel keeps in registers). Skipped without a GPU.
"""

import pytest
import torch
from cases import HYPER, QGaLoreInputs, qgalore_inputs
from test_fused_qgalore_step import SMALL_LR, _bad_step_cases, assert_int8_step_matches

import lowrank_kernels as lk
from lowrank_kernels import reference

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not lk.EXTENSION_AVAILABLE, reason="extension not built"),
    pytest.mark.usefixtures("cuda_paths"),  # CUDA C++ kernels, + experimental (conftest.py)
]

# (m, n, group size, pass-2 kernel). Partial last groups, partial row and column tiles, tiny
# groups, groups of 512 and 640 elements (recomputed past 256), both sides.
SHAPES = [
    (67, 131, 256, "general"),   # left, groups straddle rows, partial last group
    (131, 67, 256, "general"),   # right
    (300, 211, 256, "general"),
    (45, 70, 6, "general"),      # left, tiny groups
    (520, 384, 128, "tiled"),    # right, two groups per tile row, partial row tile
    (200, 512, 256, "tiled"),    # left
    (96, 1000, 8, "tiled"),      # left, partial column tile (1000 = 3*256 + 232)
    (150, 1024, 512, "general"), # left, whole-row groups too wide for a tile
    (1000, 257, 640, "general"), # right, 640-element groups straddling rows
]
RANKS = [1, 17, 64]
BASES = ["dense_fp32", "dense_bf16", "int4", "dct"]
INT4_PROJ_GROUP = 64


def to_device(inputs: QGaLoreInputs, device, memo: dict | None = None) -> QGaLoreInputs:
    """A copy on ``device``; tensors that alias each other stay aliased (``memo``: id -> copy)."""
    memo = {} if memo is None else memo

    def move(t):
        if t is not None and id(t) not in memo:
            memo[id(t)] = t.to(device, copy=True)
        return None if t is None else memo[id(t)]

    return QGaLoreInputs(*(move(t) for t in inputs.tensors()))


def int8_inputs(m, n, rank, group_size, basis, *, grad_dtype=torch.float32,
                state_dtype=torch.float32, seed=0) -> QGaLoreInputs:
    """CPU inputs: INT8 weight codes and the basis in the named format."""
    inputs = qgalore_inputs(m, n, rank, int4_proj=basis == "int4", int8_weight=True,
                            proj_group_size=INT4_PROJ_GROUP, param_group_size=group_size,
                            grad_dtype=grad_dtype, state_dtype=state_dtype, seed=seed)
    if basis == "dense_bf16":
        inputs.proj = inputs.proj.bfloat16()
    elif basis == "dct":
        d = n if reference.is_right_side(m, n) else m
        gen = torch.Generator().manual_seed(seed + 7)
        inputs.proj = torch.randperm(d, generator=gen)[:rank].to(torch.int32)
    return inputs


def reference_step(inputs, hyper, group_size, seed) -> QGaLoreInputs:
    """reference.fused_qgalore_step on a CPU copy; DCT indices become the dense rows they name."""
    ref = to_device(inputs, "cpu")
    if ref.proj.dtype == torch.int32:
        ref.proj = reference.dct_projection(ref.proj, *ref.param.shape)
    reference.fused_qgalore_step(*ref.args(), **hyper,
                                 **ref.formats(INT4_PROJ_GROUP, group_size, seed))
    return ref


def kernel_step(inputs, hyper, group_size, seed, device) -> QGaLoreInputs:
    out = to_device(inputs, device)
    torch.ops.lowrank.fused_galore_step(*out.args(), **hyper,
                                        **out.formats(INT4_PROJ_GROUP, group_size, seed))
    return out


def check_kernel_path(m, n, group_size, path):
    """The case really runs the pass-2 kernel it is labelled with (int8_update.cu's rule)."""
    assert path == ("tiled" if n % group_size == 0 and group_size <= 256 else "general")


@pytest.mark.parametrize("m,n,group_size,path", SHAPES, ids=str)
@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("basis", BASES)
@pytest.mark.parametrize("hyper", [HYPER, SMALL_LR], ids=["lr0.5", "lr2e-3"])
def test_cuda_int8_matches_reference_and_cpu(m, n, group_size, path, rank, basis, hyper):
    check_kernel_path(m, n, group_size, path)
    rank = min(rank, m, n)
    inputs = int8_inputs(m, n, rank, group_size, basis)
    ours = to_device(kernel_step(inputs, hyper, group_size, 11, "cuda"), "cpu")
    assert_int8_step_matches(ours, reference_step(inputs, hyper, group_size, 11), inputs,
                             group_size)
    # the CPU kernel on the same inputs: same philox stream and quantizer, so the same codes up
    # to the fp32 rounding of back(N)
    cpu = kernel_step(inputs, hyper, group_size, 11, "cpu")
    assert_int8_step_matches(ours, cpu, inputs, group_size)


@pytest.mark.parametrize("m,n,group_size", [(1000, 3001, 256), (3001, 1000, 256),
                                            (1024, 2048, 256), (2048, 1024, 256)], ids=str)
@pytest.mark.parametrize("rank", [64, 130])
@pytest.mark.parametrize("basis", ["dense_fp32", "int4", "dct"])
def test_cuda_int8_larger_shapes(m, n, group_size, rank, basis):
    """Many tiles and K chunks (r = 130 is not a multiple of the 16-wide chunk)."""
    inputs = int8_inputs(m, n, rank, group_size, basis)
    ours = to_device(kernel_step(inputs, HYPER, group_size, 5, "cuda"), "cpu")
    assert_int8_step_matches(ours, reference_step(inputs, HYPER, group_size, 5), inputs,
                             group_size)
    assert_int8_step_matches(ours, kernel_step(inputs, HYPER, group_size, 5, "cpu"), inputs,
                             group_size)


@pytest.mark.parametrize("m,n", [(257, 140), (140, 257), (512, 256), (256, 512)], ids=str)
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_int8_low_precision_grad_and_state(m, n, state_dtype):
    inputs = int8_inputs(m, n, 33, 256, "int4", grad_dtype=torch.bfloat16,
                         state_dtype=state_dtype)
    ours = to_device(kernel_step(inputs, HYPER, 256, 3, "cuda"), "cpu")
    for ref in (reference_step(inputs, HYPER, 256, 3), kernel_step(inputs, HYPER, 256, 3, "cpu")):
        if state_dtype == torch.float32:
            assert_int8_step_matches(ours, ref, inputs, 256)
        else:
            # bf16 moments: one bf16 rounding apart, or a rounding of R's fp32 error (the bf16
            # tensor-core projection of launch 1) near zero, judged on the tensor's scale
            for a, b in ((ours.exp_avg, ref.exp_avg), (ours.exp_avg_sq, ref.exp_avg_sq)):
                torch.testing.assert_close(a.float(), b.float(), rtol=2**-7,
                                           atol=2**-10 * b.float().abs().max().item())
            diff = (ours.param.int() - ref.param.int()).abs()
            assert diff.max().item() <= 1 and diff.bool().float().mean().item() <= 1e-3
            assert not torch.equal(ours.param, inputs.param)


@pytest.mark.parametrize("m,n,group_size", [(1000, 257, 640), (520, 384, 128), (131, 67, 256)],
                         ids=str)
@pytest.mark.parametrize("basis", ["dense_fp32", "dct"])
def test_cuda_int8_is_deterministic(m, n, group_size, basis):
    inputs = int8_inputs(m, n, 40, group_size, basis)
    first = kernel_step(inputs, HYPER, group_size, 9, "cuda")
    second = kernel_step(inputs, HYPER, group_size, 9, "cuda")
    for a, b in zip(first.tensors(), second.tensors()):
        assert a is None or torch.equal(a, b)


def test_cuda_int8_rounding_stream_depends_on_seed_and_step():
    inputs = int8_inputs(520, 384, 8, 128, "int4")
    a = kernel_step(inputs, SMALL_LR, 128, 1, "cuda")
    b = kernel_step(inputs, SMALL_LR, 128, 2, "cuda")
    c = kernel_step(inputs, {**SMALL_LR, "step": SMALL_LR["step"] + 1}, 128, 1, "cuda")
    assert not torch.equal(a.param, b.param)
    assert not torch.equal(a.param, c.param)


@pytest.mark.parametrize("m,n,group_size", [(200, 90, 256), (96, 512, 128)], ids=str)
def test_cuda_int8_many_steps_track_reference(m, n, group_size):
    """Ten steps with fresh gradients stay within a few INT8 steps of the reference trajectory
    (both round stochastically from the same Philox stream)."""
    inputs = int8_inputs(m, n, 12, group_size, "int4")
    ours, ref = to_device(inputs, "cuda"), inputs.clone()
    gen = torch.Generator().manual_seed(3)
    for step in range(1, 11):
        grad = torch.randn(m, n, generator=gen)
        hyper = {**SMALL_LR, "step": step}
        torch.ops.lowrank.fused_galore_step(ours.param, grad.cuda(), ours.proj, ours.exp_avg,
                                            ours.exp_avg_sq, **hyper,
                                            **ours.formats(INT4_PROJ_GROUP, group_size, 4))
        reference.fused_qgalore_step(ref.param, grad, ref.proj, ref.exp_avg, ref.exp_avg_sq,
                                     **hyper, **ref.formats(INT4_PROJ_GROUP, group_size, 4))
    ours = to_device(ours, "cpu")
    w_ours = reference.dequantize_int8(ours.param, ours.param_scales, ours.param_zeros,
                                       group_size)
    w_ref = reference.dequantize_int8(ref.param, ref.param_scales, ref.param_zeros, group_size)
    assert (w_ours - w_ref).abs().max().item() <= 2 * ref.param_scales.max().item()
    assert (ours.param != ref.param).float().mean().item() <= 1e-2


def test_cuda_int8_automatic_backend_runs_the_cuda_kernel():
    """ops.fused_galore_step without a backend sends INT8 codes on CUDA to the kernel of
    torch.ops.lowrank (here the CUDA C++ one, switched by the fixture)."""
    inputs = to_device(int8_inputs(131, 67, 9, 256, "int4"), "cuda")
    auto, direct = inputs.clone(), inputs.clone()
    lk.ops.fused_galore_step(*auto.args(), **HYPER, **auto.formats(INT4_PROJ_GROUP, 256, 2))
    torch.ops.lowrank.fused_galore_step(*direct.args(), **HYPER,
                                        **direct.formats(INT4_PROJ_GROUP, 256, 2))
    for a, b in zip(auto.tensors(), direct.tensors()):
        assert a is None or torch.equal(a, b)


def test_cuda_int8_opcheck():
    inputs = to_device(int8_inputs(70, 45, 5, 64, "int4"), "cuda")
    torch.library.opcheck(torch.ops.lowrank.fused_galore_step.default, inputs.args(),
                          {**HYPER, **inputs.formats(INT4_PROJ_GROUP, 64, 3)})


# ---- bad input: clear errors naming the argument, nothing written ----------------------------
def _cuda_bad_cases():
    cases = []
    for name, inputs, formats in _bad_step_cases():
        memo = {}
        moved_inputs = to_device(inputs, "cuda", memo)
        moved_formats = {k: memo.get(id(v), v) if isinstance(v, torch.Tensor) else v
                         for k, v in formats.items()}
        cases.append((name, moved_inputs, moved_formats))
    base = to_device(int8_inputs(67, 131, 9, 256, "int4"), "cuda")

    def moved(field):
        bad = base.clone()
        setattr(bad, field, getattr(bad, field).cpu())
        return field, bad, bad.formats(INT4_PROJ_GROUP, 256, 5)

    return cases + [moved("param_scales"), moved("param_zeros"), moved("proj_scales")]


def test_cuda_int8_bad_input_raises_before_writing():
    for name, inputs, formats in _cuda_bad_cases():
        before = inputs.clone()
        with pytest.raises(ValueError, match=name):
            torch.ops.lowrank.fused_galore_step(*inputs.args(), **HYPER, **formats)
        for a, b in zip(inputs.tensors(), before.tensors()):
            assert a is None or torch.equal(a.cpu(), b.cpu()), f"{name}: a tensor was written"
