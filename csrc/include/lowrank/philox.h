// Philox-4x32-10 uniform numbers with Triton's conventions, shared by the CPU and CUDA kernels so
// that every backend draws the SAME u for the same (seed, offset) as `tl.rand(seed, offset)`
// (triton/language/random.py; DESIGN.md §4.4). Tested bit for bit in tests/test_quant.py.
//
// Layout (as tl.rand): key = (low, high) 32-bit halves of the 64-bit seed; counter =
// (low, high halves of the offset, 0, 0); ten rounds; the first output word x becomes
// u = float(x' ) * 4.6566127342e-10f with x' = x as int32, bit-inverted when negative, so that
// u lies in [0, 1) after fp32 rounding.
#pragma once

#include <cstdint>

#include "lowrank/common.h"

namespace lowrank {

constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr int kPhiloxRounds = 10;
// The largest fp32 scale with (2^31 - 1) * scale < 1 after rounding (Triton's constant).
constexpr float kUint31ToUnit = 4.6566127342e-10f;

// Largest user seed of a stochastic-rounding stream and largest step: the per-step Philox seed
// (below) must stay a non-negative int64, the type Triton gives a Python int kernel argument.
constexpr int64_t kMaxRoundingSeed = (int64_t{1} << 32) - 1;
constexpr int64_t kMaxRoundingStep = (int64_t{1} << 31) - 1;

// The Philox seed of step `step` of a stream started with `seed` (both checked by the caller):
// key = (seed, step). step = 0 is the standalone quantize_int8(stochastic=True, seed) stream.
LOWRANK_HD uint64_t rounding_philox_seed(int64_t seed, int64_t step) {
  return static_cast<uint64_t>(seed) | (static_cast<uint64_t>(step) << 32);
}

LOWRANK_HD uint32_t mul_hi_u32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// The four 32-bit output words of Philox-4x32-10 at counter (low, high words of offset, 0, 0)
// under key `seed` (Triton's tl.randint4x(seed, offset)).
struct PhiloxQuad {
  uint32_t w0, w1, w2, w3;
};

LOWRANK_HD PhiloxQuad philox_uint32x4(uint64_t seed, uint64_t offset) {
  uint32_t c0 = static_cast<uint32_t>(offset);
  uint32_t c1 = static_cast<uint32_t>(offset >> 32);
  uint32_t c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const uint32_t prev_c0 = c0, prev_c2 = c2;
    c0 = mul_hi_u32(kPhiloxRoundB, prev_c2) ^ c1 ^ k0;
    c2 = mul_hi_u32(kPhiloxRoundA, prev_c0) ^ c3 ^ k1;
    c1 = kPhiloxRoundB * prev_c2;
    c3 = kPhiloxRoundA * prev_c0;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return {c0, c1, c2, c3};
}

// The first two words (tl.randint4x(seed, offset)[0:2]).
struct PhiloxPair {
  uint32_t first, second;
};

LOWRANK_HD PhiloxPair philox_uint32x2(uint64_t seed, uint64_t offset) {
  const PhiloxQuad q = philox_uint32x4(seed, offset);
  return {q.w0, q.w1};
}

// The first output word (tl.randint(seed, offset)).
LOWRANK_HD uint32_t philox_uint32(uint64_t seed, uint64_t offset) {
  return philox_uint32x2(seed, offset).first;
}

// Triton's uint_to_uniform_float for 32-bit words.
LOWRANK_HD float uint32_to_unit_float(uint32_t bits) {
  int32_t x = static_cast<int32_t>(bits);
  if (x < 0) x = ~x;
  return static_cast<float>(x) * kUint31ToUnit;
}

// u in [0, 1), equal bit for bit to tl.rand(seed, offset) with a 64-bit offset (a 32-bit offset
// in Triton equals the same non-negative value here).
LOWRANK_HD float philox_uniform(uint64_t seed, uint64_t offset) {
  return uint32_to_unit_float(philox_uint32(seed, offset));
}

}  // namespace lowrank
