// Asymmetric group quantization of Q-GaLore (DESIGN.md §4.3-§4.4), shared by the CPU and CUDA
// kernels so that every backend computes the same scale, zero and code in the same fp32 order
// as q-galore-torch's quantizer:
//
//   s = max(max - min, 1e-5) / (2^b - 1)     z = clamp(-round(min / s), 0, 2^b - 1)
//   q = clamp(round(x / s) + z, 0, 2^b - 1)  (nearest, ties to even: torch.round)
//   q = clamp(SR(x / s) + z, 0, 2^b - 1)     SR(y) = floor(y) + [u < y - floor(y)]
//   x~ = s * (q - z)
//
// Layout: a group is `group_size` consecutive elements of the row-major (flattened) tensor; the
// last group may be partial, groups may straddle rows. s and z are fp32, one per group. INT4
// codes are packed two per byte: element 2k in the low nibble, 2k + 1 in the high nibble.
#pragma once

#include <cmath>
#include <cstdint>

#include "lowrank/common.h"

namespace lowrank {

constexpr int kInt4MaxCode = 15;
constexpr int kInt8MaxCode = 255;
constexpr float kMinQuantRange = 1e-5f;

struct GroupQuant {
  float scale;
  float zero;
};

// Round to nearest, ties to even (torch.round) and floor, exact for every float. The host
// versions are branch-free (the magic-number rounding is exact below 2^23, above which every
// float is an integer) so that the CPU loops vectorise without calls into libm.
LOWRANK_HD float round_half_even(float y) {
#if defined(__CUDA_ARCH__)
  return rintf(y);
#else
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23
  const float rounded = (y + kMagic) - kMagic;
  return std::fabs(y) < 8388608.0f ? rounded : y;
#endif
}

LOWRANK_HD float floor_exact(float y) {
#if defined(__CUDA_ARCH__)
  return floorf(y);
#else
  const float rounded = round_half_even(y);
  return rounded - (rounded > y ? 1.0f : 0.0f);
#endif
}

LOWRANK_HD float clamp_code(float q, int max_code) {
  const float top = static_cast<float>(max_code);
#if defined(__CUDA_ARCH__)
  return fminf(fmaxf(q, 0.0f), top);
#else
  const float low_clamped = q > 0.0f ? q : 0.0f;
  return low_clamped < top ? low_clamped : top;
#endif
}

// Scale and zero of a group whose values span [lo, hi].
LOWRANK_HD GroupQuant group_quant_params(float lo, float hi, int max_code) {
  GroupQuant p;
  p.scale = fmaxf(hi - lo, kMinQuantRange) / static_cast<float>(max_code);
  p.zero = clamp_code(-round_half_even(lo / p.scale), max_code);
  return p;
}

// Round-to-nearest code of x.
LOWRANK_HD uint8_t quantize_nearest(float x, GroupQuant p, int max_code) {
  const float code = clamp_code(round_half_even(x / p.scale) + p.zero, max_code);
  return static_cast<uint8_t>(static_cast<int32_t>(code));
}

// Stochastic-rounding code of x given u in [0, 1): rounds up with probability frac(x / s), so
// that E[x~] = x for x inside the group's range (unbiased, unlike a rounding done in bf16).
LOWRANK_HD uint8_t quantize_stochastic(float x, float u, GroupQuant p, int max_code) {
  const float y = x / p.scale;
  const float down = floor_exact(y);
  const float rounded = down + (u < y - down ? 1.0f : 0.0f);
  return static_cast<uint8_t>(static_cast<int32_t>(clamp_code(rounded + p.zero, max_code)));
}

LOWRANK_HD float dequantize_code(uint8_t q, GroupQuant p) {
  return p.scale * (static_cast<float>(q) - p.zero);
}

// Code k of a packed INT4 buffer.
LOWRANK_HD uint8_t int4_code(const uint8_t* packed, int64_t k) {
  const uint8_t byte = packed[k >> 1];
  return (k & 1) ? static_cast<uint8_t>(byte >> 4) : static_cast<uint8_t>(byte & 0x0F);
}

LOWRANK_HD uint8_t pack_int4_pair(uint8_t low, uint8_t high) {
  return static_cast<uint8_t>((low & 0x0F) | ((high & 0x0F) << 4));
}

LOWRANK_HD int64_t num_groups(int64_t numel, int64_t group_size) {
  return (numel + group_size - 1) / group_size;
}

}  // namespace lowrank
