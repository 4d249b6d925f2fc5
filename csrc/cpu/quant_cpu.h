// CPU building blocks of the Q-GaLore formats, shared by csrc/cpu/quant.cpp (the standalone ops)
// and csrc/cpu/fused_galore_step.cpp (the INT4/INT8 step), so both round the same way.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "lowrank/philox.h"
#include "lowrank/quant.h"

namespace lowrank {

// Elements per chunk of uniforms drawn before they are used: small enough to stay in L1, large
// enough for the Philox loop to vectorise.
constexpr int64_t kUniformChunk = 256;

template <typename scalar_t>
void group_min_max(const scalar_t* x, int64_t len, float& lo, float& hi) {
  lo = std::numeric_limits<float>::infinity();
  hi = -std::numeric_limits<float>::infinity();
  for (int64_t k = 0; k < len; ++k) {
    const float v = static_cast<float>(x[k]);
    lo = std::min(lo, v);
    hi = std::max(hi, v);
  }
}

// INT8 codes of one group by stochastic rounding; element k draws u at offset first_offset + k.
template <typename scalar_t>
void stochastic_round_group(const scalar_t* x, int64_t len, GroupQuant p, uint64_t philox_seed,
                            int64_t first_offset, uint8_t* codes) {
  float u[kUniformChunk];
  for (int64_t start = 0; start < len; start += kUniformChunk) {
    const int64_t count = std::min(kUniformChunk, len - start);
    const uint64_t base = static_cast<uint64_t>(first_offset + start);
    for (int64_t k = 0; k < count; ++k) u[k] = philox_uniform(philox_seed, base + k);
    for (int64_t k = 0; k < count; ++k) {
      codes[start + k] =
          quantize_stochastic(static_cast<float>(x[start + k]), u[k], p, kInt8MaxCode);
    }
  }
}

// The fp32 basis held by a packed INT4 buffer (rows x cols, row-major): the CPU GEMMs need a
// float operand, so the fused CPU step expands the r x d basis once per step (never m x n).
at::Tensor dequantize_int4_cpu(const at::Tensor& packed, const at::Tensor& scales,
                               const at::Tensor& zeros, at::IntArrayRef shape,
                               int64_t group_size);

}  // namespace lowrank
