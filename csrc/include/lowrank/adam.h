// Low-rank Adam arithmetic (DESIGN.md §4.2), shared by the CPU and CUDA kernels so that both run
// the same float operations in the same order.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "lowrank/common.h"
#include "lowrank/philox.h"

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
  // alpha_t itself (GradNormLoRP's per-row scale g takes an unscaled step: DESIGN.md §4.8)
  float step_size;
  // Philox key of the bf16 moments' stochastic rounding: rounding_philox_seed(seed, step).
  uint64_t state_philox_seed;
};

// seed: the op's stochastic-rounding seed (only rounded moments draw from it here).
// adagrad (DESIGN.md §4.10): the same loop runs AdaGrad with (beta1, 1-beta1, beta2, 1-beta2) =
// (0, 1, 1, 1) and M = 0 held in registers: M = 0*0 + 1*R = R and V = 1*V + (1*R)*R = V + R*R,
// exactly; its step size is lr (no bias correction; alpha_t above would be 0/0 at beta2 = 1).
inline AdamCoeffs make_adam_coeffs(double lr, double beta1, double beta2, double eps,
                                   double weight_decay, double scale, int64_t step,
                                   int64_t seed, bool adagrad = false) {
  if (adagrad) beta1 = 0.0, beta2 = 1.0;
  const double bias1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bias2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  const double alpha_t = adagrad ? lr : lr * std::sqrt(bias2) / bias1;
  const double decay = 1.0 - lr * weight_decay;
  AdamCoeffs c;
  c.beta1 = static_cast<float>(beta1);
  c.beta2 = static_cast<float>(beta2);
  c.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  c.one_minus_beta2 = adagrad ? 1.0f : static_cast<float>(1.0 - beta2);
  c.eps = static_cast<float>(eps);
  c.decay = static_cast<float>(decay);
  c.update_scale = static_cast<float>(decay * alpha_t * scale);
  c.step_size = static_cast<float>(alpha_t);
  c.state_philox_seed = rounding_philox_seed(seed, step);
  return c;
}

// One Adam moment update of a low-rank coordinate; returns N = M / (sqrt(V) + eps).
LOWRANK_HD float adam_normalized_update(float r, float& m, float& v, const AdamCoeffs& c) {
  m = c.beta1 * m + c.one_minus_beta1 * r;
  v = c.beta2 * v + c.one_minus_beta2 * r * r;
  return m / (sqrtf(v) + c.eps);
}

// ---- the factored second moment (DESIGN.md §4.12, reference.factored_normalized) ----
// V is held as r rank factors a_i and own line factors b_j (EMAs of the mean R^2 along the other
// axis); a kernel reduces them over the whole low-rank gradient first, then every element sees
// V_hat = a_i * c_j with c_j = b_j / max(mean(a), kFactoredFloor) (0/0 only when R was all 0).
constexpr float kFactoredFloor = 1e-30f;

// The EMA of one factor: x <- beta2 * x + (1 - beta2) * mean, mean the fp32 sum / count.
LOWRANK_HD float factored_ema(float x, float mean, const AdamCoeffs& c) {
  return c.beta2 * x + c.one_minus_beta2 * mean;
}

// M's update and N = M / (sqrt(V_hat) + eps) of one coordinate, V_hat = a_i * c_j given.
LOWRANK_HD float factored_normalized_update(float r, float& m, float v_hat,
                                            const AdamCoeffs& c) {
  m = c.beta1 * m + c.one_minus_beta1 * r;
  return m / (sqrtf(v_hat) + c.eps);
}

// ---- bf16 moments: stochastic rounding (DESIGN.md §4.2 allows bf16 M, V) ----
// Rounding a moment to the nearest bf16 loses every change below half an ulp (2^-9 to 2^-8 of
// the value): with beta2 = 0.999, V <- 0.999 V + 0.001 R^2 moves V by less than that whenever
// R^2 < 2.95 V, so a nearest-rounded V never decays. Stored bf16 moments are therefore rounded
// stochastically: |x| is rounded up with probability (its 16 dropped bits) / 2^16, from a
// Philox word, which makes E[stored] = x exactly. Words of element `index` (row-major in M and
// V): one Philox call at counter (index, 1, 0, 0) under key state_philox_seed, the first output
// word for M, the second for V (Triton: tl.randint4x(key, index + 2**32)); the INT8 weights'
// stream has counter word 1 = 0 (distinct for weights below 2^32 elements, i.e. all of them in
// practice: LLaMA-70B's largest is 2^28).
constexpr uint64_t kMomentStream = uint64_t{1} << 32;

LOWRANK_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits;
#endif
}

LOWRANK_HD float float_from_bits(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float x;
  std::memcpy(&x, &bits, sizeof(x));
  return x;
#endif
}

// The bf16 bits of x rounded stochastically with the 32-bit random word `word` (its top 16 bits
// are added to the 16 bits that rounding drops; the carry, if any, rounds |x| up). NaN stays a
// (quiet) NaN; infinities stay; a finite x within an ulp of the bf16 range may round to inf.
LOWRANK_HD uint16_t stochastic_round_bf16_bits(float x, uint32_t word) {
  if (x != x) return 0x7FC0u;
  return static_cast<uint16_t>((float_bits(x) + (word >> 16)) >> 16);
}

// The Philox words that round M (first) and V (second) of element `index`.
LOWRANK_HD PhiloxPair moment_words(const AdamCoeffs& c, int64_t index) {
  return philox_uint32x2(c.state_philox_seed, static_cast<uint64_t>(index) + kMomentStream);
}

// The bf16 bits M and V are stored as, from their element's moment_words.
struct MomentBits {
  uint16_t exp_avg, exp_avg_sq;
};

LOWRANK_HD MomentBits stochastic_round_moments(float m, float v, PhiloxPair words) {
  return {stochastic_round_bf16_bits(m, words.first),
          stochastic_round_bf16_bits(v, words.second)};
}

// The weight update with decay folded in: W' = decay*W - update_scale*back(N).
LOWRANK_HD float apply_update(float w, float back_n, const AdamCoeffs& c) {
  return c.decay * w - c.update_scale * back_n;
}

}  // namespace lowrank
