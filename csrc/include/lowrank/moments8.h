// 8-bit moments (DESIGN.md §4.9, reference.quantize_moment): blockwise-scaled FP8-like codes
// with stochastic rounding, shared by the CPU kernel (and any CUDA port) so that every backend
// runs the same IEEE operations and stores the same codes.
//
// A block is B = state_block_size consecutive elements along the rank axis of one own-line (row
// i of the m x r state on the right side, column j of the r x n state on the left); its fp32
// scale is s = max|x| / max_value. M is stored as int8 +-c, c the E4M3 code of |M|/s (max 480);
// V as uint8 c, the unsigned E4M4 code of sqrt(V)/s (max 496), loaded as V = (value*s)^2, and a
// positive V is never stored as code 0. Encode: e = max(floor(log2 y), -6) from y's exponent
// bits, z = y * 2^(mb - e) (exact), k = floor(z) + [u < z - floor(z)] with u = (word >> 8) * 2^-24,
// c = 2^mb (e + 6) + k. Decode: f = max(c >> mb, 1), value = (c - 2^mb (f - 1)) * 2^(f - 7 - mb)
// (exact), times s (rounded once). Only the two divisions (scale, y) and the products with s round.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "lowrank/adam.h"

namespace lowrank {

struct MomentFormat {
  int mantissa_bits;
  float max_value;  // (2^(mb+1) - 1) * 2^(8 - mb)
};
constexpr MomentFormat kExpAvgFormat{3, 480.0f};    // E4M3 of |M|, sign apart: int8 +-c
constexpr MomentFormat kExpAvgSqFormat{4, 496.0f};  // unsigned E4M4 of sqrt(V): uint8 c
constexpr int kMinNormalExponent = -6;

// 2^e for e in the normal range, from its bits (exact).
LOWRANK_HD float power_of_two(int e) {
  return float_from_bits(static_cast<uint32_t>(e + 127) << 23);
}

// The code of a magnitude 0 <= y <= max_value, rounded stochastically with `word`. Branch-free
// 32-bit integer and float lanes (the CPU loops vectorize it): z < 2^(mb+1), so int32 is wide.
LOWRANK_HD int32_t fp8_encode(float y, uint32_t word, int mantissa_bits) {
  int32_t e = static_cast<int32_t>((float_bits(y) >> 23) & 0xFFu) - 127;
  e = e < kMinNormalExponent ? kMinNormalExponent : e;
  const float z = y * power_of_two(mantissa_bits - e);
  const float down = floorf(z);
  const float u = static_cast<float>(static_cast<int32_t>(word >> 8)) *
                  5.9604644775390625e-08f;  // * 2^-24, exact
  const int32_t k = static_cast<int32_t>(down) + (u < z - down ? 1 : 0);
  return ((e - kMinNormalExponent) << mantissa_bits) + k;
}

// The exact value of a code (before the block scale).
LOWRANK_HD float fp8_decode(int32_t code, int mantissa_bits) {
  int32_t field = code >> mantissa_bits;
  field = field < 1 ? 1 : field;
  const int32_t mantissa = code - ((field - 1) << mantissa_bits);
  return static_cast<float>(mantissa) * power_of_two(field - 7 - mantissa_bits);
}

// The running max of magnitudes |x| >= 0 of a block, NaN-propagating (a NaN anywhere makes the
// scale NaN and the block decode to NaN, as torch.amax does in the reference).
LOWRANK_HD float absmax_step(float running, float magnitude) {
  return (magnitude > running || magnitude != magnitude) ? magnitude : running;
}

// y = min(|x| / s, max_value), or 0 where s is not a positive finite number (branch-free).
LOWRANK_HD float scaled_magnitude(float magnitude, float scale, float max_value) {
  const bool usable = scale > 0.0f && scale <= 3.4028234663852886e+38f;
  const float y = magnitude / (usable ? scale : 1.0f);
  return usable ? (y < max_value ? y : max_value) : 0.0f;
}

LOWRANK_HD int8_t encode_exp_avg(float m, float scale, uint32_t word) {
  const int32_t c = fp8_encode(scaled_magnitude(fabsf(m), scale, kExpAvgFormat.max_value), word,
                               kExpAvgFormat.mantissa_bits);
  return static_cast<int8_t>(m < 0.0f ? -c : c);
}

// `root` = sqrt(V); a positive root never gets code 0.
LOWRANK_HD uint8_t encode_exp_avg_sq(float root, float scale, uint32_t word) {
  int32_t c = fp8_encode(scaled_magnitude(root, scale, kExpAvgSqFormat.max_value), word,
                         kExpAvgSqFormat.mantissa_bits);
  c = (root > 0.0f && c == 0) ? 1 : c;
  return static_cast<uint8_t>(c);
}

LOWRANK_HD float decode_exp_avg(int8_t code, float scale) {
  const int32_t c = code;
  const float value = fp8_decode(c < 0 ? -c : c, kExpAvgFormat.mantissa_bits) * scale;
  return c < 0 ? -value : value;
}

// V itself (the code holds sqrt(V)).
LOWRANK_HD float decode_exp_avg_sq(uint8_t code, float scale) {
  const float root = fp8_decode(code, kExpAvgSqFormat.mantissa_bits) * scale;
  return root * root;
}

}  // namespace lowrank
