// project / project_back (DESIGN.md §4.1): two GEMMs through ATen, result in fp32.
//
//   right (m >= n): project R = G Q^T (m x r);   project_back = scale * (N Q)  (m x n)
//   left  (m <  n): project R = P^T G (r x n);   project_back = scale * (P N)  (m x n)
//
// Registered as CompositeExplicitAutograd: at::mm already has a tuned kernel on every device, so
// one implementation serves CPU and CUDA; the autograd formula is registered in ops.py.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "lowrank/checks.h"

namespace lowrank {
namespace {

at::Tensor project(const at::Tensor& grad, const at::Tensor& proj) {
  check_float_matrix(grad, "grad");
  check_same_device(proj, grad, "proj");
  const StepGeometry g = check_dense_projection(grad.size(0), grad.size(1), proj);
  const at::Tensor g32 = grad.to(at::kFloat);
  const at::Tensor p32 = proj.to(at::kFloat);
  return g.right ? at::mm(g32, p32.t()) : at::mm(p32.t(), g32);
}

at::Tensor project_back(const at::Tensor& low_rank, const at::Tensor& proj, int64_t m, int64_t n,
                        double scale) {
  LOWRANK_CHECK_VALUE(m >= 1 && n >= 1, "m, n: expected positive sizes, got m=", m, ", n=", n);
  check_float_matrix(low_rank, "low_rank");
  check_same_device(proj, low_rank, "proj");
  const StepGeometry g = check_dense_projection(m, n, proj);
  const std::vector<int64_t> want = g.low_rank_shape();
  LOWRANK_CHECK_VALUE(low_rank.sizes() == at::IntArrayRef(want), "low_rank: expected shape ",
                    shape_str(want), " (", g.right ? "m x r" : "r x n", "), got ",
                    shape_str(low_rank.sizes()));
  const at::Tensor n32 = low_rank.to(at::kFloat);
  const at::Tensor p32 = proj.to(at::kFloat);
  at::Tensor out = g.right ? at::mm(n32, p32) : at::mm(p32, n32);
  return scale == 1.0 ? out : out.mul_(scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank, CompositeExplicitAutograd, m) {
  m.impl("project", &project);
  m.impl("project_back", &project_back);
}

}  // namespace lowrank
