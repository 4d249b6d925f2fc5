// Every schema of the `lowrank` operator library, in one place (DESIGN.md §2-§3).
//
// Kernels register per device in csrc/cpu/*.cpp and csrc/cuda/*.cu; fake (meta) kernels and
// autograd formulas in lowrank_kernels/_fakes.py, the Triton kernels of the CUDA key in
// lowrank_kernels/_dispatch.py.
// Schema `float` is C++ `double`, `int` is `int64_t`; `Tensor(a!)` marks a tensor written in place.
//
// The ops with per-device kernels are declared a second time, from the same list, in the
// `lowrank_cuda` namespace (CUDA builds only), where the CUDA C++ kernels stay registered when
// lowrank_kernels puts its Triton kernels on lowrank::<op>'s CUDA key: that is how
// `lowrank_kernels.set_cuda_backend("cuda_cxx")` and `backend="cuda"` reach them.
#include <Python.h>
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <string>

extern "C" {
// `import lowrank_kernels._C` loads this library (and so runs the registrations below); the
// module itself is empty: the ops are reached through torch.ops.lowrank.*.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace {

// The ops that have CPU, CUDA C++ and Triton kernels.
constexpr const char* kDeviceOpSchemas[] = {
    // ---- the fused low-rank AdamW step (DESIGN.md §4.2-§4.5) ----
    // The projection's format follows proj's dtype: floating = dense basis (r x n right, m x r
    // left), uint8 = packed INT4 basis (needs proj_scales/proj_zeros), int32 = DCT row indices
    // (length r). The weight's format follows param's dtype: floating = plain weight, uint8 =
    // INT8 codes updated by stochastic rounding (needs param_scales/param_zeros, rewritten in
    // place, and seed). Read-only tensors may have any strides; written ones are dense.
    // lr and weight_decay are Scalar and step SymInt so that torch.compile makes them graph
    // inputs: a new scheduled lr or step count does not recompile.
    // inner='adagrad' (§4.10): V <- V + R^2, no exp_avg (None). 8-bit moments (§4.9): exp_avg
    // int8 and exp_avg_sq uint8 codes with fp32 block scales (own x ceil(r / state_block_size)).
    // right: the projection side, overriding the side rule m >= n (a row shard under FSDP2).
    // full_rank 'fira' | 'apollo' adds the scaled full-rank term (DESIGN.md §4.6-§4.7):
    // full_rank_norm 'channel' | 'tensor' (phi per own-line or per tensor), limiter = the fp32
    // [1] norm-growth limiter state ||S_prev|| (< 0 before the first step; updated in place;
    // None: no limiter), limiter_growth = its gamma, scale_front = APOLLO's flag. A full-rank
    // mode runs Adam with fp32/bf16 moments on the side rule's side (other combinations raise).
    "fused_galore_step(Tensor(a!) param, Tensor grad, Tensor proj, Tensor(b!)? exp_avg, "
    "Tensor(c!) exp_avg_sq, *, Scalar lr, float beta1, float beta2, float eps, "
    "Scalar weight_decay, float scale, SymInt step, Tensor? proj_scales=None, "
    "Tensor? proj_zeros=None, int proj_group_size=256, Tensor(d!)? param_scales=None, "
    "Tensor(e!)? param_zeros=None, int param_group_size=256, int seed=0, "
    "str inner='adam', Tensor(f!)? exp_avg_scales=None, Tensor(g!)? exp_avg_sq_scales=None, "
    "int state_block_size=32, bool? right=None, str full_rank='none', "
    "str full_rank_norm='channel', Tensor(h!)? limiter=None, float limiter_growth=1.01, "
    "bool scale_front=False) -> ()",

    // ---- the fused GradNormLoRP step (DESIGN.md §4.8) ----
    // W = g * v/||v|| per row, kept as W itself plus fp32 per-row states: row_scale (g),
    // row_norm (||v||) and g's Adam moments scale_exp_avg/scale_exp_avg_sq (length m each).
    // proj and the low-rank moments as in fused_galore_step (dense, packed INT4 or DCT basis;
    // fp32, bf16 or 8-bit moments with their block scales); param a float weight (INT8 codes
    // are refused: the row renormalisation needs fp32 rows).
    // The CUDA C++ namespace has no kernel of it (Triton serves CUDA tensors).
    "fused_gradnorm_step(Tensor(a!) param, Tensor grad, Tensor proj, Tensor(b!) exp_avg, "
    "Tensor(c!) exp_avg_sq, Tensor(d!) row_scale, Tensor(e!) row_norm, "
    "Tensor(f!) scale_exp_avg, Tensor(g!) scale_exp_avg_sq, *, float lr, float beta1, "
    "float beta2, float eps, float weight_decay, float scale, int step, "
    "Tensor? proj_scales=None, Tensor? proj_zeros=None, int proj_group_size=256, int seed=0, "
    "Tensor(h!)? exp_avg_scales=None, Tensor(i!)? exp_avg_sq_scales=None, "
    "int state_block_size=32) -> ()",

    // ---- quantization (DESIGN.md §4.3-§4.4) ----
    // Groups are `group_size` consecutive row-major elements of the flattened tensor (the last
    // may be partial); scales and zeros are fp32, one per group; dequantized results are fp32.
    // Stochastic rounding draws u = philox_uniform(seed + 2^32 * step, row-major index), step 0
    // for quantize_int8 (csrc/include/lowrank/philox.h).
    "philox_uniform(int seed, Tensor offsets) -> Tensor",
    "quantize_int4(Tensor x, int group_size=256) -> (Tensor, Tensor, Tensor)",
    "dequantize_int4(Tensor packed, Tensor scales, Tensor zeros, int[] shape, "
    "int group_size=256) -> Tensor",
    "quantize_int8(Tensor x, int group_size=256, bool stochastic=False, int seed=0) "
    "-> (Tensor, Tensor, Tensor)",
    "dequantize_int8(Tensor codes, Tensor scales, Tensor zeros, int group_size=256) -> Tensor",

    // ---- DCT projection (DESIGN.md §4.5) ----
    // Top-r rows of the orthonormal DCT-II basis of size d = min(m, n) by the l1 (norm=1) or l2
    // (norm=2) norm of G's DCT coefficients along its short side; returns (int32 indices
    // ascending, low_rank = R for those rows, fp32). method: 'auto' picks 'fft' or 'dense' by d.
    "dct_select(Tensor grad, int rank, int norm=1, *, str method='auto') -> (Tensor, Tensor)",
    // Rows `indices` (int32) of the size-d DCT-II basis, an r x d fp32 tensor.
    "dct_basis(int d, Tensor indices) -> Tensor",
};

#ifdef LOWRANK_EXPERIMENTAL_CUDA_FAST16
// The schema of `name` in kDeviceOpSchemas.
const char* device_op_schema(const std::string& name) {
  for (const char* schema : kDeviceOpSchemas) {
    if (std::string(schema).rfind(name + "(", 0) == 0) return schema;
  }
  TORCH_CHECK(false, "lowrank: no schema named ", name);
}
#endif

}  // namespace

TORCH_LIBRARY(lowrank, m) {
  // ---- dense projection (DESIGN.md §4.1): one ATen implementation serves every device ----
  m.def("project(Tensor grad, Tensor proj) -> Tensor");
  m.def("project_back(Tensor low_rank, Tensor proj, int m, int n, float scale) -> Tensor");
  for (const char* schema : kDeviceOpSchemas) m.def(schema);
  // ---- APOLLO's generated Gaussian basis (DESIGN.md §4.7) ----
  // rank x d fp32 rows, N(0, 1/rank), from (seed, refresh) alone (csrc/include/lowrank/
  // gaussian.h); the same bits on every device. C++ on CPU (csrc/cpu/random_basis.cpp), Triton
  // on CUDA (no CUDA C++ kernel). No tensor argument: a BackendSelect kernel (below) picks the
  // device's kernel from `device` (default CPU), as ATen's factory functions do.
  m.def("random_basis(int d, int rank, int seed, int refresh, *, Device? device=None) -> Tensor");
}

namespace {

at::Tensor random_basis_backend_select(int64_t d, int64_t rank, int64_t seed, int64_t refresh,
                                       std::optional<at::Device> device) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lowrank::random_basis", "")
                             .typed<decltype(random_basis_backend_select)>();
  const c10::DispatchKeySet keys(
      c10::computeDispatchKey(at::kFloat, at::kStrided, device.value_or(at::kCPU)));
  return op.redispatch(keys, d, rank, seed, refresh, device);
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank, BackendSelect, m) {
  m.impl("random_basis", &random_basis_backend_select);
}

#ifdef LOWRANK_WITH_CUDA
TORCH_LIBRARY(lowrank_cuda, m) {
  for (const char* schema : kDeviceOpSchemas) m.def(schema);
}
#endif

#ifdef LOWRANK_EXPERIMENTAL_CUDA_FAST16
// Opt-in build (LOWRANK_EXPERIMENTAL_CUDA=1): csrc/experimental/fused_galore_step_fast16.cu.
TORCH_LIBRARY(lowrank_experimental, m) { m.def(device_op_schema("fused_galore_step")); }
#endif
