// Argument validation shared by every C++ entry point (CPU and CUDA). Each failure names the
// argument and the value expected, and runs before any tensor is written.
// Host-only (ATen); lowrank_kernels/_checks.py (the fake kernels, the Triton launchers and the
// reference path) mirrors these messages.
// Layout rule: tensors written in place (param, exp_avg, exp_avg_sq, param_scales/zeros) must be
// dense row-major (check_contiguous); read-only inputs (grad, proj, proj_scales/zeros, indices,
// packed codes) may have any strides, as other libraries hold them (a galore-torch basis is a
// strided SVD output, a gradient may be a transposed view): kernels read them through their
// strides or copy a small (basis-sized, never m x n on a default path) operand.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <type_traits>
#include <optional>
#include <string>
#include <vector>

namespace lowrank {

// "[a, b]" for error messages.
inline std::string shape_str(at::IntArrayRef shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    out += (i ? ", " : "") + std::to_string(shape[i]);
  }
  return out + "]";
}

// Error messages are built here as one std::string, never through std::ostream: with torch 2.11
// on the H100 image, c10::str's stream formatting of integers (and of ArrayRef) instantiated in
// this extension crashed (cuda-gdb: SIGSEGV inside c10::detail::_str) instead of raising.
inline void append_message(std::string& out, const char* s) { out += s; }
inline void append_message(std::string& out, const std::string& s) { out += s; }
inline void append_message(std::string& out, at::IntArrayRef shape) { out += shape_str(shape); }
inline void append_message(std::string& out, at::ScalarType t) { out += c10::toString(t); }
inline void append_message(std::string& out, const at::Device& d) { out += d.str(); }
inline void append_message(std::string& out, bool b) { out += b ? "true" : "false"; }
template <typename T, std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool>, int> = 0>
inline void append_message(std::string& out, T v) { out += std::to_string(v); }
template <typename T, std::enable_if_t<std::is_floating_point_v<T>, int> = 0>
inline void append_message(std::string& out, T v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", static_cast<double>(v));
  out += buf;
}

template <typename... Args>
std::string message(const Args&... args) {
  std::string out;
  (append_message(out, args), ...);
  return out;
}

}  // namespace lowrank

// TORCH_CHECK_VALUE / TORCH_CHECK with the message built by lowrank::message (no std::ostream).
#define LOWRANK_CHECK_VALUE(cond, ...) TORCH_CHECK_VALUE(cond, ::lowrank::message(__VA_ARGS__))
#define LOWRANK_CHECK(cond, ...) TORCH_CHECK(cond, ::lowrank::message(__VA_ARGS__))
#define LOWRANK_CHECK_NOT_IMPLEMENTED(cond, ...) \
  TORCH_CHECK_NOT_IMPLEMENTED(cond, ::lowrank::message(__VA_ARGS__))

namespace lowrank {

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

inline void check_float_matrix(const at::Tensor& t, const char* name) {
  LOWRANK_CHECK_VALUE(t.dim() == 2, name, ": expected a 2-D tensor, got ", t.dim(), "-D");
  LOWRANK_CHECK_VALUE(is_float_dtype(t.scalar_type()), name,
                    ": expected dtype float32, bfloat16 or float16, got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  LOWRANK_CHECK_VALUE(t.device() == ref.device(), name, ": expected device ", ref.device(),
                    " (that of param), got ", t.device());
}

inline void check_contiguous(const at::Tensor& t, const char* name) {
  LOWRANK_CHECK_VALUE(t.is_contiguous(), name,
                    ": expected a contiguous (row-major) tensor; call .contiguous() first");
}

// Shape facts of one fused step, derived from (param, proj) by the side rule of DESIGN.md §4.1.
struct StepGeometry {
  int64_t m, n, r;
  bool right;  // m >= n: R = G Q^T (m x r); else R = P^T G (r x n)
  std::vector<int64_t> low_rank_shape() const {
    return right ? std::vector<int64_t>{m, r} : std::vector<int64_t>{r, n};
  }
};

inline StepGeometry check_dense_projection(int64_t m, int64_t n, const at::Tensor& proj) {
  check_float_matrix(proj, "proj");
  StepGeometry g{m, n, 0, m >= n};
  if (g.right) {
    LOWRANK_CHECK_VALUE(proj.size(1) == n, "proj: expected shape (r, n=", n,
                      ") for a right projection (m >= n), got ", shape_str(proj.sizes()));
    g.r = proj.size(0);
  } else {
    LOWRANK_CHECK_VALUE(proj.size(0) == m, "proj: expected shape (m=", m,
                      ", r) for a left projection (m < n), got ", shape_str(proj.sizes()));
    g.r = proj.size(1);
  }
  LOWRANK_CHECK_VALUE(g.r >= 1 && g.r <= std::min(m, n), "proj: rank r=", g.r,
                    " must lie in [1, min(m, n)=", std::min(m, n), "]");
  return g;
}

inline void check_state(const at::Tensor& s, const at::Tensor& param, const StepGeometry& g,
                        const char* name) {
  check_same_device(s, param, name);
  LOWRANK_CHECK_VALUE(s.scalar_type() == at::kFloat || s.scalar_type() == at::kBFloat16, name,
                    ": expected dtype float32 or bfloat16, got ", s.scalar_type());
  const std::vector<int64_t> want = g.low_rank_shape();  // named: the message outlives no temp
  LOWRANK_CHECK_VALUE(s.sizes() == at::IntArrayRef(want), name, ": expected shape ",
                    shape_str(want), " (", g.right ? "m x r" : "r x n", "), got ",
                    shape_str(s.sizes()));
  check_contiguous(s, name);
}

inline void check_hyperparameters(double beta1, double beta2, double eps, int64_t step) {
  LOWRANK_CHECK_VALUE(0.0 <= beta1 && beta1 < 1.0, "beta1: expected a value in [0, 1), got ", beta1);
  LOWRANK_CHECK_VALUE(0.0 <= beta2 && beta2 < 1.0, "beta2: expected a value in [0, 1), got ", beta2);
  LOWRANK_CHECK_VALUE(eps >= 0.0, "eps: expected a value >= 0, got ", eps);
  LOWRANK_CHECK_VALUE(step >= 1, "step: expected the already-incremented step (>= 1), got ", step);
}

// ---- DCT indices (DESIGN.md §4.5) ----
// An int32 proj holds r row indices of the size-d DCT-II basis, d = the projected dimension.
// Shape and dtype are checked everywhere; values (range, repeats) only where they are on the host:
// reading device memory would cost a host sync per call, so GPU callers rely on dct_select (which
// only produces valid indices).
inline void check_dct_indices(const at::Tensor& indices, int64_t d, const char* name) {
  LOWRANK_CHECK_VALUE(indices.dim() == 1, name, ": expected a 1-D tensor of DCT row indices, got ",
                    indices.dim(), "-D");
  LOWRANK_CHECK_VALUE(indices.scalar_type() == at::kInt, name, ": expected dtype int32, got ",
                    indices.scalar_type());
  const int64_t r = indices.size(0);
  LOWRANK_CHECK_VALUE(r >= 1 && r <= d, name, ": rank r=", r, " must lie in [1, d=", d, "]");
  if (!indices.device().is_cpu()) return;
  const at::Tensor host = indices.contiguous();
  const int32_t* idx = host.data_ptr<int32_t>();
  std::vector<bool> seen(static_cast<size_t>(d), false);
  for (int64_t j = 0; j < r; ++j) {
    LOWRANK_CHECK_VALUE(idx[j] >= 0 && idx[j] < d, name, ": index ", idx[j], " at position ", j,
                      " is outside [0, d=", d, ")");
    LOWRANK_CHECK_VALUE(!seen[idx[j]], name, ": index ", idx[j], " is repeated (position ", j, ")");
    seen[idx[j]] = true;
  }
}

// Geometry of a fused step whose proj holds DCT indices: d = n (right, m >= n) or m (left).
inline StepGeometry check_dct_projection(int64_t m, int64_t n, const at::Tensor& proj) {
  StepGeometry g{m, n, 0, m >= n};
  check_dct_indices(proj, g.right ? n : m, "proj");
  g.r = proj.size(0);
  return g;
}

// dct_select(grad, rank, norm, method): a non-empty float matrix, rank in [1, min(m, n)].
inline void check_dct_select(const at::Tensor& grad, int64_t rank, int64_t norm,
                             c10::string_view method) {
  check_float_matrix(grad, "grad");
  const int64_t d = std::min(grad.size(0), grad.size(1));
  LOWRANK_CHECK_VALUE(d >= 1, "grad: expected a non-empty matrix, got shape ",
                      shape_str(grad.sizes()));
  LOWRANK_CHECK_VALUE(rank >= 1 && rank <= d, "rank: expected a value in [1, min(m, n)=", d,
                      "], got ", rank);
  LOWRANK_CHECK_VALUE(norm == 1 || norm == 2, "norm: expected 1 or 2, got ", norm);
  LOWRANK_CHECK_VALUE(method == "auto" || method == "fft" || method == "dense",
                      "method: expected 'auto', 'fft' or 'dense', got '", std::string(method),
                      "'");
}

}  // namespace lowrank

// ---- quantized formats (DESIGN.md §4.3-§4.4): INT4 projections, INT8 weights ----
#include "lowrank/philox.h"
#include "lowrank/quant.h"

namespace lowrank {

// INT4 groups must hold whole bytes (an even size) so that no byte is shared by two groups.
inline void check_group_size(int64_t group_size, const char* name, bool packed_int4) {
  LOWRANK_CHECK_VALUE(group_size >= 1, name, ": expected a positive group size, got ", group_size);
  LOWRANK_CHECK_VALUE(!packed_int4 || group_size % 2 == 0, name,
                    ": expected an even group size for packed INT4 codes (two per byte), got ",
                    group_size);
}

// scales/zeros of `numel` quantized elements: fp32, 1-D, one per group, on `device`; dense
// when the kernel rewrites them (`written`), of any stride when it only reads them.
inline void check_group_params(const std::optional<at::Tensor>& t, int64_t numel,
                               int64_t group_size, const at::Device& device, const char* name,
                               const char* what, bool written) {
  LOWRANK_CHECK_VALUE(t.has_value(), name, ": required with ", what);
  const int64_t groups = num_groups(numel, group_size);
  LOWRANK_CHECK_VALUE(t->scalar_type() == at::kFloat, name, ": expected dtype float32, got ",
                    t->scalar_type());
  LOWRANK_CHECK_VALUE(t->dim() == 1 && t->size(0) == groups, name,
                    ": expected shape [", groups, "] (ceil(", numel, " / group size ", group_size,
                    ")), got ", shape_str(t->sizes()));
  LOWRANK_CHECK_VALUE(t->device() == device, name, ": expected device ", device, ", got ",
                    t->device());
  if (written) check_contiguous(*t, name);
}

inline void check_rounding_seed(int64_t seed) {
  LOWRANK_CHECK_VALUE(seed >= 0 && seed <= kMaxRoundingSeed,
                    "seed: expected a value in [0, 2^32 - 1], got ", seed);
}

inline void check_uint8(const at::Tensor& t, const char* name, const char* what) {
  LOWRANK_CHECK_VALUE(t.scalar_type() == at::kByte, name, ": expected dtype uint8 (", what,
                    "), got ", t.scalar_type());
}

// Validates a fused_galore_step call in any format and returns its shape facts. The projection is
// a dense float basis, DCT row indices (int32) or a packed INT4 basis (uint8; its rank comes from
// exp_avg: m x r right, r x n left); the weight is float or INT8 codes (uint8).
inline StepGeometry check_fused_galore_step(
    const at::Tensor& param, const at::Tensor& grad, const at::Tensor& proj,
    const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq, double beta1, double beta2,
    double eps, int64_t step, const std::optional<at::Tensor>& proj_scales,
    const std::optional<at::Tensor>& proj_zeros, int64_t proj_group_size,
    const std::optional<at::Tensor>& param_scales, const std::optional<at::Tensor>& param_zeros,
    int64_t param_group_size, int64_t seed) {
  const bool int8_weight = param.scalar_type() == at::kByte;
  LOWRANK_CHECK_VALUE(param.dim() == 2, "param: expected a 2-D tensor, got ", param.dim(), "-D");
  if (!int8_weight) check_float_matrix(param, "param");
  check_contiguous(param, "param");
  check_float_matrix(grad, "grad");
  check_same_device(grad, param, "grad");
  LOWRANK_CHECK_VALUE(grad.sizes() == param.sizes(), "grad: expected the shape of param ",
                    shape_str(param.sizes()), ", got ", shape_str(grad.sizes()));
  check_same_device(proj, param, "proj");
  const int64_t m = param.size(0), n = param.size(1);
  StepGeometry g{m, n, 0, m >= n};
  if (proj.scalar_type() == at::kByte) {
    LOWRANK_CHECK_VALUE(exp_avg.dim() == 2 && exp_avg.size(g.right ? 0 : 1) == (g.right ? m : n),
                      "exp_avg: expected shape ", g.right ? "(m, r)" : "(r, n)",
                      " (its rank sets that of the packed proj), got ", shape_str(exp_avg.sizes()));
    g.r = exp_avg.size(g.right ? 1 : 0);
    LOWRANK_CHECK_VALUE(g.r >= 1 && g.r <= std::min(m, n), "exp_avg: rank r=", g.r,
                      " must lie in [1, min(m, n)=", std::min(m, n), "]");
    const int64_t basis_numel = g.r * (g.right ? n : m);
    LOWRANK_CHECK_VALUE(proj.dim() == 1 && proj.size(0) == (basis_numel + 1) / 2,
                      "proj: expected a 1-D packed INT4 basis of ", (basis_numel + 1) / 2,
                      " bytes (ceil(", basis_numel, " / 2)), got shape ", shape_str(proj.sizes()));
    check_group_size(proj_group_size, "proj_group_size", /*packed_int4=*/true);
    check_group_params(proj_scales, basis_numel, proj_group_size, param.device(), "proj_scales",
                       "a packed INT4 (uint8) proj", /*written=*/false);
    check_group_params(proj_zeros, basis_numel, proj_group_size, param.device(), "proj_zeros",
                       "a packed INT4 (uint8) proj", /*written=*/false);
  } else {
    // Signed integers can only mean DCT indices (uint8 is packed INT4): report them as such.
    const bool dct = at::isIntegralType(proj.scalar_type(), /*includeBool=*/false);
    g = dct ? check_dct_projection(m, n, proj) : check_dense_projection(m, n, proj);
    LOWRANK_CHECK_VALUE(!proj_scales && !proj_zeros,
                      "proj_scales/proj_zeros: only valid with a packed INT4 (uint8) proj");
  }
  check_state(exp_avg, param, g, "exp_avg");
  check_state(exp_avg_sq, param, g, "exp_avg_sq");
  LOWRANK_CHECK_VALUE(exp_avg_sq.scalar_type() == exp_avg.scalar_type(),
                      "exp_avg_sq: expected the dtype of exp_avg (", exp_avg.scalar_type(),
                      "), got ", exp_avg_sq.scalar_type());
  LOWRANK_CHECK_VALUE(!exp_avg.is_same(exp_avg_sq), "exp_avg_sq: must not alias exp_avg");
  if (int8_weight) {
    check_group_size(param_group_size, "param_group_size", /*packed_int4=*/false);
    check_group_params(param_scales, m * n, param_group_size, param.device(), "param_scales",
                       "INT8 (uint8) param codes", /*written=*/true);
    check_group_params(param_zeros, m * n, param_group_size, param.device(), "param_zeros",
                       "INT8 (uint8) param codes", /*written=*/true);
    LOWRANK_CHECK_VALUE(!param_scales->is_same(*param_zeros),
                      "param_zeros: must not alias param_scales");
  } else {
    LOWRANK_CHECK_VALUE(!param_scales && !param_zeros,
                      "param_scales/param_zeros: only valid with INT8 (uint8) param codes");
  }
  if (int8_weight || exp_avg.scalar_type() == at::kBFloat16) {  // a stochastic-rounding stream
    check_rounding_seed(seed);
    LOWRANK_CHECK_VALUE(step <= kMaxRoundingStep, "step: expected a value <= 2^31 - 1, got ",
                      step);
  }
  check_hyperparameters(beta1, beta2, eps, step);
  return g;
}

// ---- GradNormLoRP (DESIGN.md §4.8) ----
// A per-row fp32 state of an m x n weight: 1-D, length m, on param's device, dense.
inline void check_row_state(const at::Tensor& t, const at::Tensor& param, const char* name) {
  check_same_device(t, param, name);
  LOWRANK_CHECK_VALUE(t.scalar_type() == at::kFloat, name, ": expected dtype float32, got ",
                      t.scalar_type());
  LOWRANK_CHECK_VALUE(t.dim() == 1 && t.size(0) == param.size(0), name, ": expected shape [",
                      param.size(0), "] (one value per row of param), got ",
                      shape_str(t.sizes()));
  check_contiguous(t, name);
}

// fused_gradnorm_step: a float weight (INT8 codes refused), the projection and low-rank moments
// of fused_galore_step, and four distinct per-row states.
inline StepGeometry check_fused_gradnorm_step(
    const at::Tensor& param, const at::Tensor& grad, const at::Tensor& proj,
    const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq, const at::Tensor& row_scale,
    const at::Tensor& row_norm, const at::Tensor& scale_exp_avg,
    const at::Tensor& scale_exp_avg_sq, double beta1, double beta2, double eps, int64_t step,
    const std::optional<at::Tensor>& proj_scales, const std::optional<at::Tensor>& proj_zeros,
    int64_t proj_group_size, int64_t seed) {
  LOWRANK_CHECK_VALUE(param.scalar_type() != at::kByte,
                      "param: INT8 weight codes (uint8) are not supported by "
                      "fused_gradnorm_step (the row renormalisation needs each row in fp32); "
                      "expected dtype float32, bfloat16 or float16");
  const StepGeometry g = check_fused_galore_step(
      param, grad, proj, exp_avg, exp_avg_sq, beta1, beta2, eps, step, proj_scales, proj_zeros,
      proj_group_size, std::nullopt, std::nullopt, 256, seed);
  const at::Tensor* rows[] = {&row_scale, &row_norm, &scale_exp_avg, &scale_exp_avg_sq};
  const char* names[] = {"row_scale", "row_norm", "scale_exp_avg", "scale_exp_avg_sq"};
  for (int i = 0; i < 4; ++i) {
    check_row_state(*rows[i], param, names[i]);
    for (int j = 0; j < i; ++j) {
      LOWRANK_CHECK_VALUE(!rows[i]->is_same(*rows[j]), names[i], ": must not alias ",
                          names[j]);
    }
  }
  return g;
}

}  // namespace lowrank

// ---- Fira / APOLLO: the scaled full-rank term (DESIGN.md §4.6-§4.7) ----
namespace lowrank {

enum class FullRank { kNone, kFira, kApollo };

// What the full-rank arguments of one fused step ask for, after validation.
struct FullRankArgs {
  FullRank mode = FullRank::kNone;
  bool tensor_norm = false;  // full_rank_norm == 'tensor'
  bool scale_front = false;
  double growth = 1.01;
  std::optional<at::Tensor> limiter;
};

// Validates the full-rank keyword arguments of fused_galore_step (after check_fused_galore_step).
// With full_rank='none' the others must keep their defaults: nothing is silently ignored.
inline FullRankArgs check_full_rank(const at::Tensor& param, c10::string_view full_rank,
                                    c10::string_view full_rank_norm,
                                    const std::optional<at::Tensor>& limiter,
                                    double limiter_growth, bool scale_front, double scale) {
  FullRankArgs out;
  LOWRANK_CHECK_VALUE(full_rank == "none" || full_rank == "fira" || full_rank == "apollo",
                      "full_rank: expected 'none', 'fira' or 'apollo', got '",
                      std::string(full_rank), "'");
  LOWRANK_CHECK_VALUE(full_rank_norm == "channel" || full_rank_norm == "tensor",
                      "full_rank_norm: expected 'channel' or 'tensor', got '",
                      std::string(full_rank_norm), "'");
  out.mode = full_rank == "fira" ? FullRank::kFira
             : full_rank == "apollo" ? FullRank::kApollo : FullRank::kNone;
  out.tensor_norm = full_rank_norm == "tensor";
  out.scale_front = scale_front;
  out.growth = limiter_growth;
  if (out.mode == FullRank::kNone) {
    LOWRANK_CHECK_VALUE(!limiter.has_value() && !out.tensor_norm && !scale_front,
                        "limiter/full_rank_norm/scale_front: only valid with full_rank='fira' "
                        "or 'apollo'");
    return out;
  }
  LOWRANK_CHECK_VALUE(!scale_front || out.mode == FullRank::kApollo,
                      "scale_front: only valid with full_rank='apollo'");
  LOWRANK_CHECK_VALUE(out.mode != FullRank::kApollo || scale >= 0.0,
                      "scale: expected a value >= 0 with full_rank='apollo' (the update is "
                      "multiplied by sqrt(scale)), got ", scale);
  LOWRANK_CHECK_VALUE(std::isfinite(limiter_growth) && limiter_growth > 0.0,
                      "limiter_growth: expected a finite value > 0, got ", limiter_growth);
  if (limiter.has_value()) {
    const at::Tensor& l = *limiter;
    LOWRANK_CHECK_VALUE(l.scalar_type() == at::kFloat, "limiter: expected dtype float32, got ",
                        l.scalar_type());
    LOWRANK_CHECK_VALUE(l.dim() == 1 && l.size(0) == 1,
                        "limiter: expected shape [1] (the previous ||S||, < 0 before the first "
                        "step), got ", shape_str(l.sizes()));
    check_same_device(l, param, "limiter");
    LOWRANK_CHECK_VALUE(!l.is_same(param), "limiter: must not alias param");
    out.limiter = l;
  }
  return out;
}

// random_basis(d, rank, seed, refresh): Philox counters k*ceil(d/4) + i/4 stay below 2^32 (the
// stream word is the counter's high word), keys below 2^63.
inline void check_random_basis(int64_t d, int64_t rank, int64_t seed, int64_t refresh) {
  LOWRANK_CHECK_VALUE(d >= 1, "d: expected a basis size >= 1, got ", d);
  LOWRANK_CHECK_VALUE(rank >= 1 && rank <= (int64_t{1} << 24),
                      "rank: expected a value in [1, 2^24], got ", rank);
  LOWRANK_CHECK_VALUE((d + 3) / 4 <= (int64_t{1} << 32) / rank, "d, rank: rank * ceil(d / 4) ",
                      "must not exceed 2^32 (one Philox counter per four elements), got d=", d,
                      ", rank=", rank);
  LOWRANK_CHECK_VALUE(seed >= 0 && seed <= kMaxRoundingSeed,
                      "seed: expected a value in [0, 2^32 - 1], got ", seed);
  LOWRANK_CHECK_VALUE(refresh >= 0 && refresh <= kMaxRoundingStep,
                      "refresh: expected a value in [0, 2^31 - 1], got ", refresh);
}

}  // namespace lowrank
