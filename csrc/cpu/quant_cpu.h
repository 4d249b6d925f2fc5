// CPU building blocks of the Q-GaLore formats, shared by csrc/cpu/quant.cpp (the standalone ops)
// and csrc/cpu/fused_galore_step.cpp (the INT4/INT8 step), so both round the same way.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "lowrank/adam.h"
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

// Hot loops of csrc/cpu/quant.cpp, with AVX2 versions chosen at run time (philox_uniform_chunk,
// dequantize_update_chunk) or at load time (stochastic_round_chunk, cloned):
// u[k] = philox_uniform(seed, first_offset + k).
void philox_uniform_chunk(uint64_t philox_seed, uint64_t first_offset, int64_t count, float* u);
// codes[k] = SR INT8 code of x[k] with u[k].
void stochastic_round_chunk(const float* x, const float* u, int64_t count, GroupQuant p,
                            uint8_t* codes);
// back_n[k] <- W'[k] = apply_update(s(q[k] - z), back_n[k]); widens [lo, hi] to cover W'.
void dequantize_update_chunk(const uint8_t* codes, GroupQuant p, const AdamCoeffs& c,
                             int64_t count, float* back_n, float& lo, float& hi);

// INT8 codes of one group by stochastic rounding; element k draws u at offset first_offset + k.
template <typename scalar_t>
void stochastic_round_group(const scalar_t* x, int64_t len, GroupQuant p, uint64_t philox_seed,
                            int64_t first_offset, uint8_t* codes) {
  float u[kUniformChunk];
  float x32[kUniformChunk];
  for (int64_t start = 0; start < len; start += kUniformChunk) {
    const int64_t count = std::min(kUniformChunk, len - start);
    philox_uniform_chunk(philox_seed, static_cast<uint64_t>(first_offset + start), count, u);
    const float* xs = nullptr;
    if constexpr (std::is_same_v<scalar_t, float>) {
      xs = x + start;
    } else {
      for (int64_t k = 0; k < count; ++k) x32[k] = static_cast<float>(x[start + k]);
      xs = x32;
    }
    stochastic_round_chunk(xs, u, count, p, codes + start);
  }
}

// The fp32 basis held by a packed INT4 buffer (rows x cols, row-major): the CPU GEMMs need a
// float operand, so the fused CPU step expands the r x d basis once per step (never m x n).
at::Tensor dequantize_int4_cpu(const at::Tensor& packed, const at::Tensor& scales,
                               const at::Tensor& zeros, at::IntArrayRef shape,
                               int64_t group_size);

}  // namespace lowrank
