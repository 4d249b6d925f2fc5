// Tensor-core building blocks of the CUDA fused step, shared by csrc/cuda/fused_galore_step.cu
// (the general path, the one verified on a GPU) and csrc/experimental/fused_galore_step_fast16.cu
// (opt-in build): scalar conversions, the mma.sync kinds and the two epilogues.
#pragma once

#include <ATen/ATen.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "lowrank/adam.h"
#include "lowrank/checks.h"

// Runtime dtype -> compile-time type (flash-attention style): each body is a plain template.
#define LOWRANK_FLOAT_SWITCH(DTYPE, TYPE, ...)                                   \
  [&] {                                                                          \
    switch (DTYPE) {                                                             \
      case at::kFloat: {                                                         \
        using TYPE = float;                                                      \
        return __VA_ARGS__();                                                    \
      }                                                                          \
      case at::kBFloat16: {                                                      \
        using TYPE = __nv_bfloat16;                                              \
        return __VA_ARGS__();                                                    \
      }                                                                          \
      case at::kHalf: {                                                          \
        using TYPE = __half;                                                     \
        return __VA_ARGS__();                                                    \
      }                                                                          \
      default:                                                                   \
        LOWRANK_CHECK_VALUE(false, "unsupported floating dtype ", DTYPE);          \
    }                                                                            \
  }()


namespace lowrank {
namespace {

// ---------------------------------------------------------------------------------------------
// scalar conversions
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// ---------------------------------------------------------------------------------------------
// tensor-core MMA kinds: bf16/fp16 m16n8k16 and tf32 m16n8k8, fp32 accumulators
// ---------------------------------------------------------------------------------------------
enum class MmaKind { kBF16, kF16, kTF32 };

template <typename T>
struct KindOf;
template <>
struct KindOf<float> { static constexpr MmaKind value = MmaKind::kTF32; };
template <>
struct KindOf<__nv_bfloat16> { static constexpr MmaKind value = MmaKind::kBF16; };
template <>
struct KindOf<__half> { static constexpr MmaKind value = MmaKind::kF16; };

template <MmaKind K>
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (K == MmaKind::kBF16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else if constexpr (K == MmaKind::kF16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

// ---------------------------------------------------------------------------------------------
// epilogues
// ---------------------------------------------------------------------------------------------
// Kernel 1: C = R; M, V and the N workspace share R's row-major layout (ld = N of the GEMM).
// N is stored in the type launch 2 multiplies it in (TN): fp32 (general path), or W's 16-bit
// type (experimental 16-bit path), rounded once here.
template <typename TN>
struct AdamEpilogue {
  void* exp_avg;
  void* exp_avg_sq;
  TN* normalized;
  int64_t ld;
  bool state_bf16;
  AdamCoeffs coeffs;

  __device__ __forceinline__ void operator()(int i, int j, float r) const {
    const int64_t idx = i * ld + j;
    float m, v;
    if (state_bf16) {
      m = __bfloat162float(static_cast<const __nv_bfloat16*>(exp_avg)[idx]);
      v = __bfloat162float(static_cast<const __nv_bfloat16*>(exp_avg_sq)[idx]);
    } else {
      m = static_cast<const float*>(exp_avg)[idx];
      v = static_cast<const float*>(exp_avg_sq)[idx];
    }
    normalized[idx] = from_float<TN>(adam_normalized_update(r, m, v, coeffs));
    store_moments(idx, m, v);
  }

  // M and V of element idx in their dtype: fp32, or bf16 rounded stochastically (adam.h).
  __device__ __forceinline__ void store_moments(int64_t idx, float m, float v) const {
    if (state_bf16) {
      const MomentBits bits = stochastic_round_moments(m, v, moment_words(coeffs, idx));
      static_cast<__nv_bfloat16*>(exp_avg)[idx] = __ushort_as_bfloat16(bits.exp_avg);
      static_cast<__nv_bfloat16*>(exp_avg_sq)[idx] = __ushort_as_bfloat16(bits.exp_avg_sq);
    } else {
      static_cast<float*>(exp_avg)[idx] = m;
      static_cast<float*>(exp_avg_sq)[idx] = v;
    }
  }
};

// Kernel 2: C = back(N); W' = decay*W - us*C, rounded once to W's dtype.
template <typename TW>
struct UpdateEpilogue {
  TW* weight;
  int64_t ld;
  AdamCoeffs coeffs;

  __device__ __forceinline__ void operator()(int i, int j, float back_n) const {
    TW& w = weight[i * ld + j];
    w = from_float<TW>(apply_update(to_float(w), back_n, coeffs));
  }
};

}  // namespace
}  // namespace lowrank
