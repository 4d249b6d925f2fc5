// Host-side DCT helpers shared by csrc/cpu/dct.cpp and csrc/cpu/fused_galore_step.cpp.
#pragma once

#include <ATen/ATen.h>

namespace lowrank {

// Rows idx of the orthonormal DCT-II basis of size d, an r x d fp32 CPU tensor (values from
// lowrank/dct.h). `indices` must already be validated (check_dct_indices).
at::Tensor dct_rows_cpu(int64_t d, const at::Tensor& indices);

}  // namespace lowrank
