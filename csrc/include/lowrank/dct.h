// Orthonormal DCT-II basis values (DESIGN.md §4.5), shared by the CPU and CUDA kernels so that a
// basis generated on the fly on either device holds the same floats:
//
//   C[k, i] = c_k * cos(pi * (2i + 1) * k / (2d)),   c_0 = sqrt(1/d),  c_k = sqrt(2/d) (k > 0).
//
// The angle is reduced in integers before any float arithmetic: (2i+1)k mod 4d selects the quadrant
// exactly, and only the remainder phi = pi * rem / (2d) in [0, pi/2) is rounded to float. A direct
// cosf(pi * (2i+1) * k / (2d)) would lose ~log2((2i+1)k) bits of the angle (up to ~28 bits at
// d = 16384), while this form keeps every value within a few fp32 ulps for any d < 2^31.
#pragma once

#include <cmath>
#include <cstdint>

#include "lowrank/common.h"

namespace lowrank {

// c_k: the orthonormal scale of frequency k.
LOWRANK_HD float dct_scale(int64_t k, int64_t d) {
  return k == 0 ? sqrtf(1.0f / static_cast<float>(d)) : sqrtf(2.0f / static_cast<float>(d));
}

// cos(pi * j / (2d)) for a phase already reduced to [0, 4d): the quadrant by comparisons, so that
// GPU kernels that advance phases incrementally pay no integer division.
LOWRANK_HD float dct_cos_reduced_phase(int64_t j, int64_t d) {
  const int64_t quadrant = (j >= d) + (j >= 2 * d) + (j >= 3 * d);
  const float step = 1.5707963267948966f / static_cast<float>(d);  // pi / (2d)
  const float phi = static_cast<float>(j - quadrant * d) * step;
  switch (quadrant) {
    case 0: return cosf(phi);
    case 1: return -sinf(phi);
    case 2: return -cosf(phi);
    default: return sinf(phi);
  }
}

// cos(pi * j / (2d)) for an integer phase j >= 0, exact quadrant selection.
LOWRANK_HD float dct_cos_phase(int64_t j, int64_t d) {
  return dct_cos_reduced_phase(j % (4 * d), d);
}

// sin(pi * j / (2d)) = cos(pi * (j - d) / (2d)) for a phase in [0, 4d).
LOWRANK_HD float dct_sin_reduced_phase(int64_t j, int64_t d) {
  return dct_cos_reduced_phase(j >= d ? j - d : j + 3 * d, d);
}

// C[k, i] of the orthonormal DCT-II basis of size d (0 <= k, i < d).
LOWRANK_HD float dct_basis_value(int64_t k, int64_t i, int64_t d) {
  // (2i+1)k < 2d^2: reduce each factor first so the product fits int64 for any d < 2^31.
  const int64_t period = 4 * d;
  const int64_t phase = ((2 * i + 1) % period) * (k % period) % period;
  return dct_scale(k, d) * dct_cos_phase(phase, d);
}

}  // namespace lowrank
