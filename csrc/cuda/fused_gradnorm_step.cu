// fused_gradnorm_step (GradNormLoRP, DESIGN.md §4.8) has no CUDA C++ kernel: CUDA tensors run the
// Triton kernel (triton_kernels/fused_gradnorm_step.py), which lowrank_kernels registers on
// lowrank::fused_gradnorm_step's CUDA key and keeps there under set_cuda_backend("cuda_cxx")
// (lowrank_kernels/_dispatch.py, TRITON_ONLY_OPS): the CUDA C++ kernels are not extended
// for modes added without a GPU to test them on. This registration validates the call like
// every kernel, then says so: it is what lowrank_cuda::fused_gradnorm_step (ops.<op>(...,
// backend="cuda")) and, when triton is not installed, lowrank::fused_gradnorm_step run.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "lowrank/checks.h"
#include "registration.h"

namespace lowrank {
namespace {

void fused_gradnorm_step_cuda(at::Tensor& param, const at::Tensor& grad, const at::Tensor& proj,
                              at::Tensor& exp_avg, at::Tensor& exp_avg_sq, at::Tensor& row_scale,
                              at::Tensor& row_norm, at::Tensor& scale_exp_avg,
                              at::Tensor& scale_exp_avg_sq, double /*lr*/, double beta1,
                              double beta2, double eps, double /*weight_decay*/,
                              double /*scale*/, int64_t step,
                              const std::optional<at::Tensor>& proj_scales,
                              const std::optional<at::Tensor>& proj_zeros,
                              int64_t proj_group_size, int64_t seed,
                              const std::optional<at::Tensor>& exp_avg_scales,
                              const std::optional<at::Tensor>& exp_avg_sq_scales,
                              int64_t state_block_size) {
  check_fused_gradnorm_step(param, grad, proj, exp_avg, exp_avg_sq, row_scale, row_norm,
                            scale_exp_avg, scale_exp_avg_sq, beta1, beta2, eps, step,
                            proj_scales, proj_zeros, proj_group_size, seed, exp_avg_scales,
                            exp_avg_sq_scales, state_block_size);
  LOWRANK_CHECK_NOT_IMPLEMENTED(
      false, "lowrank_cuda::fused_gradnorm_step: not implemented in CUDA C++; CUDA tensors run ",
      "the Triton kernel (install triton: lowrank_kernels registers it on "
      "torch.ops.lowrank.fused_gradnorm_step and keeps it there under "
      "set_cuda_backend('cuda_cxx'))");
}

void register_kernels(torch::Library& m) {
  m.impl("fused_gradnorm_step", &fused_gradnorm_step_cuda);
}

}  // namespace

LOWRANK_REGISTER_CUDA_KERNELS(register_kernels)

}  // namespace lowrank
