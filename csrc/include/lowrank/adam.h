// Low-rank Adam arithmetic (DESIGN.md §4.2), shared by the CPU and CUDA kernels so that both run
// the same float operations in the same order.
#pragma once

#include <cmath>
#include <cstdint>

#include "lowrank/common.h"

namespace lowrank {

// Per-step scalars, computed once on the host in double and rounded to float once.
struct AdamCoeffs {
  float beta1, beta2;
  float one_minus_beta1, one_minus_beta2;
  float eps;
  // W' = decay * W - update_scale * back(N), the folded form of
  // W' = (1 - lr*wd) * (W - alpha_t*scale*back(N)), alpha_t = lr*sqrt(1-beta2^t)/(1-beta1^t).
  float decay;
  float update_scale;
};

inline AdamCoeffs make_adam_coeffs(double lr, double beta1, double beta2, double eps,
                                   double weight_decay, double scale, int64_t step) {
  const double bias1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bias2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  const double alpha_t = lr * std::sqrt(bias2) / bias1;
  const double decay = 1.0 - lr * weight_decay;
  AdamCoeffs c;
  c.beta1 = static_cast<float>(beta1);
  c.beta2 = static_cast<float>(beta2);
  c.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  c.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  c.eps = static_cast<float>(eps);
  c.decay = static_cast<float>(decay);
  c.update_scale = static_cast<float>(decay * alpha_t * scale);
  return c;
}

// One Adam moment update of a low-rank coordinate; returns N = M / (sqrt(V) + eps).
LOWRANK_HD float adam_normalized_update(float r, float& m, float& v, const AdamCoeffs& c) {
  m = c.beta1 * m + c.one_minus_beta1 * r;
  v = c.beta2 * v + c.one_minus_beta2 * r * r;
  return m / (sqrtf(v) + c.eps);
}

// The weight update with decay folded in: W' = decay*W - update_scale*back(N).
LOWRANK_HD float apply_update(float w, float back_n, const AdamCoeffs& c) {
  return c.decay * w - c.update_scale * back_n;
}

}  // namespace lowrank
