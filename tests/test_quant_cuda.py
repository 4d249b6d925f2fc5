"""CUDA kernels of the quantization ops against the C++ CPU kernels, which are themselves equal
bit for bit to the reference (tests/test_quant.py): the CUDA C++ kernels (csrc/cuda/quant.cu,
torch.ops.lowrank_cuda) share the CPU's math headers and the Triton kernels
(triton_kernels/quant.py, torch.ops.lowrank on CUDA tensors by default) its fp32 operations, so
the results must be identical. Skipped without a GPU."""

import pytest
import torch

import lowrank_kernels as lk

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and lk.EXTENSION_AVAILABLE),
                                reason="needs a GPU and the extension")

CASES = [((67, 131), 256), ((131, 67), 64), ((3, 1001), 256), ((5,), 256), ((45, 70), 6)]
# the CUDA kernel of each namespace: lowrank (by default Triton) and lowrank_cuda (CUDA C++)
NAMESPACES = ["lowrank", pytest.param("lowrank_cuda", marks=pytest.mark.skipif(
    not lk._dispatch.CUDA_CXX_AVAILABLE, reason="the extension was built without CUDA"))]


@pytest.mark.parametrize("namespace", NAMESPACES)
@pytest.mark.parametrize("seed", [0, 0xFFFFFFFF + (7 << 32), 2**62 + 11])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32], ids=str)
def test_cuda_philox_equals_cpu(seed, dtype, namespace):
    offsets = (torch.arange(10**6, dtype=torch.int64) * 7919 + 2**32 - 3).to(dtype)
    on_gpu = getattr(torch.ops, namespace).philox_uniform
    assert torch.equal(on_gpu(seed, offsets.cuda()).cpu(),
                       torch.ops.lowrank.philox_uniform(seed, offsets))


@pytest.mark.parametrize("namespace", NAMESPACES)
@pytest.mark.parametrize("shape,group_size", CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_quantizers_equal_cpu(shape, group_size, dtype, namespace):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    gpu, cpu = getattr(torch.ops, namespace), torch.ops.lowrank
    calls = [("quantize_int4", (group_size,)), ("quantize_int8", (group_size, False, 0)),
             ("quantize_int8", (group_size, True, 99))]
    for name, args in calls:
        for a, b in zip(getattr(gpu, name)(x.cuda(), *args), getattr(cpu, name)(x, *args)):
            assert torch.equal(a.cpu(), b), name
    packed = cpu.quantize_int4(x, group_size)
    assert torch.equal(
        gpu.dequantize_int4(*[t.cuda() for t in packed], list(shape), group_size).cpu(),
        cpu.dequantize_int4(*packed, list(shape), group_size))
    codes = cpu.quantize_int8(x, group_size)
    assert torch.equal(gpu.dequantize_int8(*[t.cuda() for t in codes], group_size).cpu(),
                       cpu.dequantize_int8(*codes, group_size))


@pytest.mark.skipif(not lk._dispatch.CUDA_CXX_AVAILABLE, reason="the extension lacks CUDA")
def test_cuda_bad_input_names_the_argument():
    x = torch.randn(4, 100, device="cuda")
    with pytest.raises(ValueError, match="group_size"):
        lk.ops.quantize_int4(x, 63, backend="cuda")
    with pytest.raises(ValueError, match="seed"):
        lk.ops.quantize_int8(x, 64, True, 2**32, backend="cuda")
    codes, scales, zeros = torch.ops.lowrank.quantize_int8(x, 64)
    with pytest.raises(ValueError, match="scales"):
        lk.ops.dequantize_int8(codes, scales[:-1], zeros, 64, backend="cuda")
