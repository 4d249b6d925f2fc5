// CUDA kernels of the Q-GaLore quantization ops (DESIGN.md §4.3-§4.4), the twins of
// csrc/cpu/quant.cpp on the same shared math (lowrank/quant.h, lowrank/philox.h), so codes,
// scales, zeros and uniforms are equal bit for bit across backends:
//
//   philox_uniform   u[i] = tl.rand(seed, offsets[i])
//   quantize_int4/8  per group: s, z from min/max; codes nearest (INT4 packed low nibble first)
//                    or stochastic (u = philox_uniform(seed, row-major index))
//   dequantize_*     x~ = s (q - z)
//
// Tiling: quantize: one 256-thread block per group (strided over the group, min/max by warp
// shuffles and shared memory); dequantize and philox: one thread per element, grid-stride.
// DRAM traffic: the input read twice (min/max pass, then codes; the second read hits L1/L2 for
// groups of a few KB), codes once, scales and zeros once.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <cfloat>
#include <cstdint>

#include "lowrank/checks.h"
#include "lowrank/philox.h"
#include "lowrank/quant.h"
#include "registration.h"

namespace lowrank {
namespace {

constexpr int kThreads = 256;

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  return static_cast<float>(v);
}

// min and max over the block; every thread gets the result.
__device__ void block_min_max(float& lo, float& hi) {
  __shared__ float s_lo[kThreads / 32], s_hi[kThreads / 32];
  for (int delta = 16; delta > 0; delta /= 2) {
    lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, delta));
    hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, delta));
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    s_lo[warp] = lo;
    s_hi[warp] = hi;
  }
  __syncthreads();
  lo = s_lo[0];
  hi = s_hi[0];
  for (int w = 1; w < kThreads / 32; ++w) {
    lo = fminf(lo, s_lo[w]);
    hi = fmaxf(hi, s_hi[w]);
  }
}

template <typename scalar_t, bool kPackInt4>
__global__ void __launch_bounds__(kThreads)
    quantize_kernel(const scalar_t* __restrict__ x, uint8_t* __restrict__ codes,
                    float* __restrict__ scales, float* __restrict__ zeros, int64_t numel,
                    int64_t group_size, int max_code, bool stochastic, uint64_t philox_seed) {
  const int64_t group = blockIdx.x;
  const int64_t first = group * group_size;
  const int64_t len = min(group_size, numel - first);
  float lo = FLT_MAX, hi = -FLT_MAX;
  for (int64_t k = threadIdx.x; k < len; k += kThreads) {
    const float v = to_float(x[first + k]);
    lo = fminf(lo, v);
    hi = fmaxf(hi, v);
  }
  block_min_max(lo, hi);
  const GroupQuant p = group_quant_params(lo, hi, max_code);
  if (threadIdx.x == 0) {
    scales[group] = p.scale;
    zeros[group] = p.zero;
  }
  if (kPackInt4) {  // even group sizes: a group's pairs are whole bytes
    for (int64_t pair = threadIdx.x; 2 * pair < len; pair += kThreads) {
      const int64_t k = 2 * pair;
      const uint8_t low = quantize_nearest(to_float(x[first + k]), p, max_code);
      const uint8_t high =
          k + 1 < len ? quantize_nearest(to_float(x[first + k + 1]), p, max_code) : uint8_t{0};
      codes[(first + k) / 2] = pack_int4_pair(low, high);
    }
  } else {
    for (int64_t k = threadIdx.x; k < len; k += kThreads) {
      const float v = to_float(x[first + k]);
      codes[first + k] =
          stochastic ? quantize_stochastic(v, philox_uniform(philox_seed, first + k), p, max_code)
                     : quantize_nearest(v, p, max_code);
    }
  }
}

__global__ void dequantize_kernel(const uint8_t* __restrict__ codes,
                                  const float* __restrict__ scales,
                                  const float* __restrict__ zeros, float* __restrict__ out,
                                  int64_t numel, int64_t group_size, bool packed_int4) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < numel;
       i += int64_t{gridDim.x} * blockDim.x) {
    const uint8_t q = packed_int4 ? int4_code(codes, i) : codes[i];
    const int64_t g = i / group_size;
    out[i] = dequantize_code(q, GroupQuant{scales[g], zeros[g]});
  }
}

template <typename offset_t>
__global__ void philox_kernel(const offset_t* __restrict__ offsets, float* __restrict__ out,
                              int64_t numel, uint64_t seed) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < numel;
       i += int64_t{gridDim.x} * blockDim.x) {
    // As tl.rand: an int32 offset is its 32 bits with a zero high word.
    const uint64_t off = sizeof(offset_t) == 4
                             ? static_cast<uint64_t>(static_cast<uint32_t>(offsets[i]))
                             : static_cast<uint64_t>(offsets[i]);
    out[i] = philox_uniform(seed, off);
  }
}

unsigned elementwise_blocks(int64_t numel) {
  return static_cast<unsigned>(std::min<int64_t>((numel + kThreads - 1) / kThreads, 65535));
}

void check_cuda_input(const at::Tensor& t, const char* name) {
  LOWRANK_CHECK_VALUE(t.is_cuda(), name, ": expected a CUDA tensor, got ", t.device());
}

at::Tensor philox_uniform_cuda(int64_t seed, const at::Tensor& offsets) {
  LOWRANK_CHECK_VALUE(seed >= 0, "seed: expected a value in [0, 2^63 - 1], got ", seed);
  LOWRANK_CHECK_VALUE(offsets.scalar_type() == at::kLong || offsets.scalar_type() == at::kInt,
                    "offsets: expected dtype int64 or int32, got ", offsets.scalar_type());
  check_cuda_input(offsets, "offsets");
  const c10::cuda::CUDAGuard guard(offsets.device());
  const at::Tensor idx = offsets.contiguous();
  at::Tensor out = at::empty(idx.sizes(), idx.options().dtype(at::kFloat));
  const int64_t numel = idx.numel();
  if (numel == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (idx.scalar_type() == at::kLong) {
    philox_kernel<int64_t><<<elementwise_blocks(numel), kThreads, 0, stream>>>(
        idx.data_ptr<int64_t>(), out.data_ptr<float>(), numel, static_cast<uint64_t>(seed));
  } else {
    philox_kernel<int32_t><<<elementwise_blocks(numel), kThreads, 0, stream>>>(
        idx.data_ptr<int32_t>(), out.data_ptr<float>(), numel, static_cast<uint64_t>(seed));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_cuda(const at::Tensor& x,
                                                             int64_t group_size, bool pack_int4,
                                                             bool stochastic, int64_t seed) {
  LOWRANK_CHECK_VALUE(is_float_dtype(x.scalar_type()),
                    "x: expected dtype float32, bfloat16 or float16, got ", x.scalar_type());
  LOWRANK_CHECK_VALUE(x.numel() >= 1, "x: expected at least one element");
  check_cuda_input(x, "x");
  check_group_size(group_size, "group_size", pack_int4);
  check_rounding_seed(seed);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor src = x.contiguous();
  const int64_t numel = src.numel(), groups = num_groups(numel, group_size);
  at::Tensor codes = pack_int4 ? at::empty({(numel + 1) / 2}, src.options().dtype(at::kByte))
                               : at::empty(src.sizes(), src.options().dtype(at::kByte));
  const auto f32 = src.options().dtype(at::kFloat);
  at::Tensor scales = at::empty({groups}, f32), zeros = at::empty({groups}, f32);
  LOWRANK_CHECK_VALUE(groups <= 0x7fffffff, "x: too many groups for one launch");
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int max_code = pack_int4 ? kInt4MaxCode : kInt8MaxCode;
  const uint64_t philox_seed = rounding_philox_seed(seed, /*step=*/0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "quantize_cuda",
                                  [&] {
    if (pack_int4) {
      quantize_kernel<scalar_t, true><<<static_cast<unsigned>(groups), kThreads, 0, stream>>>(
          src.data_ptr<scalar_t>(), codes.data_ptr<uint8_t>(), scales.data_ptr<float>(),
          zeros.data_ptr<float>(), numel, group_size, max_code, false, philox_seed);
    } else {
      quantize_kernel<scalar_t, false><<<static_cast<unsigned>(groups), kThreads, 0, stream>>>(
          src.data_ptr<scalar_t>(), codes.data_ptr<uint8_t>(), scales.data_ptr<float>(),
          zeros.data_ptr<float>(), numel, group_size, max_code, stochastic, philox_seed);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {codes, scales, zeros};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_int4_cuda(const at::Tensor& x,
                                                                  int64_t group_size) {
  return quantize_cuda(x, group_size, /*pack_int4=*/true, false, 0);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_int8_cuda(const at::Tensor& x,
                                                                  int64_t group_size,
                                                                  bool stochastic, int64_t seed) {
  return quantize_cuda(x, group_size, /*pack_int4=*/false, stochastic, seed);
}

at::Tensor dequantize_cuda(const at::Tensor& codes, const at::Tensor& scales,
                           const at::Tensor& zeros, at::IntArrayRef shape, int64_t group_size,
                           bool packed_int4) {
  const c10::cuda::CUDAGuard guard(codes.device());
  at::Tensor out = at::empty(shape, codes.options().dtype(at::kFloat));
  const int64_t numel = out.numel();
  auto stream = c10::cuda::getCurrentCUDAStream();
  // read-only inputs of any stride: dense copies when strided
  const at::Tensor codes_c = codes.contiguous(), scales_c = scales.contiguous();
  const at::Tensor zeros_c = zeros.contiguous();
  dequantize_kernel<<<elementwise_blocks(numel), kThreads, 0, stream>>>(
      codes_c.data_ptr<uint8_t>(), scales_c.data_ptr<float>(), zeros_c.data_ptr<float>(),
      out.data_ptr<float>(), numel, group_size, packed_int4);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor dequantize_int4_cuda(const at::Tensor& packed, const at::Tensor& scales,
                                const at::Tensor& zeros, at::IntArrayRef shape,
                                int64_t group_size) {
  check_uint8(packed, "packed", "two INT4 codes per byte");
  check_group_size(group_size, "group_size", /*packed_int4=*/true);
  int64_t numel = 1;
  for (const int64_t d : shape) numel *= d;
  LOWRANK_CHECK_VALUE(numel >= 1, "shape: expected at least one element, got ", shape);
  LOWRANK_CHECK_VALUE(packed.dim() == 1 && packed.size(0) == (numel + 1) / 2,
                    "packed: expected shape [", (numel + 1) / 2, "] (ceil(", numel,
                    " / 2) bytes for shape ", shape_str(shape), "), got ",
                    shape_str(packed.sizes()));
  check_cuda_input(packed, "packed");
  check_group_params(scales, numel, group_size, packed.device(), "scales", "INT4 codes",
                     /*written=*/false);
  check_group_params(zeros, numel, group_size, packed.device(), "zeros", "INT4 codes",
                     /*written=*/false);
  return dequantize_cuda(packed, scales, zeros, shape, group_size, /*packed_int4=*/true);
}

at::Tensor dequantize_int8_cuda(const at::Tensor& codes, const at::Tensor& scales,
                                const at::Tensor& zeros, int64_t group_size) {
  check_uint8(codes, "codes", "INT8 codes");
  check_group_size(group_size, "group_size", /*packed_int4=*/false);
  LOWRANK_CHECK_VALUE(codes.numel() >= 1, "codes: expected at least one element");
  check_cuda_input(codes, "codes");
  check_group_params(scales, codes.numel(), group_size, codes.device(), "scales", "INT8 codes",
                     /*written=*/false);
  check_group_params(zeros, codes.numel(), group_size, codes.device(), "zeros", "INT8 codes",
                     /*written=*/false);
  const at::Tensor src = codes.contiguous();
  return dequantize_cuda(src, scales, zeros, src.sizes(), group_size, /*packed_int4=*/false);
}

void register_kernels(torch::Library& m) {
  m.impl("philox_uniform", &philox_uniform_cuda);
  m.impl("quantize_int4", &quantize_int4_cuda);
  m.impl("dequantize_int4", &dequantize_int4_cuda);
  m.impl("quantize_int8", &quantize_int8_cuda);
  m.impl("dequantize_int8", &dequantize_int8_cuda);
}

}  // namespace

LOWRANK_REGISTER_CUDA_KERNELS(register_kernels)

}  // namespace lowrank
