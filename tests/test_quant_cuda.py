"""CUDA kernels of the quantization ops (csrc/cuda/quant.cu) against the C++ CPU kernels, which
are themselves equal bit for bit to the reference (tests/test_quant.py): same shared math, so the
results must be identical. Skipped without a GPU or a CUDA build."""

import pytest
import torch

import lowrank_kernels as lk
from lowrank_kernels import _extension

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and _extension.has_kernel("quantize_int8", "CUDA")),
    reason="needs a GPU and the extension built with CUDA")

CASES = [((67, 131), 256), ((131, 67), 64), ((3, 1001), 256), ((5,), 256), ((45, 70), 6)]


@pytest.mark.parametrize("seed", [0, 0xFFFFFFFF + (7 << 32), 2**62 + 11])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32], ids=str)
def test_cuda_philox_equals_cpu(seed, dtype):
    offsets = (torch.arange(10**6, dtype=torch.int64) * 7919 + 2**32 - 3).to(dtype)
    assert torch.equal(torch.ops.lowrank.philox_uniform(seed, offsets.cuda()).cpu(),
                       torch.ops.lowrank.philox_uniform(seed, offsets))


@pytest.mark.parametrize("shape,group_size", CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_quantizers_equal_cpu(shape, group_size, dtype):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    calls = [("quantize_int4", (group_size,)), ("quantize_int8", (group_size, False, 0)),
             ("quantize_int8", (group_size, True, 99))]
    for name, args in calls:
        op = getattr(torch.ops.lowrank, name)
        for a, b in zip(op(x.cuda(), *args), op(x, *args)):
            assert torch.equal(a.cpu(), b), name
    packed = torch.ops.lowrank.quantize_int4(x, group_size)
    assert torch.equal(
        torch.ops.lowrank.dequantize_int4(*[t.cuda() for t in packed], list(shape),
                                          group_size).cpu(),
        torch.ops.lowrank.dequantize_int4(*packed, list(shape), group_size))
    codes = torch.ops.lowrank.quantize_int8(x, group_size)
    assert torch.equal(
        torch.ops.lowrank.dequantize_int8(*[t.cuda() for t in codes], group_size).cpu(),
        torch.ops.lowrank.dequantize_int8(*codes, group_size))


def test_cuda_bad_input_names_the_argument():
    x = torch.randn(4, 100, device="cuda")
    with pytest.raises(ValueError, match="group_size"):
        lk.ops.quantize_int4(x, 63, backend="cuda")
    with pytest.raises(ValueError, match="seed"):
        lk.ops.quantize_int8(x, 64, True, 2**32, backend="cuda")
    codes, scales, zeros = torch.ops.lowrank.quantize_int8(x, 64)
    with pytest.raises(ValueError, match="scales"):
        lk.ops.dequantize_int8(codes, scales[:-1], zeros, 64, backend="cuda")
