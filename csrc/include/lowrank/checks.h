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

// Shape facts of one fused step, derived from (param, proj) by the side rule of DESIGN.md §4.1,
// or by the caller's `right` (a row shard of a right-side weight under FSDP2 may be wider than
// tall; it keeps the whole weight's side).
struct StepGeometry {
  int64_t m, n, r;
  bool right;  // R = G Q^T (m x r); else R = P^T G (r x n)
  bool side_given = false;  // `right` came from the caller, not from the side rule
  std::vector<int64_t> low_rank_shape() const {
    return right ? std::vector<int64_t>{m, r} : std::vector<int64_t>{r, n};
  }
  // The size of the axis the basis spans: n (right) or m (left).
  int64_t basis_dim() const { return right ? n : m; }
};

inline StepGeometry step_side(int64_t m, int64_t n, std::optional<bool> right) {
  return StepGeometry{m, n, 0, right.value_or(m >= n), right.has_value()};
}

// r in [1, d]: by the side rule d = min(m, n); with an explicit side, the basis' dimension (the
// other axis of a shard may be shorter than r, or empty).
inline void check_step_rank(const StepGeometry& g, const char* name) {
  if (!g.side_given) {
    LOWRANK_CHECK_VALUE(g.r >= 1 && g.r <= std::min(g.m, g.n), name, ": rank r=", g.r,
                        " must lie in [1, min(m, n)=", std::min(g.m, g.n), "]");
  } else {
    LOWRANK_CHECK_VALUE(g.r >= 1 && g.r <= g.basis_dim(), name, ": rank r=", g.r,
                        " must lie in [1, ", g.right ? "n=" : "m=", g.basis_dim(), "] (",
                        g.right ? "right" : "left", " side given)");
  }
}

inline StepGeometry check_dense_projection(int64_t m, int64_t n, const at::Tensor& proj,
                                           std::optional<bool> right = std::nullopt) {
  check_float_matrix(proj, "proj");
  StepGeometry g = step_side(m, n, right);
  if (g.right) {
    LOWRANK_CHECK_VALUE(proj.size(1) == n, "proj: expected shape (r, n=", n,
                      ") for a right projection", g.side_given ? "" : " (m >= n)", ", got ",
                      shape_str(proj.sizes()));
    g.r = proj.size(0);
  } else {
    LOWRANK_CHECK_VALUE(proj.size(0) == m, "proj: expected shape (m=", m,
                      ", r) for a left projection", g.side_given ? "" : " (m < n)", ", got ",
                      shape_str(proj.sizes()));
    g.r = proj.size(1);
  }
  check_step_rank(g, "proj");
  return g;
}

// A moment: fp32, bf16, or 8-bit codes (`code_type`: int8 for exp_avg, uint8 for exp_avg_sq).
inline void check_state(const at::Tensor& s, const at::Tensor& param, const StepGeometry& g,
                        const char* name, at::ScalarType code_type) {
  check_same_device(s, param, name);
  LOWRANK_CHECK_VALUE(
      s.scalar_type() == at::kFloat || s.scalar_type() == at::kBFloat16 ||
          s.scalar_type() == code_type,
      name, ": expected dtype float32, bfloat16 or ", code_type, " (8-bit codes), got ",
      s.scalar_type());
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

// Geometry of a fused step whose proj holds DCT indices: d = n (right) or m (left).
inline StepGeometry check_dct_projection(int64_t m, int64_t n, const at::Tensor& proj,
                                         std::optional<bool> right = std::nullopt) {
  StepGeometry g = step_side(m, n, right);
  check_dct_indices(proj, g.basis_dim(), "proj");
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

// ---- modes of the fused step beyond GaLore AdamW (DESIGN.md §4.9-§4.10) ----
// 8-bit moments: blocks of state_block_size elements along the rank axis of an own-line, a power
// of two that divides every rank tile of the Triton kernels (32, 64, 128), so that a program
// always holds whole blocks.
constexpr int64_t kMaxMomentBlock = 32;

struct StepModes {
  bool adagrad = false;  // inner="adagrad": V <- V + R^2, N = R/(sqrt(V)+eps), no exp_avg
  std::optional<at::Tensor> exp_avg_scales, exp_avg_sq_scales;  // fp32 scales of 8-bit codes
  int64_t state_block_size = kMaxMomentBlock;
  std::optional<bool> right;  // the projection side; std::nullopt: the side rule (m >= n)
};

// inner: "adam" or "adagrad"; returns whether it is AdaGrad.
inline bool parse_inner_rule(c10::string_view inner) {
  LOWRANK_CHECK_VALUE(inner == "adam" || inner == "adagrad",
                      "inner: expected 'adam' or 'adagrad', got '", std::string(inner), "'");
  return inner == "adagrad";
}

inline void check_state_block_size(int64_t block) {
  LOWRANK_CHECK_VALUE(block >= 1 && block <= kMaxMomentBlock && (block & (block - 1)) == 0,
                      "state_block_size: expected a power of two in [1, ", kMaxMomentBlock,
                      "] (it must divide the Triton kernels' rank tiles), got ", block);
}

// Block scales of 8-bit moment codes (`codes`, or an undefined tensor when the moment is not
// 8-bit): fp32, shape (own, ceil(r / B)), own = m (right) or n (left), dense (rewritten).
inline void check_moment_scales(const std::optional<at::Tensor>& scales, const at::Tensor& codes,
                                at::ScalarType code_type, const StepGeometry& g, int64_t block,
                                const at::Device& device, const char* name,
                                const char* codes_name) {
  if (!codes.defined() || codes.scalar_type() != code_type) {
    LOWRANK_CHECK_VALUE(!scales, name, ": only valid with 8-bit (", code_type, ") ", codes_name,
                        " codes");
    return;
  }
  LOWRANK_CHECK_VALUE(scales.has_value(), name, ": required with 8-bit (", code_type, ") ",
                      codes_name, " codes");
  LOWRANK_CHECK_VALUE(scales->scalar_type() == at::kFloat, name,
                      ": expected dtype float32, got ", scales->scalar_type());
  const std::vector<int64_t> want{g.right ? g.m : g.n, (g.r + block - 1) / block};
  LOWRANK_CHECK_VALUE(scales->sizes() == at::IntArrayRef(want), name, ": expected shape ",
                      shape_str(want), " (", g.right ? "m" : "n", ", ceil(r=", g.r,
                      " / state_block_size=", block, ")), got ", shape_str(scales->sizes()));
  LOWRANK_CHECK_VALUE(scales->device() == device, name, ": expected device ", device, ", got ",
                      scales->device());
  check_contiguous(*scales, name);
}

// A factored second moment (a 1-D exp_avg_sq, DESIGN.md §4.12): r + own fp32 factors, Adam
// only; M (exp_avg) in any of its formats.
inline void check_factored(const std::optional<at::Tensor>& exp_avg, const at::Tensor& exp_avg_sq,
                           const at::Tensor& param, const StepGeometry& g,
                           const StepModes& modes) {
  LOWRANK_CHECK_VALUE(!modes.adagrad, "exp_avg_sq: a factored (1-D) second moment needs "
                                      "inner='adam', got inner='adagrad'");
  check_same_device(exp_avg_sq, param, "exp_avg_sq");
  LOWRANK_CHECK_VALUE(exp_avg_sq.scalar_type() == at::kFloat,
                      "exp_avg_sq: expected dtype float32 for a factored (1-D) second moment, "
                      "got ", exp_avg_sq.scalar_type());
  const int64_t length = g.r + (g.right ? g.m : g.n);
  LOWRANK_CHECK_VALUE(exp_avg_sq.size(0) == length, "exp_avg_sq: expected shape [", length,
                      "] (r + own factors) for a factored second moment, got ",
                      shape_str(exp_avg_sq.sizes()));
  check_contiguous(exp_avg_sq, "exp_avg_sq");
  LOWRANK_CHECK_VALUE(!modes.exp_avg_sq_scales,
                      "exp_avg_sq_scales: only valid with 8-bit (torch.uint8) exp_avg_sq codes, "
                      "not with a factored second moment");
  LOWRANK_CHECK_VALUE(!exp_avg || !exp_avg->is_same(exp_avg_sq),
                      "exp_avg_sq: must not alias exp_avg");
}

// The moments of a step: exp_avg (None for AdaGrad) and exp_avg_sq both fp32, both bf16, or
// 8-bit codes (int8 M, uint8 sqrt(V)) with their block scales; or M in any of those formats with
// a factored (1-D) exp_avg_sq.
inline void check_moments(const std::optional<at::Tensor>& exp_avg, const at::Tensor& exp_avg_sq,
                          const at::Tensor& param, const StepGeometry& g,
                          const StepModes& modes) {
  if (modes.adagrad) {
    LOWRANK_CHECK_VALUE(!exp_avg, "exp_avg: expected None with inner='adagrad' (AdaGrad keeps "
                                  "no first moment), got a tensor");
  } else {
    LOWRANK_CHECK_VALUE(exp_avg.has_value(), "exp_avg: required with inner='adam' (None only "
                                             "with inner='adagrad')");
  }
  if (exp_avg) check_state(*exp_avg, param, g, "exp_avg", at::kChar);
  if (exp_avg_sq.dim() == 1) {
    check_factored(exp_avg, exp_avg_sq, param, g, modes);
  } else {
    check_state(exp_avg_sq, param, g, "exp_avg_sq", at::kByte);
  }
  if (exp_avg && exp_avg_sq.dim() == 2) {
    const at::ScalarType m = exp_avg->scalar_type(), v = exp_avg_sq.scalar_type();
    if (m == at::kChar) {
      LOWRANK_CHECK_VALUE(v == at::kByte, "exp_avg_sq: expected dtype ", at::kByte,
                          " (8-bit codes of sqrt(V)) with 8-bit exp_avg codes, got ", v);
    } else {
      LOWRANK_CHECK_VALUE(v == m, "exp_avg_sq: expected the dtype of exp_avg (", m, "), got ", v);
    }
    LOWRANK_CHECK_VALUE(!exp_avg->is_same(exp_avg_sq), "exp_avg_sq: must not alias exp_avg");
  }
  check_state_block_size(modes.state_block_size);
  check_moment_scales(modes.exp_avg_scales, exp_avg ? *exp_avg : at::Tensor(), at::kChar, g,
                      modes.state_block_size, param.device(), "exp_avg_scales", "exp_avg");
  check_moment_scales(modes.exp_avg_sq_scales, exp_avg_sq, at::kByte, g, modes.state_block_size,
                      param.device(), "exp_avg_sq_scales", "exp_avg_sq");
  if (modes.exp_avg_scales && modes.exp_avg_sq_scales) {
    LOWRANK_CHECK_VALUE(!modes.exp_avg_scales->is_same(*modes.exp_avg_sq_scales),
                        "exp_avg_sq_scales: must not alias exp_avg_scales");
  }
}

// Whether a moment is stored rounded (bf16 or 8-bit codes): a stochastic-rounding stream. With
// a factored V (fp32) only M can be.
inline bool moments_rounded(const std::optional<at::Tensor>& exp_avg,
                            const at::Tensor& exp_avg_sq) {
  return exp_avg_sq.scalar_type() != at::kFloat ||
         (exp_avg && exp_avg->scalar_type() != at::kFloat);
}

// Validates a fused_galore_step call in any format and returns its shape facts. The projection is
// a dense float basis, DCT row indices (int32) or a packed INT4 basis (uint8; its rank comes from
// the moments: m x r right, r x n left); the weight is float or INT8 codes (uint8). The side is
// modes.right, or the side rule.
inline StepGeometry check_fused_galore_step(
    const at::Tensor& param, const at::Tensor& grad, const at::Tensor& proj,
    const std::optional<at::Tensor>& exp_avg, const at::Tensor& exp_avg_sq, double beta1,
    double beta2, double eps, int64_t step, const std::optional<at::Tensor>& proj_scales,
    const std::optional<at::Tensor>& proj_zeros, int64_t proj_group_size,
    const std::optional<at::Tensor>& param_scales, const std::optional<at::Tensor>& param_zeros,
    int64_t param_group_size, int64_t seed, const StepModes& modes = StepModes()) {
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
  StepGeometry g = step_side(m, n, modes.right);
  if (proj.scalar_type() == at::kByte) {
    // the rank of a packed basis is that of the moments (exp_avg, or exp_avg_sq for AdaGrad)
    const at::Tensor& ranked = exp_avg ? *exp_avg : exp_avg_sq;
    const char* ranked_name = exp_avg ? "exp_avg" : "exp_avg_sq";
    LOWRANK_CHECK_VALUE(ranked.dim() == 2 && ranked.size(g.right ? 0 : 1) == (g.right ? m : n),
                      ranked_name, ": expected shape ", g.right ? "(m, r)" : "(r, n)",
                      " (its rank sets that of the packed proj), got ", shape_str(ranked.sizes()));
    g.r = ranked.size(g.right ? 1 : 0);
    check_step_rank(g, ranked_name);
    const int64_t basis_numel = g.r * g.basis_dim();
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
    g = dct ? check_dct_projection(m, n, proj, modes.right)
            : check_dense_projection(m, n, proj, modes.right);
    LOWRANK_CHECK_VALUE(!proj_scales && !proj_zeros,
                      "proj_scales/proj_zeros: only valid with a packed INT4 (uint8) proj");
  }
  check_moments(exp_avg, exp_avg_sq, param, g, modes);
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
  if (int8_weight || moments_rounded(exp_avg, exp_avg_sq)) {  // a stochastic-rounding stream
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
// of fused_galore_step (Adam; fp32, bf16 or 8-bit with their block scales), and four distinct
// per-row states.
inline StepGeometry check_fused_gradnorm_step(
    const at::Tensor& param, const at::Tensor& grad, const at::Tensor& proj,
    const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq, const at::Tensor& row_scale,
    const at::Tensor& row_norm, const at::Tensor& scale_exp_avg,
    const at::Tensor& scale_exp_avg_sq, double beta1, double beta2, double eps, int64_t step,
    const std::optional<at::Tensor>& proj_scales, const std::optional<at::Tensor>& proj_zeros,
    int64_t proj_group_size, int64_t seed,
    const std::optional<at::Tensor>& exp_avg_scales = std::nullopt,
    const std::optional<at::Tensor>& exp_avg_sq_scales = std::nullopt,
    int64_t state_block_size = kMaxMomentBlock) {
  LOWRANK_CHECK_VALUE(param.scalar_type() != at::kByte,
                      "param: INT8 weight codes (uint8) are not supported by "
                      "fused_gradnorm_step (the row renormalisation needs each row in fp32); "
                      "expected dtype float32, bfloat16 or float16");
  LOWRANK_CHECK_VALUE(exp_avg_sq.dim() != 1,
                      "exp_avg_sq: fused_gradnorm_step needs the full (2-D) second moment; a "
                      "factored (1-D) one is a fused_galore_step mode");
  const StepGeometry g = check_fused_galore_step(
      param, grad, proj, exp_avg, exp_avg_sq, beta1, beta2, eps, step, proj_scales, proj_zeros,
      proj_group_size, std::nullopt, std::nullopt, 256, seed,
      StepModes{false, exp_avg_scales, exp_avg_sq_scales, state_block_size, std::nullopt});
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

// A full-rank mode runs Adam with fp32/bf16 moments on the side rule's side: the AdaGrad rule,
// 8-bit moments, a factored V and a side override are refused with it (the messages of _checks.py's
// check_full_rank_combination), before anything is written.
inline void check_full_rank_combination(c10::string_view full_rank, const StepModes& modes,
                                        const at::Tensor& exp_avg_sq, const StepGeometry& g) {
  if (full_rank == "none") return;
  const std::string mode(full_rank);
  LOWRANK_CHECK_VALUE(!modes.adagrad, "inner: full_rank='", mode,
                      "' supports only inner='adam', got 'adagrad'");
  LOWRANK_CHECK_VALUE(exp_avg_sq.scalar_type() != at::kByte, "exp_avg_sq: full_rank='", mode,
                      "' supports fp32/bf16 moments only, got 8-bit moments (uint8 codes)");
  LOWRANK_CHECK_VALUE(exp_avg_sq.dim() != 1, "exp_avg_sq: full_rank='", mode,
                      "' supports a full (2-D) second moment only, got a factored (1-D) one");
  const bool natural = g.m >= g.n;
  LOWRANK_CHECK_VALUE(!modes.right.has_value() || *modes.right == natural, "right: full_rank='",
                      mode, "' supports only the side rule's side (right=",
                      natural ? "True" : "False", " for this shape), got right=",
                      natural ? "False" : "True");
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
