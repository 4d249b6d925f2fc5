// APOLLO's generated Gaussian basis (DESIGN.md §4.7; lowrank_kernels/reference.py random_basis):
// N(0, 1/r) values from Philox-4x32-10 keyed by (seed, refresh count), Box-Muller with Cephes'
// single-precision log and octant polynomials. Every operation is IEEE-exact (+ - * /, sqrt,
// integer and bit operations, comparisons) in the order the reference writes it, and the build
// passes -ffp-contract=off (no FMA), so this header, the reference and the Triton kernel
// (triton_kernels/random_basis.py, enable_fp_fusion=False) produce the same bits.
//
// Element (k, i) of the rank x d basis: Philox call under key rounding_philox_seed(seed, refresh)
// at counter (k * ceil(d/4) + floor(i/4), 2, 0, 0); lane i mod 4 takes the cos (even lane) or sin
// (odd lane) value of the pair (w0, w1) (lanes 0, 1) or (w2, w3) (lanes 2, 3); divided by
// sqrt(fp32(rank)).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "lowrank/adam.h"  // float_bits, float_from_bits
#include "lowrank/common.h"
#include "lowrank/philox.h"

namespace lowrank {

// Counter word 1 = 2: a stream apart from the INT8 weights' (0) and the moments' (1).
constexpr uint64_t kBasisStream = uint64_t{2} << 32;

// Constants enter as the reference's fp32 roundings of Python doubles (static_cast of the double
// literal, never a float literal, which rounds the decimal directly and may differ by an ulp).
// ln(k * 2^exponent) for integers 1 <= k <= 2^24: frexp by bits, Cephes' logf (reference.py
// log_of_units).
LOWRANK_HD float log_of_units(uint32_t k, int32_t exponent) {
  const uint32_t bits = float_bits(static_cast<float>(k));  // exact
  int32_t e = static_cast<int32_t>((bits >> 23) & 0xFFu) - 126;
  const float f = float_from_bits((bits & 0x807FFFFFu) | 0x3F000000u);
  float x;
  if (f < static_cast<float>(0.70710678118654752440)) {
    e -= 1;
    x = (f + f) - 1.0f;
  } else {
    x = f - 1.0f;
  }
  const float z = x * x;
  float y = static_cast<float>(7.0376836292e-2);
  y = y * x + static_cast<float>(-1.1514610310e-1);
  y = y * x + static_cast<float>(1.1676998740e-1);
  y = y * x + static_cast<float>(-1.2420140846e-1);
  y = y * x + static_cast<float>(1.4249322787e-1);
  y = y * x + static_cast<float>(-1.6668057665e-1);
  y = y * x + static_cast<float>(2.0000714765e-1);
  y = y * x + static_cast<float>(-2.4999993993e-1);
  y = y * x + static_cast<float>(3.3333331174e-1);
  y = (y * x) * z;
  const float big_e = static_cast<float>(e + exponent);
  y = y + static_cast<float>(-2.12194440e-4) * big_e;
  y = y + -0.5f * z;
  x = x + y;
  return x + 0.693359375f * big_e;
}

// (cos x, sin x) for x in [0, pi/4]: Cephes' octant polynomials (reference.py cos_sin_octant).
LOWRANK_HD void cos_sin_octant(float x, float& cos_x, float& sin_x) {
  const float z = x * x;
  sin_x = x + (x * z) * ((static_cast<float>(-1.9515295891e-4) * z +
                          static_cast<float>(8.3321608736e-3)) * z -
                         static_cast<float>(1.6666654611e-1));
  cos_x = (1.0f - 0.5f * z) + (z * z) * ((static_cast<float>(2.443315711809948e-5) * z -
                                          static_cast<float>(1.388731625493765e-3)) * z +
                                         static_cast<float>(4.166664568298827e-2));
}

// (cos theta, sin theta) of theta = 2 pi t / 2^24, 0 <= t < 2^24: quadrant and octant folding in
// integers, one rounding of the octant angle (reference.py cos_sin_turn).
LOWRANK_HD void cos_sin_turn(uint32_t t, float& cos_t, float& sin_t) {
  constexpr uint32_t kQuarterTurn = uint32_t{1} << 22;
  const uint32_t quadrant = t >> 22;
  const uint32_t rem = t & (kQuarterTurn - 1);
  const bool upper = 2 * rem > kQuarterTurn;
  const uint32_t folded = upper ? kQuarterTurn - rem : rem;
  const float angle = static_cast<float>(folded) *
                      static_cast<float>(3.14159265358979323846 / 2 / kQuarterTurn);
  float cos_oct, sin_oct;
  cos_sin_octant(angle, cos_oct, sin_oct);
  const float cos_phi = upper ? sin_oct : cos_oct;
  const float sin_phi = upper ? cos_oct : sin_oct;
  switch (quadrant) {
    case 0: cos_t = cos_phi; sin_t = sin_phi; break;
    case 1: cos_t = -sin_phi; sin_t = cos_phi; break;
    case 2: cos_t = -cos_phi; sin_t = -sin_phi; break;
    default: cos_t = sin_phi; sin_t = -cos_phi; break;
  }
}

// Two N(0, 1) values from two 32-bit words by Box-Muller: u = (w_r >> 8) + 1) 2^-24 in (0, 1],
// theta = 2 pi (w_theta >> 8) 2^-24, rho = sqrt(-2 ln u) (reference.py gaussian_pair).
LOWRANK_HD void gaussian_pair(uint32_t radius_word, uint32_t angle_word, float& first,
                              float& second) {
  const float log_u = log_of_units((radius_word >> 8) + 1, -24);
  const float radius = sqrtf(-2.0f * log_u);
  float cos_t, sin_t;
  cos_sin_turn(angle_word >> 8, cos_t, sin_t);
  first = radius * cos_t;
  second = radius * sin_t;
}

// The four values of one Philox call of a basis row: out[lane] for lanes 0..3, before the
// 1/sqrt(r) scaling.
LOWRANK_HD void gaussian_quad(uint64_t philox_seed, uint64_t call, float out[4]) {
  const PhiloxQuad w = philox_uint32x4(philox_seed, call + kBasisStream);
  gaussian_pair(w.w0, w.w1, out[0], out[1]);
  gaussian_pair(w.w2, w.w3, out[2], out[3]);
}

}  // namespace lowrank
