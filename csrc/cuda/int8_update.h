// Pass 2 of the CUDA fused step on INT8 weight codes (DESIGN.md §4.4), implemented in
// csrc/cuda/int8_update.cu and called by csrc/cuda/fused_galore_step.cu after its launch 1 has
// written N (fp32) and updated M, V.
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <optional>

#include "lowrank/adam.h"
#include "lowrank/checks.h"

namespace lowrank {

// codes (m x n uint8), scales, zeros (fp32, one per group of `group_size` row-major elements)
// are rewritten in place: per group, W' = decay*s(q - z) - us*back(N) in fp32, then s', z' from
// min/max of W' and q' = clamp(SR(W'/s') + z', 0, 255) with u = philox_uniform(philox_seed,
// row-major index). `normalized` is N (fp32, contiguous: m x r right, r x n left); `proj` is the
// basis in its stored format (dense float, packed INT4 with proj_scales/zeros, or int32 DCT
// indices), read directly: no dequantized or generated copy is made. Arguments are assumed
// validated by check_fused_galore_step.
void int8_weight_update_cuda(at::Tensor& codes, at::Tensor& scales, at::Tensor& zeros,
                             int64_t group_size, uint64_t philox_seed, const at::Tensor& proj,
                             const std::optional<at::Tensor>& proj_scales,
                             const std::optional<at::Tensor>& proj_zeros,
                             int64_t proj_group_size, const at::Tensor& normalized,
                             const StepGeometry& g, const AdamCoeffs& c, cudaStream_t stream);

}  // namespace lowrank
