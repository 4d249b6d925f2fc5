// Every schema of the `lowrank` operator library, in one place (DESIGN.md §2-§3).
//
// Kernels register per device in csrc/cpu/*.cpp and csrc/cuda/*.cu; fake (meta) kernels,
// autograd formulas and the Python backend switch live in lowrank_kernels/ops.py.
// Schema `float` is C++ `double`, `int` is `int64_t`; `Tensor(a!)` marks a tensor written in place.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import lowrank_kernels._C` loads this library (and so runs the registrations below); the
// module itself is empty: the ops are reached through torch.ops.lowrank.*.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(lowrank, m) {
  // ---- dense projection (DESIGN.md §4.1) ----
  m.def("project(Tensor grad, Tensor proj) -> Tensor");
  m.def("project_back(Tensor low_rank, Tensor proj, int m, int n, float scale) -> Tensor");

  // ---- the fused low-rank AdamW step (DESIGN.md §4.2-§4.5) ----
  // The projection's format follows proj's dtype: floating = dense basis (r×n right, m×r left),
  // uint8 = packed INT4 basis (needs proj_scales/proj_zeros), int32 = DCT row indices (length r).
  // The weight's format follows param's dtype: floating = plain weight, uint8 = INT8 codes updated
  // by stochastic rounding (needs param_scales/param_zeros, rewritten in place, and seed).
  m.def(
      "fused_galore_step(Tensor(a!) param, Tensor grad, Tensor proj, Tensor(b!) exp_avg, "
      "Tensor(c!) exp_avg_sq, *, float lr, float beta1, float beta2, float eps, "
      "float weight_decay, float scale, int step, Tensor? proj_scales=None, "
      "Tensor? proj_zeros=None, int proj_group_size=256, Tensor(d!)? param_scales=None, "
      "Tensor(e!)? param_zeros=None, int param_group_size=256, int seed=0) -> ()");

  // ---- quantization (DESIGN.md §4.3-§4.4) ----
  // Groups are `group_size` consecutive row-major elements of the flattened tensor (the last may
  // be partial); scales and zeros are fp32, one per group; dequantized results are fp32.
  // Stochastic rounding draws u = philox_uniform(seed + 2^32 * step, row-major index), step 0
  // for quantize_int8 (csrc/include/lowrank/philox.h).
  m.def("philox_uniform(int seed, Tensor offsets) -> Tensor");
  m.def("quantize_int4(Tensor x, int group_size=256) -> (Tensor, Tensor, Tensor)");
  m.def(
      "dequantize_int4(Tensor packed, Tensor scales, Tensor zeros, int[] shape, "
      "int group_size=256) -> Tensor");
  m.def(
      "quantize_int8(Tensor x, int group_size=256, bool stochastic=False, int seed=0) "
      "-> (Tensor, Tensor, Tensor)");
  m.def("dequantize_int8(Tensor codes, Tensor scales, Tensor zeros, int group_size=256) -> Tensor");

  // ---- DCT projection (DESIGN.md §4.5) ----
  // Top-r rows of the orthonormal DCT-II basis of size d = min(m, n) by the l1 (norm=1) or l2
  // (norm=2) norm of G's DCT coefficients along its short side; returns (int32 indices ascending,
  // low_rank = R for those rows, fp32). method: 'auto' picks 'fft' or 'dense' by d.
  m.def("dct_select(Tensor grad, int rank, int norm=1, *, str method='auto') -> (Tensor, Tensor)");
  // Rows `indices` (int32) of the size-d DCT-II basis, an r x d fp32 tensor.
  m.def("dct_basis(int d, Tensor indices) -> Tensor");
}
