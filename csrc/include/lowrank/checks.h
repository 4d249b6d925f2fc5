// Argument validation shared by every C++ entry point (CPU and CUDA). Each failure names the
// argument and the value expected, and runs before any tensor is written.
// Host-only (ATen); the Python fake kernels in lowrank_kernels/ops.py mirror these messages.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <optional>
#include <vector>

namespace lowrank {

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

inline void check_float_matrix(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 2, name, ": expected a 2-D tensor, got ", t.dim(), "-D");
  TORCH_CHECK_VALUE(is_float_dtype(t.scalar_type()), name,
                    ": expected dtype float32, bfloat16 or float16, got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, ": expected device ", ref.device(),
                    " (that of param), got ", t.device());
}

inline void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_contiguous(), name,
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
    TORCH_CHECK_VALUE(proj.size(1) == n, "proj: expected shape (r, n=", n,
                      ") for a right projection (m >= n), got ", proj.sizes());
    g.r = proj.size(0);
  } else {
    TORCH_CHECK_VALUE(proj.size(0) == m, "proj: expected shape (m=", m,
                      ", r) for a left projection (m < n), got ", proj.sizes());
    g.r = proj.size(1);
  }
  TORCH_CHECK_VALUE(g.r >= 1 && g.r <= std::min(m, n), "proj: rank r=", g.r,
                    " must lie in [1, min(m, n)=", std::min(m, n), "]");
  return g;
}

inline void check_state(const at::Tensor& s, const at::Tensor& param, const StepGeometry& g,
                        const char* name) {
  check_same_device(s, param, name);
  TORCH_CHECK_VALUE(s.scalar_type() == at::kFloat || s.scalar_type() == at::kBFloat16, name,
                    ": expected dtype float32 or bfloat16, got ", s.scalar_type());
  TORCH_CHECK_VALUE(s.sizes() == at::IntArrayRef(g.low_rank_shape()), name, ": expected shape ",
                    at::IntArrayRef(g.low_rank_shape()), " (", g.right ? "m x r" : "r x n",
                    "), got ", s.sizes());
  check_contiguous(s, name);
}

inline void check_hyperparameters(double beta1, double beta2, double eps, int64_t step) {
  TORCH_CHECK_VALUE(0.0 <= beta1 && beta1 < 1.0, "beta1: expected a value in [0, 1), got ", beta1);
  TORCH_CHECK_VALUE(0.0 <= beta2 && beta2 < 1.0, "beta2: expected a value in [0, 1), got ", beta2);
  TORCH_CHECK_VALUE(eps >= 0.0, "eps: expected a value >= 0, got ", eps);
  TORCH_CHECK_VALUE(step >= 1, "step: expected the already-incremented step (>= 1), got ", step);
}

// ---- DCT indices (DESIGN.md §4.5) ----
// An int32 proj holds r row indices of the size-d DCT-II basis, d = the projected dimension.
// Shape and dtype are checked everywhere; values (range, repeats) only where they are on the host:
// reading device memory would cost a host sync per call, so GPU callers rely on dct_select (which
// only produces valid indices) or on ops.check_dct_indices.
inline void check_dct_indices(const at::Tensor& indices, int64_t d, const char* name) {
  TORCH_CHECK_VALUE(indices.dim() == 1, name, ": expected a 1-D tensor of DCT row indices, got ",
                    indices.dim(), "-D");
  TORCH_CHECK_VALUE(indices.scalar_type() == at::kInt, name, ": expected dtype int32, got ",
                    indices.scalar_type());
  const int64_t r = indices.size(0);
  TORCH_CHECK_VALUE(r >= 1 && r <= d, name, ": rank r=", r, " must lie in [1, d=", d, "]");
  if (!indices.device().is_cpu()) return;
  const at::Tensor host = indices.contiguous();
  const int32_t* idx = host.data_ptr<int32_t>();
  std::vector<bool> seen(static_cast<size_t>(d), false);
  for (int64_t j = 0; j < r; ++j) {
    TORCH_CHECK_VALUE(idx[j] >= 0 && idx[j] < d, name, ": index ", idx[j], " at position ", j,
                      " is outside [0, d=", d, ")");
    TORCH_CHECK_VALUE(!seen[idx[j]], name, ": index ", idx[j], " is repeated (position ", j, ")");
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

// Validates a fused_galore_step call with a dense floating-point (or DCT-index) projection and a
// floating-point weight.
inline StepGeometry check_fused_galore_step(
    const at::Tensor& param, const at::Tensor& grad, const at::Tensor& proj,
    const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq, double beta1, double beta2,
    double eps, int64_t step, const std::optional<at::Tensor>& proj_scales,
    const std::optional<at::Tensor>& proj_zeros, const std::optional<at::Tensor>& param_scales,
    const std::optional<at::Tensor>& param_zeros) {
  check_float_matrix(param, "param");
  check_contiguous(param, "param");
  check_float_matrix(grad, "grad");
  check_same_device(grad, param, "grad");
  TORCH_CHECK_VALUE(grad.sizes() == param.sizes(), "grad: expected the shape of param ",
                    param.sizes(), ", got ", grad.sizes());
  check_contiguous(grad, "grad");
  check_same_device(proj, param, "proj");
  // Signed integers can only mean DCT indices (uint8 is packed INT4): report them as such.
  const bool dct = at::isIntegralType(proj.scalar_type(), /*includeBool=*/false) &&
                   proj.scalar_type() != at::kByte;
  StepGeometry g = dct
                       ? check_dct_projection(param.size(0), param.size(1), proj)
                       : check_dense_projection(param.size(0), param.size(1), proj);
  check_contiguous(proj, "proj");
  check_state(exp_avg, param, g, "exp_avg");
  check_state(exp_avg_sq, param, g, "exp_avg_sq");
  TORCH_CHECK_VALUE(!exp_avg.is_same(exp_avg_sq), "exp_avg_sq: must not alias exp_avg");
  TORCH_CHECK_VALUE(!proj_scales && !proj_zeros,
                    "proj_scales/proj_zeros: only valid with a packed INT4 (uint8) proj");
  TORCH_CHECK_VALUE(!param_scales && !param_zeros,
                    "param_scales/param_zeros: only valid with INT8 (uint8) param codes");
  check_hyperparameters(beta1, beta2, eps, step);
  return g;
}

}  // namespace lowrank
